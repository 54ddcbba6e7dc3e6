"""Score every image-text pair for cross-modal consistency with an open_clip model.

Local (Ray starts on this machine)::

    python -m jobs.score --input data/fmnist/train --output runs/scores \\
        --model mmdp-ref --pretrained runs/ref-clip/model.pt

On a cluster (GPU actors are used when the cluster has GPUs)::

    ray job submit --working-dir . -- python -m jobs.score \\
        --input s3://bucket/laion/shards --output s3://bucket/laion/scores \\
        --model ViT-B-32 --pretrained laion2b_s34b_b79k --columns img2dataset --max-actors 8

Writes ``OUTPUT/scores/`` (key, index, clip_score, clip_margin, status, error),
``OUTPUT/rejects/`` (key, reason) and ``OUTPUT/summary.json``; every
input row is in exactly one of scored or rejected.
"""

from __future__ import annotations

import sys

from pipeline.cli import run_job


def main(argv=None) -> int:
    from pipeline.score.job import ScoreConfig, score

    return run_job(ScoreConfig, argv, score, doc=__doc__, prog="python -m jobs.score")


if __name__ == "__main__":
    sys.exit(main())
