"""The member lists of input tar archives, kept under OUTPUT so a re-run need not read an archive
whose members are all done.

A tar archive's members are known only by reading it to the end, so without a record a resume
re-reads every archive (a no-op re-run of 1M images in 100 shards read 4.1 GB). The read task that
streamed an archive whole writes its member keys to `archives/{digest of its URI}.parquet`, with
the archive's size and version (S3 ETag, local mtime) in the footer. On a later run the read task
looks there first: when size and version still match and every member key is in the resume index,
the archive yields nothing and is not opened; otherwise it is streamed and its done members are
skipped, not extracted (resume.drop_done drops any the list missed). A member list is what the archive holds, not what was
done, so it is right whatever happened to the run that wrote it; a changed archive (new size or
version) is read again and its list rewritten. A damaged archive gets no list: it is read, and
reported, every time.

Archives are read as streams (`open_stream`) with what a read task holds bounded: inflated only as far as
tarfile reads, their headers held to MAX_TAR_HEADER_BYTES before tarfile reads them, no member kept once passed.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raysegment import storage
from raysegment.inference import resume
from raysegment.inference.output import ARCHIVES

_META = b"raysegment.archive"

# What tarfile may read to parse one member's headers (pax, GNU long name or link, sparse map): it reads each
# whole before the member is seen, and a run of one byte compresses about 1000:1 (a 1 MB .tar.gz held a 1000 MB
# pax header and took a read task to 3.1 GB). Real headers hold a path, a link target or a few attributes.
MAX_TAR_HEADER_BYTES = 1 << 20
# Global pax headers apply to every member after them and tarfile walks them all for each member (1 MiB of short
# records cost 80 ms a member); git archive writes one, of 52 bytes.
MAX_TAR_GLOBAL_BYTES = 16 << 10
# Headers chained in front of one member: tarfile reads each by recursion. Real ones chain up to three (a global
# pax header, then a pax header, or GNU long name and long link).
MAX_TAR_HEADER_CHAIN = 16
_REST = "the rest of the archive is not read"
_EXTENDED = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class TarHeaderError(tarfile.TarError):
    """A member's headers over the limits above, or damaged. Not a tarfile.HeaderError: mid-archive, tarfile
    takes one of those for the archive's end and stops without a word."""


class _HeaderReader:
    """The stream as tarfile sees it while it parses one member's headers: a read past what they may hold
    is refused before it is made."""

    def __init__(self, stream: Any, limit: int) -> None:
        self.stream, self.limit, self.left = stream, limit, limit

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self.left:
            raise TarHeaderError(
                f"a member's tar headers (pax, GNU long name or sparse map) hold over {self.limit / (1 << 20):g} MiB "
                f"(real ones hold a path or a few attributes: a decompression bomb or damage); {_REST}"
            )
        self.left -= size
        return self.stream.read(size)

    def __getattr__(self, name: str) -> Any:  # tell, seek
        return getattr(self.stream, name)


class _TarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
            if tar.offset == 0:
                raise  # not a tar at all: tarfile says so
            raise TarHeaderError(f"damaged tar header at byte {tar.offset} ({exc}); {_REST}") from None

    def _proc_member(self, tar: TarStream) -> tarfile.TarInfo:
        if self.type in _EXTENDED:
            tar.extended(self)
        return super()._proc_member(tar)


class TarStream(tarfile.TarFile):
    """A tar archive read as a stream (`open_stream`), its headers bounded and no member kept once passed: in
    stream mode tarfile keeps every TarInfo (1M empty members took 440 MB), and a stream cannot go back to one."""

    tarinfo = _TarInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.chain, self.global_bytes = 0, 0
        super().__init__(*args, **kwargs)  # reads the first member

    def next(self) -> tarfile.TarInfo | None:
        stream, self.chain = self.fileobj, 0
        self.fileobj = _HeaderReader(stream, MAX_TAR_HEADER_BYTES)
        try:
            member = super().next()
        except (ValueError, IndexError) as exc:  # tarfile parsing bad numbers of a sparse header
            raise TarHeaderError(f"damaged tar header ({type(exc).__name__}: {exc}); {_REST}") from exc
        finally:
            self.fileobj = stream
        self.members.clear()
        return member

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        while (member := self.next()) is not None:
            yield member

    def extended(self, header: tarfile.TarInfo) -> None:
        """Count a pax or GNU header in front of the member being read, before tarfile reads it."""
        self.chain += 1
        if self.chain > MAX_TAR_HEADER_CHAIN:
            raise TarHeaderError(f"over {MAX_TAR_HEADER_CHAIN} tar headers in front of one member; {_REST}")
        if header.type == tarfile.XGLTYPE:
            self.global_bytes += header.size
            if self.global_bytes > MAX_TAR_GLOBAL_BYTES:
                raise TarHeaderError(f"global pax headers over {MAX_TAR_GLOBAL_BYTES >> 10} KiB; {_REST}")


_HEAD = 10  # bytes that tell gzip, bzip2 and xz apart


class _Replayed:
    """A stream whose first bytes were read (to tell its compression) and are given again by read() before
    the rest: no seek, which a named pipe or another stream that cannot seek refuses. It offers no seek or
    tell either, so no reader can move the stream without the bytes put back."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream
        self.name = getattr(stream, "name", "")  # gzip.GzipFile names itself after it

    def read(self, size: int | None = -1) -> bytes:
        if not self.head:
            return self.stream.read(-1 if size is None else size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
        elif size <= len(self.head):
            data, self.head = self.head[:size], self.head[size:]
        else:
            data, self.head = self.head + self.stream.read(size - len(self.head)), b""
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


# TarStream and _TarInfo lean on tarfile internals that are not its public API (read in CPython 3.11's
# tarfile; main's still has them):
# - TarInfo._proc_member: called for every header, chained ones included; _TarInfo counts pax and GNU headers
#   there, before tarfile reads their bodies;
# - TarFile.fileobj: tarfile parses headers through it, so TarStream.next swaps in a _HeaderReader for the
#   parse (an extracted member's reader takes the stream itself, when extractfile is called);
# - TarFile.members (cleared by TarStream.next) and TarFile.offset (named in a damaged header's error);
# - _Stream.seek: skipping a member's data reads the stream itself, not through fileobj (so a big member is
#   not charged to the header limit).
# Were one renamed, the header chain and global-header limits would stop applying without a word: a CPython
# without them fails here, at import (not an assert: python -O would drop it).
_PROBE = bytes(2 * tarfile.BLOCKSIZE)  # an empty archive
with TarStream.open(fileobj=io.BytesIO(_PROBE), mode="r|") as _probe:
    _missing = [f"TarFile.{a}" for a in ("fileobj", "members", "offset") if not hasattr(_probe, a)]
if not callable(getattr(tarfile.TarInfo, "_proc_member", None)):
    _missing.append("TarInfo._proc_member")
if _missing:
    raise ImportError(
        f"this Python's tarfile lacks {', '.join(_missing)}, which raysegment's bounded tar reading relies on "
        "(raysegment.inference.archives); use a Python whose tarfile has them (3.11 does)"
    )
del _PROBE, _probe, _missing


# What streaming a damaged or cut archive raises (zlib and lzma errors are not OSErrors).
STREAM_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError)


@contextlib.contextmanager
def open_stream(f: Any) -> Iterator[TarStream]:
    """The tar archive `f` holds, streamed; gzip, bzip2 and xz are told by their first bytes, as tarfile's
    "r|*" tells them. Each is inflated only as far as it is read: tarfile's own stream inflated each 10 KB in
    one call whatever it held (323 bytes of .tar.bz2 at once to 780 MB), and copied what was left on each
    later read (skipping a 200 MB member of zeros took over 5 minutes). `f` need not seek: a named pipe is
    read as `cat` reads one (its first bytes are put back in front, `_Replayed`)."""
    head = b""
    while len(head) < _HEAD and (more := f.read(_HEAD - len(head))):
        head += more
    raw = _Replayed(head, f)
    inflated: Any
    if head.startswith(b"\x1f\x8b\x08"):
        inflated = gzip.GzipFile(fileobj=raw, mode="rb")
    elif head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        inflated = bz2.BZ2File(raw)
    elif head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        inflated = lzma.LZMAFile(raw)
    else:
        inflated = contextlib.nullcontext(raw)
    with inflated as stream, TarStream.open(fileobj=stream, mode="r|") as tar:
        yield tar


@dataclass(frozen=True)
class Archive:
    """One listed archive: what identifies this version of it."""

    uri: str
    size: int
    version: str

    def stamp(self) -> bytes:
        return f"{self.size}\n{self.version}\n{self.uri}".encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class MemberIndex:
    """Where member lists live (OUTPUT) and the resume index's bucket refs to check them against."""

    output: storage.Location
    done_buckets: list[Any]

    def location(self, archive: Archive) -> storage.Location:
        name = hashlib.blake2b(archive.uri.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
        return self.output.child(ARCHIVES, f"{name}.parquet")

    def members(self, archive: Archive) -> list[str] | None:
        """The member keys recorded for this version of the archive, else None (none recorded,
        unreadable, or the archive changed since)."""
        loc = self.location(archive)
        try:
            data = storage.read_bytes(loc)
        except storage.StorageError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None
            raise
        try:
            table = pq.read_table(io.BytesIO(data), **storage.VERIFY_PAGES)
        except (OSError, pa.ArrowException):
            return None  # a torn or foreign file: read the archive and write the list again
        if (table.schema.metadata or {}).get(_META) != archive.stamp():
            return None
        return table.column("key").to_pylist()

    def done_members(self, archive: Archive) -> frozenset[str] | None:
        """The archive's members that are done (empty: none known to be), or None when all are."""
        return self.done_among(self.members(archive) if self.done_buckets else None)

    def done_among(self, keys: list[str] | None) -> frozenset[str] | None:
        """Of an archive's recorded member keys, those done (empty: none known to be), or None when all are."""
        if not self.done_buckets or keys is None:
            return frozenset()
        done = resume.known(resume.digests(keys), self.done_buckets)
        if done.all():
            return None
        return frozenset(k for k, d in zip(keys, done) if d)

    def record(self, archive: Archive, keys: list[str]) -> None:
        """Write the archive's member list (after it was read to the end without damage)."""
        table = pa.table({"key": pa.array(keys, pa.string())}).replace_schema_metadata({_META: archive.stamp()})
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd", **storage.PAGE_CHECKSUMS)
        storage.write_bytes(self.location(archive), sink.getvalue())


def recorded(output: storage.Location) -> int:
    """How many member lists OUTPUT holds (for tests and the report)."""
    loc = output.child(ARCHIVES)
    return len(storage.list_files(loc, (".parquet",))) if storage.exists(loc) else 0
