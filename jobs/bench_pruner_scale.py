"""Benchmark the pruner at web scale: state bytes a sample, plan time, loss ingest rate.

Each size runs in a fresh subprocess (so peak memory is its own) on synthetic
state: uniform consistency scores, then random batches of losses (1M a
batch, like workers' chunks), then plans of pruning and annealing epochs::

    python -m jobs.bench_pruner_scale --sizes 1e6,1e7,1e8 --policy mmdp
    python -m jobs.bench_pruner_scale --sizes 1e7 --policy random,infobatch,clip_filter,full
    python -m jobs.bench_pruner_scale --sizes 1e7 --shards 4   # state split in 4 (in process)

On a cluster: ``ray job submit --working-dir . -- python -m jobs.bench_pruner_scale ...``
(no Ray is used: it measures the pruner itself, on the machine that runs it).

Targets (DESIGN.md): <= 16 bytes a sample; plan() <= 1 s at 10M and <= 10 s
at 100M; ingest >= 10M losses/s.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np

BATCH = 1 << 20


def measure(n: int, policy: str, shards: int, ingest_losses: int, seed: int = 0) -> dict:
    """One size in this process: memory, init, ingest and plan timings."""
    from pipeline.procmem import PeakSampler, rss
    from pipeline.pruner import Pruner
    from pipeline.shards import even_bounds

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
    lines = ["| samples | policy | shards | state B/sample (nbytes) | RSS growth B/sample | peak RSS over start B/sample "
             "| plan wall s (epoch 0 / 3 / 4 / 19) | plan CPU s (same) | ingest losses/s (wall / CPU) | load avg |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['policy']} | {r['shards']} | {r['state_nbytes_per_sample']} "
                     f"| {r['rss_growth_per_sample']} | {r['peak_rss_per_sample']} "
                     f"| {r['plan_s_epoch0']} / {r['plan_s_epoch3']} / {r['plan_s_epoch4']} / {r['plan_s_epoch19']} "
                     f"| {' / '.join(str(v) for v in r['plan_cpu_s'].values())} "
                     f"| {r['ingest_per_s'] / 1e6:.1f}M / {r['ingest_per_cpu_s'] / 1e6:.1f}M | {r['loadavg_start']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated sample counts")
    parser.add_argument("--policy", default="mmdp", help="comma-separated policies")
    parser.add_argument("--shards", type=int, default=1, help="index-range shards the state is split into (in process)")
    parser.add_argument("--ingest", type=float, default=0.5, help="losses ingested, as a fraction of the samples")
    parser.add_argument("--max-ingest", type=float, default=5e7, help="cap on the losses ingested")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)  # internal: one size, this process
    args = parser.parse_args(argv)
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be numbers, got {args.sizes!r}")
    if any(s < 1 for s in sizes) or args.shards < 1:
        parser.error("--sizes and --shards must be >= 1")
    if args.one is not None:
        n = int(args.one)
        print(json.dumps(measure(n, args.policy, args.shards, int(min(args.ingest * n, args.max_ingest)))))
        return 0
    rows = []
    for policy in args.policy.split(","):
        for n in sizes:
            cmd = [sys.executable, "-m", "jobs.bench_pruner_scale", "--one", str(n), "--policy", policy,
                   "--shards", str(args.shards), "--ingest", str(args.ingest), "--max-ingest", str(args.max_ingest)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
