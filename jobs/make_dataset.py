"""Write the reference dataset: Fashion-MNIST with injected noise (or the tiny synthetic set).

Local (a folder or an object store)::

    python -m jobs.make_dataset --out data/fmnist-sym30 --noise symmetric:0.3 --seed 0
    python -m jobs.make_dataset --out data/fmnist-small --limit 2000 --noise symmetric:0.2,caption:0.05
    python -m jobs.make_dataset --out s3://bucket/fmnist-sym30 --noise symmetric:0.3 --s3-endpoint http://127.0.0.1:9000

On a Ray cluster (one process on the head node, which needs the source files:
the Debian package ``dataset-fashion-mnist``, or ``--source`` pointing at a folder or bucket)::

    ray job submit --working-dir . -- python -m jobs.make_dataset --out s3://bucket/fmnist-sym30 --noise symmetric:0.3

Writes OUT/{reference,train,test}/part-*.parquet, OUT/ground_truth.parquet,
OUT/metadata.json and OUT/config.json (the resolved config, also logged),
then commits OUT (``_SUCCESS``). The whole 70k-image dataset takes a few
seconds in one process, so this job starts no Ray workers.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.data import reference
from pipeline.data.noise import NOISE_KINDS, parse_noise_spec
from pipeline.cli import HELP, option, run_job


@dataclass(frozen=True)
class MakeDatasetConfig:
    """What to write; one field per command-line flag (``--reference-size`` for ``reference_size``)."""

    OUTPUT: ClassVar[str] = "out"

    out: str = field(metadata={HELP: "dataset URL: a folder, file://, s3:// or gs://"})
    source: str | None = option(
        None, f"folder or URL with the four *-ubyte.gz files; none: {reference.FASHION_MNIST_DIR}")
    # A clean slice to pre-train the reference CLIP model on, disjoint from the
    # pool being pruned; 10k of 60k leaves the 50k pool the protocol draws from.
    reference_size: int = option(10_000, "clean training images kept apart for the reference model")
    # Clean by default: noise is what an experiment asks for, e.g. "symmetric:0.2,caption:0.05".
    noise: str = option("none", f"kind:rate,... over the train split; kinds: {', '.join(NOISE_KINDS)}")
    seed: int = option(0, "seed for the split, noise and images")
    limit: int | None = option(None, "cap on rows per split (with --synthetic: rows in total; none there: 256)")
    # ~2.5 MB of PNGs a shard: a handful of read tasks per split.
    rows_per_shard: int = option(5000, "rows per parquet shard")
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store; none: AWS_ENDPOINT_URL or AWS")
    synthetic: bool = option(False, "write the tiny synthetic test dataset instead of Fashion-MNIST")

    def __post_init__(self):
        # A ValueError here is a usage error: parse_config turns it into exit code 2.
        try:
            parse_noise_spec(self.noise)
        except ValueError as exc:
            raise ValueError(f"--noise: {exc}") from None
        if not 0 <= self.reference_size < reference.FASHION_MNIST_TRAIN_SIZE:
            raise ValueError(f"--reference-size must be in [0, {reference.FASHION_MNIST_TRAIN_SIZE})")
        for flag in ("limit", "rows_per_shard"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        if self.synthetic and self.limit is not None and self.limit < 8:
            raise ValueError("--limit must be >= 8 with --synthetic")


def run(config: MakeDatasetConfig) -> None:
    """Build the dataset the config names and write it under ``config.out``."""
    start = time.perf_counter()
    if config.synthetic:
        dataset = reference.make_synthetic(n=config.limit or 256, seed=config.seed, noise=config.noise)
    else:
        dataset = reference.make_fashion_mnist(
            source=config.source,
            reference_size=config.reference_size,
            noise=config.noise,
            seed=config.seed,
            limit=config.limit,
        )
    reference.write_dataset(dataset, config.out, rows_per_shard=config.rows_per_shard)
    meta = dataset.metadata
    print(f"wrote {meta['name']} to {config.out} in {time.perf_counter() - start:.1f} s")
    print("  rows: " + ", ".join(f"{split} {n}" for split, n in meta["splits"].items()))
    asked, measured = meta["noise"], meta["noise_measured"]
    noise = ", ".join(f"{kind} {measured[kind]:.4f} (asked {rate:g})" for kind, rate in asked.items())
    print(f"  train noise: {noise or 'none'}")


def main(argv: list[str] | None = None) -> int:
    return run_job(MakeDatasetConfig, argv, run, doc=__doc__, prog="python -m jobs.make_dataset", check=_check_source)


def _check_source(config: MakeDatasetConfig) -> None:
    if not config.synthetic:
        reference.check_fashion_mnist(config.source)  # before the output folder exists


if __name__ == "__main__":
    sys.exit(main())
