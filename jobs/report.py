"""Write a report of training runs: report.md (+ report.html) and the PNG figures it links.

Every ``metrics.json`` with a ``config.json`` beside it under the RUN_DIRs is a
run (``python -m jobs.train`` writes both); runs are grouped by policy and,
with several RUN_DIRs (seeds, demo runs), labelled by RUN_DIR so they compare
on one page. Runs compare only within one experiment: the same dataset (apart
from its seed and noise), task, epochs, model, training settings and score
mode. Runs of several experiments (the demo's and a step-by-step run under one
RUN_DIR) are tagged E1, E2, ... in their groups' names, each policy measured
against its own experiment's ``full``, and the page lists what differs. A run
folder not committed (``_PENDING``: its job still running, or stopped) or
without its metrics.json is left out, and named under "Left out". The page
shows final accuracy, per-epoch accuracy and kept fraction, wall-clock, pruned
samples by reason, the consistency histogram of clean vs injected-noise rows
(with its AUROC), where the estimated-noise cut falls by label (labels from
the dataset's ground truth or parquet train split) and the reference CLIP
model's zero-shot accuracy.

Local (seconds; no Ray, no training)::

    python -m jobs.report runs/bench                      # writes runs/bench/report/report.md and figures/
    python -m jobs.report runs/seed0 runs/seed1 --out runs/compare

On a cluster (RUN_DIRs and --out may be object-store URLs)::

    ray job submit --working-dir . -- python -m jobs.report s3://bucket/bench --out s3://bucket/bench-report

Exit code 2 (with a message) when a RUN_DIR is not a folder, when none holds a finished run, or when
--out holds another job's output.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

from pipeline import storage
from pipeline.cli import option, run_job


@dataclass(frozen=True)
class ReportConfig:
    """What ``jobs.report`` does: the run folders (positional) and the options."""

    OUTPUT: ClassVar[str] = "out"

    run_dirs: tuple[str, ...] = field(metadata={"help": "folders (or URLs) holding training runs, searched recursively"})
    out: str | None = option(None, "output folder: report.md, report.html, figures/ (default: RUN_DIR/report, the first RUN_DIR)")
    html: bool = option(True, "also write report.html (the same page, images linked by relative path)")
    # The benchmark's warm-up fit and its overhead fits are timing aids, not
    # results: counting them would add extra "full" runs to the comparison.
    exclude: tuple[str, ...] = option(("warmup", "overhead/*"), "run folders to leave out: globs matched against a "
                                                                 "folder's path relative to a RUN_DIR, or its end at "
                                                                 "any depth (warmup leaves out bench/warmup too)")
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)")

    def __post_init__(self):
        object.__setattr__(self, "run_dirs", tuple(self.run_dirs))
        if not self.run_dirs:
            raise ValueError("name at least one RUN_DIR")
        if self.out is None:
            object.__setattr__(self, "out", storage.join(self.run_dirs[0], "report"))

    def check_inputs(self) -> None:
        """Refuse RUN_DIRs that hold no finished run, before --out is touched (an earlier report there stays
        as it was), saying what they hold instead."""
        from pipeline.report.runs import find_run_folders

        found = [find_run_folders(root, self.exclude) for root in self.run_dirs]
        if any(runs for runs, _, _ in found):
            return
        unfinished = [why for _, _, left in found for why in left.values()]
        held = [f"{unfinished.count(why)} {what}" for why, what in (
            ("pending", "not committed (still running, or stopped)"), ("no metrics", "without metrics.json"))
            if why in unfinished]
        excluded = sum(len(excluded) for _, excluded, _ in found)
        held += [f"{excluded} left out by --exclude"] if excluded else []
        raise ValueError(f"no finished training run (metrics.json next to config.json) under "
                         f"{', '.join(self.run_dirs)}" + (f": folders {'; '.join(held)}" if held else ""))


def build(cfg: ReportConfig) -> dict:
    from pipeline.report.page import build_report

    return build_report(list(cfg.run_dirs), cfg.out, cfg.exclude, cfg.html)


def _check_run_dirs(cfg: ReportConfig) -> None:
    missing = [d for d in cfg.run_dirs if not storage.exists(d)]
    if missing:
        raise ValueError(f"{', '.join(missing)}: no such folder")
    files = [d for d in cfg.run_dirs if not storage.is_folder(d)]
    if files:
        raise ValueError(f"{', '.join(files)}: a file, not a folder; name the folder that holds the runs")


def main(argv=None) -> int:
    return run_job(ReportConfig, argv, build, doc=__doc__, prog="python -m jobs.report", positional=("run_dirs",),
                   check=_check_run_dirs)


if __name__ == "__main__":
    sys.exit(main())
