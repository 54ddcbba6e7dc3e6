"""The README's first command, ``jobs.demo``, end to end at a small size: every stage, the report, reuse."""

from __future__ import annotations

import logging
import re

from jobs import demo
from pipeline import storage

ARGS = ["--train-rows", "300", "--reference-rows", "200", "--clip-epochs", "1", "--epochs", "2", "--workers", "2"]


def test_demo_runs_every_stage_and_reports_what_it_measured(ray_session, tmp_path, caplog):
    out = str(tmp_path / "demo")
    assert demo.main(["--out", out, *ARGS]) == 0
    for stage in ("data", "clip", "scores", "runs/full", "runs/mmdp", "report", ""):
        assert storage.is_complete(storage.join(out, stage)), stage  # every output committed, the demo's too
    text = open(f"{out}/report/report.md").read()
    # The final figures: one row per policy, with accuracy, wall-clock and samples forwarded.
    rows = [line for line in text.splitlines() if re.match(r"\| (full|mmdp) \| 1 \|", line)]
    assert len(rows) == 2
    # mmdp against full, in words: points, speed-up, compute.
    assert re.search(r"mmdp: [+-]\d+\.\d\d points against full at a speed-up of [\d.]+x on training time", text)
    figures = set(re.findall(r"\(figures/([\w-]+\.png)\)", text))
    assert {"accuracy.png", "kept.png", "wall.png"} <= figures and len(figures) >= 4  # + the consistency histogram
    for name in figures:
        assert (tmp_path / "demo" / "report" / "figures" / name).stat().st_size > 1000
    assert "zero-shot test accuracy" in text and "AUROC" in text
    assert "Left out" not in text  # the reference CLIP's pre-training folder is not a training run left out
    # A second run reuses every finished stage and trains nothing again.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmdp"):
        assert demo.main(["--out", out, *ARGS]) == 0
    reused = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    assert len(reused) == 5  # data, clip, scores and both runs; the report is written again


def test_time_left_comes_from_the_pace_measured_here_and_only_then():
    cfg = demo.DemoConfig(out="unused", train_rows=1000, epochs=4)
    kinds = ["train", "train", "report"]
    assert demo.time_left(kinds, {}, cfg) is None  # no training measured yet: no guess
    # One training run took 20 s for 1000 rows x 4 epochs: the next one takes 20 s; the report has no work units.
    assert demo.time_left(kinds[1:], {"train": 20 / 4000}, cfg) == 20.0
    assert demo.time_left(["report"], {}, cfg) == 0.0
