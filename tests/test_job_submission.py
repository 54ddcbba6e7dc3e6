"""The jobs run unchanged under `ray job submit --working-dir .`, as the README tells users.

The test starts its own Ray head (``ray start --head --block``) on 127.0.0.1
with free ports and its own temp dir, so it neither joins nor disturbs the
session's in-process cluster (tests/conftest.py) or anyone else's Ray on this
machine, and submits a score job and a short train job with the real
``ray job submit`` CLI. The submitted drivers call a bare ``ray.init()``, which
joins the cluster through the RAY_ADDRESS the job server sets. The cluster
reads and writes the test's tmp_path directly: it runs on this machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, closing
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.score.clip_models import load_clip, save_checkpoint
from pipeline.data.reference import make_synthetic, write_dataset

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: its `ray` and `python` (not resolved: a venv's python is a link)
# Kept out of the uploaded working dir (.gitignore already covers .venv, data/, runs/).
EXCLUDES = [".git", ".venv", "data", "runs", "build", "**/__pycache__", ".pytest_cache", ".plan"]
N_ROWS = 160  # make_synthetic: n // 4 reference, n // 4 test, the rest (80) train


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the OS calls free now (all held open together, then released)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _clean_env() -> dict[str, str]:
    """This process's environment without a Ray address that would point the CLI or drivers elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the entrypoint's `python` is this venv's
    # A throwaway test cluster: on SIGTERM stop at once instead of draining the node for up to 30 s.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    return env


def _wait_for_job_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"no job server at {url} after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the head this test started, and only it (`ray stop` would stop every Ray of this user here).

    SIGTERM to the --block process alone: it drains the node and stops its Ray
    processes in a few seconds (signalling the whole group at once makes it wait
    30 s for a raylet that is already gone). Then SIGKILL for any straggler in
    its process group, a session of its own.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A 2-CPU Ray head with the dashboard's job server; yields the job server's URL."""
    # Short temp dir: Ray's unix sockets live under it and socket paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="mmdp-ray-", dir="/tmp")
    log = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    gcs, dashboard, client, node_mgr, obj_mgr, agent_http, agent_grpc, runtime_env, metrics = _free_ports(9)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "2", "--num-gpus", "0",
        "--temp-dir", temp_dir,  # also keeps its ray_current_cluster file from other users' bare ray.init()
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr), "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
        "--metrics-export-port", str(metrics),
        "--min-worker-port", "0", "--max-worker-port", "0",  # OS-chosen, not the shared default range
    ]
    url = f"http://127.0.0.1:{dashboard}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=_clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_job_server(url, proc, log)
        yield url
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny synthetic dataset and a tiny CLIP checkpoint, as in test_score_job / test_train_job."""
    root = tmp_path_factory.mktemp("submit")
    data, ckpt = str(root / "data"), str(root / "tiny.pt")
    write_dataset(make_synthetic(n=N_ROWS, seed=3), data, rows_per_shard=30)
    model, _, _ = load_clip("mmdp-tiny")
    save_checkpoint(model, ckpt, "mmdp-tiny")
    return root, data, ckpt


def _submit(url: str, name: str, *entrypoint: str, timeout: float = 240) -> str:
    """``ray job submit --working-dir <repo> -- python -m jobs.NAME ...``; returns the job's log."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    submission_id = f"mmdp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--submission-id", submission_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
           "--", "python", "-m", f"jobs.{name}", *entrypoint]
    done = subprocess.run(cmd, env=_clean_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    client = JobSubmissionClient(url)
    status = client.get_job_status(submission_id)
    logs = client.get_job_logs(submission_id)
    assert done.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"{name}: submit exited {done.returncode}, job {status}\n--- submit stderr ---\n{done.stderr[-3000:]}"
        f"\n--- job log ---\n{logs[-6000:]}"
    )
    return logs


def test_score_then_train_jobs_run_under_ray_job_submit(ray_head, inputs):
    root, data, ckpt = inputs
    scores, run = str(root / "scores"), str(root / "run")

    _submit(ray_head, "score", "--input", f"{data}/train", "--output", scores, "--model", "mmdp-tiny",
            "--pretrained", ckpt, "--mode", "label", "--batch-size", "32", "--max-actors", "1",
            "--actor-cpus", "0.5")
    train_rows = storage.read_table(f"{data}/train").num_rows
    scored = storage.read_table(storage.join(scores, "scores"))
    summary = storage.read_json(storage.join(scores, "summary.json"))
    assert scored.num_rows == train_rows == N_ROWS - 2 * (N_ROWS // 4)
    assert set(scored.column("status").to_pylist()) == {"ok"}
    assert summary["rows_in"] == train_rows and summary["scored"] == train_rows

    _submit(ray_head, "train", "--data", data, "--scores", scores, "--out", run, "--epochs", "2",
            "--workers", "1", "--batch-size", "16", "--keep-ratio", "0.5", "--warmup-steps", "2",
            "--policy", "mmdp")
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    assert metrics["totals"]["num_samples"] == train_rows
    # mmdp trains epoch 0 on every sample it does not exclude as noise, then prunes well-learned ones.
    excluded = int(math.floor(metrics["totals"]["policy_params"]["noise_fraction"] * train_rows + 0.5))
    kept = [e["plan_kept"] for e in metrics["epochs"]]
    assert kept[0] == train_rows - excluded and 0 < kept[1] <= train_rows
    assert storage.exists(str(root / "run" / "checkpoint" / "train.pt"))
