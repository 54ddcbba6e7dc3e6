"""Webdataset tars read sample by sample: an offset index per tar, then ranged reads of the chosen samples.

Ray Data's webdataset reader streams a tar start to finish, so a reader of
some of its samples (an epoch's plan) still reads every byte. A tar's members
sit at fixed byte offsets, though, and each sample's members (``KEY.jpg``,
``KEY.txt``, ...) lie next to each other: :func:`tar_index` walks a tar once
and records each sample's byte span and where its members lie in it;
:func:`read_samples` then reads only chosen samples' spans, one read (a
ranged GET on S3 and GCS) per run of consecutive chosen samples, runs closer
than ``max_gap`` bytes merged into one. Samples are grouped as Ray Data's
reader groups them (consecutive members sharing a name up to the first dot of
the file name), so both readers name the same samples alike.
"""

from __future__ import annotations

import io
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.data.contract import text_key
from pipeline.storage import InputError

# One row per sample: its key, its span [start, end) in the tar (headers and
# padding included), and each member's name suffix, offset in the span and size.
INDEX_SCHEMA = pa.schema([
    pa.field("__key__", pa.string()),
    pa.field("start", pa.int64()),
    pa.field("end", pa.int64()),
    pa.field("suffixes", pa.list_(pa.string())),
    pa.field("offsets", pa.list_(pa.int64())),
    pa.field("sizes", pa.list_(pa.int64())),
])
# Ranged reads of one tar in flight at once: on an object store each is a round trip.
READ_THREADS = 16
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # Ray Data's webdataset grouping: KEY.suffix


# Marks a sample that repeats the one before it under the same key (:class:`MemberNames`); no tar member's name
# holds it (tar names end at a NUL byte).
REPEAT = "\x00"


class MemberNames:
    """Ray Data's webdataset reader's ``filerename``: each member's name as text Arrow can store
    (:func:`~pipeline.data.contract.text_key`), and a sample that repeats the one before it under the same
    key (``a.jpg a.txt a.jpg a.txt``: a sample written twice) named apart, ``a`` + :data:`REPEAT` + ``1``.
    Ray's reader groups members by consecutive keys and fails the whole read on a suffix met twice in one
    sample; named apart, the two are two rows, and :func:`base_keys` gives both the key ``a`` back, so the
    score job rejects both as a duplicate key, as it does for a key in two places of a folder.

    Called on each member of each tar a read task reads, in order; its state carries from one tar to the
    next, where a tar's first sample with the previous tar's last key is a repeat as well (a duplicate all
    the same).
    """

    def __init__(self):
        self.key, self.suffixes, self.copy = None, set(), 0

    def __call__(self, name: str) -> str:
        name = text_key(name)
        match = _KEY_SUFFIX.match(name)
        if match is None:
            return name
        key, suffix = match.groups()
        if key != self.key:
            self.key, self.suffixes, self.copy = key, set(), 0
        elif suffix in self.suffixes:  # the same member again: a new sample under the same key
            self.suffixes, self.copy = set(), self.copy + 1
        self.suffixes.add(suffix)
        return f"{key}{REPEAT}{self.copy}.{suffix}" if self.copy else name


def base_keys(keys: np.ndarray) -> np.ndarray:
    """Sample keys (a NumPy str array) as their tar named them, :class:`MemberNames`' marks taken off."""
    marked = np.char.find(keys, REPEAT) >= 0
    if marked.any():
        keys = keys.copy()
        keys[marked] = [k.partition(REPEAT)[0] for k in keys[marked]]
    return keys


def tar_index(url: str) -> pa.Table:
    """Each sample's byte span and member offsets in the tar at ``url`` (:data:`INDEX_SCHEMA`), read once, streamed.

    A sample that repeats the one before it under the same key (a member met twice) is a sample of its
    own under that key, as the score job's reads take it (:class:`MemberNames`): a duplicate key, which the
    score table rejects, so no training reads it.

    Raises:
        InputError: the file is not an uncompressed tar.
    """
    fs, path = storage.filesystem_for(url)
    keys, starts, ends, suffixes, offsets, sizes = [], [], [], [], [], []
    try:
        with fs.open_input_stream(path, compression=None) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                # A name's bytes that are not UTF-8 escaped, as the score job's reads escape them.
                match = _KEY_SUFFIX.match(text_key(member.name)) if member.isreg() else None
                if match is None:
                    continue
                key, suffix = match.groups()
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not keys or keys[-1] != key or suffix in suffixes[-1]:
                    keys.append(key)
                    starts.append(member.offset)  # its first header (a long name's header included)
                    ends.append(end)
                    suffixes.append([]), offsets.append([]), sizes.append([])
                ends[-1] = end
                suffixes[-1].append(suffix)
                offsets[-1].append(member.offset_data - starts[-1])
                sizes[-1].append(member.size)
    except tarfile.ReadError as exc:
        raise InputError(f"{url}: not an uncompressed tar ({exc}); samples can only be read by offset from a "
                         "plain tar (train with --tar-reads all to stream it whole)") from exc
    return pa.table([keys, starts, ends, suffixes, offsets, sizes], schema=INDEX_SCHEMA)


def read_runs(starts: np.ndarray, ends: np.ndarray, max_gap: int) -> np.ndarray:
    """The byte ranges [start, end) (int64 [r, 2]) that cover the spans ``starts``/``ends`` (in file order):
    consecutive spans, and spans less than ``max_gap`` bytes apart, in one range."""
    if not len(starts):
        return np.zeros((0, 2), np.int64)
    new_run = np.concatenate([[True], starts[1:] - ends[:-1] > max_gap])
    first = np.flatnonzero(new_run)
    last = np.concatenate([first[1:], [len(starts)]]) - 1
    return np.stack([starts[first], ends[last]], axis=1).astype(np.int64)


def read_samples(url: str, index: pa.Table, max_gap: int = 0) -> pa.Table:
    """The samples of ``index`` (rows of :func:`tar_index` for the tar at ``url``, in file order) read by byte range.

    Returns a table as Ray Data's webdataset reader gives one: ``__key__`` and
    one binary column per member suffix, null where a sample lacks that member.
    """
    starts = index.column("start").to_numpy()
    ends = index.column("end").to_numpy()
    runs = read_runs(starts, ends, max_gap)
    fs, path = storage.filesystem_for(url)
    with fs.open_input_file(path) as f:
        def read(run):
            return storage.retry_reads(lambda: f.read_at(int(run[1] - run[0]), int(run[0])))

        with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(runs)))) as pool:
            buffers = list(pool.map(read, runs))
    run_of = np.searchsorted(runs[:, 0], starts, side="right") - 1
    columns: dict[str, list] = {}
    keys = index.column("__key__").to_pylist()
    for i, (suffixes, offsets, sizes) in enumerate(zip(*(index.column(c).to_pylist()
                                                         for c in ("suffixes", "offsets", "sizes")))):
        buf, base = buffers[run_of[i]], int(starts[i] - runs[run_of[i], 0])
        if len(buf) < int(ends[i] - runs[run_of[i], 0]):
            raise InputError(f"{url}: shorter than its offset index says ({len(buf)} bytes where more were "
                             "expected); the tar changed after it was indexed: delete the index and rerun")
        follows = tarfile.BLOCKSIZE  # where a member's data starts when no extended header comes before its own
        for suffix, offset, size in zip(suffixes, offsets, sizes):
            name = f"{keys[i]}.{suffix}"
            if not _header_matches(buf[base + offset - tarfile.BLOCKSIZE:base + offset], name, size,
                                   plain=offset == follows):
                raise InputError(f"{url}: member {name!r} is not where its offset index says (the tar header "
                                 "there names another member or size); the tar changed after it was indexed: "
                                 "delete the index and rerun")
            follows = offset + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE + tarfile.BLOCKSIZE
            columns.setdefault(suffix, [None] * index.num_rows)[i] = buf[base + offset:base + offset + size]
    return pa.table({"__key__": index.column("__key__"),
                     **{name: pa.array(values, pa.binary()) for name, values in columns.items()}})


def _header_matches(block: bytes, name: str, size: int, plain: bool) -> bool:
    """Whether ``block`` (the 512 bytes before a member's data) is the tar header of member ``name`` of ``size`` bytes.

    A stale offset index (its tar rewritten since, at the same size) points into
    other members' bytes, where no header names this member. ``plain``: no
    extended header (a long name's, pax's) comes before this one, so it holds
    the whole name (ustar: prefix and name) and the size, compared byte for
    byte (two slices, no parse); otherwise the name is in the extended header,
    and the block must be a ustar header (GNU's or POSIX's: the formats with
    extended headers) with a valid checksum, of the size. Not a full parse
    (``TarInfo.frombuf``): webdataset's and Python's writers put a pax header
    before every member, and the parse cost 50-65 us a member.
    """
    if len(block) != tarfile.BLOCKSIZE:
        return False
    try:
        stored_size = tarfile.nti(block[124:136])
        if plain:
            if stored_size != size:
                return False
            stored = block[:100].split(b"\0", 1)[0]
            if block[257:263] == b"ustar\x00" and block[345] != 0:  # POSIX ustar: a long name's head in the prefix
                stored = block[345:500].split(b"\0", 1)[0] + b"/" + stored
            return stored == name.encode("utf-8", "surrogateescape")  # as tarfile decoded it for the index
        if block[257:262] != b"ustar" or tarfile.nti(block[148:156]) not in tarfile.calc_chksums(block):
            return False
    except (tarfile.HeaderError, UnicodeError):
        return False
    return stored_size == size or size >= 8**11  # a pax header holds sizes the octal field cannot


def image_suffix(data: bytes | None) -> str:
    """The member suffix for encoded image bytes, from their signature (``jpg`` where none is recognised)."""
    if data is not None and data.startswith(b"\x89PNG"):
        return "png"
    if data is not None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def write_tars(table: pa.Table, dir_url: str, rows_per_shard: int = 5000) -> list[str]:
    """Write contract rows as webdataset tars (``KEY.png``/``KEY.jpg``, ``KEY.txt``, ``KEY.cls``; nulls left out)
    named ``part-NNNNN.tar``, and commit them (replacing what ``dir_url`` held); returns their URLs.

    Raises:
        ValueError: a key that a webdataset reader would split differently (one with a ``.`` or a ``/``).
    """
    bad = [k for k in table.column("key").to_pylist() if k is None or "." in k or "/" in k]
    if bad:
        raise ValueError(f"{len(bad)} keys cannot name tar members (first: {bad[0]!r}): a webdataset key has no "
                         "'.' or '/'; write parquet shards instead")
    storage.begin_output(dir_url, replace=True)
    names = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row in table.slice(start, rows_per_shard).to_pylist():
                for suffix, data in ((image_suffix(row["image"]), row["image"]),
                                     ("txt", None if row.get("caption") is None else row["caption"].encode()),
                                     ("cls", None if row.get("label") is None else f"{row['label']}\n".encode())):
                    if data is not None:
                        info = tarfile.TarInfo(f"{row['key']}.{suffix}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        names.append(f"part-{i:05d}.tar")
        storage.write_bytes(buf.getvalue(), storage.join(dir_url, names[-1]))
    storage.commit_output(dir_url, names, table.num_rows)
    return [storage.join(dir_url, n) for n in names]
