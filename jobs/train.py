"""Train an image model on Ray Train, pruning the data each epoch.

Local (Ray starts on this machine)::

    python -m jobs.train --data data/fmnist --scores runs/scores --policy mmdp \\
        --keep-ratio 0.5 --epochs 20 --workers 2 --seed 0 --out runs/mmdp

On a cluster::

    ray job submit --working-dir . -- python -m jobs.train \\
        --data s3://bucket/fmnist --scores s3://bucket/scores --out s3://bucket/runs/mmdp \\
        --workers 4 --use-gpu --cpus-per-worker 4

Writes ``OUT/metrics.json`` (per epoch: train loss, test accuracy, kept
fraction, samples forwarded, wall time; plus totals), ``OUT/config.json``,
``OUT/plans.json`` (per-epoch plan summary) and ``OUT/checkpoint/`` (model,
optimizer and pruner state; resume with ``--resume-from``).
"""

from __future__ import annotations

import json
import logging
import sys

from pipeline import io as mio
from pipeline.cli import config_json, config_parser, parse_config, setup_logging
from pipeline.trainer import TrainConfig

log = logging.getLogger("jobs.train")


def main(argv=None) -> int:
    parser = config_parser(TrainConfig, __doc__)
    cfg = parse_config(TrainConfig, parser, argv)
    setup_logging()
    mio.configure_s3(cfg.s3_endpoint)
    import ray

    from pipeline.trainer import fit

    log.info("config:\n%s", config_json(cfg))
    if not ray.is_initialized():
        ray.init()  # local Ray here; the cluster's under `ray job submit`
    try:
        metrics = fit(cfg)
    except (mio.ShardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics["totals"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
