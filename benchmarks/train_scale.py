"""Benchmark the train job at scale: 1M and 10M tiny rows through ``python -m jobs.train``, full against mmdp.

At each size, a synthetic dataset (tiny shape images, distinct keys; the
images repeat past 20,000 rows) and a score table in the score job's layout
(sorted key ranges, one file per ``--score-rows-per-file`` rows, as the score
job's commit writes one per sorted block), with synthetic consistency: a
``--noise`` share of the rows in a low mode, so mmdp excludes them and
prunes the rest down to its budget. The score job itself is not run (its
own scale is :mod:`benchmarks.score_shards`'). Then each policy's train job
runs as a fresh subprocess with its own local Ray (as ``jobs.train`` runs on a
laptop), a tiny model and large batches (few steps), while the summed PSS of
its whole process tree, of its driver, and of the pruner's actors (the
pruning actor; its partition actors when split) are sampled every 0.2 s.

Per run, from its ``metrics.json``: each epoch's time, and rank 0's time
in the pruner's calls: *plan* (``start_epoch``: the plan made and
published; the data tasks then take it from the object store, once per
block) and *report* (handing every sample's loss to the pruner, 4,096 a
call, the epoch's last flush included), with the losses it reported per
second of that time.

Local (on 2 cores about half an hour at 1M rows and five hours at 10M: an
epoch reads and decodes every row; ``--reuse`` resumes a stopped invocation
from the runs it measured)::

    python -m benchmarks.train_scale --sizes 1e6,1e7 --workdir /tmp/bts --reuse

On a cluster it measures the node it runs on: each train job still starts
its own Ray there (``RAY_ADDRESS=local``), as it does locally::

    ray job submit --working-dir . -- python -m benchmarks.train_scale --sizes 1e6 --workdir /tmp/bts

Prints one JSON line per run, each with the resolved config, then a markdown
table. Targets (issue 15): the driver holds no per-row array (its peak PSS
flat from 1M to 10M rows); the plan of 10M samples published in <= 2 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from pipeline.cli import option, run_job

ACTOR_TITLES = ("ray::PruningActor", "ray::PartitionActor")


@dataclass(frozen=True)
class BenchTrainScaleConfig:
    """The benchmark's knobs; one field per command-line flag."""

    sizes: str = option("1e6,1e7", "comma-separated row counts (1e7 = 10,000,000)")
    policies: tuple[str, ...] = option(("full", "mmdp"), "comma-separated policies, each a train job at each size")
    partitions: tuple[int, ...] = option((1,), "comma-separated --pruner-partitions for the mmdp runs "
                                               "(1 = the state in the pruning actor, the default below 50M samples)")
    epochs: int = option(2, "epochs per run (epoch 0 has no losses: mmdp prunes by loss from epoch 1)")
    workers: int = option(2, "Ray Train workers")
    batch_size: int = option(2048, "per-step batch (large: few steps, so the data path and the pruner dominate)")
    noise: float = option(0.2, "share of the rows given a low-mode consistency (what mmdp excludes)")
    rows_per_shard: int = option(100_000, "rows per train shard")
    score_rows_per_file: int = option(100_000, "rows per score file (the score job writes one per sorted block)")
    workdir: str | None = option(None, "folder for data, scores and runs; none: a temp dir")
    interval: float = option(1.0, "seconds between memory samples (each reads every process's smaps: "
                                  "at 1 s about a seventh of a core beside a train job's 30 processes)")
    reuse: bool = option(False, "keep the data, scores and measured runs already in --workdir (resume)")
    seed: int = option(0, "seed for the data, the scores and the runs")

    def __post_init__(self):
        if min(self.counts) < 8 or self.epochs < 1 or self.workers < 1 or self.batch_size < 1:
            raise ValueError("need --sizes >= 8 and --epochs, --workers, --batch-size >= 1")
        if not 0 < self.noise < 0.5 or min(self.partitions) < 1:
            raise ValueError("need 0 < --noise < 0.5 and --partitions >= 1")
        if self.rows_per_shard < 1 or self.score_rows_per_file < 1 or self.interval <= 0:
            raise ValueError("need --rows-per-shard, --score-rows-per-file >= 1 and --interval > 0")

    @property
    def counts(self) -> list[int]:
        return [int(float(s)) for s in self.sizes.split(",") if s.strip()]


def prepare(folder: str, rows: int, cfg: BenchTrainScaleConfig) -> tuple[str, str]:
    """The dataset (train and test splits, class names) and its score table: (data URL, scores URL)."""
    import numpy as np
    import pyarrow as pa

    from benchmarks.score_shards import synthetic_rows
    from pipeline import storage
    from pipeline.data.contract import KEY, SCORES_SCHEMA
    from pipeline.data.reference import make_synthetic
    from pipeline.score.commit import write_scores

    data, scores = storage.join(folder, f"data-{rows}"), storage.join(folder, f"scores-{rows}")
    if cfg.reuse and storage.is_complete(data) and storage.is_complete(scores):
        return data, scores
    train = synthetic_rows(rows, cfg.seed)
    base = make_synthetic(256, seed=cfg.seed)
    with storage.output(data):
        storage.write_shards(train, storage.join(data, "train"), rows_per_shard=cfg.rows_per_shard)
        storage.write_shards(base.splits["test"], storage.join(data, "test"), rows_per_shard=cfg.rows_per_shard)
        storage.write_json({"name": "synthetic-scale", "classes": base.metadata["classes"]},
                           storage.join(data, "metadata.json"))
    rng = np.random.default_rng(cfg.seed)
    low = rng.random(rows) < cfg.noise
    margin = np.where(low, rng.normal(-0.1, 0.05, rows), rng.normal(0.2, 0.05, rows)).astype(np.float32)
    table = pa.table({KEY: train.column(KEY), "index": np.zeros(rows, np.int64), "clip_score": margin + 0.3,
                      "clip_margin": margin, "status": pa.array(["ok"] * rows, pa.string()),
                      "error": pa.nulls(rows, pa.string())}, schema=SCORES_SCHEMA)
    with storage.output(scores):
        write_scores(table, scores, rows_per_file=cfg.score_rows_per_file)
    return data, scores


def measure(data: str, scores: str, out: str, policy: str, partitions: int, cfg: BenchTrainScaleConfig) -> dict:
    """One train job, sampled; its per-epoch figures and peak memory."""
    from benchmarks.procmem import PeakSampler
    from pipeline import storage

    cmd = [sys.executable, "-m", "jobs.train", "--data", data, "--scores", scores, "--out", out, "--policy", policy,
           "--epochs", str(cfg.epochs), "--workers", str(cfg.workers), "--batch-size", str(cfg.batch_size),
           "--model", "cnn", "--width", "4", "--no-augment", "--warmup-steps", "1", "--seed", str(cfg.seed),
           "--eval-every", str(cfg.epochs), "--checkpoint-every", str(cfg.epochs),
           "--pruner-partitions", str(partitions)]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, also under `ray job submit`
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    with PeakSampler(proc.pid, interval=cfg.interval, titles=ACTOR_TITLES) as peak:
        log, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"train job failed ({proc.returncode}):\n{log[-3000:]}")
    metrics = storage.read_json(storage.join(out, "metrics.json"))
    epochs = metrics["epochs"]
    gb = lambda b: round(b / 2**30, 3)  # noqa: E731
    return {
        "wall_s": round(wall, 1), "loadavg_start": load,
        "epoch_s": [e["epoch_seconds"] for e in epochs],
        "plan_s": [e["plan_seconds"] for e in epochs],
        "report_s": [e["report_seconds"] for e in epochs],
        "samples_forwarded": [e["samples_forwarded"] for e in epochs],
        # rank 0 reports its share of the samples: the losses it handed over per second of its report calls
        "losses_per_s": [round(e["samples_forwarded"] / cfg.workers / e["report_seconds"])
                         if e["report_seconds"] else None for e in epochs],
        "driver_peak_pss_gb": gb(peak.peak_root_pss), "tree_peak_pss_gb": gb(peak.peak_pss),
        "pruner_actor_peak_pss_gb": gb(peak.peak_title_pss[ACTOR_TITLES[0]]),
        "partition_actors_peak_pss_gb": gb(peak.peak_title_pss[ACTOR_TITLES[1]]),
        "peak_processes": peak.peak_procs,
    }


def main(argv=None) -> int:
    return run_job(BenchTrainScaleConfig, argv, run, doc=__doc__, prog="python -m benchmarks.train_scale")


def run(cfg: BenchTrainScaleConfig) -> None:
    """Every (size, policy[, partitions]) run, measured; a JSON line each, then the table."""
    from pipeline import storage

    folder = cfg.workdir or tempfile.mkdtemp(prefix="mmdp-bench-train-scale-")
    results = []
    for rows in cfg.counts:
        data, scores = prepare(folder, rows, cfg)
        for policy in cfg.policies:
            for partitions in (cfg.partitions if policy != "full" else (1,)):
                out = storage.join(folder, f"run-{rows}-{policy}-p{partitions}")
                saved = out + ".result.json"  # the measurement, beside the run folder
                if cfg.reuse and storage.is_complete(out) and storage.exists(saved):
                    result = storage.read_json(saved)
                else:
                    result = {"rows": rows, "policy": policy, "partitions": partitions,
                              **measure(data, scores, out, policy, partitions, cfg)}
                    storage.write_json(result, saved)
                results.append(result)
                print(json.dumps({**result, "config": asdict(cfg)}), flush=True)
    print(table(results))


def table(results: list[dict]) -> str:
    """The runs as a markdown table (per-epoch lists joined by /)."""
    join = lambda values: " / ".join("-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
                                     for v in values)
    lines = ["| rows | policy | partitions | epoch s | plan s | report s | losses/s (rank 0) | samples forwarded "
             "| driver peak PSS GB | pruner actor(s) peak PSS GB | whole tree peak PSS GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        actors = r["pruner_actor_peak_pss_gb"] + r["partition_actors_peak_pss_gb"]
        lines.append(f"| {r['rows']:,} | {r['policy']} | {r['partitions']} | {join(r['epoch_s'])} | {join(r['plan_s'])} "
                     f"| {join(r['report_s'])} | {join(r['losses_per_s'])} | {join(r['samples_forwarded'])} "
                     f"| {r['driver_peak_pss_gb']} | {round(actors, 3)} | {r['tree_peak_pss_gb']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
