"""GPU check: score synthetic image-text pairs with ViT-B-32 in half precision.

Writes ``--rows`` synthetic pairs (JPEG photos of random shapes, 256 px,
captions) as parquet shards, runs the Ray Data score job on them with one
scoring actor per GPU, and prints pairs/s with the card's name. Random
weights are fine for speed (no model hub needed); pass ``--pretrained`` for
real ones. Target on one GPU: >= 5,000 pairs/s.

On a machine with a CUDA GPU::

    python -m jobs.bench_gpu --rows 100000

On a cluster::

    ray job submit --working-dir . -- python -m jobs.bench_gpu --rows 100000 --max-actors 8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pipeline import io as mio
from pipeline.schema import SHARD_SCHEMA

DISTINCT_IMAGES = 512  # encoded once, reused under distinct keys: writing 100k JPEGs is not the point


def synthetic_shards(folder: str, rows: int, size: int = 256, rows_per_shard: int = 10_000) -> str:
    rng = np.random.default_rng(0)
    images = []
    for i in range(DISTINCT_IMAGES):
        im = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        x, y = rng.integers(0, size // 2, 2)
        draw.ellipse([x, y, x + size // 3, y + size // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    table = pa.table(
        {
            "key": [f"gpu-{i:08d}" for i in range(rows)],
            "image": [images[i % DISTINCT_IMAGES] for i in range(rows)],
            "caption": [f"a photo of shape number {i % 97}" for i in range(rows)],
            "label": pa.nulls(rows, pa.int64()),
        },
        schema=SHARD_SCHEMA,
    )
    mio.write_shards(table, folder, rows_per_shard=rows_per_shard)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="pairs to score (default: 100000)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model (default: ViT-B-32)")
    parser.add_argument("--pretrained", default=None, help="weights (default: random init)")
    parser.add_argument("--batch-size", type=int, default=512, help="rows per scoring batch (default: 512)")
    parser.add_argument("--max-actors", type=int, default=0, help="scoring actors (default: one per GPU)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke test of the script)")
    args = parser.parse_args(argv)

    import ray
    import torch

    from pipeline.run import ScoreConfig, score

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA GPU here; pass --allow-cpu for a smoke test", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        ray.init()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(os.path.join(tmp, "in"), args.rows)
        actors = args.max_actors or max(1, gpus)
        cfg = ScoreConfig(input=shards, output=os.path.join(tmp, "out"), model=args.model, pretrained=args.pretrained,
                          batch_size=args.batch_size, min_actors=actors, max_actors=actors)
        start = time.perf_counter()
        summary = score(cfg)
        seconds = time.perf_counter() - start
    result = {"card": card, "gpus": gpus, "model": args.model, "rows": summary["rows_in"],
              "scored": summary["scored"], "seconds": round(seconds, 2),
              "pairs_per_second": round(summary["rows_in"] / seconds, 1),
              "cpus": ray.cluster_resources().get("CPU")}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
