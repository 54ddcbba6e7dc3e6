"""The key -> sample index map of a score table, in one chunk per score file, never whole on one process.

The score job writes its ``scores/`` shards key-sorted, each numbering its
rows with a contiguous run of ``index`` (the commit numbers the rows of each
sorted block from that block's offset). So one file's sorted keys and its
first ``index`` map any of its keys to their index by binary search, and the
files' key ranges tell which file can hold a key.

:func:`key_index` puts each file's sorted keys in the object store (a Ray task
per file, in parallel) and keeps only a few values per *file* on the caller:
its first and last key. A training data block resolves only the chunks whose
key range meets its own keys (zero-copy, once per process): with keys laid out
by shard, as writers like img2dataset make them, a block needs one or two
chunks; with keys in no order, every chunk, like the whole map. A process
keeps the chunks of the last :data:`INDEXES_KEPT` key indexes it served
(:data:`CHUNKS_KEPT` at most), so the runs one driver trains one after
another do not hold each other's chunks in the object store.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

import numpy as np

from pipeline import storage
from pipeline.data.contract import KEY
from pipeline.train.stages import encode_keys, sorted_lookup


def key_chunk(url: str) -> tuple[dict, tuple[np.ndarray, np.ndarray | None]]:
    """One score file's key chunk: (its first/last key and rows, (sorted UTF-8 keys, indices or None)).

    Indices are None where the file's rows, in key order, number a contiguous
    run from ``first_index`` (as the score job writes them); else the index of
    each sorted key.
    """
    table = storage.read_table(url, columns=[KEY, "index"])
    keys = encode_keys(table.column(KEY).to_numpy(zero_copy_only=False))
    index = table.column("index").to_numpy().astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys, index = keys[order], index[order]
    first = int(index[0]) if len(index) else 0
    contiguous = bool(np.array_equal(index, np.arange(first, first + len(index))))
    meta = {"rows": len(keys), "first_index": first,
            "first_key": keys[0] if len(keys) else None, "last_key": keys[-1] if len(keys) else None}
    return meta, (keys, None if contiguous else index)


class KeyIndex:
    """The score table's key -> index map as chunk references; small to pickle, resolved where used.

    Attributes:
        num_chunks: chunks (score files with rows).
    """

    def __init__(self, metas: list[dict], refs: list):
        pairs = sorted(((m["first_key"], m["last_key"], m["first_index"], ref) for m, ref in zip(metas, refs) if m["rows"]),
                       key=lambda p: (p[0], p[2]))
        self._first = np.array([p[0] for p in pairs]) if pairs else np.zeros(0, "S1")
        self._last = np.array([p[1] for p in pairs]) if pairs else np.zeros(0, "S1")
        self._offsets = [p[2] for p in pairs]
        self._refs = [p[3] for p in pairs]
        self._token = uuid.uuid4().hex  # names this index's chunks in a process's cache, wherever it is unpickled

    @property
    def num_chunks(self) -> int:
        return len(self._refs)

    def lookup(self, keys) -> tuple[np.ndarray, np.ndarray]:
        """(index of each key, whether the score table holds it); ``keys``: str. Indices of absent keys are junk."""
        wanted = encode_keys(keys)
        index = np.zeros(len(wanted), np.int64)
        found = np.zeros(len(wanted), bool)
        if not len(wanted) or not self._refs:
            return index, found
        order = np.argsort(wanted, kind="stable")
        ordered = wanted[order]
        # Chunks whose key range meets [smallest, largest] wanted key; within each, the wanted keys in its range.
        lo = np.searchsorted(ordered, self._first, side="left")
        hi = np.searchsorted(ordered, self._last, side="right")
        for chunk in np.flatnonzero(hi > lo):
            at = order[lo[chunk]:hi[chunk]]
            sorted_keys, indices = _resolved(self._token, int(chunk), self._refs[chunk])
            pos, hit = sorted_lookup(sorted_keys, wanted[at])
            hit &= ~found[at]  # chunks from the score job never overlap; elsewhere the first chunk holding a key wins
            at, pos = at[hit], pos[hit]
            index[at] = self._offsets[chunk] + pos if indices is None else indices[pos]
            found[at] = True
        return index, found


INDEXES_KEPT = 2  # a process keeps the chunks of the key indexes it served last: a run's, and the one before
CHUNKS_KEPT = 4096  # and at most this many chunks, the least recently used let go first

_chunks: OrderedDict = OrderedDict()  # (index token, chunk) -> (sorted keys, indices), least recently used first
_chunks_lock = threading.Lock()


def _resolved(token: str, chunk: int, ref):
    """The chunk's arrays, fetched once per process; a key index that is not among the last
    :data:`INDEXES_KEPT` used here has its chunks let go (and with them their hold on the object store)."""
    import ray

    with _chunks_lock:
        if (token, chunk) in _chunks:
            _chunks.move_to_end((token, chunk))
            return _chunks[token, chunk]
    value = ray.get(ref)
    with _chunks_lock:
        _chunks[token, chunk] = value
        recent = []
        for t, _ in reversed(_chunks):
            if t not in recent:
                recent.append(t)
        for entry in [e for e in _chunks if e[0] not in recent[:INDEXES_KEPT]]:
            del _chunks[entry]
        while len(_chunks) > CHUNKS_KEPT:
            _chunks.popitem(last=False)
    return value


def key_index(scores_url: str) -> KeyIndex:
    """The :class:`KeyIndex` of the score job's output at ``scores_url`` (call with Ray up).

    One Ray task per ``scores/`` file reads its key and index columns; the
    caller gets a few values a file.
    """
    import ray

    task = ray.remote(num_returns=2)(key_chunk)
    pairs = [task.remote(url) for url in storage.list_files(storage.join(scores_url, "scores"))]
    return KeyIndex(ray.get([meta for meta, _ in pairs]), [chunk for _, chunk in pairs])
