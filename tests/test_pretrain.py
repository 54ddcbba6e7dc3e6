"""The reference-CLIP pretraining job, run through main() on the tiny synthetic dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray.data
import torch

from jobs.pretrain_reference_clip import checkpoint_url, main
from pipeline import storage as pio
from pipeline.score import TINY_MODEL
from pipeline.score.clip_models import load_clip
from pipeline.data.reference import make_synthetic, write_dataset
from pipeline.score.scorer import ClipScorer, ImageDecoder
from shardfiles import write_img2dataset


@pytest.fixture(scope="module")
def synthetic(ray_session, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("synthetic"))
    write_dataset(make_synthetic(n=96, seed=0), url)
    return url


def test_one_epoch_writes_a_loadable_checkpoint_and_metrics(synthetic, tmp_path, capsys):
    folder = str(tmp_path / "ref")
    out = checkpoint_url(folder)
    argv = ["--data", synthetic, "--out", folder, "--model", TINY_MODEL, "--epochs", "1", "--batch-size", "8",
            "--warmup-steps", "2", "--threads", "2"]
    options = ray.data.DataContext.get_current().execution_options
    assert options.preserve_order is False
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "zero-shot accuracy on test:" in printed
    # Its reads keep the file order; what a later job in the same process runs (jobs.demo's) does not inherit it.
    assert options.preserve_order is False and ray.data.DataContext.get_current().execution_options.preserve_order is False

    metrics = json.loads(open(tmp_path / "ref" / "metrics.json").read())
    meta = pio.read_json(pio.join(synthetic, "metadata.json"))
    assert out == str(tmp_path / "ref" / "model.pt") and pio.is_complete(folder)
    assert pio.read_json(pio.join(folder, "config.json"))["epochs"] == 1
    assert 0.0 <= metrics["zero_shot_accuracy"] <= 1.0
    assert metrics["train_pairs"] == meta["splits"]["reference"] and metrics["test_rows"] == meta["splits"]["test"]
    assert metrics["config"]["epochs"] == 1 and metrics["classes"] == meta["classes"]
    assert len(metrics["loss_per_epoch"]) == 1 and np.isfinite(metrics["loss_per_epoch"][0])

    state = torch.load(out, weights_only=True)
    model, _, _ = load_clip(TINY_MODEL, pretrained=out)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state["state_dict"][name]), name
    # The scorer loads it too, and the saved model is not the random init.
    table = pio.read_table(pio.join(synthetic, "test"))
    batch = {"image": np.array(table.column("image").to_pylist(), dtype=object),
             "label": np.array(table.column("label").to_pylist())}
    scored = ClipScorer(TINY_MODEL, pretrained=out, mode="label", classes=meta["classes"], device="cpu")(
        ImageDecoder(TINY_MODEL)(batch)
    )
    assert np.isfinite(scored["clip_score"]).all() and np.isfinite(scored["clip_margin"]).all()
    torch.manual_seed(0)  # the job's own start: its seed (0 by default), then the model built
    random_init = load_clip(TINY_MODEL)[0].state_dict()
    changed = [k for k, v in state["state_dict"].items() if not torch.equal(random_init[k], v)]
    assert len(changed) > len(state["state_dict"]) // 2, changed  # trained: most tensors moved from it


def test_training_is_reproducible_for_a_seed(synthetic, tmp_path):
    outs = [str(tmp_path / str(i)) for i in range(2)]
    for out in outs:
        assert main(["--data", synthetic, "--out", out, "--model", TINY_MODEL, "--epochs", "1",
                     "--batch-size", "8", "--seed", "3"]) == 0
    a, b = (torch.load(checkpoint_url(o), weights_only=True)["state_dict"] for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra",
    [["--epochs", "0"], ["--batch-size", "1"], ["--lr", "-1"], ["--threads", "0"], ["--model", "no-such-model"],
     ["--model", "ViT-B-16-SigLIP"], ["--model", "coca_ViT-B-32"], ["--epochs", "two"], ["--out", "model.pt"]],
)
def test_bad_arguments_exit_2(extra, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(tmp_path), "--out", str(tmp_path / "m"), *extra])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_pretrains_on_img2dataset_parquet_in_s3_without_metadata(ray_session, s3_bucket, capsys):
    """--columns img2dataset straight from S3 (key/jpg/txt/cls), class names from --classes: no conversion step."""
    dataset = make_synthetic(n=96, seed=2)
    data, folder = pio.join(s3_bucket, "data"), pio.join(s3_bucket, "ref")
    write_img2dataset(dataset, data, splits=("reference", "test"))
    assert main(["--data", data, "--out", folder, "--model", TINY_MODEL, "--epochs", "1", "--batch-size", "8",
                 "--columns", "img2dataset", "--classes", ",".join(dataset.metadata["classes"])]) == 0
    assert not pio.exists(pio.join(data, "metadata.json")) and pio.is_complete(folder)
    metrics = pio.read_json(pio.join(folder, "metrics.json"))
    splits = {name: table.num_rows for name, table in dataset.splits.items()}
    assert metrics["train_pairs"] == splits["reference"] and metrics["test_rows"] == splits["test"]
    assert 0.0 <= metrics["zero_shot_accuracy"] <= 1.0
    assert set(metrics["recall"]) == {"i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5"}
    load_clip(TINY_MODEL, pretrained=pio.join(folder, "model.pt"))  # the checkpoint loads from the store


def test_pretrains_on_caption_only_webdataset_tars(ray_session, tmp_path, capsys):
    """Tars of jpg/txt members and no labels anywhere: trained on the captions, judged by recall alone."""
    dataset = make_synthetic(n=96, seed=3)
    data, folder = str(tmp_path / "data"), str(tmp_path / "ref")
    write_img2dataset(dataset, data, splits=("reference", "test"), tars=True, labels=False)
    assert main(["--data", data, "--out", folder, "--model", TINY_MODEL, "--epochs", "1", "--batch-size", "8",
                 "--columns", "img2dataset"]) == 0
    metrics = pio.read_json(pio.join(folder, "metrics.json"))
    assert metrics["zero_shot_accuracy"] is None and metrics["classes"] == []
    assert metrics["train_pairs"] == dataset.splits["reference"].num_rows
    assert metrics["test_pairs"] == dataset.splits["test"].num_rows and 0 <= metrics["recall"]["i2t_recall@1"] <= 1
    assert "zero-shot accuracy on test: n/a" in capsys.readouterr().out


def test_missing_dataset_fails_with_a_message_and_commits_nothing(ray_session, tmp_path, capsys):
    assert main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert not pio.is_complete(str(tmp_path / "m"))


def test_a_rerun_refused_for_its_data_leaves_the_earlier_model_committed(synthetic, tmp_path, capsys):
    folder = str(tmp_path / "ref")
    with pio.output(folder):  # an earlier run's committed model folder
        pio.write_bytes(b"weights", checkpoint_url(folder))
    for data, says in ((str(tmp_path / "nothing"), "nothing/reference: no such file or folder"),
                       (folder, "overlap")):  # the model's own folder given as the data
        assert main(["--data", data, "--out", folder, "--model", TINY_MODEL]) == 2
        assert says in capsys.readouterr().err
        assert pio.is_complete(folder) and pio.read_bytes(checkpoint_url(folder)) == b"weights"
    assert main(["--data", synthetic, "--out", f"{synthetic}/reference/ref", "--model", TINY_MODEL]) == 2
    assert "overlap" in capsys.readouterr().err
