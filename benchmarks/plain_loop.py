"""The machinery-overhead half of the pruning benchmark: a plain Ray Train loop, and ``full`` through the pruner against it.

The plain loop uses the train loop's own model set-up, optimiser step,
schedule, per-epoch shuffle, evaluation and checkpoints (public functions of
:mod:`pipeline.train.loop`), so the two differ only in the pruning machinery:
the index and keep stages, the pruning actor, the loss reports, the weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time

import numpy as np

from benchmarks.hostload import cpu_ticks, shares
from pipeline import storage
from pipeline.cli import execute

# What measure_overhead times on each side. wall: the whole fit() from the driver; epoch: the loops'
# epochs (training + test evaluation); train: the training steps alone, split (rank 0's) into input
# (waiting for batches; first_input: in the first epoch) and step (forward, backward, optimiser).
# Start-up (about 11 s a fit) is in wall only. cpu: the host's busy CPU seconds during the fit, all cores
# (benchmarks.hostload: time stolen by other tenants of the host, which wall includes, is not in it).
MEASURES = ("wall", "epoch", "train", "input", "step", "first_input", "cpu")
# The measures that are sums over a run's epochs.
SUMMED = ("epoch", "train", "input", "step")


def _plain_stage(batch: dict) -> dict:
    """What the pruner's index + keep stages give decode_stage, without a pruner: fresh random crops."""
    n = len(batch["label"])
    return {"index": np.random.default_rng().integers(0, 2**62, n), "image": batch["image"],
            "label": batch["label"].astype(np.int64), "epoch": np.zeros(n, np.int64)}


def plain_loop_per_worker(config: dict) -> None:
    """A Ray Train loop with no pruner: the train loop's model, optimiser, schedule, evaluation and checkpoints
    (every ``eval_every``-th and ``checkpoint_every``-th epoch and the last, as the train loop has them)."""
    import ray.train
    import torch.nn.functional as F

    from pipeline.train.loop import (DTYPES, PhaseClock, all_sum, due, evaluate, exact_batches, report_epoch,
                                     save_train_state, setup_model, shuffle_args, take_step, unwrap)

    cfg = config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, opt, sched = setup_model(cfg, cfg["epochs"] * math.ceil(cfg["num_samples"] / (cfg["batch_size"] * world)))
    bare = unwrap(model)
    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    cache = None
    sums = {"train_seconds": 0.0, "epoch_seconds": 0.0, "samples_forwarded": 0, "input_seconds": 0.0, "step_seconds": 0.0}
    for epoch in range(cfg["epochs"]):
        started = time.perf_counter()
        clock = PhaseClock()  # the pruner's loop splits its training time the same way
        model.train()
        forwarded = 0
        batches = exact_batches(train_shard.iter_torch_batches(batch_size=cfg["batch_size"], dtypes=DTYPES,
                                                               drop_last=False, **shuffle_args(cfg, epoch, rank)),
                                cfg["batch_size"])
        while True:
            with clock("input"):
                batch = next(batches, None)
            if batch is None:
                break
            with clock("step"):
                take_step(F.cross_entropy(model(batch["x"]), batch["label"]), opt, sched)
            forwarded += len(batch["label"])
        train_seconds = time.perf_counter() - started
        sums["input_seconds"] += clock.totals["input"]
        if epoch == 0:
            sums["first_input_seconds"] = clock.totals["input"]
        sums["step_seconds"] += clock.totals["step"]
        correct = count = 0  # the pruner's loop evaluates and checkpoints at the same epochs
        if due(epoch, cfg["eval_every"], cfg["epochs"]):
            correct, count, cache = evaluate(bare, test_shard, cache, cfg["batch_size"], rank, world)
        totals = all_sum([forwarded, correct, count])
        sums["train_seconds"] += train_seconds
        sums["epoch_seconds"] += time.perf_counter() - started
        sums["samples_forwarded"] += int(totals[0])
        accuracy = float(totals[1] / totals[2]) if totals[2] else None
        metrics = {"epoch": epoch, "test_accuracy": accuracy, **sums}
        checkpoint_dir = None
        if rank == 0 and due(epoch, cfg["checkpoint_every"], cfg["epochs"]):
            checkpoint_dir = tempfile.mkdtemp(prefix="mmdp-plain-ckpt-")
            save_train_state(checkpoint_dir, model, opt, sched, epoch)
        report_epoch(metrics, checkpoint_dir)


def plain_fit(cfg, out: str) -> dict:
    """Train ``cfg``'s model on all of ``cfg.data``'s train split without the pruner; returns totals."""
    from pipeline.train.driver import evaluation_dataset, read_split, run_trainer
    from pipeline.train.stages import decode_stage

    started = time.perf_counter()
    # No retries: a plain loop that restarted would start over, and its time would not compare.
    cfg = dataclasses.replace(cfg, out=out, max_failures=0)
    meta = storage.read_json(storage.join(cfg.data, "metadata.json"))
    train = (read_split(cfg.data, "train", cfg.columns).map_batches(_plain_stage, batch_format="numpy")
             .map_batches(decode_stage, fn_kwargs={"augment": cfg.augment, "seed": cfg.seed}, batch_format="numpy"))
    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    config.update(num_classes=len(meta["classes"]), num_samples=meta["splits"]["train"])
    result = run_trainer(cfg, plain_loop_per_worker, config, {"train": train, "test": evaluation_dataset(cfg.data, cfg.columns)},
                         f"plain-{os.getpid()}-{time.time_ns()}")
    return {**result.metrics, "wall_seconds": round(time.perf_counter() - started, 2)}


def measure_overhead(train_cfg, root: str, repeats: int, fresh_job=None) -> dict:
    """``full`` through the pruner vs the plain loop, alternated A B B A so drift hits both alike.

    ``train_cfg`` is the ``TrainConfig`` of the pruner side (its policy is set to ``full``).
    ``fresh_job``: called before each fit to make it a Ray job of its own, as a
    user's ``jobs.train`` is. A job's worker processes are its own, so then
    no fit finds Ray Data task workers left warm by the fit before it (which
    fits in one job do: Ray trims idle workers, so which fit gets a warm one
    depends on what ran before it). None: every fit in the caller's job
    (recorded as ``fresh_jobs: false``).
    """
    from pipeline.train.driver import fit

    train_cfg = dataclasses.replace(train_cfg, policy="full", keep_ratio=None)
    times = {m: {"pruner": [], "plain": []} for m in MEASURES}
    steal = {"pruner": [], "plain": []}
    order = ["pruner", "plain", "plain", "pruner"] * math.ceil(repeats / 2)
    for i, kind in enumerate(order[: 2 * repeats]):
        out = storage.join(root, f"{i}-{kind}")
        print(f"[overhead {i + 1}/{2 * repeats}] {kind}", flush=True)
        if fresh_job is not None:
            fresh_job()
        started, ticks = time.perf_counter(), cpu_ticks()
        if kind == "pruner":
            history = execute(dataclasses.replace(train_cfg, out=out), fit)["epochs"]
            totals = {m: sum(h[f"{m}_seconds"] for h in history) for m in SUMMED}
            totals["first_input"] = history[0]["input_seconds"]
        else:
            result = plain_fit(train_cfg, out)
            totals = {m: result[f"{m}_seconds"] for m in (*SUMMED, "first_input")}
        totals["wall"] = time.perf_counter() - started
        host = shares(ticks, cpu_ticks())
        totals["cpu"] = host.get("cpu_seconds")
        steal[kind].append(host.get("steal_pct"))
        for name in MEASURES:
            times[name][kind].append(None if totals[name] is None else round(totals[name], 2))
    times = {name: t for name, t in times.items() if None not in t["pruner"] + t["plain"]}  # cpu: Linux only
    ratio = {name: round(float(np.mean(t["pruner"]) / np.mean(t["plain"])), 3) for name, t in times.items()}
    return {"seconds": times, "ratio": ratio, "epochs": train_cfg.epochs, "data": train_cfg.data, "target": 1.05,
            "fresh_jobs": fresh_job is not None, "host_steal_pct": steal}
