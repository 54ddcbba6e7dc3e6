"""Paths are URLs: local folders, ``file://``, ``s3://`` and ``gs://``, one module.

Object-store access goes through pyarrow's filesystems (the same objects Ray
Data takes as ``filesystem=``), so retries, multipart uploads and credentials
follow the AWS/GCS SDKs' standard chains: environment variables, the shared
config files, instance roles. An S3-compatible store (MinIO, Ceph, a loopback
test server) is named by ``AWS_ENDPOINT_URL`` or the jobs' ``--s3-endpoint``; a
GCS emulator by ``STORAGE_EMULATOR_HOST``, as for Google's client libraries.

Writes are atomic. A single file is written under a temporary name and moved
into place (local), or uploaded as one object that appears only when complete
(object stores).

Every output a job writes (a dataset, a split's shards, scores, a run folder,
a checkpoint folder, a report) is a folder with one commit protocol:
:func:`begin_output` marks it ``_PENDING``, the writer fills it, and
:func:`commit_output` writes the ``_SUCCESS`` manifest (its files) and drops
the mark. :func:`is_complete` is the one "is it done" check (the demo's reuse
test); readers refuse a pending folder, so one whose writer died reads as
incomplete rather than as a smaller dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SUCCESS, PENDING = "_SUCCESS", "_PENDING"
# Object-store requests are retried by the SDK with exponential backoff; ten
# tries ride out the throttling and dropped connections of a busy bucket.
# AWS_MAX_ATTEMPTS, the AWS SDKs' own setting, overrides it.
S3_MAX_ATTEMPTS = 10
# The AWS C++ SDK reports an error answer to a small ranged GET (its XML body
# overflows the read buffer) as this non-retryable failure; such reads are
# retried here (apache/arrow and apache/doris have hit the same).
_TRANSIENT_READ_ERRORS = ("Failed to flush response stream",)
READ_ATTEMPTS = 5


class InputError(RuntimeError):
    """An input file or folder cannot be read; the message names it and what to do."""


def configure_s3(endpoint: str | None) -> None:
    """Point every later S3 access, in this process and the Ray workers it starts, at ``endpoint``.

    Call before ``ray.init()``: workers inherit the driver's environment.
    """
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps its retry strategy when pickled.

    Ray ships the filesystem to its read and write tasks by pickling it, and
    pyarrow's own pickling drops the retry strategy (workers would fall back
    to pyarrow's default of 3 attempts).
    """

    def __init__(self, max_attempts: int, **kwargs):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kwargs)
        self.max_attempts = max_attempts

    def __reduce__(self):
        return _rebuild_s3, (self.max_attempts, super().__reduce__()[1][0])


def _rebuild_s3(max_attempts: int, kwargs: dict) -> _S3FileSystem:
    return _S3FileSystem(max_attempts, **kwargs)


def _s3_filesystem() -> pafs.S3FileSystem:
    kwargs = {}
    # Unset, the AWS SDK resolves the region as the AWS CLI does: the profile's (AWS_PROFILE, else default) in
    # the shared config file (~/.aws/config, AWS_CONFIG_FILE), the EC2 instance's, else us-east-1; with an
    # endpoint override (MinIO, a loopback server) too, whose requests are signed for the region resolved.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return _S3FileSystem(int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS), **kwargs)


def _gcs_filesystem() -> pafs.GcsFileSystem:
    # STORAGE_EMULATOR_HOST names a local GCS emulator (fake-gcs-server,
    # gcp-storage-emulator), as it does for Google's own client libraries.
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        parsed = urlparse(host if "://" in host else f"http://{host}")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.GcsFileSystem(retry_time_limit=None)


def retry_reads(read):
    """Call ``read()``, again after a backoff when the object store's answer was a transient error."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except OSError as exc:
            if attempt == READ_ATTEMPTS - 1 or not any(m in str(exc) for m in _TRANSIENT_READ_ERRORS):
                raise
            time.sleep(0.1 * 2**attempt)


def filesystem_for(url: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``url`` and the path inside it."""
    parsed = urlparse(str(url))
    if parsed.scheme == "s3":
        return _s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("gs", "gcs"):
        return _gcs_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else str(url)
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    return pafs.FileSystem.from_uri(str(url))


def is_local(url: str) -> bool:
    return urlparse(str(url)).scheme in ("", "file")


def parent(url: str) -> str | None:
    """The folder that holds ``url``: a URL's in its store, a local path's made absolute (a relative path's
    parent is a real folder too); None for a bucket (``s3://bucket``) or the filesystem's root."""
    parsed = urlparse(str(url))
    if parsed.scheme in ("", "file"):
        path = os.path.abspath(os.path.expanduser(parsed.path if parsed.scheme == "file" else str(url)))
        up = os.path.dirname(path)
        if up == path:
            return None
        return f"file://{up}" if parsed.scheme == "file" else up
    return str(url).rstrip("/").rpartition("/")[0] if parsed.path.strip("/") else None


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/``."""
    out = str(url).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def contains(outer: str, inner: str) -> bool:
    """Whether ``inner`` is the folder ``outer`` or lies inside it (URLs or local paths, any spelling)."""
    def where(url: str) -> tuple[str, str]:
        parsed = urlparse(str(url))
        scheme = {"": "file", "gcs": "gs"}.get(parsed.scheme, parsed.scheme)
        path = filesystem_for(url)[1] if scheme == "file" else f"{parsed.netloc}{parsed.path}".rstrip("/")
        return scheme, path

    (outer_scheme, outer_path), (inner_scheme, inner_path) = where(outer), where(inner)
    return outer_scheme == inner_scheme and (inner_path + "/").startswith(outer_path.rstrip("/") + "/")


def exists(url: str) -> bool:
    fs, path = filesystem_for(url)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_folder(url: str) -> bool:
    """Whether ``url`` is a folder (on an object store: a prefix with objects under it)."""
    fs, path = filesystem_for(url)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _makedirs(fs: pafs.FileSystem, path: str) -> None:
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)


def write_bytes(data: bytes, url: str) -> None:
    """Write ``data`` to ``url`` atomically."""
    fs, path = filesystem_for(url)
    _makedirs(fs, path)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        # An object upload becomes visible only when it completes.
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem_for(url)
    try:
        return retry_reads(lambda: _read_all(fs, path))
    except FileNotFoundError as exc:
        raise InputError(f"{url}: no such file") from exc


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    # compression=None: the bytes as stored, even for a ``.gz`` name.
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def remove(url: str) -> None:
    """Delete the file or folder (with its content) at ``url``; nothing there is not an error."""
    fs, path = filesystem_for(url)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type != pafs.FileType.NotFound:
        fs.delete_file(path)


def write_json(obj, url: str) -> None:
    write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), url)


def read_json(url: str):
    return json.loads(read_bytes(url))


def write_table(table: pa.Table, url: str) -> None:
    """Write one parquet file atomically."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    write_bytes(buf.getvalue().to_pybytes(), url)


def begin_output(dir_url: str, replace: bool = False) -> None:
    """Mark ``dir_url`` as being written: readers refuse it until :func:`commit_output`.

    ``replace``: the folder is wholly this writer's (a split's shards, a score table), and what an earlier
    output left in it goes first: a re-run that writes fewer files would leave the rest there, outside the
    manifest, where readers that do not follow it (pandas, Spark, Ray Data on the folder) read them as rows.
    """
    if replace:
        remove(dir_url)
    fs, path = filesystem_for(dir_url)
    fs.create_dir(path, recursive=True)
    if fs.get_file_info(join(path, SUCCESS)).type != pafs.FileType.NotFound:
        fs.delete_file(join(path, SUCCESS))
    write_bytes(b"", join(dir_url, PENDING))


def commit_output(dir_url: str, files: list[str] | None = None, rows: int | None = None) -> None:
    """Commit ``dir_url``: its ``_SUCCESS`` manifest names its content, then the pending mark goes.

    Args:
        files: names relative to ``dir_url``; default: every top-level entry
            not starting with ``_`` or ``.`` (a job's staging).
        rows: the row count, for folders of shards.
    """
    fs, path = filesystem_for(dir_url)
    if files is None:
        # The first part of every path under it: a store's listing of one level may leave out folders that
        # exist only as prefixes of objects (as GCS's emulator does), a recursive one names their objects.
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = {info.path[len(path):].lstrip("/").split("/")[0] for info in found}
        files = [name for name in files if name and not name.startswith(("_", "."))]
    manifest = {"files": sorted(files)}
    if rows is not None:
        manifest["rows"] = int(rows)
    write_json(manifest, join(dir_url, SUCCESS))
    if fs.get_file_info(join(path, PENDING)).type != pafs.FileType.NotFound:
        fs.delete_file(join(path, PENDING))


@contextmanager
def output(dir_url: str):
    """``with output(url): write...``: :func:`begin_output`, then :func:`commit_output` if the block succeeds."""
    begin_output(dir_url)
    yield dir_url
    commit_output(dir_url)


def is_complete(dir_url: str) -> bool:
    """Whether ``dir_url`` is an output whose writer committed it (:func:`commit_output`).

    Another writer's ``_SUCCESS`` (Spark's empty marker) counts too: its writer finished. Whether the
    folder holds mmdp's manifest (its files and row count) is :func:`manifest`'s answer. A folder with a
    ``_PENDING`` mark beside its ``_SUCCESS`` (a writer stopped between the two steps of
    :func:`commit_output`, or a store that let it write but not delete) is not: readers refuse it too.
    """
    return exists(join(dir_url, SUCCESS)) and not exists(join(dir_url, PENDING))


def manifest(dir_url: str) -> dict | None:
    """The manifest :func:`commit_output` wrote in ``dir_url`` (``files``, and ``rows`` for shards), or None.

    None where there is no ``_SUCCESS``, or where it is another writer's: Spark, Hadoop, Glue and EMR leave
    an empty one beside their ``part-*`` files, the Hadoop S3A committers a JSON one of their own (no
    ``files`` list). Such a folder was committed, and is a plain folder of data files to read.
    """
    url = join(dir_url, SUCCESS)
    if not exists(url):
        return None
    return _mmdp_manifest(read_bytes(url))


def _mmdp_manifest(data: bytes) -> dict | None:
    """``data`` parsed, where it is a manifest :func:`commit_output` wrote; else None."""
    try:
        parsed = json.loads(data)
    except ValueError:  # empty (Spark's marker), not JSON, not UTF-8
        return None
    files = parsed.get("files") if isinstance(parsed, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return parsed


def check_not_pending(dir_url: str) -> None:
    """Refuse an output whose writer has not committed it (still running, or died).

    Raises:
        InputError: naming the folder and what to do.
    """
    if exists(join(dir_url, PENDING)):
        raise InputError(f"{dir_url}: incomplete output (its writer stopped before committing); "
                         "rerun the job that writes it")


def write_shards(table: pa.Table, dir_url: str, rows_per_shard: int = 5000) -> list[str]:
    """Write ``table`` as ``part-NNNNN.parquet`` shards and commit them (replacing what ``dir_url`` held).

    Returns:
        The URLs of the shards written.
    """
    begin_output(dir_url, replace=True)
    names = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        name = f"part-{i:05d}.parquet"
        write_table(table.slice(start, rows_per_shard), join(dir_url, name))
        names.append(name)
    commit_output(dir_url, names, table.num_rows)
    return [join(dir_url, n) for n in names]


def list_files(url: str, suffixes: tuple[str, ...] = (".parquet",), others: tuple[str, ...] | None = None) -> list[str]:
    """The data files of a folder (or the file itself, whatever its name: it was named), sorted, from one listing.

    A folder committed by :func:`commit_output` lists exactly its manifest;
    one still marked pending, inside a folder marked pending, or holding a
    subfolder marked pending, is refused; any other folder (one another writer committed included: Spark's empty
    ``_SUCCESS`` is no manifest, :func:`manifest`) lists every file
    with a matching suffix, skipping hidden and ``_``-prefixed names (and in
    a subfolder :func:`commit_output` committed, what its manifest lists). With
    ``others`` (the suffixes of files that may sit beside the data files),
    such a folder's every other file is an error naming it, so a stray or
    misnamed data file is never skipped unnoticed.

    Raises:
        InputError: the URL does not exist, is an uncommitted output, holds no data files, or (with
            ``others``) holds a file that is neither.
    """
    fs, path = filesystem_for(url)
    up, name = parent(url), str(url).rstrip("/").rpartition("/")[2]
    # A part of a job's output (scores/ of the score job) is only as complete
    # as the output it belongs to; ``_``-names are the writer's own staging.
    if up is not None and not name.startswith("_") and exists(join(up, PENDING)):
        raise InputError(f"{url}: part of an incomplete output ({up} is not committed); rerun the job that writes it")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{url}: no such file or folder")
    if info.type == pafs.FileType.File:
        return [str(url)]
    check_not_pending(url)  # with a manifest too: a commit that stopped before its pending mark went
    committed = manifest(url)
    if committed is not None:
        return [join(url, name) for name in committed["files"] if name.endswith(suffixes)]
    selector = pafs.FileSelector(path, recursive=True)
    entries = [entry.path[len(path):].lstrip("/") for entry in fs.get_file_info(selector)
               if entry.type == pafs.FileType.File]
    # A subfolder a job writes (its pending mark, or its manifest) is read as its writer left it: refused
    # while pending, its manifest's files alone once committed (a stray file beside them is not data).
    marks = [rel.rpartition("/") for rel in entries
             if "/" in rel and not any(p.startswith(("_", ".")) for p in rel.split("/")[:-1])]
    pending = sorted(folder for folder, _, name in marks if name == PENDING)
    if pending:
        raise InputError(f"{join(url, pending[0])}: incomplete output (its writer stopped before committing), "
                         f"inside {url}; rerun the job that writes it, or move it out of the folder")
    committed_in = {}  # subfolder -> the entries its manifest lists (files, or folders: a job's whole output)
    for folder in sorted({folder for folder, _, name in marks if name == SUCCESS}):
        files = (manifest(join(url, folder)) or {}).get("files")
        if files is not None:
            committed_in[folder] = set(files)

    def listed(rel: str) -> bool:  # by the manifest of every committed folder on the way to it
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            names = committed_in.get("/".join(parts[:depth]))
            if names is not None and not any("/".join(parts[depth:end]) in names for end in range(depth + 1,
                                                                                             len(parts) + 1)):
                return False
        return True

    found = []
    for rel in entries:
        if any(p.startswith(("_", ".")) for p in rel.split("/")):
            continue
        if not listed(rel):
            continue
        if rel.endswith(suffixes):
            found.append(join(url, rel))
        elif others is not None and not rel.endswith(others):
            kinds = " or ".join(s.lstrip(".") for s in suffixes)
            raise InputError(f"{join(url, rel)}: not a {kinds} file; move it out of the folder")
    if not found:
        raise InputError(f"{url}: no {'/'.join(suffixes)} files in this folder")
    return sorted(found)


def unreadable_parquet(file_url: str, exc: Exception) -> InputError:
    return InputError(f"{file_url}: not a readable parquet file ({exc}); remove it from the input folder or rewrite it")


def read_table(url: str, columns: list[str] | None = None) -> pa.Table:
    """Read one parquet file, or every shard of a folder, into one table.

    Raises:
        InputError: naming the first file that is not readable parquet.
    """
    tables = []
    for file_url in list_files(url):
        fs, path = filesystem_for(file_url)
        try:
            tables.append(retry_reads(lambda: pq.read_table(path, filesystem=fs, columns=columns)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise unreadable_parquet(file_url, exc) from exc
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def fetch_to_cache(url: str, cache_dir: str | None = None) -> str:
    """A local path for ``url``: the path itself when local, else a cached download.

    The cache holds one copy per URL (under ``cache_dir``, ``MMDP_CACHE`` or
    ``~/.cache/mmdp``) and, beside it, the version of the object it was
    downloaded from: an object overwritten since (a checkpoint re-trained into
    the same folder) is downloaded again; an unchanged one is not.

    Raises:
        InputError: no object at ``url``.
    """
    if is_local(url):
        return filesystem_for(url)[1]
    root = Path(cache_dir or os.environ.get("MMDP_CACHE", Path.home() / ".cache" / "mmdp"))
    target = root / hashlib.sha256(str(url).encode()).hexdigest()[:16] / os.path.basename(urlparse(url).path)
    version_file = target.with_name(target.name + ".version.json")
    version = _remote_version(url)
    if target.exists() and version_file.exists() and json.loads(version_file.read_text()) == version:
        return str(target)
    write_bytes(read_bytes(url), str(target))
    # After the bytes: a failed download leaves the old bytes under their old version.
    write_json(version, str(version_file))
    return str(target)


def _remote_version(url: str) -> dict:
    """What tells one content of the object at ``url`` from another: its size and modification time,
    and on S3 its ETag (S3's times are whole seconds: two same-size uploads within one differ by ETag only).

    Raises:
        InputError: no object at ``url``.
    """
    fs, path = filesystem_for(url)
    info = retry_reads(lambda: fs.get_file_info(path))
    if info.type != pafs.FileType.File:
        raise InputError(f"{url}: no such file")
    version = {"size": info.size, "mtime_ns": info.mtime_ns}
    if isinstance(fs, pafs.S3FileSystem):
        version["etag"] = retry_reads(lambda: _etag(fs, path))
    return version


def _etag(fs: pafs.S3FileSystem, path: str) -> str:
    # Opening reads the object's metadata (a HEAD request); the body is never requested.
    with fs.open_input_file(path) as f:
        return f.metadata().get("ETag", b"").decode()
