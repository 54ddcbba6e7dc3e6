"""The Ray Train loop: train on each epoch's kept samples, report every sample's loss.

Each epoch, rank 0 asks the pruning actor to publish the epoch's plan; the
training dataset's keep stage (:func:`pipeline.train.stages.keep_stage`) drops pruned rows
*before* they are decoded, so a pruned sample costs a parquet read and a
mask, never a decode, an augmentation or a forward pass. Workers weight the
per-sample losses by the plan's weights and send them to the pruner without
waiting on it.

A step's loss is ``sum(w_i * loss_i) / (B * mean_w)``, ``mean_w`` the mean
weight of the epoch's plan: the weights make the kept samples an unbiased
stand-in for the eligible ones (``E[sum_kept w_i loss_i] = sum_eligible
loss_i``), and dividing by the batch's expected weight sum makes each step's
expected gradient their *mean* gradient, the size of an unpruned step
(InfoBatch's ``sum(w_i * loss_i) / B`` makes steps ``mean_w`` times larger).
For policies with unit weights the two are the same.

The schedule does not starve a pruned run: by default (``step_schedule``
"full") every epoch takes as many optimiser steps as an unpruned one, each on
a batch shrunk in proportion to the plan, so pruning saves sample passes, not
updates; with "batch" the batch size stays and a pruned epoch takes fewer
steps. Either way the learning rate follows the epochs (warm-up and cosine
decay laid over the unpruned run's steps), not the pruned run's own count.
Rows are reshuffled every epoch in a per-worker buffer (``shuffle_buffer``).

The pieces any Ray Train loop over these datasets needs (model set-up, the
optimiser step, the split test pass, the epoch's checkpoint and report) are
public here, so a loop without the pruner (the pruning benchmark's baseline)
differs from this one only in the pruning machinery.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import storage
from pipeline.train.models import build_model
from pipeline.train.pruning import step_loss

# Column dtypes of the decoded batches (pipeline.train.stages.decode_stage);
# iter_torch_batches needs every column named.
DTYPES = {"x": torch.float32, "label": torch.int64, "index": torch.int64}
WEIGHTED_DTYPES = {**DTYPES, "weight": torch.float32}
# A checkpoint holds the model's, optimiser's and schedule's state in this file.
TRAIN_STATE = "train.pt"
# A checkpoint names the pruner state it goes with in this file (the state itself is in the run folder).
PRUNER_STATE = "pruner_state.json"
# The flags a resume must keep (TrainConfig.RESUME_SAME), as the run that saved a checkpoint had them.
RUN_CONFIG = "run_config.json"
# Written last into each checkpoint: the size of every other file in it. Ray Train copies a checkpoint into
# its run folder file by file, so a run killed during the copy leaves one in part; the sizes tell.
CHECKPOINT_FILES = "files.json"
# Checkpoints Ray Train keeps; the pruner states of older ones are removed.
KEEP_CHECKPOINTS = 2


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """``values`` summed over every worker (float64); the values themselves outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    # NCCL (Ray Train's backend on GPUs) reduces only tensors on the worker's GPU; gloo, CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module of a DDP-wrapped model (the model itself otherwise)."""
    return model.module if hasattr(model, "module") else model


def prepare_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` on the worker's device, wrapped in DDP without the buffer broadcast before every forward.

    DDP by default copies rank 0's buffers (BatchNorm's running statistics)
    to every rank at each forward: a collective per step, so the ranks meet
    twice a step instead of once. Training-mode forwards do not read those
    statistics, so gradients are the same without it; what reads them (the
    test pass, a checkpoint) takes rank 0's (:func:`broadcast_buffers`
    first), and rank 0's are the same either way. Only a probe's
    forward (mmdp's ``probe_every``, off by default) on another rank sees
    that rank's own.
    Parameters and buffers are still made equal once, when DDP wraps the model.
    """
    import inspect

    import ray.train.torch

    ddp = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in ddp else {"broadcast_buffers": False}
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=no_sync)


def setup_model(cfg: dict, total_steps: int):
    """Seeded model (prepared for DDP, :func:`prepare_ddp`), SGD with Nesterov momentum, and the warm-up + cosine schedule."""
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    model = prepare_ddp(build_model(cfg["model"], cfg["num_classes"], cfg["width"] or None))
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"], nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total_steps, cfg["warmup_steps"]))
    return model, opt, sched


def epoch_batch_size(kept: int, num_samples: int, batch_size: int, world: int, schedule: str) -> int:
    """Per-worker batch size of an epoch whose plan keeps ``kept`` of ``num_samples`` rows.

    ``schedule`` "full": small enough that the epoch takes an unpruned epoch's
    number of steps; "batch": ``batch_size`` always.
    """
    if schedule == "batch" or kept >= num_samples:
        return batch_size
    steps = math.ceil(num_samples / (batch_size * world))
    return max(1, math.ceil(kept / (world * steps)))


def due(epoch: int, every: int, last: int) -> bool:
    """Whether epoch ``epoch`` (0-based) is an every-``every``-th one or the ``last``-th (evaluation, checkpoints)."""
    return (epoch + 1) % every == 0 or epoch + 1 == last


def shuffle_args(cfg: dict, epoch: int, rank: int) -> dict:
    """``iter_torch_batches`` arguments that reshuffle a worker's rows every epoch, reproducibly per (seed, epoch, rank)."""
    if not cfg["shuffle_buffer"]:
        return {}
    return {"local_shuffle_buffer_size": cfg["shuffle_buffer"],
            "local_shuffle_seed": (cfg["seed"] * 1_000_003 + epoch) * 1_009 + rank}


def exact_batches(batches, batch_size: int, min_last: int = 0):
    """``batches`` (dicts of equal-length tensors or NumPy arrays) re-cut to ``batch_size`` rows each, the last shorter
    (with ``min_last``, a last batch of fewer rows joins the one before it: a contrastive loss on a batch of one is
    0 whatever the model, and on a few pairs near it; see :func:`_join_short_tail`).

    DDP needs every rank to take as many steps: the workers' shards hold
    equal rows (Ray Train splits with ``equal=True``), but Ray Data's
    iterator with a local shuffle buffer less than about twice the batch can
    yield short batches mid-stream, at block boundaries (ray-project/ray#66085),
    and pruned blocks differ in size. Two ranks would then step a different
    number of times and one's gradient all-reduce would meet the other's
    end-of-epoch sum (a hang, or gloo aborting on the size mismatch). Here a
    shard of ``n`` rows always gives ``ceil(n / batch_size)`` batches (one
    fewer where a short last one joins the one before), in order.
    """
    if min_last > 1:
        yield from _join_short_tail(_exact(batches, batch_size), batch_size, min_last)
    else:
        yield from _exact(batches, batch_size)


def _exact(batches, batch_size: int):
    """:func:`exact_batches` without ``min_last``."""
    pending: list[dict] = []
    held = 0
    for batch in batches:
        rows = len(next(iter(batch.values())))
        if not pending and rows == batch_size:  # the usual case: as it comes
            yield batch
            continue
        pending.append(batch)
        held += rows
        while held >= batch_size:
            joined = _concat(pending)
            yield {k: v[:batch_size] for k, v in joined.items()}
            held -= batch_size
            pending = [{k: v[batch_size:] for k, v in joined.items()}] if held else []
    if held:
        yield _concat(pending)


def _join_short_tail(batches, batch_size: int, min_last: int):
    """``batches`` (full ones, then perhaps one short), a short last one of fewer than ``min_last`` rows joined to
    the full one before it. Each batch is held until the next arrives. Every DDP rank's shard holds as many rows,
    so every rank joins alike and takes as many steps."""
    held = None
    for batch in batches:
        rows = len(next(iter(batch.values())))
        if rows < batch_size and rows < min_last and held is not None:  # short: the last one
            batch, held = _concat([held, batch]), None
        if held is not None:
            yield held
        held = batch
    if held is not None:
        yield held


def _concat(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    return {k: (torch.cat if isinstance(parts[0][k], torch.Tensor) else np.concatenate)([p[k] for p in parts])
            for k in parts[0]}


def weighted_step(model, batch: dict, weight_mean: float, opt, sched) -> torch.Tensor:
    """One optimiser step on a batch of the plan; returns every row's loss (detached).

    Rows of weight 0 are probes (excluded rows whose loss the pruner wants to
    see): they get a no-grad forward of the bare model in eval mode, a third
    of a trained row's cost, and leave the gradient and the BatchNorm
    statistics alone. The step's loss is :func:`~pipeline.train.pruning.step_loss`,
    ``sum(w * loss) / (len(batch) * weight_mean)``, over the whole batch,
    probes included (at weight 0), so its expectation is the eligible rows'
    mean loss whatever the share of probes.
    """
    x, y, w = batch["x"], batch["label"], batch["weight"]
    probe = w == 0
    if not probe.any() or probe.all():  # an all-probe batch still steps: every DDP rank must
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        take_step(step_loss(per_sample, w, weight_mean), opt, sched)
        return per_sample.detach()
    trained = F.cross_entropy(model(x[~probe]), y[~probe], reduction="none")
    # The probes' zero-weight terms add nothing to the sum but count in its length.
    take_step((trained * w[~probe]).sum() / (len(y) * weight_mean), opt, sched)
    per_sample = trained.new_empty(len(y))  # on the batch's device (a GPU worker's)
    per_sample[~probe] = trained.detach()
    bare = unwrap(model)
    bare.eval()
    with torch.inference_mode():
        per_sample[probe] = F.cross_entropy(bare(x[probe]), y[probe], reduction="none")
    bare.train()
    return per_sample


def take_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched) -> None:
    """One optimiser step on ``loss``, then one step of the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def save_train_state(directory: str, model: torch.nn.Module, opt, sched, epoch: int) -> None:
    """``directory/train.pt`` (TRAIN_STATE): the bare model's, optimiser's and schedule's state after ``epoch``."""
    torch.save({"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": epoch}, os.path.join(directory, TRAIN_STATE))


def report_epoch(metrics: dict, checkpoint_dir: str | None) -> None:
    """``ray.train.report`` the epoch's metrics (and rank 0's checkpoint folder, then removed: Ray has copied it)."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)
    if checkpoint_dir:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. ``config`` holds the TrainConfig fields and the run's :class:`~pipeline.train.pruning.Pruning`."""
    import ray.train

    cfg = config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    pruning = cfg["pruning"]  # pipeline.train.pruning.Pruning: the public API, used as a user's loop would
    pruner = pruning.actor
    task = make_task(cfg)
    steps_per_epoch = math.ceil(cfg["num_samples"] / (cfg["batch_size"] * world))  # an unpruned epoch's
    model, opt, sched = task.setup(cfg["plan_epochs"] * steps_per_epoch)
    start_epoch, history, plans, restarts = _resume(cfg, model, opt, sched, pruning, rank)
    # A pruner that Ray restarts comes back in its initial state: Pruning checks, each epoch, on every rank,
    # that the actor it trains against is the one it started with (or restored), and raises PrunerRestartedError.
    # The pruner state a --resume-from checkpoint names: rank 0, which drops old states, keeps it.
    resumed_state = cfg["resumed_state"]

    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")  # the whole split on every worker
    test_cache = None
    for epoch in range(start_epoch, cfg["epochs"]):
        _barrier()
        started, started_at = time.perf_counter(), time.time()  # planning counts as training time
        clock = PhaseClock()
        with clock("plan"):
            kept = pruning.start_epoch(epoch)
        batch_size = epoch_batch_size(kept, cfg["num_samples"], cfg["batch_size"], world, cfg["step_schedule"])
        model.train()
        loss_sum, forwarded, steps = 0.0, 0, 0
        batches = iter(task.batches(train_shard, batch_size, shuffle_args(cfg, epoch, rank)))
        while True:
            with clock("input"):
                batch = next(batches, None)
            if batch is None:
                break
            steps += 1
            with clock("step"):
                per_sample = task.step(model, batch, pruning.weight_mean, opt, sched)
                loss_sum += float(per_sample.sum())
            with clock("report"):
                pruning.report(batch["index"], per_sample)
            forwarded += len(per_sample)
        with clock("report"):
            pruning.end_epoch()
        while sched.last_epoch < (epoch + 1) * steps_per_epoch:  # the schedule follows the epochs
            sched.step()
        train_seconds = time.perf_counter() - started
        evaluation = {"test_accuracy": None, "test_rows": 0}  # None: not evaluated this epoch
        if due(epoch, cfg["eval_every"], cfg["epochs"]):  # and after this run's last epoch (--stop-after's)
            # Each worker scores its part of the test split (by key hash): exact, and split.
            # The bare module: a DDP forward would wait for the other ranks.
            scores, test_cache = task.evaluate(unwrap(model), test_shard, test_cache, cfg["batch_size"], rank, world)
            evaluation.update(scores)
        loss_sum, forwarded = all_sum([loss_sum, forwarded])
        _barrier()
        metrics = {
            "epoch": epoch,
            "started_at": round(started_at, 3),  # wall clock (rank 0's), to match the epoch with logs
            "train_loss": loss_sum / max(forwarded, 1),
            **evaluation,
            "samples_forwarded": int(forwarded),
            "epoch_seconds": round(time.perf_counter() - started, 3),
            # The fit's wall seconds so far, its earlier runs' too when resumed (the driver's clock at its start).
            "wall_seconds": round(time.time() - cfg["fit_started_at"], 3),
            "train_seconds": round(train_seconds, 3),
            **clock.seconds(),  # rank 0's training time by phase (PhaseClock.PHASES)
            "lr": sched.get_last_lr()[0],
            "steps": steps,  # rank 0's; every rank takes as many (equal shares)
            "batch_size": batch_size,
            "restarts": restarts,  # times the run went back to a checkpoint (or its start) after a failure
            # A failure goes back to the last epoch with a checkpoint (every checkpoint_every-th, and the last).
            "checkpoint": due(epoch, cfg["checkpoint_every"], cfg["epochs"]),
        }
        checkpoint_dir = None
        if rank == 0:
            metrics.update(ray.get(pruner.epoch_summary.remote(epoch)))
            history = [h for h in history if h["epoch"] < epoch] + [metrics]
            # The plan log goes into the checkpoint too: a restarted pruner
            # only remembers the epochs it planned itself.
            plans = [p for p in plans if p["epoch"] < epoch] + ray.get(pruner.plan_log.remote(epoch=epoch))
            if metrics["checkpoint"]:
                checkpoint_dir = tempfile.mkdtemp(prefix="mmdp-ckpt-")
                save_train_state(checkpoint_dir, model, opt, sched, epoch)
                _save_pruner_state(checkpoint_dir, pruning, cfg["out"], epoch)  # checks the incarnation too
                for name, value in (("history.json", history), ("plans.json", plans), (RUN_CONFIG, cfg["run_config"])):
                    with open(os.path.join(checkpoint_dir, name), "w") as f:
                        json.dump(value, f)
                sizes = {name: os.path.getsize(os.path.join(checkpoint_dir, name))
                         for name in sorted(os.listdir(checkpoint_dir))}
                with open(os.path.join(checkpoint_dir, CHECKPOINT_FILES), "w") as f:
                    json.dump(sizes, f)
            else:
                pruning.check_incarnation(epoch)  # the epoch's summary and plan log above are of that actor
            done = [h["epoch_seconds"] for h in history if h["epoch"] >= start_epoch]
            left = (cfg["epochs"] - epoch - 1) * sum(done) / len(done)
            accuracy = _accuracy_text(metrics)
            rate = metrics["samples_forwarded"] / max(train_seconds, 1e-9)
            print(f"epoch {epoch + 1}/{cfg['epochs']}: trained on {metrics['samples_forwarded']} samples "
                  f"({rate:.0f}/s), loss {metrics['train_loss']:.4f}, test accuracy {accuracy}, "
                  f"{metrics['epoch_seconds']:.1f} s; about {left:.0f} s left", flush=True)
        report_epoch(metrics, checkpoint_dir)
        if checkpoint_dir:
            _drop_old_pruner_state(cfg["out"], history, keep=resumed_state)


class PhaseClock:
    """Seconds spent in each phase of an epoch's training, summed over its entries (``with clock("step"):``).

    The phases: ``plan`` (the epoch's plan made and learnt), ``input``
    (waiting for the next batch: reading, pruning, decoding, shuffling that
    the steps did not hide), ``step`` (forward, backward, the gradient
    all-reduce, which waits for the slowest worker, and the optimiser) and
    ``report`` (handing losses to the pruner, and delivering the last of them).
    """

    PHASES = ("plan", "input", "step", "report")

    def __init__(self):
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self._phase = None

    def __call__(self, phase: str) -> "PhaseClock":
        self._phase = phase
        return self

    def __enter__(self) -> None:
        self._entered = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.totals[self._phase] += time.perf_counter() - self._entered

    def seconds(self) -> dict:
        """``{"plan_seconds": ..., "input_seconds": ..., ...}``, rounded to ms."""
        return {f"{phase}_seconds": round(value, 3) for phase, value in self.totals.items()}


def _accuracy_text(metrics: dict) -> str:
    if not metrics["test_rows"]:
        return "not evaluated"
    recall = [f"{k} {metrics[k]:.4f}" for k in ("i2t_recall@1", "t2i_recall@1") if k in metrics]
    accuracy = "n/a" if metrics["test_accuracy"] is None else f"{metrics['test_accuracy']:.4f}"
    return ", ".join([accuracy, *recall])


class ClassifyTask:
    """The classifier task (``--task classify``): images to classes, cross entropy per sample.

    A task is what the loop asks of the model side: ``setup`` (model, optimiser,
    schedule), ``batches`` (a shard's training batches), ``step`` (one weighted
    step, every row's loss back), ``evaluate`` (test figures, the same on every
    rank). The contrastive task is :class:`pipeline.train.clip.ClipTask`.
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def setup(self, total_steps: int):
        return setup_model(self.cfg, total_steps)

    def batches(self, shard, batch_size: int, shuffle: dict):
        return exact_batches(shard.iter_torch_batches(batch_size=batch_size, dtypes=WEIGHTED_DTYPES, drop_last=False,
                                                      **shuffle), batch_size)

    def step(self, model, batch: dict, weight_mean: float, opt, sched) -> torch.Tensor:
        return weighted_step(model, batch, weight_mean, opt, sched)

    def evaluate(self, model, shard, cache, batch_size: int, rank: int, world: int) -> tuple[dict, list]:
        correct, total, cache = evaluate(model, shard, cache, batch_size, rank, world)
        correct, total = all_sum([correct, total])
        return {"test_accuracy": correct / total if total else None, "test_rows": int(total)}, cache


def make_task(cfg: dict):
    """The loop's task for ``cfg["task"]``: :class:`ClassifyTask` or :class:`~pipeline.train.clip.ClipTask`."""
    if cfg.get("task", "classify") == "clip":
        from pipeline.train.clip import ClipTask

        return ClipTask(cfg)
    return ClassifyTask(cfg)


def _resume(cfg: dict, model, opt, sched, pruning, rank: int) -> tuple[int, list, list, int]:
    """(first epoch, history, plan log, restarts): from Ray Train's last checkpoint or ``resume_from``, else a fresh start.

    Restarts count the times this run went back after a failure (Ray Train
    hands its own checkpoint only to a restarted attempt); a ``resume_from``
    carries the count over without adding to it. A retry before the first
    checkpoint counts when an attempt that died used the pruner (rank 0 sees
    its losses, or that Ray restarted it); one that died earlier lost
    nothing and is not seen.
    """
    import ray.train

    pruner = pruning.actor
    checkpoint = ray.train.get_checkpoint()
    restarted = checkpoint is not None
    if checkpoint is None and cfg.get("resume_from"):
        fs, path = storage.filesystem_for(cfg["resume_from"])
        checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    if checkpoint is None:
        return 0, [], [], (start_afresh(pruner) if rank == 0 else 0)
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=True)
        # This run's own checkpoint names its own state; a --resume-from one's, the driver found.
        pruner_state = (json.loads(open(os.path.join(d, PRUNER_STATE)).read())["state"] if restarted
                        else cfg["resumed_state"])
        history = json.loads(open(os.path.join(d, "history.json")).read())
        plans = json.loads(open(os.path.join(d, "plans.json")).read())
    unwrap(model).load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if rank == 0:
        # The pruner goes back to the checkpoint too: losses it took after
        # it belong to an epoch that is about to be trained again.
        pruning.load_state(pruner_state)  # each partition reads its own range
    _barrier()
    restarts = (history[-1].get("restarts", 0) if history else 0) + int(restarted)
    return int(state["epoch"]) + 1, history, plans, restarts


def start_afresh(pruner) -> int:
    """Puts the pruning actor back to the start of a run if an attempt that died used it; 1 if so, else 0.

    Used: it holds losses, of any epoch (an actor that Ray restarted mid-run
    holds none of epoch 0 but may hold later ones, from reports retried on
    it or sent before the workers saw the restart, and a plan made from
    them), or Ray restarted it (empty, but another incarnation than the one
    the workers were handed: the reset makes it the one every rank takes).
    """
    import ray

    if ray.get(pruner.info.remote())["reconstructed"] or ray.get(pruner.losses_received.remote()):
        ray.get(pruner.reset.remote())
        return 1
    return 0


def pruner_state_url(out: str, epoch: int) -> str:
    """Where a run saves the pruner's state after ``epoch`` (a checkpoint names it in its ``pruner_state.json``)."""
    return storage.join(out, "pruner", f"epoch-{epoch:04d}")


def _save_pruner_state(directory: str, pruning, out: str, epoch: int) -> None:
    """The pruner writes its state to the run folder, each partition its own part (no rank gathers it);
    the checkpoint in ``directory`` names that folder."""
    url = pruner_state_url(out, epoch)
    pruning.save_state(url)  # refuses a restarted actor's state (PrunerRestartedError)
    with open(os.path.join(directory, PRUNER_STATE), "w") as f:
        # Also where it lies in the run folder: a run folder moved whole still resumes (saved_pruner_state).
        json.dump({"state": url, "in_run": url[len(storage.join(out, "")):]}, f)


def saved_pruner_state(checkpoint: str) -> str:
    """The pruner state that the checkpoint folder ``checkpoint`` names: in the run folder that holds the
    checkpoint (``OUT/checkpoint``, or Ray Train's ``OUT/ray/NAME/checkpoint_N``), found by walking up
    from it, where it is there (the folder may have moved since); else where it was saved."""
    named = storage.read_json(storage.join(checkpoint, PRUNER_STATE))
    if "in_run" in named:  # (an older mmdp's checkpoint names only the state's URL)
        folder = checkpoint.rstrip("/")
        for _ in range(3):  # OUT/checkpoint, OUT/ray/NAME/checkpoint_N
            folder = folder.rpartition("/")[0]
            if folder and storage.is_complete(storage.join(folder, named["in_run"])):
                return storage.join(folder, named["in_run"])
    return named["state"]


def _drop_old_pruner_state(out: str, history: list[dict], keep: str | None = None) -> None:
    """Removes the state of the checkpoint Ray Train has just let go (it keeps the last KEEP_CHECKPOINTS),
    unless it is ``keep``: the state the ``--resume-from`` checkpoint names, which a run resumed into its
    own folder would otherwise delete, leaving that checkpoint unresumable should this run die."""
    saved = [h["epoch"] for h in history if h.get("checkpoint")]
    if len(saved) > KEEP_CHECKPOINTS:
        url = pruner_state_url(out, saved[-KEEP_CHECKPOINTS - 1])
        if keep is None or storage.filesystem_for(url)[1] != storage.filesystem_for(keep)[1]:  # the same folder?
            storage.remove(url)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Every rank's buffers (BatchNorm's running statistics) set to rank 0's, before a pass that reads them."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def evaluate(model, shard, cache, batch_size: int, rank: int, world: int):
    """(correct, total, cache) over this worker's part of the test split.

    Every worker reads the whole split once and caches the rows whose key hash
    (``index``, :func:`pipeline.train.stages.test_stage`) is ``rank`` modulo
    ``world``: the workers' counts sum to exactly one pass over the split.
    Buffers (BatchNorm statistics) differ per rank after the last training
    step; every rank first takes rank 0's, so the figure is that of the one
    model a checkpoint saves. Call it on every rank, with the bare module
    (:func:`unwrap`): a DDP forward would wait for the other ranks.
    """
    broadcast_buffers(model)
    model.eval()
    if cache is None:
        cache = []
        for b in shard.iter_torch_batches(batch_size=batch_size, dtypes=DTYPES):
            mine = b["index"] % world == rank
            cache.append((b["x"][mine], b["label"][mine]))
    correct = total = 0
    with torch.inference_mode():
        for x, y in cache:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct, total, cache
