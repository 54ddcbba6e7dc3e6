"""The score job's commit: repeated keys rejected and the dense ``index`` assigned in the cluster.

The scored rows are staged by Ray Data, in any order. The commit never
brings them to one process:

1. every staged file is read by a Ray Data task, and Ray Data sorts the
   rows by key, so the rows of one key are adjacent, in blocks spread over
   the cluster;
2. a task per sorted block reports its edges (first and last key, whether
   each is the key's only row there and ``ok``) and how many of its keys
   have one ``ok`` row and no other; the driver, holding a few values per
   *block*, finds the keys whose rows straddle blocks (repeated, so none of
   them counts) and turns the counts into each block's first ``index``;
3. a task per block rejects repeats, numbers its ``ok`` rows from that
   offset and writes its own ``scores/`` and ``rejects/`` shards.

A key names one row: training finds each row's sample by its key, so a key
that several rows carry cannot say which of them was scored. Every copy of
a repeated key is rejected (``duplicate key``; a copy already rejected for
a reason of its own keeps that one), none scored. ``index`` numbers the
``ok`` rows in key order, and each block's rows are ordered by their
content (key, then reason), so the output depends on the rows alone, not
on the order Ray staged, sorted or cut them: reruns write identical tables.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from pipeline import storage
from pipeline.data.contract import KEY, REJECTS_SCHEMA, SCORES_SCHEMA
from pipeline.data.validate import DUPLICATE_KEY

# "The key was null" (such keys sort as "").
NULL_KEY = "_null_key"
# The wall-clock time a staged row was scored (staged only, not in the output).
SCORED_AT = "scored_at"
SCORES, REJECTS = "scores", "rejects"


class RowsLostError(RuntimeError):
    """The job staged fewer or more rows than its input holds: nothing is committed."""


def keyed(table: pa.Table) -> pa.Table:
    """``table`` (staged rows) with null keys as "", flagged, so that they sort."""
    keys = table.column(KEY)
    return (table.set_column(table.schema.get_field_index(KEY), KEY, pc.fill_null(keys, ""))
            .append_column(NULL_KEY, pc.is_null(keys)))


# A block's rows in an order of their content alone (a key's own rows by their reason).
ROW_ORDER = [(KEY, "ascending"), (NULL_KEY, "ascending"), ("error", "ascending")]


def _grouped(block: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The block in :data:`ROW_ORDER` and a mask of the rows whose key has another row there."""
    block = block.sort_by(ROW_ORDER)
    keys = block.column(KEY).to_numpy(zero_copy_only=False)
    same = keys[1:] == keys[:-1]
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    repeated[keys == ""] = False  # rows with no key are never repeats: they are rejected anyway
    return block, repeated


def _single_ok(block: pa.Table, repeated: np.ndarray) -> np.ndarray:
    """Rows that are their key's only row in the block and scored (``ok``)."""
    return (block.column("status").to_numpy(zero_copy_only=False) == "ok") & ~repeated


def block_edges(block: pa.Table) -> dict:
    """What the driver needs of a sorted block to find straddling keys and offsets (a few values)."""
    if block.num_rows == 0:  # Ray's sort can give empty blocks, without columns
        return {"rows": 0}
    block, repeated = _grouped(block)
    ok = _single_ok(block, repeated)
    keys = block.column(KEY)
    return {"rows": block.num_rows, "ok_singles": int(ok.sum()),
            "first_key": keys[0].as_py(), "first_ok": bool(ok[0]),
            "last_key": keys[-1].as_py(), "last_ok": bool(ok[-1])}


def settle(edges: list[dict]) -> tuple[list[list[str]], list[int]]:
    """Per block: the keys repeated in another block (rejected there too), and the first index.

    A key's rows are adjacent in the sorted order, so a key that spans blocks
    is the last key of one block and the first of the next (and the whole of
    any between): it is repeated, and a block where it was a lone ``ok`` row
    numbers one row fewer.
    """
    lose: list[list[str]] = [[] for _ in edges]
    counts = [e.get("ok_singles", 0) for e in edges]
    chain: list[tuple[int, bool]] = []  # (block, the key was a lone ok row there)
    chain_key = None

    def close():
        if len(chain) > 1 and chain_key:
            for block, ok in chain:
                lose[block].append(chain_key)
                counts[block] -= int(ok)
        chain.clear()

    for i, e in enumerate(edges):
        if not e["rows"]:
            continue
        if not (chain and e["first_key"] == chain_key):
            close()
            chain_key = e["first_key"]
        chain.append((i, e["first_ok"]))
        if e["last_key"] != e["first_key"]:
            close()
            chain_key = e["last_key"]
            chain.append((i, e["last_ok"]))
    close()
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist() if counts else []
    return lose, offsets


def split_block(block: pa.Table, offset: int, lose: list[str]) -> tuple[pa.Table, pa.Table]:
    """The block's scored rows (``index`` from ``offset``, key order) and its rejects (key, reason)."""
    block, repeated = _grouped(block)
    keys = block.column(KEY).to_numpy(zero_copy_only=False)
    status = block.column("status").to_numpy(zero_copy_only=False).astype(object)
    error = block.column("error").to_numpy(zero_copy_only=False).astype(object)
    if lose:
        repeated |= np.isin(keys, np.asarray(lose, dtype=object))
    repeated &= status == "ok"  # a copy rejected for a reason of its own keeps it
    status[repeated], error[repeated] = "rejected", DUPLICATE_KEY
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
           expected_rows: int | None = None, **extra) -> dict:
    """Commit ``scores/`` and ``rejects/`` (an empty shard where no block wrote one) and write the summary.

    ``expected_rows``: the rows the input holds, where its shards say
    (parquet footers); every one is scored or rejected, else
    :class:`RowsLostError` and nothing is committed.

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
    if expected_rows is not None and scored + rejected != expected_rows:
        raise RowsLostError(
            f"{output}: {scored + rejected:,} rows scored or rejected, but the input's shards hold "
            f"{expected_rows:,}; nothing is committed. Ray's workers staged rows where the driver cannot read "
            "them (a local output on a cluster whose nodes do not share it?): write to an object store URL")
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
    """Commit a table already in memory as the score job does; returns the summary.

    ``table`` has the scores schema's columns (``index`` is recomputed); rows
    already ``rejected`` stay so. With ``rows_per_file``, the rows sorted by
    key are cut into blocks of that many, each written as its own files, as
    the score job's commit writes one per sorted block (repeats across cuts
    settled as there); else one block.
    """
    block = keyed(table.select([KEY, "clip_score", "clip_margin", "status", "error"]))
    _begin(output)
    if not rows_per_file or block.num_rows <= rows_per_file:
        return finish(output, [write_block(block, 0, 0, [], output)], started, **extra)
    block = block.sort_by(ROW_ORDER)
    blocks = [block.slice(start, rows_per_file) for start in range(0, block.num_rows, rows_per_file)]
    lose, offsets = settle([block_edges(b) for b in blocks])
    return finish(output, [write_block(b, i, offsets[i], lose[i], output) for i, b in enumerate(blocks)],
                  started, **extra)


def commit_staged(staged: list[str], output: str, started: float, expected_rows: int | None = None) -> dict:
    """Sort, dedupe, index and write the staged files (URLs) in the cluster; returns the summary.

    ``started`` is the job's ``time.time()`` at its start (the summary's seconds count from there);
    ``expected_rows``: the input's rows, where known (:func:`finish`).
    """
    committing = time.time()
    _begin(output)
    if not staged:
        return finish(output, [], started, committing, expected_rows)
    if len(staged) == 1:  # one block (up to the staged file size): nothing straddles, one task, no sort stage
        return finish(output, [ray.get(_write_file.remote(staged[0], output))], started, committing, expected_rows)
    items = [{"url": url} for url in staged]
    by_key = (ray.data.from_items(items, override_num_blocks=len(items))
              .map_batches(_read_keyed, batch_size=1, batch_format="pyarrow")
              .sort(KEY))
    blocks = by_key.to_arrow_refs()
    edges = ray.get([_edges.remote(b) for b in blocks])
    lose, offsets = settle(edges)
    written = ray.get([_write.remote(b, i, offsets[i], lose[i], output)
                       for i, b in enumerate(blocks) if edges[i]["rows"]])
    return finish(output, written, started, committing, expected_rows)


def _begin(output: str) -> None:
    for folder in (SCORES, REJECTS):  # an earlier run's shards go first
        storage.begin_output(storage.join(output, folder), replace=True)


def _read_staged(url: str) -> pa.Table:
    return keyed(storage.read_table(url))


def _read_keyed(batch: pa.Table) -> pa.Table:
    return _read_staged(batch.column("url")[0].as_py())


@ray.remote(num_cpus=1)
def _write_file(url: str, output: str) -> dict:
    return write_block(_read_staged(url), 0, 0, [], output)


_edges = ray.remote(num_cpus=1)(block_edges)
_write = ray.remote(num_cpus=1)(write_block)
