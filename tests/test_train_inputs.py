"""What the train job refuses to train or evaluate on, and says so: rows without a usable class label or image
(``--task classify``), and a consistency signal the scores do not hold."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest

from jobs import score as score_job
from jobs import train as train_job
from pipeline import storage
from pipeline.data.reference import make_synthetic, write_dataset
from pipeline.train.pruning import Pruning, load_index
from pipeline.train import stages  # its test_* stages by the module: pytest would collect them

NULL_KEY = "train-000007"  # the train row written with no label


def _with_label(table: pa.Table, row: int, label) -> pa.Table:
    labels = table.column("label").to_pylist()
    labels[row] = label
    return table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))


@pytest.fixture(scope="module")
def caption_scored(ray_session, tmp_path_factory):
    """A synthetic dataset whose train split holds a row without a label, scored in caption mode (which keeps it)."""
    root = tmp_path_factory.mktemp("inputs")
    data, scores = str(root / "data"), str(root / "scores")
    dataset = make_synthetic(n=120, seed=3)
    train = dataset.splits["train"]
    row = train.column("key").to_pylist().index(NULL_KEY)
    dataset = dataclasses.replace(dataset, splits={**dataset.splits, "train": _with_label(train, row, None)})
    with storage.output(data):
        write_dataset(dataset, data, rows_per_shard=40)
    assert score_job.main(["--input", f"{data}/train", "--output", scores, "--model", "mmdp-tiny",
                           "--mode", "caption", "--actor-cpus", "0.5", "--batch-size", "64"]) == 0
    return data, scores, dataset.splits["train"].num_rows


def _earlier_run(tmp_path) -> str:
    """A run folder an earlier run committed, that a refused run must leave as it is."""
    out = str(tmp_path / "run")
    with storage.output(out):
        storage.write_json({"policy": "earlier"}, storage.join(out, "config.json"))
    return out


def _still_committed(out: str) -> bool:
    return storage.is_complete(out) and storage.read_json(f"{out}/config.json") == {"policy": "earlier"}


def _test_rows(n: int = 12) -> pa.Table:
    return make_synthetic(n=4 * n, seed=4).splits["test"].select(["key", "image", "label"]).slice(0, n)


def _through_ray_data(table: pa.Table, *steps) -> list[dict]:
    import ray.data

    ds = ray.data.from_arrow(table)
    for fn, kwargs in steps:
        ds = ds.map_batches(fn, fn_kwargs=kwargs, batch_format="numpy")
    return ds.take_all()


# ------------------------------------------------------------------ labels and images (--task classify)

def test_train_rows_without_a_label_are_refused_before_the_run_when_scored_in_caption_mode(
        caption_scored, tmp_path, capsys):
    """Caption-mode scores keep rows without a label; classify training on them stopped at the first such row
    (once at "Target -9223372036854775808 is out of bounds", then at the decode stage's error naming it), exit 1
    after Ray Train's retries, the earlier run's outputs cleared. The train split's footers tell first, as do
    those of a shard without the label column (img2dataset's parquet without cls: every row unlabelled)."""
    data, scores, _ = caption_scored
    fix = ("classify training needs every train row labelled with one of the classes: score the split in label "
           "mode (it rejects such rows, with the reason), fix the split, or train with --task clip")
    out = _earlier_run(tmp_path)
    argv = ["--scores", scores, "--out", out, "--epochs", "1", "--workers", "1", "--policy", "full"]
    rc = train_job.main(["--data", data, *argv])
    err = capsys.readouterr().err
    classes = len(storage.read_json(f"{data}/metadata.json")["classes"])
    assert rc == 2 and re.search(rf"{data}/train/part-0000\d\.parquet: 1 train rows the scores kept have no label of "
                                 rf"the {classes} classes \(a null label, or one outside 0\.\.{classes - 1}\), the "
                                 rf"first '{NULL_KEY}'; ", err), err
    assert fix in err
    assert "Traceback" not in err and _still_committed(out)
    copy = str(tmp_path / "no-label-column")
    shutil.copytree(data, copy)
    train = storage.read_table(f"{copy}/train")
    storage.write_shards(train.drop_columns(["label"]), f"{copy}/train", rows_per_shard=40)
    rc = train_job.main(["--data", copy, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and f"/train/part-00000.parquet: 40 train rows the scores kept have no label column 'label' " \
                       f"(--columns names the label's column), the first 'train-" in err and fix in err, err
    assert _still_committed(out)
    # A row the score job rejected is never trained on: its missing label refuses nothing.
    from pipeline.data.contract import ColumnMapping
    from pipeline.train.config import TrainConfig
    from pipeline.train.driver import check_train_labels

    rejecting = str(tmp_path / "scores-rejecting")
    shutil.copytree(scores, rejecting)
    kept = storage.read_table(f"{rejecting}/scores")
    storage.write_shards(kept.filter(pa.array([k != NULL_KEY for k in kept.column("key").to_pylist()])),
                         f"{rejecting}/scores")
    storage.write_shards(pa.table({"key": [NULL_KEY], "reason": ["no image"]}), f"{rejecting}/rejects")
    check_train_labels(TrainConfig(data=data, scores=rejecting, out="o"), ColumnMapping(), classes)
    with pytest.raises(ValueError, match=f"the first '{NULL_KEY}'"):
        check_train_labels(TrainConfig(data=data, scores=scores, out="o"), ColumnMapping(), classes)
    # The clip task reads no label: the same split trains there.
    assert train_job.main(["--data", data, *argv, "--out", str(tmp_path / "clip"), "--task", "clip"]) == 0


def test_train_rows_with_a_null_or_out_of_range_label_are_refused_by_the_decode_stage(ray_session):
    rows = _test_rows()
    index = pa.array(np.arange(rows.num_rows), pa.int64())
    rows = rows.add_column(0, "index", index)
    key = rows.column("key")[5].as_py()
    # A null label: NumPy batches hold the column as float NaN; it became -2**63, trained on as a class.
    with pytest.raises(Exception, match=f"train row '{key}': no label \\(null\\).*score in label mode"):
        _through_ray_data(_with_label(rows, 5, None), (stages.decode_stage, {"augment": False, "seed": 0}))
    # A label of no class: with the class count known, named as such.
    with pytest.raises(Exception, match=f"train row '{key}': label 7 is not one of the 4 classes \\(0..3\\)"):
        _through_ray_data(_with_label(rows, 5, 7),
                          (stages.decode_stage, {"augment": False, "seed": 0, "num_classes": 4}))
    with pytest.raises(ValueError, match="label -1 is not a class"):
        stages.decode_stage({"index": np.arange(2), "label": np.array([0, -1]),
                             "image": rows.column("image").to_numpy(zero_copy_only=False)[:2]}, augment=False, seed=0)
    # Good rows decode as before: labels int64, unchanged.
    out = _through_ray_data(rows, (stages.decode_stage, {"augment": False, "seed": 0, "num_classes": 4}))
    assert sorted(r["label"] for r in out) == sorted(rows.column("label").to_pylist())


def test_a_test_row_without_a_label_or_image_is_an_error_naming_it_not_a_wrong_prediction(ray_session):
    """The test accuracy counted a null label (-2**63) as a wrong prediction, silently; an undecodable test image
    failed the first evaluation with PIL's UnidentifiedImageError, naming no row."""
    rows = _test_rows()
    key = rows.column("key")[3].as_py()
    test_stages = [(stages.test_stage, {"num_classes": 4}), (stages.test_decode_stage, {})]
    with pytest.raises(Exception, match=f"test row '{key}': no label \\(null\\).*fix the test split"):
        _through_ray_data(_with_label(rows, 3, None), (stages.test_stage, {}), (stages.test_decode_stage, {}))
    with pytest.raises(Exception, match=f"test row '{key}': label 4 is not one of the 4 classes"):
        _through_ray_data(_with_label(rows, 3, 4), *test_stages)
    images = rows.column("image").to_pylist()
    images[3] = b"not an image"
    broken = rows.set_column(1, "image", pa.array(images, pa.binary()))
    with pytest.raises(Exception, match=f"test row '{key}': image does not decode \\(UnidentifiedImageError\\)"):
        _through_ray_data(broken, *test_stages)
    # Good rows: every one evaluated, with its label.
    out = _through_ray_data(rows, *test_stages)
    assert sorted(r["label"] for r in out) == sorted(rows.column("label").to_pylist())
    assert set(out[0]) == {"x", "label", "index"}  # the key was kept for the errors only


# ------------------------------------------------------------------ the consistency signal

def test_a_signal_the_scores_lack_is_refused_before_training(caption_scored, tmp_path, capsys):
    """Caption-mode scores have no clip_margin (NaN on every row): with --signal clip_margin the noise estimate
    was 0 and clip_filter kept the last rows in key order, a plan made by no signal, nothing said."""
    data, scores, n = caption_scored
    # The scores say their mode: refused before the run folder is marked pending, so an earlier run there stays.
    out = _earlier_run(tmp_path)
    for policy in ("mmdp", "clip_filter"):
        rc = train_job.main(["--data", data, "--scores", scores, "--out", out, "--epochs", "1",
                             "--workers", "1", "--signal", "clip_margin", "--policy", policy])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"--signal clip_margin: {scores} was scored in caption mode (its config.json)" in err
        assert "have no clip_margin" in err and "--signal clip_score" in err and "Traceback" not in err
        assert _still_committed(out)
    # Scores that do not say their mode are refused by their values, once read (in a task: its error as itself).
    bare = str(tmp_path / "scores-without-config")
    shutil.copytree(scores, bare)
    os.remove(f"{bare}/config.json")
    rc = train_job.main(["--data", data, "--scores", bare, "--out", str(tmp_path / "bare"), "--epochs", "1",
                         "--workers", "1", "--signal", "clip_margin"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"signal clip_margin: {n} of {n} scored rows (100%) have no clip_margin (NaN)" in err
    assert "caption mode" in err and "--signal clip_score" in err
    assert "Traceback" not in err and "ray::" not in err
    with pytest.raises(ValueError, match=f"signal clip_margin: {n} of {n} ") as refused:
        Pruning.from_scores(scores, policy="clip_cut", signal="clip_margin", epochs=2)
    assert type(refused.value) is ValueError
    with pytest.raises(ValueError, match="signal clip_margin"):
        load_index(scores, "clip_margin")
    # auto takes clip_score for these scores, as before; clip_score itself is whole.
    keys, consistency, signal = load_index(scores, "auto")
    assert signal == "clip_score" and len(keys) == n and not np.isnan(consistency).any()


def test_a_column_spec_naming_a_column_no_shard_has_is_refused_before_the_run_folder_is_touched(
        caption_scored, tmp_path, capsys):
    """``--columns label=lable`` read every label as null; the run found it only once it read the split, after
    its folder was marked pending (an earlier run there uncommitted)."""
    data, scores, _ = caption_scored
    out = _earlier_run(tmp_path)
    for argv, says in ((["--columns", "label=lable"], f"--columns label=lable: no shard in {data}/train has a "
                                                      "column 'lable'"),
                       (["--columns", "caption=text", "--task", "clip", "--signal", "clip_score"],
                        f"--columns caption=text: no shard in {data}/train has a column 'text'")):
        rc = train_job.main(["--data", data, "--scores", scores, "--out", out, "--epochs", "1", "--workers", "1",
                             *argv])
        err = capsys.readouterr().err
        assert rc == 2 and says in err, err
        assert _still_committed(out)


def test_scores_of_as_many_other_rows_are_refused_by_their_keys_before_the_run(caption_scored, tmp_path, capsys):
    """The scores of another split of the same size (jobs.make_dataset --limit makes both splits that size) passed
    the row count: training found no row's index, trained on nothing every epoch, and exited 0."""
    from pipeline.data.contract import ColumnMapping
    from pipeline.train.config import TrainConfig
    from pipeline.train.driver import check_keys_scored

    data, scores, n = caption_scored
    copy = str(tmp_path / "other-rows")
    shutil.copytree(data, copy)
    train = storage.read_table(f"{copy}/train")
    keys = [k.replace("train-", "other-") for k in train.column("key").to_pylist()]
    storage.write_shards(train.set_column(train.schema.get_field_index("key"), "key", pa.array(keys)),
                         f"{copy}/train", rows_per_shard=40)
    out = _earlier_run(tmp_path)
    rc = train_job.main(["--data", copy, "--scores", scores, "--out", out, "--epochs", "1", "--workers", "1",
                         "--task", "clip"])
    err = capsys.readouterr().err
    first = sorted(k for k in keys[:40])
    assert rc == 2 and f"--scores {scores} holds none of the keys {first[0]!r}, {first[20]!r}, {first[-1]!r} of " \
                       f"{copy}/train/part-00000.parquet, scored or rejected: they are the scores of other rows" \
                       in err, err
    assert "Traceback" not in err and _still_committed(out)
    # The split's own scores pass, and so do scores that hold the shard's keys among their rejects alone.
    check_keys_scored(TrainConfig(data=data, scores=scores, out="o", task="clip"), ColumnMapping())
    partial = str(tmp_path / "scores-rejecting")
    shutil.copytree(scores, partial)
    first = set(storage.read_table(f"{data}/train/part-00000.parquet").column("key").to_pylist())
    scored = storage.read_table(f"{partial}/scores")
    storage.write_shards(scored.filter(pa.array([k not in first for k in scored.column("key").to_pylist()])),
                         f"{partial}/scores")
    storage.write_shards(pa.table({"key": sorted(first), "reason": ["image not decodable"] * len(first)}),
                         f"{partial}/rejects")
    check_keys_scored(TrainConfig(data=data, scores=partial, out="o", task="clip"), ColumnMapping())
    storage.write_shards(pa.table({"key": ["train-999999"], "reason": ["image not decodable"]}), f"{partial}/rejects")
    with pytest.raises(ValueError, match=f"holds none of the keys 'train-.* of {data}/train/part-00000.parquet"):
        check_keys_scored(TrainConfig(data=data, scores=partial, out="o", task="clip"), ColumnMapping())


def test_a_signal_missing_on_more_than_half_the_rows_is_refused_below_it_kept():
    from pipeline.train.pruning import MAX_MISSING_SIGNAL, check_signal

    values = np.arange(10, dtype=np.float32)
    values[:5] = np.nan  # half: the other half still ranks the rows (the NaN ones rank lowest)
    assert MAX_MISSING_SIGNAL == 0.5
    check_signal(values, "clip_margin")
    values[5] = np.nan
    with pytest.raises(ValueError, match=r"signal clip_margin: 6 of 10 scored rows \(60%\) have no clip_margin"):
        check_signal(values, "clip_margin")
    with pytest.raises(ValueError, match=r"signal clip_score: 6 of 10 .*score the data again"):
        check_signal(values, "clip_score")
    check_signal(np.zeros(0, np.float32), "clip_margin")  # no rows: nothing to refuse


def test_a_train_split_another_writer_committed_is_counted_by_its_footers(tmp_path):
    """Spark, Hadoop and Glue leave an empty _SUCCESS beside their part files: no manifest of mmdp's to count."""
    from pipeline.train.driver import split_rows

    train = tmp_path / "train"
    train.mkdir()
    rows = make_synthetic(n=40, seed=0).splits["train"]
    storage.write_table(rows.slice(0, 7), str(train / "part-00000-1f2e.snappy.parquet"))
    storage.write_table(rows.slice(7, 5), str(train / "part-00001-1f2e.snappy.parquet"))
    (train / "_SUCCESS").write_bytes(b"")
    assert split_rows(str(train)) == 12
    committed = str(tmp_path / "committed")
    storage.write_shards(rows.slice(0, 9), committed)
    assert split_rows(committed) == 9


def test_a_test_split_with_rows_without_an_image_is_refused_before_the_run_starts(caption_scored, tmp_path, capsys):
    """img2dataset keeps its failed downloads as rows with a null image: in a test split, evaluation stopped at
    the first one after an epoch of training (exit 1, retried). The footers' statistics count them first."""
    data, scores, _ = caption_scored
    copy = str(tmp_path / "data")
    shutil.copytree(data, copy)
    test = storage.read_table(f"{copy}/test")
    images = test.column("image").to_pylist()
    images[2] = images[5] = None
    storage.write_shards(test.set_column(test.schema.get_field_index("image"), "image", pa.array(images, pa.binary())),
                         f"{copy}/test", rows_per_shard=10)
    out = _earlier_run(tmp_path)
    for task in ("classify", "clip"):
        rc = train_job.main(["--data", copy, "--scores", scores, "--out", out, "--epochs", "1", "--workers", "1",
                             "--task", task])
        err = capsys.readouterr().err
        assert rc == 2 and f"{copy}/test: 2 rows have no image (a null image" in err, err
        assert _still_committed(out)


def test_a_test_split_with_rows_without_a_class_is_refused_before_the_run_starts(caption_scored, tmp_path, capsys):
    """A test row without a label of one of the classes stopped classify training at its first evaluation (every
    --eval-every epochs: possibly the last), exit 1 after Ray Train's retries. The footers' statistics tell first."""
    data, scores, _ = caption_scored
    classes = len(storage.read_json(f"{data}/metadata.json")["classes"])
    out = _earlier_run(tmp_path)
    test = storage.read_table(f"{data}/test")
    at = test.schema.get_field_index("label")
    for label, expected in ((None, "{copy}/test: 1 rows have no label (a null label); test accuracy needs every "
                                   "test row labelled with one of the classes: fix the test split"),
                            (classes, f"labels 0..{classes}, not all among the {classes} classes (0..{classes - 1})"),
                            (-1, f"labels -1..{classes - 1}, not all among the {classes} classes")):
        copy = str(tmp_path / f"data-{label}")
        shutil.copytree(data, copy)
        labels = test.column("label").to_pylist()
        labels[4] = label
        storage.write_shards(test.set_column(at, "label", pa.array(labels, pa.int64())), f"{copy}/test",
                             rows_per_shard=10)
        rc = train_job.main(["--data", copy, "--scores", scores, "--out", out, "--epochs", "1", "--workers", "1"])
        err = capsys.readouterr().err
        assert rc == 2 and expected.format(copy=copy) in err, err
        assert "Traceback" not in err and _still_committed(out)
    assert stages.class_labels({"label": np.array(test.column("label").to_pylist())}, classes, "test").min() >= 0


def test_the_library_refuses_settings_a_policy_cannot_take_before_any_actor_starts(caption_scored):
    """Pruning.from_scores checks what jobs.train's flags check: before, a wrong policy name or knob failed in the
    pruning actor's constructor, found by the first worker to look it up; a budget or noise share the policy does
    not read was left unread, unsaid."""
    import re

    import ray

    _, scores, _ = caption_scored
    before = sorted(map(str, ray.util.list_named_actors()))
    for kwargs, message in [
            ({"policy": "nope"}, "policy 'nope': choose one of full, random"),
            ({"policy": "infobatch", "keep_ratio": 0.3}, "keep_ratio: policy infobatch decides what it keeps by its "
                                                         "own rule (its pruning rate: policy_params prune_prob=...)"),
            ({"policy": "random", "keep_ratio": 1.5}, "keep_ratio must be in (0, 1], got 1.5"),
            ({"policy": "clip_filter", "noise_fraction": 0.3}, "noise_fraction: policy clip_filter excludes no noise"),
            ({"policy": "mmdp", "noise_fraction": 1.0}, "noise_fraction must be in [0, 1), got 1.0"),
            ({"policy": "mmdp", "policy_params": {"bogus": 1}}, "policy_params: policy mmdp has no parameter bogus"),
            ({"policy": "full", "signal": "clip_score"}, "signal clip_score: policy full reads no consistency scores"),
            ({"policy": "trajectory"}, "reference_keys goes with policy trajectory, which needs it"),
            ({"policy": "mmdp", "reference_keys": ["a"]}, "reference_keys goes with policy trajectory")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            Pruning.from_scores(scores, epochs=2, **kwargs)
    assert sorted(map(str, ray.util.list_named_actors())) == before


def test_the_library_refuses_a_pruner_name_that_another_runs_actor_holds(caption_scored):
    """A name already registered gave back that actor: its settings, state and row count in place of the
    ones asked for, with plans of another table's indices."""
    _, scores, _ = caption_scored
    first = Pruning.from_scores(scores, policy="random", keep_ratio=0.5, epochs=2, name="mmdp-pruner-taken")
    try:
        with pytest.raises(ValueError, match="a pruning actor named 'mmdp-pruner-taken' already runs"):
            Pruning.from_scores(scores, policy="full", epochs=2, name="mmdp-pruner-taken")
    finally:
        first.shutdown()
    again = Pruning.from_scores(scores, policy="full", epochs=2, name="mmdp-pruner-taken")  # free once shut down
    again.shutdown()
