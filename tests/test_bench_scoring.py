"""The scoring benchmarks end to end on the tiny synthetic dataset, as users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobs import score as score_job
from pipeline import storage
from pipeline.data.reference import make_synthetic, write_dataset
from pipeline.prune.policies import noise_count


def _bench(*args: str) -> dict:
    # A process of its own: `efficiency` starts (and stops) a Ray of its own.
    done = subprocess.run([sys.executable, "-m", "benchmarks.scoring", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_efficiency_reports_end_to_end_and_steady_state_rates(tmp_path):
    data = str(tmp_path / "data")
    with storage.output(data):
        write_dataset(make_synthetic(n=256, seed=3), data, rows_per_shard=32)
    result = _bench("efficiency", "--input", f"{data}/train", "--rows", "96", "--base-rows", "32",
                    "--model", "mmdp-tiny", "--batch-size", "16", "--repeats", "1")
    assert (result["rows"], result["base_rows"]) == (96, 32)
    assert (result["actors"], result["threads_per_actor"]) == (2, 1)  # one actor per core of --cpus 2
    for side in ("bare", "ray", "ray_cold"):
        base, rows = result["seconds"][side]["base"], result["seconds"][side]["rows"]
        assert len(base) == (0 if side == "ray_cold" else 1) and len(rows) == 1 and rows[0] > 0
        # The rates are the ones the measured times give (times rounded to 0.1 ms, rates to 0.1 pair/s).
        assert abs(result[f"{side}_pairs_per_s"] - 96 / rows[0]) <= 0.01 * result[f"{side}_pairs_per_s"] + 0.1
        # Beside each time, the host's CPU steal during it (/proc/stat), so a disturbed one shows.
        steal = result["host_steal_pct"][side]
        assert [len(v) for v in steal.values()] == [len(v) for v in result["seconds"][side].values() if v]
        assert all(0.0 <= p < 100.0 for v in steal.values() for p in v)
    # End to end counts Ray's start-up on the Ray side, as the bare loop's imports are counted on its side.
    # Each ratio is of the unrounded rates, to 3 decimals; recomputed from the rates as printed (to 0.1
    # pair/s, a relative error of 0.05/rate each), it may differ by that much.
    bare = result["bare_pairs_per_s"]
    for ratio, side in (("ratio_end_to_end", "ray_cold"), ("ratio_running_cluster", "ray")):
        rate = result[f"{side}_pairs_per_s"]
        assert abs(result[ratio] - rate / bare) <= 1.05 * rate / bare * (0.05 / rate + 0.05 / bare) + 0.0005
    # Where the CPU went, each run on --rows: the bare loop's one process; the cold job's Ray by group,
    # the scoring actors and the driver among them, none of them more than the run's cores could give.
    cpu = result["cpu_seconds_by_process"]
    assert [list(run) for run in cpu["bare"]] == [["bare loop"]] and cpu["bare"][0]["bare loop"] > 0
    (cold,) = cpu["ray_cold"]
    assert {"driver", "scoring actors", "Ray's own processes"} <= set(cold) and cold["scoring actors"] > 0
    assert set(cold) <= {"driver", "scoring actors", "Ray Data helper actors", "Ray's own processes", "other Ray workers"}
    # (The driver's count starts at its process's spawn, a little before its timer: hence the 2 s.)
    assert 0 < sum(cold.values()) <= (os.cpu_count() or 1) * (result["seconds"]["ray_cold"]["rows"][0] + 2.0)
    # The host speed probe (benchmarks.hostload), before and after the runs.
    assert len(result["host_probe_seconds"]) == 2 and min(result["host_probe_seconds"]) > 0
    assert result["config"]["command"] == "efficiency"


@pytest.mark.parametrize("flags, named", [(("--rows", "10", "--base-rows", "10"), "--base-rows"),
                                          (("--cpus", "2", "--actors", "3"), "--actors")])
def test_efficiency_rejects_bad_sizes_by_name(tmp_path, flags, named):
    done = subprocess.run([sys.executable, "-m", "benchmarks.scoring", "efficiency", "--input", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and named in done.stderr


def test_auroc_counts_every_row_against_the_ground_truth(ray_session, tmp_path):
    data, scores = str(tmp_path / "data"), str(tmp_path / "scores")
    with storage.output(data):
        write_dataset(make_synthetic(n=256, seed=4, noise="symmetric:0.25"), data, rows_per_shard=32)
    assert score_job.main(["--input", f"{data}/train", "--output", scores, "--model", "mmdp-tiny",
                           "--mode", "label", "--actor-cpus", "0.5", "--batch-size", "32"]) == 0
    result = _bench("auroc", "--data", data, "--scores", scores)
    truth = storage.read_table(f"{data}/ground_truth.parquet").to_pandas()
    assert result["rows"] == len(truth) == result["scored"] + result["rejected"]
    assert result["noisy_scored"] == int((truth["corruption"] != "none").sum()) > 0
    for column in ("auroc_clip_score", "auroc_clip_margin", "auroc_clip_margin_symmetric"):
        assert 0.0 <= result[column] <= 1.0
    assert result["noise_share_true"] == round(result["noisy_scored"] / result["scored"], 4)
    for column in ("clip_score", "clip_margin"):  # the cut excludes round(share * n) rows, each noisy or clean
        assert result[f"noisy_excluded_{column}"] + result[f"clean_excluded_{column}"] == noise_count(
            result[f"noise_share_{column}"], result["scored"])


def test_noise_share_reads_every_pool_in_both_modes():
    result = _bench("noise-share", "--synthetic", "--pool-size", "64", "--noise",
                    "symmetric:0.3,clean,symmetric:0.2+corrupt_image:0.2", "--seeds", "0", "--clip-model", "mmdp-tiny",
                    "--batch-size", "32")
    pools = result["pools"]
    assert [(p["noise"], p["mode"], p["signal"]) for p in pools] == [
        ("symmetric:0.3", "label", "clip_margin"), ("symmetric:0.3", "caption", "clip_score"),
        ("clean", "label", "clip_margin"), ("clean", "caption", "clip_score"),
        ("symmetric:0.2+corrupt_image:0.2", "label", "clip_margin"),
        ("symmetric:0.2+corrupt_image:0.2", "caption", "clip_score")]
    truth = make_synthetic(n=128, seed=0, noise="symmetric:0.3").ground_truth.to_pandas()
    assert pools[0]["true_share"] == round(float((truth["corruption"] != "none").mean()), 4) > 0
    for p in pools:
        assert p["noisy_excluded"] + p["clean_excluded"] == noise_count(p["estimated_share"], p["rows"])
        assert p["estimated_share"] >= p["otsu_share"]  # the tail bound only ever raises Otsu's cut
    assert all(p["rows"] == 64 and p["unscored"] == 0 for p in pools[:4])
    assert pools[2]["true_share"] == 0 and pools[2]["noisy_excluded"] == 0 and pools[2]["auroc"] is None
    # Corrupt images cannot be scored: counted apart, in each mode, and left out of the shares.
    corrupt = make_synthetic(n=128, seed=0, noise="symmetric:0.2,corrupt_image:0.2").ground_truth.to_pandas()
    broken = int((corrupt["corruption"] == "corrupt_image").sum())
    for p in pools[4:]:
        assert p["unscored"] == broken > 0 and p["rows"] == 64 - broken
        assert p["true_share"] == round(float((corrupt["corruption"] == "symmetric").sum()) / (64 - broken), 4)
