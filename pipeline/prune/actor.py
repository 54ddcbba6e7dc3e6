"""The pruner as a named Ray actor, and the worker-side loss reporter.

    name = actor_name(run_id)                                    # "mmdp-pruner-<run_id>"
    create_pruner(name, num_samples=n, policy="mmdp", keep_ratio=0.6,
                  epochs=20, seed=0, consistency=scores)          # driver
    actor = get_pruner(name)                                      # anywhere in the job
    ray.get(actor.start_epoch.remote(epoch, workers))             # once, before the epoch
    epoch, [ref] = ray.get(actor.published_plan.remote())         # e.g. in a Ray Data stage
    kept, weights = ray.get(ref)                                  # shared via object store
    reporter = LossReporter(actor)                                # each training worker
    reporter.report(batch_indices, per_sample_losses)             # fire-and-forget
    reporter.flush()                                              # end of epoch
    ray.get(actor.epoch_summary.remote(epoch))                    # kept, received, missing...

Plan look-ups never wait for loss ingest or planning: ``published_plan``
runs in its own concurrency group and only reads the reference that
``start_epoch`` published, so a data stage that asks once per block gets the
epoch's plan while the actor is busy with losses.

Above ``partition_size`` samples (or with ``num_partitions=`` / ``bounds=``)
the actor is a coordinator: the per-sample state lives in partition actors it
owns (:mod:`pipeline.prune.remote`) and it plans with them. Its remote
methods, plans and checkpoints are the same as with one partition, but loss
reports skip it: a :class:`LossReporter` asks once for its ``routes`` and
sends each loss straight to the partition that owns the sample.

The Ray Core code of the library (with :mod:`pipeline.prune.remote`); the state
and the policies are plain NumPy (:mod:`pipeline.prune.pruner`, :mod:`pipeline.prune.policies`).
"""
from __future__ import annotations

import hashlib
import time
import uuid
import warnings

import numpy as np
import ray

from pipeline.prune.budget import DEFAULT_KEEP_RATIO
from pipeline.prune.partitions import even_bounds, split_by_bounds
from pipeline.prune.plan_log import PlanLog
from pipeline.prune.pruner import Pruner, check_losses
from pipeline.prune.remote import RayPartitions

# A crashed pruner comes back (Ray re-runs __init__ with the same arguments);
# the train loop then sees info()["reconstructed"] and reloads its checkpoint.
MAX_RESTARTS = 4
# Calls in flight when it crashed are retried on the new incarnation instead
# of failing the training step.
MAX_TASK_RETRIES = 4
# Plans kept alive in the object store: the current epoch and the one before
# (a slow worker may still be fetching it).
PLANS_CACHED = 2
# One actor holds up to this many samples (16 B each: 0.8 GB); beyond, the
# state is split over ceil(n / PARTITION_SIZE) partition actors.
PARTITION_SIZE = 50_000_000


def actor_name(run_id: str) -> str:
    """The name the pruning actor of run ``run_id`` is registered under."""
    return f"mmdp-pruner-{run_id}"


@ray.remote(num_cpus=0, max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
            concurrency_groups={"lookups": 4})
class PruningActor:
    """A :class:`~pipeline.prune.pruner.Pruner` shared by the driver and all workers.

    num_cpus=0: it is mostly idle and must not take a CPU slot that Ray Data
    or a training worker needs (on 2 cores, one more CPU slot taken stalls the run).
    Calls run one at a time, so updates and plans never interleave; only
    ``published_plan`` (a read of one reference) runs beside them, in the
    ``lookups`` group.

    Args are those of :class:`~pipeline.prune.pruner.Pruner`, and:
        partition_size: most samples one actor holds; more are split over
            ``ceil(n / partition_size)`` partition actors of near-equal ranges.
        num_partitions: the number of partition actors, overriding ``partition_size``.
        bounds: explicit partition boundaries ``[0, ..., n]``, overriding both.
        One partition means no partition actors: the state lives in this actor.
    """

    def __init__(self, num_samples: int, policy: str = "mmdp", keep_ratio: float = DEFAULT_KEEP_RATIO,
                 epochs: int = 20, seed: int = 0, consistency: np.ndarray | None = None,
                 loss_momentum: float | None = None, policy_params: dict | None = None,
                 partition_size: int = PARTITION_SIZE, num_partitions: int | None = None,
                 bounds: list[int] | None = None, reference: np.ndarray | None = None):
        if bounds is None:
            parts = num_partitions or max(1, -(-int(num_samples) // max(1, int(partition_size))))
            bounds = even_bounds(int(num_samples), min(parts, max(1, int(num_samples))))
        self._pruner = Pruner(num_samples, policy, keep_ratio=keep_ratio, epochs=epochs,
                              seed=seed, consistency=consistency,
                              loss_momentum=loss_momentum, policy_params=policy_params,
                              bounds=bounds, cluster=RayPartitions if len(bounds) > 2 else None,
                              reference=reference)
        self._plan_refs: dict[int, ray.ObjectRef] = {}
        # (epoch, [ref]) of the current epoch's plan once published; replaced
        # whole, so a lookups-group thread reads either the old or the new one.
        self._published: tuple[int, list[ray.ObjectRef]] | None = None
        # New with every (re)start: a trainer that sees it change knows the
        # state went back to its initial value and must reload a checkpoint.
        self._incarnation = uuid.uuid4().hex
        # The incarnation (info()'s) whose state a load_state or reset set: every worker may go on with it.
        self._restored_at: str | None = None
        self._log = PlanLog(self._pruner.num_samples)

    def info(self) -> dict:
        """Config, current epoch, and whether Ray restarted this actor.

        ``reconstructed`` True means the state (or a partition of it) is
        back to its initial value: load the last checkpoint with
        ``load_state_dict``.
        """
        with warnings.catch_warnings():
            # Ray 2.58 flags an internal call of this property as deprecated.
            warnings.simplefilter("ignore", DeprecationWarning)
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        incarnation = self._incarnation
        parts = self._pruner.partitions
        if isinstance(parts, RayPartitions):
            # A restarted partition actor lost its part of the state: that is a new incarnation too.
            part_incarnations = parts.incarnations()
            reconstructed = reconstructed or any(r for r, _ in part_incarnations)
            incarnation = hashlib.sha256(":".join([incarnation] + [i for _, i in part_incarnations])
                                         .encode()).hexdigest()[:32]
        return {"config": self._pruner.config, "current_epoch": self._pruner.current_epoch,
                "nbytes": self._pruner.nbytes, "partitions": len(self._pruner.bounds) - 1,
                "reconstructed": bool(reconstructed), "incarnation": incarnation,
                "restored_incarnation": self._restored_at}

    def update(self, indices: np.ndarray, losses: np.ndarray, epoch: int | None = None) -> int:
        """Records per-sample losses (default epoch: the current one); returns the count."""
        return self._pruner.update(indices, losses, epoch)

    def routes(self) -> tuple[list[int], list] | None:
        """Where reporters send losses: None (here), or (bounds, partition actor handles) of a split state."""
        parts = self._pruner.partitions
        return (parts.bounds.tolist(), list(parts.actors)) if isinstance(parts, RayPartitions) else None

    def start_epoch(self, epoch: int, workers: int | None = None) -> int:
        """Makes ``epoch`` current: plans it (before any of its losses) and publishes it.

        Call once per epoch, before anyone reads the plan; returns its kept count.
        ``workers``: the training workers that split the epoch's rows evenly
        (the kept count is made a multiple of it: :class:`~pipeline.prune.pruner.Pruner`'s
        ``workers``); None keeps the number the actor has.

        Raises:
            ValueError: ``epoch`` lies past the run's epochs the pruner was made for (its schedule, the
                annealing epochs and the remaining share, would be another run's).
        """
        if not 0 <= int(epoch) < self._pruner.epochs:
            raise ValueError(f"epoch {epoch}: the pruner plans a run of {self._pruner.epochs} epochs (0 to "
                             f"{self._pruner.epochs - 1}); start it with the run's epochs (Pruning.from_scores(epochs=))")
        if workers is not None and self._pruner.set_workers(workers):
            self._plan_refs.clear()  # made for another number of workers
        ref = self.plan_ref(epoch)
        self._pruner.current_epoch = int(epoch)
        self._published = (int(epoch), ref)
        return self._pruner.kept_count(epoch)

    @ray.method(concurrency_group="lookups")
    def published_plan(self) -> tuple[int, list[ray.ObjectRef]] | None:
        """(current epoch, ``[ref]`` to its plan) as ``start_epoch`` published it; None before that.

        For stages that do not know the epoch. Runs beside loss ingest and
        planning (it reads, never plans), so it answers at once while the
        actor is busy; on None (no epoch started since this actor (re)started
        or loaded a state) ask :meth:`current_plan`.
        """
        return self._published

    def current_plan(self) -> tuple[int, list[ray.ObjectRef]]:
        """(current epoch, ``[ref]`` to its plan), planning it if needed (waits its turn behind updates)."""
        epoch = self._pruner.current_epoch
        ref = self.plan_ref(epoch)
        self._published = (epoch, ref)
        return epoch, ref

    def plan_ref(self, epoch: int) -> list[ray.ObjectRef]:
        """``[ref]`` to the object-store copy of ``plan(epoch)`` = (kept, weights).

        Wrapped in a list so Ray hands the caller the reference itself (one
        copy in the object store, zero-copy reads) rather than the arrays.
        The object is owned by this actor: if it dies, ask again.
        """
        epoch = int(epoch)
        if epoch not in self._plan_refs:
            kept, weights, reasons = self._pruner.plan_with_reasons(epoch)
            self._plan_refs[epoch] = ray.put((kept, weights))
            for old in sorted(self._plan_refs)[:-PLANS_CACHED]:
                del self._plan_refs[old]
            self._log.record(epoch, kept, weights, reasons)
        return [self._plan_refs[epoch]]

    def plan_size(self, epoch: int) -> tuple[int, float]:
        """(kept count, mean weight) of ``epoch``'s plan, planning it if needed; mean 1.0 when empty.

        Trainers size the epoch's batches by the count and divide each step's
        weighted loss by the mean, so a step's expected gradient is the
        eligible samples' mean gradient whatever the weights' scale (see
        :mod:`pipeline.train.loop`).
        """
        self.plan_ref(epoch)
        return self._pruner.kept_count(epoch), self._log.weight_stats(epoch)["weight_mean"] or 1.0

    def losses_received(self, epoch: int | None = None) -> int:
        """Losses recorded for ``epoch`` (repeats counted); with no epoch, for every epoch."""
        return self._pruner.losses_received(epoch)

    def epoch_summary(self, epoch: int) -> dict:
        """Metrics of a finished epoch's plan (JSON-safe), prefixed ``plan_``.

        ``plan_losses_received == plan_kept`` with ``plan_missing == 0`` means
        every kept sample reported exactly one loss.
        """
        epoch = int(epoch)
        summary = {"plan_kept": self._pruner.kept_count(epoch),
                   "plan_losses_received": self._pruner.losses_received(epoch)}
        if epoch in self._log:
            summary.update({f"plan_{k}": v for k, v in self._log.weight_stats(epoch).items()})
        try:
            summary.update({f"plan_{k}": v for k, v in self._pruner.coverage(epoch).items()})
        except ValueError:
            pass  # not the latest planned epoch: its plan is no longer memoised
        return summary

    def plan_log(self, include_indices: bool = False, epoch: int | None = None) -> list[dict]:
        """One JSON-safe entry per epoch planned by this actor incarnation.

        Each has ``pruned_by_reason``: ``{reason: count}`` of the samples the
        epoch pruned (the policy's reasons; counts sum to n - kept).

        Args:
            include_indices: add each epoch's sorted ``kept`` indices (n/8
                bytes an epoch are kept in memory; the list itself is large).
            epoch: only this epoch's entry (none if it was not planned here).
        """
        return self._log.entries(self._pruner, include_indices, epoch)

    def state_dict(self) -> dict:
        return self._pruner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restores a saved state; cached plans are dropped (they came from the old one)."""
        self._pruner.load_state_dict(state)
        self._forget_plans()
        self._restored_at = self.info()["incarnation"]

    def save_state(self, url: str) -> None:
        """Writes the state to the folder ``url``, each partition actor its own part (nothing gathered here)."""
        self._pruner.save(url)

    def load_state(self, url: str) -> None:
        """Restores a state :meth:`save_state` wrote; each partition reads its own range. Cached plans are dropped."""
        self._pruner.load(url)
        self._forget_plans()
        self._restored_at = self.info()["incarnation"]

    def reset(self) -> None:
        """Back to the initial state (no losses, no epoch planned), as after a fresh start."""
        self._pruner.reset()
        self._forget_plans()
        self._restored_at = self.info()["incarnation"]

    def _forget_plans(self) -> None:
        self._plan_refs.clear()
        self._published = None


def create_pruner(name: str, num_samples: int, **pruner_args) -> ray.actor.ActorHandle:
    """Starts the pruning actor registered as ``name``, or returns it if it already runs.

    Args:
        name: the actor's name, by convention ``actor_name(run_id)``; a
            second call with the same name gets the existing actor (its
            arguments are then ignored).
        num_samples: n.
        **pruner_args: ``policy``, ``keep_ratio``, ``epochs``, ``seed``,
            ``consistency``, ``loss_momentum``, ``policy_params``, ``reference``, and the
            partitioning knobs ``partition_size``, ``num_partitions``, ``bounds``.
    """
    return PruningActor.options(name=name, get_if_exists=True).remote(num_samples, **pruner_args)


def get_pruner(name: str, timeout_s: float = 30.0) -> ray.actor.ActorHandle:
    """The pruning actor registered as ``name``, waiting up to ``timeout_s`` for it.

    Workers may start before the driver's actor registration is visible, so
    a missing name is retried briefly before the ValueError propagates.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(name)
        except ValueError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


class LossReporter:
    """Sends per-sample losses to the pruning actor without stalling training.

    ``report`` buffers losses and ships them in chunks of ``chunk_size``
    (fewer, larger actor calls); at most ``max_in_flight`` calls are
    outstanding, and only past that does it wait (``ray.wait``) for the
    oldest. Errors raised by the actor surface at the next wait or at
    ``flush``. One reporter per worker; not thread-safe.

    A partitioned pruner's losses go straight to the partition actors that
    own them (the actor's ``routes``, asked once), checked here first, so the
    coordinator is not on the hot path; they then need their ``epoch``.

    Args:
        actor: a :class:`PruningActor` handle.
        max_in_flight: outstanding ``update`` calls before ``report`` waits.
        chunk_size: losses buffered before a call is made; 1 sends each report.
    """

    def __init__(self, actor: ray.actor.ActorHandle, max_in_flight: int = 8,
                 chunk_size: int = 4096):
        if max_in_flight < 1 or chunk_size < 1:
            raise ValueError("max_in_flight and chunk_size must be >= 1")
        self._actor = actor
        self._max_in_flight = max_in_flight
        self._chunk_size = chunk_size
        self._in_flight: list[ray.ObjectRef] = []
        self._buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._epoch: int | None = None
        self._routes: tuple[np.ndarray, list] | None = None  # set at the first send; () = the actor itself
        self.sent = 0  # losses handed to the actor (delivered once flush() returns)

    def report(self, indices, losses, epoch: int | None = None) -> None:
        """Queues losses of the samples ``indices`` (NumPy arrays or CPU tensors)."""
        if epoch != self._epoch and self._buffered:
            self._send()  # a chunk carries one epoch
        self._epoch = epoch
        idx, values = _numpy(indices), _numpy(losses)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            # Checked before the cast: float indices (one dtype asked for every column of a batch)
            # would round to other samples' past 2**24.
            raise TypeError(f"indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.shape != values.shape:
            raise ValueError(f"indices {idx.shape} and losses {values.shape} differ in shape")
        self._buffer.append((idx.ravel(), values.ravel()))
        self._buffered += idx.size
        if self._buffered >= self._chunk_size:
            self._send()

    def flush(self) -> int:
        """Sends what is buffered, waits until the actor recorded everything.

        Returns:
            The total number of losses delivered by this reporter so far.
        """
        if self._buffered:
            self._send()
        ray.get(self._in_flight)
        self._in_flight = []
        return self.sent

    def _send(self) -> None:
        if len(self._in_flight) >= self._max_in_flight:
            surplus = len(self._in_flight) - self._max_in_flight + 1
            done, self._in_flight = ray.wait(self._in_flight, num_returns=surplus)
            ray.get(done)  # re-raise an actor error here rather than never
        idx = np.concatenate([i for i, _ in self._buffer])
        values = np.concatenate([v for _, v in self._buffer])
        self._buffer, self._buffered = [], 0
        if self._routes is None:
            routes = ray.get(self._actor.routes.remote())
            self._routes = () if routes is None else (np.asarray(routes[0], dtype=np.int64), routes[1])
        if not self._routes:
            self._in_flight.append(self._actor.update.remote(idx, values, self._epoch))
        else:
            bounds, partitions = self._routes
            if self._epoch is None:
                raise ValueError("a partitioned pruner takes losses with their epoch: report(..., epoch=)")
            idx, values = check_losses(idx, values, int(bounds[-1]))
            for p, local, pos in split_by_bounds(bounds, idx):
                self._in_flight.append(partitions[p].report.remote(local, values[pos], self._epoch))
        self.sent += idx.size


def _numpy(x) -> np.ndarray:
    """NumPy view of an array or a (possibly grad-tracking) torch tensor; floating tensors as float32 (NumPy has
    no bfloat16, the dtype of a model cast to it)."""
    if hasattr(x, "detach"):
        x = x.detach()
        x = (x.float() if x.is_floating_point() else x).cpu().numpy()
    return np.asarray(x)
