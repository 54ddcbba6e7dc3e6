"""Pruner state split by index range over Ray actors that plan together.

    pruner = Pruner(n, "mmdp", consistency=scores, bounds=even_bounds(n, 4), cluster=RayPartitions)

:class:`RayPartitions` is the Ray version of
:class:`pipeline.prune.partitions.LocalPartitions`: each index range lives in
a :class:`PartitionActor`, and ``map(fn, *args)`` runs a planning step (a
plain function of :mod:`pipeline.prune.steps` or
:mod:`pipeline.prune.selection`) in every partition actor at once. The pruner
that holds it is the coordinator: it combines the partitions' summaries into
the global quantities (thresholds, means, histograms) and gathers the kept
indices. Losses reach a partition straight from the workers' reporters
(``PartitionActor.report``, counted there), or routed by the coordinator
(``update``) for losses handed to the pruner itself. Plans are the same as one pruner's for the same state, seed and
epoch (:mod:`pipeline.prune.selection`). :class:`pipeline.prune.actor.PruningActor`
uses this above ``partition_size`` samples, so callers see one actor either way.
"""
from __future__ import annotations

import collections
import uuid
import warnings

import numpy as np
import ray

from pipeline.prune.partitions import Partition, split_by_bounds, split_reference, split_sorted

# Partition actors are restarted like the coordinator; a restarted one is back
# to its initial state and the coordinator's info() reports it.
MAX_RESTARTS = 4
MAX_TASK_RETRIES = 4
# Updates sent to the partitions without waiting; past this many the oldest are awaited.
MAX_PENDING_UPDATES = 64
# Arguments bigger than this go to the object store once for all partitions.
_PUT_BYTES = 64 * 1024


@ray.remote(num_cpus=0, max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
class PartitionActor:
    """One :class:`~pipeline.prune.partitions.Partition` (num_cpus=0: idle most of the time, it must not hold a CPU the data tasks need)."""

    def __init__(self, start: int, stop: int, consistency: np.ndarray | None, loss_momentum: float,
                 window: int = 0, reference: np.ndarray | None = None):
        # Ray runs this again on a restart: the range comes back as it started, history set up included.
        self._part = Partition(start, stop, consistency, loss_momentum, window, reference)
        self._incarnation = uuid.uuid4().hex  # new with every (re)start

    def run(self, fn, *args):
        return fn(self._part, *args)

    def update(self, local: np.ndarray, values: np.ndarray, epoch: int) -> int:
        self._part.update(local, values, epoch)
        return len(local)

    def report(self, local: np.ndarray, values: np.ndarray, epoch: int) -> int:
        """Losses a worker's reporter sent here directly (indices local, checked by the sender); counted here."""
        count = self.update(local, values, epoch)
        self._part.direct[int(epoch)] = self._part.direct.get(int(epoch), 0) + count
        return count

    def direct_received(self) -> dict[int, int]:
        return dict(self._part.direct)

    def begin_plan(self) -> None:
        self._part.begin_plan()

    def end_plan(self) -> None:
        self._part.end_plan()

    def coverage(self, local_kept: np.ndarray, epoch: int) -> dict:
        return self._part.count_last_seen(local_kept, epoch)

    def get_state(self):
        return self._part.get_state()

    def set_state(self, loss, last_seen, consistency) -> None:
        """Restores this range's state; direct counts restart (the saved state's counts include them)."""
        self._part.set_state(loss, last_seen, consistency)

    def nbytes(self) -> int:
        return self._part.nbytes

    def incarnation(self) -> tuple[bool, str]:
        """(whether Ray restarted this actor, an id new with every start)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Ray 2.58's own deprecated call
            return bool(ray.get_runtime_context().was_current_actor_reconstructed), self._incarnation


class RayPartitions:
    """Partitions in Ray actors, with the cluster interface of :mod:`pipeline.prune.selection`.

    Args:
        bounds: ``[0, b1, ..., n]``: one actor per range [b_i, b_i+1).
        consistency: float32 [n] ranks or None; each actor gets its slice.
        loss_momentum, window: passed to every partition.
        reference: sorted global indices of known-clean samples (with a window); each actor gets its own.
    """

    def __init__(self, bounds, consistency: np.ndarray | None, loss_momentum: float,
                 window: int = 0, reference: np.ndarray | None = None):
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.actors = [
            PartitionActor.remote(a, b, None if consistency is None else consistency[a:b], loss_momentum, window, ref)
            for a, b, ref in zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist(),
                                 split_reference(self.bounds, reference))
        ]
        self._pending: list[ray.ObjectRef] = []

    def map(self, fn, *args) -> list:
        self._settle()
        args = tuple(ray.put(a) if isinstance(a, np.ndarray) and a.nbytes > _PUT_BYTES else a for a in args)
        return ray.get([actor.run.remote(fn, *args) for actor in self.actors])

    def map_each(self, fn, args_per_part) -> list:
        self._settle()
        return ray.get([actor.run.remote(fn, *args) for actor, args in zip(self.actors, args_per_part)])

    def update(self, indices: np.ndarray, values: np.ndarray, epoch: int) -> None:
        """Routes each loss to its partition; does not wait (calls from one caller run in order)."""
        for p, local, pos in split_by_bounds(self.bounds, indices):
            self._pending.append(self.actors[p].update.remote(local, values[pos], epoch))
        if len(self._pending) > MAX_PENDING_UPDATES:
            done, self._pending = ray.wait(self._pending, num_returns=len(self._pending) - MAX_PENDING_UPDATES // 2)
            ray.get(done)  # a partition's error surfaces here rather than never

    def begin_plan(self) -> None:
        self._settle()
        ray.get([a.begin_plan.remote() for a in self.actors])

    def end_plan(self) -> None:
        ray.get([a.end_plan.remote() for a in self.actors])

    def coverage(self, kept: np.ndarray, epoch: int) -> dict:
        self._settle()
        counts = ray.get([a.coverage.remote(local, epoch)
                          for a, local in zip(self.actors, split_sorted(self.bounds, kept))])
        return {k: sum(c[k] for c in counts) for k in counts[0]}

    def get_state(self):
        self._settle()
        states = ray.get([a.get_state.remote() for a in self.actors])
        cons = None if states[0][2] is None else np.concatenate([s[2] for s in states])
        return np.concatenate([s[0] for s in states]), np.concatenate([s[1] for s in states]), cons

    def set_state(self, loss, last_seen, consistency) -> None:
        self._settle()
        ray.get([a.set_state.remote(loss[lo:hi], last_seen[lo:hi], None if consistency is None else consistency[lo:hi])
                 for a, lo, hi in zip(self.actors, self.bounds[:-1].tolist(), self.bounds[1:].tolist())])

    @property
    def nbytes(self) -> int:
        return sum(ray.get([a.nbytes.remote() for a in self.actors]))

    def direct_received(self) -> dict[int, int]:
        """Losses per epoch that reporters sent straight to the partitions, summed."""
        total: collections.Counter = collections.Counter()
        for counts in ray.get([a.direct_received.remote() for a in self.actors]):
            total.update(counts)
        return dict(total)

    def incarnations(self) -> list[tuple[bool, str]]:
        """Per partition actor: (restarted by Ray, so its state is back to the start; its start id)."""
        return ray.get([a.incarnation.remote() for a in self.actors])

    def _settle(self) -> None:
        """Waits for the updates in flight (and raises their errors) before reading state."""
        pending, self._pending = self._pending, []
        ray.get(pending)
