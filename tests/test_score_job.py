"""The Ray Data score job on real shards: equal to ClipScorer called directly, every row accounted for."""

from __future__ import annotations

import io as pyio
import logging
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from jobs import score as score_job
from pipeline import storage
from pipeline.data.reference import make_synthetic, write_dataset
from pipeline.data.contract import DEFAULT_TEMPLATES, SHARD_SCHEMA
from pipeline.score.clip_models import load_clip, save_checkpoint
from pipeline.data.validate import NOT_AN_INTEGER_LABEL
from pipeline.score.job import (ScoreConfig, actor_resources, actor_threads, decodes_in_actors, in_flight_bytes,
                                resolve_classes, resolve_templates, score)
from pipeline.score.scorer import ClipScorer, ImageDecoder, TensorImageDecoder
from shardfiles import tar_bytes


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    write_dataset(make_synthetic(n=160, seed=3), root, rows_per_shard=30)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """Randomly initialised weights saved once, so the job's actors and the test share them."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    model, _, _ = load_clip("mmdp-tiny")
    save_checkpoint(model, path, "mmdp-tiny")
    return path


def _direct_scores(rows: pa.Table, ckpt: str, mode: str, classes=None, templates=None) -> dict[str, tuple[float, float]]:
    batch = {k: np.asarray(rows.column(k).to_pylist(), dtype=object) for k in rows.column_names}
    scored = ClipScorer("mmdp-tiny", ckpt, mode=mode, classes=classes, templates=templates)(
        ImageDecoder("mmdp-tiny")(batch))
    return {k: (s, m) for k, s, m in zip(batch["key"], scored["clip_score"], scored["clip_margin"])}


# Caption mode also with a budget in flight (100 KiB) below one block's size: Ray Data still runs one
# task at a time, and no row is lost to the backpressure.
@pytest.mark.parametrize("mode, in_flight", [("caption", "0.0001"), ("label", "0.5")])
def test_score_job_equals_direct_scorer(ray_session, synthetic, tiny_ckpt, tmp_path, mode, in_flight):
    out = str(tmp_path / "scores")
    limits = ray.data.DataContext.get_current().execution_options.resource_limits
    rc = score_job.main(["--input", storage.join(synthetic, "train"), "--output", out, "--model", "mmdp-tiny",
                         "--pretrained", tiny_ckpt, "--mode", mode, "--batch-size", "16", "--max-actors", "2",
                         "--actor-cpus", "0.5", "--in-flight-gib", in_flight])
    assert rc == 0
    # The budget was the job's own: later datasets of this process (a trainer's) get Ray Data's defaults.
    assert ray.data.DataContext.get_current().execution_options.resource_limits == limits
    scores = storage.read_table(storage.join(out, "scores"))
    rows = storage.read_table(storage.join(synthetic, "train"))
    # Label prompts: the class names and templates the dataset's metadata.json names (not mmdp's default ones).
    metadata = storage.read_json(storage.join(synthetic, "metadata.json"))
    assert metadata["templates"] and set(metadata["templates"]) != set(DEFAULT_TEMPLATES)
    expected = _direct_scores(rows, tiny_ckpt, mode, metadata["classes"], metadata["templates"])
    assert scores.num_rows == rows.num_rows == len(expected)
    assert (np.asarray(scores.column("status").to_pylist()) == "ok").all()
    for key, s, m in zip(scores.column("key").to_pylist(), scores.column("clip_score").to_pylist(),
                         scores.column("clip_margin").to_pylist()):
        assert abs(s - expected[key][0]) <= 1e-5
        if mode == "label":
            assert abs(m - expected[key][1]) <= 1e-5
        else:
            assert np.isnan(m)
    # The dense index is 0..n-1 in key order.
    order = np.argsort(scores.column("key").to_pylist())
    assert scores.column("index").to_numpy()[order].tolist() == list(range(rows.num_rows))
    assert storage.read_json(storage.join(out, "summary.json"))["rows_in"] == rows.num_rows


def test_actors_decoding_jpegs_score_like_the_tensor_decoder_called_directly(ray_session, synthetic, tiny_ckpt,
                                                                              tmp_path):
    """--decode actors (a GPU's default): JPEGs decoded in the scoring actors, scores as computed directly."""
    rows = storage.read_table(storage.join(synthetic, "train"))
    images = [_jpeg(np.asarray(Image.open(pyio.BytesIO(b)).convert("RGB"))) for b in rows.column("image").to_pylist()]
    rows = rows.set_column(rows.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    storage.write_shards(rows, str(tmp_path / "in"), rows_per_shard=30)
    outs = {}
    for decode in ("tasks", "actors"):
        outs[decode] = str(tmp_path / decode)
        assert score_job.main(["--input", str(tmp_path / "in"), "--output", outs[decode], "--model", "mmdp-tiny",
                               "--pretrained", tiny_ckpt, "--batch-size", "16", "--max-actors", "2",
                               "--actor-cpus", "0.5", "--decode", decode]) == 0
    batch = {k: np.asarray(rows.column(k).to_pylist(), dtype=object) for k in rows.column_names}
    direct = ClipScorer("mmdp-tiny", tiny_ckpt)(TensorImageDecoder("mmdp-tiny", tiny_ckpt)(batch))
    expected = dict(zip(batch["key"], direct["clip_score"]))
    got = {decode: storage.read_table(storage.join(out, "scores")).to_pydict() for decode, out in outs.items()}
    assert len(got["actors"]["key"]) == rows.num_rows == len(expected)
    for key, score in zip(got["actors"]["key"], got["actors"]["clip_score"]):
        assert abs(score - expected[key]) <= 1e-5
    # Against PIL decoding in the CPU tasks: the same rows and indices, scores up to resampling arithmetic.
    assert got["tasks"]["key"] == got["actors"]["key"] and got["tasks"]["index"] == got["actors"]["index"]
    np.testing.assert_allclose(got["tasks"]["clip_score"], got["actors"]["clip_score"], atol=0.02, rtol=0)


def test_score_job_reads_img2dataset_parquet(ray_session, synthetic, tiny_ckpt, tmp_path):
    """img2dataset's parquet columns (key, jpg, txt, cls) through the job's Ray path, no conversion step."""
    rows = storage.read_table(storage.join(synthetic, "train"))
    renamed = rows.rename_columns(["key", "jpg", "txt", "cls"]).append_column("url", pa.array(["http://x"] * rows.num_rows))
    storage.write_shards(renamed, str(tmp_path / "in"), rows_per_shard=25)
    out = str(tmp_path / "out")
    assert score_job.main(["--input", str(tmp_path / "in"), "--output", out, "--model", "mmdp-tiny",
                           "--pretrained", tiny_ckpt, "--columns", "img2dataset", "--batch-size", "16",
                           "--actor-cpus", "0.5"]) == 0
    scores = storage.read_table(storage.join(out, "scores"))
    expected = _direct_scores(rows, tiny_ckpt, "caption")
    assert sorted(scores.column("key").to_pylist()) == sorted(expected) and len(expected) == rows.num_rows
    for key, s in zip(scores.column("key").to_pylist(), scores.column("clip_score").to_pylist()):
        assert abs(s - expected[key][0]) <= 1e-5
    assert storage.read_table(storage.join(out, "rejects")).num_rows == 0


def _png(size=(8, 8), mode="RGB"):
    buf = pyio.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = pyio.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("decode", ["tasks", "actors"])
def test_every_bad_row_is_rejected_with_its_reason(ray_session, tmp_path, decode):
    good = _png()
    truncated = good[: len(good) // 2]
    jpeg = _jpeg(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
    rows = [
        ("ok-1", good, "a photo of a thing", None, ""),
        ("ok-jpeg", jpeg, "a photo of noise", None, ""),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], "text", None, "undecodable image"),
        ("ok-2", good, "", 1, ""),  # empty caption, label gives the text
        ("empty-img", b"", "text", None, "empty image bytes"),
        ("null-img", None, "text", None, "empty image bytes"),
        ("garbage", b"not an image at all", "text", None, "undecodable image"),
        ("truncated", truncated, "text", None, "undecodable image"),
        ("no-text", good, "", None, "empty caption and no label"),
        (None, good, "text", None, "missing key"),
        ("dup", good, "first copy", None, "duplicate key"),  # a key on two rows names neither
        ("dup", good, "second copy", None, "duplicate key"),
    ]
    table = pa.table({"key": [r[0] for r in rows], "image": [r[1] for r in rows], "caption": [r[2] for r in rows],
                      "label": pa.array([r[3] for r in rows], pa.int64())}, schema=SHARD_SCHEMA)
    storage.write_shards(table.slice(0, 5), str(tmp_path / "in" / "a"))
    storage.write_shards(table.slice(5), str(tmp_path / "in" / "b"))
    out = str(tmp_path / "out")
    rc = score_job.main(["--input", str(tmp_path / "in"), "--output", out, "--model", "mmdp-tiny",
                         "--classes", "zero,one", "--batch-size", "4", "--actor-cpus", "0.5", "--decode", decode])
    assert rc == 0
    scores = storage.read_table(storage.join(out, "scores")).to_pylist()
    rejects = storage.read_table(storage.join(out, "rejects")).to_pylist()
    summary = storage.read_json(storage.join(out, "summary.json"))
    assert summary["rows_in"] == len(rows) == summary["scored"] + summary["rejected"]
    assert summary["scored"] == len(scores) == 3 and len(rejects) == summary["rejected"] == 9
    assert 0 < summary["first_row_seconds"] <= summary["seconds"]  # the first scored batch, from the job's start
    # The job's time split into reading and scoring, then the commit (dedupe, index, write).
    assert summary["first_row_seconds"] <= summary["scoring_seconds"] and summary["commit_seconds"] > 0
    assert abs(summary["scoring_seconds"] + summary["commit_seconds"] - summary["seconds"]) < 0.05
    # Each input row is in exactly one place: scored rows in scores/, rejected ones in rejects/.
    scores.sort(key=lambda r: r["key"])
    assert [r["key"] for r in scores] == sorted(r[0] for r in rows if not r[4])
    assert all(r["status"] == "ok" and np.isfinite(r["clip_score"]) for r in scores)
    assert [r["index"] for r in scores] == [0, 1, 2]  # key order
    by_key = lambda pair: (str(pair[0]), pair[1])  # noqa: E731
    expected = sorted(((r[0], r[4]) for r in rows if r[4]), key=by_key)
    got = sorted(((r["key"], r["reason"]) for r in rejects), key=by_key)
    assert [key for key, _ in got] == [key for key, _ in expected]
    for (key, reason), (_, got_reason) in zip(expected, got):
        assert got_reason.startswith(reason), (key, got_reason)


def test_score_job_reads_and_writes_s3(ray_session, tiny_ckpt, s3_bucket, tmp_path):
    root = s3_bucket
    src = storage.join(root, "data")
    with storage.output(src):
        write_dataset(make_synthetic(n=64, seed=1), src, rows_per_shard=20)
    local_out = str(tmp_path / "local")
    remote_out = storage.join(root, "scores")
    args = ["--model", "mmdp-tiny", "--pretrained", tiny_ckpt, "--batch-size", "16", "--actor-cpus", "0.5"]
    assert score_job.main(["--input", storage.join(src, "train"), "--output", remote_out, *args]) == 0
    write_dataset(make_synthetic(n=64, seed=1), str(tmp_path / "data"), rows_per_shard=20)
    assert score_job.main(["--input", str(tmp_path / "data" / "train"), "--output", local_out, *args]) == 0
    remote = storage.read_table(storage.join(remote_out, "scores"))
    local = storage.read_table(storage.join(local_out, "scores"))
    assert remote.num_rows == 32 and storage.is_complete(remote_out)
    assert remote.to_pandas().equals(local.to_pandas())  # NaN margins compare equal here


def test_bad_input_folder_is_a_clear_error(ray_session, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"this is not parquet")
    rc = score_job.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "mmdp-tiny"])
    assert rc == 2
    assert "a.parquet" in capsys.readouterr().err
    assert not storage.exists(str(tmp_path / "out" / "_SUCCESS"))


def test_shards_a_read_cannot_join_are_a_clear_error_naming_them(ray_session, tmp_path, capsys):
    """Ray Data joins several shards' tables in one read task: a column of int64 in one shard and of strings in
    another failed the job with ArrowConversionError and a traceback naming no shard (exit 1)."""
    good = _png()
    for i, note in enumerate([pa.array([1, 2], pa.int64()), pa.array(["a", "b"]), pa.array([3, 4], pa.int64())]):
        table = pa.table({"key": [f"k{i}-0", f"k{i}-1"], "image": [good, good], "caption": ["a thing", "a thing"],
                          "label": pa.array([None, None], pa.int64()), "note": note})
        storage.write_table(table, str(tmp_path / "in" / f"part-{i}.parquet"))
    out = str(tmp_path / "out")
    rc = score_job.main(["--input", str(tmp_path / "in"), "--output", out, "--model", "mmdp-tiny",
                         "--batch-size", "4", "--actor-cpus", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"column 'note' is string in {tmp_path}/in/part-1.parquet and int64 in {tmp_path}/in/part-0.parquet" in err
    assert "Traceback" not in err and not storage.exists(storage.join(out, "_SUCCESS"))


def test_a_rerun_refused_for_its_input_leaves_the_earlier_output_committed(ray_session, tiny_ckpt, tmp_path, capsys):
    root = str(tmp_path / "data")
    write_dataset(make_synthetic(n=20, seed=1), root, rows_per_shard=10)
    storage.remove(storage.join(root, "metadata.json"))  # no class names for label mode
    out = str(tmp_path / "scores")
    with storage.output(out):  # an earlier run's committed output
        # (An earlier score job's config: another job's output there is refused whatever the flags.)
        earlier = {**asdict(ScoreConfig(input="earlier", output=out)), "input": "earlier"}
        storage.write_json(earlier, storage.join(out, "config.json"))
    train = storage.join(root, "train")
    dataset_state = sorted(p.name for p in (tmp_path / "data").iterdir())
    for argv, message in (
            (["--input", storage.join(root, "trian"), "--output", out], "trian: no such file or folder"),
            (["--input", train, "--output", out, "--mode", "label"], "label mode needs class names"),
            # One class leaves the margin nothing to compare with: the actors refused it, after the output was taken.
            (["--input", train, "--output", out, "--mode", "label", "--classes", "cat"],
             "label mode needs two or more class names, got ['cat']"),
            (["--input", train, "--output", out, "--mode", "caption", "--columns", "caption=text"],
             f"--columns caption=text: no shard in {train} has a column 'text'"),
            # Weights that are not there, or a model open_clip does not know: found by the actors, too late.
            (["--input", train, "--output", out, "--pretrained", str(tmp_path / "ref-clp" / "model.pt")],
             "ref-clp/model.pt: no such file here, and not an open_clip pretrained tag of mmdp-tiny"),
            (["--input", train, "--output", out, "--pretrained", str(tmp_path)], "a folder; name the checkpoint"),
            (["--input", train, "--output", out, "--model", "mmdp-tiyn"], "unknown model config 'mmdp-tiyn'"),
            # The dataset's own folder, or a folder inside the input: the output would replace or join the input.
            (["--input", train, "--output", root], "overlap"),
            (["--input", train, "--output", storage.join(train, "scores")], "overlap")):
        assert score_job.main(["--model", "mmdp-tiny", *argv]) == 2  # a later --model wins
        assert message in capsys.readouterr().err
        assert storage.is_complete(out) and storage.read_json(storage.join(out, "config.json")) == earlier
        assert storage.is_complete(train)
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == dataset_state
    # An accepted re-run replaces the earlier output whole: shards of the earlier run that this one does not
    # write go, so that any parquet reader of the folder (not only mmdp's, which follow the manifest) reads
    # this run's rows alone.
    for folder in ("scores", "rejects"):
        storage.write_table(pa.table({"key": ["earlier"]}), storage.join(out, folder, "part-00099.parquet"))
    assert score_job.main(["--input", train, "--output", out, "--mode", "caption", "--model", "mmdp-tiny",
                           "--pretrained", tiny_ckpt, "--actor-cpus", "0.5", "--batch-size", "16"]) == 0
    summary = storage.read_json(storage.join(out, "summary.json"))
    assert pq.read_table(storage.join(out, "scores")).num_rows == summary["scored"] == summary["rows_in"] > 0
    assert pq.read_table(storage.join(out, "rejects")).num_rows == summary["rejected"] == 0


def test_scoring_actors_share_each_gpu_as_asked_use_the_cpus_they_ask_and_a_bad_share_is_refused(capsys):
    cfg = ScoreConfig(input="in", output="out", actors_per_gpu=2, actor_cpus=0.5)
    assert actor_resources(cfg, use_gpu=True) == {"num_gpus": 0.5, "num_cpus": 1}  # a CPU feeds each GPU actor
    assert actor_resources(cfg, use_gpu=False) == {"num_gpus": 0, "num_cpus": 0.5}  # no GPUs: --actor-cpus
    # Torch threads follow the CPUs asked: one for a GPU actor even with --actor-cpus 4, else --torch-threads.
    assert actor_threads(replace(cfg, actor_cpus=4.0), use_gpu=True) == 1
    assert actor_threads(replace(cfg, actor_cpus=4.0), use_gpu=False) == 4
    assert actor_threads(cfg, use_gpu=False) == 1 and actor_threads(replace(cfg, torch_threads=3), use_gpu=True) == 3
    with pytest.raises(SystemExit) as exit_:
        score_job.main(["--input", "in", "--output", "out", "--actors-per-gpu", "0"])
    assert exit_.value.code == 2 and "--actors-per-gpu" in capsys.readouterr().err


def test_decoding_goes_to_the_gpu_actors_where_torchvision_can_and_else_to_the_cpu_tasks(monkeypatch, caplog):
    import torchvision.io

    cfg = ScoreConfig(input="in", output="out")
    assert decodes_in_actors(cfg, use_gpu=True) and not decodes_in_actors(cfg, use_gpu=False)
    assert decodes_in_actors(replace(cfg, decode="actors"), use_gpu=False)
    assert not decodes_in_actors(replace(cfg, decode="tasks"), use_gpu=True)
    # A torchvision without its deprecated JPEG decoder: auto falls back to PIL in the CPU tasks and says
    # so; asked for, the device decoder is an error that names the way out, in the driver and in an actor.
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    with caplog.at_level(logging.WARNING, logger="pipeline.score.job"):
        assert not decodes_in_actors(cfg, use_gpu=True)
    assert "--decode tasks" in caplog.text
    for make in (lambda: decodes_in_actors(replace(cfg, decode="actors"), use_gpu=True),
                 lambda: TensorImageDecoder("mmdp-tiny")):
        with pytest.raises(ImportError, match="decode_jpeg.*--decode tasks"):
            make()


def test_blocks_in_flight_default_to_half_a_gib_without_gpus_and_to_ray_datas_own_budget_with_them(capsys):
    cfg = ScoreConfig(input="in", output="out")
    assert in_flight_bytes(cfg, use_gpu=False) == 2**29 and in_flight_bytes(cfg, use_gpu=True) == 0
    # Measured on one machine; Ray Data applies it to a whole cluster, where it would starve most actors.
    assert in_flight_bytes(cfg, use_gpu=False, one_machine=False) == 0
    for use_gpu in (False, True):  # given, it holds on either, anywhere
        for one_machine in (False, True):
            assert in_flight_bytes(replace(cfg, in_flight_gib=2.0), use_gpu, one_machine) == 2**31
            assert in_flight_bytes(replace(cfg, in_flight_gib=0.0), use_gpu, one_machine) == 0
    with pytest.raises(SystemExit) as exit_:
        score_job.main(["--input", "in", "--output", "out", "--in-flight-gib", "-1"])
    assert exit_.value.code == 2 and "--in-flight-gib" in capsys.readouterr().err


def _encoded(pil_format: str) -> bytes:
    buf = pyio.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=pil_format)
    return buf.getvalue()


def _score_one_tar(tmp_path, members, ckpt) -> str:
    """The score job (caption mode, the tiny model) on one tar of ``members``; returns its output folder."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(tar_bytes(members))
    out = str(tmp_path / "out")
    assert score_job.main(["--input", str(tmp_path / "in"), "--output", out, "--model", "mmdp-tiny",
                           "--pretrained", ckpt, "--batch-size", "4", "--actor-cpus", "0.5"]) == 0
    return out


def test_score_job_reads_webdataset_tars_with_mixed_image_types(ray_session, tiny_ckpt, tmp_path):
    members = []
    for i in range(6):
        members += [(f"{i:09d}.{'jpg' if i % 2 else 'png'}", _encoded("JPEG") if i % 2 else _png()),
                    (f"{i:09d}.txt", f"a photo of thing {i}\n".encode())]
    out = _score_one_tar(tmp_path, members, tiny_ckpt)
    scores = storage.read_table(storage.join(out, "scores"))
    assert sorted(scores.column("key").to_pylist()) == [f"{i:09d}" for i in range(6)]
    assert scores.column("status").to_pylist() == ["ok"] * 6  # png and jpg rows alike


def test_tar_member_names_that_are_not_utf8_score_under_an_escaped_key(ray_session, tiny_ckpt, tmp_path):
    """A member named in Latin-1 (b"caf\\xe9.jpg") failed the job in the read stage (UnicodeDecodeError), naming
    no tar. Its key is the name with the bytes that are not UTF-8 escaped, as the train job's tar index has it."""
    from pipeline.data.tars import tar_index

    name = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python's tarfile reads the name
    members = [(f"{name}.jpg", _encoded("JPEG")), (f"{name}.txt", b"a cafe"), ("ok.jpg", _encoded("JPEG")),
               ("ok.txt", b"a photo")]
    out = _score_one_tar(tmp_path, members, tiny_ckpt)
    scores = storage.read_table(storage.join(out, "scores"))
    assert sorted(scores.column("key").to_pylist()) == ["caf\\xe9", "ok"]
    assert scores.column("status").to_pylist() == ["ok"] * 2
    tar = str(tmp_path / "in" / "00000.tar")
    assert tar_index(tar).column("__key__").to_pylist() == ["caf\\xe9", "ok"]


def test_a_sample_written_twice_in_a_row_in_a_tar_is_a_duplicate_key_not_a_failed_job(ray_session, tiny_ckpt,
                                                                                      tmp_path):
    """Ray Data's webdataset reader groups members by consecutive keys and failed the whole read on a member met
    twice in one sample ("duplicate file name in tar file"), where a key repeated elsewhere is rejected."""
    from pipeline.data.tars import REPEAT, MemberNames, base_keys

    members = [("a.jpg", _encoded("JPEG")), ("a.txt", b"first"), ("a.jpg", _encoded("JPEG")), ("a.txt", b"again"),
               ("b.jpg", _encoded("JPEG")), ("b.txt", b"a photo")]
    out = _score_one_tar(tmp_path, members, tiny_ckpt)
    assert storage.read_table(storage.join(out, "scores")).column("key").to_pylist() == ["b"]
    rejects = storage.read_table(storage.join(out, "rejects"))
    assert rejects.column("key").to_pylist() == ["a", "a"]
    assert all(r.startswith("duplicate key") for r in rejects.column("reason").to_pylist())
    names = MemberNames()
    assert [names(n) for n in ("a.jpg", "a.txt", "a.jpg", "a.txt", "a.jpg", "b.jpg", "b.txt")] == [
        "a.jpg", "a.txt", f"a{REPEAT}1.jpg", f"a{REPEAT}1.txt", f"a{REPEAT}2.jpg", "b.jpg", "b.txt"]
    assert base_keys(np.array(["a", f"a{REPEAT}1", "b"])).tolist() == ["a", "a", "b"]


def test_tars_of_every_image_format_and_bad_labels_score_or_reject_each_row(ray_session, tiny_ckpt, tmp_path):
    """ImageNet's ``.JPEG`` and GIF/BMP/TIFF members are scored like any image; a ``.cls`` member that is not an
    integer rejects its row (caption mode too) with its reason, and the job goes on."""
    samples = [("JPEG", "JPEG", b"3\n"), ("JPG", "JPEG", None), ("gif", "GIF", b"1"), ("bmp", "BMP", None),
               ("tif", "TIFF", b""), ("TIFF", "TIFF", None), ("png", "PNG", b"cat\n"), ("jpg", "JPEG", b"2.5"),
               ("jfif", "JPEG", None), ("jpe", "JPEG", None)]  # JPEG's other names: rejected as "empty image bytes"
    members = []
    for i, (ext, pil_format, cls) in enumerate(samples):
        members += [(f"{i:09d}.{ext}", _encoded(pil_format)), (f"{i:09d}.txt", f"a photo of thing {i}".encode())]
        if cls is not None:
            members.append((f"{i:09d}.cls", cls))
    out = _score_one_tar(tmp_path, members, tiny_ckpt)
    scores = storage.read_table(storage.join(out, "scores"))
    rejects = storage.read_table(storage.join(out, "rejects"))
    assert sorted(scores.column("key").to_pylist()) == [f"{i:09d}" for i in (0, 1, 2, 3, 5, 8, 9)]
    assert scores.column("status").to_pylist() == ["ok"] * 7
    assert sorted(zip(rejects.column("key").to_pylist(), rejects.column("reason").to_pylist())) == [
        ("000000004", f"{NOT_AN_INTEGER_LABEL}: ''"), ("000000006", f"{NOT_AN_INTEGER_LABEL}: 'cat'"),
        ("000000007", f"{NOT_AN_INTEGER_LABEL}: '2.5'")]


def test_a_metadata_json_without_class_names_names_none(tmp_path):
    """img2dataset's metadata.json has no "classes": caption mode needs none, label mode says it needs them."""
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    storage.write_json({"source": "img2dataset"}, str(split / "metadata.json"))
    cfg = ScoreConfig(input=str(split), output=str(tmp_path / "out"))
    assert resolve_classes(cfg) == ()
    with pytest.raises(ValueError, match="label mode needs class names"):
        score(replace(cfg, mode="label"))
    # The dataset's own metadata.json, beside the split, still names them.
    storage.write_json({"classes": ["cat", "dog"]}, str(tmp_path / "data" / "metadata.json"))
    assert resolve_classes(cfg) == ("cat", "dog")


def test_label_prompts_templates_come_from_the_flag_else_the_metadata_else_the_default_and_need_a_slot(
        ray_session, tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(make_synthetic(n=20, seed=1), str(data), rows_per_shard=10)
    cfg = ScoreConfig(input=str(data / "train"), output=str(tmp_path / "out"), mode="label")
    named = tuple(storage.read_json(str(data / "metadata.json"))["templates"])
    assert resolve_templates(cfg) == named != DEFAULT_TEMPLATES
    assert resolve_templates(replace(cfg, templates=("a sketch of a {}.",))) == ("a sketch of a {}.",)
    storage.write_json({"classes": ["cat", "dog"]}, str(data / "metadata.json"))
    assert resolve_templates(cfg) == DEFAULT_TEMPLATES
    # A template with no slot for the class name would give every class one prompt: refused, from either source.
    with pytest.raises(ValueError, match="--templates: templates need {} where the class name goes, not 'a cat.'"):
        replace(cfg, templates=("a {}.", "a cat."))
    storage.write_json({"classes": ["cat", "dog"], "templates": ["a photo"]}, str(data / "metadata.json"))
    argv = ["--input", str(data / "train"), "--output", str(tmp_path / "out"), "--mode", "label", "--model",
            "mmdp-tiny"]
    assert score_job.main(argv) == 2
    assert "the dataset's metadata.json: templates need {} where the class name goes, not 'a photo'" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the output was taken
