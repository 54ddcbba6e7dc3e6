"""Training on GPU workers (``jobs.train --use-gpu``), both tasks: runs where CUDA is, skipped elsewhere.

On GPUs Ray Train's process group is NCCL's, which reduces only tensors on
the GPU, and Ray Data hands the classifier its batches on the worker's GPU:
the epoch's sums, the probes' losses and the contrastive task's batches and
evaluation must all live where the model does.
"""
import pytest
import torch

from jobs import score as score_job
from jobs import train as train_job
from pipeline import storage
from pipeline.data.reference import make_synthetic, write_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def scored(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    data, scores = str(root / "data"), str(root / "scores")
    with storage.output(data):
        write_dataset(make_synthetic(n=200, seed=2, noise="caption:0.3"), data, rows_per_shard=50)
    assert score_job.main(["--input", f"{data}/train", "--output", scores, "--model", "mmdp-tiny",
                           "--mode", "caption", "--batch-size", "32"]) == 0
    return data, scores


@pytest.mark.parametrize("task", ["classify", "clip"])
def test_training_on_a_gpu_worker_with_probes_evaluates_every_epoch_and_resumes(scored, tmp_path, task):
    data, scores = scored
    first, out = str(tmp_path / f"{task}-first"), str(tmp_path / task)
    # Probes every epoch: rows excluded as noisy get a no-grad forward beside the trained rows.
    flags = ["--task", task, *(["--model", "mmdp-tiny"] if task == "clip" else []), "--data", data,
             "--scores", scores, "--epochs", "3", "--workers", "1", "--use-gpu", "--batch-size", "16",
             "--warmup-steps", "2", "--noise-fraction", "0.2", "--policy-params", "probe_every=1,loss_weight=0.5"]
    assert train_job.main([*flags, "--out", first, "--stop-after", "2"]) == 0
    # The checkpoint (a GPU model's state) goes back onto the GPU for the last epoch.
    assert train_job.main([*flags, "--out", out, "--resume-from", storage.join(first, "checkpoint")]) == 0
    metrics = storage.read_json(storage.join(out, "metrics.json"))
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2] and metrics["totals"]["restarts"] == 0
    # Epochs 0 and 1 came back from the first run's checkpoint; only epoch 2 was trained again.
    assert metrics["epochs"][:2] == storage.read_json(storage.join(first, "metrics.json"))["epochs"]
    for e in metrics["epochs"]:
        assert 0.0 <= e["test_accuracy"] <= 1.0 and e["test_rows"] > 0
        assert e["samples_forwarded"] > 0
