"""Per-sample pruning state in dense arrays, and each epoch's plan from it.

    pruner = Pruner(len(pool), policy="mmdp", keep_ratio=0.6, epochs=20, seed=0,
                    consistency=scores["clip_score"])
    for epoch in range(20):
        kept, weights = pruner.plan(epoch)       # train on kept only, loss * weights
        ...
        pruner.update(batch_indices, per_sample_losses, epoch)
        assert pruner.losses_received(epoch) == pruner.kept_count(epoch)

Samples are integer indices 0..n-1 (the caller maps keys to indices once).
State is three arrays, 12 bytes a sample: the loss moving average (float32),
the last epoch a loss arrived (int32, -1 = never) and the consistency rank
(float32, stored once). Everything is vectorised: no per-sample Python.

The arrays live in index-range partitions (:mod:`pipeline.prune.partitions`):
one local partition by default; ``bounds=`` splits them, and ``cluster=``
puts the partitions elsewhere (:mod:`pipeline.prune.remote` puts each in a
Ray actor). Plans do not depend on the split (:mod:`pipeline.prune.selection`
says why).

No Ray here; :mod:`pipeline.prune.actor` wraps this in a Ray actor.
"""
from __future__ import annotations

import collections
import io
import logging
from collections.abc import Callable, Sequence

import numpy as np

from pipeline.prune.budget import DEFAULT_KEEP_RATIO, EVEN_SPLIT, PlanContext
from pipeline import storage
from pipeline.prune.partitions import (LocalPartitions, history_state, load_part, part_name, reset_part,
                                       save_part, set_history)
from pipeline.prune.policies import Policy, make_policy, rank_normalise
from pipeline.prune.selection import mix64

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_FILE = "pruner.json"  # a saved state's meta (Pruner.save); the per-sample arrays are beside it
REFERENCE_FILE = "reference.npy"  # and the reference sample indices, if its policy has them


class Pruner:
    """Holds per-sample loss and consistency state and plans each epoch.

    Args:
        num_samples: n; samples are the indices 0..n-1.
        policy: a registered policy name (see ``pipeline.prune.policies.POLICIES``)
            or a ``Policy`` instance.
        keep_ratio: the budget, a share of the samples (``full``'s passes) a
            pruning epoch keeps, in (0, 1]: exactly for the fixed-ratio
            policies; for mmdp the share its pruning stops at (it keeps
            more when too few samples are well-learned, fewer only when
            the excluded noise alone takes it below).
        epochs: total epochs of the run (annealing policies need it).
        seed: with the epoch, seeds each plan's random draws.
        consistency: optional [n] raw cross-modal scores (any scale; higher =
            more consistent, NaN = unscored and least consistent). Only their
            ranks are kept.
        loss_momentum: m in ``ema = m * ema + (1 - m) * loss``; the first
            loss a sample gets is taken as is. None: the policy's own
            (``Policy.loss_momentum``: 0.5, which smooths out one noisy epoch;
            0, each sample's latest loss, for InfoBatch and the rules inside it).
        policy_params: knobs passed to the policy when ``policy`` is a name.
        reference: global indices of known-clean samples, for policies that
            compare loss trajectories with theirs (``trajectory``).
        bounds: partition boundaries ``[0, b1, ..., n]`` (default one partition).
        cluster: ``cluster(bounds, ranks, loss_momentum)`` makes the partitions
            (default :class:`~pipeline.prune.partitions.LocalPartitions`).
        workers: the training workers each epoch's kept samples are split
            among in equal shares (Ray Train's ``equal=True`` split drops the
            rest): a plan leaves out ``kept % workers`` of the samples its
            policy kept, drawn at random each epoch, under the reason
            :data:`~pipeline.prune.budget.EVEN_SPLIT`, so that each one it
            keeps is trained on. Settable (:meth:`set_workers`); not part of
            :attr:`config`: a run resumed on other workers differs only there.
    """

    def __init__(self, num_samples: int, policy: str | Policy = "mmdp",
                 keep_ratio: float = DEFAULT_KEEP_RATIO, epochs: int = 20, seed: int = 0,
                 consistency: np.ndarray | None = None, loss_momentum: float | None = None,
                 policy_params: dict | None = None, bounds: Sequence[int] | None = None,
                 cluster: Callable | None = None, reference: np.ndarray | None = None, workers: int = 1):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if isinstance(policy, str):
            policy = make_policy(policy, **(policy_params or {}))
        elif policy_params:
            raise ValueError("policy_params only applies when policy is given by name")
        loss_momentum = policy.loss_momentum if loss_momentum is None else loss_momentum
        if not 0.0 <= loss_momentum < 1.0:
            raise ValueError(f"loss_momentum must be in [0, 1), got {loss_momentum}")
        if policy.needs_consistency and consistency is None:
            raise ValueError(f"policy {policy.name!r} needs consistency scores")
        self.num_samples = int(num_samples)
        self.policy = policy
        self.keep_ratio = float(keep_ratio)
        self.epochs = int(epochs)
        self.seed = int(seed)
        self.loss_momentum = float(loss_momentum)
        ranks = None
        if consistency is not None:
            consistency = np.asarray(consistency)
            if consistency.shape != (self.num_samples,):
                raise ValueError(f"consistency has shape {consistency.shape}, "
                                 f"expected ({self.num_samples},)")
            ranks = rank_normalise(consistency)
            del consistency
        bounds = [0, self.num_samples] if bounds is None else [int(b) for b in bounds]
        if bounds[0] != 0 or bounds[-1] != self.num_samples or any(
                a >= b for a, b in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"bounds must rise strictly from 0 to {self.num_samples}, got {bounds}")
        self.bounds = bounds
        self._has_consistency = ranks is not None
        self.reference = None
        if policy.history_epochs:
            self.reference = _reference(reference, self.num_samples, policy.name)
        elif reference is not None:
            raise ValueError(f"policy {policy.name!r} takes no reference samples")
        self._parts = (cluster or LocalPartitions)(bounds, ranks, self.loss_momentum, policy.history_epochs,
                                                   self.reference)
        self.workers = 1
        self.set_workers(workers)
        self._received: dict[int, int] = {}
        self.current_epoch = 0  # the latest epoch planned: update()'s default epoch
        self._cached: tuple[int, np.ndarray, np.ndarray, dict] | None = None
        self._kept_counts: dict[int, int] = {}  # each planned epoch's kept count, as planned

    @property
    def config(self) -> dict:
        """What must match for a saved state to reproduce the same plans."""
        return {"num_samples": self.num_samples, "policy": self.policy.name,
                "policy_params": self.policy.params(), "keep_ratio": self.keep_ratio,
                "epochs": self.epochs, "seed": self.seed, "loss_momentum": self.loss_momentum}

    def set_workers(self, workers: int) -> bool:
        """Plan for ``workers`` training workers from now on; True if that changed the number (the memoised
        plan is then forgotten: the next :meth:`plan` call makes it again)."""
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        changed = int(workers) != self.workers
        self.workers = int(workers)
        if changed:
            self._cached = None
        return changed

    @property
    def partitions(self):
        """The partitions holding the state (local, or :class:`pipeline.prune.remote.RayPartitions`)."""
        return self._parts

    @property
    def nbytes(self) -> int:
        """Bytes of per-sample state over all partitions (the design budget is 16 a sample)."""
        return self._parts.nbytes

    def update(self, indices: np.ndarray, losses: np.ndarray, epoch: int | None = None) -> int:
        """Records per-sample training losses; returns how many were recorded.

        Args:
            indices: int [b] sample indices (repeats allowed: the last wins).
            losses: [b] per-sample losses, finite.
            epoch: the epoch they were computed in; defaults to the latest
                epoch planned (``current_epoch``).
        """
        idx, values = check_losses(indices, losses, self.num_samples)
        if idx.size == 0:
            return 0
        e = self.current_epoch if epoch is None else int(epoch)
        self._parts.update(idx, values, e)
        self._received[e] = self._received.get(e, 0) + int(idx.size)
        return int(idx.size)

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The samples to train on at ``epoch`` and their loss weights.

        A pure function of (state, epoch, seed, workers), whatever the partitions. The
        latest epoch's plan is memoised, so asking again mid-epoch (after
        some losses arrived) gives the same plan; an earlier epoch is
        recomputed from the current state.

        Returns:
            (kept, weights): sorted int64 indices and float32 weights.
        """
        kept, weights, _ = self.plan_with_reasons(epoch)
        return kept, weights

    def plan_with_reasons(self, epoch: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """:meth:`plan` and ``{reason: count}`` of the pruned samples (sums to n - kept)."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1:]
        ctx = PlanContext(self.num_samples, self.keep_ratio, self.epochs, epoch, mix64(self.seed, epoch))
        self._parts.begin_plan()
        try:
            kept, weights, reasons = self.policy.plan(self._parts, ctx)
        finally:
            self._parts.end_plan()  # frees the plan's temporaries
        if sum(reasons.values()) != self.num_samples - len(kept):
            raise AssertionError(f"policy {self.policy.name!r} kept {len(kept)} of {self.num_samples} and gave "
                                 f"reasons for {sum(reasons.values())} at epoch {epoch}")
        kept, weights, reasons = _even_split(kept, weights, reasons, self.workers, mix64(self.seed, epoch, 1),
                                             self.reference)
        if epoch >= self.current_epoch or epoch not in self._kept_counts:  # an earlier epoch keeps its count
            self._kept_counts[epoch] = len(kept)
        kept.flags.writeable = False  # shared with every caller of plan()
        weights.flags.writeable = False
        if epoch >= self.current_epoch:
            self.current_epoch = epoch
            self._cached = (epoch, kept, weights, reasons)
        return kept, weights, reasons

    def kept_count(self, epoch: int) -> int:
        """How many samples ``plan(epoch)`` kept when it was made (planning it if it was not)."""
        epoch = int(epoch)
        if epoch not in self._kept_counts:
            self.plan_with_reasons(epoch)
        return self._kept_counts[epoch]

    def losses_received(self, epoch: int | None = None) -> int:
        """How many losses were recorded for ``epoch`` (repeats counted), those sent straight to partitions
        too; with no epoch, for every epoch."""
        received = self._all_received()
        return sum(received.values()) if epoch is None else received.get(int(epoch), 0)

    def _all_received(self) -> dict[int, int]:
        total = collections.Counter(self._received)
        total.update(self._parts.direct_received())  # update adds counts (and keeps zeros, unlike +)
        return dict(total)

    def coverage(self, epoch: int) -> dict:
        """Who reported at ``epoch`` (the latest planned one), against its plan.

        Every kept sample reported exactly once when ``received == reported``
        (no repeats), ``outside_plan == 0`` (no pruned sample was trained on)
        and ``missing`` is the number an equal split across workers left out.
        """
        if self._cached is None or self._cached[0] != int(epoch):
            raise ValueError(f"epoch {epoch} is not the latest planned epoch")
        counts = self._parts.coverage(self._cached[1], int(epoch))
        return {"received": self.losses_received(epoch), "reported": counts["reported"],
                "outside_plan": counts["outside_plan"], "missing": counts["missing"]}

    def state_dict(self) -> dict:
        """Everything needed to reproduce future plans, as plain values.

        Arrays are NumPy; the rest are Python scalars, strings, dicts and
        None. ``torch.load(weights_only=True)`` refuses NumPy arrays, so a
        torch checkpoint should store ``torch.from_numpy(v)`` for the arrays
        (``load_state_dict`` accepts tensors back as they are).
        """
        received = self._all_received()
        epochs_seen = sorted(received)
        loss, last_seen, consistency = self._parts.get_state()  # copies, gathered from the partitions
        state = {
            "version": STATE_VERSION,
            "config": self.config,
            "current_epoch": self.current_epoch,
            "loss": loss,
            "last_seen": last_seen,
            "consistency": consistency,
            "received_epochs": np.asarray(epochs_seen, dtype=np.int64),
            "received_counts": np.asarray([received[e] for e in epochs_seen], dtype=np.int64),
        }
        if self.reference is not None:
            state.update(self._history_state())
        return state

    def _history_state(self) -> dict:
        """The loss histories with one slot epoch for all (a partition's older slot saved as no loss)."""
        parts = self._parts.map(history_state)
        slot_epoch = np.max([p[1] for p in parts], axis=0)
        history = np.concatenate([np.where((p[1] == slot_epoch)[None, :], p[0], np.float16(np.nan)) for p in parts])
        return {"history": history, "history_slot_epoch": slot_epoch, "reference": self.reference.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Restores a ``state_dict()``; the config must match this pruner's."""
        self._check_saved(state, state["consistency"] is not None,
                          lambda: _numpy(state["reference"]) if "history" in state else None)
        loss = _array(state["loss"], np.float32, self.num_samples)
        last_seen = _array(state["last_seen"], np.int32, self.num_samples)
        consistency = None
        if state["consistency"] is not None:
            consistency = _array(state["consistency"], np.float32, self.num_samples)
        self._parts.set_state(loss, last_seen, consistency)
        if self.reference is not None:
            history, slot_epoch = _numpy(state["history"]), _numpy(state["history_slot_epoch"])
            self._parts.map_each(set_history, [(history[a:b], slot_epoch)
                                               for a, b in zip(self.bounds[:-1], self.bounds[1:])])
        epochs_seen = np.asarray(state["received_epochs"]).tolist()
        counts = np.asarray(state["received_counts"]).tolist()
        self._received = {int(e): int(c) for e, c in zip(epochs_seen, counts)}
        self.current_epoch = int(state["current_epoch"])
        self._cached = None

    def _check_saved(self, state: dict, has_consistency: bool, saved_reference) -> None:
        """A ValueError unless a saved ``state`` (its version and config) can restore into this pruner:
        the consistency if the policy needs it, and the same reference samples (``saved_reference()``,
        read only for a pruner with a reference; None when the state has no loss history)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pruner state version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        differ = sorted(k for k, v in self.config.items() if state["config"].get(k) != v)
        if differ:
            raise ValueError("pruner state was saved with a different config: " + ", ".join(
                f"{k}={state['config'].get(k)!r} (now {self.config[k]!r})" for k in differ))
        if self.policy.needs_consistency and not has_consistency:
            raise ValueError(f"saved state has no consistency; {self.policy.name!r} needs it")
        if self.reference is not None:
            reference = saved_reference()
            if reference is None:
                raise ValueError(f"saved state has no loss history; {self.policy.name!r} needs it")
            if not np.array_equal(reference, self.reference):
                raise ValueError("saved state was made with other reference samples")

    def save(self, url: str) -> None:
        """Writes the state to the folder ``url``: each partition its own file, where it lives (nothing is
        gathered in one process), then ``pruner.json`` (config, epochs, counts) and the folder's commit.

        :meth:`load` restores it, into any layout of partitions.
        """
        with storage.output(url):
            slots = self._parts.map_each(save_part, [(storage.join(url, part_name(i)),)
                                                     for i in range(len(self.bounds) - 1)])
            received = self._all_received()
            meta = {"version": STATE_VERSION, "config": self.config, "current_epoch": self.current_epoch,
                    "bounds": self.bounds, "received": {str(e): c for e, c in sorted(received.items())},
                    "consistency": self._has_consistency}
            if self.reference is not None:  # one slot epoch for all ranges, and which samples were the reference
                meta["slot_epoch"] = np.max(slots, axis=0).tolist()
                buf = io.BytesIO()
                np.save(buf, self.reference)
                storage.write_bytes(buf.getbuffer(), storage.join(url, REFERENCE_FILE))
            storage.write_json(meta, storage.join(url, STATE_FILE))

    def load(self, url: str) -> None:
        """Restores a state :meth:`save` wrote to ``url``; the config must match this pruner's.

        Raises:
            InputError: ``url`` is not a committed saved state.
            ValueError: it was saved by a pruner of another config or reference.
        """
        meta = read_saved(url)
        self._check_saved(meta, meta["consistency"], lambda: saved_reference(url))
        self._parts.map_each(load_part, [(url, meta["bounds"], meta.get("slot_epoch"))] * (len(self.bounds) - 1))
        self._received = {int(e): int(c) for e, c in meta["received"].items()}
        self.current_epoch = int(meta["current_epoch"])
        self._cached = None

    def reset(self) -> None:
        """Back to the state it started in: no losses, no epoch planned (the consistency stays)."""
        self._parts.map(reset_part)
        self._received, self._kept_counts = {}, {}
        self.current_epoch = 0
        self._cached = None


def _even_split(kept: np.ndarray, weights: np.ndarray, reasons: dict, workers: int, salt: int,
                reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The plan less ``len(kept) % workers`` of its samples, under :data:`~pipeline.prune.budget.EVEN_SPLIT`:
    an equal split then drops none. Drawn as every draw of a plan, by splitmix (:func:`mix64` of ``salt``
    and a counter: the same across NumPy versions and partitions), from the trained samples that are not
    ``reference`` ones (probes, weight 0, are re-checks on their schedule, and reference samples are never
    pruned), else from all; a few draws, whatever the plan's size. A plan of fewer samples than workers
    leaves out all of them (Ray Train's equal split would give each worker none): a warning says so."""
    extra = len(kept) % workers
    if not extra:
        return kept, weights, reasons
    if extra == len(kept):
        log.warning("the plan keeps %d samples, fewer than the %d workers: none is trained on this epoch",
                    len(kept), workers)
        out = np.arange(len(kept))
    else:
        def eligible(pos: int) -> bool:
            return weights[pos] > 0 and (reference is None or not _holds(reference, kept[pos]))

        out, draw = [], 0
        while len(out) < extra and draw < 64 * workers:  # each draw is eligible nearly always
            pos = mix64(salt, draw) % len(kept)
            draw += 1
            if pos not in out and eligible(pos):
                out.append(pos)
        rest = (pos for pos in range(len(kept)) if pos not in out)  # none eligible enough: in order
        out += [next(rest) for _ in range(extra - len(out))]
    return (np.delete(kept, out), np.delete(weights, out),
            {**reasons, EVEN_SPLIT: reasons.get(EVEN_SPLIT, 0) + extra})


def _holds(sorted_values: np.ndarray, value) -> bool:
    at = np.searchsorted(sorted_values, value)
    return bool(at < len(sorted_values) and sorted_values[at] == value)


def check_losses(indices, losses, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, float32 losses) as arrays, after checking them against ``num_samples``.

    Raises:
        ValueError: shapes differ or are not 1-d, or a loss is not finite.
        TypeError: the indices are not integers.
        IndexError: an index outside [0, num_samples).
    """
    idx = np.asarray(indices)
    values = np.asarray(losses, dtype=np.float32)
    if idx.ndim != 1 or values.shape != idx.shape:
        raise ValueError(f"indices {idx.shape} and losses {values.shape} must be equal 1-d")
    if idx.size == 0:
        return idx, values
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be integers, got {idx.dtype}")
    if idx.min() < 0 or idx.max() >= num_samples:
        raise IndexError(f"indices must lie in [0, {num_samples}), got [{idx.min()}, {idx.max()}]")
    if not np.isfinite(values).all():
        raise ValueError(f"{int(np.count_nonzero(~np.isfinite(values)))} of {values.size} losses are not finite")
    return idx, values


def _reference(reference, num_samples: int, policy: str) -> np.ndarray:
    """Sorted unique int64 reference indices, checked."""
    if reference is None or len(reference) == 0:
        raise ValueError(f"policy {policy!r} needs reference samples (indices of rows known to be clean)")
    ref = np.unique(np.asarray(reference, dtype=np.int64))
    if ref[0] < 0 or ref[-1] >= num_samples:
        raise IndexError(f"reference indices must lie in [0, {num_samples}), got [{ref[0]}, {ref[-1]}]")
    return ref


def read_saved(url: str) -> dict:
    """The meta of a state :meth:`Pruner.save` wrote to ``url``: its ``config`` names the pruner's arguments.

    Raises:
        InputError: ``url`` is not a committed saved state.
    """
    storage.check_not_pending(url)
    if not storage.is_complete(url):
        raise storage.InputError(f"{url}: no saved pruner state there")
    return storage.read_json(storage.join(url, STATE_FILE))


def saved_reference(url: str) -> np.ndarray | None:
    """The reference sample indices of a saved state (None if its policy has none)."""
    path = storage.join(url, REFERENCE_FILE)
    return np.load(io.BytesIO(storage.read_bytes(path))) if storage.exists(path) else None


def _numpy(value) -> np.ndarray:
    """A NumPy view of a NumPy array or a CPU torch tensor (no torch import needed here)."""
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _array(value, dtype, length: int) -> np.ndarray:
    """A private, writable copy (accepts NumPy arrays and CPU torch tensors)."""
    out = np.array(_numpy(value), dtype=dtype, copy=True)
    if out.shape != (length,):
        raise ValueError(f"saved array has shape {out.shape}, expected ({length},)")
    return out
