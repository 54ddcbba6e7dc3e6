"""Webdataset tars whose members ``--columns`` names (``KEY.caption``, ``KEY.label``), not img2dataset's ``.txt``/``.cls``."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.data import shards
from pipeline.data.contract import ColumnMapping, SchemaError
from pipeline.data.reference import make_synthetic
from pipeline.data.tars import read_samples, tar_index
from shardfiles import tar_bytes

SPEC = "caption=caption,label=label"


def _rows(n: int = 12, seed: int = 3) -> list[dict]:
    return make_synthetic(n=32, seed=seed).splits["train"].slice(0, n).to_pylist()


def _write_tars(url: str, rows: list[dict], per_tar: int, members) -> list[str]:
    """``rows`` as tars of ``per_tar`` samples, each sample's members ``members(row)`` as (extension, bytes)."""
    files = []
    for start in range(0, len(rows), per_tar):
        data = tar_bytes([(f"{row['key']}.{ext}", value) for row in rows[start:start + per_tar]
                          for ext, value in members(row)])
        files.append(storage.join(url, f"{start // per_tar:05d}.tar"))
        storage.write_bytes(data, files[-1])
    return files


def _caption_label_members(row: dict):
    # As text members often are: a trailing newline, a padded label.
    return [("jpg", row["image"]), ("caption", row["caption"].encode() + b"\n"), ("label", f" {row['label']}\n".encode())]


def _read(url: str, columns: str) -> list[dict]:
    batches = shards.read_shards(url, columns).iter_batches(batch_format="pyarrow")
    return sorted((r for b in batches for r in b.to_pylist()), key=lambda r: r["key"])


def _expected(rows: list[dict]) -> list[dict]:
    return sorted(({"key": r["key"], "image": r["image"], "caption": r["caption"], "label": r["label"],
                    "bad_label": None} for r in rows), key=lambda r: r["key"])


def test_caption_and_label_members_the_mapping_names_are_read_for_every_row(ray_session, tmp_path):
    rows = _rows()
    url = str(tmp_path / "train")
    files = _write_tars(url, rows, 5, _caption_label_members)
    # Ray Data's webdataset reader (the score job, training with --tar-reads all), after the checks.
    shards.check_named_columns(url, ColumnMapping.parse(SPEC))
    assert _read(url, SPEC) == _expected(rows)
    # Training's reads by offset (pipeline.train.tar_reads) map the samples they read alike.
    by_offset = pa.concat_tables(shards.webdataset_to_contract(read_samples(f, tar_index(f)), ColumnMapping.parse(SPEC))
                                 for f in files)
    assert sorted(by_offset.to_pylist(), key=lambda r: r["key"]) == _expected(rows)
    # A label member goes through the contract's label parsing as .cls does: a word is that row's bad label.
    table = pa.table({"__key__": ["a", "b", "c"], "jpg": [b"x", b"y", b"z"],
                      "caption": [b" a cat\n", None, b"a dog"], "label": [b"3\n", b"cat\n", None]})
    out = shards.webdataset_to_contract(table, ColumnMapping.parse(SPEC)).to_pylist()
    assert [(r["key"], r["caption"], r["label"], r["bad_label"]) for r in out] == \
        [("a", "a cat", 3, None), ("b", None, None, "cat"), ("c", "a dog", None, None)]


def test_an_image_member_the_mapping_names_is_the_image():
    table = pa.table({"__key__": ["a", "b"], "img": [b"i1", None], "png": [None, b"p2"], "txt": [b"a", b"b"]})
    out = shards.webdataset_to_contract(table, ColumnMapping.parse("image=img,caption=txt"))
    assert out.column("image").to_pylist() == [b"i1", b"p2"]  # the named member, else any image member


def test_a_named_member_no_tar_holds_is_refused_before_a_job_and_when_read(tmp_path, s3_bucket):
    rows = _rows()
    for url in (str(tmp_path / "train"), storage.join(s3_bucket, "train")):
        files = _write_tars(url, rows, 5, _caption_label_members)
        listing = shards.list_shards(url)
        for spec, name in (("caption=captoin,label=label", "caption"), ("caption=caption,label=lable", "label")):
            source = dict(p.split("=") for p in spec.split(","))[name]
            error = rf"--columns {name}={source}: no shard in {url} has a column '{source}'"
            with pytest.raises(SchemaError, match=error):
                shards.check_named_columns(url, ColumnMapping.parse(spec))
            with pytest.raises(SchemaError, match=error):
                shards.check_named_columns(url, ColumnMapping.parse(spec), listing=listing)
            with pytest.raises(SchemaError, match=error):  # read_shards' check, the score job's beside scoring
                shards.check_shards("webdataset", files, ColumnMapping.parse(spec))
        shards.check_named_columns(url, ColumnMapping.parse(SPEC))
        # A split read without the misnamed column (a classifier's test split, without captions) passes.
        shards.check_named_columns(url, ColumnMapping.parse("caption=captoin,label=label"), fields=("label",))
    # Only the first tar lacks the member: another has it, so it is no typo.
    url = str(tmp_path / "some")
    _write_tars(url, rows[:5], 5, lambda r: [("jpg", r["image"]), ("label", b"1")])
    storage.write_bytes(tar_bytes([(f"{r['key']}.{e}", v) for r in rows[5:] for e, v in _caption_label_members(r)]),
                        storage.join(url, "00001.tar"))
    shards.check_named_columns(url, ColumnMapping.parse(SPEC))
    # A first image larger than the first read: the members after it are still found, whole tars never read.
    url = str(tmp_path / "large")
    big = os.urandom(3 * shards.HEAD_BYTES)
    _write_tars(url, rows[:3], 3, lambda r: [("jpg", big), ("caption", b"a photo"), ("label", b"1")])
    assert shards.tar_head_members(storage.join(url, "00000.tar")) == {"jpg", "caption", "label"}
    shards.check_named_columns(url, ColumnMapping.parse(SPEC))


def test_the_img2dataset_preset_still_reads_txt_and_cls_beside_named_members(ray_session, tmp_path):
    rows = _rows(8, seed=5)
    url = str(tmp_path / "train")
    # Both layouts in one tar: img2dataset's .txt/.cls, and .caption/.label that differ from them.
    _write_tars(url, rows, 4, lambda r: [("jpg", r["image"]), ("txt", r["caption"].encode()),
                                         ("cls", f"{r['label']}\n".encode()), ("caption", b"other " + r["key"].encode()),
                                         ("label", b"7")])
    assert _read(url, "img2dataset") == _expected(rows)
    assert _read(url, "mmdp") == _expected(rows)  # tars read with img2dataset's names unless told otherwise
    assert _read(url, "caption=txt,label=cls") == _expected(rows)
    other = [{**r, "caption": f"other {r['key']}", "label": 7} for r in rows]
    assert _read(url, SPEC) == _expected(other)
