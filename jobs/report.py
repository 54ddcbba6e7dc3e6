"""Write a report of training runs: report.md (+ report.html) and the PNG figures it links.

Every ``metrics.json`` with a ``config.json`` beside it under the RUN_DIRs is a
run (``python -m jobs.train`` writes both); runs are grouped by policy and,
with several RUN_DIRs (seeds, demo runs), labelled by RUN_DIR so they compare
on one page. The page shows final accuracy, per-epoch accuracy and kept
fraction, wall-clock, pruned samples by reason, the consistency histogram of
clean vs injected-noise rows (with its AUROC) and the reference CLIP model's
zero-shot accuracy.

Local (seconds; no Ray, no training)::

    python -m jobs.report runs/bench                      # writes runs/bench/report.md, runs/bench/figures/
    python -m jobs.report runs/seed0 runs/seed1 --out runs/compare

On a cluster (RUN_DIRs and --out may be object-store URLs)::

    ray job submit --working-dir . -- python -m jobs.report s3://bucket/bench --out s3://bucket/bench-report

Exit code 2 (with a message) when a RUN_DIR is not a folder or holds no runs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from pipeline import storage
from pipeline.cli import config_parser, option, parse_config


@dataclass(frozen=True)
class ReportOptions:
    """The report's flags (the RUN_DIRs are positional, see :class:`ReportConfig`)."""

    out: str | None = option(None, "folder for report.md and figures/ (default: the first RUN_DIR)")
    html: bool = option(True, "also write report.html (the same page, images linked by relative path)")
    # The benchmark's warm-up fit and its overhead fits are timing aids, not
    # results: counting them would add extra "full" runs to the comparison.
    exclude: tuple[str, ...] = option(("warmup", "overhead/*"), "run folders to leave out: globs relative to a RUN_DIR")
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)")


@dataclass(frozen=True)
class ReportConfig(ReportOptions):
    """Everything ``jobs.report`` does: the options plus the run folders."""

    run_dirs: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "run_dirs", tuple(self.run_dirs))
        if not self.run_dirs:
            raise ValueError("name at least one RUN_DIR")


def _parser():
    # config_parser makes one flag per field; the run folders are a variable-length positional, added here.
    parser = config_parser(ReportOptions, __doc__)
    parser.prog = "python -m jobs.report"
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="folder (or URL) holding training runs, searched recursively")
    return parser


def main(argv=None) -> int:
    from pipeline.report.page import build_report

    cfg = parse_config(ReportConfig, _parser(), argv)
    storage.configure_s3(cfg.s3_endpoint)
    try:
        summary = build_report(list(cfg.run_dirs), cfg.out or cfg.run_dirs[0], cfg.exclude, cfg.html)
    except (ValueError, storage.ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
