"""Benchmark the pruner at web scale: state bytes a sample, plan time, loss ingest rate.

Each size runs in a fresh subprocess (so peak memory is its own) on synthetic
state: uniform consistency scores, then random batches of losses (1M a
batch, like workers' chunks), then plans of pruning and annealing epochs.

Local::

    python -m benchmarks.pruner_scale --sizes 1e6,1e7,1e8 --policy mmdp
    python -m benchmarks.pruner_scale --sizes 1e7 --policy random,infobatch,clip_filter,full
    python -m benchmarks.pruner_scale --sizes 1e7 --shards 4   # state split in 4 (in process)

On a cluster it measures the node it runs on (no Ray is used: it measures the
pruner itself)::

    ray job submit --working-dir . -- python -m benchmarks.pruner_scale --sizes 1e7,1e8 --json results.json

Prints one JSON line per size and policy, then a markdown table; ``--json``
also writes the rows and the resolved config (also logged) to a file.
Targets: <= 16 bytes a sample; plan() <= 1 s at 10M and <= 10 s
at 100M; ingest >= 10M losses/s.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.cli import option, run_job
from pipeline.prune.policies import POLICIES

BATCH = 1 << 20
# The child process: one size, one policy, in a fresh interpreter; prints its row as JSON.
_CHILD = ("import json, sys; from benchmarks.pruner_scale import measure; "
          "print(json.dumps(measure(*json.loads(sys.argv[1]))))")


@dataclass(frozen=True)
class BenchPrunerScaleConfig:
    """The benchmark's knobs; one field per command-line flag."""

    sizes: str = option("1e6,1e7,1e8", "comma-separated sample counts (1e7 = 10,000,000)")
    policy: tuple[str, ...] = option(("mmdp",), "comma-separated policies")
    shards: int = option(1, "index-range shards the state is split into (in process)")
    ingest: float = option(0.5, "losses ingested, as a fraction of the samples")
    max_ingest: float = option(5e7, "cap on the losses ingested")
    json: str | None = option(None, "also write the rows and this config to this JSON file")

    @property
    def counts(self) -> list[int]:
        """``sizes`` as integers."""
        return [int(float(s)) for s in self.sizes.split(",")]

    def __post_init__(self):
        try:
            counts = self.counts
        except ValueError:
            raise ValueError(f"--sizes must be numbers, got {self.sizes!r}") from None
        if any(n < 1 for n in counts) or self.shards < 1:
            raise ValueError("--sizes and --shards must be >= 1")
        unknown = sorted(set(self.policy) - set(POLICIES))
        if unknown or not self.policy:
            raise ValueError(f"--policy: unknown {unknown or 'none given'}; known: {', '.join(POLICIES)}")


def measure(n: int, policy: str, shards: int, ingest_losses: int, seed: int = 0) -> dict:
    """One size in this process: memory, init, ingest and plan timings."""
    from benchmarks.procmem import PeakSampler, rss
    from pipeline.prune.pruner import Pruner
    from pipeline.prune.partitions import even_bounds

    rng = np.random.default_rng(seed)
    out = {"n": n, "policy": policy, "shards": shards, "loadavg_start": os.getloadavg()[0]}
    base = rss()
    with PeakSampler(interval=0.05) as peak:
        cons = rng.random(n, dtype=np.float32)
        started = time.perf_counter()
        pruner = Pruner(n, policy, keep_ratio=0.5, epochs=20, seed=seed, consistency=cons,
                        bounds=even_bounds(n, shards))
        out["init_s"] = round(time.perf_counter() - started, 3)
        del cons
        gc.collect()
        out["state_nbytes_per_sample"] = round(pruner.nbytes / n, 2)
        out["rss_growth_per_sample"] = round((rss() - base) / n, 2)
        out["plan_s_epoch0"] = _timed(pruner.plan, 0)
        ingest_s, ingest_cpu, sent = 0.0, 0.0, 0
        while sent < ingest_losses:
            b = min(BATCH, ingest_losses - sent)
            idx, losses = rng.integers(0, n, b), rng.exponential(1.0, b).astype(np.float32)
            t, c = time.perf_counter(), time.process_time()
            pruner.update(idx, losses, 0)
            ingest_s += time.perf_counter() - t
            ingest_cpu += time.process_time() - c
            sent += b
        out["ingest_losses"] = sent
        out["ingest_per_s"] = round(sent / ingest_s)
        out["ingest_per_cpu_s"] = round(sent / ingest_cpu)
        # Two pruning epochs with losses (no memo between them) and an annealing one.
        out["plan_s_epoch3"] = _timed(pruner.plan, 3)
        out["plan_s_epoch4"] = _timed(pruner.plan, 4)
        out["plan_s_epoch19"] = _timed(pruner.plan, 19)
        out["plan_cpu_s"] = dict(zip(["epoch0", "epoch3", "epoch4", "epoch19"], _CPU))
        out["rss_after_plans_per_sample"] = round((rss() - base) / n, 2)
    out["peak_rss_per_sample"] = round((peak.peak_rss - base) / n, 2)
    out["peak_rss_gb"] = round(peak.peak_rss / 2**30, 2)
    out["loadavg_end"] = os.getloadavg()[0]
    return out


def _timed(fn, *args) -> float:
    """Wall seconds; the process's CPU seconds go to ``_CPU`` (the machine is shared: CPU time
    is what the pruner itself costs, wall time what it cost under the load of the moment)."""
    t, c = time.perf_counter(), time.process_time()
    fn(*args)
    _CPU.append(round(time.process_time() - c, 3))
    return round(time.perf_counter() - t, 3)


_CPU: list[float] = []


def table(rows: list[dict]) -> str:
    from pipeline.report.page import markdown_table

    header = ("samples", "policy", "shards", "state B/sample (nbytes)", "RSS growth B/sample",
              "peak RSS over start B/sample", "plan wall s (epoch 0 / 3 / 4 / 19)", "plan CPU s (same)",
              "ingest losses/s (wall / CPU)", "load avg")
    return markdown_table(header, [
        (f"{r['n']:,}", r["policy"], r["shards"], r["state_nbytes_per_sample"], r["rss_growth_per_sample"],
         r["peak_rss_per_sample"],
         f"{r['plan_s_epoch0']} / {r['plan_s_epoch3']} / {r['plan_s_epoch4']} / {r['plan_s_epoch19']}",
         " / ".join(str(v) for v in r["plan_cpu_s"].values()),
         f"{r['ingest_per_s'] / 1e6:.1f}M / {r['ingest_per_cpu_s'] / 1e6:.1f}M", f"{r['loadavg_start']:.2f}")
        for r in rows])


def main(argv=None) -> int:
    return run_job(BenchPrunerScaleConfig, argv, run, doc=__doc__, prog="python -m benchmarks.pruner_scale")


def run(cfg: BenchPrunerScaleConfig) -> None:
    """Each size and policy in a fresh subprocess; their rows as JSON lines, then the table."""
    rows = []
    for policy in cfg.policy:
        for n in cfg.counts:
            child = json.dumps([n, policy, cfg.shards, int(min(cfg.ingest * n, cfg.max_ingest))])
            done = subprocess.run([sys.executable, "-c", _CHILD, child], capture_output=True, text=True)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                raise SystemExit(done.returncode)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"config": asdict(cfg), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
