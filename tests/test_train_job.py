"""Ray Train with the pruning actor, end to end on the tiny synthetic dataset (2 CPU workers)."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import pathlib
import signal
import threading
import time
import types

import numpy as np
import pyarrow as pa
import pytest

from benchmarks.pruning_eval import evaluate_checkpoint
from jobs import score as score_job
from jobs import train as train_job
from pipeline import storage
from pipeline.cli import config_parser, parse_config
from pipeline.prune.budget import EVEN_SPLIT
from pipeline.prune.policies import POLICIES
from pipeline.train.config import TrainConfig
from pipeline.train.driver import fit, start_pruning
from pipeline.train.loop import PhaseClock, cosine_lr, epoch_batch_size
from pipeline.data.reference import make_synthetic, write_dataset
from benchmarks.procmem import cmdline, tree
from shardfiles import write_img2dataset


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data, scores = str(root / "data"), str(root / "scores")
    with storage.output(data):
        write_dataset(make_synthetic(n=400, seed=5), data, rows_per_shard=50)
    return data, scores


@pytest.fixture(scope="module")
def scored_ready(ray_session, scored):
    data, scores = scored
    assert score_job.main(["--input", f"{data}/train", "--output", scores, "--model", "mmdp-tiny",
                           "--mode", "label", "--actor-cpus", "0.5", "--batch-size", "64"]) == 0
    return data, scores


def _train_argv(data, scores, out, *extra) -> list[str]:
    policy = extra[extra.index("--policy") + 1] if "--policy" in extra else "mmdp"
    budget = ["--keep-ratio", "0.5"] if POLICIES[policy].uses_keep_ratio else []  # the others refuse one
    return ["--data", data, "--scores", scores, "--out", str(out), "--epochs", "4", "--workers", "2",
            "--batch-size", "16", *budget, "--warmup-steps", "2", *extra]


def _train(data, scores, out, *extra):
    assert train_job.main(_train_argv(data, scores, out, *extra)) == 0
    return json.loads(open(f"{out}/metrics.json").read()), json.loads(open(f"{out}/plans.json").read())


def test_each_kept_sample_reports_exactly_one_loss(scored_ready, tmp_path):
    data, scores = scored_ready
    metrics, plans = _train(data, scores, tmp_path / "run", "--policy", "mmdp")
    n = metrics["totals"]["num_samples"]
    assert n == 200 and len(metrics["epochs"]) == 4
    for epoch in metrics["epochs"]:
        # Plans keep a multiple of the 2 workers, so Ray Train's equal split leaves none of them out.
        kept = epoch["plan_kept"]
        assert kept % 2 == 0 and epoch["plan_missing"] == 0 and epoch["plan_outside_plan"] == 0
        assert epoch["plan_received"] == epoch["plan_reported"] == epoch["samples_forwarded"] == kept
    # Epoch 0 trains on every sample not excluded as noise (one fewer if they are odd, under its own
    # reason); later ones prune well-learned samples, never below half of the eligible ones.
    excluded = int(np.floor(metrics["totals"]["policy_params"]["noise_fraction"] * n + 0.5))
    kept = [e["plan_kept"] for e in metrics["epochs"]]
    assert kept[0] == n - excluded - (n - excluded) % 2 and all(k >= (n - excluded) // 2 - 1 for k in kept)
    for entry, k in zip(plans, kept):
        assert entry["kept"] == k and sum(entry["pruned_by_reason"].values()) == n - k
        assert entry["pruned_by_reason"].get(EVEN_SPLIT, 0) <= 1
    # The schedule: every epoch takes an unpruned epoch's steps (200 rows, 2 workers of 16: 7),
    # on batches shrunk with the plan; the learning rate follows the epochs.
    for e in metrics["epochs"]:
        assert e["batch_size"] == epoch_batch_size(e["plan_kept"], n, 16, 2, "full")
        assert e["steps"] == math.ceil((e["plan_kept"] // 2) / e["batch_size"]) <= 7
        assert e["lr"] == pytest.approx(0.1 * cosine_lr((e["epoch"] + 1) * 7, 4 * 7, 2), rel=1e-6)
    # Rank 0's training time split by phase: the phases fit inside it, and every step was timed.
    phases = [f"{phase}_seconds" for phase in PhaseClock.PHASES]
    for e in metrics["epochs"]:
        assert e["step_seconds"] > 0 and e["input_seconds"] > 0
        assert sum(e[k] for k in phases) <= e["train_seconds"] + 0.01
    for k in phases:
        assert metrics["totals"][k] == pytest.approx(sum(e[k] for e in metrics["epochs"]), abs=0.02)
    assert [p["epoch"] for p in plans] == [0, 1, 2, 3]
    # The two workers split the test split between them: one exact pass, every epoch.
    test_rows = storage.read_json(f"{data}/metadata.json")["splits"]["test"]
    assert test_rows > 0 and [e["test_rows"] for e in metrics["epochs"]] == [test_rows] * 4
    # The reported accuracy is the checkpointed model's (rank 0's weights and BatchNorm statistics).
    # (benchmarks.pruning_eval.evaluate_checkpoint: the pruning benchmark's own recomputation, in this process.)
    run_cfg = types.SimpleNamespace(**storage.read_json(str(tmp_path / "run" / "config.json")))
    recomputed = evaluate_checkpoint(str(tmp_path / "run"), data, run_cfg)["driver_test_accuracy"]
    assert recomputed == pytest.approx(metrics["epochs"][-1]["test_accuracy"], abs=1e-9)
    # The run folder is a committed output with the resolved config beside the metrics.
    assert storage.is_complete(str(tmp_path / "run"))
    assert storage.read_json(str(tmp_path / "run" / "config.json"))["policy"] == "mmdp"


# A fixed noise fraction: the plans then vary with the losses every epoch (the test is about them).
COMMON = ["--policy", "mmdp", "--workers", "1", "--preserve-order", "--seed", "7", "--noise-fraction", "0.2"]


@pytest.fixture(scope="module")
def uninterrupted(scored_ready, tmp_path_factory):
    """Per-epoch kept digests of a run with no fault (one worker, rows in file order: reproducible)."""
    data, scores = scored_ready
    _, plans = _train(data, scores, tmp_path_factory.mktemp("full") / "run", *COMMON)
    digests = {p["epoch"]: p["kept_sha256"] for p in plans}
    # The mmdp plans depend on the losses, so equal digests mean equal training, not just equal seeds.
    assert len(set(digests.values())) == 4
    return digests


def test_checkpoints_every_k_epochs_and_after_the_last_and_a_resumed_run_repeats_the_plans(
        scored_ready, uninterrupted, tmp_path, capsys):
    data, scores = scored_ready
    first, _ = _train(data, scores, tmp_path / "part", *COMMON, "--checkpoint-every", "2", "--stop-after", "3",
                      "--eval-every", "2")
    # Every epoch is reported; a checkpoint was saved after epoch 1 (every 2nd) and after epoch 2 (the last run).
    assert [e["epoch"] for e in first["epochs"]] == [0, 1, 2]
    assert [e["checkpoint"] for e in first["epochs"]] == [False, True, True]
    # Evaluated likewise: every 2nd epoch and the last this run trains, so a stopped run has a final accuracy.
    assert [e["test_accuracy"] is not None for e in first["epochs"]] == [False, True, True]
    assert first["totals"]["final_test_accuracy"] is not None
    saved = sorted(json.loads(open(f"{c}/history.json").read())[-1]["epoch"]
                   for c in glob.glob(f"{tmp_path}/part/ray/*/checkpoint_*") if os.path.isdir(c))
    assert saved == [1, 2]
    # The pruner saved its state in the run folder, beside the checkpoints that name it (the last two).
    assert sorted(os.listdir(tmp_path / "part" / "pruner")) == ["epoch-0001", "epoch-0002"]
    # The run folder moved whole still resumes: its checkpoint finds the pruner state beside it.
    os.rename(tmp_path / "part", tmp_path / "moved")
    checkpoint = str(tmp_path / "moved" / "checkpoint")
    # A resume continues the run: flags that change what or how it trains are refused before anything starts.
    for flags, says in ((["--batch-size", "8"], "--batch-size 16 (this run: 8)"),
                        (["--seed", "8", "--lr", "0.05"], "--seed 7 (this run: 8), --lr 0.1 (this run: 0.05)")):
        rc = train_job.main([*_train_argv(data, scores, tmp_path / "moved", *COMMON, "--checkpoint-every", "2",
                                          "--resume-from", checkpoint), *flags])
        err = capsys.readouterr().err
        assert rc == 2 and f"its run trained with {says}" in err, err
        assert storage.is_complete(str(tmp_path / "moved"))  # refused before the folder was touched
    called = time.perf_counter()
    resumed, resumed_plans = _train(data, scores, tmp_path / "resumed", *COMMON, "--checkpoint-every", "2",
                                    "--resume-from", checkpoint)
    called = time.perf_counter() - called
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2, 3]  # history carried over, no epoch twice
    assert resumed["totals"]["restarts"] == 0  # a resume the user asked for is not a failure
    # Wall time counts the whole fit: the stopped run's up to its checkpoint, then this run's.
    walls = [e["wall_seconds"] for e in resumed["epochs"]]
    assert walls[:3] == [e["wall_seconds"] for e in first["epochs"]] and walls == sorted(walls)
    assert walls[3] >= walls[2] + resumed["epochs"][3]["epoch_seconds"]
    assert resumed["totals"]["wall_seconds"] >= walls[3] > called  # more than this run alone took
    # The plan log is carried over with the checkpoint; the resumed epochs repeat the uninterrupted plans.
    assert {p["epoch"]: p["kept_sha256"] for p in resumed_plans} == uninterrupted
    # A resume with no epoch left before --stop-after is refused before training (it trained none, then crashed).
    for stop in ("3", "2"):
        rc = train_job.main(_train_argv(data, scores, tmp_path / f"stop-{stop}", *COMMON, "--checkpoint-every", "2",
                                        "--resume-from", checkpoint, "--stop-after", stop))
        err = capsys.readouterr().err
        assert rc == 2 and f"has 3 epochs trained, so none is left to train with --stop-after {stop}" in err, err
        assert not (tmp_path / f"stop-{stop}" / "ray").exists()  # no trainer started


def test_a_killed_run_resumes_from_its_folder_at_its_latest_whole_checkpoint_relative_paths_naming_the_callers(
        scored_ready, uninterrupted, tmp_path, monkeypatch, capsys):
    """A run copies its checkpoint to OUT/checkpoint once it ends: a driver killed before that left none there
    (jobs.train's help said to resume from it), only Ray Train's, one of them perhaps copied in part.
    Ray Train runs each worker in a session folder of its own: ``--out run`` and ``--resume-from run`` still
    name the folders under the caller's working directory, so old pruner states are removed there and the
    resume finds its checkpoint."""
    data, scores = scored_ready
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    _train(data, scores, "run", *COMMON, "--checkpoint-every", "1", "--stop-after", "3")
    assert sorted(os.listdir(out / "pruner")) == ["epoch-0001", "epoch-0002"]  # the last two
    # What a driver killed after epoch 2's checkpoint, during its copy, leaves: the folder pending, no
    # checkpoint/, and Ray Train's newest checkpoint in part.
    storage.remove(str(out / "checkpoint"))
    storage.begin_output(str(out))
    kept = {json.loads(open(f"{c}/history.json").read())[-1]["epoch"]: c
            for c in glob.glob(f"{out}/ray/*/checkpoint_*") if os.path.isdir(c)}
    assert sorted(kept) == [1, 2]
    train_pt = pathlib.Path(kept[2]) / "train.pt"
    size = train_pt.stat().st_size
    train_pt.write_bytes(train_pt.read_bytes()[:size // 2])
    # Named directly, the checkpoint in part is refused before anything starts, saying what is short.
    rc = train_job.main(_train_argv(data, scores, "run", *COMMON, "--resume-from", kept[2]))
    err = capsys.readouterr().err
    assert rc == 2 and f"the checkpoint is in part (train.pt {size // 2:,} bytes of {size:,})" in err, err
    # The run folder, relative: its latest whole checkpoint, epoch 1's; the resumed epochs repeat the
    # uninterrupted plans. Its pruner states: the newest pair, and the one the resumed checkpoint names (epoch 1),
    # kept while this run might yet die before a newer pair exists.
    resumed, plans = _train(data, scores, "run", *COMMON, "--checkpoint-every", "1", "--resume-from", "run")
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2, 3]
    assert {p["epoch"]: p["kept_sha256"] for p in plans} == uninterrupted
    assert storage.is_complete(str(out)) and (out / "checkpoint" / "train.pt").exists()
    assert sorted(os.listdir(out / "pruner")) == ["epoch-0001", "epoch-0002", "epoch-0003"]
    rc = train_job.main(_train_argv(data, scores, tmp_path / "other", *COMMON, "--resume-from", str(tmp_path)))
    assert rc == 2 and "no checkpoint there, nor a whole one in its run folder's checkpoint/" in capsys.readouterr().err
    # A new run in that folder (not resuming) replaces the earlier ones': none of their pruner states, Ray
    # Train folders or checkpoints stays beside its own (its manifest would list them).
    earlier = set(os.listdir(out / "ray"))
    assert len(earlier) == 2
    again, _ = _train(data, scores, "run", *COMMON, "--checkpoint-every", "1", "--stop-after", "1")
    assert [e["epoch"] for e in again["epochs"]] == [0]
    assert sorted(os.listdir(out / "pruner")) == ["epoch-0000"]
    now = set(os.listdir(out / "ray"))
    assert len(now) == 1 and not now & earlier
    assert storage.read_json(str(out / "checkpoint" / "pruner_state.json"))["in_run"] == "pruner/epoch-0000"


def test_a_run_an_older_mmdp_saved_with_a_budget_its_policy_does_not_read_resumes(scored_ready, tmp_path):
    """An older mmdp recorded --keep-ratio 0.6 for every policy; a policy without a budget now refuses one, so
    a resume that asked for the same flags could not be started at all."""
    data, scores = scored_ready
    flags = ["--policy", "full", "--workers", "1", "--epochs", "2"]
    part, _ = _train(data, scores, tmp_path / "part", *flags, "--stop-after", "1")
    run_config = tmp_path / "part" / "checkpoint" / "run_config.json"
    was = json.loads(run_config.read_text())
    assert was["keep_ratio"] is None
    run_config.write_text(json.dumps({**was, "keep_ratio": 0.6}))  # as the older mmdp wrote it, and
    (run_config.parent / "files.json").unlink()  # without the list of the checkpoint's files
    resumed, _ = _train(data, scores, tmp_path / "resumed", *flags, "--resume-from", str(run_config.parent))
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1]
    assert resumed["epochs"][0] == part["epochs"][0]  # epoch 0 came back from the checkpoint, not trained again


def test_a_run_that_fails_in_training_stops_its_pruning_actor(scored_ready, tmp_path):
    """The actor holds the pool's per-sample state under the run's name: a failed fit left it alive in the
    driver's Ray (a benchmark's or a notebook's, which go on to other runs)."""
    import ray
    import shutil

    data, scores = scored_ready
    bad = str(tmp_path / "data")
    shutil.copytree(data, bad)
    test = storage.read_table(storage.join(bad, "test"))
    images = test.column("image").to_pylist()
    images[0] = b"not an image"  # the first evaluation fails, inside training (no footer tells it before)
    storage.write_shards(test.set_column(test.schema.get_field_index("image"), "image", pa.array(images, pa.binary())),
                         storage.join(bad, "test"))
    pruners = lambda: {n for n in ray.util.list_named_actors() if n.startswith("mmdp-pruner-")}  # noqa: E731
    before = pruners()
    with pytest.raises(Exception, match="Training failed"):  # Ray Train's error, the worker's inside
        train_job.main(["--data", bad, "--scores", scores, "--out", str(tmp_path / "run"), "--epochs", "1",
                        "--workers", "1", "--batch-size", "16", "--max-failures", "0"])
    deadline = time.monotonic() + 30
    while pruners() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pruners() - before


def test_trajectory_policy_reads_its_reference_keys_and_resumes_with_its_loss_history(scored_ready, tmp_path):
    """The AlignPrune baseline through jobs.train: InfoBatch's rule until three epochs of losses exist,
    then misaligned trajectories pruned; the loss history rides in the checkpoint, so a resumed run
    plans as the uninterrupted one."""
    data, scores = scored_ready
    keys = sorted(storage.read_table(f"{scores}/scores", columns=["key"]).column("key").to_pylist())[::50]
    (tmp_path / "reference.txt").write_text("\n".join(keys) + "\n")
    flags = ["--policy", "trajectory", "--reference-keys", str(tmp_path / "reference.txt"), "--workers", "1",
             "--preserve-order", "--seed", "3", "--epochs", "5", "--checkpoint-every", "3"]
    metrics, plans = _train(data, scores, tmp_path / "whole", *flags)
    assert [e["plan_kept"] for e in metrics["epochs"]][0] == 200
    assert set(plans[1]["pruned_by_reason"]) == {"well learned (low loss)"}
    assert set(plans[3]["pruned_by_reason"]) == {"loss trajectory unlike the clean reference's"}
    assert plans[3]["kept"] < 200
    # The last epoch trains on everything: InfoBatch's full-data epochs, e + 1 > 0.875 * 5.
    assert plans[4]["kept"] == 200 and not any(plans[4]["pruned_by_reason"].values())
    # Resumed from the run's checkpoint after epoch 2 (Ray Train's own folder of it), epochs 3 and 4 plan as before.
    (middle,) = [c for c in glob.glob(f"{tmp_path}/whole/ray/*/checkpoint_*/")
                 if json.loads(open(f"{c}/history.json").read())[-1]["epoch"] == 2]
    resumed_metrics, resumed = _train(data, scores, tmp_path / "resumed", *flags, "--resume-from", middle)
    assert [e["epoch"] for e in resumed_metrics["epochs"]] == [0, 1, 2, 3, 4]
    assert [p["kept_sha256"] for p in resumed] == [p["kept_sha256"] for p in plans]
    with pytest.raises(SystemExit):  # the policy needs its reference, and only it takes one
        train_job.main(["--data", data, "--scores", scores, "--out", str(tmp_path / "x"), "--policy", "trajectory"])


def _processes(title: str) -> list[int]:
    """This test session's processes titled ``title``, itself excluded, the latest started first: the run's
    own (an actor an earlier test left to Ray's clean-up may still hold the title)."""
    return sorted((pid for pid in tree(os.getpid())[1:] if cmdline(pid).startswith(title)), key=_started,
                  reverse=True)


def _started(pid: int) -> int:
    """When the process started (clock ticks after boot; 0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[19])  # the 22nd field; the name may hold spaces


def _checkpointed_after(out, retries: int) -> bool:
    """Whether Ray Train holds a checkpoint saved by a run that had retried ``retries`` times or more."""
    for directory in glob.glob(f"{out}/ray/*/checkpoint_*"):
        try:
            history = json.loads(open(f"{directory}/history.json").read())
        except (OSError, ValueError):  # not a checkpoint, or not written whole yet
            continue
        if history and history[-1]["restarts"] >= retries:
            return True
    return False


def _kill_in_turn(out, titles: list[str], killed: list, timeout_s: float = 120.0):
    """SIGKILL the processes titled ``titles``, one after another: each once a checkpoint exists that
    was saved after the kills before it (the first: once epoch 0's is saved, when epoch 1 is under way;
    the next: once the retried run has saved one of its own)."""
    deadline = time.monotonic() + timeout_s
    for retries, title in enumerate(titles):
        while time.monotonic() < deadline:
            if _checkpointed_after(out, retries) and (pids := _processes(title)):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(title)
                break
            time.sleep(0.05)


@pytest.mark.parametrize("titles, extra", [
    (["ray::PruningActor"], []),
    (["ray::RayTrainWorker"], ["--checkpoint-every", "2"]),
    # Two faults in one run: a partition actor, then (once the retried run has checkpointed) the
    # coordinating actor of the pruner split in three.
    (["ray::PartitionActor", "ray::PruningActor"], ["--pruner-partitions", "3"]),
], ids=["pruning-actor", "train-worker-checkpoint-every-2", "partition-actor-then-split-pruning-actor"])
def test_a_killed_process_mid_run_costs_a_retry_not_the_run_or_its_plans(scored_ready, uninterrupted, tmp_path,
                                                                         titles, extra):
    data, scores = scored_ready
    out, killed = tmp_path / "run", []
    killer = threading.Thread(target=_kill_in_turn, args=(out, titles, killed))
    killer.start()
    metrics, plans = _train(data, scores, out, *COMMON, *extra)
    killer.join()
    assert killed == titles, f"killed {killed}, meant to kill {titles}"
    # Ray restarted what died; the run went back to the last checkpoint (pruner state
    # included), trained the lost epochs again and counted each once.
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2, 3]
    # One retry a fault, counted: epochs recorded before the first kill at 0, each later one at the
    # retries so far (the first kill may land before epoch 0's checkpoint is registered: then every
    # epoch is at 1 or more).
    restarts = [e["restarts"] for e in metrics["epochs"]]
    assert metrics["totals"]["restarts"] == len(titles) == restarts[-1] and restarts == sorted(restarts)
    # Every kept sample's loss reached the pruner exactly once, the retried epochs included.
    assert all(e["plan_received"] == e["plan_reported"] == e["plan_kept"] == e["samples_forwarded"]
               for e in metrics["epochs"])
    # The plans are the uninterrupted run's (for a split pruner: the single actor's).
    assert {p["epoch"]: p["kept_sha256"] for p in plans} == uninterrupted
    if "--pruner-partitions" in extra:
        # Each partition actor saved its own part; only the states of the checkpoints Ray keeps are left.
        assert sorted(os.listdir(out / "pruner")) == ["epoch-0002", "epoch-0003"]
        assert sorted(glob.glob("part-*.npz", root_dir=out / "pruner" / "epoch-0003")) == [
            "part-00000.npz", "part-00001.npz", "part-00002.npz"]
    print(f"{titles} killed: epochs {len(metrics['epochs'])}/4, restarts {metrics['totals']['restarts']}, kept {sum(e['plan_kept'] for e in metrics['epochs'])}"
          f" = losses received {sum(e['plan_received'] for e in metrics['epochs'])}, plans equal to the uninterrupted run")


def _example(name: str):
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_loop_example_trains_its_own_model_on_the_plans(scored_ready, tmp_path):
    """examples/own_loop.py: a model, loss and optimiser not in pipeline/, pruned through the public API."""
    data, scores = scored_ready
    own_loop = _example("own_loop")
    summary = own_loop.main(["--data", data, "--scores", scores, "--out", str(tmp_path / "ray"), "--epochs", "3",
                             "--workers", "1", "--batch-size", "32"])
    n, epochs = summary["num_samples"], summary["epochs"]
    assert n == 200 and [e["epoch"] for e in epochs] == [0, 1, 2]
    for e in epochs:  # the loop trained on exactly the plan's rows and reported each one's loss once
        assert e["samples"] == e["plan_kept"] == e["plan_losses_received"] and math.isfinite(e["train_loss"])
    excluded = int(np.floor(summary["params"]["noise_fraction"] * n + 0.5))
    assert epochs[0]["plan_kept"] == n - excluded  # epoch 0: every sample not excluded as noise
    assert all((n - excluded) // 2 <= e["plan_kept"] <= n - excluded for e in epochs[1:])
    # Its plans are jobs.train's: the pruner jobs.train sets up for the same seed and policy plans the same
    # epoch 0 (mmdp's later plans follow each model's own losses), and every epoch alike where the policy
    # does not look at losses. jobs.train's flags (their defaults: the API's budget) as its parser reads them.
    assert summary["plans"][0]["kept_sha256"] == _job_plans(data, scores, "mmdp", 1, 0)[0]["kept_sha256"]
    random = own_loop.main(["--data", data, "--scores", scores, "--out", str(tmp_path / "ray-random"), "--epochs", "3",
                            "--workers", "1", "--batch-size", "32", "--policy", "random", "--seed", "4"])
    digests = [p["kept_sha256"] for p in random["plans"]]
    assert len(set(digests)) == 3 and digests == [p["kept_sha256"] for p in _job_plans(data, scores, "random", 3, 4)]


@pytest.mark.parametrize("partitions", [None, 2])
def test_an_own_loop_is_stopped_by_a_restarted_pruner_until_it_restores_the_saved_state(scored_ready, tmp_path,
                                                                                        partitions):
    """Ray restarts a crashed pruning actor from its creation arguments: an own loop went on, unsaid, with plans
    made from no losses (jobs.train fails the attempt and resumes from its checkpoint). A split pruner's new
    partition actors then take the ranks' losses (their reporters' routes named the old ones)."""
    import ray

    from pipeline.train.pruning import Pruning, PrunerRestartedError

    import pickle

    _, scores = scored_ready
    pruning = Pruning.from_scores(scores, policy="infobatch", epochs=3,  # its epoch 1 follows epoch 0's losses
                                  num_partitions=partitions)
    other_rank = pickle.loads(pickle.dumps(pruning))  # another worker's side, as Ray Train hands it over
    try:
        kept = pruning.start_epoch(0)
        other_rank.end_epoch()  # it saw the actor too
        pruning.report(np.arange(pruning.num_samples), np.linspace(0.1, 2.0, pruning.num_samples))
        pruning.end_epoch()
        state = str(tmp_path / "pruner")
        pruning.save_state(state)
        expected = ray.get(ray.get(pruning.actor.plan_ref.remote(1))[0])[0].copy()  # epoch 1's kept indices
        ray.kill(pruning.actor, no_restart=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if ray.get(pruning.actor.info.remote())["reconstructed"]:
                    break
            except ray.exceptions.RayActorError:
                pass
            time.sleep(0.2)
        with pytest.raises(PrunerRestartedError, match="the pruning actor restarted \\(epoch 1\\)"):
            pruning.start_epoch(1)
        with pytest.raises(PrunerRestartedError):
            pruning.save_state(str(tmp_path / "empty"))  # the empty state is not checkpointed over the saved one
        without_losses = ray.get(ray.get(pruning.actor.plan_ref.remote(1))[0])[0]
        assert len(without_losses) == kept and len(expected) < kept  # what the loop would have trained on
        with pytest.raises(PrunerRestartedError):
            other_rank.end_epoch()
        retried = pickle.loads(pickle.dumps(pruning))  # a worker Ray Train starts afresh: its first check refuses too
        with pytest.raises(PrunerRestartedError):
            retried.start_epoch(1)
        pruning.load_state(state)  # one rank restores: every rank goes on
        assert other_rank.end_epoch() == 0
        assert pruning.start_epoch(1) == len(expected)
        np.testing.assert_array_equal(ray.get(ray.get(pruning.actor.plan_ref.remote(1))[0])[0], expected)
        assert other_rank.start_epoch(1) == len(expected)
        for rank, part in ((pruning, expected[::2]), (other_rank, expected[1::2])):
            rank.report(part, np.full(len(part), 0.5))
        assert pruning.end_epoch() == len(expected[::2]) and other_rank.end_epoch() == len(expected[1::2])
        assert pruning.epoch_summary(1)["plan_losses_received"] == len(expected)
    finally:
        pruning.shutdown()


def _job_plans(data, scores, policy: str, epochs: int, seed: int) -> list[dict]:
    """The first ``epochs`` plans of the pruner ``jobs.train`` starts for a 3-epoch run (no losses reported)."""
    cfg = parse_config(TrainConfig, config_parser(TrainConfig, ""), [
        "--data", data, "--scores", scores, "--out", "unused", "--policy", policy, "--epochs", "3", "--seed", str(seed)])
    pruning = start_pruning(cfg)
    try:
        for epoch in range(epochs):
            pruning.start_epoch(epoch)
            pruning.end_epoch()
        return pruning.plan_log()
    finally:
        pruning.shutdown()


def test_trains_on_img2dataset_tars_in_s3_reading_only_kept_samples(ray_session, s3_bucket, capsys):
    """img2dataset's webdataset tars (KEY.jpg, KEY.txt, KEY.cls as text) read from S3, labels from ``cls``, class
    names from --classes: no conversion step. Each epoch reads the kept samples by offset (an index per tar,
    built once in the run folder) and forwards every one of them."""
    synthetic = make_synthetic(n=160, seed=8)
    root, scores, run = (storage.join(s3_bucket, name) for name in ("img2dataset", "scores", "run"))
    write_img2dataset(synthetic, root, tars=True)
    classes = ",".join(synthetic.metadata["classes"])
    assert score_job.main(["--input", storage.join(root, "train"), "--output", scores, "--model", "mmdp-tiny",
                           "--columns", "img2dataset", "--mode", "label", "--classes", classes,
                           "--actor-cpus", "0.5", "--batch-size", "32"]) == 0
    assert train_job.main(["--data", root, "--scores", scores, "--out", run, "--columns", "img2dataset",
                           "--classes", classes, "--workers", "1", "--epochs", "2", "--batch-size", "16",
                           "--warmup-steps", "2", "--policy", "random", "--keep-ratio", "0.5"]) == 0
    metrics = storage.read_json(storage.join(run, "metrics.json"))
    assert not storage.exists(storage.join(root, "metadata.json"))
    assert metrics["totals"]["num_samples"] == synthetic.splits["train"].num_rows
    assert [e["samples_forwarded"] for e in metrics["epochs"]] == [e["plan_kept"] for e in metrics["epochs"]]
    assert all(e["plan_kept"] < metrics["totals"]["num_samples"] for e in metrics["epochs"])
    tars = storage.list_files(storage.join(root, "train"), (".tar",))
    assert len(storage.list_files(storage.join(run, "tar_index"))) == len(tars) > 1
    assert [e["test_rows"] for e in metrics["epochs"]] == [synthetic.splits["test"].num_rows] * 2
    assert all(0.0 <= e["test_accuracy"] <= 1.0 for e in metrics["epochs"])
    # Scores of one tar of the split: tars no mmdp job committed say their sample count in their offset
    # indexes only; the other tars' samples would not be trained on, unsaid (exit 0 before). Refused before
    # the run folder is touched: the run above stays committed.
    one, other = storage.join(s3_bucket, "scores-one-tar"), run
    assert score_job.main(["--input", tars[0], "--output", one, "--model", "mmdp-tiny", "--columns", "img2dataset",
                           "--mode", "label", "--classes", classes, "--actor-cpus", "0.5", "--batch-size", "32"]) == 0
    scored = storage.read_json(storage.join(one, "summary.json"))["rows_in"]
    assert train_job.main(["--data", root, "--scores", one, "--out", other, "--columns", "img2dataset",
                           "--classes", classes, "--workers", "1", "--epochs", "1", "--policy", "full"]) == 2
    assert (f"--scores {one} scored or rejected {scored:,} rows (its summary.json), but {root}/train holds "
            f"{synthetic.splits['train'].num_rows:,} (its tars' offset indexes)") in capsys.readouterr().err
    assert storage.is_complete(run) and storage.read_json(storage.join(run, "metrics.json")) == metrics


def test_train_without_class_names_is_a_clear_error(scored_ready, tmp_path, capsys):
    data, scores = scored_ready
    (tmp_path / "data").mkdir()
    rc = train_job.main(["--data", str(tmp_path / "data"), "--scores", scores, "--out", str(tmp_path / "run")])
    assert rc == 2 and "pass --classes" in capsys.readouterr().err


def test_a_run_folder_over_its_inputs_or_scores_of_other_rows_are_refused_before_anything_starts(
        scored_ready, tmp_path, capsys):
    from pipeline.score.commit import write_scores

    data, scores = scored_ready
    # Scores of 50 of the split's 200 rows: the other 150 would not be trained on, unsaid.
    part = str(tmp_path / "part-scores")
    with storage.output(part):
        write_scores(storage.read_table(f"{scores}/scores").slice(0, 50), part)
    for argv, says in ((_train_argv(data, scores, scores), f"--out {scores} and --scores {scores} overlap"),
                       (_train_argv(data, scores, f"{data}/train/a"), f"--out {data}/train/a and --data {data} overlap"),
                       (_train_argv(data, f"{scores}-typo", tmp_path / "run"), f"{scores}-typo/scores: no such file"),
                       (_train_argv(data, part, tmp_path / "run"),
                        f"--scores {part} scored or rejected 50 rows (its summary.json), but {data}/train holds 200")):
        assert train_job.main(argv) == 2
        assert says in capsys.readouterr().err
    assert storage.is_complete(scores) and storage.is_complete(data) and not (tmp_path / "run").exists()


def test_resuming_from_a_folder_that_is_not_this_mmdps_checkpoint_is_a_clear_error(scored_ready, tmp_path, capsys):
    data, scores = scored_ready
    empty, old = tmp_path / "empty", tmp_path / "old"
    empty.mkdir()
    old.mkdir()
    for name in ("train.pt", "pruner.pt", "history.json", "plans.json"):  # the layout before pruner_state.json
        (old / name).write_bytes(b"")
    for folder, says in ((empty, "no checkpoint there"), (old, "an older mmdp wrote it")):
        rc = train_job.main(["--data", data, "--scores", scores, "--out", str(tmp_path / f"run-{folder.name}"),
                             "--resume-from", str(folder)])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and str(folder) in err


def _usage_error(argv: list[str], capsys) -> str:
    """jobs.train's message for a command line it refuses as a usage error (exit code 2, before Ray)."""
    with pytest.raises(SystemExit) as exc:
        parse_config(TrainConfig, config_parser(TrainConfig, ""), ["--data", "d", "--scores", "s", "--out", "o", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    return err


def test_policy_params_the_policy_does_not_take_are_a_usage_error_naming_them(capsys):
    """Checked by building the policy, as the pruning actor does, not found by a failed run after Ray started."""
    assert "policy mmdp has no parameter bogus" in _usage_error(["--policy-params", "bogus=1"], capsys)
    assert "loss_weight must be in [0, 1], got 2" in _usage_error(["--policy-params", "loss_weight=2"], capsys)
    err = _usage_error(["--policy", "full", "--policy-params", "prune_prob=0.3"], capsys)
    assert "policy full has no parameter prune_prob" in err
    err = _usage_error(["--policy", "infobatch", "--policy-params", "loss_weight=0.3"], capsys)
    assert "policy infobatch has no parameter loss_weight (its parameters: prune_prob, delta)" in err
    cfg = parse_config(TrainConfig, config_parser(TrainConfig, ""), [
        "--data", "d", "--scores", "s", "--out", "o", "--policy", "infobatch", "--policy-params", "prune_prob=0.3"])
    assert cfg.policy_params == ("prune_prob=0.3",)


def test_a_flag_the_policy_would_not_read_is_a_usage_error(capsys):
    """A run would go on as if it were not given: InfoBatch at its own rate for --keep-ratio 0.3."""
    err = _usage_error(["--policy", "infobatch", "--keep-ratio", "0.3"], capsys)
    assert "--keep-ratio: policy infobatch decides what it keeps by its own rule (its pruning rate: " \
           "--policy-params prune_prob=...); the policies with a budget: random, clip_filter, infobatch_exact, " \
           "mmdp" in err
    assert "policy clip_cut decides what it keeps" in _usage_error(["--policy", "clip_cut", "--keep-ratio", "0.5"],
                                                                   capsys)
    err = _usage_error(["--policy", "clip_filter", "--noise-fraction", "0.3"], capsys)
    assert "--noise-fraction: policy clip_filter excludes no noise (the policies that do: clip_cut, mmdp)" in err
    err = _usage_error(["--noise-fraction", "0.3", "--policy-params", "noise_fraction=0.2"], capsys)
    assert "--noise-fraction and --policy-params noise_fraction=...: give it once" in err
    err = _usage_error(["--policy", "infobatch", "--signal", "clip_score"], capsys)
    assert "--signal clip_score: policy infobatch reads no consistency scores" in err
    assert "probe_every needs loss_weight > 0" in _usage_error(["--policy-params", "probe_every=4"], capsys)
    assert "window takes a whole number, got 10.5" in _usage_error(
        ["--policy", "trajectory", "--reference-keys", "k.txt", "--policy-params", "window=10.5"], capsys)
    # What each policy reads is recorded as given: the budget's default where it reads one, none where not.
    parse = lambda *argv: parse_config(TrainConfig, config_parser(TrainConfig, ""),  # noqa: E731
                                       ["--data", "d", "--scores", "s", "--out", "o", *argv])
    assert parse().keep_ratio == parse("--policy", "random").keep_ratio == 0.6
    assert parse("--policy", "infobatch").keep_ratio is None and parse("--policy", "full").keep_ratio is None
    assert parse("--policy", "clip_cut", "--noise-fraction", "0.3").noise_fraction == 0.3


def test_stop_after_outside_one_to_epochs_is_a_usage_error(capsys):
    for stop in ("0", "-1", "21"):
        assert f"--stop-after must be in 1..20 (--epochs), got {stop}" in _usage_error(
            ["--epochs", "20", "--stop-after", stop], capsys)
    for argv, stop in ((["--stop-after", "1"], 1), (["--stop-after", "20"], 20), ([], None)):  # none: all epochs
        cfg = parse_config(TrainConfig, config_parser(TrainConfig, ""), [
            "--data", "d", "--scores", "s", "--out", "o", "--epochs", "20", *argv])
        assert cfg.stop_after == stop


def test_numeric_training_flags_out_of_range_are_a_usage_error(capsys):
    """Each failed in a Train worker after the earlier run's outputs were cleared, exit 1 after the retries
    (torch.set_num_threads(0), SGD's lr=-1, Conv2d of -4 channels, a LossReporter of 0 reports in flight),
    and --lr 0 trained nothing, unsaid."""
    for argv, says in ((["--lr", "0"], "--lr must be > 0 and --weight-decay >= 0, got 0.0 and 0.0005"),
                       (["--lr", "-1"], "--lr must be > 0"), (["--lr", "nan"], "--lr must be > 0"),
                       (["--task", "clip", "--weight-decay", "-0.1"], "got 0.002 and -0.1"),
                       (["--threads", "0"], "--threads and --max-reports-in-flight must be at least 1"),
                       (["--max-reports-in-flight", "0"], "--threads and --max-reports-in-flight must be at least 1"),
                       (["--width", "-4"], "--width must be >= 0 (0: the model's default), got -4")):
        assert says in _usage_error(argv, capsys), argv
    cfg = parse_config(TrainConfig, config_parser(TrainConfig, ""), [
        "--data", "d", "--scores", "s", "--out", "o", "--width", "0", "--weight-decay", "0", "--max-failures", "-1"])
    assert (cfg.width, cfg.weight_decay, cfg.max_failures) == (0, 0.0, -1)  # the model's default; none; Ray's forever


def test_a_resume_that_leaves_no_epoch_to_train_is_refused_before_ray(tmp_path):
    """A checkpoint after the run's last epoch, or at --stop-after: a clear error before the pruner or the
    trainer start (Ray is not even up here), not a run that trains nothing and crashes on no checkpoint."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "train.pt").write_bytes(b"")  # the files a checkpoint holds; only the history is read
    (checkpoint / "pruner_state.json").write_text(json.dumps({"state": str(tmp_path / "pruner")}))
    (checkpoint / "history.json").write_text(json.dumps([{"epoch": e} for e in range(4)]))
    base = ["--data", str(tmp_path / "data"), "--scores", str(tmp_path / "scores"), "--out", str(tmp_path / "run"),
            "--resume-from", str(checkpoint)]
    for extra, says in ((["--epochs", "4"], "none is left to train with --epochs 4: its run has trained all of them"),
                        (["--epochs", "8", "--stop-after", "3"],
                         "none is left to train with --stop-after 3: resume with a --stop-after above 4")):
        cfg = parse_config(TrainConfig, config_parser(TrainConfig, ""), base + extra)
        with pytest.raises(ValueError, match="the checkpoint has 4 epochs trained") as exc:
            fit(cfg)
        assert says in str(exc.value)
