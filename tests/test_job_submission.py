"""The jobs run unchanged under `ray job submit --working-dir .`, as the README tells users.

The test starts its own Ray head (``ray start --head --block``) on 127.0.0.1
with free ports and its own temp dir, so it neither joins nor disturbs the
session's in-process cluster (tests/conftest.py) or anyone else's Ray on this
machine, and submits a score job, a short train job and its resume with the real
``ray job submit`` CLI. The submitted drivers call a bare ``ray.init()``, which
joins the cluster through the RAY_ADDRESS the job server sets. The cluster
reads and writes the loopback S3 server, the layout the README asks for on a
cluster; the jobs name it with ``--s3-endpoint`` alone.
"""

from __future__ import annotations

import json
import math
import os
import re
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

import pyarrow.fs as pafs
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
    """This process's environment without a Ray address that would point the CLI or drivers elsewhere.

    Nor an S3 endpoint: the jobs name the loopback store with ``--s3-endpoint``,
    which must reach the cluster's workers from the driver alone.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
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
def ray_head(s3_server, tmp_path_factory):
    """A 2-CPU Ray head with the dashboard's job server; yields the job server's URL.

    Its processes have the object store's credentials (as a cluster's instance
    role gives them) but not its endpoint.
    """
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
    with storage.output(data):
        write_dataset(make_synthetic(n=N_ROWS, seed=3), data, rows_per_shard=30)
    model, _, _ = load_clip("mmdp-tiny")
    save_checkpoint(model, ckpt, "mmdp-tiny")
    return data, ckpt


def _submit(url: str, name: str, *entrypoint: str, timeout: float = 240, env_vars: dict | None = None) -> str:
    """``ray job submit --working-dir <repo> -- python -m jobs.NAME ...`` (with the job's own ``env_vars`` in its
    runtime env, where given); returns the job's log."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    submission_id = f"mmdp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    runtime_env = {"excludes": EXCLUDES, **({"env_vars": env_vars} if env_vars else {})}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--submission-id", submission_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
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


def _upload(local: str, url: str) -> None:
    fs, path = storage.filesystem_for(url)
    if os.path.isdir(local):
        pafs.copy_files(local, path, destination_filesystem=fs)
    else:
        storage.write_bytes(Path(local).read_bytes(), url)


def test_score_then_train_jobs_run_under_ray_job_submit_on_s3(ray_head, inputs, s3_server, s3_bucket):
    """The cluster layout the README asks for: every input and output in the object store."""
    data, ckpt = (storage.join(s3_bucket, name) for name in ("data", "tiny.pt"))
    for local, url in zip(inputs, (data, ckpt)):
        _upload(local, url)
    scores, part, run = (storage.join(s3_bucket, name) for name in ("scores", "part", "run"))
    endpoint = ["--s3-endpoint", s3_server]

    # The job sets a variable the jobs also pass their workers (README: the progress lines' interval).
    score_log = _submit(ray_head, "score", "--input", f"{data}/train", "--output", scores, "--model", "mmdp-tiny",
                        "--pretrained", ckpt, "--mode", "label", "--batch-size", "32", "--max-actors", "1",
                        "--actor-cpus", "0.5", *endpoint, env_vars={"RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "5"})
    # A job's log is not a terminal: Ray Data's progress comes as lines per stage, with row counts.
    assert "Total Progress:" in score_log and re.search(r"MapBatches\(_Scorer\): \d+/\d+", score_log), score_log[-3000:]
    train_rows = storage.read_table(f"{data}/train").num_rows
    scored = storage.read_table(storage.join(scores, "scores"))
    summary = storage.read_json(storage.join(scores, "summary.json"))
    assert scored.num_rows == train_rows == N_ROWS - 2 * (N_ROWS // 4)
    assert set(scored.column("status").to_pylist()) == {"ok"}
    assert summary["rows_in"] == train_rows and summary["scored"] == train_rows

    train = ["--data", data, "--scores", scores, "--epochs", "2", "--workers", "1", "--batch-size", "16",
             "--keep-ratio", "0.5", "--warmup-steps", "2", "--policy", "mmdp", *endpoint]
    _submit(ray_head, "train", *train, "--out", part, "--stop-after", "1")
    first = storage.read_json(storage.join(part, "metrics.json"))
    assert [e["epoch"] for e in first["epochs"]] == [0] and storage.is_complete(part)
    assert storage.exists(storage.join(part, "checkpoint", "train.pt"))
    assert storage.exists(storage.join(part, "ray"))  # Ray Train's own run folder, in the store too

    train_log = _submit(ray_head, "train", *train, "--out", run, "--resume-from", storage.join(part, "checkpoint"))
    assert re.search(r"epoch 2/2: trained on \d+ samples \(\d+/s\)", train_log), train_log[-3000:]
    for log in (score_log, train_log):  # no bar redraws, no escape codes (but in Ray's own start-up banner)
        drawn = [line for line in log.split("\n") if "\r" in line
                 or ("\x1b[" in line and "View the dashboard at" not in line)]
        assert not drawn, drawn[:5]
    metrics = storage.read_json(storage.join(run, "metrics.json"))
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1] and metrics["totals"]["restarts"] == 0
    assert metrics["epochs"][0] == first["epochs"][0]  # epoch 0 came back from the checkpoint in the store
    assert metrics["totals"]["num_samples"] == train_rows
    # mmdp trains epoch 0 on every sample it does not exclude as noise, then prunes well-learned ones.
    excluded = int(math.floor(metrics["totals"]["policy_params"]["noise_fraction"] * train_rows + 0.5))
    kept = [e["plan_kept"] for e in metrics["epochs"]]
    assert kept[0] == train_rows - excluded and 0 < kept[1] <= train_rows
    assert storage.is_complete(run) and storage.exists(storage.join(run, "checkpoint", "train.pt"))
