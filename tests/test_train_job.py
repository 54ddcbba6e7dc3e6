"""Ray Train with the pruning actor, end to end on the tiny synthetic dataset (2 CPU workers)."""

from __future__ import annotations

import json

import pytest

from jobs import score as score_job
from jobs import train as train_job
from pipeline import io as mio
from pipeline.datasets import make_synthetic, write_dataset


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data, scores = str(root / "data"), str(root / "scores")
    write_dataset(make_synthetic(n=400, seed=5), data, rows_per_shard=50)
    return data, scores


@pytest.fixture(scope="module")
def scored_ready(ray_session, scored):
    data, scores = scored
    assert score_job.main(["--input", f"{data}/train", "--output", scores, "--model", "mmdp-tiny",
                           "--mode", "label", "--actor-cpus", "0.5", "--batch-size", "64"]) == 0
    return data, scores


def _train(data, scores, out, *extra):
    args = ["--data", data, "--scores", scores, "--out", str(out), "--epochs", "4", "--workers", "2",
            "--batch-size", "16", "--keep-ratio", "0.5", "--warmup-steps", "2", *extra]
    assert train_job.main(args) == 0
    return json.loads(open(f"{out}/metrics.json").read()), json.loads(open(f"{out}/plans.json").read())


def test_each_kept_sample_reports_exactly_one_loss(scored_ready, tmp_path):
    data, scores = scored_ready
    metrics, plans = _train(data, scores, tmp_path / "run", "--policy", "mmdp")
    n = metrics["totals"]["num_samples"]
    assert n == 200 and len(metrics["epochs"]) == 4
    for epoch in metrics["epochs"]:
        kept, missing = epoch["plan_kept"], epoch["plan_missing"]
        # An equal split across 2 workers may leave out at most 1 sample; it is counted.
        assert 0 <= missing <= 1
        assert epoch["plan_received"] == epoch["plan_reported"] == kept - missing
        assert epoch["plan_outside_plan"] == 0
        assert epoch["samples_forwarded"] == kept - missing
    # Pruning epochs keep exactly half (4 epochs at delta 0.875: none anneals).
    assert [e["plan_kept"] for e in metrics["epochs"]] == [100, 100, 100, 100]
    assert [p["epoch"] for p in plans] == [0, 1, 2, 3]
    assert mio.exists(str(tmp_path / "run" / "checkpoint" / "train.pt"))


def test_resumed_run_repeats_the_uninterrupted_plans(scored_ready, tmp_path):
    data, scores = scored_ready
    common = ["--policy", "mmdp", "--workers", "1", "--preserve-order", "--seed", "7"]
    _, full_plans = _train(data, scores, tmp_path / "full", *common)
    first, _ = _train(data, scores, tmp_path / "part", *common, "--stop-after", "2")
    assert [e["epoch"] for e in first["epochs"]] == [0, 1]
    resumed, resumed_plans = _train(data, scores, tmp_path / "resumed", *common,
                                    "--resume-from", str(tmp_path / "part" / "checkpoint"))
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2, 3]  # history carried over, no epoch twice
    digests = {p["epoch"]: p["kept_sha256"] for p in full_plans}
    assert [p["epoch"] for p in resumed_plans] == [2, 3]
    assert all(p["kept_sha256"] == digests[p["epoch"]] for p in resumed_plans)
    # The mmdp plans depend on the losses, so equal digests mean equal training, not just equal seeds.
    assert len(set(digests.values())) == 4
