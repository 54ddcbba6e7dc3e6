"""The README's first command, ``jobs.demo``, end to end at a small size: every stage, the report, reuse."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from jobs import demo
from pipeline import storage
from pipeline.cli import config_parser, parse_config

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


def _finish_stages(cfg: demo.DemoConfig) -> None:
    """Every stage of ``cfg`` as its job leaves its output, the work aside: the config its argv parses to,
    saved as ``config.json`` in the committed folder (what :func:`pipeline.cli.execute` does)."""
    from jobs.make_dataset import MakeDatasetConfig
    from jobs.pretrain_reference_clip import PretrainConfig
    from pipeline.score.job import ScoreConfig
    from pipeline.train.config import TrainConfig

    configs = {"jobs.make_dataset": MakeDatasetConfig, "jobs.pretrain_reference_clip": PretrainConfig,
               "jobs.score": ScoreConfig, "jobs.train": TrainConfig}
    for _, _, job, argv, output in demo.stages(cfg):
        if output is not None:
            config_cls = configs[job.__name__]
            job_cfg = parse_config(config_cls, config_parser(config_cls, ""), argv)
            with storage.output(output):
                storage.write_json(dataclasses.asdict(job_cfg), storage.join(output, "config.json"))


def test_a_finished_stage_is_reused_only_with_the_flags_that_built_it(tmp_path):
    out = str(tmp_path / "demo")
    _finish_stages(demo.DemoConfig(out=out))
    # The same flags, and one policy more: every finished stage is reused, the new policy's run is not.
    more = demo.DemoConfig(out=out, policies=("full", "mmdp", "infobatch"))
    decided = {output: demo.reusable(argv, output, more) for _, _, _, argv, output in demo.stages(more)}
    assert [o for o, reused in decided.items() if not reused] == [f"{out}/runs/infobatch", None]  # + the report
    # The folder moved (the paths the stages saved are the old ones): still the same stages.
    moved = str(tmp_path / "moved")
    (tmp_path / "demo").rename(moved)
    cfg = demo.DemoConfig(out=moved)
    assert all(demo.reusable(argv, output, cfg) for _, _, _, argv, output in demo.stages(cfg) if output)
    # Other settings: the first finished stage they would change is refused, naming the flag.
    for changed, says in (({"seed": 1}, "--seed 0 (this run: 1)"),
                          ({"noise": "pairflip:0.3"}, "--noise symmetric:0.3 (this run: pairflip:0.3)"),
                          ({"clip_epochs": 2}, "--epochs 16 (this run: 2)"),
                          ({"epochs": 4}, "--epochs 16 (this run: 4)"),
                          ({"keep_ratio": 0.3}, "--keep-ratio 0.6 (this run: 0.3)"),
                          ({"source": "s3://bucket/fmnist"},
                           "--source /usr/share/datasets/fashion-mnist (this run: s3://bucket/fmnist)")):
        cfg = demo.DemoConfig(out=moved, **changed)
        with pytest.raises(ValueError, match="another --out") as exc:
            for _, _, _, argv, output in demo.stages(cfg):
                demo.reusable(argv, output, cfg)
        assert says in str(exc.value), (changed, str(exc.value))
    # --no-reuse redoes every stage, as it says.
    cfg = demo.DemoConfig(out=moved, seed=1, reuse=False)
    assert not any(demo.reusable(argv, output, cfg) for _, _, _, argv, output in demo.stages(cfg))


def test_stages_after_one_built_again_are_built_again_and_an_unnamed_source_is_the_default(tmp_path):
    """Each stage was judged alone: with the dataset built again (its folder left pending by a stopped demo),
    the reference CLIP, the scores and the runs made from the old one were reused beside the new ground truth.
    A dataset built with --source left off (as every demo before this one built it) stands for the default
    folder, named or not; a policy named twice is trained once."""
    out = str(tmp_path / "demo")
    cfg = demo.DemoConfig(out=out)
    _finish_stages(cfg)
    assert demo.reuse_plan(demo.stages(cfg), cfg) == [True] * 5 + [False]  # all but the report
    storage.begin_output(f"{out}/data")  # stopped while writing it again
    assert demo.reuse_plan(demo.stages(cfg), cfg) == [False] * 6
    # The dataset's config.json as an earlier demo wrote it, without --source: the default folder's.
    _finish_stages(cfg)
    config = storage.read_json(f"{out}/data/config.json")
    with storage.output(f"{out}/data"):
        storage.write_json({**config, "source": None}, f"{out}/data/config.json")
    for named in (None, "/usr/share/datasets/fashion-mnist"):
        named_cfg = demo.DemoConfig(out=out, source=named)
        assert demo.reuse_plan(demo.stages(named_cfg), named_cfg)[:5] == [True] * 5
    assert demo.DemoConfig(out=out, policies=("full", "mmdp", "full")).policies == ("full", "mmdp")


def test_the_data_stage_reads_source_and_holds_reference_rows_whatever_train_rows(tmp_path):
    from pipeline.data import reference

    source = tmp_path / "fmnist"  # Fashion-MNIST somewhere else than the Debian package's folder
    source.mkdir()
    for name in (n for pair in reference.FASHION_MNIST_FILES.values() for n in pair):
        (source / name).symlink_to(f"{reference.FASHION_MNIST_DIR}/{name}")
    cfg = demo.DemoConfig(out=str(tmp_path / "demo"), source=str(source), train_rows=100, reference_rows=300)
    stage, _, job, argv, output = demo.stages(cfg)[0]
    assert stage == "data" and argv[argv.index("--source") + 1] == str(source)
    assert job.main(argv) == 0
    meta = storage.read_json(storage.join(output, "metadata.json"))
    assert meta["source"] == str(source)
    assert meta["splits"] == {"reference": 300, "train": 100, "test": 100}  # --reference-rows, not --train-rows


def test_a_demo_with_other_flags_on_a_finished_folder_is_a_usage_error_that_leaves_it_as_it_was(tmp_path, capsys):
    out = str(tmp_path / "demo")
    _finish_stages(demo.DemoConfig(out=out))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", out, "--seed", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--seed 0 (this run: 1)" in err and "another --out" in err, err
    assert "Traceback" not in err
    # Refused before the demo marked its folder pending: nothing written, nothing removed.
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_trajectory_is_refused_up_front_since_the_demo_has_no_reference_keys(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(demo.DemoConfig, config_parser(demo.DemoConfig, ""),
                     ["--out", "unused", "--policies", "full,trajectory"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "trajectory needs the keys of known-clean pool rows" in err
    assert "jobs.train" in err and "--reference-keys" in err


def test_a_keep_ratio_outside_zero_to_one_is_refused_before_any_stage(capsys):
    """The first training stage refused it, after the dataset, the reference CLIP and the scores were built."""
    for ratio in ("0", "1.5", "-0.2"):
        with pytest.raises(SystemExit) as exc:
            parse_config(demo.DemoConfig, config_parser(demo.DemoConfig, ""), ["--out", "unused", "--keep-ratio", ratio])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--keep-ratio must be in (0, 1], got {float(ratio)}" in err, err
    cfg = parse_config(demo.DemoConfig, config_parser(demo.DemoConfig, ""), ["--out", "unused", "--keep-ratio", "1"])
    assert cfg.keep_ratio == 1.0
