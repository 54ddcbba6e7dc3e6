"""Storage round trips through a local folder, a loopback S3 server and a GCS emulator; shard files onto the contract."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data import shards
from pipeline.data.contract import READ_SCHEMA, SHARD_SCHEMA, ColumnMapping, SchemaError, to_contract
from pipeline.data.validate import NOT_AN_INTEGER_LABEL, RowValidator
from shardfiles import tar_bytes


def _table(n=25, seed=0):
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "key": [f"k{i:04d}" for i in range(n)],
            "image": [rng.bytes(int(rng.integers(1, 64))) for _ in range(n)],
            "caption": [f"a photo of thing {i}" if i % 3 else "" for i in range(n)],
            "label": pa.array([i % 4 if i % 5 else None for i in range(n)], pa.int64()),
        },
        schema=SHARD_SCHEMA,
    )


@pytest.fixture(params=["local", "s3", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    if request.param == "gs":
        return request.getfixturevalue("gcs_prefix")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_shards_round_trip(root):
    table = _table(25)
    urls = storage.write_shards(table, storage.join(root, "train"), rows_per_shard=10)
    assert len(urls) == 3
    assert storage.read_table(storage.join(root, "train")).equals(table)
    assert storage.list_files(storage.join(root, "train")) == urls


def test_single_file_json_and_bytes_round_trip(root):
    table = _table(7)
    storage.write_table(table, storage.join(root, "one.parquet"))
    assert storage.read_table(storage.join(root, "one.parquet")).equals(table)
    storage.write_json({"classes": ["a", "b"], "n": 3}, storage.join(root, "meta.json"))
    assert storage.read_json(storage.join(root, "meta.json")) == {"classes": ["a", "b"], "n": 3}
    storage.write_bytes(b"\x00\x01weights", storage.join(root, "deep/er/model.pt"))
    assert storage.read_bytes(storage.join(root, "deep/er/model.pt")) == b"\x00\x01weights"


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_fetch_to_cache_fetches_again_when_the_object_was_overwritten(store, request, tmp_path):
    url = (request.getfixturevalue("s3_bucket") if store == "s3" else request.getfixturevalue("gcs_prefix")) \
        + "/ref-clip/model.pt"
    storage.write_bytes(b"weights-v1", url)
    local = storage.fetch_to_cache(url, cache_dir=str(tmp_path))
    first = os.stat(local)
    assert storage.fetch_to_cache(url, cache_dir=str(tmp_path)) == local
    again = os.stat(local)
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # unchanged: not downloaded again
    # Re-trained into the same folder: same size, and on S3 likely within the same second as the first upload.
    storage.write_bytes(b"weights-v2", url)
    assert storage.fetch_to_cache(url, cache_dir=str(tmp_path)) == local
    assert open(local, "rb").read() == b"weights-v2"


def test_uncommitted_output_is_refused(root):
    out = storage.join(root, "scores")
    storage.begin_output(out)
    storage.write_table(_table(3), storage.join(out, "part-00000.parquet"))
    with pytest.raises(storage.InputError, match="incomplete output"):
        storage.read_table(out)
    storage.commit_output(out, ["part-00000.parquet"], 3)
    assert storage.read_table(out).num_rows == 3


def test_a_commit_that_stopped_before_its_pending_mark_went_is_incomplete_everywhere(root):
    """commit_output writes _SUCCESS, then deletes _PENDING: stopped between the two (or a store that lets a writer
    write but not delete), the folder read as committed to is_complete and to a read of it, and as incomplete to
    a read of a folder inside it (the score job's scores/): jobs.demo --reuse then skipped a stage whose output
    the next stage refused, every time."""
    out = storage.join(root, "scores")
    storage.begin_output(out)
    storage.write_table(_table(3), storage.join(out, "part-00000.parquet"))
    storage.commit_output(out, ["part-00000.parquet"], 3)
    assert storage.is_complete(out) and storage.read_table(out).num_rows == 3
    storage.write_bytes(b"", storage.join(out, "_PENDING"))  # both marks, as the stopped commit leaves them
    assert not storage.is_complete(out)
    with pytest.raises(storage.InputError, match="incomplete output"):
        storage.read_table(out)


def test_rewriting_a_committed_folder_uncommits_it_first(tmp_path):
    out = str(tmp_path / "t")
    storage.write_shards(_table(5), out)
    storage.begin_output(out)  # a second writer starts, then dies
    with pytest.raises(storage.InputError, match="incomplete"):
        storage.read_table(out)


def test_rewriting_a_split_with_fewer_shards_leaves_none_of_the_earlier_ones(tmp_path):
    """Readers that do not follow the manifest (pandas, Spark, Ray Data on the folder) read every file there."""
    from pipeline.data.reference import make_synthetic
    from pipeline.data.tars import write_tars

    parquet, tars = str(tmp_path / "parquet"), str(tmp_path / "tars")
    rows = make_synthetic(n=60, seed=0).splits["train"].select(list(SHARD_SCHEMA.names))
    assert len(storage.write_shards(_table(25), parquet, rows_per_shard=10)) == 3
    assert len(write_tars(rows, tars, rows_per_shard=10)) == 3
    storage.write_shards(_table(5), parquet, rows_per_shard=10)
    write_tars(rows.slice(0, 5), tars, rows_per_shard=10)
    assert sorted(os.listdir(parquet)) == ["_SUCCESS", "part-00000.parquet"]
    assert pq.read_table(parquet).num_rows == 5
    assert sorted(os.listdir(tars)) == ["_SUCCESS", "part-00000.tar"]


def test_local_write_leaves_no_temp_files(tmp_path):
    storage.write_table(_table(4), str(tmp_path / "x.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.parquet"]


def test_img2dataset_parquet_maps_onto_contract(tmp_path):
    raw = pa.table({"key": ["000000001", "000000002"], "jpg": [b"\xff\xd8a", b"\xff\xd8b"],
                    "txt": ["a dog", "a cat"], "url": ["http://x/1", "http://x/2"]})
    pq.write_table(raw, tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")
    kind, files = shards.shard_files(str(tmp_path))  # the stats sidecar is not a shard
    assert (kind, files) == ("parquet", [storage.join(str(tmp_path), "00000.parquet")])
    table = to_contract(storage.read_table(files[0]), ColumnMapping.parse("img2dataset"))
    assert table.schema == READ_SCHEMA and table.column("bad_label").null_count == 2
    assert table.column("image").to_pylist() == [b"\xff\xd8a", b"\xff\xd8b"]
    assert table.column("caption").to_pylist() == ["a dog", "a cat"]
    assert table.column("label").null_count == 2


def test_keys_stored_as_bytes_that_are_not_utf8_read_escaped_not_as_a_failed_shard():
    """A key column of bytes with one value not UTF-8 failed the whole job (Arrow's cast), naming no shard."""
    raw = pa.table({"key": pa.array([b"000000001", b"caf\xe9", None], pa.binary()), "image": [b"a", b"b", b"c"],
                    "caption": pa.array([b"a dog", b"un caf\xe9", b"x"], pa.binary())})
    table = to_contract(raw)
    assert table.column("key").to_pylist() == ["000000001", "caf\\xe9", None]  # a null key: its row's reject
    assert table.column("caption").to_pylist() == ["a dog", "un caf\ufffd", "x"]
    assert to_contract(raw.slice(0, 1)).column("key").to_pylist() == ["000000001"]  # all UTF-8: as it was


def test_projection_reads_the_asked_columns_unless_shards_differ_in_them():
    img2dataset = ColumnMapping.parse("img2dataset")
    every = [("key", "jpg", "txt", "url", "exif"), ("exif", "url", "txt", "jpg", "key")]
    # The key and image always (each row needs them); a column absent from every shard is left out (nulls).
    assert shards.projection(img2dataset, ("label",), every) == ["key", "jpg"]
    assert shards.projection(img2dataset, ("key", "image", "caption", "label"), every) == ["key", "jpg", "txt"]
    # A caption in one shard and not the other: one read of both cannot name it, so every column is read.
    assert shards.projection(img2dataset, ("caption",), [("key", "jpg", "txt"), ("key", "jpg")]) is None
    # ...but a column the run does not ask for may differ freely.
    assert shards.projection(img2dataset, ("label",), [("key", "jpg", "txt"), ("key", "jpg")]) == ["key", "jpg"]


def test_ray_data_reads_only_the_asked_columns_and_the_same_rows(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    raw = pa.table({"key": [f"{i:09d}" for i in range(12)], "jpg": [rng.bytes(40) for _ in range(12)],
                    "txt": [f"photo {i}" for i in range(12)], "cls": pa.array([str(i % 3) for i in range(12)]),
                    "exif": [rng.bytes(2000) for _ in range(12)]})
    same, mixed = tmp_path / "same", tmp_path / "mixed"
    for folder, second in ((same, raw.slice(6)), (mixed, raw.slice(6).drop_columns(["txt"]))):
        folder.mkdir()
        pq.write_table(raw.slice(0, 6), folder / "a.parquet")
        pq.write_table(second, folder / "b.parquet")

    def rows(url, fields):
        ds = shards.read_shards(str(url), "img2dataset", fields)
        return pa.concat_tables(ds.iter_batches(batch_format="pyarrow")).sort_by("key")

    projected, whole = rows(same, ("key", "image", "label")), rows(same, tuple(SHARD_SCHEMA.names))
    assert projected.schema == whole.schema == READ_SCHEMA
    for column in ("key", "image", "label"):
        assert projected.column(column).equals(whole.column(column))
    assert projected.column("label").to_pylist() == [i % 3 for i in range(12)]
    assert projected.column("caption").null_count == 12  # not asked, not read
    assert whole.column("caption").to_pylist() == [f"photo {i}" for i in range(12)]
    # Shards that differ in the caption column: each keeps its own captions.
    assert rows(mixed, ("key", "image", "caption")).column("caption").to_pylist() == [f"photo {i}" for i in range(6)] + [None] * 6


def test_webdataset_tar_maps_onto_contract(tmp_path):
    data = tar_bytes([("000000001.jpg", b"img1"), ("000000001.txt", b"a dog\n"), ("000000001.cls", b"3"),
                 ("000000001.json", b"{}"), ("000000002.png", b"img2"), ("000000002.txt", b"a cat"),
                 ("000000002.cls", b"5\n")])
    (tmp_path / "00000.tar").write_bytes(data)
    # img2dataset writes a metadata parquet beside each tar; it holds no samples.
    pq.write_table(pa.table({"key": ["000000001"], "status": ["success"]}), tmp_path / "00000.parquet")
    assert shards.shard_files(str(tmp_path)) == ("webdataset", [storage.join(str(tmp_path), "00000.tar")])
    # Each sample's members by extension, as the score job's webdataset reader hands them over.
    members = pa.table({"__key__": ["000000001", "000000002"], "jpg": [b"img1", None], "png": [None, b"img2"],
                        "txt": [b"a dog\n", b"a cat"], "cls": [b"3", b"5\n"], "json": [b"{}", None]})
    table = shards.webdataset_to_contract(members)
    assert table.select(SHARD_SCHEMA.names).to_pylist() == [
        {"key": "000000001", "image": b"img1", "caption": "a dog", "label": 3},
        {"key": "000000002", "image": b"img2", "caption": "a cat", "label": 5},
    ]


def test_webdataset_images_of_any_case_and_pil_format_are_the_rows_images():
    """ImageNet's ``.JPEG``, and GIF/BMP/TIFF/WebP members, are images, not "empty image bytes"."""
    names = ("JPG", "JPEG", "Png", "gif", "bmp", "tif", "TIFF", "webp")
    files = []
    for name in names:
        buf = io.BytesIO()
        pil_format = {"JPG": "JPEG", "TIF": "TIFF"}.get(name.upper(), name.upper())
        Image.new("RGB", (4, 4), (10, 200, 30)).save(buf, format=pil_format)
        files.append(buf.getvalue())
    # One sample per member kind, each with only that image member (a column of nulls elsewhere).
    members = pa.table({"__key__": [f"{i:09d}" for i in range(len(names))],
                        **{name: pa.array([f if j == i else None for j in range(len(names))], pa.binary())
                           for i, (name, f) in enumerate(zip(names, files))},
                        "txt": pa.array([b"a photo"] * len(names), pa.binary())})
    table = shards.webdataset_to_contract(members)
    assert table.column("image").to_pylist() == files
    batch = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in table.column_names}
    assert list(RowValidator("caption")(batch)["error"]) == [""] * len(names)
    for data in files:  # and each is an image PIL decodes, as the scoring decoder does
        assert Image.open(io.BytesIO(data)).convert("RGB").size == (4, 4)


def test_a_label_that_is_not_an_integer_rejects_its_row_and_only_it():
    """One bad label (an empty or worded ``.cls`` member, 2.5, "") is its row's reason; the batch's other
    rows keep their labels, and integer-like labels (3, "3", 3.0) read as before."""
    def labels(column, **extra):
        table = to_contract(pa.table({"key": [f"k{i}" for i in range(len(column))], "image": [b"x"] * len(column),
                                      "caption": ["a photo"] * len(column), "label": column, **extra}))
        return table.column("label").to_pylist(), table.column("bad_label").to_pylist()

    assert labels(pa.array([3, None, 0])) == ([3, None, 0], [None] * 3)
    assert labels(pa.array(["3", " 1\n", "", "cat", None])) == ([3, 1, None, None, None], [None, None, "", "cat", None])
    # NaN is pandas' missing value: no label, not a bad one.
    assert labels(pa.array([3.0, 2.5, float("nan"), None])) == ([3, None, None, None], [None, "2.5", None, None])
    wds = shards.webdataset_to_contract(pa.table({"__key__": ["a", "b", "c"], "jpg": [b"x", b"y", b"z"],
                                                  "txt": [b"x", b"y", b"z"], "cls": [b"3\n", b"", b"cat\n"]}))
    assert wds.column("label").to_pylist() == [3, None, None]
    assert wds.column("bad_label").to_pylist() == [None, "", "cat"]
    # A label column of a type that no value of could be read is still the shard's error.
    with pytest.raises(SchemaError, match="'label' cannot be read as label"):
        to_contract(pa.table({"key": ["a"], "image": [b"x"], "label": pa.array([[1]])}))
    # The row checks give those rows their reason, in caption mode too; the others pass.
    batch = {k: np.asarray(wds.column(k).to_pylist(), dtype=object) for k in wds.column_names}
    out = RowValidator("caption", ["a", "b", "c", "d"])(batch)
    assert list(out["error"]) == ["", f"{NOT_AN_INTEGER_LABEL}: ''", f"{NOT_AN_INTEGER_LABEL}: 'cat'"]
    assert "bad_label" not in out  # it is in the reasons now


def test_a_blank_caption_is_no_caption_so_the_label_gives_the_text():
    # Training reads "  " as no caption and trains on the label's prompt; the row checks read it alike
    # (it was rejected as "empty caption" although its label gives it a text).
    batch = {"key": np.array(["a", "b"], object), "image": np.array([b"x", b"y"], object),
             "caption": np.array(["  ", "\n"], object), "label": np.array([1, None], object)}
    out = RowValidator("caption", ["zero", "one"])(batch)
    assert list(out["error"]) == ["", "empty caption and no label"]
    assert out["caption"][0] == "a photo of a one."


def test_one_shard_file_is_read_as_its_name_says(tmp_path):
    # A dataset may be one file: a parquet file is parquet, a tar is webdataset (never the other way round).
    pq.write_table(_table(4), tmp_path / "a.parquet")
    (tmp_path / "b.tar").write_bytes(tar_bytes([("000000001.jpg", b"img1"), ("000000001.txt", b"a dog")]))
    for name, kind in (("a.parquet", "parquet"), ("b.tar", "webdataset")):
        url = storage.join(str(tmp_path), name)
        assert shards.shard_files(url) == (kind, [url])


def test_parquet_beside_tars_is_refused_unless_it_is_a_tars_metadata(tmp_path):
    """A folder of parquet shards and one stray tar is no webdataset of that tar (every parquet row skipped)."""
    mix = tmp_path / "mix"
    mix.mkdir()
    for i in range(2):
        pq.write_table(_table(4, seed=i), mix / f"part-{i}.parquet")
    (mix / "old.tar").write_bytes(tar_bytes([("000000001.jpg", b"img1")]))
    with pytest.raises(storage.InputError, match=r"part-0\.parquet: parquet beside webdataset tars \(.*old\.tar\)"):
        shards.list_shards(str(mix))
    with pytest.raises(storage.InputError, match=r"part-0\.parquet"):
        shards.shard_files(str(mix))
    # img2dataset's metadata is named as its tar (a tar may have none): a webdataset, its tars the shards.
    wds = tmp_path / "wds"
    (wds / "sub").mkdir(parents=True)
    for name in ("00000", "00001", "sub/00002"):
        (wds / f"{name}.tar").write_bytes(tar_bytes([("000000001.jpg", b"img1")]))
    for name in ("00000", "sub/00002"):
        pq.write_table(pa.table({"key": ["000000001"], "status": ["success"]}), wds / f"{name}.parquet")
    assert shards.list_shards(str(wds)) == ("webdataset", [storage.join(str(wds), f"{n}.tar")
                                                           for n in ("00000", "00001", "sub/00002")])


def test_truncated_tar_names_the_file(tmp_path):
    data = tar_bytes([(f"{i:09d}.jpg", b"x" * 2000) for i in range(5)])
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(storage.InputError, match="00000.tar"):
        shards.shard_files(str(tmp_path))


def test_corrupt_parquet_names_the_file(tmp_path):
    storage.write_shards(_table(4), str(tmp_path / "in"))
    (tmp_path / "in2").mkdir()
    pq.write_table(_table(4), tmp_path / "in2" / "a.parquet")
    (tmp_path / "in2" / "b.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(storage.InputError, match="b.parquet"):
        storage.read_table(str(tmp_path / "in2"))


def test_stray_non_shard_file_names_the_file(tmp_path):
    pq.write_table(_table(4), tmp_path / "a.parquet")
    (tmp_path / "notes.csv").write_text("x,y")
    with pytest.raises(storage.InputError, match="notes.csv"):
        shards.shard_files(str(tmp_path))


def test_missing_required_column_is_named():
    with pytest.raises(SchemaError, match="'image'"):
        to_contract(pa.table({"key": ["a"], "caption": ["x"]}))
    with pytest.raises(SchemaError, match="bad column mapping"):
        ColumnMapping.parse("picture=jpg")


def test_missing_url_is_a_clear_error(tmp_path):
    with pytest.raises(storage.InputError, match="no such file"):
        storage.read_table(str(tmp_path / "nope"))


def _keys_read(url: str) -> list[str]:
    return sorted(k for b in shards.read_shards(url).iter_batches(batch_format="pyarrow") for k in b.column("key").to_pylist())


def test_one_file_of_any_name_is_read_as_the_parquet_its_checks_found(ray_local, tmp_path):
    """``--input train.pq``: the checks take one named file as parquet whatever its extension; so does the read."""
    table = _table(6)
    pq.write_table(table, tmp_path / "train.pq")
    url = str(tmp_path / "train.pq")
    assert shards.shard_files(url) == ("parquet", [url])
    assert _keys_read(url) == table.column("key").to_pylist()
    # A name with no extension at all Ray Data cannot be told to read: refused before reading, by name.
    pq.write_table(table, tmp_path / "train")
    with pytest.raises(storage.InputError, match=r"train: a shard file's name needs an extension"):
        shards.list_shards(str(tmp_path / "train"))


@pytest.mark.parametrize("store", ["local", "s3"])  # the in-process GCS emulator is not served to Ray's reader threads
def test_ray_data_reads_exactly_the_listed_shards(ray_local, store, tmp_path, request):
    """Ray Data gets the folder where its own listing finds the same shards, else the files: the same rows."""
    root = str(tmp_path) if store == "local" else request.getfixturevalue("s3_bucket") + "/prefix"
    table = _table(30)
    plain = storage.join(root, "plain")
    storage.write_shards(table, plain, rows_per_shard=10)
    assert shards._as_folder(plain, storage.list_files(plain), "parquet") == [plain]
    assert _keys_read(plain) == table.column("key").to_pylist()
    # A committed folder holds exactly its manifest, not a parquet file added after the commit;
    # a nested folder of shards is read too (Ray's folder listing would also take both).
    committed = storage.join(root, "committed")
    with storage.output(committed):
        storage.write_table(table.slice(0, 10), storage.join(committed, "a.parquet"))
        storage.write_table(table.slice(10, 10), storage.join(committed, "b.parquet"))
    storage.write_table(table.slice(20, 10), storage.join(committed, "late.parquet"))
    nested = storage.join(root, "nested")
    storage.write_table(table.slice(0, 10), storage.join(nested, "a.parquet"))
    storage.write_table(table.slice(10, 20), storage.join(nested, "more", "b.parquet"))
    for url, rows in ((committed, 20), (nested, 30)):
        files = storage.list_files(url)
        assert shards._as_folder(url, files, "parquet") == files
        assert _keys_read(url) == table.column("key").to_pylist()[:rows]


def test_the_shard_check_gives_each_parquet_footers_columns_and_rows(root):
    table = _table(25)
    urls = storage.write_shards(table, storage.join(root, "train"), rows_per_shard=10)
    footers = shards.check_shards("parquet", urls)
    assert [f.rows for f in footers] == [10, 10, 5]
    assert {f.columns for f in footers} == {tuple(SHARD_SCHEMA.names)}


def test_a_column_the_mapping_names_must_be_in_some_shard(tmp_path):
    table = _table(20).rename_columns(["id", "img", "text", "label"])
    url = str(tmp_path / "in")
    storage.write_table(table.slice(0, 10), storage.join(url, "a.parquet"))
    storage.write_table(table.slice(10).drop_columns(["text"]), storage.join(url, "b.parquet"))
    good = ColumnMapping.parse("key=id,image=img,caption=text")
    assert [f.rows for f in shards.check_shards("parquet", storage.list_files(url), good)] == [10, 10]
    # A typo: no shard has it, so every caption would be read as missing.
    with pytest.raises(SchemaError, match=rf"--columns caption=txt: no shard in {url} has a column 'txt'"):
        shards.check_shards("parquet", storage.list_files(url), ColumnMapping.parse("key=id,image=img,caption=txt"))
    # A split read without the named column (a classifier's test split, without captions) passes.
    fields = ("label",)
    assert shards.check_shards("parquet", storage.list_files(url), ColumnMapping.parse("key=id,image=img,caption=txt"),
                               fields)
    # A preset's optional columns may be absent (a dataset without labels).
    storage.write_table(table.rename_columns(["key", "image", "caption", "other"]), storage.join(str(tmp_path), "c.parquet"))
    assert shards.check_shards("parquet", [storage.join(str(tmp_path), "c.parquet")], ColumnMapping.parse("mmdp"))


def test_shards_whose_columns_a_read_cannot_join_are_refused_naming_the_column_and_both_shards(tmp_path):
    """A read task concatenates several shards' tables: int64 beside string (or a pandas categorical beside plain
    strings) failed the job with Arrow's ArrowConversionError, naming no shard, once Ray put them in one task."""
    table = _table(20)
    url = str(tmp_path / "in")
    a, b, c = (storage.join(url, f"{name}.parquet") for name in "abc")
    storage.write_table(table.slice(0, 10).append_column("note", pa.array(range(10), pa.int64())), a)
    storage.write_table(table.slice(10, 5).append_column("note", pa.array(["x"] * 5)), b)
    storage.write_table(table.slice(15).append_column("note", pa.array(range(5), pa.int32())), c)
    mmdp = ColumnMapping.parse("mmdp")
    # The score job reads every column: refused. A read of the mapped columns alone does not read "note".
    with pytest.raises(SchemaError, match=f"column 'note' is string in {b} and int64 in {a}: a read joins shards"):
        shards.check_shards("parquet", [a, b, c], mmdp, read_all=True)
    assert [f.rows for f in shards.check_shards("parquet", [a, b, c], mmdp)] == [10, 5, 5]
    # Types Arrow promotes join (int32 beside int64); a label column that cannot is refused for any read.
    assert shards.check_shards("parquet", [a, c], mmdp, read_all=True)
    storage.write_table(table.slice(10, 5).set_column(3, "label", pa.array(["one"] * 5)), b)
    with pytest.raises(SchemaError, match=f"column 'label' is string in {b} and int64 in {a}"):
        shards.check_shards("parquet", [a, b], mmdp)
    categorical = table.slice(10, 5).set_column(2, "caption", pa.array(["a cat."] * 5).dictionary_encode())
    storage.write_table(categorical, b)
    with pytest.raises(SchemaError, match=f"column 'caption' is dictionary<values=string, indices=int32, "
                                          f"ordered=0> in {b} and string in {a}"):
        shards.check_shards("parquet", [a, b], mmdp)


def test_a_named_column_is_checked_before_a_job_from_the_first_footer_and_all_only_where_it_lacks_it(tmp_path):
    table = _table(30).rename_columns(["id", "img", "text", "label"])
    url = str(tmp_path / "in")
    storage.write_table(table.slice(0, 10), storage.join(url, "a.parquet"))
    storage.write_table(table.slice(10, 10).drop_columns(["text"]), storage.join(url, "b.parquet"))
    (tmp_path / "in" / "c.parquet").write_bytes(b"not parquet")  # read only where every footer is
    spec = ColumnMapping.parse("key=id,image=img,caption=text")
    shards.check_named_columns(url, spec)  # the first shard has every named column: one footer read
    with pytest.raises(storage.InputError, match="c.parquet"):  # it lacks one: every footer is read
        shards.check_named_columns(url, ColumnMapping.parse("key=id,image=img,caption=txt"))
    (tmp_path / "in" / "c.parquet").unlink()
    with pytest.raises(SchemaError, match=rf"--columns caption=txt: no shard in {url} has a column 'txt'"):
        shards.check_named_columns(url, ColumnMapping.parse("key=id,image=img,caption=txt"))
    # Only the first lacks it: another shard has it, so it is no typo.
    storage.remove(storage.join(url, "a.parquet"))
    storage.write_table(table.slice(20), storage.join(url, "c.parquet"))
    shards.check_named_columns(url, spec)
    # A split in subfolders (date=1/, date=2/): the error names the split, not the first file's subfolder.
    nested = str(tmp_path / "nested")
    for part in ("date=1", "date=2"):
        storage.write_table(table.slice(0, 5), storage.join(nested, part, "a.parquet"))
    with pytest.raises(SchemaError, match=rf"--columns caption=txt: no shard in {nested} has a column 'txt'"):
        shards.check_named_columns(nested, ColumnMapping.parse("key=id,image=img,caption=txt"))
    # Nothing to check, nothing read: a preset's names, or a split read without the named column.
    missing = str(tmp_path / "no-such-split")
    shards.check_named_columns(missing, ColumnMapping.parse("mmdp"))
    shards.check_named_columns(missing, ColumnMapping.parse("caption=txt"), fields=("label",))
    with pytest.raises(storage.InputError, match="no-such-split"):
        shards.check_named_columns(missing, ColumnMapping.parse("caption=txt"))


def test_a_corrupt_shard_is_named_before_reading(root):
    table = _table(20)
    url = storage.join(root, "in")  # a folder of shards no job committed: every parquet file in it is a shard
    storage.write_table(table.slice(0, 10), storage.join(url, "part-00000.parquet"))
    storage.write_table(table.slice(10, 10), storage.join(url, "part-00001.parquet"))
    storage.write_bytes(b"PAR1 but not parquet at all", storage.join(url, "part-99999.parquet"))
    with pytest.raises(storage.InputError, match="part-99999.parquet"):
        shards.shard_files(url)


def test_the_benchmarks_loopback_server_counts_each_get_and_its_bytes(monkeypatch):
    # What benchmarks.bytes_read and score_shards report rests on these counts.
    import time

    from benchmarks.loopback_s3 import LoopbackS3

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(var, "unset")  # restored after the test; the server sets its own
    with LoopbackS3() as s3:
        url = s3.bucket("counted")
        storage.write_bytes(b"x" * 1000, f"{url}/a/one.bin")
        storage.write_bytes(b"y" * 300, f"{url}/b/two.bin")
        began = time.time()
        assert storage.read_bytes(f"{url}/a/one.bin") == b"x" * 1000
        assert storage.read_bytes(f"{url}/b/two.bin") == b"y" * 300
        gets, sent = s3.gets(began, under=f"{url}/a")
        assert gets >= 1 and sent == 1000
        assert s3.gets(began)[1] == 1300
        assert s3.counts(0.0, began).get("PUT", 0) >= 2 and "PUT" not in s3.counts(began)


def _spark_folder(url, table, success=b""):
    """A folder as Spark, Hadoop, Glue and EMR write one: ``part-*`` files, their hidden ``.crc`` checksums,
    the commit protocol's own ``_``-files, and a ``_SUCCESS`` marker (empty, unless ``success`` says)."""
    names = [f"part-0000{i}-3f2a9c1e-8b7d-4c55-a1e0-5d6f7a8b9c0d-c000.snappy.parquet" for i in range(2)]
    for name, part in zip(names, (table.slice(0, 6), table.slice(6))):
        buf = pa.BufferOutputStream()
        pq.write_table(part, buf, compression="snappy")
        storage.write_bytes(buf.getvalue().to_pybytes(), storage.join(url, name))
        storage.write_bytes(b"crc", storage.join(url, f".{name}.crc"))
    storage.write_bytes(b"", storage.join(url, "_started_123"))
    storage.write_bytes(b'{"added": [], "removed": []}', storage.join(url, "_committed_123"))
    storage.write_bytes(success, storage.join(url, "_SUCCESS"))
    storage.write_bytes(b"", storage.join(url, "._SUCCESS.crc"))
    return [storage.join(url, name) for name in names]


def test_a_folder_spark_committed_is_read_as_a_folder_of_data_files(root):
    """Spark's ``_SUCCESS`` is an empty marker, no manifest of mmdp's: the folder's parquet files are its data."""
    table = _table(10)
    url = storage.join(root, "spark-out")
    parts = _spark_folder(url, table)
    assert storage.list_files(url) == parts
    assert shards.list_shards(url) == ("parquet", parts)
    assert storage.read_table(url).equals(table)
    assert storage.manifest(url) is None and storage.is_complete(url)  # committed, by another writer


@pytest.mark.parametrize("success", [
    b'{"name": "org.apache.hadoop.fs.s3a.commit.files.SuccessData/1", "committer": "magic",'
    b' "filenames": ["/spark-out/part-00000.snappy.parquet"]}',  # the Hadoop S3A committers' own JSON
    b"\n", b"written by a job\n", b"\xff\xfe\x00binary", b"[]", b'{"files": "part-00000.parquet"}', b'{"files": [1]}',
])
def test_a_success_file_that_is_no_manifest_of_mmdp_leaves_the_folder_a_plain_one(tmp_path, success):
    table = _table(10)
    url = str(tmp_path / "spark-out")
    parts = _spark_folder(url, table, success)
    assert shards.list_shards(url) == ("parquet", parts)
    assert storage.read_table(url).num_rows == 10
    assert storage.manifest(url) is None


def test_a_folder_mmdp_committed_still_lists_exactly_its_manifest(tmp_path):
    url = str(tmp_path / "train")
    urls = storage.write_shards(_table(25), url, rows_per_shard=10)
    storage.write_table(_table(3), storage.join(url, "part-99999.parquet"))  # outside the manifest: not listed
    assert storage.list_files(url) == urls and storage.read_table(url).num_rows == 25
    assert storage.manifest(url) == {"files": [u.rpartition("/")[2] for u in urls], "rows": 25}
    assert storage.manifest(str(tmp_path / "none")) is None


def test_a_folder_of_subfolders_is_read_as_their_writers_left_them(root):
    """Listed whole, a folder without a manifest of its own hid a subfolder's pending mark (a ``_`` name) and
    read the partial shards of a write that died there; and a committed subfolder's stray files were read too."""
    outer = storage.join(root, "in")
    storage.write_shards(_table(12), storage.join(outer, "a"), rows_per_shard=5)  # committed: 3 shards
    storage.write_table(_table(2), storage.join(outer, "a", "part-99999.parquet"))  # outside a's manifest
    storage.write_table(_table(4), storage.join(outer, "loose.parquet"))  # another writer's: a plain file
    listed = storage.list_files(outer)
    assert [u[len(outer) + 1:] for u in listed] == ["a/part-00000.parquet", "a/part-00001.parquet",
                                                     "a/part-00002.parquet", "loose.parquet"]
    assert storage.read_table(outer).num_rows == 16
    storage.begin_output(storage.join(outer, "b"))  # a write that died: its mark and one shard
    storage.write_table(_table(3), storage.join(outer, "b", "part-00000.parquet"))
    with pytest.raises(storage.InputError, match=f"{outer}/b: incomplete output .*, inside {outer}; rerun"):
        storage.list_files(outer)
    storage.commit_output(storage.join(outer, "b"), ["part-00000.parquet"], 3)
    assert len(storage.list_files(outer)) == 5
    # A writer's own staging (a _-named folder) is not read, nor its marks.
    storage.begin_output(storage.join(outer, "_staging", "c"))
    assert len(storage.list_files(outer)) == 5
    # A job's whole output committed inside: its manifest lists its top-level entries (folders too), and a
    # committed folder among them lists its own files.
    job = storage.join(outer, "dataset")
    storage.begin_output(job)
    storage.write_shards(_table(6), storage.join(job, "train"), rows_per_shard=5)
    storage.write_table(_table(1), storage.join(job, "train", "part-77777.parquet"))  # outside train's manifest
    storage.write_json({"classes": ["a"]}, storage.join(job, "metadata.json"))
    storage.commit_output(job)
    storage.write_table(_table(1), storage.join(job, "stray", "x.parquet"))  # after the commit: not listed
    assert storage.manifest(job)["files"] == ["metadata.json", "train"]
    assert [u[len(outer) + 1:] for u in storage.list_files(outer) if "/dataset/" in u] == [
        "dataset/train/part-00000.parquet", "dataset/train/part-00001.parquet"]


def test_a_folder_s_parent_is_a_real_folder_for_relative_paths_and_none_above_a_bucket(tmp_path, monkeypatch):
    from pipeline.score.job import ScoreConfig, resolve_classes

    assert storage.parent("s3://bucket") is None and storage.parent("gs://bucket/") is None
    assert storage.parent("s3://bucket/a/train/") == "s3://bucket/a" and storage.parent("s3://bucket/a") == "s3://bucket"
    assert storage.parent("/") is None and storage.parent("file:///data/train") == "file:///data"
    data = tmp_path / "data"
    storage.begin_output(str(data))  # a dataset whose writer died after its train split
    storage.write_shards(_table(4), str(data / "train"))
    storage.write_json({"classes": ["a", "b"]}, str(data / "metadata.json"))
    monkeypatch.chdir(data)
    assert storage.parent("train") == str(data)
    # "train" had no parent ("" by its string): the dataset's pending mark was not looked for, nor its metadata.json.
    with pytest.raises(storage.InputError, match=f"train: part of an incomplete output \\({data} is not committed"):
        storage.list_files("train")
    assert resolve_classes(ScoreConfig(input="train", output="o")) == ("a", "b")


_REGION_PROBE = """
import json, os, pickle, sys
from pipeline import storage

def region():
    return storage.filesystem_for("s3://some-bucket/x")[0].region

seen = {"aws": region()}
os.environ["AWS_ENDPOINT_URL"] = sys.argv[1]  # the loopback server: no region of its own needed
seen["endpoint"] = region()
seen["pickled"] = pickle.loads(pickle.dumps(storage.filesystem_for("s3://some-bucket/x")[0])).region  # to Ray workers
storage.write_bytes(b"round trip", sys.argv[2] + "/r/x.bin")
seen["read"] = storage.read_bytes(sys.argv[2] + "/r/x.bin").decode()
os.environ["AWS_DEFAULT_REGION"] = "ca-central-1"
seen["AWS_DEFAULT_REGION"] = region()
os.environ["AWS_REGION"] = "ap-south-1"
seen["AWS_REGION"] = region()
print(json.dumps(seen))
"""


def test_the_s3_region_comes_from_the_aws_config_file_unless_the_environment_names_one(s3_bucket, tmp_path,
                                                                                      monkeypatch):
    """As README.md says (credentials and region from the standard places): ``region`` in ``~/.aws/config``.

    A process of its own: the AWS SDK reads the config file once per process, when S3 is first used.
    """
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[default]\nregion = eu-west-1\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / ".aws" / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # off EC2 or on it: the file's region
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    done = subprocess.run([sys.executable, "-c", _REGION_PROBE, endpoint, s3_bucket], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "aws": "eu-west-1", "endpoint": "eu-west-1", "pickled": "eu-west-1", "read": "round trip",
        "AWS_DEFAULT_REGION": "ca-central-1", "AWS_REGION": "ap-south-1"}
