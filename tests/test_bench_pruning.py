"""The pruning benchmark end to end on the tiny synthetic dataset (one seed, two epochs: full, mmdp,
random at mmdp's compute, the oracle, and the machinery overhead: one run through the pruner against
one plain Ray Train run).

Six training runs keep it near two and a half minutes on 2 cores; the policies themselves are tested in
test_policies.py and test_train_job.py (trajectory there reads a reference-keys file of the format written here)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pyarrow.compute as pc

from benchmarks import pruning as bench_pruning
from benchmarks.pruning_eval import ORACLE_REASON, REFERENCE_FRACTION, shift_image, write_reference_keys
from pipeline import storage
from pipeline.cli import config_parser, parse_config
from pipeline.data.reference import encode_png, make_synthetic, write_dataset
from pipeline.prune.budget import DEFAULT_KEEP_RATIO
from pipeline.score import TINY_MODEL
from pipeline.score.clip_models import load_clip, save_checkpoint

POOL, EPOCHS, WORKERS = 96, 2, 2
ZERO_SHOT = 0.4321  # what the pretraining job would have measured


def test_bench_runs_every_policy_and_the_oracle_on_clean_rows_only(ray_session, tmp_path):
    # Laid out as the pretraining job's output folder: model.pt beside its metrics.json.
    checkpoint = str(tmp_path / "clip" / "model.pt")
    model, _, _ = load_clip(TINY_MODEL)  # random weights: the test checks the machinery, not the signal
    save_checkpoint(model, checkpoint, TINY_MODEL)
    storage.write_json({"zero_shot_accuracy": ZERO_SHOT}, str(tmp_path / "clip" / "metrics.json"))
    out = str(tmp_path / "bench")
    args = [
        "--out", out, "--synthetic", "--pool-size", str(POOL), "--epochs", str(EPOCHS), "--seeds", "3",
        "--noise", "symmetric:0.25", "--policies", "oracle,random,mmdp,full", "--workers", str(WORKERS),
        "--clip-model", TINY_MODEL, "--clip-pretrained", checkpoint, "--batch-size", "16",
        "--warmup-steps", "2", "--score-actor-cpus", "0.5", "--overhead-repeats", "1", "--no-warmup",
    ]
    assert bench_pruning.main(args) == 0
    # The benchmark folder and every dataset, score set and run in it are committed outputs.
    assert storage.is_complete(out)
    assert storage.read_json(f"{out}/config.json")["policies"] == ["full", "mmdp", "random", "oracle"]
    for part in ("data/symmetric0.25-s3", "scores/symmetric0.25-s3", "scores/symmetric0.25-s3-oracle",
                 "runs/symmetric0.25-s3/full", "runs/symmetric0.25-s3/oracle", "overhead", "overhead/0-pruner"):
        assert storage.is_complete(f"{out}/{part}"), part

    result = json.loads(open(f"{out}/results.json").read())
    runs = {r["policy"]: r for r in result["runs"]}
    assert sorted(runs) == ["full", "mmdp", "oracle", "random"] and len(result["runs"]) == 4
    # random, a fixed-ratio baseline, trains at mmdp's measured share of full's sample passes.
    share = runs["mmdp"]["samples_forwarded"] / (POOL * EPOCHS)
    assert runs["random"]["keep_ratio"] == round(share, 4) and runs["mmdp"]["keep_ratio"] == DEFAULT_KEEP_RATIO
    assert abs(runs["random"]["samples_forwarded"] - runs["mmdp"]["samples_forwarded"]) <= 2 * EPOCHS
    for run in runs.values():
        assert 0.0 <= run["final_test_accuracy"] <= 1.0 and 0.0 <= run["shifted_test_accuracy"] <= 1.0
        # The driver's evaluation of the saved checkpoint repeats the trainer's last-epoch figure
        # (to one test image: other batch sizes may round a near-tie the other way).
        assert abs(run["driver_test_accuracy"] - run["final_test_accuracy"]) <= 1 / (POOL // 2) + 1e-9
        assert run["wall_seconds"] > 0 and run["seed"] == 3 and run["noise"] == "symmetric:0.25"
        # The host's CPU time during each fit (/proc/stat): the share others took, and the share busy.
        assert 0.0 <= run["host_steal_pct"] < 100.0 and 0.0 < run["host_busy_pct"] <= 100.0
        assert 0.0 <= run["host_plain_pct"] <= run["host_busy_pct"]
        assert 0.0 < run["host_cpu_seconds"] <= (os.cpu_count() or 1) * run["wall_seconds"] * 1.05
        # And the host speed probe, timed before and after it.
        assert len(run["host_probe_seconds"]) == 2 and min(run["host_probe_seconds"]) > 0

    # Test evaluation and checkpoints every --eval-every / --checkpoint-every epochs (5 by default) and after
    # the last: of two epochs, the last only.
    for policy in ("full", "mmdp"):
        history = storage.read_json(f"{out}/runs/symmetric0.25-s3/{policy}/metrics.json")["epochs"]
        assert [h["test_accuracy"] is None for h in history] == [True, False]
        assert [h["checkpoint"] for h in history] == [False, True]

    gt = storage.read_table(f"{out}/data/symmetric0.25-s3/ground_truth.parquet")
    clean = int(pc.sum(pc.equal(gt.column("corruption"), "none")).as_py())
    assert gt.num_rows == POOL and clean == POOL - round(0.25 * POOL)
    oracle = runs["oracle"]
    assert oracle["num_samples"] == clean
    # Each epoch's plan keeps a multiple of the workers (the rest left out at random, with a reason), so the
    # equal split across them forwards every kept sample.
    assert oracle["samples_forwarded"] == (clean - clean % WORKERS) * EPOCHS and oracle["missing"] == 0
    assert runs["full"]["num_samples"] == POOL
    # Replayed last plans: full keeps every row (the pool's noise share), the oracle none of the noisy ones.
    assert runs["full"]["noisy_in_final_plan"] == (POOL - clean) / POOL
    assert oracle["noisy_in_final_plan"] == 0.0
    assert runs["full"]["samples_forwarded"] == (POOL - POOL % WORKERS) * EPOCHS and runs["full"]["missing"] == 0

    # The oracle's scores folder has the score job's layout; noisy rows are rejected with a reason.
    scores = storage.read_table(f"{out}/scores/symmetric0.25-s3-oracle/scores")
    rejects = storage.read_table(f"{out}/scores/symmetric0.25-s3-oracle/rejects")
    assert scores.num_rows == clean and rejects.num_rows == POOL - clean
    assert set(rejects.column("reason").to_pylist()) == {ORACLE_REASON}
    assert sorted(scores.column("index").to_pylist()) == list(range(clean))

    table = open(f"{out}/results.md").read()
    for policy in ("full", "mmdp", "random", "oracle"):
        assert sum(line.startswith(f"| {policy} |") for line in table.splitlines()) == 1
    # The CLIP zero-shot figure comes from the pretraining job's metrics.json.
    assert result["setup"]["clip_zero_shot_accuracy"] == ZERO_SHOT
    assert f"CLIP zero-shot test accuracy {ZERO_SHOT:.4f}" in table
    assert "Host CPU steal (time the hypervisor gave other tenants) during the 4 fits measured here: mean " in table
    assert "A fixed torch workload (one thread) timed before and after each fit took " in table

    # Overhead: one run of each side; the ratio is the one their times give.
    overhead = result["overhead"]
    assert overhead["epochs"] == EPOCHS
    assert overhead["fresh_jobs"] is False  # inside the test session's Ray: every fit in its job
    for measure in ("wall", "epoch", "train", "input", "step", "first_input", "cpu"):
        pruner, plain = overhead["seconds"][measure]["pruner"], overhead["seconds"][measure]["plain"]
        assert len(pruner) == len(plain) == 1 and pruner[0] > 0 and plain[0] > 0
        assert abs(overhead["ratio"][measure] - pruner[0] / plain[0]) <= 5e-4 + 1e-9  # rounded to 3 places
        assert sum(line.startswith(f"| {measure} |") for line in table.splitlines()) == 1
    for side in ("pruner", "plain"):  # rank 0's training time is its waits for batches and its steps, and a little more
        parts = overhead["seconds"]["input"][side][0] + overhead["seconds"]["step"][side][0]
        assert 0 < parts <= overhead["seconds"]["train"][side][0] + 0.02
        assert 0 < overhead["seconds"]["first_input"][side][0] <= overhead["seconds"]["input"][side][0] + 0.01
        assert overhead["seconds"]["cpu"][side][0] <= (os.cpu_count() or 1) * overhead["seconds"]["wall"][side][0]
        assert 0.0 <= overhead["host_steal_pct"][side][0] < 100.0
    # The plain loop checkpointed through the train loop's checkpoint writer, as the pruner's: after the last epoch only.
    assert len(glob.glob(f"{out}/overhead/1-plain/ray/*/checkpoint_*/train.pt")) == 1
    assert "test evaluation every 5 epochs and checkpoints every 5" in table
    assert "Both evaluate every 5 epochs and checkpoint every 5" in table
    summary = {r["policy"]: r for r in result["summary"]}
    assert summary["full"]["speedup_vs_full"] == 1.0
    speedup = runs["full"]["wall_seconds"] / oracle["wall_seconds"]
    assert np.isclose(summary["oracle"]["speedup_vs_full"], speedup, atol=1e-3)
    assert np.isclose(summary["oracle"]["accuracy_mean"], 100 * oracle["final_test_accuracy"], atol=1e-3)
    train_speedup = runs["full"]["train_seconds"] / oracle["train_seconds"]
    assert np.isclose(summary["oracle"]["train_speedup_vs_full"], train_speedup, atol=1e-3)
    cpu_speedup = runs["full"]["host_cpu_seconds"] / oracle["host_cpu_seconds"]
    assert np.isclose(summary["oracle"]["cpu_speedup_vs_full"], cpu_speedup, atol=1e-3)
    assert "| speedup vs full (wall / train / CPU) |" in table

    # A stopped table resumes from its runs' rows alone (run.json), kept without checkpoints or plans.
    kept = tmp_path / "kept"
    for row in glob.glob(f"{out}/runs/*/*/run.json"):
        dest = kept / os.path.relpath(row, out)
        dest.parent.mkdir(parents=True)
        shutil.copy(row, dest)
    assert bench_pruning.main(["--out", str(kept), *args[2:], "--reuse", "--skip-overhead"]) == 0
    resumed = json.loads(open(kept / "results.json").read())
    assert all(r["reused"] for r in resumed["runs"]) and len(resumed["runs"]) == 4
    strip = lambda r: {k: v for k, v in r.items() if k not in ("out", "reused")}  # noqa: E731
    assert [strip(r) for r in resumed["runs"]] == [strip(r) for r in result["runs"]]
    assert resumed["summary"] == result["summary"]
    assert {r["clip_digest"] for r in resumed["runs"]} == {result["setup"]["clip_digest"]}


def test_infobatch_exact_pays_for_its_full_data_epochs_to_match_mmdps_compute():
    # 20 epochs: infobatch_exact trains on everything in epochs 17-19 (InfoBatch's annealing), so its
    # pruning epochs keep less than mmdp's share for the run to forward what mmdp forwarded.
    cfg = parse_config(bench_pruning.BenchPruningConfig, config_parser(bench_pruning.BenchPruningConfig, ""),
                       ["--out", "unused", "--epochs", "20"])
    mmdp = {"num_samples": 1000, "samples_forwarded": 12_000}  # 0.6 of full's 20,000 passes
    assert bench_pruning.matched_keep_ratio(mmdp, cfg, "random") == 0.6
    keep = bench_pruning.matched_keep_ratio(mmdp, cfg, "infobatch_exact")
    assert keep == round(9 / 17, 4)  # 17 epochs at 9/17 and 3 at 1: 12 of 20
    assert abs((17 * keep + 3) * 1000 - mmdp["samples_forwarded"]) < 1
    # A share below what the full-data epochs alone spend cannot be matched: the least keep ratio.
    assert bench_pruning.matched_keep_ratio({"num_samples": 1000, "samples_forwarded": 2000}, cfg,
                                            "infobatch_exact") == 0.001


def test_a_baseline_check_compares_at_equal_compute_and_shows_each_seeds_difference():
    from benchmarks.pruning_tables import check_targets, summarise

    def run(policy, seed, acc, forwarded):
        return {"noise": "pairflip:0.3", "policy": policy, "seed": seed, "final_test_accuracy": acc,
                "wall_seconds": 10.0, "train_seconds": 8.0, "samples_forwarded": forwarded, "num_samples": 1000}

    runs = [run("mmdp", s, a, 12_000) for s, a in ((0, 0.90), (1, 0.88))]
    runs += [run("clip_cut", s, a, 11_960) for s, a in ((0, 0.89), (1, 0.885))]  # 0.3% fewer passes than mmdp
    runs += [run("random", s, a, 11_990) for s, a in ((0, 0.85), (1, 0.86))]  # mmdp's share, rounded
    checks = {c["what"].split(" (")[0]: c for c in check_targets(summarise(runs, ["pairflip:0.3"],
                                                                           ["mmdp", "clip_cut", "random"]), None)}
    cut, rand = checks["pairflip:0.3: mmdp - clip_cut"], checks["pairflip:0.3: mmdp - random"]
    assert cut["value"] == 0.25 and not cut["met"]  # ahead, but on more compute than the rule's
    assert "per seed +1.00 / -0.50" in cut["what"] and "mmdp forwards more" in cut["what"]
    assert rand["value"] == 3.5 and rand["met"] and "per seed +5.00 / +2.00" in rand["what"]


def test_a_kept_row_of_another_code_settings_or_reference_checkpoint_is_trained_again(tmp_path):
    cfg = parse_config(bench_pruning.BenchPruningConfig, config_parser(bench_pruning.BenchPruningConfig, ""),
                       ["--out", str(tmp_path), "--epochs", "20"])
    run_dir = str(tmp_path / "runs" / "mmdp")
    settings = bench_pruning.run_settings(bench_pruning.train_config(cfg, "data", "scores", run_dir, "mmdp", 0),
                                          str(tmp_path))
    assert settings["out"] == "OUT/runs/mmdp" and settings["epochs"] == 20  # a moved benchmark keeps its rows
    row = {"policy": "mmdp", "seed": 0, "final_test_accuracy": 0.9, "clip_digest": "0123abcd",
           "code": bench_pruning.code_version(), "settings": settings}
    storage.write_json(row, storage.join(run_dir, bench_pruning.RUN_SUMMARY))
    assert bench_pruning.kept_row(run_dir, "0123abcd", settings) == row
    assert bench_pruning.kept_row(run_dir, "ffff0000", settings) is None  # another reference checkpoint
    assert not bench_pruning.fit_matches(run_dir, settings, str(tmp_path))  # no committed fit to fall back on
    fewer = bench_pruning.run_settings(bench_pruning.train_config(
        dataclasses.replace(cfg, epochs=10), "data", "scores", run_dir, "mmdp", 0), str(tmp_path))
    assert fewer != settings and bench_pruning.kept_row(run_dir, "0123abcd", fewer) is None  # a 10-epoch table
    storage.write_json({**row, "code": "0123456789ab"}, storage.join(run_dir, bench_pruning.RUN_SUMMARY))
    assert bench_pruning.kept_row(run_dir, "0123abcd", settings) is None  # a row of an earlier commit
    assert bench_pruning.kept_row(str(tmp_path / "missing"), "0123abcd", settings) is None


def test_trajectorys_reference_keys_are_a_seeded_share_of_the_clean_rows(tmp_path):
    data = str(tmp_path / "data")
    with storage.output(data):
        write_dataset(make_synthetic(n=800, seed=2, noise="symmetric:0.3"), data)
    gt = storage.read_table(f"{data}/ground_truth.parquet")
    clean = set(gt.filter(pc.equal(gt.column("corruption"), "none")).column("key").to_pylist())
    drawn = {}
    for seed in (0, 0, 1):
        url = str(tmp_path / f"reference-{seed}.txt")
        count = write_reference_keys(data, url, seed)
        keys = open(url).read().split()
        # REFERENCE_FRACTION of the pool, at least 2 rows, every one clean, one a line.
        assert count == len(keys) == max(2, round(REFERENCE_FRACTION * gt.num_rows)) and set(keys) <= clean
        assert drawn.setdefault(seed, keys) == keys  # the seed fixes the draw
    assert drawn[0] != drawn[1]


def test_shifted_test_copy_is_deterministic_and_differs_from_the_original():
    png = encode_png(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1)))
    a = shift_image(png, np.random.default_rng([1, 2]))
    b = shift_image(png, np.random.default_rng([1, 2]))
    c = shift_image(png, np.random.default_rng([1, 3]))
    assert a == b and a != c and a != png


def _parse(argv: list[str]) -> bench_pruning.BenchPruningConfig:
    config_cls = bench_pruning.BenchPruningConfig
    return parse_config(config_cls, config_parser(config_cls, ""), argv)


def test_noise_and_policy_flags_are_checked(capsys):
    for bad in (["--noise", "symmetric:2"], ["--policies", "full,bogus"], ["--seeds", "x"]):
        try:
            _parse(["--out", "/tmp/unused", *bad])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{bad} was accepted")
        assert bad[0] in capsys.readouterr().err
    cfg = _parse(["--out", "o", "--noise", "none,symmetric:0.2+caption:0.05", "--policies", "oracle,full"])
    assert cfg.noise == ("clean", "symmetric:0.2+caption:0.05") and cfg.policies == ("full", "oracle")
    for bad in (["--baseline-keep-ratio", "0"], ["--step-schedule", "weekly"]):
        try:
            _parse(["--out", "o", *bad])
        except SystemExit as exc:
            assert exc.code == 2 and bad[0] in capsys.readouterr().err
        else:
            raise AssertionError(f"{bad} was accepted")
    assert _parse(["--out", "o"]).seeds == (0, 1, 2)


def test_the_oracles_scores_account_for_every_row_the_score_job_did(tmp_path):
    """The oracle's copy rejects the noisy rows and keeps the score job's own rejects (undecodable images,
    repeated keys), so training finds it accounts for the whole split, as the job's output did."""
    import pyarrow as pa

    from benchmarks.pruning_eval import noisy_keys, write_oracle_scores
    from pipeline.score.commit import write_scores

    data = str(tmp_path / "data")
    write_dataset(make_synthetic(n=80, seed=4, noise={"symmetric": 0.25}), data)
    keys = storage.read_table(f"{data}/train").column("key").to_pylist()
    n = len(keys)
    status = ["rejected" if i % 10 == 0 else "ok" for i in range(n)]  # the job rejected every tenth row
    scores = str(tmp_path / "scores")
    with storage.output(scores):
        job = write_scores(pa.table({"key": keys, "clip_score": np.linspace(0, 1, n, dtype=np.float32),
                                     "clip_margin": np.zeros(n, np.float32), "status": status,
                                     "error": ["undecodable image" if s == "rejected" else "" for s in status]}),
                           scores)
    clean = write_oracle_scores(data, scores, str(tmp_path / "oracle"))
    summary = storage.read_json(str(tmp_path / "oracle" / "summary.json"))
    assert summary["rows_in"] == job["rows_in"] == n
    noisy = set(noisy_keys(data).to_pylist())
    assert clean == sum(s == "ok" and k not in noisy for k, s in zip(keys, status)) > 0
    reasons = dict(zip(*storage.read_table(str(tmp_path / "oracle" / "rejects")).to_pydict().values()))
    assert {k for k, r in reasons.items() if r == "undecodable image"} == {k for k, s in zip(keys, status) if s != "ok"}
    assert {k for k, r in reasons.items() if r == ORACLE_REASON} == {k for k, s in zip(keys, status) if s == "ok"} & noisy
