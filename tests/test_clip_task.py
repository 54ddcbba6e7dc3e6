"""The contrastive task: per-pair losses, probes, recall, and ``jobs.train --task clip`` end to end on S3."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from jobs import report as report_job
from jobs import score as score_job
from jobs import train as train_job
from pipeline import storage
from pipeline.data.reference import make_synthetic
from pipeline.train.clip import ClipTask, captions_for, pair_losses, retrieval_metrics
from pipeline.train.loop import cosine_lr
from shardfiles import write_img2dataset


def _features(n: int, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1),
            torch.tensor(7.5))


def test_pair_losses_are_the_terms_of_open_clips_loss():
    img, txt, scale = _features(12)
    per_pair = pair_losses(img, txt, scale)
    assert per_pair.shape == (12,)
    assert float(per_pair.mean()) == pytest.approx(float(open_clip.ClipLoss()(img, txt, scale)), rel=1e-6)
    # Row 3's term: its image against every caption and its caption against every image.
    logits = scale * img @ txt.T
    own = (F.cross_entropy(logits[3:4], torch.tensor([3])) + F.cross_entropy(logits.T[3:4], torch.tensor([3]))) / 2
    assert float(per_pair[3]) == pytest.approx(float(own), rel=1e-6)


def test_recall_counts_captions_as_text():
    # Four images, two distinct captions (two images each); the embeddings put images 0, 1 near
    # caption 0 and images 2, 3 near caption 1, except image 3, which is nearer caption 0.
    text = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    image = F.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.2], [0.1, 1.0], [1.0, 0.3]]), dim=-1)
    caption_of = torch.tensor([0, 0, 1, 1])
    m = retrieval_metrics(image, text, caption_of, ks=(1, 2))
    assert m["i2t_recall@1"] == 0.75 and m["i2t_recall@2"] == 1.0  # image 3 misses at 1, not at 2 of 2
    # Caption 0's nearest image is image 0 (a hit); caption 1's is image 2 (a hit).
    assert m["t2i_recall@1"] == 1.0 and m["test_captions"] == 2
    # Unique captions: the usual recall@k (a perfect match gives 1, a reversed one 0 at k=1).
    eye = torch.eye(3)
    assert retrieval_metrics(eye, eye, torch.arange(3), ks=(1,))["i2t_recall@1"] == 1.0
    assert retrieval_metrics(eye, eye[[1, 2, 0]], torch.arange(3), ks=(1,))["t2i_recall@1"] == 0.0


def test_empty_captions_take_their_labels_prompt():
    batch = {"key": np.array(["a", "b", "c"], dtype=object), "caption": np.array(["a cat.", "", None], dtype=object),
             "label": np.array([1, 0, None], dtype=object)}
    with pytest.raises(ValueError, match="'c' has no caption and no known label"):
        captions_for(batch, ("dog", "cat"), ("a photo of a {}.",))
    captions, labels = captions_for({k: v[:2] for k, v in batch.items()}, ("dog", "cat"), ("a photo of a {}.",))
    assert list(captions) == ["a cat.", "a photo of a dog."] and list(labels) == [1, 0]


def test_a_test_row_the_stage_cannot_use_is_named_as_a_test_row():
    """The test split is not scored: its errors said "nothing to train on" or "the score table has it as scored"."""
    from io import BytesIO

    from PIL import Image

    from pipeline.train import clip  # its test_pair_stage by the module: pytest would collect the name

    png = BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    batch = {"key": np.array(["t0", "t1"], dtype=object), "image": np.array([png.getvalue(), b"not an image"], object),
             "caption": np.array(["a red square.", "a photo."], dtype=object), "label": np.array([0, 1], object)}
    args = ("mmdp-tiny", ("dog", "cat"), ("a photo of a {}.",))
    with pytest.raises(ValueError, match="^test row 't1': .*; the test metrics count every test row: fix the test split"):
        clip.test_pair_stage(batch, *args)
    batch["image"][1], batch["caption"][1], batch["label"][1] = png.getvalue(), None, None
    with pytest.raises(ValueError, match="^test row 't1' has no caption and no known label; the test metrics"):
        clip.test_pair_stage(batch, *args)
    with pytest.raises(ValueError, match="^train row 't1' has no caption .*; the score job rejects such rows"):
        clip.pair_stage({**batch, "index": np.arange(2)}, *args, augment=False, seed=0)
    batch["caption"][1] = "a photo."
    assert clip.test_pair_stage(batch, *args)["pixels"].shape[0] == 2


def test_a_short_last_batch_joins_the_one_before_so_no_pair_is_scored_in_a_tiny_batch(ray_session):
    """A pair's contrastive loss in a batch of one is 0 whatever the model: the pruner took such pairs, each epoch's
    last few on each worker, for the best learned."""
    import ray.data

    task, *_ = _task()
    rows = [{"pixels": np.zeros((3, 32, 32), np.uint8), "caption": f"photo {i}", "index": i, "weight": np.float32(1)}
            for i in range(17)]
    sizes = [len(b["index"]) for b in task.batches(ray.data.from_items(rows), 8, {})]
    assert sizes == [8, 9]  # not 8, 8, 1
    assert [len(b["index"]) for b in task.batches(ray.data.from_items(rows[:13]), 8, {})] == [8, 5]  # half: kept


def _task():
    task = ClipTask({"model": "mmdp-tiny", "seed": 0, "threads": 1, "lr": 1e-3, "weight_decay": 0.1,
                     "class_names": [], "templates": []})
    model, opt = task.build()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, 32, 32, generator=g)
    tokens = task.tokens([f"a photo of number {i}" for i in range(10)])
    return task, model, opt, x, tokens


def test_a_probe_is_scored_as_a_member_of_its_batch_and_weighted_out_of_the_step():
    task, model, opt, x, tokens = _task()
    with torch.no_grad():
        expected = pair_losses(*model(x, tokens))  # every pair's term, the model before the step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, 10, 1))
    w = torch.tensor([1.0, 0, 2.0, 0, 1.0, 1.0, 0, 1.0, 1.0, 1.0])  # three probes
    before = [p.detach().clone() for p in model.parameters()]
    per_pair = task.step(model, {"x": x, "tokens": tokens, "weight": w}, 1.0, opt, sched)
    torch.testing.assert_close(per_pair, expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it stepped


def test_a_probes_embeddings_are_negatives_without_gradient_and_its_term_weighs_nothing():
    # The step's gradient: the trained pairs' weighted terms, each against every pair of the batch, the
    # probes' embeddings held fixed (no gradient through them), the probes' own terms weighted 0.
    task, model, _, x, tokens = _task()
    w = torch.tensor([1.0, 0, 2.0, 0, 1.0, 1.0, 0, 1.0, 1.0, 1.0])  # three probes
    trained, probes = (w > 0).nonzero(as_tuple=True)[0], (w == 0).nonzero(as_tuple=True)[0]
    reference = [p.detach().clone() for p in model.parameters()]
    img_t, txt_t, scale = model(x[trained], tokens[trained])
    with torch.no_grad():
        img_p, txt_p, _ = model(x[probes], tokens[probes])
    terms = pair_losses(torch.cat([img_t, img_p]), torch.cat([txt_t, txt_p]), scale)
    loss = (terms * torch.cat([w[trained], w[probes]])).sum() / (10 * 1.0)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    task.step(model, {"x": x, "tokens": tokens, "weight": w}, 1.0, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    for p, p0, g in zip(model.parameters(), reference, grads):  # SGD at lr 1: the step is the gradient
        torch.testing.assert_close(p0 - p.detach(), torch.zeros_like(p0) if g is None else g, rtol=1e-4, atol=1e-6)


def test_the_step_clamps_the_logit_scale_at_100():
    task, model, opt, x, tokens = _task()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # a temperature past 100, as a long run's could drift to
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    task.step(model, {"x": x, "tokens": tokens, "weight": torch.ones(10)}, 1.0, opt, sched)
    assert float(model.logit_scale.detach()) == pytest.approx(float(np.log(100)))


def test_the_step_weights_each_pairs_term_by_its_plan_weight():
    # Without probes, the step's gradient is that of sum(w * term) / (B * mean_w).
    task, model, opt, x, tokens = _task()
    w = torch.tensor([2.0, 0.5, 1.0, 1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 1.0])
    reference = [p.detach().clone() for p in model.parameters()]
    terms = pair_losses(*model(x, tokens))
    grads = torch.autograd.grad((terms * w).sum() / (10 * 1.1), [p for p in model.parameters()])
    opt2 = torch.optim.SGD(model.parameters(), lr=1.0)
    task.step(model, {"x": x, "tokens": tokens, "weight": w}, 1.1, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))
    for p, p0, g in zip(model.parameters(), reference, grads):  # SGD at lr 1: the step is the gradient
        torch.testing.assert_close(p0 - p.detach(), g, rtol=1e-4, atol=1e-6)


def test_clip_task_trains_on_img2dataset_shards_in_s3(ray_session, s3_bucket):
    """--task clip straight from img2dataset-style parquet in S3: no conversion, recall and zero-shot per epoch."""
    data, scores, out = (storage.join(s3_bucket, name) for name in ("data", "scores", "run"))
    dataset = make_synthetic(n=200, seed=3, noise="caption:0.3")  # 30% of captions name another class
    write_img2dataset(dataset, data)
    classes = ",".join(dataset.metadata["classes"])
    assert score_job.main(["--input", storage.join(data, "train"), "--output", scores, "--model", "mmdp-tiny",
                           "--columns", "img2dataset", "--mode", "caption", "--actor-cpus", "0.5",
                           "--batch-size", "32"]) == 0
    assert train_job.main(["--task", "clip", "--model", "mmdp-tiny", "--data", data, "--scores", scores, "--out", out,
                           "--columns", "img2dataset", "--classes", classes, "--epochs", "3", "--workers", "2",
                           "--batch-size", "16", "--warmup-steps", "2"]) == 0
    metrics = storage.read_json(storage.join(out, "metrics.json"))
    test_rows = storage.read_table(storage.join(data, "test")).num_rows
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2]
    for e in metrics["epochs"]:
        assert e["test_rows"] == e["zero_shot_rows"] == test_rows  # both workers' parts: one exact pass
        for name in ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5", "zero_shot_accuracy"):
            assert 0.0 <= e[name] <= 1.0, name
        assert e["i2t_recall@1"] <= e["i2t_recall@5"] and e["test_accuracy"] == e["zero_shot_accuracy"]
        assert e["samples_forwarded"] == e["plan_received"] == e["plan_kept"] and e["plan_missing"] == 0
    assert metrics["totals"]["signal"] == "clip_score"  # caption mode: image-caption agreement
    config = storage.read_json(storage.join(out, "config.json"))
    assert (config["task"], config["lr"], config["weight_decay"]) == ("clip", 2e-3, 0.1)  # the task's defaults
    # The report shows the run's final recall and zero-shot accuracy, and recall per epoch.
    report_dir = storage.join(s3_bucket, "report")
    assert report_job.main([out, "--out", report_dir]) == 0
    text = storage.read_bytes(storage.join(report_dir, "report.md")).decode()
    last = metrics["epochs"][-1]
    expected = " | ".join(f"{100 * last[k]:.2f}" for k in ("zero_shot_accuracy", "i2t_recall@1", "i2t_recall@5",
                                                            "t2i_recall@1", "t2i_recall@5"))
    assert "## Retrieval (contrastive runs)" in text and f"| mmdp | {expected} |" in text
    assert "figures/recall.png" in text


def test_clip_task_without_labels_or_class_names_reports_recall_only(ray_session, tmp_path):
    root = str(tmp_path / "data")
    write_img2dataset(make_synthetic(n=120, seed=4), root, tars=True, labels=False)  # captions only
    scores, out = str(tmp_path / "scores"), str(tmp_path / "run")
    assert score_job.main(["--input", storage.join(root, "train"), "--output", scores, "--model", "mmdp-tiny",
                           "--columns", "img2dataset", "--mode", "caption", "--actor-cpus", "0.5"]) == 0
    assert train_job.main(["--task", "clip", "--model", "mmdp-tiny", "--data", root, "--scores", scores, "--out", out,
                           "--columns", "img2dataset", "--epochs", "1", "--workers", "1", "--batch-size", "16",
                           "--policy", "full"]) == 0
    epoch = json.loads(open(f"{out}/metrics.json").read())["epochs"][0]
    assert epoch["test_accuracy"] is None and epoch["zero_shot_rows"] == 0
    assert epoch["test_rows"] > 0 and 0.0 <= epoch["i2t_recall@1"] <= 1.0


def test_clip_task_refuses_a_classifier_model_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_job.main(["--task", "clip", "--model", "resnet", "--data", "d", "--scores", "s", "--out", "o"])
    assert exit_.value.code == 2 and "unknown model config 'resnet'" in capsys.readouterr().err


@pytest.mark.parametrize("model, why", [("ViT-B-16-SigLIP", "a SigLIP config"), ("coca_ViT-B-32", "a CoCa config")])
def test_clip_task_refuses_models_that_train_with_another_loss(model, why, capsys):
    # Their forward gives a logit bias or a dict beside the features: the run would fail at its first step.
    with pytest.raises(SystemExit) as exit_:
        train_job.main(["--task", "clip", "--model", model, "--data", "d", "--scores", "s", "--out", "o"])
    assert exit_.value.code == 2 and f"--model {model}: {why}" in capsys.readouterr().err
