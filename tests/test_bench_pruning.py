"""The pruning benchmark end to end on the tiny synthetic dataset (one seed, two epochs, full + oracle).

Two training runs keep it near a minute on 2 cores; the policies themselves are tested in
test_policies.py and test_train_job.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc

from benchmarks import pruning as bench_pruning
from pipeline import storage
from pipeline.score.clip_models import TINY_MODEL, load_clip, save_checkpoint

POOL, EPOCHS, WORKERS = 96, 2, 2


def test_bench_runs_every_policy_and_the_oracle_on_clean_rows_only(ray_session, tmp_path):
    checkpoint = str(tmp_path / "tiny-clip.pt")
    model, _, _ = load_clip(TINY_MODEL)  # random weights: the test checks the machinery, not the signal
    save_checkpoint(model, checkpoint, TINY_MODEL)
    out = str(tmp_path / "bench")
    assert bench_pruning.main([
        "--out", out, "--synthetic", "--pool-size", str(POOL), "--epochs", str(EPOCHS), "--seeds", "3",
        "--noise", "symmetric:0.25", "--policies", "oracle,full", "--workers", str(WORKERS),
        "--clip-model", TINY_MODEL, "--clip-pretrained", checkpoint, "--batch-size", "16",
        "--warmup-steps", "2", "--score-actor-cpus", "0.5", "--skip-overhead", "--no-warmup",
    ]) == 0

    result = json.loads(open(f"{out}/results.json").read())
    runs = {r["policy"]: r for r in result["runs"]}
    assert sorted(runs) == ["full", "oracle"] and len(result["runs"]) == 2
    for run in runs.values():
        assert 0.0 <= run["final_test_accuracy"] <= 1.0 and 0.0 <= run["shifted_test_accuracy"] <= 1.0
        # The driver's evaluation of the saved checkpoint repeats the trainer's last-epoch figure
        # (to one test image: other batch sizes may round a near-tie the other way).
        assert abs(run["driver_test_accuracy"] - run["final_test_accuracy"]) <= 1 / (POOL // 2) + 1e-9
        assert run["wall_seconds"] > 0 and run["seed"] == 3 and run["noise"] == "symmetric:0.25"

    gt = storage.read_table(f"{out}/data/symmetric0.25-s3/ground_truth.parquet")
    clean = int(pc.sum(pc.equal(gt.column("corruption"), "none")).as_py())
    assert gt.num_rows == POOL and clean == POOL - round(0.25 * POOL)
    oracle = runs["oracle"]
    assert oracle["num_samples"] == clean
    # An equal split across workers may leave out at most workers-1 samples an epoch.
    assert clean * EPOCHS - (WORKERS - 1) * EPOCHS <= oracle["samples_forwarded"] <= clean * EPOCHS
    assert oracle["samples_forwarded"] == clean * EPOCHS - oracle["missing"]
    assert runs["full"]["num_samples"] == POOL
    # Replayed last plans: full keeps every row (the pool's noise share), the oracle none of the noisy ones.
    assert runs["full"]["noisy_in_final_plan"] == (POOL - clean) / POOL
    assert oracle["noisy_in_final_plan"] == 0.0
    assert POOL * EPOCHS - (WORKERS - 1) * EPOCHS <= runs["full"]["samples_forwarded"] <= POOL * EPOCHS

    # The oracle's scores folder has the score job's layout; noisy rows are rejected with a reason.
    scores = storage.read_table(f"{out}/scores/symmetric0.25-s3-oracle/scores")
    status = scores.column("status").to_numpy(zero_copy_only=False)
    assert (status == "ok").sum() == clean
    assert set(scores.column("error").to_numpy(zero_copy_only=False)[status != "ok"]) == {bench_pruning.ORACLE_REASON}
    index = scores.column("index").to_numpy(zero_copy_only=False)
    assert sorted(index[status == "ok"].astype(int)) == list(range(clean))

    table = open(f"{out}/results.md").read()
    for policy in ("full", "oracle"):
        assert sum(line.startswith(f"| {policy} |") for line in table.splitlines()) == 1
    summary = {r["policy"]: r for r in result["summary"]}
    assert summary["full"]["speedup_vs_full"] == 1.0
    speedup = runs["full"]["wall_seconds"] / oracle["wall_seconds"]
    assert np.isclose(summary["oracle"]["speedup_vs_full"], speedup, atol=1e-3)
    assert np.isclose(summary["oracle"]["accuracy_mean"], 100 * oracle["final_test_accuracy"], atol=1e-3)
    train_speedup = runs["full"]["train_seconds"] / oracle["train_seconds"]
    assert np.isclose(summary["oracle"]["train_speedup_vs_full"], train_speedup, atol=1e-3)


def test_shifted_test_copy_is_deterministic_and_differs_from_the_original():
    png = bench_pruning.reference.encode_png(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1)))
    a = bench_pruning.shift_image(png, np.random.default_rng([1, 2]))
    b = bench_pruning.shift_image(png, np.random.default_rng([1, 2]))
    c = bench_pruning.shift_image(png, np.random.default_rng([1, 3]))
    assert a == b and a != c and a != png


def test_noise_and_policy_flags_are_checked(capsys):
    for bad in (["--noise", "symmetric:2"], ["--policies", "full,bogus"], ["--seeds", "x"]):
        try:
            bench_pruning.parse_args(["--out", "/tmp/unused", *bad])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{bad} was accepted")
    args = bench_pruning.parse_args(["--out", "o", "--noise", "clean,symmetric:0.2+caption:0.05",
                                     "--policies", "oracle,full"])
    assert args.noise == ["clean", "symmetric:0.2+caption:0.05"] and args.policies == ["full", "oracle"]
