"""Pre-train the offline reference CLIP model on a dataset's clean ``reference`` split.

No pretrained CLIP weights can be downloaded where mmdp is built, so this job
trains a small open_clip model (config ``mmdp-ref``, open_clip's own
``ClipLoss``) on image-caption pairs that are disjoint from the pool being
pruned. It stands in for a foundation model: its zero-shot accuracy on the
``test`` split is printed and saved next to the checkpoint, so every result
that uses it can say how good it is. Users with internet name a hub model
instead (``--model ViT-B-32 --pretrained laion2b_s34b_b79k`` in the score job).

Local (about 3-5 minutes on 2 CPU cores)::

    python -m jobs.pretrain_reference_clip --data /tmp/fmnist --out /tmp/ref-clip

On a Ray cluster (runs on the head node; the paths may be object-store URLs)::

    ray job submit --working-dir . -- python -m jobs.pretrain_reference_clip \\
        --data s3://bucket/fmnist --out s3://bucket/ref-clip

Writes the folder ``OUT``: ``model.pt``, the checkpoint (what
``load_clip("mmdp-ref", pretrained="OUT/model.pt")`` and the score job's
``--pretrained OUT/model.pt`` load), ``metrics.json`` (zero-shot accuracy,
timings, losses) and ``config.json`` (the resolved config, also logged),
committed last. Argument errors, and a missing or unusable dataset, exit
with code 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

from pipeline import storage
from pipeline.cli import HELP, check_apart, option, run_job
from pipeline.data.contract import ColumnMapping
from pipeline.score import REFERENCE_MODEL


MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class PretrainConfig:
    """What the job trains and how; one field per command-line flag (``--batch-size`` for ``batch_size``)."""

    OUTPUT: ClassVar[str] = "out"
    RAY: ClassVar[bool] = True  # the splits are read with Ray Data (parquet or webdataset shards, any store)
    RAY_DASHBOARD: ClassVar[bool] = False  # no Ray Train: a local run starts Ray without it (connect_ray)
    # data: read by Ray Data's tasks; out: written by the driver, on a cluster its head (no node reads it
    # there, and under ray job submit a relative one lies in the job's temporary copy of the working dir).
    SHARED_PATHS: ClassVar[tuple[str, ...]] = ("data", "out")  # pipeline.cli.check_shared_paths

    data: str = field(metadata={HELP: "dataset URL: reference/ and test/ shard folders (and metadata.json)"})
    out: str = field(metadata={HELP: "output folder URL: model.pt (the checkpoint), metrics.json, config.json"})
    columns: str = option("mmdp", "column mapping of the shards: mmdp, img2dataset, or pairs like image=jpg,caption=txt")
    classes: tuple[str, ...] | None = option(
        None, "class names (label i is the i-th), for zero-shot accuracy; default: the dataset's metadata.json, "
              "else none (recall only)")
    model: str = option(REFERENCE_MODEL, "open_clip config name")
    # The reference model underfits at this size, so more steps pay (BENCHMARKS.md has the runs).
    epochs: int = option(20, "passes over the reference split")
    # Twice the steps of 256 per epoch; ~13 positives of each class per batch.
    batch_size: int = option(128, "pairs per contrastive batch")
    # AdamW peak; tiny ViTs from scratch want a larger lr than CLIP's 5e-4.
    lr: float = option(2e-3, "peak AdamW learning rate (cosine decay)")
    weight_decay: float = option(0.1, "AdamW weight decay, on matrices only")  # open_clip's default
    warmup_steps: int = option(100, "linear lr warm-up steps")  # ~1 epoch; stabilises attention early on
    # Kept mild since the model underfits at this budget.
    shift: int = option(2, "max random translation, pixels")
    # Off: Fashion-MNIST's shoes all face one way.
    flip: float = option(0.0, "horizontal flip probability")
    seed: int = option(0, "seed for init, order and augmentation")
    threads: int | None = option(None, "torch CPU threads; none: torch's default (all cores)")
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)")

    def __post_init__(self):
        # A ValueError here is a usage error: parse_config turns it into exit code 2.
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 2, "--batch-size must be >= 2 (a contrastive batch needs negatives)"),
            (self.lr > 0, "--lr must be > 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.shift >= 0, "--shift must be >= 0"),
            (0 <= self.flip <= 1, "--flip must be in [0, 1]"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (not self.out.endswith(".pt"), f"--out is a folder (the checkpoint goes to OUT/{MODEL_FILE}), got {self.out}"),
        ]
        ColumnMapping.parse(self.columns)  # a SchemaError (a ValueError) names a bad mapping
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def check_inputs(self) -> None:
        """Refused before the output is marked pending (``pipeline.cli.execute``), so that a re-run refused for
        its input leaves the earlier model committed: an output that is or holds ``--data``, or lies in a split
        it reads (beside them, in the dataset's folder, is fine); a dataset not committed or without a
        reference split."""
        from pipeline.data.shards import list_shards

        splits = [storage.join(self.data, split) for split in ("reference", "test")]  # what it reads
        check_apart("out", self.out, "data", self.data, splits)
        storage.check_not_pending(self.data)
        list_shards(storage.join(self.data, "reference"))


def checkpoint_url(out: str) -> str:
    """The checkpoint in the job's output folder: what ``--pretrained`` of the score job takes."""
    return storage.join(out, MODEL_FILE)


def _check_model(cfg: PretrainConfig) -> None:
    from pipeline.score.clip_models import contrastive_config

    contrastive_config(cfg.model)


def main(argv: list[str] | None = None) -> int:
    return run_job(PretrainConfig, argv, _run, doc=__doc__, prog="python -m jobs.pretrain_reference_clip",
                   check=_check_model)


def _run(cfg: PretrainConfig) -> None:
    from pipeline.score.pretrain import train  # torch, open_clip and Ray Data: not for --help

    train(cfg, checkpoint_url(cfg.out))  # prints its progress and result


if __name__ == "__main__":
    sys.exit(main())
