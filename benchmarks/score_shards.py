"""Benchmark the score job over many small shards: peak memory and throughput.

Writes the same synthetic rows as few and as many parquet shards (e.g. 100
shards of 100 rows and 1,000 shards of 10), saves a randomly initialised
``mmdp-tiny`` CLIP checkpoint, then runs ``python -m jobs.score`` on each as
a fresh subprocess (its own local Ray cluster) while sampling the summed
RSS and PSS of the job's whole process tree (driver, GCS, raylet, workers)
every 0.2 s.

Local::

    python -m benchmarks.score_shards --rows 10000 --shards 100,1000

On a cluster it measures the node it runs on: each score job still starts
its own Ray there (``RAY_ADDRESS=local``), as it does locally::

    ray job submit --working-dir . -- python -m benchmarks.score_shards --rows 10000 --shards 100,1000

Prints one JSON line per layout, each with the resolved config (also logged)
under ``config``. Target (issue 7): peak memory at 1,000 shards within 20%
of that at 100.
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


@dataclass(frozen=True)
class BenchScoreShardsConfig:
    """The benchmark's knobs; one field per command-line flag."""

    rows: int = option(10_000, "rows in every layout")
    shards: tuple[int, ...] = option((100, 1000), "comma-separated shard counts")
    batch_size: int = option(256, "the score job's --batch-size")
    interval: float = option(0.2, "seconds between memory samples")
    workdir: str | None = option(None, "folder for shards and outputs; none: a temp dir")

    def __post_init__(self):
        if not self.shards or any(c < 1 or self.rows % c for c in self.shards):
            raise ValueError("--shards: every shard count must be >= 1 and divide --rows")
        if self.rows < 1 or self.batch_size < 1 or self.interval <= 0:
            raise ValueError("need --rows >= 1, --batch-size >= 1 and --interval > 0")


def prepare(folder: str, rows: int, shard_counts: list[int], seed: int = 0) -> tuple[dict[int, str], str]:
    from pipeline import storage
    from pipeline.score.clip_models import load_clip, save_checkpoint
    from pipeline.data.reference import make_synthetic

    train = make_synthetic(2 * rows + 8, seed=seed).splits["train"].slice(0, rows)
    inputs = {}
    for count in shard_counts:
        inputs[count] = os.path.join(folder, f"shards-{count}")
        storage.write_shards(train, inputs[count], rows_per_shard=-(-rows // count))
        assert len(storage.list_files(inputs[count])) == count, "rows must divide into the shard counts"
    ckpt = os.path.join(folder, "tiny.pt")
    model, _, _ = load_clip("mmdp-tiny")
    save_checkpoint(model, ckpt, "mmdp-tiny")
    return inputs, ckpt


def measure(input_dir: str, ckpt: str, out: str, batch_size: int, interval: float) -> dict:
    from benchmarks.procmem import PeakSampler

    cmd = [sys.executable, "-m", "jobs.score", "--input", input_dir, "--output", out, "--model", "mmdp-tiny",
           "--pretrained", ckpt, "--batch-size", str(batch_size), "--max-actors", "1", "--actor-cpus", "0.5"]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    # Its own Ray on this node, also under `ray job submit`: the tree sampled is then the whole job.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
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
    return run_job(BenchScoreShardsConfig, argv, run, doc=__doc__, prog="python -m benchmarks.score_shards")


def run(cfg: BenchScoreShardsConfig) -> None:
    """Each layout's score job, measured; a JSON line each, then the ratios to the first layout."""
    counts = list(cfg.shards)
    folder = cfg.workdir or tempfile.mkdtemp(prefix="mmdp-bench-shards-")
    inputs, ckpt = prepare(folder, cfg.rows, counts)
    results = {}
    for count in counts:
        results[count] = measure(inputs[count], ckpt, os.path.join(folder, f"out-{count}"), cfg.batch_size,
                                 cfg.interval)
        print(json.dumps({"shards": count, **results[count], "config": asdict(cfg)}), flush=True)
    base = results[counts[0]]
    for count in counts[1:]:
        r = results[count]
        print(f"{count} vs {counts[0]} shards: peak RSS x{r['peak_rss_gb'] / base['peak_rss_gb']:.3f}, "
              f"peak PSS x{r['peak_pss_gb'] / base['peak_pss_gb']:.3f}, "
              f"throughput x{r['pairs_per_second'] / base['pairs_per_second']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
