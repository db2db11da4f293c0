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
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raysegment import storage
from raysegment.inference import resume
from raysegment.inference.output import ARCHIVES

_META = b"raysegment.archive"


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
        if not self.done_buckets:
            return frozenset()
        keys = self.members(archive)
        if keys is None:
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
