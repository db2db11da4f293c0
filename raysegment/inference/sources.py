"""Inference sources: turn INPUT into a Ray dataset of (key, source_uri, bytes, error, collides) rows.

Kinds (``--source``, default ``auto``):
- ``files``: every image file under a prefix (recursive, extension filter, any case).
- ``tar``: every .tar / .tar.gz / .tgz under a prefix; each image member is a row
  keyed ``{archive path without extension}/{member path without extension}``.
- ``parquet``: Parquet tables with an image-bytes column (``--image-column``) and
  optionally a key column (``--key-column``).
- ``list``: a .txt file (one URI per line) or a Parquet file with a ``uri`` column.

Whatever the kind, a multi-page TIFF (a stack of slices) becomes one row per slice, keyed
``{key}/{page:04d}`` with source ``{uri}#page={n}`` (``data/tiff.py``).

Files and tar archives are listed in parallel by ``listing.list_prefix`` (the lister
nightly uses too): keys stream through Ray's object store, never one Python list.
Every source marks inputs whose keys collide before anything is read
(``collisions.py``), and never reads what the job writes: OUTPUT inside INPUT is
refused (``overlap.check_apart``), and a list naming OUTPUT's masks or summaries gets error rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import tarfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from raysegment import progress, storage
from raysegment.data import limits, tiff
from raysegment.errors import DataError
from raysegment.inference import collisions, rasters
from raysegment.inference.archives import STREAM_ERRORS, Archive, MemberIndex, open_stream
from raysegment.inference.listing import (
    ARCHIVE_EXTENSIONS,
    LISTED_SCHEMA,
    has_ext,
    hidden,
    list_prefix,
    path_of,
    strip_ext,
)
from raysegment.inference.listing import version as file_version
from raysegment.inference.urilist import list_uris

MAX_KEY_LENGTH = 512
BATCH_ROWS = 64
# Reads in flight per read task: on S3 a small image costs a round trip, not bandwidth.
READS_IN_FLIGHT = 16


def unsafe_key_reason(key: str) -> str | None:
    """Why a key cannot name an output file (it would escape the output prefix), or None."""
    if not key:
        return "empty key"
    if len(key) > MAX_KEY_LENGTH:
        return f"key longer than {MAX_KEY_LENGTH} characters"
    if any(c in key for c in "\x00\n\r"):
        return "key contains NUL or newline characters"
    if key.startswith("/") or key.startswith("\\"):
        return "absolute path"
    if any(part in ("..", ".") for part in key.replace("\\", "/").split("/")):
        return "path contains '.' or '..' segments"
    if "//" in key.replace("\\", "/") or key.endswith(("/", "\\")):
        return "path contains an empty segment ('//' or a trailing '/')"  # a//b's mask is a/b's
    return None


def _rows(
    keys: list[str],
    uris: list[str],
    data: list[bytes],
    errors: list[str],
    collides: list[bool] | None = None,
    raster: list[bool] | None = None,
) -> dict[str, np.ndarray]:
    # `collides` rides along so that resuming never drops a collision as done (pipeline._drop_done);
    # `raster`: a big raster, read window by window in the predictor (inference/rasters.py), no bytes here.
    return {
        "key": np.asarray(keys, dtype=object),
        "source_uri": np.asarray(uris, dtype=object),
        "bytes": np.asarray(data, dtype=object),
        "error": np.asarray(errors, dtype=object),
        "collides": np.asarray(collides if collides is not None else [False] * len(keys), bool),
        "raster": np.asarray(raster if raster is not None else [False] * len(keys), bool),
    }


log = logging.getLogger(__name__)

# Image files directly under INPUT are read this many batches to a task: a task per handful
# of files cost more in scheduling than the reads, and much bigger blocks hold back the
# first masks (an actor hands on a block when all of it is predicted).
BATCHES_PER_READ_TASK = 4
# A URI list's rows go this many to a read task. On one node with the loopback S3 server, 600
# images: tasks of 64 rows read at 0.65x the rate of one task reading the whole list, tasks of
# 256 at 1.0x; on a cluster the tasks spread over every node, the one task could not.
LIST_ROWS_PER_READ_TASK = 256


def _listed(
    root: storage.Location, exts: tuple[str, ...], files_per_task: int = 1, containers: bool = False
) -> ray.data.Dataset:
    """Listing rows of the files under INPUT; none at all (an empty folder, or only empty folders) is an error."""
    hint = "give a prefix (folder), one .tar/.tar.gz archive, or a .txt list of image URIs (--source list)"
    ds = list_prefix(root, exts, hint, files_per_task, containers)
    if ds is None:
        raise DataError(
            f"{root.uri}: no files ending in {', '.join(exts)} under it, nothing to infer; "
            "check INPUT, --extensions and --source"
        )
    return ds


def _read_each(
    batch: dict[str, np.ndarray], uris: list[str], read: Callable[[int], bytes | rasters.RasterInfo]
) -> dict[str, np.ndarray]:
    """Rows for listed keys, READS_IN_FLIGHT reads at a time (each under the storage deadline: small
    objects on S3 cost a round trip each, not bandwidth); a listing error, an unsafe key or a failed
    read becomes an error row, a store that stays down past its deadline fails the task."""
    keys, listed = batch["key"], batch["error"]

    def one(i: int) -> tuple[bytes | rasters.RasterInfo, str]:
        problem = listed[i] or (f"unsafe key: {reason}" if (reason := unsafe_key_reason(keys[i])) else "")
        if problem:
            return b"", str(problem)
        try:
            return read(i), ""
        except (OSError, storage.StorageError) as exc:
            if getattr(exc, "transient", False):
                raise  # the store is down, not the input bad: fail the job, keep the key undone
            return b"", f"cannot read: {exc}"

    with ThreadPoolExecutor(max(1, min(READS_IN_FLIGHT, len(keys)))) as pool:
        results = list(pool.map(one, range(len(keys))))
    big = [isinstance(d, rasters.RasterInfo) for d, _ in results]
    data = [b"" if b else d for (d, _), b in zip(results, big)]
    return _rows(list(keys), uris, data, [e for _, e in results], list(batch["collides"]), big)


def read_files(
    batch: dict[str, np.ndarray], root: storage.Location, max_pixels: int | None = None, max_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """Read each listed file under root; a failure names the file, not INPUT. A TIFF over `max_pixels`
    stored in blocks is not read here (`rasters.read_input`), nor more than `max_bytes` of one file."""
    uris = [str(u) for u in batch["uri"]]

    def read(i: int) -> bytes | rasters.RasterInfo:
        loc = storage.Location(uris[i], root.fs, path_of(root, uris[i]), root.endpoint_url, root.retry_s)
        return loc.call(lambda: rasters.read_input(loc, max_pixels, max_bytes))

    return _read_each(batch, uris, read)


@dataclasses.dataclass
class _Block:
    """Rows gathered for one yield of a streaming reader."""

    keys: list[str] = dataclasses.field(default_factory=list)
    uris: list[str] = dataclasses.field(default_factory=list)
    data: list[bytes] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    collides: list[bool] = dataclasses.field(default_factory=list)

    def add(self, key: str, uri: str, data: bytes, error: str = "", collides: bool = False) -> None:
        self.keys.append(key)
        self.uris.append(uri)
        self.data.append(data)
        self.errors.append(error)
        self.collides.append(collides)

    def rows(self) -> dict[str, np.ndarray]:
        return _rows(self.keys, self.uris, self.data, self.errors, self.collides)


def read_archives(
    batch: dict[str, np.ndarray],
    root: storage.Location,
    exts: tuple[str, ...],
    index: MemberIndex | None = None,
    max_bytes: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream the image members of each tar archive as rows, BATCH_ROWS at a time. With `index`
    (a resumed run), an archive whose recorded members are all done is not opened."""
    for key, uri, size, version, error, collides in zip(
        batch["key"], batch["uri"], batch["size"], batch["version"], batch["error"], batch["collides"]
    ):
        if error:  # refused by the listing (a key collision, a symlink): one row, nothing read
            yield _rows([f"{key}/(archive)"], [str(uri)], [b""], [str(error)], [bool(collides)])
            continue
        archive = Archive(str(uri), int(size), str(version))
        done = index.done_members(archive) if index is not None else frozenset()
        if done is None:
            continue  # every member is done: not opened
        yield from _archive_rows(root, str(key), archive, exts, index, done, max_bytes)


def _archive_rows(
    root: storage.Location,
    key: str,
    archive: Archive,
    exts: tuple[str, ...],
    index: MemberIndex | None,
    done: frozenset[str],
    max_bytes: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Rows of the archive's image members, less those in `done` (not even extracted); a member over
    `max_bytes` (its header says, before any is inflated: a 1 MB .tar.gz held 1 GiB) is an error row, as an
    archive that is a device is; headers over their limits, or damaged, end the archive with an error row
    before they are read (`archives.TarStream`: a 1 MB .tar.gz held a 1000 MB pax header)."""
    uri = archive.uri
    if not root.remote and not rasters.readable_kind(path_of(root, uri)):
        yield _rows([f"{key}/(archive)"], [uri], [b""], ["a device or socket, not a file; not read"], [False])
        return
    block = _Block()
    seen: dict[str, str] = {}  # fold(member key) -> the first member with it
    # The list to record; none when read for `done`, which this version's list gave already.
    members: list[str] | None = [] if index is not None and not done else None
    whole = True  # read to the end, without damage or a repeated member: its list may be kept
    try:
        # A local file by Python's open: fsspec's seeks to the end on opening, which a named pipe refuses.
        opened = open(path_of(root, uri), "rb") if not root.remote else root.fs.open(path_of(root, uri), "rb")
        with opened as f, open_stream(f) as tar:
            for member in tar:
                if (member.isfile() or member.issym() or member.islnk()) and has_ext(member.name, exts):
                    if hidden(member.name):
                        continue
                    member_key = f"{key}/{strip_ext(member_name(member)[0])}"
                    if members is not None:
                        members.append(member_key)
                    if member_key in done:
                        continue
                    _add_member(block, tar, member, key, uri, seen, max_bytes)
                    whole = whole and not block.collides[-1]
                if len(block.keys) >= BATCH_ROWS:
                    yield block.rows()
                    block = _Block()
    except STREAM_ERRORS as exc:
        if root.remote and storage.is_transient(exc):
            raise storage.StorageError(f"{uri}: storage unreachable mid-archive ({exc})") from exc
        # A damaged archive is one error row; members read before the damage are kept.
        name = posixpath.basename(uri)
        block.add(f"{key}/(archive)", uri, b"", f"cannot read archive {name}: {type(exc).__name__}: {exc}")
        whole = False
    if block.keys:
        yield block.rows()
    if whole and index is not None and members is not None:
        index.record(archive, members)


def member_name(member: tarfile.TarInfo) -> tuple[str, bool]:
    """(the name its key is made of, whether it was UTF-8). tarfile keeps undecodable bytes as surrogates;
    `tar -cf x.tar .` stores ./a.png, and a '.' segment names nothing, so it is dropped ('..' stays refused)."""
    name, utf8 = storage.utf8_name(member.name)
    return "/".join(part for part in name.split("/") if part != ".") or name, utf8


def _add_member(
    block: _Block,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    key: str,
    uri: str,
    seen: dict[str, str],
    max_bytes: int | None = None,
) -> None:
    """One member's row. A member whose key repeats an earlier one's (x.png and x.jpg, or one name
    stored twice) is an error row: the archive streams, so the earlier one is already on its way. A link
    member takes its key like a file and is an error row: a streamed archive cannot go back to its target."""
    name, utf8 = member_name(member)
    source = f"{uri}#{storage.utf8_name(member.name)[0]}"
    member_key = f"{key}/{strip_ext(name)}"
    problem = unsafe_key_reason(strip_ext(name))
    folded = collisions.fold(member_key)
    if not utf8:
        block.add(member_key, source, b"", f"member {storage.NOT_UTF8}")
    elif problem:
        block.add(member_key, source, b"", f"unsafe member name: {problem}")
    elif folded in seen:
        block.add(member_key, source, b"", collisions.repeated(member.name, seen[folded], member_key), True)
    elif not member.isfile():
        seen[folded] = member.name
        link = f"a link to {storage.utf8_name(member.linkname)[0]}"
        block.add(member_key, source, b"", f"member is {link}, not followed; store the file")
    elif max_bytes and member.size > max_bytes:
        seen[folded] = member.name
        block.add(member_key, source, b"", limits.too_large(max_bytes, member.size))
    else:
        seen[folded] = member.name
        extracted = tar.extractfile(member)
        block.add(member_key, source, extracted.read() if extracted else b"")


def key_text(value: Any) -> str:
    """A key column's value as a key: a null is the empty key (an error row), not the text 'None'."""
    return "" if value is None else str(value)


# Rows of a Parquet table go at most this many to a block (a row group can hold thousands of images), and
# fewer where their image bytes would pass PARQUET_BLOCK_BYTES (at least one row a block).
PARQUET_ROWS_PER_BLOCK = 64
PARQUET_BLOCK_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """One row group of one table file: `first` is the file's row number of its first row."""

    path: str
    name: str  # the file's path under INPUT, as keys and errors name it
    group: int
    first: int
    rows: int
    image_bytes: int  # the image column's bytes once decompressed (the footer says, before any is read)
    dictionary: bool  # the image column's chunk has a dictionary page: rows may share one stored value


def _table_files(root: storage.Location) -> list[tuple[str, str]]:
    """(path, name under INPUT) of each Parquet file: INPUT itself when it is one."""
    if root.call(lambda: root.fs.isfile(root.path)):
        return [(root.path, posixpath.basename(root.path))]
    prefix = root.path.rstrip("/") + "/"
    return [(p, p.removeprefix(prefix)) for p in storage.parquet_files(root)]


def _row_groups(root: storage.Location, image_column: str, key_column: str | None) -> list[RowGroup]:
    """Every row group of the tables under INPUT, from their footers (read on the driver, one request or
    two a file, READS_IN_FLIGHT at a time): row numbers must be the file's own, which Ray's blocks (small
    files merged, big ones split) do not keep. A file without the columns is refused here, naming it and
    the columns it has."""
    if key_column == image_column:
        raise DataError(
            f"{root.uri}: --key-column and --image-column are both {image_column!r}; name the keys' own column"
        )

    def footer(path: str) -> pq.ParquetFile:
        def read() -> pq.ParquetFile:
            with root.fs.open(path, "rb") as f:
                return pq.ParquetFile(f)  # its metadata and schema are read here, before the file closes

        return root.call(read)

    files = _table_files(root)
    with ThreadPoolExecutor(max(1, min(READS_IN_FLIGHT, len(files)))) as pool:
        footers = list(pool.map(footer, [path for path, _ in files]))
    groups: list[RowGroup] = []
    for (path, name), table in zip(files, footers):
        schema = table.schema_arrow
        wanted = [image_column, *([key_column] if key_column else [])]
        if any(c not in schema.names for c in wanted):
            raise DataError(
                f"{root.uri}: Parquet columns are {schema.names} in {name}; set --image-column / --key-column to "
                "existing columns"
            )
        kind = schema.field(image_column).type
        if not _is_bytes(kind):
            raise DataError(
                f"{root.uri}: column {image_column!r} holds {kind} in {name}, not the images' encoded bytes "
                f"(binary); set --image-column to the column of PNG/JPEG/TIFF bytes (columns: {schema.names})"
            )
        first = 0
        for g in range(table.metadata.num_row_groups):
            group = table.metadata.row_group(g)
            rows = group.num_rows
            if rows:
                inflated, dictionary = _column_bytes(group, image_column)
                groups.append(RowGroup(path, name, g, first, rows, inflated, dictionary))
            first += rows
    return groups


def _column_bytes(group: pq.RowGroupMetaData, column: str) -> tuple[int, bool]:
    """The decompressed size of `column`'s chunk in a row group (its leaf columns', for a nested type), and
    whether it has a dictionary page."""
    chunks = [group.column(i) for i in range(group.num_columns)]
    mine = [c for c in chunks if c.path_in_schema == column or c.path_in_schema.startswith(f"{column}.")]
    return sum(c.total_uncompressed_size for c in mine), any(c.has_dictionary_page for c in mine)


def _is_bytes(kind: pa.DataType) -> bool:
    """A column of encoded image bytes, in any of Arrow's binary layouts, dictionary-encoded too (writers
    that share repeated values store a table's images so)."""
    t = pa.types
    if t.is_dictionary(kind):
        return _is_bytes(kind.value_type)
    return t.is_binary(kind) or t.is_large_binary(kind) or t.is_binary_view(kind) or t.is_fixed_size_binary(kind)


def read_row_groups(
    batch: dict[str, np.ndarray],
    root: storage.Location,
    image_column: str,
    key_column: str | None,
    clashes: dict[str, str],
    max_bytes: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Rows of the row groups in batch, PARQUET_ROWS_PER_BLOCK at a time. A row's source is `FILE#ROW`
    (the file's own row number); its key is the key column's value, else `FILE/ROW` (FILE without its
    extension). A null or empty key is an error row under `FILE/ROW`: one row per key holds, and the row
    can be found. A value over `max_bytes` is an error row; a row group whose image column decompresses to
    more than that per row is not decompressed at all (43 KB of zstd held a 1 GiB value): its rows are
    error rows, keyed from the key column alone. A dictionary-encoded image column is read as a dictionary,
    so a value that many rows share is held once (20 MB of file made 2 GB per block read densely)."""
    columns = [image_column, *([key_column] if key_column else [])]
    for path, name, group, first, rows, inflated, dictionary in zip(
        batch["path"],
        batch["name"],
        batch["group"],
        batch["first"],
        batch["rows"],
        batch["image_bytes"],
        batch["dictionary"],
    ):
        file_uri = storage.join(root.uri, name) if root.path != path else root.uri
        row = int(first)
        bomb = bool(max_bytes) and int(inflated) > int(rows) * max_bytes
        # Streamed, a block at a time: a writer's default row group holds up to a million rows (gigabytes
        # of images). A store that fails mid-group fails the task, as a failed archive read does.
        with root.call(lambda path=path: root.fs.open(path, "rb")) as f:
            # Reading dictionary pages as one costs about 0.3 ms per 200 KB image where the writer fell back to
            # plain pages (pyarrow's default does after 1 MB), as it hashes those values.
            table = pq.ParquetFile(f, read_dictionary=[image_column] if dictionary else None)
            if bomb:
                refused = (
                    f"row group {int(group)} of {name}: its images decompress to {int(inflated)} bytes, over "
                    f"--max-input-mb for each of its {int(rows)} rows; not read (write the table with smaller images "
                    "or raise --max-input-mb)"
                )
                batches = _refused_batches(table, int(group), int(rows), key_column)
            else:
                refused = ""
                # Rows of big images are read fewer at a time: each read holds its rows' values whole.
                per_row = max(1, int(inflated) // max(1, int(rows)))
                size = max(1, min(PARQUET_ROWS_PER_BLOCK, PARQUET_BLOCK_BYTES // per_row))
                batches = table.iter_batches(size, row_groups=[int(group)], columns=columns)
            yield from _table_rows(batches, row, name, file_uri, key_column, clashes, max_bytes, refused)


def _refused_batches(table: pq.ParquetFile, group: int, rows: int, key_column: str | None) -> Iterator[pa.RecordBatch]:
    """A refused row group's rows without their images (nulls in their place): its key column only is read."""
    if key_column:
        for keys in table.iter_batches(PARQUET_ROWS_PER_BLOCK, row_groups=[group], columns=[key_column]):
            yield pa.RecordBatch.from_arrays([pa.nulls(keys.num_rows, pa.binary()), keys.column(0)], ["image", "key"])
        return
    for start in range(0, rows, PARQUET_ROWS_PER_BLOCK):
        count = min(PARQUET_ROWS_PER_BLOCK, rows - start)
        yield pa.RecordBatch.from_arrays([pa.nulls(count, pa.binary())], ["image"])


def _table_rows(
    batches: Iterator[pa.RecordBatch],
    row: int,
    name: str,
    file_uri: str,
    key_column: str | None,
    clashes: dict[str, str],
    max_bytes: int | None = None,
    refused_all: str = "",
) -> Iterator[dict[str, np.ndarray]]:
    """`read_row_groups`' rows of one row group's record batches, its first row being the file's `row`;
    `refused_all`: every row's error (the group was not read). Blocks hold up to PARQUET_BLOCK_BYTES of
    image bytes (one row at least), judged before the rows' bytes are copied out of the batch."""
    for rb in batches:
        for start, stop, images in _image_blocks(rb.column(0), max_bytes):
            keys_in = rb.column(1).slice(start, stop - start).to_pylist() if key_column else None
            yield _table_block(images, row + start, name, file_uri, keys_in, key_column, clashes, refused_all)
        row += rb.num_rows


def _table_block(
    images: list[bytes | str | None],
    row: int,
    name: str,
    file_uri: str,
    keys_in: list[Any] | None,
    key_column: str | None,
    clashes: dict[str, str],
    refused_all: str,
) -> dict[str, np.ndarray]:
    numbers = range(row, row + len(images))
    by_row = [f"{strip_ext(name)}/{n}" for n in numbers]
    given = [key_text(k) for k in keys_in] if keys_in is not None else by_row
    keys = [k or r for k, r in zip(given, by_row)]
    clashing = [clashes.get(collisions.fold(k), "") if k and clashes else "" for k in given]
    # A key names the mask's file: a missing one, a shared one or one that would escape OUTPUT is an error row.
    refused = [
        (f"no key: --key-column {key_column} is null or empty in {name} row {n}; fill it, then re-run" if not g else "")
        or c
        or (f"unsafe key: {why}" if (why := unsafe_key_reason(k)) else "")
        or refused_all
        or (b if isinstance(b, str) else "")  # over --max-input-mb
        for g, c, k, n, b in zip(given, clashing, keys, numbers, images)
    ]
    return _rows(
        keys,
        [f"{file_uri}#{n}" for n in numbers],
        [b if isinstance(b, bytes) and not r else b"" for b, r in zip(images, refused)],
        [r or ("" if isinstance(b, bytes) and b else "empty or missing image bytes") for b, r in zip(images, refused)],
        [bool(c) for c in clashing],
    )


def _image_blocks(column: pa.Array, max_bytes: int | None) -> Iterator[tuple[int, int, list[bytes | str | None]]]:
    """(start, stop, values) of a batch's image column, in runs of up to PARQUET_BLOCK_BYTES: each row's bytes,
    None for a null, or its error text when over `max_bytes`. Lengths are read before any value is copied:
    rows of a dictionary share one stored value, and each row's copy is a full one."""
    if pa.types.is_dictionary(column.type):
        values, index = column.dictionary, column.indices.to_pylist()
    else:
        values, index = column, list(range(len(column)))
    if pa.types.is_binary_view(values.type):  # no length kernel; not what Parquet reads as
        values = values.cast(pa.large_binary())
    sizes = pc.binary_length(values).to_pylist()
    kept = [0 if i is None or sizes[i] is None or (max_bytes and sizes[i] > max_bytes) else sizes[i] for i in index]
    start = 0
    while start < len(index):
        stop, held = start + 1, kept[start]
        while stop < len(index) and held + kept[stop] <= PARQUET_BLOCK_BYTES:
            held += kept[stop]
            stop += 1
        out: list[bytes | str | None] = []
        for i in index[start:stop]:
            size = None if i is None else sizes[i]
            if size is None:
                out.append(None)
            elif max_bytes and size > max_bytes:
                out.append(limits.too_large(max_bytes, size))
            else:
                out.append(values[i].as_py())
        yield start, stop, out
        start = stop


def key_column_clashes(root: storage.Location, key_column: str) -> dict[str, str]:
    """fold(key) -> error text, for keys of the key column that more than one row has (null and empty
    keys are error rows of their own, not a clash).

    Read first, on the driver, and only that column: a table's keys can repeat anywhere in it.
    """

    def pairs() -> Iterator[tuple[list[str], list[str]]]:
        for path, name in _table_files(root):
            with root.fs.open(path, "rb") as f:
                row = 0
                for rb in pq.ParquetFile(f).iter_batches(columns=[key_column]):
                    keys = [key_text(k) for k in rb.column(0).to_pylist()]
                    named = [(k, f"{name} row {row + i}") for i, k in enumerate(keys) if k]
                    yield [k for k, _ in named], [n for _, n in named]
                    row += len(keys)

    found = root.call(lambda: collisions.duplicated(pairs))
    fix = f"make --key-column {key_column} unique, then re-run with --overwrite"
    return {folded: collisions.message(names, folded, fix) for folded, names in found.items()}


def read_parquet_table(
    root: storage.Location, image_column: str, key_column: str | None, max_bytes: int | None = None
) -> ray.data.Dataset:
    """Rows of Parquet image tables, a task per row group; keys from key_column, else FILE/ROW."""
    groups = _row_groups(root, image_column, key_column)
    if not groups:
        raise DataError(f"{root.uri}: no Parquet rows under it, nothing to infer; check INPUT and --source")
    clashes = key_column_clashes(root, key_column) if key_column else {}
    items = [dataclasses.asdict(g) for g in groups]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_row_groups,
        batch_size=1,
        fn_kwargs={
            "root": root,
            "image_column": image_column,
            "key_column": key_column,
            "clashes": clashes,
            "max_bytes": max_bytes,
        },
        batch_format="numpy",
    )


_LIST_FILESYSTEMS: dict[tuple[str, str | None, float | None], fsspec.AbstractFileSystem] = {}
_LIST_FILESYSTEMS_LOCK = threading.Lock()


def _list_filesystem(uri: str, endpoint_url: str | None, retry_s: float | None) -> fsspec.AbstractFileSystem:
    """This worker process's filesystem for a list's remote URIs (a worker serves one job, whose
    credentials and deadline do not change while it runs)."""
    key = (uri.split("://", 1)[0], endpoint_url, retry_s)
    with _LIST_FILESYSTEMS_LOCK:
        if key not in _LIST_FILESYSTEMS:
            _LIST_FILESYSTEMS[key] = storage.resolve(uri, endpoint_url, retry_s).fs
        return _LIST_FILESYSTEMS[key]


def read_uris(
    batch: dict[str, np.ndarray],
    endpoint_url: str | None,
    retry_s: float | None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Read each URI of a list source, with one filesystem per scheme and the job's retry deadline (big
    rasters as `read_files`). The filesystems outlive the task in its worker process: a new S3 client
    cost as much as a read task's 64 reads (loopback S3), and a list's reads come many tasks to a worker."""

    def read(i: int) -> bytes | rasters.RasterInfo:
        uri = str(batch["path"][i])
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        if scheme == "file":
            loc = storage.resolve(uri, endpoint_url)
        else:
            fs = _list_filesystem(uri, endpoint_url, retry_s)
            loc = storage.Location(uri, fs, uri.split("://", 1)[1], endpoint_url, retry_s)
        return loc.call(lambda: rasters.read_input(loc, max_pixels, max_bytes))

    return _read_each(batch, [str(u) for u in batch["path"]], read)


def _sample(root: storage.Location, n: int = 1000, skip_hidden: bool = False) -> list[str]:
    """Up to n file names under root, folder by folder as `fs.walk` (a folder's files, then its sub-folders in
    order), reading entries only until n: never the whole listing on the driver. `fs.walk` listed and stat-ed a
    whole folder before giving a name (a flat folder of 1M files was listed twice more, only for 1000 names):
    here a local folder is read with os.scandir and an S3 one a page (`MaxKeys`) at a time, both stopping at n.
    `skip_hidden`: without hidden files and folders, as the listing skips them."""
    names: list[str] = []
    entries = _s3_entries if root.remote else _local_entries
    todo = [root.path]
    while todo:
        folder = todo.pop()
        dirs: list[str] = []
        try:
            for name, path, is_dir in entries(root, folder, n):
                if skip_hidden and hidden(name):
                    continue
                if is_dir:
                    dirs.append(path)
                    continue
                names.append(name)
                if len(names) >= n:
                    return names
        except OSError:  # as fs.walk: a folder that cannot be listed is passed over
            if folder == root.path:
                return _walked_sample(root, n, skip_hidden)  # not a folder (one file): as fs.walk says
            continue
        if folder == root.path and not names and not dirs:
            return _walked_sample(root, n, skip_hidden)  # nothing listed: a file, or nothing, as fs.walk says
        todo.extend(reversed(dirs))  # depth first, in listing order
    return names


def _local_entries(root: storage.Location, folder: str, n: int) -> Iterator[tuple[str, str, bool]]:
    """(name, path, is a folder) of each entry of a local folder, read as they come (links are not folders)."""
    with os.scandir(folder) as found:
        for e in found:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            yield e.name, e.path, is_dir


def _s3_entries(root: storage.Location, folder: str, n: int) -> Iterator[tuple[str, str, bool]]:
    """(name, path, is a folder) of each entry of an S3 prefix, a listing page of up to n keys at a time:
    sub-prefixes, then the objects (each sorted; a folder's marker object is the name '', as fs.walk gives)."""
    fs = root.fs
    bucket, key, _ = fs.split_path(folder)
    prefix = key.rstrip("/") + "/" if key else ""
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": max(1, min(n, 1000))}
    while True:
        page = fs.call_s3("list_objects_v2", **request, **fs.req_kw)
        for common in page.get("CommonPrefixes", []):
            path = f"{bucket}/{common['Prefix'].rstrip('/')}"
            yield path.rsplit("/", 1)[-1], path, True
        for obj in page.get("Contents", []):
            yield obj["Key"][len(prefix) :].rstrip("/"), f"{bucket}/{obj['Key']}", False
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _walked_sample(root: storage.Location, n: int, skip_hidden: bool) -> list[str]:
    """`_sample` by `fs.walk`, for a root that is not a folder (one cheap listing then)."""
    names: list[str] = []
    for _, dirs, files in root.fs.walk(root.path):
        if skip_hidden:
            dirs[:] = [d for d in dirs if not hidden(d)]  # pruned in place: not walked
            files = [f for f in files if not hidden(f)]
        names.extend(files[: n - len(names)])
        if len(names) >= n:
            break
    return names


def detect_kind(root: storage.Location) -> str:
    """Guess the source kind from INPUT: a list file, Parquet tables, tar shards or image files."""
    low = root.path.lower()
    if low.endswith(".txt"):
        return "list"

    def look() -> str | list[str]:
        if not root.fs.exists(root.path):
            raise FileNotFoundError(root.path)
        if has_ext(low, ARCHIVE_EXTENSIONS) and root.fs.isfile(root.path):
            return "tar"  # one archive
        if low.endswith(".parquet") and root.fs.isfile(root.path):
            with root.fs.open(root.path, "rb") as f:
                return "list" if "uri" in pq.ParquetFile(f).schema_arrow.names else "parquet"
        return _sample(root)

    sample = root.call(look)
    if isinstance(sample, str):
        return sample
    if sample and all(has_ext(p, ARCHIVE_EXTENSIONS) for p in sample):
        return "tar"
    if sample and all(p.lower().endswith(".parquet") for p in sample):
        return "parquet"
    return "files"


KeyFilter = Callable[[ray.data.Dataset], ray.data.Dataset]


def _one_archive(root: storage.Location) -> ray.data.Dataset | None:
    """INPUT naming one archive file: its listing row (members keyed `{archive name}/{member}`, as when
    its folder is INPUT), else None."""
    if not has_ext(root.path, ARCHIVE_EXTENSIONS):
        return None
    info = root.call(lambda: root.fs.info(root.path) if root.fs.isfile(root.path) else None)
    if info is None:
        return None
    name = posixpath.basename(root.path)
    row = {"key": strip_ext(name), "uri": root.uri, "size": int(info.get("size") or 0), "version": file_version(info)}
    row |= {"error": "", "collides": False}
    return ray.data.from_arrow(pa.Table.from_pylist([row], schema=LISTED_SCHEMA))


# Archive forms a tar source does not open (not tars, or compressed in a way tarfile does not stream).
UNREAD_ARCHIVES = (".zip", ".tar.zst", ".tzst", ".7z", ".rar")


def unread_inputs_note(root: storage.Location, kind: str) -> str | None:
    """What INPUT holds that a `kind` source will pass over without a row, from the first 1000 names (the
    driver never lists everything): archives or tables beside images, archives a tar source cannot open.
    Nothing said so; a run over half the data passed as complete."""
    if kind not in ("files", "tar") or not root.call(lambda: root.fs.isdir(root.path)):
        return None
    sample = root.call(lambda: _sample(root, skip_hidden=True))
    if kind == "files":
        unread = [n for n in sample if has_ext(n, (*ARCHIVE_EXTENSIONS, *UNREAD_ARCHIVES, ".parquet"))]
        fix = "a files source reads image files only: give archives and tables their own run (--source tar or parquet)"
    else:
        unread = [n for n in sample if has_ext(n, UNREAD_ARCHIVES)]
        fix = f"a tar source opens {', '.join(ARCHIVE_EXTENSIONS)} only: repack them as one of those"
    if not unread:
        return None
    first = ", ".join(sorted(unread)[:3])
    some = "" if len(sample) < 1000 else " among the first 1000 names"
    return f"INPUT also holds {len(unread)} files not read{some} ({first}{', ...' if len(unread) > 3 else ''}); {fix}"


def source_rows(
    uri: str,
    kind: str,
    extensions: list[str],
    keep: KeyFilter,
    endpoint_url: str | None = None,
    image_column: str = "image",
    key_column: str | None = None,
    retry_s: float | None = None,
    batch_size: int = 16,
    output: str | None = None,
    members: MemberIndex | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> tuple[str, ray.data.Dataset]:
    """(kind, dataset of key/source_uri/bytes/error/collides rows) for INPUT.

    ``keep`` drops keys already done; it runs on the listing where keys are known
    before reading (files, list) so skipped images are never read; tar archives whose members
    ``members`` records as all done are not opened. A list's entries under ``output``'s own
    folders become error rows. With ``max_pixels``, TIFF files and URIs over it that are stored in blocks
    become big-raster rows (``raster``, no bytes: inference/rasters.py).
    """
    root = storage.resolve(uri, endpoint_url, retry_s)
    kind = detect_kind(root) if kind == "auto" else kind
    if note := unread_inputs_note(root, kind):
        progress.warn(log, "infer", note)
    exts = tuple(extensions)  # lower-case with the dot: InferOptions normalises them
    if kind == "files":
        ds = keep(_listed(root, exts, BATCHES_PER_READ_TASK * batch_size)).map_batches(
            read_files, fn_kwargs={"root": root, "max_pixels": max_pixels, "max_bytes": max_bytes}, batch_format="numpy"
        )
    elif kind == "list":
        out = storage.resolve(output, endpoint_url, retry_s) if output else None
        # The list is streamed by one task; its rows are cut into blocks of a read task's worth so
        # the reads spread over every node's CPUs instead of running inside that one task.
        listed = keep(list_uris(root, out)).repartition(target_num_rows_per_block=LIST_ROWS_PER_READ_TASK)
        ds = listed.map_batches(
            read_uris,
            fn_kwargs={
                "endpoint_url": endpoint_url,
                "retry_s": root.retry_s,
                "max_pixels": max_pixels,
                "max_bytes": max_bytes,
            },
            batch_format="numpy",
        )
    elif kind == "tar":
        archives = _one_archive(root)
        if archives is None:
            archives = _listed(root, ARCHIVE_EXTENSIONS, containers=True)
        kwargs = {"root": root, "exts": exts, "index": members, "max_bytes": max_bytes}
        ds = keep(archives.map_batches(read_archives, fn_kwargs=kwargs, batch_size=1, batch_format="numpy"))
    elif kind == "parquet":
        ds = keep(read_parquet_table(root, image_column, key_column, max_bytes))
    else:
        raise DataError(f"unknown source kind '{kind}'; use auto, files, tar, parquet or list")
    # A multi-page TIFF is one input per slice (`{key}/0003`, `data/tiff.py`; Pillow alone would read its
    # first page only); the slices' keys exist only now, so the done ones are dropped here again.
    split = {"max_pixels": max_pixels or limits.MAX_PIXELS}
    return kind, keep(ds.map_batches(tiff.split_stacks, fn_kwargs=split, batch_size=None, batch_format="numpy"))
