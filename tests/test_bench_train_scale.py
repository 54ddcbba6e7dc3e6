"""The train-job scale benchmark end to end at a tiny size, as users run it (a subprocess per train job)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline import storage


def _bench(work: str, *flags: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "benchmarks.train_scale", "--sizes", "600", "--policies", "mmdp",
                           "--partitions", "2", "--epochs", "2", "--batch-size", "64", "--rows-per-shard", "200",
                           "--score-rows-per-file", "150", "--interval", "0.2", "--workdir", work, *flags],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_train_scale_runs_real_train_jobs_and_measures_the_pruner(tmp_path):
    work = str(tmp_path / "work")
    done = _bench(work)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    run = lines[0]
    assert (run["rows"], run["policy"], run["partitions"]) == (600, "mmdp", 2)
    # The data and the score table the job trained on: 600 rows in 3 train shards, 4 score files of sorted keys.
    scores = storage.read_table(f"{work}/scores-600/scores")
    assert scores.num_rows == 600 and sorted(scores.column("index").to_pylist()) == list(range(600))
    assert len(storage.read_json(f"{work}/scores-600/scores/_SUCCESS")["files"]) == 4
    assert len(storage.list_files(f"{work}/data-600/train")) == 3
    # The run's own figures, as its metrics.json gives them.
    metrics = storage.read_json(f"{work}/run-600-mmdp-p2/metrics.json")["epochs"]
    assert run["epoch_s"] == [e["epoch_seconds"] for e in metrics] and len(metrics) == 2
    assert run["samples_forwarded"] == [e["samples_forwarded"] for e in metrics]
    # mmdp excludes the low mode (about a fifth) from epoch 0 and prunes by loss from epoch 1.
    assert 0.7 * 600 < run["samples_forwarded"][0] < 0.9 * 600 and run["samples_forwarded"][1] < run["samples_forwarded"][0]
    assert all(p > 0 for p in run["plan_s"]) and all(v is None or v > 0 for v in run["losses_per_s"])
    # Memory of the job's driver, of its pruning actor and of its two partition actors, found by process title.
    assert 0 < run["driver_peak_pss_gb"] < run["tree_peak_pss_gb"]
    assert run["pruner_actor_peak_pss_gb"] > 0 and run["partition_actors_peak_pss_gb"] > 0
    assert "| 600 | mmdp | 2 |" in done.stdout
    # A stopped invocation resumes: the measured run is kept (no train job runs again), its figures the same.
    written = os.stat(f"{work}/run-600-mmdp-p2/metrics.json").st_mtime_ns
    again = _bench(work, "--reuse")
    strip = lambda r: {k: v for k, v in r.items() if k != "config"}  # noqa: E731 (the config says reuse)
    assert [strip(json.loads(line)) for line in again.stdout.splitlines() if line.startswith("{")] == \
        [strip(r) for r in lines]
    assert os.stat(f"{work}/run-600-mmdp-p2/metrics.json").st_mtime_ns == written
