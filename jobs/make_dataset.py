"""Write the reference dataset: Fashion-MNIST with injected noise (or the tiny synthetic set).

Local (a folder or an object store):

    python -m jobs.make_dataset --out data/fmnist-sym30 --noise symmetric:0.3 --seed 0
    python -m jobs.make_dataset --out data/fmnist-small --limit 2000 --noise symmetric:0.2,caption:0.05
    python -m jobs.make_dataset --out s3://bucket/fmnist-sym30 --noise symmetric:0.3 --s3-endpoint http://127.0.0.1:9000

On a Ray cluster (one process on the head node, which needs the source files:
the Debian package ``dataset-fashion-mnist``, or ``--source`` pointing at a folder or bucket):

    ray job submit --working-dir . -- python -m jobs.make_dataset --out s3://bucket/fmnist-sym30 --noise symmetric:0.3

Writes OUT/{reference,train,test}/part-*.parquet, OUT/ground_truth.parquet,
OUT/config.json and, last, OUT/metadata.json. The whole 70k-image dataset
takes a few seconds in one process, so this job starts no Ray workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

from pipeline import datasets, io


@dataclass(frozen=True)
class MakeDatasetConfig:
    """What to write; one field per command-line flag."""

    out: str
    source: str | None = None  # None: the Debian package folder /usr/share/datasets/fashion-mnist
    # A clean slice to pre-train the reference CLIP model on, disjoint from the
    # pool being pruned; 10k of 60k leaves the 50k pool the protocol draws from.
    reference_size: int = 10_000
    noise: str = "none"  # e.g. "symmetric:0.3" or "symmetric:0.2,caption:0.05"; clean by default
    seed: int = 0
    limit: int | None = None  # cap every split (Fashion-MNIST); rows in total for --synthetic (default 256)
    rows_per_shard: int = 5000  # ~2.5 MB of PNGs a shard: a handful of read tasks per split
    s3_endpoint: str | None = None  # S3-compatible store (MinIO, a loopback test server)
    synthetic: bool = False  # the tiny synthetic dataset for tests instead of Fashion-MNIST


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.make_dataset",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = MakeDatasetConfig(out="")
    parser.add_argument("--out", required=True, help="dataset URL: a folder, file://, s3:// or gs://")
    parser.add_argument("--source", default=defaults.source,
                        help=f"folder or URL with the four *-ubyte.gz files; unset: {datasets.FASHION_MNIST_DIR}")
    parser.add_argument("--reference-size", type=int, default=defaults.reference_size,
                        help="clean training images kept apart for the reference model")
    parser.add_argument("--noise", default=defaults.noise,
                        help=f"kind:rate,... over the train split; kinds: {', '.join(datasets.NOISE_KINDS)}")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for the split, noise and images")
    parser.add_argument("--limit", type=int, default=defaults.limit,
                        help="cap on rows per split (with --synthetic: rows in total, default 256)")
    parser.add_argument("--rows-per-shard", type=int, default=defaults.rows_per_shard, help="rows per parquet shard")
    parser.add_argument("--s3-endpoint", default=defaults.s3_endpoint, help="S3-compatible endpoint URL")
    parser.add_argument("--synthetic", action="store_true", help="write the tiny synthetic test dataset instead")
    return parser


def parse_config(argv: list[str] | None = None) -> MakeDatasetConfig:
    """Parse flags into a config; bad values exit with code 2 and a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        datasets.parse_noise_spec(args.noise)
    except ValueError as exc:
        parser.error(f"--noise: {exc}")
    if not 0 <= args.reference_size < datasets.FASHION_MNIST_TRAIN_SIZE:
        parser.error(f"--reference-size must be in [0, {datasets.FASHION_MNIST_TRAIN_SIZE})")
    for flag in ("limit", "rows_per_shard"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.synthetic and args.limit is not None and args.limit < 8:
        parser.error("--limit must be >= 8 with --synthetic")
    return MakeDatasetConfig(**vars(args))


def run(config: MakeDatasetConfig) -> datasets.Dataset:
    """Build the dataset the config names and write it under ``config.out``."""
    io.configure_s3(config.s3_endpoint)
    if config.synthetic:
        dataset = datasets.make_synthetic(n=config.limit or 256, seed=config.seed, noise=config.noise)
    else:
        dataset = datasets.make_fashion_mnist(
            source=config.source,
            reference_size=config.reference_size,
            noise=config.noise,
            seed=config.seed,
            limit=config.limit,
        )
    io.write_json(asdict(config), io.join(config.out, "config.json"))
    datasets.write_dataset(dataset, config.out, rows_per_shard=config.rows_per_shard)
    return dataset


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    print(f"make_dataset config: {json.dumps(asdict(config), sort_keys=True)}", flush=True)
    start = time.perf_counter()
    try:
        dataset = run(config)
    except datasets.MissingSourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = dataset.metadata
    print(f"wrote {meta['name']} to {config.out} in {time.perf_counter() - start:.1f} s")
    print("  rows: " + ", ".join(f"{split} {n}" for split, n in meta["splits"].items()))
    asked, measured = meta["noise"], meta["noise_measured"]
    noise = ", ".join(f"{kind} {measured[kind]:.4f} (asked {rate:g})" for kind, rate in asked.items())
    print(f"  train noise: {noise or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
