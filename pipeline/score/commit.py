"""The score job's commit: repeated keys rejected and the dense ``index`` assigned in the cluster.

The scored rows are staged by Ray Data in input order. The commit never
brings them to one process:

1. every staged file (written by :class:`StagedRows`: file names in the
   order of the write tasks, rows in the order they came) is read by a Ray
   Data task that tags its rows with their
   input position (file ordinal, row), and Ray Data sorts the rows by key, so
   the rows of one key are adjacent, in blocks spread over the cluster;
2. a task per sorted block reports its edges (first and last key, the first
   position of each, whether that row is ``ok``) and how many of its keys
   start with an ``ok`` row; the driver, holding a few values per *block*,
   settles keys whose rows straddle blocks (the earliest position wins) and
   turns the counts into each block's first ``index``;
3. a task per block rejects repeats, numbers its ``ok`` rows from that
   offset and writes its own ``scores/`` and ``rejects/`` shards.

The first row of a key in input order keeps it; later rows are rejected as
duplicates. ``index`` numbers the ``ok`` rows in key order, so it depends on
the data alone, not on how Ray ordered the blocks.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import Datasink
from ray.data.block import BlockAccessor

from pipeline import storage
from pipeline.data.contract import KEY, REJECTS_SCHEMA, SCORES_SCHEMA
from pipeline.data.validate import DUPLICATE_KEY

# Input position (staged file ordinal << 32 | row) and "the key was null" (sorted as "").
POS, NULL_KEY = "_pos", "_null_key"
# The wall-clock time a staged row was scored (staged only, not in the output).
SCORED_AT = "scored_at"
SCORES, REJECTS = "scores", "rejects"
# What the score job stages, one row per input row.
STAGED_SCHEMA = pa.schema([(KEY, pa.string()), ("clip_score", pa.float32()), ("clip_margin", pa.float32()),
                           ("status", pa.string()), ("error", pa.string()), (SCORED_AT, pa.float64())])


class StagedRows(Datasink):
    """Ray Data's sink for the staged rows: each write task's blocks, in the order they come, in one file.

    The commit takes a row's place in the staged files for its input
    position (the first row of a key keeps it), so the files must keep it:
    Ray's ``write_parquet`` hands a task's blocks to pyarrow's threaded
    dataset writer, which may write them in another order. Files are named
    by the write task's index, which follows input order when the dataset
    preserves order (the score job's does).
    """

    def __init__(self, url: str, min_rows: int):
        self.url, self.min_rows = url, min_rows

    @property
    def min_rows_per_write(self) -> int:
        return self.min_rows

    def write(self, blocks, ctx) -> str | None:
        url, writer = storage.join(self.url, f"part-{ctx.task_idx:08d}.parquet"), None
        fs, path = storage.filesystem_for(url)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow().select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)
                writer = writer or pq.ParquetWriter(out, STAGED_SCHEMA)
                writer.write_table(table)
            (writer or pq.ParquetWriter(out, STAGED_SCHEMA)).close()
        return url


def positioned(table: pa.Table, ordinal: int) -> pa.Table:
    """``table`` (staged rows of one file) with their input position; null keys sort as "", flagged."""
    keys = table.column(KEY)
    null = pc.is_null(keys)
    return (table.set_column(table.schema.get_field_index(KEY), KEY, pc.fill_null(keys, ""))
            .append_column(POS, pa.array(np.arange(table.num_rows, dtype=np.int64) + (int(ordinal) << 32)))
            .append_column(NULL_KEY, null))


def _grouped(block: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The block ordered by (key, position) and a mask of the first row of each key there."""
    block = block.sort_by([(KEY, "ascending"), (POS, "ascending")])
    keys = block.column(KEY).to_numpy(zero_copy_only=False)
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    first[keys == ""] = False  # rows with no key are never repeats (nor firsts): they are rejected anyway
    return block, first


def block_edges(block: pa.Table) -> dict:
    """What the driver needs of a sorted block to settle straddling keys and offsets (a few values)."""
    if block.num_rows == 0:  # Ray's sort can give empty blocks, without columns
        return {"rows": 0}
    block, first = _grouped(block)
    ok = (block.column("status").to_numpy(zero_copy_only=False) == "ok") & first
    starts = np.flatnonzero(first)
    last = starts[-1] if len(starts) else 0
    keys, pos = block.column(KEY), block.column(POS)
    return {"rows": block.num_rows, "ok_firsts": int(ok.sum()),
            "first_key": keys[0].as_py(), "first_pos": pos[0].as_py(), "first_ok": bool(ok[0]),
            "last_key": keys[int(last)].as_py(), "last_pos": pos[int(last)].as_py(), "last_ok": bool(ok[last])}


def settle(edges: list[dict]) -> tuple[list[list[str]], list[int]]:
    """Per block: the keys whose rows there are all repeats (another block holds the first), and the first index.

    A key's rows are adjacent in the sorted order, so a key that spans blocks
    is the last key of one block and the first of the next (and the whole of
    any between). Of those blocks, the one with the key's earliest position
    keeps it.
    """
    lose: list[list[str]] = [[] for _ in edges]
    counts = [e.get("ok_firsts", 0) for e in edges]
    chain: list[tuple[int, int, bool]] = []  # (block, first position of the key there, ok)
    chain_key = None

    def close():
        if len(chain) > 1 and chain_key:
            winner = min(chain, key=lambda c: c[1])
            for block, _, ok in chain:
                if block != winner[0]:
                    lose[block].append(chain_key)
                    counts[block] -= int(ok)
        chain.clear()

    for i, e in enumerate(edges):
        if not e["rows"]:
            continue
        if not (chain and e["first_key"] == chain_key):
            close()
            chain_key = e["first_key"]
        chain.append((i, e["first_pos"], e["first_ok"]))
        if e["last_key"] != e["first_key"]:
            close()
            chain_key = e["last_key"]
            chain.append((i, e["last_pos"], e["last_ok"]))
    close()
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist() if counts else []
    return lose, offsets


def split_block(block: pa.Table, offset: int, lose: list[str]) -> tuple[pa.Table, pa.Table]:
    """The block's scored rows (``index`` from ``offset``, key order) and its rejects (key, reason)."""
    block, first = _grouped(block)
    keys = block.column(KEY).to_numpy(zero_copy_only=False)
    status = block.column("status").to_numpy(zero_copy_only=False).astype(object)
    error = block.column("error").to_numpy(zero_copy_only=False).astype(object)
    repeat = (keys != "") & ~first
    if lose:
        repeat |= np.isin(keys, np.asarray(lose, dtype=object))
    status[repeat], error[repeat] = "rejected", DUPLICATE_KEY
    ok = status == "ok"
    ok_rows = np.flatnonzero(ok)
    scores = pa.table({
        KEY: block.column(KEY).take(ok_rows),
        "index": np.arange(offset, offset + len(ok_rows), dtype=np.int64),
        "clip_score": block.column("clip_score").take(ok_rows),
        "clip_margin": block.column("clip_margin").take(ok_rows),
        "status": pa.array(status[ok_rows], pa.string()),
        "error": pa.array(error[ok_rows], pa.string()),
    }, schema=SCORES_SCHEMA)
    bad = np.flatnonzero(~ok)
    null = block.column(NULL_KEY).to_numpy(zero_copy_only=False)[bad]
    rejects = pa.table({KEY: pa.array(np.where(null, None, keys[bad]), pa.string()),
                        "reason": pa.array(error[bad], pa.string())}, schema=REJECTS_SCHEMA)
    return scores, rejects


def write_block(block: pa.Table, number: int, offset: int, lose: list[str], output: str) -> dict:
    """Write one sorted block's ``scores/`` and ``rejects/`` shards; returns their names and counts."""
    scores, rejects = split_block(block, offset, lose)
    out = {"scored": scores.num_rows, "reasons": dict(collections.Counter(rejects.column("reason").to_pylist()))}
    if SCORED_AT in block.column_names and block.num_rows:
        out[SCORED_AT] = pc.min(block.column(SCORED_AT)).as_py()
    for folder, table in ((SCORES, scores), (REJECTS, rejects)):
        if table.num_rows:
            name = f"part-{number:05d}.parquet"
            storage.write_table(table, storage.join(output, folder, name))
            out[folder] = name
    return out


def finish(output: str, written: list[dict], started: float | None = None, committing: float | None = None,
           **extra) -> dict:
    """Commit ``scores/`` and ``rejects/`` (an empty shard where no block wrote one) and write the summary.

    ``started``: the job's start (``time.time()``); the summary then gives
    its ``seconds``, the rate, and ``first_row_seconds`` (the first scored
    batch's delay from the start) where the rows carry their scoring time;
    with ``committing`` (when the commit began), the split of ``seconds``
    into ``scoring_seconds`` and ``commit_seconds``.
    """
    reasons = collections.Counter()
    for w in written:
        reasons.update(w["reasons"])
    scored = sum(w["scored"] for w in written)
    rejected = sum(reasons.values())
    for folder, schema, rows in ((SCORES, SCORES_SCHEMA, scored), (REJECTS, REJECTS_SCHEMA, rejected)):
        names = [w[folder] for w in written if folder in w]
        if not names:
            names = ["part-00000.parquet"]
            storage.write_table(schema.empty_table(), storage.join(output, folder, names[0]))
        storage.commit_output(storage.join(output, folder), names, rows)
    summary = {
        "rows_in": scored + rejected,
        "scored": scored,
        "rejected": rejected,
        "rejected_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        **extra,
    }
    if started is not None:
        seconds = time.time() - started
        summary.update(seconds=round(seconds, 2), started_at=round(started, 2),
                       pairs_per_second=round(summary["rows_in"] / seconds, 1) if seconds > 0 else None)
        if committing is not None:
            summary.update(scoring_seconds=round(committing - started, 2),
                           commit_seconds=round(time.time() - committing, 2))
        firsts = [w[SCORED_AT] for w in written if w.get(SCORED_AT) is not None]
        if firsts:
            summary["first_row_seconds"] = round(min(firsts) - started, 2)
    storage.write_json(summary, storage.join(output, "summary.json"))
    return summary


def write_scores(table: pa.Table, output: str, started: float | None = None, rows_per_file: int | None = None,
                 **extra) -> dict:
    """Commit a table already in memory (rows in input order) as the score job does; returns the summary.

    ``table`` has the scores schema's columns (``index`` is recomputed); rows
    already ``rejected`` stay so. With ``rows_per_file``, the rows sorted by
    key are cut into blocks of that many, each written as its own files, as
    the score job's commit writes one per sorted block (repeats across cuts
    settled as there); else one block.
    """
    block = positioned(table.select([KEY, "clip_score", "clip_margin", "status", "error"]), 0)
    _begin(output)
    if not rows_per_file or block.num_rows <= rows_per_file:
        return finish(output, [write_block(block, 0, 0, [], output)], started, **extra)
    block = block.sort_by([(KEY, "ascending"), (POS, "ascending")])
    blocks = [block.slice(start, rows_per_file) for start in range(0, block.num_rows, rows_per_file)]
    lose, offsets = settle([block_edges(b) for b in blocks])
    return finish(output, [write_block(b, i, offsets[i], lose[i], output) for i, b in enumerate(blocks)],
                  started, **extra)


def commit_staged(staged: list[str], output: str, started: float) -> dict:
    """Sort, dedupe, index and write the staged files (URLs, in input order) in the cluster; returns the summary.

    ``started`` is the job's ``time.time()`` at its start (the summary's seconds count from there).
    """
    committing = time.time()
    _begin(output)
    if not staged:
        return finish(output, [], started, committing)
    if len(staged) == 1:  # one block (up to the staged file size): nothing straddles, one task, no sort stage
        return finish(output, [ray.get(_write_file.remote(staged[0], output))], started, committing)
    items = [{"url": url, "ordinal": i} for i, url in enumerate(staged)]
    by_key = (ray.data.from_items(items, override_num_blocks=len(items))
              .map_batches(_read_positioned, batch_size=1, batch_format="pyarrow")
              .sort(KEY))
    blocks = by_key.to_arrow_refs()
    edges = ray.get([_edges.remote(b) for b in blocks])
    lose, offsets = settle(edges)
    written = ray.get([_write.remote(b, i, offsets[i], lose[i], output)
                       for i, b in enumerate(blocks) if edges[i]["rows"]])
    return finish(output, written, started, committing)


def _begin(output: str) -> None:
    for folder in (SCORES, REJECTS):
        storage.begin_output(storage.join(output, folder))


def _read_staged(url: str, ordinal: int) -> pa.Table:
    return positioned(storage.read_table(url), ordinal)


def _read_positioned(batch: pa.Table) -> pa.Table:
    return _read_staged(batch.column("url")[0].as_py(), batch.column("ordinal")[0].as_py())


@ray.remote(num_cpus=1)
def _write_file(url: str, output: str) -> dict:
    return write_block(_read_staged(url, 0), 0, 0, [], output)


_edges = ray.remote(num_cpus=1)(block_edges)
_write = ray.remote(num_cpus=1)(write_block)
