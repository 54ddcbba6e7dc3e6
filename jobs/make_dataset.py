"""Write a noisy benchmark dataset: Fashion-MNIST, your own labelled image-caption shards, or the tiny synthetic set.

Local (a folder or an object store)::

    python -m jobs.make_dataset --out data/fmnist-sym30 --noise symmetric:0.3 --seed 0
    python -m jobs.make_dataset --out data/fmnist-small --limit 2000 --reference-size 2000 --noise symmetric:0.2
    python -m jobs.make_dataset --out s3://bucket/fmnist-sym30 --noise symmetric:0.3 --s3-endpoint http://127.0.0.1:9000

On a Ray cluster (one process on the head node, which needs the source files:
the Debian package ``dataset-fashion-mnist``, or ``--source`` pointing at a folder or bucket)::

    ray job submit --working-dir . -- python -m jobs.make_dataset --out s3://bucket/fmnist-sym30 --noise symmetric:0.3

From labelled image-caption shards (parquet or webdataset tars, local or in
an object store; img2dataset's ``key``/``jpg``/``txt``/``cls`` with
``--columns img2dataset``), read through Ray Data in file order: a seeded
``--test-size`` rows become ``test``, ``--reference-size`` of the rest
``reference``, the remainder the noisy ``train`` pool; images stay as stored
and a noisy row gets another clean row's caption of the class it now names;
source rows without a usable image (img2dataset's failed downloads: null
``jpg``; bytes that are no image) are left out of every split, counted in the
log and in metadata.json's ``source_rows``::

    python -m jobs.make_dataset --source s3://bucket/my-shards --columns img2dataset --classes cat,dog,car \\
        --reference-size 2000 --test-size 2000 --noise symmetric:0.3 --out s3://bucket/my-sym30

Writes OUT/{reference,train,test}/part-*.parquet, OUT/ground_truth.parquet,
OUT/metadata.json and OUT/config.json (the resolved config, also logged),
then commits OUT (``_SUCCESS``). The dataset is built in one process's
memory (the whole 70k-image Fashion-MNIST takes a few seconds, and starts no
Ray workers): a benchmark-sized source, not a web-scale one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa

from pipeline import storage
from pipeline.cli import HELP, check_apart, check_shared_paths, connect_ray, option, run_job
from pipeline.data import reference
from pipeline.data.contract import READ_SCHEMA, ColumnMapping
from pipeline.data.noise import NOISE_KINDS, parse_noise_spec
from pipeline.data.shards import class_names, in_file_order, read_shards, shard_files


@dataclass(frozen=True)
class MakeDatasetConfig:
    """What to write; one field per command-line flag (``--reference-size`` for ``reference_size``)."""

    OUTPUT: ClassVar[str] = "out"
    # With --columns the source is read by Ray Data's tasks, on whichever node has a CPU (pipeline.cli.check_shared_paths).
    SHARED_PATHS: ClassVar[tuple[str, ...]] = ("source",)

    out: str = field(metadata={HELP: "dataset URL: a folder, file://, s3:// or gs://"})
    source: str | None = option(
        None, f"folder or URL with the four *-ubyte.gz files (none: {reference.FASHION_MNIST_DIR}), "
              "or with --columns image-caption shards")
    columns: str | None = option(
        None, "read --source as image-caption shards with this column mapping: mmdp, img2dataset, "
              "or pairs like image=jpg,caption=txt,label=cls; none: Fashion-MNIST idx files")
    classes: tuple[str, ...] | None = option(
        None, "with --columns: class names (label i is the i-th); default: the source's metadata.json")
    test_size: int = option(10_000, "with --columns: source rows held out as the clean test split")
    # A clean slice to pre-train the reference CLIP model on, disjoint from the
    # pool being pruned; 10k of 60k leaves the 50k pool the protocol draws from.
    reference_size: int = option(10_000, "clean training images kept apart for the reference model: the rows of "
                                         "the reference split (--limit does not cap it)")
    # Clean by default: noise is what an experiment asks for, e.g. "symmetric:0.2,caption:0.05".
    noise: str = option("none", f"kind:rate,... over the train split; kinds: {', '.join(NOISE_KINDS)}")
    seed: int = option(0, "seed for the split, noise and images")
    limit: int | None = option(None, "cap on rows in the train split and in the test split (with --synthetic: rows "
                                     "in total; none there: 256)")
    # ~2.5 MB of PNGs a shard: a handful of read tasks per split.
    rows_per_shard: int = option(5000, "rows per shard")
    shard_format: str = option("parquet", "shard files: parquet, or webdataset tars (KEY.png, KEY.txt, KEY.cls), "
                                          "which training reads sample by sample", choices=("parquet", "webdataset"))
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store; none: AWS_ENDPOINT_URL or AWS")
    synthetic: bool = option(False, "write the tiny synthetic test dataset instead of Fashion-MNIST")

    def __post_init__(self):
        # A ValueError here is a usage error: parse_config turns it into exit code 2.
        try:
            parse_noise_spec(self.noise)
        except ValueError as exc:
            raise ValueError(f"--noise: {exc}") from None
        if self.reference_size < 0:
            raise ValueError("--reference-size must be >= 0")
        # Fashion-MNIST's train file has 60k images and the pool needs one; image-caption shards are
        # checked against their row count once read (reference.build_from_rows).
        if self.columns is None and not self.synthetic and self.reference_size >= reference.FASHION_MNIST_TRAIN_SIZE:
            raise ValueError(f"--reference-size must be below {reference.FASHION_MNIST_TRAIN_SIZE} "
                             "(Fashion-MNIST's training images; the train split needs the rest)")
        for flag in ("limit", "rows_per_shard"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        if self.synthetic and self.limit is not None and self.limit < 8:
            raise ValueError("--limit must be >= 8 with --synthetic")
        if self.columns is not None:
            ColumnMapping.parse(self.columns)
            if self.synthetic or not self.source:
                raise ValueError("--columns reads image-caption shards from --source: give --source, not --synthetic")
        if self.test_size < 1:
            raise ValueError("--test-size must be >= 1")

    def check_inputs(self) -> None:
        """With ``--columns``, Ray started or joined, and a local ``--source`` refused where Ray's tasks would
        run on other nodes (a cluster's head has no CPUs): they would read their own disks there."""
        if self.columns is not None:
            connect_ray(dashboard=False)
            check_shared_paths(self)


def run(config: MakeDatasetConfig) -> None:
    """Build the dataset the config names and write it under ``config.out``."""
    start = time.perf_counter()
    if config.synthetic:
        dataset = reference.make_synthetic(n=config.limit or 256, seed=config.seed, noise=config.noise)
    elif config.columns is not None:
        dataset = reference.build_from_rows(
            read_rows(config.source, config.columns), tuple(class_names(config.source, config.classes)),
            reference_size=config.reference_size, test_size=config.test_size, noise=config.noise,
            seed=config.seed, limit=config.limit, source=config.source)
    else:
        dataset = reference.make_fashion_mnist(
            source=config.source,
            reference_size=config.reference_size,
            noise=config.noise,
            seed=config.seed,
            limit=config.limit,
        )
    reference.write_dataset(dataset, config.out, rows_per_shard=config.rows_per_shard,
                            shard_format=config.shard_format)
    meta = dataset.metadata
    print(f"wrote {meta['name']} to {config.out} in {time.perf_counter() - start:.1f} s")
    print("  rows: " + ", ".join(f"{split} {n}" for split, n in meta["splits"].items()))
    asked, measured = meta["noise"], meta["noise_measured"]
    noise = ", ".join(f"{kind} {measured[kind]:.4f} (asked {rate:g})" for kind, rate in asked.items())
    print(f"  train noise: {noise or 'none'}")
    if "source_rows" in meta:
        read = meta["source_rows"]
        left_out = reference.describe_left_out(read["left_out"])
        print(f"  source rows: {read['read']} read, {read['used']} used; left out without a usable image: {left_out}")


def read_rows(source: str, columns: str) -> pa.Table:
    """Every row of the shards at ``source`` in the contract, in file order (so the dataset depends on the seed
    only), with :data:`~pipeline.data.contract.BAD_LABEL` (a label's text where it is not an integer).

    Raises:
        ValueError: the shards hold no row.
    """
    with in_file_order():
        batches = read_shards(source, columns).iter_batches(batch_size=4096, batch_format="pyarrow")
        tables = [b.select(list(READ_SCHEMA.names)).cast(READ_SCHEMA) for b in batches]
    if not sum(t.num_rows for t in tables):
        raise ValueError(f"--source {source}: its shards hold no rows: nothing to build a dataset from")
    return pa.concat_tables(tables)


def main(argv: list[str] | None = None) -> int:
    return run_job(MakeDatasetConfig, argv, run, doc=__doc__, prog="python -m jobs.make_dataset", check=_check_source)


def _check_source(config: MakeDatasetConfig) -> None:
    if config.source:
        check_apart("out", config.out, "source", config.source)
    if config.columns is not None:
        storage.check_not_pending(config.source)
        shard_files(config.source, ColumnMapping.parse(config.columns))  # bad files fail before OUT exists
    elif not config.synthetic:
        reference.check_fashion_mnist(config.source)  # before the output folder exists


if __name__ == "__main__":
    sys.exit(main())
