"""Webdataset tars read by offset: the index of a tar, ranged reads of chosen samples, and the kept-rows source."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pytest

from jobs import score as score_job
from pipeline import storage
from pipeline.data.reference import make_synthetic
from pipeline.data.contract import MAPPINGS
from pipeline.data.tars import INDEX_SCHEMA, read_runs, read_samples, tar_index, write_tars
from pipeline.storage import InputError
from shardfiles import tar_bytes, write_img2dataset


def _members(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    members = []
    for i in range(n):
        members += [(f"s{i:03d}.jpg", rng.bytes(int(rng.integers(1, 3000)))), (f"s{i:03d}.txt", f"caption {i}".encode())]
        if i % 2:
            members.append((f"s{i:03d}.cls", f"{i % 10}\n".encode()))
    return members


def _ray_reader_samples(url: str) -> list[dict]:
    """What Ray Data's webdataset reader gives for the tar at ``url``: the reference for :func:`read_samples`."""
    import ray.data

    rows = ray.data.read_webdataset(url, decoder=None).take_all()
    return [{k: v for k, v in row.items() if k != "__url__" and isinstance(v, (str, bytes))} for row in rows]


def test_a_tar_index_locates_every_member_of_every_sample(tmp_path):
    members = _members(9) + [("deep/dir/" + "x" * 150 + ".png", b"a long name")]  # a GNU long-name header too
    tar = tmp_path / "a.tar"
    tar.write_bytes(tar_bytes(members))
    index = tar_index(str(tar))
    assert index.schema == INDEX_SCHEMA
    assert index.column("__key__").to_pylist() == [f"s{i:03d}" for i in range(9)] + ["deep/dir/" + "x" * 150]
    assert [len(s) for s in index.column("suffixes").to_pylist()] == [3 if i % 2 else 2 for i in range(9)] + [1]
    # Spans tile the archive: each sample starts where the last ended, the last ends before the end blocks.
    starts, ends = index.column("start").to_numpy(), index.column("end").to_numpy()
    assert starts[0] == 0 and np.array_equal(starts[1:], ends[:-1]) and ends[-1] <= tar.stat().st_size - 1024
    data = tar.read_bytes()
    expected = dict(members)
    for row in index.to_pylist():
        for suffix, offset, size in zip(row["suffixes"], row["offsets"], row["sizes"]):
            start = row["start"] + offset
            assert data[start:start + size] == expected[f"{row['__key__']}.{suffix}"]


@pytest.mark.parametrize("max_gap", [0, 4096, 1 << 30])
def test_chosen_samples_read_by_range_equal_what_the_whole_tar_holds(tmp_path, max_gap):
    members = _members(40, seed=1)
    tar = tmp_path / "b.tar"
    tar.write_bytes(tar_bytes(members))
    index = tar_index(str(tar))
    chosen = np.flatnonzero(np.random.default_rng(2).random(index.num_rows) < 0.5)
    samples = read_samples(str(tar), index.take(chosen), max_gap)
    expected = dict(members)
    assert samples.column("__key__").to_pylist() == [f"s{i:03d}" for i in chosen]
    for row in samples.to_pylist():
        for suffix in ("jpg", "txt", "cls"):
            assert row[suffix] == expected.get(f"{row['__key__']}.{suffix}")  # None where the sample has none


def test_read_runs_join_consecutive_spans_and_gaps_under_the_limit():
    starts, ends = np.array([0, 10, 30, 100, 150]), np.array([10, 20, 60, 120, 160])
    assert read_runs(starts, ends, 0).tolist() == [[0, 20], [30, 60], [100, 120], [150, 160]]
    assert read_runs(starts, ends, 10).tolist() == [[0, 60], [100, 120], [150, 160]]
    assert read_runs(starts, ends, 30).tolist() == [[0, 60], [100, 160]]
    assert read_runs(starts[:0], ends[:0], 0).shape == (0, 2)
    # Exact reads (gap 0) fetch the chosen spans' bytes and nothing else.
    rng = np.random.default_rng(3)
    sizes = rng.integers(500, 5000, 1000)
    ends = np.cumsum(sizes)
    chosen = rng.random(1000) < 0.45
    runs = read_runs(ends[chosen] - sizes[chosen], ends[chosen], 0)
    assert int((runs[:, 1] - runs[:, 0]).sum()) == int(sizes[chosen].sum())
    assert len(runs) < chosen.sum()  # neighbours share a read


def test_a_tar_index_refuses_compressed_tars_and_takes_a_member_twice_as_a_second_sample(tmp_path):
    gz = tmp_path / "c.tar"
    gz.write_bytes(gzip.compress(tar_bytes(_members(2))))
    with pytest.raises(InputError, match="not an uncompressed tar.*--tar-reads all"):
        tar_index(str(gz))
    # A sample written twice: two samples of one key, as the score job reads them (and rejects both: a duplicate).
    twice = tmp_path / "d.tar"
    twice.write_bytes(tar_bytes([("k.jpg", b"1"), ("k.txt", b"a"), ("k.jpg", b"2"), ("m.jpg", b"3")]))
    index = tar_index(str(twice))
    assert index.column("__key__").to_pylist() == ["k", "k", "m"]
    assert index.column("suffixes").to_pylist() == [["jpg", "txt"], ["jpg"], ["jpg"]]


def test_a_tar_changed_since_it_was_indexed_is_an_error_not_short_rows(tmp_path):
    tar = tmp_path / "e.tar"
    tar.write_bytes(tar_bytes(_members(6)))
    index = tar_index(str(tar))
    tar.write_bytes(tar_bytes(_members(2)))
    with pytest.raises(InputError, match="changed after it was indexed"):
        read_samples(str(tar), index.slice(5), 0)


def test_written_tars_read_back_as_the_rows_written(tmp_path):
    from pipeline.data.shards import webdataset_to_contract

    table = make_synthetic(n=120, seed=6).splits["train"]
    files = write_tars(table, str(tmp_path / "train"), rows_per_shard=16)
    assert table.num_rows > 32 and [f.rsplit("/", 1)[1] for f in files] == \
        [f"part-{i:05d}.tar" for i in range(-(-table.num_rows // 16))]
    assert storage.list_files(str(tmp_path / "train"), (".tar",)) == files  # committed: listed by its manifest
    back = pa.concat_tables(webdataset_to_contract(read_samples(f, tar_index(f)), MAPPINGS["img2dataset"])
                            for f in files)
    assert back.column("bad_label").null_count == back.num_rows  # every label an integer
    back = back.drop_columns(["bad_label"])
    assert back.to_pylist() == table.select(back.column_names).to_pylist()
    with pytest.raises(ValueError, match="keys cannot name tar members.*'a.b'"):
        write_tars(table.slice(0, 1).set_column(0, "key", pa.array(["a.b"])), str(tmp_path / "bad"))


def test_read_samples_matches_ray_datas_webdataset_reader(ray_session, tmp_path):
    members = _members(12, seed=4)
    tar = tmp_path / "f.tar"
    tar.write_bytes(tar_bytes(members))
    ours = read_samples(str(tar), tar_index(str(tar))).to_pylist()
    assert [{k: v for k, v in row.items() if v is not None} for row in ours] == _ray_reader_samples(str(tar))


@pytest.fixture(scope="module")
def tar_split(ray_session, s3_server):
    """A synthetic dataset as img2dataset tars on the loopback S3 server, scored in label mode."""
    import boto3

    synthetic = make_synthetic(n=240, seed=11)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mmdp-tar-reads")
    root = "s3://mmdp-tar-reads/data"
    write_img2dataset(synthetic, root, tars=True, rows_per_shard=30)
    scores = storage.join(root, "scores")
    assert score_job.main(["--input", storage.join(root, "train"), "--output", scores, "--model", "mmdp-tiny",
                           "--columns", "img2dataset", "--mode", "label",
                           "--classes", ",".join(synthetic.metadata["classes"]),
                           "--actor-cpus", "0.5", "--batch-size", "32"]) == 0
    return root, scores


def test_the_kept_rows_source_gives_the_plain_readers_rows_of_the_plan(tar_split):
    """Each epoch, the source reading kept samples by offset gives exactly the rows (bytes, weights) that the
    plain reader gives after the keep stage: the plan's samples, no row lost or added."""
    import ray

    from pipeline.data.shards import list_shards
    from pipeline.train.driver import read_split
    from pipeline.train.pruning import Pruning
    from pipeline.train.tar_reads import build_indexes

    root, scores = tar_split
    kind, files = list_shards(storage.join(root, "train"))
    assert kind == "webdataset" and len(files) > 1
    shards = build_indexes(files, storage.join(root, "index"))
    assert sorted(storage.list_files(storage.join(root, "index"))) == sorted(url for _, _, url in shards)
    assert build_indexes(files, storage.join(root, "index")) == shards  # built once, then found
    pruning = Pruning.from_scores(scores, policy="random", epochs=3, keep_ratio=0.5, seed=3)
    try:
        for epoch in range(3):
            kept = ray.get(pruning.actor.start_epoch.remote(epoch))
            fields = ("key", "image", "label")
            ours = pruning.tar_dataset(shards, "img2dataset", fields).take_all()
            plain = pruning.dataset(read_split(root, "train", "img2dataset").select_columns(list(fields))).take_all()
            assert len(ours) == kept < pruning.num_samples
            by_key = {row["key"]: row for row in plain}
            assert sorted(by_key) == sorted(row["key"] for row in ours)
            for row in ours:
                twin = by_key[row["key"]]
                assert (row["index"], row["image"], row["label"], row["weight"], row["epoch"]) == \
                       (twin["index"], twin["image"], twin["label"], twin["weight"], epoch)
    finally:
        pruning.shutdown()


def test_a_mapping_that_keys_samples_by_a_member_cannot_read_by_offset():
    from pipeline.train.tar_reads import KeptTarsDatasource

    with pytest.raises(InputError, match="--tar-reads all"):
        KeptTarsDatasource([], None, "p", "key=txt,image=jpg", ("key", "image"))


def _rewritten_at_its_size(tmp_path) -> tuple[str, list, list]:
    """A tar, and the members of a rewrite of it that tarfile pads to the same size (10 KiB records): the same
    samples in another order, so every sample's bytes lie elsewhere."""
    first = [("s000.jpg", b"a" * 700), ("s000.cls", b"1\n"), ("s001.jpg", b"b" * 300), ("s001.cls", b"2\n"),
             ("s002.jpg", b"c" * 1500), ("s002.cls", b"3\n")]
    second = first[4:] + first[2:4] + first[:2]
    assert len(tar_bytes(first)) == len(tar_bytes(second))
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "part.tar").write_bytes(tar_bytes(first))
    return str(folder / "part.tar"), first, second


def _rewrite(url: str, members: list) -> None:
    import os

    before = os.stat(url).st_mtime_ns
    with open(url, "wb") as f:
        f.write(tar_bytes(members))
    os.utime(url, ns=(before + 2_000_000_000, before + 2_000_000_000))  # a later time, whatever the clock's grain


def test_a_tar_rewritten_at_its_old_size_gets_a_new_offset_index(ray_session, tmp_path):
    """The offset index was named by the tar's URL and size alone: a tar rewritten at its old size (tarfile pads to
    10 KiB records, so most rewrites keep it) found its old index, read at its old offsets: wrong bytes."""
    from pipeline.train.tar_reads import build_indexes

    url, first, second = _rewritten_at_its_size(tmp_path)
    folder = str(tmp_path / "index")
    (_, size, old_index), = build_indexes([url], folder)
    _rewrite(url, second)
    (_, new_size, new_index), = build_indexes([url], folder)
    assert new_size == size and new_index != old_index
    samples = read_samples(url, storage.read_table(new_index))
    assert {f"{row['__key__']}.{suffix}": row[suffix] for row in samples.to_pylist() for suffix in ("jpg", "cls")} \
        == dict(second)
    assert sorted(storage.list_files(folder)) == sorted([old_index, new_index])  # the old one is left, unread
    from pipeline.train.tar_reads import file_versions

    assert str(file_versions([url])[url][1]) in new_index  # the modification time the listing gave
    assert build_indexes([url], folder) == [(url, size, new_index)]  # unchanged since: found, not built again


def test_a_stale_offset_index_is_an_error_naming_the_member_not_wrong_bytes(tmp_path):
    """Where the index's name cannot tell a rewrite (on S3, whose times are whole seconds, one within the second
    the index was built), each member's tar header, read with its bytes, must name it: an error, not other bytes."""
    url, first, second = _rewritten_at_its_size(tmp_path)
    index = tar_index(url)
    _rewrite(url, second)
    for chosen in (index, index.slice(1, 1)):
        with pytest.raises(InputError, match=r"member 's00\d.jpg' is not where its offset index says.*"
                                             "changed after it was indexed"):
            read_samples(url, chosen, 0)
    # Members behind extended headers (a long name's, pax's) are checked by their header's checksum and size.
    long_name = "d" * 120 + "/" + "x" * 40
    members = [(f"{long_name}.jpg", b"a" * 700), ("short.jpg", b"b" * 10), (f"{long_name[:-1]}é.jpg", b"c" * 5)]
    (tmp_path / "long.tar").write_bytes(tar_bytes(members))
    index = tar_index(str(tmp_path / "long.tar"))
    assert [row["jpg"] for row in read_samples(str(tmp_path / "long.tar"), index).to_pylist()] == \
        [data for _, data in members]


def test_an_object_stores_listing_gives_the_modification_time_that_names_an_index(s3_bucket):
    from pipeline.train.tar_reads import file_versions, index_name

    url = storage.join(s3_bucket, "train", "part.tar")
    storage.write_bytes(tar_bytes(_members(2)), url)
    (size, mtime_ns), = file_versions([url]).values()
    assert size == len(tar_bytes(_members(2))) and mtime_ns
    assert index_name(url, size, mtime_ns) != index_name(url, size, mtime_ns + 10**9) != index_name(url, size)
    with pytest.raises(InputError, match="no such file"):
        file_versions([storage.join(s3_bucket, "train", "absent.tar")])


def test_reads_by_offset_refuse_a_key_taken_from_a_member():
    """Kept samples are looked up by the members' name (webdataset's ``__key__``): a key read from a member's
    content (what the score job keyed its rows by) would find none of them."""
    from pipeline.train.tar_reads import KeptTarsDatasource

    for spec in ("key=txt", "key=title,caption=title", "key=lbl,label=lbl"):
        with pytest.raises(InputError, match="the key must be the tar members' name"):
            KeptTarsDatasource([], None, "pruner", spec, ("key", "image"))
    KeptTarsDatasource([], None, "pruner", "caption=title,label=lbl", ("key", "image"))  # the key: __key__
