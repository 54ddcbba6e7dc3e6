"""Benchmark: a short fit's time at Ray Train's default poll interval (2 s) against mmdp's (0.5 s).

Ray Train's controller takes each worker's report when it polls the
workers, every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``; a worker's next report
waits until the last one is taken (:mod:`pipeline.train.driver`). This runs
the same ``jobs.train`` fit (the tiny synthetic set, scored by the tiny
model) at each interval, alternated, in one Ray, after one fit that pays
the imports and is not counted. Prints one JSON line per fit, then each
interval's mean and the ratio of the first interval's to the last's.

Local::

    python -m benchmarks.poll_interval --out runs/bench-poll --repeats 3

On a cluster (Ray Train hands the interval from the driver to its controller and workers)::

    ray job submit --working-dir . -- python -m benchmarks.poll_interval --out s3://bucket/bench-poll
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.cli import option, run_job
from pipeline.train.driver import POLL_INTERVAL_ENV


@dataclass(frozen=True)
class BenchPollConfig:
    """The benchmark's knobs; one field per command-line flag."""

    OUTPUT: ClassVar[str] = "out"
    RAY: ClassVar[bool] = True

    out: str = field(metadata={"help": "benchmark folder: the dataset, its scores, one run folder per fit (URL)"})
    rows: int = option(400, "rows of the synthetic set (half train, half test)")
    epochs: int = option(4, "epochs per fit")
    repeats: int = option(3, "fits per interval")
    intervals: tuple[str, ...] = option(("2.0", "0.5"), "poll intervals in seconds, comma-separated")
    workers: int = option(2, "Ray Train workers")

    def __post_init__(self):
        if min(self.rows, self.epochs, self.repeats, self.workers) < 1 or not self.intervals:
            raise ValueError("--rows, --epochs, --repeats and --workers must be >= 1; --intervals one or more")
        for value in self.intervals:
            if float(value) <= 0:
                raise ValueError(f"--intervals: {value!r} is not a positive number of seconds")


def run(cfg: BenchPollConfig) -> dict:
    from jobs import score as score_job
    from jobs import train as train_job
    from pipeline import storage
    from pipeline.data.reference import make_synthetic, write_dataset

    data, scores = storage.join(cfg.out, "data"), storage.join(cfg.out, "scores")
    with storage.output(data):
        write_dataset(make_synthetic(n=cfg.rows, seed=5), data, rows_per_shard=50)
    if score_job.main(["--input", storage.join(data, "train"), "--output", scores, "--model", "mmdp-tiny",
                       "--mode", "label", "--actor-cpus", "0.5", "--batch-size", "64"]):
        raise RuntimeError("the score job failed")

    def fit(name: str) -> dict:
        out = storage.join(cfg.out, "runs", name)
        started = time.perf_counter()
        if train_job.main(["--data", data, "--scores", scores, "--out", out, "--epochs", str(cfg.epochs),
                           "--workers", str(cfg.workers), "--batch-size", "16", "--keep-ratio", "0.5",
                           "--warmup-steps", "2"]):
            raise RuntimeError(f"the fit {name} failed")
        totals = storage.read_json(storage.join(out, "metrics.json"))["totals"]
        return {"fit": name, "seconds": round(time.perf_counter() - started, 2),
                "epoch_seconds": totals["epoch_seconds"]}

    saved = os.environ.get(POLL_INTERVAL_ENV)
    try:
        fit("imports")  # a first fit pays the imports of every process kind
        rows = {value: [] for value in cfg.intervals}
        for repeat in range(cfg.repeats):
            for value in cfg.intervals:
                os.environ[POLL_INTERVAL_ENV] = value
                rows[value].append({"interval_s": float(value), **fit(f"{value}s-{repeat}")})
                print(json.dumps(rows[value][-1]), flush=True)
    finally:
        if saved is None:
            os.environ.pop(POLL_INTERVAL_ENV, None)
        else:
            os.environ[POLL_INTERVAL_ENV] = saved
    means = {value: round(sum(r["seconds"] for r in rs) / len(rs), 2) for value, rs in rows.items()}
    first, last = cfg.intervals[0], cfg.intervals[-1]
    result = {"fits": rows, "mean_seconds": means, "ratio": round(means[first] / means[last], 3),
              "ratio_of": f"{first} s / {last} s"}
    storage.write_json(result, storage.join(cfg.out, "results.json"))
    return {"mean_seconds": means, "ratio": result["ratio"], "ratio_of": result["ratio_of"]}


def main(argv=None) -> int:
    return run_job(BenchPollConfig, argv, run, doc=__doc__, prog="python -m benchmarks.poll_interval")


if __name__ == "__main__":
    raise SystemExit(main())
