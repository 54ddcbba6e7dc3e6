"""jobs.make_dataset end to end: the real main() on Fashion-MNIST subsets, read back through pipeline.storage."""

from __future__ import annotations

import io as bytesio
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray.data
from PIL import Image

from jobs.make_dataset import main
from pipeline.data import noise
from pipeline.data import reference as ds
from pipeline import storage

COMPOSED = "symmetric:0.2,pairflip:0.1,caption:0.05,duplicate:0.05,corrupt_image:0.05"


def _make(out, *flags: str) -> dict:
    assert main(["--out", str(out), *flags]) == 0
    splits = {s: storage.read_table(storage.join(str(out), s)) for s in ds.SPLITS}
    truth = storage.read_table(storage.join(str(out), "ground_truth.parquet"))
    return {"splits": splits, "truth": truth, "meta": storage.read_json(storage.join(str(out), "metadata.json"))}


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    out = tmp_path_factory.mktemp("composed")
    return _make(out, "--limit", "2000", "--reference-size", "2000", "--noise", COMPOSED,
                 "--rows-per-shard", "700") | {"out": out}


@pytest.fixture(scope="module")
def source_index():
    """Raw pixels -> index in the source file, to find where each written image came from."""
    raw = ds.load_fashion_mnist()
    return {split: {img.tobytes(): i for i, img in enumerate(raw[split][0])} for split in ("train", "test")}


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(bytesio.BytesIO(data)))


def test_symmetric_rate_and_labels(tmp_path):
    data = _make(tmp_path, "--limit", "2000", "--reference-size", "2000", "--noise", "symmetric:0.3")
    truth = data["truth"].to_pandas()
    assert data["meta"]["splits"] == {"reference": 2000, "train": 2000, "test": 2000}
    assert abs((truth.corruption == "symmetric").mean() - 0.3) <= 0.01
    assert abs((truth.label != truth.clean_label).mean() - 0.3) <= 0.01
    assert (data["splits"]["train"]["label"].to_numpy() == truth.label.to_numpy()).all()


def test_composed_rates_shards_and_layout(composed):
    truth = composed["truth"].to_pandas()
    for kind, rate in noise.parse_noise_spec(COMPOSED).items():
        assert abs((truth.corruption == kind).mean() - rate) <= 0.01, kind
        assert abs(composed["meta"]["noise_measured"][kind] - rate) <= 0.01
    assert (truth.corruption == "none").mean() == pytest.approx(0.55, abs=0.01)
    assert len(storage.list_files(storage.join(str(composed["out"]), "train"))) == 3  # 2000 rows / 700 per shard
    names = sorted(p.name for p in Path(composed["out"]).iterdir())
    assert names == ["_SUCCESS", "config.json", "ground_truth.parquet", "metadata.json", "reference", "test", "train"]
    assert storage.read_json(storage.join(str(composed["out"]), "config.json"))["noise"] == COMPOSED


def test_splits_are_disjoint_and_keys_unique(composed, source_index):
    keys = [k for t in composed["splits"].values() for k in t["key"].to_pylist()]
    assert len(keys) == len(set(keys)) == 6000
    found = {}
    for split, table in composed["splits"].items():
        lookup = source_index["test" if split == "test" else "train"]
        images = [_pixels(b) for b in table["image"].to_pylist() if noise.decodes(b)]
        found[split] = {lookup.get(p.tobytes()) for p in images} - {None}
    assert len(found["reference"]) == 2000 and len(found["test"]) == 2000
    assert len(found["train"]) >= 2000 * 0.9 - 1  # duplicates are perturbed and corrupt rows unreadable
    assert not found["reference"] & found["train"]
    truth = composed["truth"].to_pandas()
    untouched = truth[~truth.corruption.isin(["duplicate", "corrupt_image"])]
    assert set(untouched.source_index) <= found["train"]


def _names(caption: str, class_name: str) -> bool:
    return caption in {t.format(class_name) for t in ds.CAPTION_TEMPLATES}


def test_ground_truth_matches_rows(composed):
    train, truth = composed["splits"]["train"].to_pylist(), composed["truth"].to_pylist()
    classes = composed["meta"]["classes"]
    by_key = {row["key"]: row for row in train}
    assert [r["key"] for r in train] == [t["key"] for t in truth]
    for row, gt in zip(train, truth):
        kind = gt["corruption"]
        assert row["label"] == gt["label"] and _names(row["caption"], classes[gt["caption_label"]])
        assert noise.decodes(row["image"]) == (kind != "corrupt_image")
        assert (row["label"] != gt["clean_label"]) == (kind in ("symmetric", "pairflip")), gt
        assert (gt["caption_label"] != gt["clean_label"]) == (kind in ("symmetric", "pairflip", "caption")), gt
        assert (gt["duplicate_of"] is not None) == (kind == "duplicate")
        if kind == "duplicate":
            source = by_key[gt["duplicate_of"]]
            diff = np.abs(_pixels(row["image"]).astype(int) - _pixels(source["image"]).astype(int)).max()
            assert 0 < diff <= 8 and row["caption"] == source["caption"] and row["label"] == source["label"]
    for split in ("reference", "test"):  # clean: every caption names the label
        table = composed["splits"][split]
        for caption, label in zip(table["caption"].to_pylist(), table["label"].to_pylist()):
            assert _names(caption, classes[label])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    flags = ["--limit", "300", "--reference-size", "300", "--noise", COMPOSED, "--rows-per-shard", "100"]
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert main(["--out", str(tmp_path / name), "--seed", seed, *flags]) == 0
    a, b, c = (_files(tmp_path / n) for n in "abc")
    a.pop("config.json"), b.pop("config.json"), c.pop("config.json")  # holds --out, which differs
    assert len(a) == 3 * 4 + 3 and a == b  # 3 shards + _SUCCESS per split, ground truth, metadata, _SUCCESS
    assert a["train/part-00000.parquet"] != c["train/part-00000.parquet"]
    assert a["reference/part-00000.parquet"] != c["reference/part-00000.parquet"]


def test_limit_caps_train_and_test_and_the_reference_split_holds_reference_size(tmp_path):
    data = _make(tmp_path, "--limit", "100", "--reference-size", "300")
    assert data["meta"]["splits"] == {"reference": 300, "train": 100, "test": 100}
    assert {s: t.num_rows for s, t in data["splits"].items()} == data["meta"]["splits"]


def test_reads_fashion_mnist_from_an_object_store(s3_bucket, tmp_path):
    source = f"{s3_bucket}/fashion-mnist"
    for name in (n for pair in ds.FASHION_MNIST_FILES.values() for n in pair):
        storage.write_bytes(Path(ds.FASHION_MNIST_DIR, name).read_bytes(), storage.join(source, name))
    flags = ["--limit", "60", "--reference-size", "40", "--noise", "symmetric:0.2"]
    data = _make(tmp_path / "from-s3", "--source", source, *flags)
    local = _make(tmp_path / "from-disk", *flags)
    assert data["meta"]["source"] == source and data["meta"]["splits"] == {"reference": 40, "train": 60, "test": 60}
    for split in ds.SPLITS:
        assert data["splits"][split].equals(local["splits"][split])


def test_missing_source_exits_2_with_instructions(tmp_path, capsys):
    (tmp_path / "src").mkdir()  # a folder without Fashion-MNIST's files
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "out"), "--source", str(tmp_path / "src")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "apt-get install -y dataset-fashion-mnist" in err and "--source" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # checked before any output is written


BAD_FLAGS = [["--noise", "symmetric:1.5"], ["--noise", "blur:0.1"], ["--limit", "0"], ["--reference-size", "60000"]]


@pytest.mark.parametrize("flags", BAD_FLAGS)
def test_bad_arguments_exit_2(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path), *flags])
    assert info.value.code == 2 and flags[0] in capsys.readouterr().err


def test_reference_size_is_bounded_by_fashion_mnist_only_there():
    from jobs.make_dataset import MakeDatasetConfig

    # Image-caption shards may hold any number of rows: build_from_rows checks the count once read.
    cfg = MakeDatasetConfig(out="unused", source="s3://bucket/shards", columns="img2dataset", reference_size=80_000)
    assert cfg.reference_size == 80_000
    with pytest.raises(ValueError, match="below 60000"):
        MakeDatasetConfig(out="unused", reference_size=60_000)
    with pytest.raises(ValueError, match=">= 0"):
        MakeDatasetConfig(out="unused", source="s3://bucket/shards", columns="img2dataset", reference_size=-1)
    import pyarrow as pa

    rows = pa.concat_tables(ds.make_synthetic(n=40, seed=3).splits.values())  # 40 labelled rows
    with pytest.raises(ValueError, match="40 rows cannot give 10 test and 80000 reference rows"):
        ds.build_from_rows(rows, ds.SYNTHETIC_CLASSES, reference_size=80_000, test_size=10)


def test_synthetic_dataset(tmp_path):
    data = _make(tmp_path, "--synthetic", "--noise", "symmetric:0.25")
    assert data["meta"]["classes"] == list(ds.SYNTHETIC_CLASSES)
    assert {s: t.num_rows for s, t in data["splits"].items()} == {"reference": 64, "train": 128, "test": 64}
    assert (data["truth"]["corruption"].to_numpy(zero_copy_only=False) == "symmetric").sum() == 32


def test_writes_to_s3(s3_bucket, tmp_path):
    url = f"{s3_bucket}/fmnist"
    data = _make(url, "--limit", "200", "--reference-size", "200", "--noise", "caption:0.1")
    assert data["meta"]["splits"]["train"] == 200 and data["splits"]["train"].num_rows == 200
    assert (data["truth"]["corruption"].to_numpy(zero_copy_only=False) == "caption").sum() == 20
    local = _make(tmp_path / "fmnist", "--limit", "200", "--reference-size", "200", "--noise", "caption:0.1")
    for split in ds.SPLITS:
        assert data["splits"][split].equals(local["splits"][split])
    assert data["truth"].equals(local["truth"])


def _own_shards(root: str, n: int = 240) -> tuple[dict, tuple[str, ...]]:
    """img2dataset parquet shards of labelled synthetic images, each with its own caption; returns rows by key."""
    import pyarrow as pa

    source = ds.make_synthetic(n=n, seed=11)
    rows = pa.concat_tables([source.splits[s] for s in ds.SPLITS]).to_pylist()
    by_key = {f"src{i:05d}": {"jpg": r["image"], "txt": f"{ds.SYNTHETIC_CLASSES[r['label']]}, shot {i} in the yard",
                              "cls": r["label"]} for i, r in enumerate(rows)}
    table = pa.table({"key": list(by_key), "jpg": [r["jpg"] for r in by_key.values()],
                      "txt": [r["txt"] for r in by_key.values()], "cls": [f"{r['cls']}\n" for r in by_key.values()]})
    storage.write_shards(table, root, rows_per_shard=60)
    return by_key, ds.SYNTHETIC_CLASSES


def test_from_img2dataset_shards_in_s3(ray_session, s3_bucket):
    by_key, classes = _own_shards(f"{s3_bucket}/mine")
    flags = ["--source", f"{s3_bucket}/mine", "--columns", "img2dataset", "--classes", ",".join(classes),
             "--reference-size", "40", "--test-size", "40", "--noise", "symmetric:0.25,duplicate:0.05,corrupt_image:0.05"]
    data = _make(f"{s3_bucket}/noisy", *flags)
    assert data["meta"]["splits"] == {"reference": 40, "train": 160, "test": 40}
    truth = data["truth"].to_pylist()
    assert [r["corruption"] for r in truth].count("symmetric") == 40
    train = {r["key"]: r for r in data["splits"]["train"].to_pylist()}
    captions_of = {c: {r["txt"] for r in by_key.values() if r["cls"] == i} for i, c in enumerate(classes)}
    used = set()
    for row in truth:
        source, written = by_key[row["source_key"]], train[row["key"]]
        used.add(row["source_key"])
        assert row["clean_label"] == source["cls"] or row["corruption"] == "duplicate"
        if row["corruption"] == "none":  # as stored: image bytes, caption, label
            assert (written["image"], written["caption"], written["label"]) == (source["jpg"], source["txt"], source["cls"])
        elif row["corruption"] == "symmetric":  # another clean row's caption, of the class the label now names
            assert written["label"] != source["cls"] and written["caption"] in captions_of[classes[written["label"]]]
            assert written["caption"] != source["txt"]
        elif row["corruption"] == "duplicate":
            original = train[row["duplicate_of"]]
            assert written["caption"] == original["caption"] and written["label"] == original["label"]
            assert 0 < np.abs(_pixels(written["image"]).astype(int) - _pixels(original["image"]).astype(int)).max() <= 8
        else:
            assert not noise.decodes(written["image"])
    assert len(used) == 160  # every train row traced to its own source row
    again = _make(f"{s3_bucket}/noisy-again", *flags)  # the source read in file order: same bytes
    assert all(again["splits"][s].equals(data["splits"][s]) for s in ds.SPLITS)
    # That order was its reads' own: a later job in the process (jobs.demo's training) runs as it would alone.
    assert ray.data.DataContext.get_current().execution_options.preserve_order is False


def test_unlabelled_shards_are_refused_by_name(ray_session, tmp_path, capsys):
    from shardfiles import write_img2dataset

    write_img2dataset(ds.make_synthetic(n=80, seed=2), str(tmp_path / "src"), splits=("train",), tars=True, labels=False)
    code = main(["--out", str(tmp_path / "out"), "--source", str(tmp_path / "src" / "train"), "--columns", "img2dataset",
                 "--classes", "a,b,c,d", "--reference-size", "5", "--test-size", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "40 of 40 rows have no label" in err and "Traceback" not in err
    assert not storage.is_complete(str(tmp_path / "out"))


def test_labels_that_are_not_integers_are_named_as_such_and_a_source_without_rows_is_refused(ray_session, tmp_path,
                                                                                              capsys):
    """A `cls` of `cat` was reported as a missing label, "map one with --columns", to a user who had mapped it;
    shards without a row failed in pa.concat_tables, naming nothing."""
    rows = ds.make_synthetic(n=80, seed=2).splits["train"]
    labels = [f"{v}\n" for v in rows.column("label").to_pylist()]
    labels[3] = "cat\n"
    src = str(tmp_path / "src")
    storage.write_shards(pa.table({"key": rows.column("key"), "jpg": rows.column("image"), "txt": rows.column("caption"),
                                   "cls": pa.array(labels)}), src, rows_per_shard=25)
    argv = ["--columns", "img2dataset", "--classes", "a,b,c,d", "--reference-size", "5", "--test-size", "5"]
    code = main(["--out", str(tmp_path / "out"), "--source", src, *argv])
    err = capsys.readouterr().err
    key = rows.column("key")[3].as_py()
    assert code == 2 and f"1 of {rows.num_rows} rows have a label that is not an integer (first: {key!r} with " \
                         "'cat'); label noise needs a class index on every row, 0..3" in err, err
    assert "have no label" not in err and "Traceback" not in err
    empty = str(tmp_path / "empty")
    storage.write_shards(pa.table({"key": pa.array([], pa.string()), "jpg": pa.array([], pa.binary()),
                                   "txt": pa.array([], pa.string()), "cls": pa.array([], pa.string())}), empty)
    code = main(["--out", str(tmp_path / "out2"), "--source", empty, *argv])
    err = capsys.readouterr().err
    assert code == 2 and f"--source {empty}: its shards hold no rows" in err and "Traceback" not in err, err


def test_an_out_over_the_source_is_refused_before_anything_is_written(tmp_path, capsys):
    src = tmp_path / "src"
    storage.write_shards(ds.make_synthetic(n=20, seed=2).splits["train"], str(src))
    listing = sorted(p.name for p in src.iterdir())
    for out in (src, src / "noisy", tmp_path):
        with pytest.raises(SystemExit) as exc:
            main(["--out", str(out), "--source", str(src), "--columns", "mmdp", "--classes", "a,b,c,d"])
        assert exc.value.code == 2 and f"--out {out} and --source {src} overlap" in capsys.readouterr().err
        assert sorted(p.name for p in src.iterdir()) == listing and storage.is_complete(str(src))


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = bytesio.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _webp(pixels: np.ndarray) -> bytes:
    buf = bytesio.BytesIO()
    Image.fromarray(pixels).save(buf, format="WEBP")
    return buf.getvalue()


def test_image_problem_reads_headers_and_ends_not_pixels():
    pixels = ds.draw_synthetic(1, seed=5)[0][0]
    png, jpeg, webp = ds.encode_png(pixels), _jpeg(pixels), _webp(pixels)
    for whole in (png, jpeg, webp, jpeg + b"\0\0trailer"):  # bytes after a JPEG's end still decode: kept
        assert ds.image_problem(whole) is None
    assert ds.image_problem(None) == ds.image_problem(b"") == ds.NO_IMAGE
    cut = [png[: len(png) // 2], jpeg[: len(jpeg) // 2], webp[: len(webp) - 10]]  # partial downloads
    garbage = [b"<html>404 Not Found</html>", noise.PNG_SIGNATURE, noise.corrupt_png(png, np.random.default_rng(0), False)]
    for broken in cut + garbage:
        assert not noise.decodes(broken) and ds.image_problem(broken) == ds.UNDECODABLE_IMAGE


def _img2dataset_with_failures(root: Path) -> tuple[dict, dict]:
    """One img2dataset parquet shard of 120 labelled images and 30 rows without a usable one.

    As img2dataset writes them: a failed download is a row with null ``jpg``
    and ``txt`` (status ``failed_to_download``; some with no ``cls`` either);
    here also bytes that are no image (an error page) and cut-short downloads.
    Returns the good rows by key, and the bad rows' keys by reason.
    """
    import pyarrow as pa

    source = ds.make_synthetic(n=120, seed=13)
    good = {f"ok{i:04d}": r for i, r in enumerate(pa.concat_tables(source.splits.values()).to_pylist())}
    rows = [{"key": k, "jpg": _jpeg(_pixels(r["image"])) if i % 2 else r["image"], "txt": f"shot {i}",
             "cls": f"{r['label']}\n", "status": "success"} for i, (k, r) in enumerate(good.items())]
    whole = [r["jpg"] for r in rows]  # PNG and JPEG
    bad = {ds.NO_IMAGE: [], ds.UNDECODABLE_IMAGE: []}
    for i in range(30):
        key, reason = f"bad{i:04d}", ds.NO_IMAGE if i < 20 else ds.UNDECODABLE_IMAGE
        image = None if i < 18 else b"" if i < 20 else b"<html>403</html>" if i < 25 else whole[i][: len(whole[i]) // 2]
        cls = None if i < 3 else f"{i % 4}\n"  # a failed row without a label is left out, not refused
        rows.insert(i * 5, {"key": key, "jpg": image, "txt": None if image is None else "x", "cls": cls,
                            "status": "failed_to_download" if image is None else "success"})
        bad[reason].append(key)
    table = pa.Table.from_pylist(rows, pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("txt", pa.string()),
                                                  ("cls", pa.string()), ("status", pa.string())]))
    storage.write_shards(table, str(root), rows_per_shard=100)
    return {k: r for k, r in zip((r["key"] for r in rows), rows) if k in good}, bad


def test_img2dataset_rows_without_a_usable_image_are_left_out_and_counted(ray_session, tmp_path, capsys):
    good, bad = _img2dataset_with_failures(tmp_path / "src")
    data = _make(tmp_path / "out", "--source", str(tmp_path / "src"), "--columns", "img2dataset",
                 "--classes", ",".join(ds.SYNTHETIC_CLASSES), "--reference-size", "20", "--test-size", "20",
                 "--noise", "symmetric:0.3,duplicate:0.1,corrupt_image:0.05")
    out = capsys.readouterr().out
    assert data["meta"]["splits"] == {"reference": 20, "train": 80, "test": 20}  # the 120 usable rows
    assert data["meta"]["source_rows"] == {"read": 150, "used": 120, "left_out": {
        ds.NO_IMAGE: {"rows": 20, "first_key": "bad0000"}, ds.UNDECODABLE_IMAGE: {"rows": 10, "first_key": "bad0020"}}}
    assert ("source rows: 150 read, 120 used; left out without a usable image: 20 empty image bytes (first: 'bad0000')"
            ", 10 undecodable image (first: 'bad0020')") in out
    truth = data["truth"].to_pylist()
    assert {r["source_key"] for r in truth} <= set(good)
    assert sum(r["corruption"] == "symmetric" for r in truth) == 24 and data["meta"]["noise_measured"]["symmetric"] == 0.3
    for split, table in data["splits"].items():
        kinds = [r["corruption"] for r in truth] if split == "train" else ["none"] * table.num_rows
        for row, kind in zip(table.to_pylist(), kinds):
            assert noise.decodes(row["image"]) == (kind != "corrupt_image"), (split, row["key"])
            if kind == "none" and split == "train":
                assert row["caption"] in {r["txt"] for r in good.values()}
    captions = {r["caption"] for t in (data["splits"]["reference"], data["splits"]["test"]) for r in t.to_pylist()}
    assert captions <= {r["txt"] for r in good.values()}  # their own captions: no template stands in for a lost row


def test_a_source_without_a_usable_image_exits_2_with_the_count(ray_session, tmp_path, capsys):
    import pyarrow as pa

    table = pa.table({"key": [f"{i:09d}" for i in range(12)], "jpg": pa.array([None] * 10 + [b"", b"GIF"], pa.binary()),
                      "txt": pa.array([None] * 12, pa.string()), "cls": ["1\n"] * 12,
                      "status": ["failed_to_download"] * 12})
    storage.write_shards(table, str(tmp_path / "src"), rows_per_shard=100)
    code = main(["--out", str(tmp_path / "out"), "--source", str(tmp_path / "src"), "--columns", "img2dataset",
                 "--classes", "a,b", "--reference-size", "2", "--test-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("none of the 12 source rows has a usable image (11 empty image bytes (first: '000000000'), "
            "1 undecodable image (first: '000000011'))") in err
    assert not storage.is_complete(str(tmp_path / "out"))
