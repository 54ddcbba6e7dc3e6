"""Benchmark the score job over many rows and many small shards: peak memory and throughput.

Writes synthetic rows as few and as many parquet shards (e.g. 100 shards of
100 rows and 1,000 shards of 10), and as many rows in shards of the same
size (``--shard-rows``: e.g. 0.5M and 2M rows in shards of 5,000, so 100 and
400 shards; with ``--shards`` the rows go into the same shard count, and the
shards, so the blocks in flight, grow with them), saves a randomly initialised
``mmdp-tiny`` CLIP checkpoint, then runs ``python -m jobs.score`` on each as
a fresh subprocess (its own local Ray cluster) while sampling the summed
RSS and PSS of the job's whole process tree (driver, GCS, raylet, workers)
every 0.2 s, and the driver's own.

Local::

    python -m benchmarks.score_shards --rows 10000 --shards 100,1000
    python -m benchmarks.score_shards --rows 500000,2000000 --shard-rows 5000
    python -m benchmarks.score_shards --rows 50000 --shards 100,5000 --store s3

``--store s3`` puts the shards and the output on a loopback S3 server
(moto's server mode, from the test extras) and reports, from each job's
summary, the delay from its start to the first scored row (with thousands of
shards, listing and footer reads come before it), and the server's requests
by method, before that first row and in the whole job, each also per shard.

On a cluster it measures the node it runs on: each score job still starts
its own Ray there (``RAY_ADDRESS=local``), as it does locally::

    ray job submit --working-dir . -- python -m benchmarks.score_shards --rows 10000 --shards 100,1000

Prints one JSON line per layout, each with the resolved config (also logged)
under ``config`` and the tree's PSS at its peak split by kind of memory
(``anon``, the processes' own; ``file``; ``shmem``, Ray's object store) and
by group of process, then the ratios of each layout to the first. Targets:
peak memory at 1,000 shards within 20% of that at 100; the driver's and the
whole tree's peak PSS growing by at most 10% for 4x the rows (the driver
holds no per-row data: repeats and the index are found in the cluster).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from benchmarks.loopback_s3 import LoopbackS3
from pipeline.cli import option, run_job


@dataclass(frozen=True)
class BenchScoreShardsConfig:
    """The benchmark's knobs; one field per command-line flag."""

    rows: tuple[int, ...] = option((10_000,), "comma-separated row counts")
    shards: tuple[int, ...] = option((100, 1000), "comma-separated shard counts (each layout: every row count x shard count)")
    shard_rows: int | None = option(None, "rows a shard instead of --shards: each row count in rows/N shards, so "
                                          "blocks keep their size and only the row count changes")
    batch_size: int = option(256, "the score job's --batch-size")
    interval: float = option(0.2, "seconds between memory samples")
    workdir: str | None = option(None, "folder for shards and outputs; none: a temp dir")
    store: str = option("local", "where shards and outputs live: local, or s3 (a loopback S3 server)",
                        choices=("local", "s3"))
    in_flight_gib: float | None = option(None, "the score job's --in-flight-gib; none: the job's default")

    def __post_init__(self):
        if self.shard_rows is not None:
            if self.shard_rows < 1 or any(r % self.shard_rows for r in self.rows):
                raise ValueError("--shard-rows must be >= 1 and divide every --rows")
        elif not self.shards or any(c < 1 or r % c for c in self.shards for r in self.rows):
            raise ValueError("--shards: every shard count must be >= 1 and divide every --rows")
        if not self.rows or min(self.rows) < 1 or self.batch_size < 1 or self.interval <= 0:
            raise ValueError("need --rows >= 1, --batch-size >= 1 and --interval > 0")


    def layouts(self) -> list[tuple[int, int]]:
        """Every (rows, shards) layout measured, in order: the first is the base of the ratios."""
        if self.shard_rows is not None:
            return [(rows, rows // self.shard_rows) for rows in self.rows]
        return [(rows, count) for rows in self.rows for count in self.shards]


def prepare(folder: str, layouts: list[tuple[int, int]], seed: int = 0) -> tuple[dict, str]:
    """Shards of every (rows, shards) layout, and a checkpoint: ({(rows, shards): URL}, checkpoint).

    ``folder`` is a local folder or an ``s3://`` URL (the checkpoint goes beside the shards, locally).
    """
    from pipeline import storage
    from pipeline.score.clip_models import load_clip, save_checkpoint

    inputs = {}
    for rows in dict.fromkeys(r for r, _ in layouts):
        train = synthetic_rows(rows, seed)
        for count in (c for r, c in layouts if r == rows):
            inputs[rows, count] = storage.join(folder, f"rows-{rows}-shards-{count}")
            storage.write_shards(train, inputs[rows, count], rows_per_shard=-(-rows // count))
            assert len(storage.list_files(inputs[rows, count])) == count, "rows must divide into the shard counts"
    ckpt = os.path.join(tempfile.mkdtemp(prefix="mmdp-bench-ckpt-"), "tiny.pt")
    model, _, _ = load_clip("mmdp-tiny")
    save_checkpoint(model, ckpt, "mmdp-tiny")
    return inputs, ckpt


# Distinct synthetic images drawn; larger layouts repeat them under new keys
# (the job's cost per row is the same, and drawing millions takes long).
DISTINCT_ROWS = 20_000


def synthetic_rows(rows: int, seed: int = 0):
    """``rows`` synthetic training rows with distinct keys (images repeat past :data:`DISTINCT_ROWS`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.data.contract import KEY
    from pipeline.data.reference import make_synthetic

    base = make_synthetic(2 * min(rows, DISTINCT_ROWS) + 8, seed=seed).splits["train"]
    base = base.slice(0, min(rows, base.num_rows))
    copies = []
    for copy in range(-(-rows // base.num_rows)):
        part = base.slice(0, min(base.num_rows, rows - copy * base.num_rows))
        keys = pc.binary_join_element_wise(part.column(KEY), pa.scalar(f"{copy:05d}"), "-")
        copies.append(part.set_column(part.schema.get_field_index(KEY), KEY, keys))
    return pa.concat_tables(copies)


def measure(input_dir: str, ckpt: str, out: str, batch_size: int, interval: float, requests=None,
            in_flight_gib: float | None = None) -> dict:
    """One score job on ``input_dir``, sampled; with ``requests`` (a :class:`~benchmarks.loopback_s3.LoopbackS3`),
    the S3 requests it made."""
    from benchmarks.procmem import PeakSampler

    cmd = [sys.executable, "-m", "jobs.score", "--input", input_dir, "--output", out, "--model", "mmdp-tiny",
           "--pretrained", ckpt, "--batch-size", str(batch_size), "--max-actors", "1", "--actor-cpus", "0.5",
           *([] if in_flight_gib is None else ["--in-flight-gib", str(in_flight_gib)])]
    load = os.getloadavg()[0]
    began = time.time()
    started = time.perf_counter()
    # Its own Ray on this node, also under `ray job submit`: the tree sampled is then the whole job.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    with PeakSampler(proc.pid, interval=interval) as peak:
        log, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"score job failed ({proc.returncode}):\n{log[-3000:]}")
    from pipeline import storage

    summary = storage.read_json(storage.join(out, "summary.json"))
    # The tree's peak split by phase: reading and scoring, then the commit (sort, dedupe, index, write).
    committing = summary["started_at"] + summary["scoring_seconds"]
    phases = {"scoring_peak_pss_gb": round(peak.peak_pss_between(0, committing) / 2**30, 3),
              "commit_peak_pss_gb": round(peak.peak_pss_between(committing, float("inf")) / 2**30, 3),
              "scoring_seconds": summary["scoring_seconds"], "commit_seconds": summary["commit_seconds"]}
    return {"peak_rss_gb": round(peak.peak_rss / 2**30, 3), "peak_pss_gb": round(peak.peak_pss / 2**30, 3), **phases,
            "driver_peak_pss_gb": round(peak.peak_root_pss / 2**30, 3),
            # The tree's peak PSS split: by kind (anon: the processes' own; shmem: the object store) and group.
            "at_peak_gb": {k: round(v / 2**30, 3) for k, v in peak.at_peak_by_kind.items()},
            "at_peak_by_group_gb": {k: round(v / 2**30, 3) for k, v in sorted(peak.at_peak_by_group.items())},
            "peak_processes": peak.peak_procs, "samples": peak.samples, "wall_s": round(wall, 1),
            "rows": summary["rows_in"], "job_seconds": summary["seconds"],
            "first_row_seconds": summary.get("first_row_seconds"),
            "pairs_per_second": summary["pairs_per_second"], "loadavg_start": load,
            **({} if requests is None else {
                "requests": requests.counts(began, float("inf")),
                "requests_before_first_row": requests.counts(began, summary["started_at"] + summary["first_row_seconds"]),
            })}


def main(argv=None) -> int:
    return run_job(BenchScoreShardsConfig, argv, run, doc=__doc__, prog="python -m benchmarks.score_shards")


def run(cfg: BenchScoreShardsConfig) -> None:
    """Each layout's score job, measured; a JSON line each, then the ratios to the first layout."""
    from pipeline import storage

    layouts = cfg.layouts()
    server = None
    if cfg.store == "s3":
        server = LoopbackS3().start()
        folder = server.bucket("mmdp-bench") + "/shards"
    else:
        folder = cfg.workdir or tempfile.mkdtemp(prefix="mmdp-bench-shards-")
    inputs, ckpt = prepare(folder, layouts)
    results = {}
    for rows, count in layouts:
        results[rows, count] = measure(inputs[rows, count], ckpt, storage.join(folder, f"out-{rows}-{count}"),
                                       cfg.batch_size, cfg.interval, server, cfg.in_flight_gib)
        print(json.dumps({"rows": rows, "shards": count, **results[rows, count], "config": asdict(cfg)}), flush=True)
    base = results[layouts[0]]
    for layout in layouts[1:]:
        r = results[layout]
        print(f"{layout[0]} rows x {layout[1]} shards vs {layouts[0][0]} x {layouts[0][1]}: "
              f"peak RSS x{r['peak_rss_gb'] / base['peak_rss_gb']:.3f}, "
              f"peak PSS x{r['peak_pss_gb'] / base['peak_pss_gb']:.3f} (scoring "
              f"x{r['scoring_peak_pss_gb'] / base['scoring_peak_pss_gb']:.3f}, commit "
              f"x{r['commit_peak_pss_gb'] / base['commit_peak_pss_gb']:.3f}), "
              f"driver peak PSS x{r['driver_peak_pss_gb'] / base['driver_peak_pss_gb']:.3f}, "
              f"throughput x{r['pairs_per_second'] / base['pairs_per_second']:.3f}, "
              f"first scored row x{r['first_row_seconds'] / base['first_row_seconds']:.3f}")
        print("  at the peak, by kind: " + ", ".join(
            f"{kind} {gb:.3f} GB (x{gb / base['at_peak_gb'][kind]:.3f})" if base["at_peak_gb"].get(kind) else
            f"{kind} {gb:.3f} GB" for kind, gb in r["at_peak_gb"].items()))
        if server is not None:
            for key in ("requests_before_first_row", "requests"):
                print(f"  {key}: " + ", ".join(f"{m} {n} ({n / count:.2f} a shard; {base[key].get(m, 0) / layouts[0][1]:.2f} "
                                                 f"with {layouts[0][1]} shards)" for m, n in r[key].items()))
    if server is not None:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
