"""The score job's commit in the cluster: repeats and the dense index, whatever the blocks.

The reference is the rule stated on one table (what the job did when its
driver read the staged rows back): a key that several rows carry is scored
in none of them (each copy not rejected for a reason of its own is a
duplicate), and the ``ok`` rows are numbered in key order.
"""

import collections
import time

import numpy as np
import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.data.contract import KEY
from pipeline.data.validate import DUPLICATE_KEY
from pipeline.score import commit


def staged_rows(n: int, seed: int) -> pa.Table:
    """Rows as the scoring stage stages them: many repeated keys, some rejected, some without a key."""
    rng = np.random.default_rng(seed)
    keys = [f"k{int(k):03d}" for k in rng.integers(0, n // 3, n)]
    for i in rng.choice(n, n // 20, replace=False):
        keys[i] = None if i % 2 else ""
    status = np.where(rng.random(n) < 0.2, "rejected", "ok")
    error = np.where(status == "ok", "", "undecodable image")
    for i, key in enumerate(keys):
        if not key:
            status[i], error[i] = "rejected", "missing key"
    return pa.table({KEY: pa.array(keys, pa.string()), "clip_score": rng.random(n).astype(np.float32),
                     "clip_margin": rng.random(n).astype(np.float32), "status": status, "error": error})


def reference(table: pa.Table) -> tuple[dict, list]:
    """{key: (index, clip_score)} of the scored rows and the sorted (key, reason) rejects, by the stated rule."""
    count = collections.Counter(row[KEY] for row in table.to_pylist() if row[KEY])
    scored, rejects = {}, []
    for row in table.to_pylist():
        key = row[KEY]
        if row["status"] != "ok":
            rejects.append((key, row["error"]))
        elif count[key] > 1:
            rejects.append((key, DUPLICATE_KEY))
        else:
            scored[key] = row["clip_score"]
    index = {key: (i, scored[key]) for i, key in enumerate(sorted(scored))}
    return index, sorted(rejects, key=lambda kv: (str(kv[0]), kv[1]))


def outcome(scores: pa.Table, rejects: pa.Table) -> tuple[dict, list]:
    got = {r[KEY]: (r["index"], r["clip_score"]) for r in scores.to_pylist()}
    assert len(got) == scores.num_rows, "a key scored twice"
    return got, sorted(((r[KEY], r["reason"]) for r in rejects.to_pylist()), key=lambda kv: (str(kv[0]), kv[1]))


@pytest.mark.parametrize("seed", range(6))
def test_blocks_cut_anywhere_give_the_rule_on_the_whole_table(seed):
    # Staged files, then the rows sorted by key and cut into blocks at
    # random places: keys straddle blocks, some blocks are one key.
    rng = np.random.default_rng(seed)
    table = staged_rows(240, seed)
    files = np.sort(rng.choice(np.arange(1, 240), 5, replace=False))
    staged = [commit.keyed(table.slice(a, b - a)) for a, b in zip([0, *files], [*files, 240])]
    by_key = pa.concat_tables(staged).sort_by(KEY)
    # Shuffle inside each key run (Ray's sort keeps no order among equal keys).
    by_key = by_key.take(np.lexsort((rng.random(by_key.num_rows), by_key.column(KEY).to_numpy(zero_copy_only=False))))
    cuts = np.sort(rng.choice(np.arange(1, 240), 7, replace=False))
    blocks = [by_key.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, 240])]
    # A block of one key only, in the middle of a run that spans three blocks.
    keys = by_key.column(KEY).to_pylist()
    run = [i for i, k in enumerate(keys) if k == keys[120]]
    if len(run) >= 3:
        blocks = [by_key.slice(0, run[1]), by_key.slice(run[1], 1), by_key.slice(run[2], 240 - run[2])]
    edges = [commit.block_edges(b) for b in blocks]
    lose, offsets = commit.settle(edges)
    parts = [commit.split_block(b, offsets[i], lose[i]) for i, b in enumerate(blocks)]
    got = outcome(pa.concat_tables([p[0] for p in parts]), pa.concat_tables([p[1] for p in parts]))
    assert got == reference(table)
    assert sum(e["rows"] for e in edges) == 240


def test_no_copy_of_a_repeated_key_is_scored_and_a_copy_rejected_already_keeps_its_reason():
    # Training finds a row's sample by its key: a key on two rows cannot say which one was scored.
    table = pa.table({KEY: ["b", "a", "b", "a", "c"], "clip_score": pa.array([1, 2, 3, 4, 5], pa.float32()),
                      "clip_margin": pa.array([0, 0, 0, 0, 0], pa.float32()),
                      "status": ["rejected", "ok", "ok", "ok", "ok"], "error": ["undecodable image", "", "", "", ""]})
    scores, rejects = commit.split_block(commit.keyed(table), 0, [])
    assert scores.to_pydict()[KEY] == ["c"] and scores.to_pydict()["index"] == [0]
    assert sorted(zip(rejects.column(KEY).to_pylist(), rejects.column("reason").to_pylist())) == [
        ("a", DUPLICATE_KEY), ("a", DUPLICATE_KEY), ("b", DUPLICATE_KEY), ("b", "undecodable image")]


def test_the_output_does_not_depend_on_the_order_rows_were_staged_in(tmp_path):
    table = staged_rows(600, 9)
    shuffled = table.take(np.random.default_rng(0).permutation(600))
    one, other = str(tmp_path / "one"), str(tmp_path / "other")
    _write_in_memory(table, one, rows_per_file=50)
    _write_in_memory(shuffled, other, rows_per_file=50)
    for folder in ("scores", "rejects"):
        assert storage.read_table(f"{one}/{folder}").equals(storage.read_table(f"{other}/{folder}"))


def test_commit_in_the_cluster_equals_the_rule(ray_local, tmp_path):
    # Many small staged files so that Ray's sort gives several blocks.
    table = staged_rows(3000, 7)
    staged = []
    for i, start in enumerate(range(0, 3000, 100)):
        url = str(tmp_path / "stage" / f"part-{i:06d}.parquet")
        storage.write_table(table.slice(start, 100), url)
        staged.append(url)
    out = str(tmp_path / "out")
    summary = commit.commit_staged(staged, out, started=time.time())
    scores, rejects = storage.read_table(f"{out}/scores"), storage.read_table(f"{out}/rejects")
    assert outcome(scores, rejects) == reference(table)
    assert len(storage.read_json(f"{out}/scores/_SUCCESS")["files"]) > 1  # written by several block tasks
    assert summary["rows_in"] == 3000 == summary["scored"] + summary["rejected"]
    assert summary["rejected_by_reason"][DUPLICATE_KEY] == sum(1 for _, r in reference(table)[1] if r == DUPLICATE_KEY)
    # The in-memory path (one block) commits the same.
    assert outcome(*_write_in_memory(table, str(tmp_path / "mem"))) == reference(table)


def test_one_staged_file_is_committed_by_one_task_by_the_same_rule(ray_local, tmp_path):
    table = staged_rows(1000, 3)
    url = str(tmp_path / "stage" / "part-000000.parquet")
    storage.write_table(table, url)
    out = str(tmp_path / "out")
    summary = commit.commit_staged([url], out, started=time.time())
    assert outcome(storage.read_table(f"{out}/scores"), storage.read_table(f"{out}/rejects")) == reference(table)
    assert storage.read_json(f"{out}/scores/_SUCCESS")["files"] == ["part-00000.parquet"]
    assert summary["rows_in"] == 1000 == summary["scored"] + summary["rejected"]


def test_nothing_staged_commits_empty_tables(ray_local, tmp_path):
    summary = commit.commit_staged([], str(tmp_path / "out"), started=time.time())
    assert summary["rows_in"] == 0
    assert storage.read_table(str(tmp_path / "out" / "scores")).num_rows == 0
    assert storage.read_table(str(tmp_path / "out" / "rejects")).num_rows == 0


@pytest.mark.parametrize("staged_files", [0, 1, 3])
def test_rows_the_input_holds_and_the_staging_lacks_commit_nothing(ray_local, tmp_path, staged_files):
    # What a score job on a cluster whose nodes do not share its local output stages: some files, or none,
    # of the input's 400 rows, the rest on other nodes' disks.
    table = staged_rows(400, 5)
    staged = []
    for i in range(staged_files):
        staged.append(str(tmp_path / "stage" / f"part-{i:06d}.parquet"))
        storage.write_table(table.slice(100 * i, 100), staged[-1])
    out = str(tmp_path / "out")
    with pytest.raises(commit.RowsLostError, match=f"{100 * staged_files} rows scored or rejected, but the "
                       "input's shards hold 400; nothing is committed"):
        commit.commit_staged(staged, out, started=time.time(), expected_rows=400)
    for folder in ("scores", "rejects"):
        assert not storage.exists(f"{out}/{folder}/_SUCCESS")
    assert not storage.exists(f"{out}/summary.json")
    # Every row there: committed as ever.
    storage.write_table(table.slice(100 * staged_files), str(tmp_path / "stage" / "part-rest.parquet"))
    every = staged + [str(tmp_path / "stage" / "part-rest.parquet")]
    assert commit.commit_staged(every, out, started=time.time(), expected_rows=400)["rows_in"] == 400
    assert outcome(storage.read_table(f"{out}/scores"), storage.read_table(f"{out}/rejects")) == reference(table)


@pytest.mark.parametrize("rows_per_file", [7, 100, 3000])
def test_the_in_memory_commit_cut_into_files_gives_the_rule(tmp_path, rows_per_file):
    # Sorted by key and cut every rows_per_file rows, as the cluster's sorted blocks are: repeated keys
    # straddle the cuts, and each file holds its own key range and indices.
    table = staged_rows(3000, 5)
    out = str(tmp_path / "out")
    assert outcome(*_write_in_memory(table, out, rows_per_file)) == reference(table)
    files = storage.read_json(f"{out}/scores/_SUCCESS")["files"]
    cuts = -(-3000 // rows_per_file)  # a cut whose rows are all repeats or rejects writes no scores file
    assert len(files) == 1 if cuts == 1 else 1 < len(files) <= cuts
    parts = [storage.read_table(f"{out}/scores/{name}") for name in files]
    for before, after in zip(parts, parts[1:]):
        assert before.column(KEY)[-1].as_py() < after.column(KEY)[0].as_py()
        assert before.column("index")[-1].as_py() + 1 == after.column("index")[0].as_py()


def _write_in_memory(table: pa.Table, out: str, rows_per_file: int | None = None) -> tuple[pa.Table, pa.Table]:
    commit.write_scores(table.append_column("index", pa.array(np.zeros(table.num_rows, np.int64))), out,
                        rows_per_file=rows_per_file)
    return storage.read_table(f"{out}/scores"), storage.read_table(f"{out}/rejects")


def test_the_training_index_stage_finds_the_index_the_commit_gave(ray_local, tmp_path):
    # Keys beyond ASCII: the commit orders them byte-wise (UTF-8), and the
    # train job's key map (UTF-8 bytes, binary search) must agree, key by key.
    from pipeline.train.keys import key_index
    from pipeline.train.pruning import load_index
    from pipeline.train.stages import index_stage

    keys = ["zebra", "Zoë", "café", "cafe", "naïve", "日本", "émoji-🙂", "a", "Ab", "ß"]
    n = len(keys)
    table = pa.table({KEY: keys, "index": np.zeros(n, np.int64), "clip_score": pa.array(np.arange(n), pa.float32()),
                      "clip_margin": pa.array(np.arange(n), pa.float32()), "status": ["ok"] * n, "error": [""] * n})
    out = str(tmp_path / "scores")
    commit.write_scores(table, out)
    scored = {r[KEY]: r["index"] for r in storage.read_table(f"{out}/scores").to_pylist()}
    assert sorted(scored, key=lambda k: k.encode()) == [k for k, _ in sorted(scored.items(), key=lambda kv: kv[1])]
    _, consistency, _ = load_index(out)
    batch = {KEY: np.array(keys + ["not-scored"], dtype=object), "label": np.arange(n + 1)}
    got = index_stage(batch, key_index(out))
    assert dict(zip(got[KEY].tolist(), got["index"].tolist())) == scored  # the unscored row left
    assert consistency[[scored[k] for k in keys]].tolist() == list(range(n))


def test_the_training_index_stage_passes_no_row_of_a_repeated_key(ray_local, tmp_path):
    # Two rows under key "b" with different labels: had one copy been scored, the index stage
    # (which finds a row's sample by its key) would have passed both, trained as one sample.
    from pipeline.train.keys import key_index
    from pipeline.train.stages import index_stage

    keys = ["a", "b", "c", "b"]
    table = pa.table({KEY: keys, "index": np.zeros(4, np.int64), "clip_score": pa.array([1, 2, 3, 4], pa.float32()),
                      "clip_margin": pa.array([0, 0, 0, 0], pa.float32()), "status": ["ok"] * 4, "error": [""] * 4})
    out = str(tmp_path / "scores")
    commit.write_scores(table, out)
    got = index_stage({KEY: np.array(keys, dtype=object), "label": np.array([0, 1, 2, 7])}, key_index(out))
    assert got[KEY].tolist() == ["a", "c"] and got["label"].tolist() == [0, 2]
    # Rows that bring a column of a name the plan's stages add: theirs would stand for, or be replaced by, the plan's.
    for taken in ("index", "weight", "epoch"):
        with pytest.raises(ValueError, match=f"the rows have column.s. {taken}, which the plan's stages add"):
            index_stage({KEY: np.array(keys, dtype=object), taken: np.arange(4)}, key_index(out))


def test_a_block_resolves_only_the_key_chunks_its_keys_fall_in(ray_local, tmp_path):
    # Keys laid out by shard (as img2dataset writes them), committed by the
    # cluster's sort into several key-sorted score files: a block of one
    # shard's keys resolves one or two chunks, a block of keys from everywhere
    # all of them, and both give the index the commit wrote.
    from pipeline.train import keys as key_map

    n, shards = 3000, 30
    keys = [f"{s:05d}{r:04d}" for s in range(shards) for r in range(n // shards)]
    rng = np.random.default_rng(0)
    table = pa.table({KEY: keys, "clip_score": rng.random(n).astype(np.float32),
                      "clip_margin": rng.random(n).astype(np.float32), "status": ["ok"] * n, "error": [""] * n})
    staged = []
    for i, start in enumerate(range(0, n, 100)):
        staged.append(str(tmp_path / "stage" / f"part-{i:06d}.parquet"))
        storage.write_table(table.slice(start, 100), staged[-1])
    out = str(tmp_path / "out")
    commit.commit_staged(staged, out, started=time.time())
    written = {r[KEY]: r["index"] for r in storage.read_table(f"{out}/scores").to_pylist()}
    files = storage.read_json(f"{out}/scores/_SUCCESS")["files"]
    index = key_map.key_index(out)
    assert index.num_chunks == len(files) > 2

    key_map._chunks.clear()
    one_shard = keys[1500:1600]
    at, found = index.lookup(one_shard)
    assert found.all() and at.tolist() == [written[k] for k in one_shard]
    assert len(key_map._chunks) <= 2

    key_map._chunks.clear()
    scattered = [keys[i] for i in rng.permutation(n)] + ["99999", "", "00000000"]
    at, found = index.lookup(scattered)
    assert found.tolist() == [True] * n + [False] * 3
    assert at[:n].tolist() == [written[k] for k in scattered[:n]]
    assert len(key_map._chunks) == index.num_chunks

    # Runs one after another in one process: each new key index lets go of the chunks of all but
    # the last INDEXES_KEPT (here the first run's), and a let-go index still resolves, afresh.
    runs = [index] + [key_map.key_index(out) for _ in range(key_map.INDEXES_KEPT)]
    for run in runs[1:]:
        at, found = run.lookup(scattered)
        assert found[:n].all() and at[:n].tolist() == [written[k] for k in scattered[:n]]
    assert {token for token, _ in key_map._chunks} == {run._token for run in runs[1:]}
    assert len(key_map._chunks) == key_map.INDEXES_KEPT * index.num_chunks
    at, found = runs[0].lookup(one_shard)
    assert found.all() and at.tolist() == [written[k] for k in one_shard]
    assert runs[1]._token not in {token for token, _ in key_map._chunks}


def test_the_key_index_reads_score_files_in_any_row_order(ray_local, tmp_path):
    # A score table written by other means: rows not in key order, files' key ranges overlapping.
    from pipeline.data.contract import SCORES_SCHEMA
    from pipeline.train.keys import key_index

    n = 500
    keys = [f"row-{i:04d}" for i in np.random.default_rng(1).permutation(n)]
    table = pa.table({KEY: keys, "index": np.arange(n, dtype=np.int64), "clip_score": np.zeros(n, np.float32),
                      "clip_margin": np.zeros(n, np.float32), "status": ["ok"] * n, "error": [None] * n},
                     schema=SCORES_SCHEMA)
    out = str(tmp_path / "out")
    storage.write_shards(table, f"{out}/scores", rows_per_shard=150)
    at, found = key_index(out).lookup(keys[::-1] + ["row-9999"])
    assert found.tolist() == [True] * n + [False]
    assert at[:n].tolist() == list(range(n))[::-1]
