"""Training rows from webdataset tars, reading only the samples the epoch's plan keeps.

Pruning an epoch saves its compute; with Ray Data's webdataset reader it saves
no reading, since every tar streams whole. This source reads each tar by
byte range instead (:mod:`pipeline.data.tars`): a read task per tar takes the
epoch's published plan when it runs (Ray Data re-executes the training
dataset every epoch, after every worker has started the epoch), looks its
samples' keys up in the score table's key index, and reads only the spans of
the kept ones. It gives them as the plain reader's rows after the index and
keep stages (``index``, the contract columns, the plan's ``weight`` and
``epoch``): the key lookup and the plan it has already made are not made
again per block.

The offset index of each tar is built once (a Ray task per tar, streaming it)
and kept in a folder that several runs on the same data can share; a tar's
index file is named by the tar's URL, size and modification time (both from
the one listing of its folder), so a tar rewritten gets a new index even at
its old size (tars are padded to 10 KiB records, so most rewrites keep it).
A rewrite the name cannot tell (on S3, whose times are whole seconds, one of
the same size within the second the index was built from) is caught when it
is read: every member's tar header must name the member and size the index
has for it (:func:`pipeline.data.tars.read_samples`).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import storage
from pipeline.data.contract import SHARD_SCHEMA, ColumnMapping
from pipeline.data.shards import folder_sizes, listed_infos, webdataset_to_contract
from pipeline.data.tars import read_samples, tar_index
from pipeline.storage import InputError
from pipeline.train.stages import epoch_plan, sorted_lookup

# Span bytes one block holds at most (Ray Data's blocks are about 128 MiB by default).
BLOCK_BYTES = 64 << 20


def index_name(tar_url: str, size: int, mtime_ns: int | None = None) -> str:
    """The file name of a tar's offset index: the tar's URL (hashed), size and modification time (ns; none where
    the store gives none)."""
    version = f"{size}" if mtime_ns is None else f"{size}-{mtime_ns}"
    return f"{hashlib.sha256(tar_url.encode()).hexdigest()[:20]}-{version}.parquet"


def file_versions(files: list[str]) -> dict[str, tuple[int, int | None]]:
    """``{URL: (size, modification time in ns or None)}`` of ``files``: one listing per folder, a request for any
    file the listings miss."""
    infos = listed_infos(files)
    for url in [f for f in files if f not in infos]:
        fs, path = storage.filesystem_for(url)
        infos[url] = storage.retry_reads(lambda: fs.get_file_info(path))
        if infos[url].type != pafs.FileType.File:
            raise InputError(f"{url}: no such file")
    return {url: (infos[url].size, infos[url].mtime_ns) for url in files}


def build_indexes(files: list[str], folder: str) -> list[tuple[str, int, str]]:
    """(tar URL, size, offset index URL) of each tar in ``files``; the indexes ``folder`` lacks are built,
    one Ray task per tar, all at once. An index is named by its tar's version (:func:`index_name`): a tar
    changed since its index was built gets a new one."""
    versions = file_versions(files)
    have = folder_sizes(folder)  # one listing; none where the folder is not there yet
    shards = [(f, versions[f][0], storage.join(folder, index_name(f, *versions[f]))) for f in files]
    build = ray.remote(num_cpus=0.5)(_build_index)  # streaming I/O: leaves CPUs to other tasks on small nodes
    ray.get([build.remote(url, out) for url, _, out in shards if out not in have])
    return shards


def _build_index(tar_url: str, out: str) -> None:
    storage.write_table(tar_index(tar_url), out)


class KeptTarsDatasource(Datasource):
    """A Ray Data source of the tars' contract rows that each epoch's plan keeps (read with :func:`kept_tar_rows`).

    Args:
        shards: (tar URL, size, offset index URL) from :func:`build_indexes`.
        keys: the score table's :class:`~pipeline.train.keys.KeyIndex`.
        pruner_name: the pruning actor whose published plan each read takes.
        columns: the shards' column mapping spec (``mmdp`` reads tars with img2dataset's names).
        fields: contract columns to give.
        max_gap: merge two reads of one tar less than this many bytes apart.

    Raises:
        InputError: the mapping takes the key from a member, not the members' name.
    """

    def __init__(self, shards: list[tuple[str, int, str]], keys, pruner_name: str, columns: str,
                 fields: tuple[str, ...], max_gap: int = 0):
        self._mapping = ColumnMapping.parse("img2dataset" if columns == "mmdp" else columns)
        if self._mapping.key in ("txt", "cls", self._mapping.image, self._mapping.caption, self._mapping.label):
            raise InputError(f"--columns {columns}: the key must be the tar members' name (webdataset's __key__) "
                             "to read kept samples by offset; train with --tar-reads all")
        self._shards, self._keys, self._pruner_name = shards, keys, pruner_name
        self._fields, self._max_gap = tuple(fields), max_gap

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, size, _ in self._shards)

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_kept, url, index_url, self._keys, self._pruner_name, self._mapping,
                                           self._fields, self._max_gap),
                         BlockMetadata(num_rows=None, size_bytes=int(size), exec_stats=None, input_files=[url]))
                for url, size, index_url in self._shards]

    def get_name(self) -> str:
        return "KeptTars"


def kept_tar_rows(*args, **kwargs):
    """``ray.data.read_datasource(KeptTarsDatasource(*args, **kwargs))``: a lazy dataset, read anew every epoch."""
    return ray.data.read_datasource(KeptTarsDatasource(*args, **kwargs))


def _read_kept(tar_url: str, index_url: str, keys, pruner_name: str, mapping: ColumnMapping,
               fields: tuple[str, ...], max_gap: int):
    """One tar's kept samples as blocks of what :meth:`~pipeline.train.pruning.Pruning.dataset` gives: ``index``,
    the contract ``fields``, and the plan's ``weight`` and ``epoch`` (an empty block where it keeps none)."""
    index = storage.read_table(index_url)
    positions, found = keys.lookup(index.column("__key__").to_numpy(zero_copy_only=False))
    epoch, kept, weights = epoch_plan(pruner_name)
    at, in_plan = sorted_lookup(kept, positions)
    mask = found & in_plan
    chosen, positions, weights = index.filter(pa.array(mask)), positions[mask], weights[at[mask]].astype(np.float32)
    if not chosen.num_rows:
        yield _planned(SHARD_SCHEMA.empty_table().select(list(fields)), positions, weights, epoch)
        return
    spans = (chosen.column("end").to_numpy() - chosen.column("start").to_numpy()).cumsum()
    cuts = np.searchsorted(spans, np.arange(BLOCK_BYTES, spans[-1], BLOCK_BYTES), side="right")
    for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [chosen.num_rows]])):
        if hi > lo:
            try:
                samples = read_samples(tar_url, chosen.slice(int(lo), int(hi - lo)), max_gap)
            except InputError as exc:  # a stale index: name it
                raise InputError(f"{exc} (the index: {index_url})") from exc
            yield _planned(webdataset_to_contract(samples, mapping).select(list(fields)),
                           positions[lo:hi], weights[lo:hi], epoch)


def _planned(rows: pa.Table, index: np.ndarray, weight: np.ndarray, epoch: int) -> pa.Table:
    """``rows`` with the columns the index and keep stages add: ``index`` first, ``weight`` and ``epoch`` last."""
    rows = rows.add_column(0, "index", pa.array(index, pa.int64()))
    return rows.append_column("weight", pa.array(weight, pa.float32())).append_column(
        "epoch", pa.array(np.full(len(index), epoch, np.int64)))
