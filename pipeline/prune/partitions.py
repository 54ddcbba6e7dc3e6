"""Per-sample pruning state for one index range, and a local set of such ranges.

A :class:`Partition` holds the dense state of the global indices
``[start, stop)``: 12 bytes a sample (loss moving average float32, last
epoch a loss arrived int32, consistency rank float32), 13 with the
consistency bin (uint8) it derives once for mmdp's plans (and, for a policy
that reads loss trajectories, 2 bytes a sample an epoch of history), plus, only while a
plan is being made, a ``scratch`` dict of that plan's temporaries (freed at
its end). :class:`LocalPartitions` is a cluster of them in one process with
the ``map`` / ``map_each`` interface of :mod:`pipeline.prune.selection`;
:mod:`pipeline.prune.remote` is the same over Ray actors. A
:class:`~pipeline.prune.pruner.Pruner` uses one local partition unless given
``bounds``.

Saved state: :func:`save_part` writes each partition's arrays to a file of
its own (``part-NNNNN.npz`` of its range) and :func:`load_part` reads back
the slices of the saved files its range covers, so a state saved in one
layout of partitions loads into another, and no process gathers it whole.

No Ray here.
"""
from __future__ import annotations

import io

import numpy as np

from pipeline import storage
from pipeline.prune.steps import consistency_bins


class Partition:
    """The state of global indices ``[start, stop)``.

    Args:
        start, stop: the global index range.
        consistency: float32 [stop - start] consistency ranks of the range, or None.
        loss_momentum: m in ``ema = m * ema + (1 - m) * loss``.
        window: epochs of loss history each sample keeps (0: none; policies that read trajectories).
        reference: with a window, the local indices of the range's known-clean samples.
    """

    def __init__(self, start: int, stop: int, consistency: np.ndarray | None, loss_momentum: float,
                 window: int = 0, reference: np.ndarray | None = None):
        self.start, self.stop, self.n = int(start), int(stop), int(stop) - int(start)
        self.loss_momentum = float(loss_momentum)
        self.loss = np.zeros(self.n, dtype=np.float32)
        self.last_seen = np.full(self.n, -1, dtype=np.int32)
        self.consistency = None if consistency is None else np.asarray(consistency, dtype=np.float32)
        self.cbin = consistency_bins(self.consistency)
        # Loss trajectories, only for policies that read them; set here, so that a partition
        # actor that Ray restarts has them again (in their initial state, as the rest):
        # history[i, e % W] = sample i's loss of epoch slot_epoch[e % W] (NaN: none).
        self.history: np.ndarray | None = None
        self.slot_epoch: np.ndarray | None = None
        self.reference: np.ndarray | None = None  # local indices of known-clean samples
        if window:
            self.history = np.full((self.n, int(window)), np.nan, dtype=np.float16)
            self.slot_epoch = np.full(int(window), -1, dtype=np.int64)
            self.reference = np.asarray(reference, dtype=np.int64)
        self.scratch: dict = {}
        self.direct: dict[int, int] = {}  # losses per epoch reported straight here (Ray partitions), not via the pruner

    @property
    def nbytes(self) -> int:
        arrays = [self.loss, self.last_seen, self.consistency, self.cbin, self.history, self.reference]
        return sum(a.nbytes for a in arrays if a is not None)

    def update(self, local: np.ndarray, values: np.ndarray, epoch: int) -> None:
        """Blends losses into the moving average (indices local to the partition, checked by the caller)."""
        prev = self.last_seen[local]
        m = np.float32(self.loss_momentum)
        blended = self.loss[local]
        blended *= m
        blended += (np.float32(1.0) - m) * values
        self.loss[local] = np.where(prev >= 0, blended, values)
        # max, so a late report from an older epoch never rewinds "last seen".
        np.maximum(prev, np.int32(epoch), out=prev)
        self.last_seen[local] = prev
        if self.history is not None:
            slot = epoch % len(self.slot_epoch)
            if self.slot_epoch[slot] < epoch:  # a new epoch takes over the oldest slot
                self.history[:, slot] = np.nan
                self.slot_epoch[slot] = epoch
            if self.slot_epoch[slot] == epoch:  # (a report older than the window is not kept)
                self.history[local, slot] = np.minimum(values, np.float32(60000.0)).astype(np.float16)

    def begin_plan(self) -> None:
        self.scratch = {"seen": self.last_seen >= 0}

    def end_plan(self) -> None:
        self.scratch = {}

    def get_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return self.loss, self.last_seen, self.consistency

    def set_state(self, loss: np.ndarray, last_seen: np.ndarray, consistency: np.ndarray | None) -> None:
        self.loss, self.last_seen = _writable(loss, np.float32), _writable(last_seen, np.int32)
        self.consistency = None if consistency is None else _writable(consistency, np.float32)
        self.cbin = consistency_bins(self.consistency)
        self.scratch = {}
        self.direct = {}  # the saved state's counts include them

    def count_last_seen(self, local_kept: np.ndarray, epoch: int) -> dict:
        """Coverage counts of this range against its slice of a plan's kept indices."""
        kept_mask = np.zeros(self.n, dtype=bool)
        kept_mask[local_kept] = True
        reported = self.last_seen == int(epoch)
        return {"reported": int(np.count_nonzero(reported)),
                "outside_plan": int(np.count_nonzero(reported & ~kept_mask)),
                "missing": int(np.count_nonzero(self.last_seen[local_kept] < int(epoch)))}


def split_reference(bounds, reference: np.ndarray | None) -> list[np.ndarray | None]:
    """Each range's local indices of the sorted global ``reference`` indices (None for each without)."""
    if reference is None:
        return [None] * (len(bounds) - 1)
    cuts = np.searchsorted(reference, bounds)
    return [reference[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(bounds) - 1)]


def history_state(part: Partition) -> tuple[np.ndarray, np.ndarray]:
    """(loss history, slot epochs) of a partition, copies."""
    return part.history.copy(), part.slot_epoch.copy()


def set_history(part: Partition, history: np.ndarray, slot_epoch: np.ndarray) -> None:
    part.history = np.array(history, dtype=np.float16, copy=True)
    part.slot_epoch = np.array(slot_epoch, dtype=np.int64, copy=True)


def part_name(number: int) -> str:
    return f"part-{number:05d}.npz"


def save_part(part: Partition, url: str) -> list[int] | None:
    """A cluster step (``map_each``): writes this range's state to ``url`` (one ``.npz``); returns its
    history's slot epochs (None without a history), which the pruner combines for all ranges."""
    arrays = {"start": np.int64(part.start), "stop": np.int64(part.stop), "loss": part.loss,
              "last_seen": part.last_seen}
    if part.consistency is not None:
        arrays["consistency"] = part.consistency
    if part.history is not None:
        arrays.update(history=part.history, slot_epoch=part.slot_epoch)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(buf.getbuffer(), url)
    return None if part.slot_epoch is None else part.slot_epoch.tolist()


def load_part(part: Partition, folder: str, saved_bounds: list[int], slot_epoch: list[int] | None) -> None:
    """A cluster step (``map_each``): restores this range from the saved parts in ``folder`` that overlap it.

    ``saved_bounds``: the saving pruner's partition bounds; ``slot_epoch``:
    the combined slot epochs of its history (a saved range's older slot is
    restored as no loss, as a gathered state would have it).
    """
    loss = np.zeros(part.n, np.float32)
    last_seen = np.full(part.n, -1, np.int32)
    consistency = None if part.consistency is None else part.consistency.copy()  # kept where none was saved
    history = None if part.history is None else np.full(part.history.shape, np.nan, np.float16)
    first = max(0, int(np.searchsorted(saved_bounds, part.start, side="right")) - 1)
    for number in range(first, len(saved_bounds) - 1):
        lo, hi = saved_bounds[number], saved_bounds[number + 1]
        if lo >= part.stop:
            break
        a, b = max(lo, part.start), min(hi, part.stop)
        with np.load(io.BytesIO(storage.read_bytes(storage.join(folder, part_name(number))))) as saved:
            mine, theirs = slice(a - part.start, b - part.start), slice(a - lo, b - lo)
            loss[mine], last_seen[mine] = saved["loss"][theirs], saved["last_seen"][theirs]
            if consistency is not None and "consistency" in saved:
                consistency[mine] = saved["consistency"][theirs]
            if history is not None:
                if "history" not in saved:
                    raise ValueError(f"saved state {folder} has no loss history")
                current = (saved["slot_epoch"] == np.asarray(slot_epoch))[None, :]
                history[mine] = np.where(current, saved["history"][theirs], np.float16(np.nan))
    part.set_state(loss, last_seen, consistency)
    if history is not None:
        set_history(part, history, np.asarray(slot_epoch))


def reset_part(part: Partition) -> None:
    """A cluster step (``map``): back to the initial state (no losses, no history); consistency stays."""
    part.loss[:] = 0
    part.last_seen[:] = -1
    if part.history is not None:
        part.history[:] = np.nan
        part.slot_epoch[:] = -1
    part.scratch, part.direct = {}, {}


def _writable(a, dtype) -> np.ndarray:
    """``a`` itself when it is a writable array of ``dtype`` (a caller's private copy), else a copy."""
    a = np.asarray(a)
    return a if a.dtype == dtype and a.flags.writeable else np.array(a, dtype=dtype, copy=True)


def even_bounds(num_samples: int, num_parts: int) -> list[int]:
    """Boundaries splitting range(num_samples) into ``num_parts`` near-equal ranges."""
    return [num_samples * i // num_parts for i in range(num_parts + 1)]


def split_by_bounds(bounds: np.ndarray, indices: np.ndarray):
    """Yields (partition, local indices, positions in ``indices``) for each partition that gets any."""
    if len(bounds) == 2:
        yield 0, indices - bounds[0] if bounds[0] else indices, slice(None)
        return
    part = np.searchsorted(bounds, indices, side="right") - 1
    for p in np.unique(part).tolist():
        pos = np.flatnonzero(part == p)
        yield p, indices[pos] - bounds[p], pos


class LocalPartitions:
    """Partitions of one process, with the cluster interface of :mod:`pipeline.prune.selection`.

    Args:
        bounds: increasing boundaries ``[0, b1, ..., n]``: partition i holds [b_i, b_i+1).
        consistency: float32 [n] ranks or None (partitions keep views of it).
        loss_momentum, window: passed to every partition.
        reference: sorted global indices of known-clean samples (with a window); each partition gets its own.
    """

    def __init__(self, bounds, consistency: np.ndarray | None, loss_momentum: float,
                 window: int = 0, reference: np.ndarray | None = None):
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.parts = [Partition(a, b, None if consistency is None else consistency[a:b], loss_momentum, window, ref)
                      for a, b, ref in zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist(),
                                           split_reference(self.bounds, reference))]

    def map(self, fn, *args) -> list:
        return [fn(part, *args) for part in self.parts]

    def map_each(self, fn, args_per_part) -> list:
        return [fn(part, *args) for part, args in zip(self.parts, args_per_part)]

    def update(self, indices: np.ndarray, values: np.ndarray, epoch: int) -> None:
        for p, local, pos in split_by_bounds(self.bounds, indices):
            self.parts[p].update(local, values[pos], epoch)

    def begin_plan(self) -> None:
        for part in self.parts:
            part.begin_plan()

    def end_plan(self) -> None:
        for part in self.parts:
            part.end_plan()

    def coverage(self, kept: np.ndarray, epoch: int) -> dict:
        counts = [p.count_last_seen(local, epoch) for p, local in zip(self.parts, split_sorted(self.bounds, kept))]
        return {k: sum(c[k] for c in counts) for k in counts[0]}

    def get_state(self):
        return _concat([p.get_state() for p in self.parts])

    def set_state(self, loss, last_seen, consistency) -> None:
        for p, a, b in zip(self.parts, self.bounds[:-1].tolist(), self.bounds[1:].tolist()):
            p.set_state(loss[a:b], last_seen[a:b], None if consistency is None else consistency[a:b])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def direct_received(self) -> dict[int, int]:
        """Losses per epoch that bypassed the pruner (none here: only Ray partitions take them)."""
        return {}


def split_sorted(bounds: np.ndarray, kept: np.ndarray) -> list[np.ndarray]:
    """A sorted global index array cut into each partition's local indices."""
    cuts = np.searchsorted(kept, bounds)
    return [kept[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(bounds) - 1)]


def _concat(states) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if len(states) == 1:
        loss, seen, cons = states[0]
        return loss.copy(), seen.copy(), None if cons is None else cons.copy()
    cons = None if states[0][2] is None else np.concatenate([s[2] for s in states])
    return np.concatenate([s[0] for s in states]), np.concatenate([s[1] for s in states]), cons
