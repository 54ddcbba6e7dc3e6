"""Benchmark: bytes of training data read from the object store per epoch, pruned runs against ``full``.

Runs the demo's stages (``jobs.demo``: dataset, reference CLIP, scores, one
training run per policy) with every input and output on a loopback S3
server (moto's, from the test extras) that counts the body bytes of each
GET, and attributes to each training run the bytes read under the train
split while it ran (the test split, the scores and the checkpoints are
elsewhere; a run's offset indexes of webdataset tars, which its epochs read,
are counted with the split), epoch by epoch (from each epoch's start to the
next one's).
Prints one JSON line per policy (bytes and GETs of each epoch, those before
the first, samples forwarded, the split's size), then each policy's ratios
to ``full`` over the epochs after the first.

Local::

    python -m benchmarks.bytes_read --rows 4000 --epochs 4 --policies full,random,mmdp --keep-ratio 0.5
    python -m benchmarks.bytes_read --rows 4000 --epochs 4 --policies full,random,mmdp --keep-ratio 0.5 \
        --shard-format webdataset

On a cluster it measures the jobs' reads through the server on the node it runs on::

    ray job submit --working-dir . -- python -m benchmarks.bytes_read --rows 4000
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

from pipeline.cli import option, run_job


@dataclass(frozen=True)
class BenchBytesReadConfig:
    """The benchmark's knobs; one field per command-line flag."""

    rows: int = option(4000, "rows in the train split (and the test split)")
    reference_rows: int = option(1000, "clean rows the reference CLIP model is trained on")
    clip_epochs: int = option(4, "reference CLIP pre-training epochs")
    epochs: int = option(4, "training epochs per policy (at least 2: epoch 0 is every sample for some policies)")
    policies: tuple[str, ...] = option(("full", "random", "mmdp"), "policies, comma-separated (full first: the base)")
    keep_ratio: float = option(0.5, "--keep-ratio of the pruned runs")
    workers: int = option(2, "Ray Train workers")
    shard_format: str = option("parquet", "the dataset's shards: parquet (read whole), or webdataset tars (the kept "
                                          "samples read by offset)", choices=("parquet", "webdataset"))
    max_gap_bytes: int = option(0, "webdataset: jobs.train --max-gap-bytes")
    seed: int = option(0, "seed for the data, the models and the plans")

    def __post_init__(self):
        if not self.policies or self.policies[0] != "full":
            raise ValueError("--policies must start with full (the base of the ratios)")
        if min(self.rows, self.reference_rows, self.clip_epochs, self.workers) < 1 or self.epochs < 2:
            raise ValueError("--rows, --reference-rows, --clip-epochs and --workers must be >= 1, --epochs >= 2")


def split_bytes(url: str) -> int:
    """Bytes of the data files of a split folder."""
    from pipeline import storage

    fs, _ = storage.filesystem_for(url)
    files = storage.list_files(url, (".parquet", ".tar"))
    return sum(info.size for info in fs.get_file_info([storage.filesystem_for(f)[1] for f in files]))


def run(cfg: BenchBytesReadConfig) -> None:
    from benchmarks.loopback_s3 import LoopbackS3
    from jobs.demo import DemoConfig, stages
    from pipeline import storage

    results = {}
    with LoopbackS3() as s3:
        out = s3.bucket("mmdp-bench") + "/demo"
        demo = DemoConfig(out=out, train_rows=cfg.rows, reference_rows=cfg.reference_rows, clip_epochs=cfg.clip_epochs,
                          policies=cfg.policies, keep_ratio=cfg.keep_ratio, epochs=cfg.epochs, workers=cfg.workers,
                          seed=cfg.seed)
        train_split = storage.join(out, "data", "train")
        for stage, _, job, argv, output in stages(demo):
            if stage == "report":
                continue
            if stage == "data":
                argv = [*argv, "--shard-format", cfg.shard_format]
            if stage == "train":
                argv = [*argv, "--max-gap-bytes", str(cfg.max_gap_bytes)]
            began = time.time()
            if job.main(argv):
                raise RuntimeError(f"stage {stage} failed: python -m {job.__name__} {' '.join(argv)}")
            if stage == "data":
                size = split_bytes(train_split)  # once: every run reads the same split
            if stage != "train":
                continue
            ended = time.time()
            policy = argv[argv.index("--policy") + 1]
            metrics = storage.read_json(storage.join(output, "metrics.json"))
            # Each epoch's reads: from its start to the next one's (the last: to the run's end).
            starts = [e["started_at"] for e in metrics["epochs"]] + [ended]
            # Kept tar reads also read each tar's offset index (in the run folder) every epoch: counted with them.
            index = storage.join(output, "tar_index")
            epochs = [s3.gets(a, b, under=train_split) for a, b in zip(starts, starts[1:])]
            indexes = [s3.gets(a, b, under=index) for a, b in zip(starts, starts[1:])]
            totals = metrics["totals"]
            results[policy] = {
                "policy": policy, "epochs": totals["epochs"], "split_bytes": size,
                "bytes_read_per_epoch": [sent + isent for (_, sent), (_, isent) in zip(epochs, indexes)],
                "gets_per_epoch": [gets + igets for (gets, _), (igets, _) in zip(epochs, indexes)],
                "index_bytes_per_epoch": [sent for _, sent in indexes],
                "bytes_read_before_epoch_0": s3.gets(began, starts[0], under=train_split)[1]
                + s3.gets(began, starts[0], under=index)[1],
                "samples_forwarded_per_epoch": [e["samples_forwarded"] for e in metrics["epochs"]],
                "num_samples": totals["num_samples"], "train_seconds": totals["train_seconds"],
            }
            print(json.dumps({**results[policy], "config": asdict(cfg)}), flush=True)
    base = results["full"]
    for policy, r in results.items():
        if policy != "full":
            print(f"{policy} vs full, epochs 1-{r['epochs'] - 1} (epoch 0 is every sample for some policies): "
                  f"bytes read x{_later(r, 'bytes_read_per_epoch') / _later(base, 'bytes_read_per_epoch'):.3f}, "
                  f"samples forwarded x{_later(r, 'samples_forwarded_per_epoch') / _later(base, 'samples_forwarded_per_epoch'):.3f}")


def _later(result: dict, key: str) -> float:
    """The mean of ``key`` over the epochs after the first (all of them if there is one)."""
    values = result[key][1:] or result[key]
    return sum(values) / len(values)


def main(argv=None) -> int:
    return run_job(BenchBytesReadConfig, argv, run, doc=__doc__, prog="python -m benchmarks.bytes_read")


if __name__ == "__main__":
    sys.exit(main())
