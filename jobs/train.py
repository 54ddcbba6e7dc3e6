"""Train an image model on Ray Train, pruning the data each epoch.

Local (Ray starts on this machine)::

    python -m jobs.train --data data/fmnist --scores runs/scores --policy mmdp \\
        --keep-ratio 0.6 --epochs 20 --workers 2 --seed 0 --out runs/mmdp

On a cluster::

    ray job submit --working-dir . -- python -m jobs.train \\
        --data s3://bucket/fmnist --scores s3://bucket/scores --out s3://bucket/runs/mmdp \\
        --workers 4 --use-gpu --cpus-per-worker 4

Writes ``OUT/metrics.json`` (per epoch: train loss, test accuracy, the
plan's kept count, samples forwarded, wall time; plus totals),
``OUT/config.json``, ``OUT/plans.json`` (per-epoch plan summary),
``OUT/checkpoint/`` (model and optimizer state, and which pruner state goes
with them, once the run ends; until then Ray Train keeps the latest two in
``OUT/ray/``) and ``OUT/pruner/`` (the pruner states the checkpoints name:
copy the run folder whole to resume elsewhere). ``--resume-from OUT``
continues a run from its latest whole checkpoint, one that was stopped or
killed before its end included.
"""

from __future__ import annotations

import sys

from pipeline.cli import run_job


def main(argv=None) -> int:
    from pipeline.train.config import TrainConfig

    return run_job(TrainConfig, argv, _fit, doc=__doc__, prog="python -m jobs.train")


def _fit(cfg) -> dict:
    from pipeline.train.driver import fit  # Ray Train and torch: imported once the flags are good

    return fit(cfg)["totals"]


if __name__ == "__main__":
    sys.exit(main())
