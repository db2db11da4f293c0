"""URIs to filesystems: the one place that builds storage clients.

A URI is a plain path, ``file://path`` or ``s3://bucket/prefix``. S3 follows the
AWS conventions: credentials from the standard chain (env, profile, instance
role), endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (or a job
spec's ``endpoint_url``), region from ``AWS_REGION``. Credentials are never
passed explicitly, so a pickled filesystem (shipped to Ray workers) carries no
secrets: every process finds its own through the chain.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import stat
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysegment.errors import DataError, StorageError

SUCCESS = "_SUCCESS"
# How long object-storage operations keep retrying transient failures (endpoint down,
# connection reset, 5xx, throttling) before the job fails; a job spec can set its own.
RETRY_ENV = "RAYSEGMENT_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 120.0

log = logging.getLogger(__name__)
T = TypeVar("T")


def endpoint_from_env() -> str | None:
    """The S3 endpoint the AWS SDKs would use, from the environment."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def is_remote(uri: str) -> bool:
    """True for object-store URIs (s3://)."""
    return uri.startswith(("s3://", "s3a://"))


def join(uri: str, *parts: str) -> str:
    """Join URI path segments with '/', whatever the scheme."""
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


NOT_UTF8 = "file name is not UTF-8 text (shown with \\xNN for its bytes): rename it (e.g. convmv -t utf8)"


def utf8_name(path: str) -> tuple[str, bool]:
    """(path as UTF-8 text, whether it already was one). A local file name in another encoding reaches
    Python with its bad bytes as surrogates (PEP 383), which Parquet, JSON and hashing refuse: such a
    name is shown with \\xNN escapes, and the file is refused (`NOT_UTF8`), never read under a changed name."""
    try:
        path.encode("utf-8")
        return path, True
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), False


def file_path(uri: str) -> str:
    """A `file:` URI's local path, anything else as it is. `file:///P` and `file://localhost/P` are RFC 8089's
    absolute /P, percent-encoded as `Path.as_uri()` writes them (`a%20b.png` is `a b.png`); `file://P` is
    raysegment's own shorthand for the path P, taken literally."""
    head, sep, rest = uri.partition("://")
    if head.lower() != "file" or not sep:
        return uri
    if rest[:10].lower() == "localhost/":
        rest = rest[len("localhost") :]
    return urllib.parse.unquote(rest, errors="surrogateescape") if rest.startswith("/") else rest


def within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (normalised paths: local, or keys of one store)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def beside(entry: str, folder: str) -> str:
    """A list file's entry as a URI or absolute local path: relative entries lie below `folder`, the
    list file's own folder, wherever the command runs (prepare's pair lists and infer's URI lists)."""
    entry = file_path(entry)
    if "://" in entry or entry.startswith("/"):
        return entry
    scheme, sep, rest = folder.partition("://")
    if not sep:
        return posixpath.normpath(posixpath.join(folder, entry))
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, entry))}"


@dataclass(frozen=True)
class Location:
    """A resolved URI: the fsspec filesystem and the path it understands."""

    uri: str
    fs: fsspec.AbstractFileSystem
    path: str
    endpoint_url: str | None = None
    retry_s: float | None = None  # None: $RAYSEGMENT_STORAGE_RETRY_S, else DEFAULT_RETRY_S

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    def child(self, *parts: str) -> Location:
        """The location of a path below this one."""
        return Location(join(self.uri, *parts), self.fs, join(self.path, *parts), self.endpoint_url, self.retry_s)

    def call(self, fn: Callable[[], T]) -> T:
        """Run one storage operation on this location (see `call`)."""
        return call(self, fn)

    def arrow_fs(self) -> pafs.FileSystem:
        """A pyarrow filesystem for Ray Data and Parquet (paths as in ``self.path``)."""
        if not self.remote:
            return pafs.LocalFileSystem()
        # pyarrow's own S3FileSystem ignores AWS_ENDPOINT_URL (Arrow #49643); wrapping
        # s3fs keeps one client configuration for every reader and writer.
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))


def resolve(uri: str, endpoint_url: str | None = None, retry_s: float | None = None) -> Location:
    """Turn a URI into a Location; raises StorageError for unsupported schemes."""
    if not uri:
        raise StorageError("empty URI: give a local path, file://path or s3://bucket/prefix")
    uri = file_path(uri)
    # Fixed here, in the process that resolves: tasks on other nodes get the driver's deadline
    # (also from a local location, e.g. a local URI list that names s3:// images).
    if retry_s is None:
        retry_s = float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))
    if "://" not in uri:
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(path, fsspec.filesystem("file"), path, retry_s=retry_s)
    scheme = uri.split("://", 1)[0]
    if scheme not in ("s3", "s3a"):
        raise StorageError(f"{uri}: unsupported scheme '{scheme}://'; use a local path or s3://bucket/prefix")
    rest = uri.split("://", 1)[1].rstrip("/")
    if not rest or rest.startswith("/"):
        raise StorageError(f"{uri}: no bucket name; write s3://bucket/prefix")
    if "@" in rest.split("/", 1)[0]:
        raise StorageError(f"{redact(uri)}: credentials in the URI are not allowed; use AWS_* env vars or a profile")
    endpoint = endpoint_url or endpoint_from_env()
    return Location(f"s3://{rest}", _s3fs(endpoint, retry_s), rest, endpoint, retry_s)


def redact(uri: str) -> str:
    """Hide a user:secret@ part of a URI."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def _s3fs(endpoint_url: str | None, retry_s: float) -> fsspec.AbstractFileSystem:
    from raysegment.s3client import BoundedS3FileSystem

    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if os.environ.get("AWS_REGION"):
        client_kwargs["region_name"] = os.environ["AWS_REGION"]
    # Fail fast on an unreachable endpoint instead of botocore's long default retries.
    config_kwargs = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
    # No instance cache: a cached client would keep credentials found under an older environment.
    return BoundedS3FileSystem(
        client_kwargs=client_kwargs,
        config_kwargs=config_kwargs,
        skip_instance_cache=True,
        attempt_timeout_s=min(120.0, max(10.0, retry_s)),
    )


_NO_BUCKET = ("nosuchbucket", "bucket does not exist")
_BAD_CREDENTIALS = (
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "nocredentials",
    "unable to locate credentials",
    "accessdenied",
    "access denied",
    "forbidden",
)
# Local ENOSPC/EDQUOT, and the QuotaExceeded code of S3 stores that have quotas (Ceph RGW, MinIO).
_NO_SPACE = ("no space left", "disk quota exceeded", "quotaexceeded", "quota exceeded")
_UNREACHABLE = (
    "could not connect",
    "connect timeout",
    "connection refused",
    "endpointconnectionerror",
    "cannot connect",
    "name or service not known",
)


def _blocking_file(path: str) -> str:
    """The file that stands in the way of a folder at `path`: `path` or the nearest ancestor that exists."""
    while path and not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def describe_error(uri: str, exc: BaseException) -> str:
    """One line naming the URI, what went wrong and how to fix it."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    remote = is_remote(uri)
    if any(s in low for s in _NO_BUCKET):
        return f"{uri}: bucket does not exist; create it or fix the URI"
    if any(s in low for s in _NO_SPACE):
        return f"{uri}: out of space or over quota; free space, raise the quota or write elsewhere"
    if any(s in low for s in _BAD_CREDENTIALS) or (remote and isinstance(exc, PermissionError)):
        return (
            f"{uri}: access denied or bad credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) to credentials that can use this bucket"
        )
    if any(s in low for s in _UNREACHABLE):
        return f"{uri}: storage endpoint unreachable ({endpoint_from_env() or 'AWS default'}); check AWS_ENDPOINT_URL and the network"
    if isinstance(exc, FileNotFoundError):
        return f"{uri}: not found; check the path"
    if not remote and isinstance(exc, (FileExistsError, NotADirectoryError)):
        # makedirs over a file: OUTPUT or DEST (or a folder on the way to it) is a plain file.
        where = _blocking_file(str(getattr(exc, "filename", None) or uri))
        return f"{uri}: {where} is a file where a folder is needed; give a folder path"
    if not remote and isinstance(exc, IsADirectoryError):
        return f"{uri}: is a folder where a file is needed; give a file path"
    if type(exc).__name__ == "FSTimeoutError":
        return f"{uri}: the store accepted the request but did not answer in time; check that it is healthy"
    if isinstance(exc, PermissionError):
        return f"{uri}: permission denied; check the path's permissions"
    return f"{uri}: storage error ({text.splitlines()[0][:300]})"


_TRANSIENT = (
    *_UNREACHABLE,
    "connection reset",
    "connection aborted",
    "broken pipe",
    "server disconnected",
    "serverdisconnected",
    "read timeout",
    "timed out",
    "fstimeouterror",  # an attempt past ATTEMPT_TIMEOUT_S
    "slowdown",
    "serviceunavailable",
    "service unavailable",
    "internalerror",
    "internal error",  # s3fs turns an InternalError (HTTP 500) into OSError(EREMOTEIO, message)
    "bad gateway",
    "gateway timeout",
)


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: the store is unreachable or overloaded, not wrong about the request."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if any(s in text for s in (*_NO_BUCKET, *_BAD_CREDENTIALS, *_NO_SPACE)) or isinstance(exc, FileNotFoundError):
        return False
    return any(s in text for s in _TRANSIENT)


def retry_seconds(loc: Location) -> float:
    if loc.retry_s is not None:
        return loc.retry_s
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


def call(loc: Location, fn: Callable[[], T]) -> T:
    """Run a storage operation; one clear StorageError on failure.

    On object storage, transient failures are retried with exponential backoff
    (0.5 s doubling to 8 s) for the location's retry deadline, counted from the first
    failure: an attempt that timed out on a loaded machine is retried even when the
    timeout outlasted a short deadline. Past it the error says so and is marked
    ``transient``, so callers fail the job instead of recording a good input as bad.
    """
    deadline: float | None = None
    delay, attempts = 0.5, 0
    while True:
        try:
            with storage_errors(loc.uri):
                return fn()
        except StorageError as exc:
            cause = exc.__cause__
            if not (loc.remote and cause is not None and is_transient(cause)):
                raise
            if deadline is None:
                deadline = time.monotonic() + retry_seconds(loc)
            attempts += 1
            if time.monotonic() + delay > deadline:
                err = StorageError(
                    f"{exc} (still failing after {attempts} attempts over {retry_seconds(loc):.0f}s; "
                    f"set {RETRY_ENV} or the job's storage_retry_s to wait longer)"
                )
                err.transient = True
                raise err from cause
            log.warning("%s: transient storage error, retrying in %.1fs (%s)", loc.uri, delay, cause)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Re-raise storage failures as one clear StorageError naming the URI."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise StorageError(describe_error(redact(uri), exc)) from exc
    except Exception as exc:  # botocore/aiobotocore errors have no common stdlib base
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "aiohttp"):
            raise StorageError(describe_error(redact(uri), exc)) from exc
        raise


def exists(loc: Location) -> bool:
    return call(loc, lambda: loc.fs.exists(loc.path))


def read_bytes(loc: Location) -> bytes:
    return call(loc, lambda: loc.fs.cat_file(loc.path))


def _local_tmp(path: str) -> str:
    """A temporary name beside path: same folder, so the rename is atomic; short, so a legal
    255-byte file name does not become an illegal temporary one."""
    return os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")


_NOT_FILES = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISLNK, "link"),
    (stat.S_ISCHR, "device"),
    (stat.S_ISBLK, "device"),
    (stat.S_ISFIFO, "pipe"),
    (stat.S_ISSOCK, "socket"),
)


def check_replaceable(loc: Location) -> None:
    """A local output path must be free or a plain file: a file is written beside it and renamed over it, which
    would replace a device (`--out /dev/stdout`, a link, replaced as root by a plain file for every program on
    the machine), a pipe or a link with a plain file, and fail on a folder with a message about a temporary
    name. One clear error instead, before the write (before the work, for `staged_file`)."""
    if loc.remote:
        return
    with storage_errors(loc.uri):
        try:
            mode = os.lstat(loc.path).st_mode
        except FileNotFoundError:
            return
    for test, kind in _NOT_FILES:
        if test(mode):
            raise StorageError(
                f"{loc.uri}: is a {kind}, not a file; give a file path (outputs replace a file whole, and never a {kind})"
            )


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole file so that a reader sees either nothing or all of it."""
    if loc.remote:
        # One PUT is atomic on S3: the object appears whole or not at all.
        call(loc, lambda: loc.fs.pipe_file(loc.path, data))
        return
    check_replaceable(loc)
    with storage_errors(loc.uri):
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        tmp = _local_tmp(loc.path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, loc.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def staged_file(loc: Location) -> Iterator[str]:
    """A local path to write a large file to; on a clean exit it appears at loc whole, never partly."""
    if loc.remote:
        fd, tmp = tempfile.mkstemp(prefix="raysegment-", suffix=posixpath.basename(loc.path))
        os.close(fd)
    else:
        check_replaceable(loc)
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        tmp = _local_tmp(loc.path)
    try:
        yield tmp
        if loc.remote:
            # One upload (multipart for large files): S3 shows the object only once it is complete.
            call(loc, lambda: loc.fs.put_file(tmp, loc.path))
        else:
            with storage_errors(loc.uri):
                os.replace(tmp, loc.path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def upload_file(local_path: str, loc: Location) -> None:
    """Copy a local file to a location, atomically as write_bytes does."""
    if loc.remote:
        call(loc, lambda: loc.fs.put_file(local_path, loc.path))
        return
    with open(local_path, "rb") as f:
        write_bytes(loc, f.read())


def download_file(loc: Location, local_path: str) -> None:
    call(loc, lambda: loc.fs.get_file(loc.path, local_path))


def read_json(loc: Location) -> Any:
    data = read_bytes(loc)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{loc.uri}: not valid JSON ({exc})") from exc


def write_json(loc: Location, obj: Any) -> None:
    write_bytes(loc, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def mark_success(loc: Location, info: dict[str, Any] | None = None) -> None:
    """Write the _SUCCESS marker under a directory: the last write of a complete output."""
    write_json(loc.child(SUCCESS), info or {})


def has_success(loc: Location) -> bool:
    return exists(loc.child(SUCCESS))


def remove_success(loc: Location) -> None:
    """Drop a stale marker before rewriting an output, so a partial rewrite never looks complete."""
    marker = loc.child(SUCCESS)

    def remove() -> None:
        if loc.fs.exists(marker.path):
            loc.fs.rm_file(marker.path)

    call(marker, remove)


def remove_tree(loc: Location) -> None:
    def remove() -> None:
        if loc.fs.exists(loc.path):
            loc.fs.rm(loc.path, recursive=True)

    call(loc, remove)


def check_readable(loc: Location) -> None:
    """Fail early, with a clear message, when a URI cannot be read."""

    def check() -> None:
        if not loc.fs.exists(loc.path):
            raise FileNotFoundError(loc.path)

    call(loc, check)


def check_writable(loc: Location) -> None:
    """Fail early when the output cannot be written: probe with a tiny object."""
    probe = loc.child(f".write-probe-{uuid.uuid4().hex}")

    def write_probe() -> None:
        if not loc.remote:
            os.makedirs(loc.path, exist_ok=True)
        loc.fs.pipe_file(probe.path, b"")
        loc.fs.rm_file(probe.path)

    call(loc, write_probe)


def parquet_files(loc: Location) -> list[str]:
    """Paths of every Parquet file under a location (recursive, sorted); none if it does not exist."""

    def find() -> list[str]:
        if not loc.fs.exists(loc.path):
            return []
        return sorted(p for p in loc.fs.find(loc.path) if p.endswith(".parquet"))

    return call(loc, find)


DAMAGED_FIX = "restore it, or delete it so that what it recorded is redone"

# Every Parquet file raysegment writes carries a CRC per page, and every read of one checks them: a file
# damaged in place (same size, some bytes changed) fails as damaged instead of giving other data (a
# training image decoded from damaged PNG bytes, 8% of its pixels changed, was trained on as labelled).
# Files written without checksums (before these) read as before.
PAGE_CHECKSUMS: dict[str, Any] = {"write_page_checksum": True}
VERIFY_PAGES: dict[str, Any] = {"page_checksum_verification": True}


def failed_checksum(exc: BaseException) -> bool:
    """Whether pyarrow refused a page for its CRC (a plain OSError: not a storage failure, which keeps its type)."""
    return type(exc) is OSError and "checksum verification failed" in str(exc)


def read_table(loc: Location, path: str, columns: list[str] | None = None, fix: str = DAMAGED_FIX) -> pa.Table:
    """One Parquet file (a path inside loc's filesystem, as `parquet_files` gives); a damaged one (cut short,
    emptied, overwritten) is a DataError naming it and `fix`, not pyarrow's traceback."""
    data = call(loc, lambda: loc.fs.cat_file(path))
    try:
        return pq.read_table(io.BytesIO(data), columns=columns, **VERIFY_PAGES)
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid: not Parquet, or cut short; OSError: a page's CRC
        raise damaged_parquet(loc, path, exc, fix) from exc


def damaged_parquet(loc: Location, path: str, exc: Exception, fix: str = DAMAGED_FIX) -> DataError:
    """The error for a Parquet file (a path inside loc's filesystem) that pyarrow cannot read: its URI and `fix`."""
    uri = redact(f"s3://{path}" if loc.remote else path)
    return DataError(f"{uri}: damaged Parquet file ({str(exc)[:120]}); {fix}")


def folders(loc: Location) -> list[str]:
    """Names of the folders directly under a location (S3: the common prefixes), sorted; none if it does not exist."""

    def ls() -> list[str]:
        if not loc.fs.exists(loc.path):
            return []
        entries = loc.fs.ls(loc.path, detail=True, refresh=True)  # not a listing cached before tonight's writes
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")

    return call(loc, ls)


def remove_children(loc: Location, keep: str) -> None:
    """Remove everything directly under a location but its child named `keep`: never the location itself,
    whatever the listing returns (S3 lists a zero-byte `folder/` marker object among the children, as the
    folder's own path with a slash), nor anything outside it. Paths are compared whole, not by basename."""
    base = loc.path.rstrip("/")

    def remove() -> None:
        if not loc.fs.exists(loc.path):
            return
        for entry in loc.fs.ls(loc.path, detail=False, refresh=True):
            name = entry.rstrip("/")
            child = name[len(base) + 1 :].split("/")[0] if name.startswith(base + "/") else ""
            if child and child != keep:
                loc.fs.rm(name, recursive=True)

    call(loc, remove)


def list_files(loc: Location, extensions: tuple[str, ...] | None = None) -> list[str]:
    """All file paths under a location (recursive), sorted; extensions are lower-case with a dot."""

    def find() -> list[str]:
        if not loc.fs.exists(loc.path):
            raise FileNotFoundError(loc.path)
        return loc.fs.find(loc.path)

    found = call(loc, find)
    if extensions:
        found = [p for p in found if posixpath.splitext(p)[1].lower() in extensions]
    return sorted(found)
