"""GPU check: score synthetic image-text pairs with ViT-B-32 in half precision.

Writes ``--rows`` synthetic pairs (256 px JPEGs of random noise with a
shape drawn on each, about 54 KB: PIL decodes and resizes them within 10%
of the rate of real 256 px photos; and captions) as parquet shards, runs the
Ray Data score job on them with one scoring actor per GPU (``--actors-per-gpu``
for more), and prints pairs/s
with the card's name: over the whole job, and once the first batch is scored
(the rate a longer job settles at). Random weights are fine for speed (no
model hub needed); pass ``--pretrained`` for real ones. Target on one GPU:
>= 5,000 pairs/s.

On a machine with a CUDA GPU::

    python -m benchmarks.gpu --rows 100000

Whether a bounded budget of blocks in flight holds a GPU back (the score
job bounds it without GPUs only): the same with ``--in-flight-gib 0.5``.

On a cluster it measures the GPUs of the node it runs on and any that can
read that node's disk: the driver checks for CUDA itself and writes the
shards to its local temp folder (so, e.g., a one-node GPU cluster)::

    ray job submit --working-dir . -- python -m benchmarks.gpu --rows 100000 --max-actors 8

What bounds that rate: ``--parts`` times each part of a scoring actor's
work alone, in one process without Ray, on one batch already in memory
(PIL decoding on one core, decoding on the GPU, the scorer, decoding and
scoring in turn as the actor does them, the header checks that the CPU
tasks make for the actors, and the actor's host side: the Arrow block as
the decoder's batch, each marked file's tensor), and how far the GPU
decoder's pixels are from PIL's::

    python -m benchmarks.gpu --parts --batch-size 1024

Prints the result as JSON, with the resolved config (also logged) under
``config``. Without a GPU it exits with code 2 unless ``--allow-cpu``.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pipeline import storage
from pipeline.cli import connect_ray, option, run_job
from pipeline.data.contract import SHARD_SCHEMA

DISTINCT_IMAGES = 512  # encoded once, reused under distinct keys: writing 100k JPEGs is not the point


@dataclass(frozen=True)
class BenchGpuConfig:
    """The check's knobs; one field per command-line flag."""

    rows: int = option(100_000, "pairs to score")
    model: str = option("ViT-B-32", "open_clip model")
    pretrained: str | None = option(None, "weights; none: random init (fine for speed)")
    batch_size: int = option(512, "rows per scoring batch")
    max_actors: int = option(0, "scoring actors; 0: --actors-per-gpu per GPU")
    actors_per_gpu: int = option(1, "scoring actors sharing each GPU (the score job's --actors-per-gpu)")
    decode: str = option("auto", "where images are decoded (the score job's --decode)", choices=("auto", "tasks", "actors"))
    in_flight_gib: float | None = option(None, "the score job's --in-flight-gib; none: its default (on GPUs, Ray "
                                         "Data's own budget)")
    allow_cpu: bool = option(False, "run without a GPU (a smoke test of the script)")
    parts: bool = option(False, "time the parts alone instead, in this process without Ray: PIL decoding on one "
                                "core, decoding on the device, the scorer, decoding + scoring as an actor does")

    def __post_init__(self):
        if self.rows < 1 or self.batch_size < 1 or self.max_actors < 0 or self.actors_per_gpu < 1:
            raise ValueError("need --rows >= 1, --batch-size >= 1, --max-actors >= 0 and --actors-per-gpu >= 1")


def synthetic_table(rows: int, size: int = 256) -> pa.Table:
    """``rows`` pairs in the shard schema: 256 px JPEGs of noise with a shape (``DISTINCT_IMAGES`` of them, reused)."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(min(rows, DISTINCT_IMAGES)):
        im = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        x, y = rng.integers(0, size // 2, 2)
        draw.ellipse([x, y, x + size // 3, y + size // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    return pa.table(
        {
            "key": [f"gpu-{i:08d}" for i in range(rows)],
            "image": [images[i % len(images)] for i in range(rows)],
            "caption": [f"a photo of shape number {i % 97}" for i in range(rows)],
            "label": pa.nulls(rows, pa.int64()),
        },
        schema=SHARD_SCHEMA,
    )


def synthetic_shards(folder: str, rows: int, size: int = 256, rows_per_shard: int = 10_000) -> str:
    storage.write_shards(synthetic_table(rows, size), folder, rows_per_shard=rows_per_shard)
    return folder


def main(argv=None) -> int:
    return run_job(BenchGpuConfig, argv, run, doc=__doc__, prog="python -m benchmarks.gpu")


def run(cfg: BenchGpuConfig) -> dict:
    """Score ``cfg.rows`` synthetic pairs with the Ray Data score job; its pairs/s and the card's name."""
    import ray
    import torch

    from pipeline.score.job import ScoreConfig, score

    if not torch.cuda.is_available() and not cfg.allow_cpu:
        raise ValueError("no CUDA GPU here; pass --allow-cpu for a smoke test")
    if cfg.parts:
        return run_parts(cfg)
    connect_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(os.path.join(tmp, "in"), cfg.rows)
        actors = cfg.max_actors or max(1, gpus) * cfg.actors_per_gpu
        score_cfg = ScoreConfig(input=shards, output=os.path.join(tmp, "out"), model=cfg.model,
                                pretrained=cfg.pretrained, batch_size=cfg.batch_size, min_actors=actors,
                                max_actors=actors, decode=cfg.decode, actors_per_gpu=cfg.actors_per_gpu,
                                in_flight_gib=cfg.in_flight_gib)
        start = time.perf_counter()
        summary = score(score_cfg)
        seconds = time.perf_counter() - start
    return {"card": card, "gpus": gpus, "actors": actors, "model": cfg.model, "rows": summary["rows_in"],
            "scored": summary["scored"], "seconds": round(seconds, 2),
            "pairs_per_second": round(summary["rows_in"] / seconds, 1),
            # Once the first batch is scored (the actors are up and the pipeline full): the rate a longer job runs at.
            "first_row_seconds": summary["first_row_seconds"],
            "steady_pairs_per_second": round(summary["rows_in"] / (summary["scoring_seconds"] - summary["first_row_seconds"]), 1),
            "cpus": ray.cluster_resources().get("CPU"), "config": asdict(cfg)}


def run_parts(cfg: BenchGpuConfig, repeats: int = 5) -> dict:
    """Each part of a scoring actor's work alone, on batches already in memory: what bounds the job."""
    import torch

    from pipeline.score.job import decoder_batch
    from pipeline.score.scorer import DEVICE_JPEG, ClipScorer, ImageDecoder, TensorImageDecoder, tokenize_captions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = synthetic_table(cfg.batch_size)
    batch = tokenize_captions({k: np.asarray(table.column(k).to_pylist(), dtype=object)
                               for k in ("key", "image", "caption")}, cfg.model)
    pil, on_device = ImageDecoder(cfg.model, cfg.pretrained, pixel_dtype="uint8"), TensorImageDecoder(cfg.model, cfg.pretrained, device)
    scorer = ClipScorer(cfg.model, cfg.pretrained, device=device, num_threads=1)

    def host_side(block: pa.Table) -> None:
        # What a GPU scoring actor does on its CPU before its device gets a batch: the block as the
        # decoder takes it (the job's own conversion), the marked files as tensors.
        on_device.device_inputs(decoder_batch(block), range(block.num_rows))

    def per_second(fn, arg) -> float:
        fn(arg)  # warm-up: kernels, allocator, caches
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(repeats):
            fn(arg)
        if device == "cuda":
            torch.cuda.synchronize()
        return round(repeats * len(arg["key"]) / (time.perf_counter() - began), 1)  # a batch or a block

    marked_block = table.append_column(DEVICE_JPEG, pa.array(on_device.mark(batch)[DEVICE_JPEG]))  # as the CPU tasks send it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # PIL decodes on one core; torch's CPU work in the actor gets its one CPU
    try:
        decoded = on_device(batch)

        def differences(decoder: ImageDecoder) -> torch.Tensor:
            return (decoded["pixels"].int() - torch.from_numpy(decoder(batch)["pixels"]).to(device).int()).abs().float()

        full_size = differences(on_device.pil)  # PIL at full size: the device decoder's own fallback
        result = {
            "pil_decode_images_per_second_one_core": per_second(pil, batch),
            "device_decode_images_per_second": per_second(on_device, batch),
            "scorer_pairs_per_second": per_second(scorer, decoded),
            "decode_and_score_pairs_per_second": per_second(lambda b: scorer(on_device(b)), batch),
            # The headers, read in the CPU tasks (one core each) before the actors, as the job reads them.
            "header_checks_rows_per_second_one_core": per_second(on_device.mark, batch),
            "actor_host_side_rows_per_second": per_second(host_side, marked_block),
            # The device decoder's pixels against PIL's decoding at full size (resampling arithmetic, and
            # nvJPEG's IDCT on a GPU), and against what --decode tasks gives (PIL, with JPEG draft mode).
            "pixel_difference_mean": round(float(full_size.mean()), 3),
            "pixel_difference_max": int(full_size.max()),
            "pixel_difference_mean_vs_tasks": round(float(differences(pil).mean()), 3),
        }
    finally:
        torch.set_num_threads(threads)
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return {"card": card, "model": cfg.model, "batch_size": cfg.batch_size, "repeats": repeats,
            "jpeg_kb": round(float(np.mean([len(b) for b in batch["image"]])) / 1024, 1), **result,
            "config": asdict(cfg)}


if __name__ == "__main__":
    sys.exit(main())
