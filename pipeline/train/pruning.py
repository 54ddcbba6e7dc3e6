"""Dynamic pruning inside your own Ray Train loop: mmdp's per-epoch plans in a few lines.

On the driver, from the score job's output::

    pruning = Pruning.from_scores("s3://bucket/scores", policy="mmdp", epochs=20)
    try:
        train = pruning.dataset(ray.data.read_parquet("s3://bucket/data/train"))
        train = train.map_batches(my_decode)          # only the plan's rows get here
        trainer = TorchTrainer(my_loop, train_loop_config={"pruning": pruning, ...},
                               datasets={"train": train}, ...)
        trainer.fit()
    finally:
        pruning.shutdown()

In ``my_loop(config)``, on every worker::

    pruning = config["pruning"]
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(epochs):
        pruning.start_epoch(epoch)                    # rank 0 plans; every rank waits for it
        for batch in shard.iter_torch_batches(batch_size=64):
            losses = F.cross_entropy(model(batch["x"]), batch["label"], reduction="none")
            optimizer.zero_grad()
            pruning.step_loss(losses, batch["weight"]).backward()
            optimizer.step()
            pruning.report(batch["index"], losses)   # every row's own loss, not waited for
        pruning.end_epoch()                           # every loss delivered
        # checkpoints: after a barrier (every rank's end_epoch), pruning.save_state(url) on one rank beside the
        # model; load_state(url) to resume

:meth:`Pruning.dataset` adds two stages to your dataset: each row gets its
dense sample ``index`` (from its key, through the score table; rows the score
job rejected leave there), then the rows the epoch's plan prunes leave before
anything downstream (decoding, your transforms) touches them, and the kept
ones get their loss ``weight`` (and ``epoch``). Your model, loss, optimiser
and schedule are yours; the library's own ``jobs.train`` loop
(:mod:`pipeline.train.loop`) is built on the same object.
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np

from pipeline import storage
from pipeline.data.contract import KEY
from pipeline.prune.budget import DEFAULT_KEEP_RATIO
from pipeline.prune.policies import check_settings, reads
from pipeline.score.quality import MAX_MISSING_SIGNAL, auto_signal, estimate_noise_fraction, missing_share
from pipeline.train.keys import KeyIndex, key_index
from pipeline.train.stages import encode_keys

log = logging.getLogger(__name__)

def load_index(scores_url: str, signal: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """Sorted keys of the scored rows (UTF-8 bytes), their consistency, and the signal used, in one process.

    For evaluations at the scale of one machine; the training path keeps the
    keys in chunks (:mod:`pipeline.train.keys`). The score job gave every
    scored row a dense ``index`` in key order, so the sorted key array *is*
    the key -> index map (by binary search).
    """
    table = storage.read_table(storage.join(scores_url, "scores"))  # scored rows only: rejects are apart
    order = np.argsort(table.column("index").to_numpy())
    keys = encode_keys(table.column(KEY).to_numpy(zero_copy_only=False))[order]
    consistency, signal = _consistency(table, signal, order)
    return keys, consistency, signal


def _consistency(table, signal: str, order: np.ndarray) -> tuple[np.ndarray, str]:
    """The ``signal`` column in index order (float32), and its name ("auto": the margin unless it is missing on
    more than MAX_MISSING_SIGNAL of the rows, as in scores made in caption mode, else ``clip_score``).

    Raises:
        ValueError: the signal is missing (NaN) on more than MAX_MISSING_SIGNAL of the scored rows.
    """
    if signal == "auto":
        signal = auto_signal(table.column("clip_margin").to_numpy(zero_copy_only=False))
    values = table.column(signal).to_numpy(zero_copy_only=False).astype(np.float32)
    check_signal(values, signal)
    return values[order], signal


NO_CAPTION_MARGIN = ("scores made in caption mode (jobs.score --mode caption) have no clip_margin, which needs "
                     "each row's label; use --signal clip_score (or auto, which takes clip_score then), or score "
                     "the data in label mode")


def check_signal(values: np.ndarray, signal: str) -> None:
    """Refuse a consistency ``signal`` missing (NaN) on more than :data:`MAX_MISSING_SIGNAL` of the scored rows.

    Raises:
        ValueError: naming the signal, the share missing, and what to do.
    """
    share = missing_share(values)
    if share <= MAX_MISSING_SIGNAL:
        return
    missing = int(np.isnan(values).sum())
    what = (f"signal {signal}: {missing} of {len(values)} scored rows ({share:.0%}) have no {signal} (NaN), "
            "so it cannot rank them")
    if signal == "clip_margin":
        raise ValueError(f"{what}: {NO_CAPTION_MARGIN}")
    raise ValueError(f"{what}: the scores are damaged or of an older scorer; score the data again")


def key_indices(keys: KeyIndex, wanted) -> np.ndarray:
    """The dense indices of ``wanted`` keys in the score table.

    Raises:
        InputError: a key the score table does not hold (rejected, or not in the data).
    """
    wanted = list(wanted)
    at, found = keys.lookup(wanted)
    unknown = [k for k, ok in zip(wanted, found) if not ok]
    if unknown:
        raise storage.InputError(f"{len(unknown)} of {len(wanted)} reference keys are not scored rows "
                                 f"(first: {unknown[0]!r})")
    return at


def read_index(scores_url: str, keys: KeyIndex, signal: str, reference_keys, estimate_noise: bool):
    """The score table's consistency as the pruner needs it (runs in a Ray task, not on the driver).

    Reads the index and signal columns, not the keys (``keys`` resolves
    reference keys, chunk by chunk).

    Returns:
        (consistency, reference indices or None, meta): meta holds
        ``num_samples``, ``signal``, ``signal_missing`` (rows it is NaN for)
        and the estimated ``noise_fraction`` (None unless asked).
        ``reference_keys`` is a list of keys or the URL of a text file of
        them, one a line.

    Raises:
        ValueError: the signal is missing on most rows (:func:`check_signal`).
    """
    columns = ["index", "clip_score", "clip_margin"] if signal == "auto" else ["index", signal]
    table = storage.read_table(storage.join(scores_url, "scores"), columns=columns)
    consistency, signal = _consistency(table, signal, np.argsort(table.column("index").to_numpy()))
    if isinstance(reference_keys, str):
        reference_keys = read_keys(reference_keys)
    reference = None if reference_keys is None else key_indices(keys, reference_keys)
    meta = {"num_samples": len(consistency), "signal": signal, "signal_missing": int(np.isnan(consistency).sum()),
            "noise_fraction": round(estimate_noise_fraction(consistency), 4) if estimate_noise else None}
    return consistency, reference, meta


def read_keys(url: str) -> list[str]:
    """The non-empty lines of a text file of keys."""
    return [line.strip() for line in storage.read_bytes(url).decode().splitlines() if line.strip()]


class Pruning:
    """The pruning actor of one training run, and each worker's side of it.

    Build it on the driver with :meth:`from_scores`; pass it to the workers in
    ``train_loop_config`` (it pickles to its name and settings: the actor is
    found by name; the keys are in the object store, a chunk per score file, read by the index stage).

    Attributes:
        name: the pruning actor's name.
        num_samples: scored rows, the sample indices ``0..num_samples-1``.
        policy, params: the policy and its knobs (mmdp's noise fraction filled in).
        signal: the consistency column used (``clip_margin`` or ``clip_score``).
        kept, weight_mean: the current epoch's plan size and mean loss weight
            (set by :meth:`start_epoch`).
    """

    def __init__(self, name: str, num_samples: int, policy: str, params: dict, signal: str,
                 max_reports_in_flight: int = 8):
        self.name, self.num_samples, self.policy, self.params, self.signal = name, num_samples, policy, params, signal
        self.max_reports_in_flight = max_reports_in_flight
        self.epoch: int | None = None
        self.kept, self.weight_mean = num_samples, 1.0
        self._incarnation = None  # the pruning actor's, as from_scores started it (check_incarnation)
        self._keys = None  # the score table's KeyIndex (driver only)
        self._actor = self._reporter = None

    @classmethod
    def from_scores(cls, scores: str, *, policy: str = "mmdp", epochs: int = 20, keep_ratio: float | None = None,
                    seed: int = 0, signal: str = "auto", noise_fraction: float | None = None,
                    policy_params: dict | None = None, max_reports_in_flight: int = 8,
                    name: str | None = None, reference_keys=None, num_partitions: int | None = None) -> "Pruning":
        """Start the pruning actor for the score job's output at ``scores`` (call on the driver, Ray up).

        Args:
            scores: the score job's output folder (URL).
            policy: a name in :data:`pipeline.prune.policies.POLICIES`.
            epochs: the run's epochs (some policies plan by the remaining share).
            keep_ratio: the policy's keep ratio (for mmdp: its budget, the share of ``full``'s
                sample passes its pruning stops at, excluded noise counted as saved);
                None: the default budget (policies that keep by their own rule read none).
            seed: seeds the plans.
            signal: consistency column, or "auto" (the margin when scored in label mode).
            noise_fraction: mmdp and clip_cut: share excluded as noise; None = estimated
                from the scores (the low mode of their histogram).
            policy_params: more knobs for the policy.
            max_reports_in_flight: loss reports a worker may have unacknowledged.
            name: the actor's name (default: a fresh one); one that names a running actor is refused
                (its settings and state are another run's).
            reference_keys: keys of rows known to be clean (a list, or the URL of
                a text file of them, one a line), for policies that compare loss
                trajectories with theirs (``trajectory``; ~1% of the rows).
            num_partitions: partition actors the per-sample state is split over
                (default: one per :data:`~pipeline.prune.actor.PARTITION_SIZE` samples).

        Raises:
            ValueError: ``name`` names a running actor; a setting the policy cannot take or would not read
                (:func:`~pipeline.prune.policies.check_settings`);
                ``signal`` missing (NaN) on more than half of the scored rows
                (:func:`check_signal`; ``clip_margin`` of scores made in caption mode); both before any actor starts.
            InputError: a reference key the score table does not hold.
        """
        import ray

        from pipeline.prune.actor import actor_name, create_pruner

        if name is not None and _actor_runs(name):
            raise ValueError(f"a pruning actor named {name!r} already runs (another run's, or one not shut down): "
                             "its settings and state would be used in place of these; shut it down "
                             "(Pruning.shutdown()) or give another name")
        params = dict(policy_params or {})
        check_settings(policy, params, keep_ratio=keep_ratio, noise_fraction=noise_fraction, signal=signal,
                       reference=reference_keys is not None)
        # A policy with a noise cut gets its share here unless its params give it: --noise-fraction, else
        # the estimate from the consistency scores.
        cut = reads(policy, "noise_fraction") and "noise_fraction" not in params
        estimate = cut and noise_fraction is None
        # Per-row arrays stay in the object store: the pruning actor and the index stage take them by
        # reference; the keys in one chunk per score file.
        keys = key_index(scores)
        consistency, reference, meta = ray.remote(num_returns=3)(read_index).remote(
            scores, keys, signal, reference_keys, estimate)
        meta = _task_result(meta)
        if meta["signal_missing"]:
            log.warning("signal %s: %d of %d scored rows have none (NaN); they rank as the least consistent",
                        meta["signal"], meta["signal_missing"], meta["num_samples"])
        if cut:
            params["noise_fraction"] = noise_fraction if noise_fraction is not None else meta["noise_fraction"]
        name = name or actor_name(uuid.uuid4().hex[:8])
        pruning = cls(name, meta["num_samples"], policy, params, meta["signal"], max_reports_in_flight)
        # The driver's handle keeps the actor alive (Ray ends an actor with its creator's last handle).
        keep_ratio = DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio
        pruning._actor = create_pruner(name, num_samples=meta["num_samples"], policy=policy, keep_ratio=keep_ratio,
                                       epochs=epochs, seed=seed, consistency=consistency,
                                       policy_params=params or None,
                                       reference=None if reference_keys is None else reference,
                                       num_partitions=num_partitions)
        pruning._keys = keys
        # The actor as it started: workers (which get this object pickled) refuse a restarted one from their
        # first check on, as this process does (check_incarnation).
        pruning._incarnation = ray.get(pruning._actor.info.remote())["incarnation"]
        return pruning

    def __getstate__(self) -> dict:
        # What a worker needs: the name and settings, not the keys or process-local handles.
        return {**self.__dict__, "_keys": None, "_actor": None, "_reporter": None}

    # ------------------------------------------------------------ driver

    def dataset(self, ds, key: str = KEY):
        """``ds`` (rows with a ``key`` column) as each epoch's plan: ``index``, ``weight`` and ``epoch`` added
        (names the rows must not have already: the first block that has one fails, naming it).

        Rows whose key the score table lacks (rejected, or not scored) leave at
        the first stage; rows the current epoch's plan prunes leave at the
        second, before any later stage of ``ds`` runs. Ray Data runs the
        dataset again every epoch, so each epoch reads its own plan.
        """
        from pipeline.train.stages import index_stage, keep_stage

        if self._keys is None:
            raise RuntimeError("Pruning.dataset() runs on the driver, on the object from_scores() returned")
        return (ds.map_batches(index_stage, fn_kwargs={"keys": self._keys, "key": key}, batch_format="numpy")
                .map_batches(keep_stage, fn_kwargs={"pruner_name": self.name}, batch_format="numpy",
                             batch_size=None))  # whole blocks: one plan look-up a block

    def tar_dataset(self, shards: list[tuple[str, int, str]], columns: str, fields: tuple[str, ...],
                    max_gap: int = 0):
        """:meth:`dataset` of webdataset tars that reads only the samples each epoch keeps.

        ``shards``: (tar URL, size, offset index URL) from
        :func:`pipeline.train.tar_reads.build_indexes`; ``columns``: their
        column mapping; ``fields``: the contract columns to give; ``max_gap``:
        merge two reads of a tar less than this many bytes apart.
        """
        from pipeline.train.tar_reads import kept_tar_rows

        if self._keys is None:
            raise RuntimeError("Pruning.tar_dataset() runs on the driver, on the object from_scores() returned")
        return kept_tar_rows(shards, self._keys, self.name, columns, fields, max_gap)  # rows as dataset() gives

    def shutdown(self) -> None:
        """Stop the pruning actor (after the run: its state is in the checkpoints); returns once its name is free."""
        import ray

        ray.kill(self.actor)
        deadline = time.monotonic() + 10  # ray.kill does not wait for the actor to die
        while _actor_runs(self.name) and time.monotonic() < deadline:
            time.sleep(0.05)

    # ------------------------------------------------------------ both

    @property
    def actor(self):
        """The :class:`~pipeline.prune.actor.PruningActor` handle (looked up by name once per process)."""
        if self._actor is None:
            from pipeline.prune.actor import get_pruner

            self._actor = get_pruner(self.name)
        return self._actor

    # ------------------------------------------------------------ workers

    def start_epoch(self, epoch: int) -> int:
        """Make ``epoch``'s plan current; call on every worker before reading the epoch's data.

        Rank 0 plans the epoch (once, whatever the number of workers); every
        rank waits for it, then learns its size. Returns the kept count, a
        multiple of the number of workers (Ray Train's even split then drops
        no kept row: the plan leaves out the few that would not divide, at
        random, under their own reason).
        """
        import ray

        first = _rank() == 0
        self.check_incarnation(epoch)
        _barrier()
        if first:
            ray.get(self.actor.start_epoch.remote(epoch, _world_size()))
        _barrier()
        self.epoch = int(epoch)
        self.kept, self.weight_mean = ray.get(self.actor.plan_size.remote(epoch))
        return self.kept

    def step_loss(self, losses, weights):
        """The step's loss from every row's own ``losses`` (``reduction="none"``) and their plan ``weights``.

        :func:`step_loss` with the current epoch's mean weight.
        """
        return step_loss(losses, weights, self.weight_mean)

    def report(self, indices, losses) -> None:
        """Queue the batch's per-sample losses for the pruner (NumPy arrays or tensors; not waited for)."""
        if self.epoch is None:
            raise RuntimeError("report() before start_epoch(): call start_epoch(epoch) on every rank first")
        if self._reporter is None:
            from pipeline.prune.actor import LossReporter

            self._reporter = LossReporter(self.actor, max_in_flight=self.max_reports_in_flight)
        self._reporter.report(indices, losses, self.epoch)

    def end_epoch(self) -> int:
        """Deliver every queued loss; returns the losses this worker has reported so far.

        Raises:
            PrunerRestartedError: the pruning actor restarted since this worker first used it (:meth:`start_epoch`).
        """
        reported = self._reporter.flush() if self._reporter is not None else 0
        self.check_incarnation(self.epoch)
        return reported

    def check_incarnation(self, epoch: int | None) -> None:
        """Refuse to go on against a pruning actor that restarted (Ray restarts a crashed one from its creation
        arguments): the losses and plans since its last saved state are gone, so the next plans would be made
        from none. :meth:`from_scores` records the actor's incarnation, and every worker's copy holds it (an
        object made otherwise, at its first call); once one rank's :meth:`load_state` has restored a state into
        the restarted actor, every rank takes the new one.
        :meth:`start_epoch`, :meth:`end_epoch` and :meth:`save_state` call it.

        Raises:
            PrunerRestartedError: naming ``epoch``.
        """
        import ray

        info = ray.get(self.actor.info.remote())
        now = info["incarnation"]
        # A state restored since (load_state, from any rank) is one every rank goes on with.
        if self._incarnation is None or now == info["restored_incarnation"]:
            if now != self._incarnation:
                self._reporter = None  # its routes may name a restarted pruner's old partition actors
            self._incarnation = now
        elif now != self._incarnation:
            raise PrunerRestartedError(
                f"the pruning actor restarted (epoch {epoch}): its losses and plans since its last saved state are "
                "lost; restore that state (load_state) and train again from the epoch after it")

    def epoch_summary(self, epoch: int) -> dict:
        """The plan's figures for a finished epoch: ``plan_kept``, ``plan_losses_received``, coverage..."""
        import ray

        return ray.get(self.actor.epoch_summary.remote(epoch))


    def save_state(self, url: str) -> None:
        """The pruner writes its state to the folder ``url`` (each partition its own file, nothing gathered
        here): what a checkpoint needs beside the model; call from one rank, once every rank's :meth:`end_epoch`
        has returned (a barrier: each waits for its own reports only, and a loss still on its way would be
        missing from the state, so plans after a resume would differ)."""
        import ray

        self.check_incarnation(self.epoch)  # not an empty state over a saved one
        ray.get(self.actor.save_state.remote(url))
        self.check_incarnation(self.epoch)  # the state written is the one trained against

    def load_state(self, url: str) -> None:
        """Restore a state :meth:`save_state` wrote (resuming a run); call from one rank, before :meth:`start_epoch`."""
        import ray

        ray.get(self.actor.load_state.remote(url))
        self._incarnation = ray.get(self.actor.info.remote())["incarnation"]  # a restart from here on is one
        self._reporter = None  # its routes may name a restarted pruner's old partition actors

    def plan_log(self) -> list[dict]:
        """One entry per epoch planned so far: kept count, ``kept_sha256`` (the kept indices' digest), pruned by reason.

        What ``jobs.train`` writes to ``plans.json``; equal digests mean equal plans.
        """
        import ray

        return ray.get(self.actor.plan_log.remote())


class PrunerRestartedError(RuntimeError):
    """The pruning actor lost its state mid-run; the epochs since its last saved state must be trained again."""


def _task_result(ref):
    """``ray.get(ref)``; a task's bad-input error (ValueError, InputError) raised as itself, so that its message
    reaches the user as written (a job prints it and exits 2) rather than inside Ray's task traceback."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, (ValueError, storage.InputError)):
            raise exc.cause from None
        raise


def step_loss(losses, weights, weight_mean: float):
    """``sum(w * loss) / (len(batch) * weight_mean)``: a step's loss from per-sample losses and plan weights.

    The weights make the kept samples an unbiased stand-in for the eligible
    ones; dividing by the batch's expected weight sum makes the step's
    expected gradient their *mean* gradient, an unpruned step's size,
    whatever the plan's weights (see :mod:`pipeline.train.loop`).
    """
    return (losses * weights).sum() / (len(losses) * weight_mean)


def _actor_runs(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name)
    except ValueError:
        return False
    return True


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
