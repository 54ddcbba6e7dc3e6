"""Score every image-text pair for cross-modal consistency with an open_clip model.

Local (Ray starts on this machine)::

    python -m jobs.score --input data/fmnist/train --output runs/scores \\
        --model mmdp-ref --pretrained runs/ref-clip/model.pt

On a cluster (GPU actors are used when the cluster has GPUs)::

    ray job submit --working-dir . -- python -m jobs.score \\
        --input s3://bucket/laion/shards --output s3://bucket/laion/scores \\
        --model ViT-B-32 --pretrained laion2b_s34b_b79k --columns img2dataset --max-actors 8

Writes ``OUTPUT/scores/`` (key, index, clip_score, clip_margin, status, error),
``OUTPUT/rejects.parquet`` (key, reason) and ``OUTPUT/summary.json``; every
input row is in exactly one of scored or rejected.
"""

from __future__ import annotations

import json
import logging
import sys

from pipeline import io as mio
from pipeline.cli import config_json, config_parser, parse_config, setup_logging
from pipeline.run import ScoreConfig

log = logging.getLogger("jobs.score")


def main(argv=None) -> int:
    parser = config_parser(ScoreConfig, __doc__)
    cfg = parse_config(ScoreConfig, parser, argv)
    setup_logging()
    mio.configure_s3(cfg.s3_endpoint)
    import ray

    from pipeline.run import score

    log.info("config:\n%s", config_json(cfg))
    if not ray.is_initialized():
        ray.init()  # local Ray here; the cluster's under `ray job submit`
    try:
        summary = score(cfg)
    except (mio.ShardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
