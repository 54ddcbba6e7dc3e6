"""Benchmark the score job over many small shards: peak memory and throughput.

Writes the same synthetic rows as few and as many parquet shards (e.g. 100
shards of 100 rows and 1,000 shards of 10), saves a randomly initialised
``mmdp-tiny`` CLIP checkpoint, then runs ``python -m jobs.score`` on each as
a fresh subprocess (its own local Ray cluster) while sampling the summed
RSS and PSS of the job's whole process tree (driver, GCS, raylet, workers)
every 0.2 s::

    python -m jobs.bench_score_shards --rows 10000 --shards 100,1000

Target (issue 7): peak memory at 1,000 shards within 20% of that at 100.
Local only: it measures this machine's process tree.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def prepare(folder: str, rows: int, shard_counts: list[int], seed: int = 0) -> tuple[dict[int, str], str]:
    from pipeline import io as mio
    from pipeline.clip_models import load_clip, save_checkpoint
    from pipeline.datasets import make_synthetic

    train = make_synthetic(2 * rows + 8, seed=seed).splits["train"].slice(0, rows)
    inputs = {}
    for count in shard_counts:
        inputs[count] = os.path.join(folder, f"shards-{count}")
        mio.write_shards(train, inputs[count], rows_per_shard=-(-rows // count))
        assert len(mio.list_files(inputs[count])) == count, "rows must divide into the shard counts"
    ckpt = os.path.join(folder, "tiny.pt")
    model, _, _ = load_clip("mmdp-tiny")
    save_checkpoint(model, ckpt, "mmdp-tiny")
    return inputs, ckpt


def measure(input_dir: str, ckpt: str, out: str, batch_size: int, interval: float) -> dict:
    from pipeline.procmem import PeakSampler

    cmd = [sys.executable, "-m", "jobs.score", "--input", input_dir, "--output", out, "--model", "mmdp-tiny",
           "--pretrained", ckpt, "--batch-size", str(batch_size), "--max-actors", "1", "--actor-cpus", "0.5"]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakSampler(proc.pid, interval=interval) as peak:
        log, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"score job failed ({proc.returncode}):\n{log[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return {"peak_rss_gb": round(peak.peak_rss / 2**30, 3), "peak_pss_gb": round(peak.peak_pss / 2**30, 3),
            "peak_processes": peak.peak_procs, "samples": peak.samples, "wall_s": round(wall, 1),
            "rows": summary["rows_in"], "job_seconds": summary["seconds"],
            "pairs_per_second": summary["pairs_per_second"], "loadavg_start": load}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="rows in every layout")
    parser.add_argument("--shards", default="100,1000", help="comma-separated shard counts")
    parser.add_argument("--batch-size", type=int, default=256, help="the score job's --batch-size")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--workdir", default=None, help="folder for shards and outputs (default: a temp dir)")
    args = parser.parse_args(argv)
    try:
        counts = [int(c) for c in args.shards.split(",")]
    except ValueError:
        parser.error(f"--shards must be integers, got {args.shards!r}")
    if any(c < 1 or args.rows % c for c in counts):
        parser.error("every shard count must divide --rows")
    folder = args.workdir or tempfile.mkdtemp(prefix="mmdp-bench-shards-")
    inputs, ckpt = prepare(folder, args.rows, counts)
    results = {}
    for count in counts:
        results[count] = measure(inputs[count], ckpt, os.path.join(folder, f"out-{count}"), args.batch_size,
                                 args.interval)
        print(json.dumps({"shards": count, **results[count]}), flush=True)
    base = results[counts[0]]
    for count in counts[1:]:
        r = results[count]
        print(f"{count} vs {counts[0]} shards: peak RSS x{r['peak_rss_gb'] / base['peak_rss_gb']:.3f}, "
              f"peak PSS x{r['peak_pss_gb'] / base['peak_pss_gb']:.3f}, "
              f"throughput x{r['pairs_per_second'] / base['pairs_per_second']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
