"""Faults and bad input injected for real: killed processes, a flaky object store, broken files.

Each test prints a ``RELIABILITY`` line with what it measured (rows in, rows
out, rows lost, runs finished); RELIABILITY.md records them. Run with ``-s``
to see them.
"""

from __future__ import annotations

import io as pyio
import json
import os
import pathlib
import pickle
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import FAKE_SECRET
from faults import FaultProxy, always, flaky, session_pids
from jobs import make_dataset as make_dataset_job
from jobs import score as score_job
from pipeline import storage
from pipeline.score import TINY_MODEL
from pipeline.score.clip_models import load_clip, save_checkpoint
from pipeline.data.reference import SPLITS
from pipeline.data.contract import SHARD_SCHEMA
from shardfiles import tar_bytes
from pipeline.score.scorer import ClipScorer, ImageDecoder

REPO = pathlib.Path(__file__).resolve().parents[1]


def report(item: str, **numbers) -> None:
    print(f"\nRELIABILITY {item}: " + json.dumps(numbers, sort_keys=True))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Random tiny-CLIP weights saved once: a restarted actor loads the very same model."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    torch.manual_seed(0)
    model, _, _ = load_clip(TINY_MODEL)
    save_checkpoint(model, path, TINY_MODEL)
    return path


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = pyio.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "key": [f"r-{i:05d}" for i in range(n)],
        "image": [_encode(Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))) for _ in range(n)],
        "caption": [f"a photo of thing {i % 7}" for i in range(n)],
        "label": pa.nulls(n, pa.int64()),
    }, schema=SHARD_SCHEMA)


def _expected_scores(rows: pa.Table, ckpt: str) -> dict[str, float]:
    """The scores of ``rows`` computed directly, outside Ray: what a fault-free job writes."""
    batch = {k: np.asarray(rows.column(k).to_pylist(), dtype=object) for k in rows.column_names}
    out = ClipScorer(TINY_MODEL, ckpt, device="cpu")(ImageDecoder(TINY_MODEL)(batch))
    return dict(zip(batch["key"], out["clip_score"].tolist()))


def _score_args(inp: str, out: str, ckpt: str, *extra: str) -> list[str]:
    return ["--input", inp, "--output", out, "--model", TINY_MODEL, "--pretrained", ckpt,
            "--actor-cpus", "0.5", *extra]


def _assert_no_secret(texts: dict[str, str], roots: list[str]) -> int:
    """The secret appears in no text and no file under ``roots`` (local folders or s3:// prefixes)."""
    checked = 0
    for name, text in texts.items():
        assert FAKE_SECRET not in text, name
        checked += 1
    for root in roots:
        if root.startswith("s3://"):
            bucket, _, prefix = root[5:].partition("/")
            client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                    assert FAKE_SECRET.encode() not in body, obj["Key"]
                    checked += 1
        else:
            for path in pathlib.Path(root).rglob("*"):
                if path.is_file() and not path.is_socket():
                    assert FAKE_SECRET.encode() not in path.read_bytes(), str(path)
                    checked += 1
    return checked


# ---------------------------------------------------------------- fault 3: a scoring actor dies


def _scorer_actors():
    from ray._private import state

    return [a for a in state.actors().values() if "_Scorer" in a["ActorClassName"]]


def test_scoring_actor_killed_mid_job(ray_session, ckpt, tmp_path):
    # The one actor scores these rows in about 5 s once it is up (its model loaded), and the writes
    # follow the scoring; so it is killed half a second after it comes up: mid-scoring.
    rows = _rows(5120)
    storage.write_shards(rows, str(tmp_path / "in"), rows_per_shard=128)
    out = str(tmp_path / "out")
    killed, up = {}, {}

    def kill_when_busy():
        end = time.monotonic() + 120
        while time.monotonic() < end and not killed:
            alive = [a for a in _scorer_actors() if a["State"] == "ALIVE" and a["Pid"]]
            if alive:
                up.setdefault(alive[0]["ActorID"], time.monotonic())
            if alive and time.monotonic() - up[alive[0]["ActorID"]] >= 0.5:
                staged = list((tmp_path / "out").glob("_staging/*.parquet"))
                killed.update(pid=alive[0]["Pid"], actor=alive[0]["ActorID"], files_written=len(staged),
                              at=time.monotonic(), wall_ms=time.time() * 1000)
                os.kill(alive[0]["Pid"], signal.SIGKILL)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    rc = score_job.main(_score_args(str(tmp_path / "in"), out, ckpt, "--batch-size", "8", "--max-actors", "1"))
    finished = time.monotonic()
    killer.join(timeout=5)
    assert rc == 0
    assert killed and killed["at"] < finished, "the actor was not killed while the job ran"
    restarts = [a["NumRestarts"] for a in _scorer_actors() if a["ActorID"] == killed["actor"]][0]
    started_after = [a for a in _scorer_actors()
                     if a["ActorID"] != killed["actor"] and a.get("StartTime", 0) >= killed["wall_ms"]]
    # The work went on: Ray restarted the killed actor, or the pool started another in its place.
    assert restarts + len(started_after) >= 1, (restarts, started_after)
    scores = storage.read_table(storage.join(out, "scores"))
    keys = scores.column("key").to_pylist()
    assert sorted(keys) == rows.column("key").to_pylist()  # every row exactly once
    expected = _expected_scores(rows, ckpt)
    got = dict(zip(keys, scores.column("clip_score").to_pylist()))
    assert max(abs(got[k] - expected[k]) for k in expected) <= 1e-5
    report("fault3-scoring-actor-killed", rows_in=rows.num_rows, rows_out=len(keys), rows_lost=rows.num_rows - len(set(keys)),
           duplicates=len(keys) - len(set(keys)), actor_restarts=restarts, actors_started_after=len(started_after),
           files_written_before_kill=killed["files_written"], runs_finished=1)


# ---------------------------------------------------------------- fault 4: a flaky object store


def test_s3_retries_survive_pickling_to_ray_workers(s3_server, s3_bucket, monkeypatch):
    # Ray ships the filesystem to its read/write tasks by pickling; pyarrow's
    # own pickling drops the retry strategy (3 attempts, its default). Three
    # failures in a row need a fourth attempt.
    with FaultProxy(s3_server, lambda method, key: 3 if method == "PUT" else 0, seed=5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        fs, path = storage.filesystem_for(f"{s3_bucket}/a.bin")
        worker_fs = pickle.loads(pickle.dumps(fs))
        with worker_fs.open_output_stream(path) as f:
            f.write(b"written through three failures")
    monkeypatch.undo()
    assert storage.read_bytes(f"{s3_bucket}/a.bin") == b"written through three failures"
    assert proxy.stats["requests"] - proxy.stats["forwarded"] == 3


@pytest.fixture
def via_proxy(s3_server, monkeypatch):
    """Start a fault proxy and point this process's S3 access (and the filesystems it ships to Ray) at it."""
    proxies = []

    def start(plan, seed=0, delay=0.0):
        proxy = FaultProxy(s3_server, plan, seed=seed, delay=delay).__enter__()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        return proxy

    yield start
    for proxy in proxies:
        proxy.__exit__()


def _read_dataset(url: str) -> dict:
    tables = {split: storage.read_table(storage.join(url, split)) for split in SPLITS}
    tables["ground_truth"] = storage.read_table(storage.join(url, "ground_truth.parquet"))
    return {"tables": tables, "metadata": storage.read_json(storage.join(url, "metadata.json"))}


def test_flaky_object_store_jobs_equal_fault_free_runs(ray_session, ckpt, s3_bucket, s3_server, via_proxy, tmp_path,
                                                       capfd):
    data, scores = storage.join(s3_bucket, "data"), storage.join(s3_bucket, "scores")
    dataset_args = ["--synthetic", "--limit", "64", "--rows-per-shard", "16", "--seed", "2"]
    # Fault-free references: the same jobs on a local folder.
    assert make_dataset_job.main(["--out", str(tmp_path / "data"), *dataset_args]) == 0
    assert score_job.main(_score_args(str(tmp_path / "data" / "train"), str(tmp_path / "scores"), ckpt,
                                      "--batch-size", "16")) == 0

    flaky_plan = flaky(0.08, seed=11, most=3)
    proxy = via_proxy(flaky_plan, seed=11)
    assert make_dataset_job.main(["--out", data, *dataset_args]) == 0
    made = dict(proxy.stats)
    # The score job's output names are random (its staging folder), and so would be its share of
    # faults: its reads of the train shards also fail once each, so it always meets some.
    proxy.plan = lambda method, key: max(flaky_plan(method, key), int(method == "GET" and "/data/train/" in key))
    assert score_job.main(_score_args(storage.join(data, "train"), scores, ckpt, "--batch-size", "16")) == 0
    faults = {k: proxy.stats[k] - made.get(k, 0) for k in ("500", "503", "drop", "requests")}
    assert made["requests"] > made["forwarded"] and faults["requests"] > sum(faults[k] for k in ("500", "503", "drop")) > 0
    assert any(m == "GET" and "/data/train/" in k and o != "forwarded" for m, k, o in proxy.log)

    local, remote = _read_dataset(str(tmp_path / "data")), _read_dataset(data)
    assert remote["metadata"] == local["metadata"]
    for name, table in local["tables"].items():
        assert remote["tables"][name].equals(table), name
    got = storage.read_table(storage.join(scores, "scores")).to_pandas()
    want = storage.read_table(str(tmp_path / "scores" / "scores")).to_pandas()
    assert got.equals(want)
    rows_in = local["tables"]["train"].num_rows
    # Security: the secret key the jobs ran with is nowhere in their output or logs.
    captured = capfd.readouterr()
    ray_logs = ray_session._private.worker._global_node.get_logs_dir_path()
    checked = _assert_no_secret({"stdout": captured.out, "stderr": captured.err}, [data, scores, str(tmp_path), ray_logs])
    report("fault4-flaky-store", make_dataset_requests=made["requests"],
           make_dataset_faults=made["requests"] - made["forwarded"],
           score_requests=faults["requests"], score_faults={k: faults[k] for k in ("500", "503", "drop")},
           rows_in=rows_in, rows_out=len(got), rows_lost=rows_in - len(got), runs_finished=2,
           files_checked_for_secret=checked)


@pytest.mark.parametrize("failing", ["every-write", "the-commit"])
def test_store_that_refuses_writes_leaves_nothing_complete(via_proxy, s3_bucket, monkeypatch, failing):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fail in seconds, not minutes
    out = storage.join(s3_bucket, "data")
    proxy = via_proxy(always() if failing == "every-write" else always(key_contains="/_SUCCESS"))
    with pytest.raises(OSError):
        make_dataset_job.main(["--out", out, "--synthetic", "--limit", "32", "--rows-per-shard", "8"])
    monkeypatch.undo()  # read the store directly
    errors = {}
    for split in SPLITS:
        with pytest.raises(storage.InputError, match="incomplete output|no such file") as refused:
            storage.read_table(storage.join(out, split))
        errors[split] = str(refused.value)
    assert not storage.exists(storage.join(out, "metadata.json")) and not storage.is_complete(out)
    if failing == "the-commit":  # a split's shards went in, and only its commit mark was refused
        written = [split for split in SPLITS if storage.exists(storage.join(out, split, "_PENDING"))]
        assert written and all(storage.exists(storage.join(out, split, "part-00000.parquet")) for split in written)
        assert all("incomplete output" in errors[split] for split in written)
    report(f"fault4-store-refuses-{failing}", requests=proxy.stats["requests"],
           refused=proxy.stats["requests"] - proxy.stats["forwarded"], readable_splits=0, runs_finished=0)


# ---------------------------------------------------------------- fault 5: killed while writing


def _start(args: list[str], env: dict, log: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the job and everything it started (its own Ray cluster too), as a lost node would."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    end = time.monotonic() + 30
    while (left := session_pids(proc.pid)) and time.monotonic() < end:
        time.sleep(0.2)  # Ray's processes notice their parent is gone and exit
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < end, "timed out waiting for the job to start writing"
        time.sleep(0.01)


def test_make_dataset_killed_while_writing_then_rerun(tmp_path):
    out = tmp_path / "data"
    args = ["--synthetic", "--limit", "400", "--rows-per-shard", "2", "--seed", "4"]
    proc = _start(["jobs.make_dataset", "--out", str(out), *args], dict(os.environ), tmp_path / "log")
    _wait_for(lambda: (out / "train" / "_PENDING").exists() and (out / "train" / "part-00002.parquet").exists(),
              60, proc)
    _kill_session(proc)
    parts_left = len(list((out / "train").glob("part-*.parquet")))
    with pytest.raises(storage.InputError, match="incomplete output") as refused:
        storage.read_table(str(out / "train"))
    assert not (out / "metadata.json").exists() and (out / "_PENDING").exists()  # the dataset is refused too
    assert make_dataset_job.main(["--out", str(out), *args]) == 0  # the rerun
    assert storage.is_complete(str(out))
    assert make_dataset_job.main(["--out", str(tmp_path / "clean"), *args]) == 0
    rerun, clean = _read_dataset(str(out)), _read_dataset(str(tmp_path / "clean"))
    assert rerun["metadata"] == clean["metadata"]
    for name, table in clean["tables"].items():
        assert rerun["tables"][name].equals(table), name
    rows = sum(t.num_rows for t in clean["tables"].values())
    report("fault5-make-dataset-killed", shards_on_disk_at_kill=parts_left, refused_with=str(refused.value),
           rows_in=rows, rows_out=sum(t.num_rows for t in rerun["tables"].values()), rows_lost=0, runs_finished=1)


def test_score_job_killed_while_writing_then_rerun(ray_session, ckpt, s3_bucket, s3_server, tmp_path):
    rows = _rows(240, seed=3)
    storage.write_shards(rows, str(tmp_path / "in"), rows_per_shard=20)
    out = storage.join(s3_bucket, "scores")
    # Writes are held for a while, so the job is surely killed mid-write. The
    # job's driver joins the session's cluster, as under `ray job submit`.
    with FaultProxy(s3_server, delay=0.3) as proxy:
        env = dict(os.environ, AWS_ENDPOINT_URL=proxy.endpoint, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
        proc = _start(["jobs.score", *_score_args(str(tmp_path / "in"), out, ckpt, "--batch-size", "8")], env,
                      tmp_path / "log")
        try:
            _wait_for(lambda: any("_staging/" in key and method == "PUT" for method, key, _ in proxy.log), 120, proc)
        finally:
            _kill_session(proc)
    job_log = (tmp_path / "log").read_text(errors="replace")
    with pytest.raises(storage.InputError, match="incomplete output") as refused:
        storage.read_table(storage.join(out, "scores"))
    assert score_job.main(_score_args(str(tmp_path / "in"), out, ckpt, "--batch-size", "8")) == 0  # the rerun
    assert not storage.exists(storage.join(out, "_staging"))  # cleared, not left behind
    scores = storage.read_table(storage.join(out, "scores"))
    expected = _expected_scores(rows, ckpt)
    got = dict(zip(scores.column("key").to_pylist(), scores.column("clip_score").to_pylist()))
    assert sorted(got) == sorted(expected) and scores.num_rows == rows.num_rows
    assert max(abs(got[k] - expected[k]) for k in expected) <= 1e-5
    checked = _assert_no_secret({"job log": job_log}, [out])
    report("fault5-score-job-killed", refused_with=str(refused.value), rows_in=rows.num_rows,
           rows_out=scores.num_rows, rows_lost=rows.num_rows - len(got), runs_finished=1,
           files_checked_for_secret=checked)


# ---------------------------------------------------------------- bad input, row by row


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (valid CRC) over a 4x4 body."""
    data = bytearray(_encode(Image.new("RGB", (4, 4))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _palette(transparent: bool) -> bytes:
    img = Image.new("P", (9, 9), 1)
    img.putpalette([0, 0, 0, 200, 100, 50])
    return _encode(img, transparency=1) if transparent else _encode(img)


_JPEG = _encode(Image.new("RGB", (20, 16), (30, 120, 200)), "JPEG", quality=90)
# key: (image bytes, caption, expected outcome: "" scores, else the reason's start)
BAD_ROWS = {
    "truncated-jpeg": (_JPEG[: len(_JPEG) // 2], "a photo", "undecodable image"),
    "one-by-one": (_encode(Image.new("RGB", (1, 1), (9, 9, 9))), "a photo", ""),
    "bomb-50000x50000": (_png_header(50_000, 50_000), "a photo", "image too large"),
    "cmyk": (_encode(Image.new("CMYK", (12, 12), (0, 255, 255, 0)), "JPEG"), "a photo", ""),
    "palette": (_palette(False), "a photo", ""),
    "palette-transparent": (_palette(True), "a photo", ""),
    "16-bit": (_encode(Image.fromarray(np.full((10, 10), 40000, np.uint16))), "a photo", ""),
    "alpha": (_encode(Image.new("RGBA", (10, 10), (200, 10, 10, 90))), "a photo", ""),
    "good-jpeg": (_JPEG, "a photo", ""),
}
NON_UTF8 = {"non-utf8-caption": b"a photo of \xff\xfe a thing", "utf8-bytes-caption": "a photo of a thing".encode()}


@pytest.fixture(scope="module")
def bad_input_run(ray_session, ckpt, tmp_path_factory):
    """One score job over every row-level bad input: odd images, non-UTF-8 text, an empty shard."""
    root = tmp_path_factory.mktemp("bad")
    keys = list(BAD_ROWS)
    (root / "in").mkdir()
    pq.write_table(pa.table({"key": keys, "image": [v[0] for v in BAD_ROWS.values()],
                             "caption": [v[1] for v in BAD_ROWS.values()], "label": pa.nulls(len(keys), pa.int64())},
                            schema=SHARD_SCHEMA), root / "in" / "a.parquet")
    pq.write_table(SHARD_SCHEMA.empty_table(), root / "in" / "b-empty.parquet")  # a shard with no rows
    # Text stored as bytes, one value not UTF-8 (parquet string columns must be UTF-8).
    pq.write_table(pa.table({"key": list(NON_UTF8), "image": [_JPEG] * len(NON_UTF8),
                             "caption": pa.array(list(NON_UTF8.values()), pa.binary())}), root / "in" / "c-bytes.parquet")
    out = str(root / "out")
    assert score_job.main(_score_args(str(root / "in"), out, ckpt, "--batch-size", "4")) == 0
    scores = {r["key"]: r for r in storage.read_table(storage.join(out, "scores")).to_pylist()}
    rejects = {r["key"]: r["reason"] for r in storage.read_table(storage.join(out, "rejects")).to_pylist()}
    summary = storage.read_json(storage.join(out, "summary.json"))
    inputs = {k: (v[0], v[1]) for k, v in BAD_ROWS.items()}
    inputs.update({k: (_JPEG, v.decode("utf-8", errors="replace")) for k, v in NON_UTF8.items()})
    rows = pa.table({"key": list(inputs), "image": [v[0] for v in inputs.values()],
                     "caption": [v[1] for v in inputs.values()], "label": pa.nulls(len(inputs), pa.int64())})
    return {"scores": scores, "rejects": rejects, "summary": summary, "expected": _expected_scores(rows, ckpt),
            "rows_in": len(inputs)}


def test_bad_input_rows_are_all_accounted_for(bad_input_run):
    summary, scores, rejects = bad_input_run["summary"], bad_input_run["scores"], bad_input_run["rejects"]
    assert summary["rows_in"] == bad_input_run["rows_in"] == summary["scored"] + summary["rejected"]
    # Each input row in exactly one of scores/ and rejects/.
    assert len(scores) == summary["scored"] and len(rejects) == summary["rejected"]
    assert not set(scores) & set(rejects) and len(set(scores) | set(rejects)) == bad_input_run["rows_in"]
    report("bad-input-rows", rows_in=summary["rows_in"], scored=summary["scored"], rejected=summary["rejected"],
           rows_lost=summary["rows_in"] - len(set(scores) | set(rejects)),
           outcomes={k: rejects.get(k, "scored") for k in sorted(set(scores) | set(rejects))})


@pytest.mark.parametrize("key", [*BAD_ROWS, *NON_UTF8])
def test_bad_input_row_outcome(bad_input_run, key):
    reason = BAD_ROWS[key][2] if key in BAD_ROWS else ""
    if reason:
        assert key not in bad_input_run["scores"]
        assert bad_input_run["rejects"][key].startswith(reason), bad_input_run["rejects"][key]
    else:  # odd but valid: scored, and scored as the model scores it outside the job
        row = bad_input_run["scores"][key]
        assert key not in bad_input_run["rejects"]
        assert row["status"] == "ok" and row["error"] == "", row
        assert abs(row["clip_score"] - bad_input_run["expected"][key]) <= 1e-5


# ---------------------------------------------------------------- bad input, whole files


def _good_shard(path: pathlib.Path) -> None:
    pq.write_table(_rows(4), path)


def _missing_column(root: pathlib.Path) -> str:
    _good_shard(root / "a.parquet")
    pq.write_table(pa.table({"key": ["x"], "caption": ["no image column"]}), root / "b.parquet")
    return "b.parquet"


def _zero_byte_shard(root: pathlib.Path) -> str:
    _good_shard(root / "a.parquet")
    (root / "b.parquet").write_bytes(b"")
    return "b.parquet"


def _stray_file(root: pathlib.Path) -> str:
    _good_shard(root / "a.parquet")
    (root / "notes.csv").write_text("key,caption\n")
    return "notes.csv"


def _tar_cut_short(root: pathlib.Path) -> str:
    members = [(f"{i:09d}.{ext}", data) for i in range(4)
               for ext, data in (("jpg", _JPEG + bytes(600)), ("txt", b"a photo"))]
    data = tar_bytes(members)
    (root / "00000.tar").write_bytes(data)
    (root / "00001.tar").write_bytes(data[: len(data) // 2])
    return "00001.tar"


@pytest.mark.parametrize("make", [_missing_column, _zero_byte_shard, _stray_file, _tar_cut_short],
                         ids=["missing-column", "zero-byte-shard", "non-parquet-file", "tar-cut-short"])
def test_unreadable_input_file_is_a_clear_error(ray_session, ckpt, tmp_path, capsys, make):
    (tmp_path / "in").mkdir()
    bad = make(tmp_path / "in")
    out = str(tmp_path / "out")
    start = time.perf_counter()
    rc = score_job.main(_score_args(str(tmp_path / "in"), out, ckpt, "--batch-size", "4"))
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and message, err[-2000:]
    assert bad in message[0] and re.search(r"remove|move|rewrite|re-create|mapping", message[0]), message[0]
    assert not storage.exists(storage.join(out, "_SUCCESS"))
    report(f"bad-file-{make.__name__.strip('_')}", exit_code=rc, message=message[0],
           seconds=round(time.perf_counter() - start, 2), output_committed=False)


# ---------------------------------------------------------------- security


class _WritesAFile:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # would create the file if unpickled


def test_checkpoint_carrying_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    model, _, _ = load_clip(TINY_MODEL)
    torch.save({"state_dict": model.state_dict(), "payload": _WritesAFile(str(marker))}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        ClipScorer(TINY_MODEL, str(path), device="cpu")
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    calls = []
    for path in sorted([*REPO.joinpath("pipeline").rglob("*.py"), *REPO.joinpath("jobs").rglob("*.py")]):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.name, text[match.start():end + 1]))
    assert calls, "no torch.load calls found: the scan is broken"
    unsafe = [c for c in calls if "weights_only=True" not in c[1]]
    assert not unsafe, unsafe
    report("security-torch-load", calls=len(calls), without_weights_only=len(unsafe))
