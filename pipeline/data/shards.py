"""Shards: the data files a dataset is stored in (parquet, webdataset tars), and their mapping onto the contract.

A dataset is a folder (or one file) of shards, local or in an object store.
:func:`shard_files` names the format and the files and refuses anything that
would silently lose rows (a stray file, a truncated tar, unreadable parquet);
:func:`webdataset_to_contract` maps webdataset members (img2dataset's
``.jpg``/``.txt``/``.cls``, or those ``--columns`` names) onto the contract;
:func:`read_shards` is the one Ray Data reader of them all, for every job
(the only Ray code of ``data``).
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.data.contract import (CAPTION, IMAGE, KEY, LABEL, MAPPINGS, SHARD_SCHEMA, ColumnMapping, SchemaError,
                                    to_contract)
from pipeline.data.tars import MemberNames, base_keys
from pipeline.storage import InputError, exists, filesystem_for, join, list_files, read_json

# Image member extensions, matched whatever their case (ImageNet's tars hold ``.JPEG``): the formats
# the scoring decoder (PIL) reads, in the order a sample's first image is taken.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "gif", "bmp", "tif", "tiff")
# Shard footers read at once: in an object store each is a round trip, and
# thousands of shards read one by one take minutes.
READ_THREADS = 32
# A tar's first bytes whose samples' members are looked at for the members a --columns spec names
# (:func:`tar_head_members`): one ranged read, and one more past a first sample's larger image.
HEAD_BYTES = 64 << 10
# A member's sample and extension from its name, as Ray Data's webdataset reader groups members
# (``dir/KEY.seg.png``: sample ``dir/KEY``, column ``seg.png``); pipeline.data.tars groups them alike.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# Files that sit beside shards in real datasets (img2dataset stats, checksums, notes).
SIDECAR_SUFFIXES = (".json", ".crc", ".md")


def webdataset_to_contract(table: pa.Table, mapping: ColumnMapping = MAPPINGS["img2dataset"]) -> pa.Table:
    """Webdataset samples (``__key__`` plus one bytes column per member extension) in the data contract.

    The image is each sample's first image member, whatever its extension
    (``jpg``/``JPEG``/``png``/... :data:`IMAGE_EXTENSIONS` in any case), under
    the mapping's image column; a member the mapping names as the image that
    has no image extension (``image=img``: ``KEY.img``) comes first. ``txt``
    and ``cls``, and the members the mapping names as caption and label
    (``caption=caption,label=label``: ``KEY.caption``, ``KEY.label``), become
    trimmed text, undecodable bytes replaced rather than lost; the contract
    then parses a label member as it does ``cls``. The key is the samples'
    names (``__key__``) unless the mapping names one of those columns as the
    key (``key=txt``); other members are dropped.
    """
    present = sorted((c for c in table.column_names if c.lower() in IMAGE_EXTENSIONS),
                     key=lambda c: IMAGE_EXTENSIONS.index(c.lower()))
    if mapping.image in table.column_names and mapping.image not in present and mapping.image != "__key__":
        present.insert(0, mapping.image)
    images = [table.column(e).cast(pa.binary()) for e in present]
    columns = {
        "__key__": table.column("__key__"),
        mapping.image: pc.coalesce(*images) if images else pa.nulls(table.num_rows, pa.binary()),
    }
    for member in dict.fromkeys(("txt", "cls", mapping.caption, mapping.label)):
        if member in table.column_names and member not in columns:
            columns[member] = pa.array([_text(v) for v in table.column(member).cast(pa.binary()).to_pylist()],
                                       pa.string())
    out = pa.table(columns)
    if mapping.key not in out.column_names:
        out = out.append_column(mapping.key, out.column("__key__"))
    return to_contract(out, mapping)


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace").strip()


def shard_files(url: str, mapping: ColumnMapping | None = None) -> tuple[str, list[str]]:
    """The shard format (``parquet`` or ``webdataset``) of a dataset and its files, every one checked.

    :func:`list_shards`, then :func:`check_shards`.

    Raises:
        InputError: naming the offending file or folder.
        SchemaError: naming a parquet shard that ``mapping`` cannot read.
    """
    kind, files = list_shards(url)
    check_shards(kind, files, mapping)
    return kind, files


def list_shards(url: str) -> tuple[str, list[str]]:
    """The shard format (``parquet`` or ``webdataset``) of a dataset and its files, from one listing.

    A folder with ``.tar`` files is webdataset (img2dataset writes a metadata
    ``.parquet`` beside each tar, named as it: ``00000.parquet`` beside
    ``00000.tar``; those are not samples); one file is a tar if its name says
    so, else parquet (whatever its extension; it needs one). Any other file
    that is neither a shard nor a known sidecar is an error naming it, and so
    is a parquet file beside tars that is no tar's metadata, so a stray or
    misnamed shard is never skipped unnoticed. No shard is opened here
    (:func:`check_shards` reads them).

    Raises:
        InputError: naming the offending file or folder.
    """
    files = list_files(url, (".parquet", ".tar"), others=SIDECAR_SUFFIXES)
    if files == [str(url)] and not _extension(url):
        raise InputError(f"{url}: a shard file's name needs an extension (.parquet or .tar): Ray Data reads "
                         "files by theirs; rename it")
    tars = [f for f in files if f.endswith(".tar")]
    if not tars:
        return "parquet", files
    stems = {t.removesuffix(".tar") for t in tars}
    unpaired = [f for f in files if f.endswith(".parquet") and f.removesuffix(".parquet") not in stems]
    if unpaired:
        more = f" and {len(tars) - 1} more" if len(tars) > 1 else ""
        raise InputError(f"{unpaired[0]}: parquet beside webdataset tars ({tars[0]}{more}), and not a tar's "
                         "img2dataset metadata (named as its tar: 00000.parquet beside 00000.tar); keep one "
                         "shard format in the folder")
    return "webdataset", tars


class ParquetFooter(NamedTuple):
    """What a parquet shard's footer says: its column names, its row count and its Arrow schema."""

    columns: tuple[str, ...]
    rows: int
    schema: pa.Schema


def check_shards(kind: str, files: list[str], mapping: ColumnMapping | None = None,
                 fields: tuple[str, ...] | None = None, read_all: bool = False) -> list[ParquetFooter] | None:
    """Refuse a shard that would fail or lose rows when read: every shard's footer (a tar's last KiB) is
    read once, :data:`READ_THREADS` at a time; with ``mapping``, each parquet schema must map onto the contract,
    a column the mapping's spec named (of the contract ``fields`` read, where given) must be in some shard
    (for tars: a caption or label member in some tar's first samples, :func:`_check_tar_members`), and the
    shards' columns read (the mapped ones; with ``read_all``, every one) must join into one block
    (:func:`check_joinable`).

    Parquet sizes come from one listing of each folder, so a parquet shard
    costs one ranged read, not a size request (HEAD) and a read.

    Returns:
        Each parquet shard's footer (column names, row count), in ``files``' order (None for webdataset).

    Raises:
        InputError: naming the first offending file.
        SchemaError: naming a parquet shard that ``mapping`` cannot read, or a named column no shard has.
    """
    if kind == "webdataset":
        _each(_check_tar_end, files)
        if mapping is not None:
            _check_tar_members(files, mapping, fields)
        return None
    sizes = listed_sizes(files)
    footers = _each(lambda file_url: _check_parquet(file_url, mapping, sizes.get(file_url)), files)
    for name in mapping.named if mapping is not None else ():
        if fields is not None and name not in (KEY, IMAGE, *fields):
            continue  # a split read without it (a test split without captions, for a classifier)
        source = getattr(mapping, name)
        if files and not any(source in f.columns for f in footers):
            found = sorted(set().union(*(f.columns for f in footers)))
            raise SchemaError(f"--columns {name}={source}: no shard in {_folder_of(files)} has a column "
                              f"{source!r} (found {found}); "
                              f"without it every {name} would be read as missing")
    if mapping is not None:
        wanted = (KEY, IMAGE, *(fields if fields is not None else (CAPTION, LABEL)))
        read = None if read_all else {getattr(mapping, f) for f in wanted}
        check_joinable(files, footers, read)
    return footers


def check_joinable(files: list[str], footers: list[ParquetFooter], columns: set[str] | None = None) -> None:
    """Refuse parquet shards whose ``columns`` (None: all) Ray Data could not join into one block: a read task
    concatenates several shards' tables, promoting a column's types where Arrow can (int32 with int64,
    string with large_string or binary, null with any) and failing, naming no shard, where it cannot
    (int64 with string; a dictionary-encoded column, as pandas writes a categorical, with a plain one).

    Raises:
        SchemaError: naming the column, its two types and a shard that holds each.
    """
    seen: dict[str, tuple[pa.DataType, str]] = {}  # column -> (its type so far, the shard that gave it)
    for file_url, footer in zip(files, footers):
        for field in footer.schema:
            if columns is not None and field.name not in columns:
                continue
            if field.name not in seen:
                seen[field.name] = (field.type, file_url)
                continue
            so_far, where = seen[field.name]
            if field.type == so_far:
                continue
            try:
                joined = pa.unify_schemas([pa.schema([pa.field(field.name, so_far)]), pa.schema([field])],
                                          promote_options="permissive").field(0).type
            except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise SchemaError(f"column {field.name!r} is {field.type} in {file_url} and {so_far} in {where}: "
                                  "a read joins shards into one block and cannot join these two types; write "
                                  "the shards with one type for it") from None
            seen[field.name] = (joined, where if joined == so_far else file_url)


def check_named_columns(url: str, mapping: ColumnMapping, fields: tuple[str, ...] | None = None,
                        listing: tuple[str, list[str]] | None = None) -> None:
    """Refuse a ``--columns`` spec that names a column no shard at ``url`` has, before a job starts, so that
    a typo leaves the output it would have replaced committed: the first shard's footer is read, and every
    shard's (:func:`check_shards`) only where that one lacks a named column. For webdataset tars, the caption
    and label members named are looked for in the first tar's first samples, and in every tar's only where
    those lack one (:func:`_check_tar_members`). Nothing is read for a preset's names. ``fields``,
    ``listing``: as for :func:`read_shards`.

    Raises:
        SchemaError: naming the column; InputError: an unreadable shard.
    """
    wanted = [getattr(mapping, name) for name in mapping.named
              if fields is None or name in (KEY, IMAGE, *fields)]
    if not wanted:
        return
    kind, files = listing or list_shards(url)
    if kind == "webdataset":
        _check_tar_members(files, mapping, fields)
        return
    if kind != "parquet" or not files:
        return
    first = _check_parquet(files[0], None)  # its size asked for alone: a listing of the folder costs more
    if any(source not in first.columns for source in wanted):
        check_shards(kind, files, mapping, fields)


class ColumnStats(NamedTuple):
    """A column of one parquet file, as its footer's statistics give it: ``nulls`` (0 where no row group
    counted them), and ``low``/``high`` of an integer column (None where a row group kept no min/max, and
    for other types)."""
    nulls: int
    low: int | None
    high: int | None


def footer_stats(url: str, columns: list[str],
                 listing: tuple[str, list[str]] | None = None) -> list[tuple[str, dict[str, ColumnStats]]]:
    """``(file URL, {column: ColumnStats})`` for each parquet shard at ``url``, of those of ``columns`` it has,
    from the footers alone (no data page is read; :data:`READ_THREADS` footers at a time). Empty for tars."""
    kind, files = listing or list_shards(url)
    if kind != "parquet":
        return []
    sizes = listed_sizes(files)
    return list(zip(files, _each(lambda file_url: _column_stats(file_url, columns, sizes.get(file_url)), files)))


def _column_stats(file_url: str, columns: list[str], size: int | None) -> dict[str, ColumnStats]:
    metadata = _footer(file_url, size).metadata
    names = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    out = {}
    for column in columns:
        if column not in names:
            continue
        at = names.index(column)
        nulls, low, high, ranged = 0, None, None, metadata.num_row_groups > 0
        for g in range(metadata.num_row_groups):
            chunk = metadata.row_group(g).column(at)
            st = chunk.statistics
            if st is not None and st.has_null_count:
                nulls += st.null_count
            if chunk.physical_type not in ("INT32", "INT64") or st is None or not st.has_min_max:
                # A row group of nulls alone has no range and needs none; any other leaves the file's unknown.
                ranged = ranged and st is not None and st.has_null_count and st.null_count == chunk.num_values
                continue
            low = st.min if low is None else min(low, st.min)
            high = st.max if high is None else max(high, st.max)
        out[column] = ColumnStats(nulls, low if ranged else None, high if ranged else None)
    return out


def string_ranges(files: list[str], column: str) -> list[tuple[str, str] | tuple[()] | None]:
    """``(lowest, highest)`` of a string ``column`` in each parquet file, from its footer's statistics alone
    (:data:`READ_THREADS` footers at a time); ``()`` for a file with no value in it (no rows, or nulls
    alone); None for a file without the column, or with a row group that kept no range (values longer
    than the writer keeps statistics for)."""
    sizes = listed_sizes(files)

    def one(file_url: str) -> tuple[str, str] | tuple[()] | None:
        metadata = _footer(file_url, sizes.get(file_url)).metadata
        names = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
        if column not in names:
            return None
        at, low, high = names.index(column), None, None
        for g in range(metadata.num_row_groups):
            chunk = metadata.row_group(g).column(at)
            st = chunk.statistics
            if st is not None and st.has_null_count and st.null_count == chunk.num_values:
                continue  # nulls alone: no range, and none needed
            if st is None or not st.has_min_max:
                return None
            lo, hi = (v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v) for v in (st.min, st.max))
            low, high = (lo, hi) if low is None else (min(low, lo), max(high, hi))
        return () if low is None else (low, high)

    return _each(one, files)


def _folder_of(files: list[str]) -> str:
    """The folder that holds every one of ``files`` (URLs or paths; subfolders of a split included)."""
    return os.path.commonprefix([f.rpartition("/")[0] + "/" for f in files]).rpartition("/")[0]


def listed_sizes(files: list[str]) -> dict[str, int]:
    """``{URL: size}`` of the ``files`` that one listing of each of their folders finds."""
    return {url: info.size for url, info in listed_infos(files).items()}


def listed_infos(files: list[str]) -> dict[str, pafs.FileInfo]:
    """``{URL: FileInfo}`` (size, modification time) of the ``files`` that one listing of each of their folders finds."""
    infos = {}
    for folder in sorted({f.rstrip("/").rpartition("/")[0] for f in files}):
        infos.update({join(folder, e.base_name): e for e in _entries(folder) if e.type == pafs.FileType.File})
    return {f: infos[f] for f in files if f in infos}


def folder_sizes(url: str) -> dict[str, int]:
    """``{URL: size}`` of the files directly in the folder ``url`` (one listing; none if it is not a folder)."""
    return {join(url, e.base_name): e.size for e in _entries(url) if e.type == pafs.FileType.File}


def _entries(url: str) -> list[pafs.FileInfo]:
    fs, path = filesystem_for(url)
    try:
        return fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except OSError:  # not a folder, or unreadable: callers then ask per file, as without it
        return []


def _each(check, items: list) -> list:
    """``[check(item) for item in items]``, :data:`READ_THREADS` at a time; the first failing item's error is raised."""
    with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(items)))) as pool:
        return list(pool.map(check, items))  # results, and errors, come back in item order


def _footer(file_url: str, size: int | None = None) -> pds.ParquetFileFragment:
    """The parquet file at ``file_url`` as a fragment whose footer has been read (one ranged read).

    Raises:
        InputError: the file is not readable parquet (:func:`~pipeline.storage.unreadable_parquet`).
    """
    fs, path = filesystem_for(file_url)
    # A fragment of known size reads its footer without asking the store for the size first; the
    # fragment keeps the footer, so its schema, row count and statistics cost no second read.
    fragment = pds.ParquetFileFormat().make_fragment(path, filesystem=fs, file_size=size)
    try:
        storage.retry_reads(lambda: fragment.physical_schema)
    except (pa.ArrowInvalid, OSError) as exc:
        raise storage.unreadable_parquet(file_url, exc) from exc
    return fragment


def _check_parquet(file_url: str, mapping: ColumnMapping | None, size: int | None = None) -> ParquetFooter:
    fragment = _footer(file_url, size)
    schema, rows = fragment.physical_schema, fragment.metadata.num_rows
    if mapping is not None:
        try:
            to_contract(schema.empty_table(), mapping)
        except SchemaError as exc:
            raise SchemaError(f"{file_url}: {exc}") from exc
    return ParquetFooter(tuple(schema.names), rows, schema)


def _check_tar_end(file_url: str) -> None:
    """Refuse a tar cut short: a whole one is 512-byte blocks ending in two zero blocks.

    Reads only the last 1 KiB, so a folder of large shards is checked cheaply
    on the driver instead of failing a read task later.
    """
    fs, path = filesystem_for(file_url)
    size = fs.get_file_info(path).size
    tail = b""
    if size and size % 512 == 0 and size >= 1024:
        with fs.open_input_file(path) as f:
            tail = storage.retry_reads(lambda: f.read_at(1024, size - 1024))
    if tail != bytes(1024):
        raise InputError(f"{file_url}: truncated tar ({size} bytes, no end-of-archive blocks); re-create or remove it")


def _check_tar_members(files: list[str], mapping: ColumnMapping, fields: tuple[str, ...] | None = None) -> None:
    """Refuse a caption or label member the mapping's spec named (of the contract ``fields`` read, where given)
    that no tar's first samples hold (:func:`tar_head_members`): without it every caption (label) would be read
    as missing. The first tar's are read, and every tar's only where those lack a named member. (The key and the
    image are not members looked for: the key is the samples' names unless it names a caption or label member,
    and the image is read from any image member.)

    Raises:
        SchemaError: naming the column and the folder; InputError: a tar that cannot be read as one.
    """
    wanted = {name: getattr(mapping, name) for name in mapping.named
              if name in (CAPTION, LABEL) and (fields is None or name in fields)}
    if not wanted or not files:
        return
    found = tar_head_members(files[0])
    if all(source in found for source in wanted.values()):
        return
    found = found.union(*_each(tar_head_members, files[1:]))
    for name, source in wanted.items():
        if source not in found:
            raise SchemaError(f"--columns {name}={source}: no shard in {_folder_of(files)} has a column "
                              f"{source!r}: no tar holds a member KEY.{source} in its first sample, nor in the "
                              f"others whose headers lie in its first {HEAD_BYTES >> 10} KiB (found members "
                              f"{sorted(found)}; only those are read, not whole tars); without it every {name} "
                              "would be read as missing")


def tar_head_members(file_url: str) -> set[str]:
    """The member extensions (webdataset's column names: ``jpg``, ``txt``, ``seg.png``) of the first sample of
    the tar at ``file_url``, and of the samples after it whose members' headers lie in its first :data:`HEAD_BYTES`.

    Only tar headers are parsed (:mod:`tarfile`, on ranged reads of :data:`HEAD_BYTES`): member data is
    skipped, never read unless it shares a read with a header, so a large first image costs one more read.
    Members are grouped into samples as Ray Data's webdataset reader groups them.

    Raises:
        InputError: the file is not a plain tar (or ends inside one of those headers).
    """
    fs, path = filesystem_for(file_url)
    names: set[str] = set()
    try:
        with fs.open_input_file(path) as f, tarfile.open(fileobj=_RangedReads(f), mode="r:") as tar:
            sample, past_first = None, False
            for member in tar:
                match = _MEMBER_NAME.match(member.name) if member.isreg() else None
                if match is not None:
                    key, extension = match.groups()
                    if key != sample:
                        past_first = sample is not None
                        if past_first and member.offset >= HEAD_BYTES:
                            break
                        sample = key
                    names.add(extension)
                # The next header is not read where it lies past the first read and the first sample is whole.
                next_header = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if past_first and next_header >= HEAD_BYTES:
                    break
    except tarfile.TarError as exc:
        raise InputError(f"{file_url}: not a readable tar ({exc}); re-create or remove it") from exc
    return names


class _RangedReads:
    """A seekable view of an input file for :mod:`tarfile` that reads it in ranges of :data:`HEAD_BYTES` at
    least, keeping the last: tarfile reads headers where they lie and seeks past member data."""

    def __init__(self, f):
        self._f, self._size, self._pos, self._start, self._buf = f, f.size(), 0, 0, b""

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset + (0, self._pos, self._size)[whence]
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if self._pos >= self._size:
            return b""
        end = self._size if size is None or size < 0 else min(self._pos + size, self._size)
        if self._pos < self._start or end > self._start + len(self._buf):
            start, length = self._pos, max(end - self._pos, min(HEAD_BYTES, self._size - self._pos))
            self._start, self._buf = start, storage.retry_reads(lambda: self._f.read_at(length, start))
        data = self._buf[self._pos - self._start:end - self._start]
        self._pos += len(data)
        return data


@contextlib.contextmanager
def in_file_order():
    """Ray datasets made inside run with ``preserve_order`` (rows in file order, whatever the read order); the
    process's own setting comes back after, so later datasets (a Train run's, in the same driver) keep it."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before


def read_shards(url: str, columns: str = "mmdp", fields: tuple[str, ...] = tuple(SHARD_SCHEMA.names),
                listing: tuple[str, list[str]] | None = None):
    """The shards at ``url`` as a lazy Ray dataset in the data contract (key, image, caption, label, then
    :data:`~pipeline.data.contract.BAD_LABEL`: :func:`~pipeline.data.contract.to_contract`).

    ``columns`` is a :class:`~pipeline.data.contract.ColumnMapping` spec
    (``mmdp``, ``img2dataset``, or pairs like ``image=jpg,caption=txt``);
    webdataset tars read with img2dataset's names unless it says otherwise.
    Bad files fail here, on the driver, by name (:func:`shard_files`).
    Parquet shards are read for the contract ``fields`` asked (and the key
    and image, which every row needs): their other columns are not read,
    unless the shards differ in which of them they hold (:func:`projection`);
    the rest of the contract's columns come back null. ``listing``: what
    :func:`list_shards` gave for ``url``, where the caller has listed it already.
    """
    mapping = ColumnMapping.parse(columns)
    kind, files = listing or list_shards(url)
    footers = check_shards(kind, files, mapping, tuple(fields))
    read_columns = None if footers is None else projection(mapping, fields, [f.columns for f in footers])
    if footers is not None and read_columns is None:  # every column read: every one must join
        check_joinable(files, footers)
    return read_listed(url, kind, files, columns, read_columns)


def projection(mapping: ColumnMapping, fields, names: list[tuple[str, ...]]) -> list[str] | None:
    """The source columns to read for the contract ``fields`` from parquet shards holding the columns ``names``
    (one tuple a shard); None (read every column) where a wanted column is in some shards and not in others.

    A column absent from every shard is left out (the contract gives it as
    nulls); one in only some shards cannot be named in one read of them all.
    """
    wanted = dict.fromkeys(getattr(mapping, f) for f in (KEY, IMAGE, *fields))  # ordered, no repeats
    every = set.intersection(*map(set, names)) if names else set()
    some = set().union(*names)
    if any(c in some and c not in every for c in wanted):
        return None
    return [c for c in wanted if c in every]


def read_listed(url: str, kind: str, files: list[str], columns: str = "mmdp", read_columns: list[str] | None = None):
    """:func:`read_shards` of shards already listed (:func:`list_shards`), without checking them again.

    Where the listed files are exactly the ones Ray Data finds in the folder,
    Ray Data gets the folder: one listing gives it every size, where a list of
    files costs a size request (HEAD) per shard, twice (planning and
    listing), every time the dataset runs (each training epoch).
    ``read_columns``: the parquet columns to read (None: all of them).
    """
    import ray.data

    mapping = ColumnMapping.parse(columns)
    fs, _ = filesystem_for(url)
    suffix = "tar" if kind == "webdataset" else "parquet"
    targets = _as_folder(url, files, suffix)
    paths = [filesystem_for(u)[1] for u in targets]
    # A folder is read for its .suffix files (what list_shards found there); files named one by one by
    # their own extensions (one file given as the input, ``train.pq``, as list_shards took it): Ray Data
    # filters even the files it is given by extension, and its parquet reader takes None as "parquet".
    extensions = [suffix] if targets != files else sorted({_extension(f) for f in files})
    if kind == "webdataset":
        mapping = mapping if columns != "mmdp" else MAPPINGS["img2dataset"]
        # Member names that are not UTF-8 (Python reads their bytes as lone surrogates, which Arrow cannot
        # store) are escaped, as the train job's tar index escapes them; a sample written twice in a row
        # is two rows of one key (a duplicate), not a failed read.
        raw = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, file_extensions=extensions,
                                       filerename=MemberNames())
        return raw.map_batches(_webdataset_stage, batch_format="numpy", fn_kwargs={"mapping": mapping})
    raw = ray.data.read_parquet(paths, filesystem=fs, file_extensions=extensions)
    if read_columns is not None:
        raw = raw.select_columns(read_columns)  # right after the read: Ray Data pushes it into the read
    return raw.map_batches(to_contract, batch_format="pyarrow", fn_kwargs={"mapping": mapping})


def _extension(url: str) -> str:
    """The extension of the file at ``url`` (``pq`` of ``train.pq``; "" where its name has none)."""
    name = url.rstrip("/").rpartition("/")[2]
    return name.rpartition(".")[2] if "." in name else ""


def _as_folder(url: str, files: list[str], suffix: str) -> list[str]:
    """``[url]`` where ``files`` are exactly what Ray Data reads of the folder (its ``.suffix`` files
    whose names do not start with ``.`` or ``_``, in it or in such subfolders), else ``files``."""
    if len(files) < 2:
        return files
    seen = [e for e in _entries(url) if not e.base_name.startswith((".", "_"))]
    if any(e.type == pafs.FileType.Directory for e in seen):
        return files
    own = [join(url, e.base_name) for e in seen if e.base_name.lower().endswith("." + suffix)]
    return [url] if sorted(own) == sorted(files) else files


def _webdataset_stage(batch: dict, mapping: ColumnMapping) -> pa.Table:
    # Ray's reader holds members as Python objects, NaN where a sample lacks one.
    members = {name: pa.array([v if isinstance(v, bytes) else None for v in values], pa.binary())
               for name, values in batch.items() if name not in ("__key__", "__url__")}
    keys = base_keys(batch["__key__"].astype(str))
    return webdataset_to_contract(pa.table({"__key__": keys, **members}), mapping)


def dataset_metadata(data: str) -> dict:
    """The dataset's ``metadata.json`` (an empty dict where it has none: it is optional)."""
    meta = join(data, "metadata.json")
    return read_json(meta) if exists(meta) else {}


def class_names(data: str, classes: tuple[str, ...] | None, required: bool = True) -> list[str]:
    """``classes`` if given, else those of the dataset's ``metadata.json`` (else none, when not ``required``).

    Raises:
        InputError: neither names them and they are ``required``.
    """
    if classes:
        return list(classes)
    names = dataset_metadata(data).get("classes")
    if not names and required:
        raise InputError(f"{join(data, 'metadata.json')}: no class names there; pass --classes "
                         "(e.g. --classes cat,dog,car)")
    return list(names or [])
