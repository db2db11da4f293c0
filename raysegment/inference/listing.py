"""One parallel lister of a prefix, for `infer`'s files and tar sources and for `nightly`.

The driver lists only the first level below the prefix; every sub-prefix is listed
recursively by its own Ray task, so listing runs in parallel and the rows stream
through Ray's object store, never one Python list on the driver. A flat prefix with
millions of objects is listed by the driver's first-level listing; for those, give a
``list`` source (a Parquet file of URIs) instead.

Rows are (key, uri, size, version): the key is the path below the prefix without
extension, the version what changes when an object is rewritten (S3 ETag, local mtime).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import ray

from raysegment import storage
from raysegment.errors import DataError

ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
LISTING_SCHEMA = pa.schema([("key", pa.string()), ("uri", pa.string()), ("size", pa.int64()), ("version", pa.string())])


def strip_ext(path: str) -> str:
    """The path without its extension (both parts of .tar.gz)."""
    for ext in ARCHIVE_EXTENSIONS:
        if path.lower().endswith(ext):
            return path[: -len(ext)]
    return posixpath.splitext(path)[0]


def has_ext(path: str, exts: tuple[str, ...]) -> bool:
    """Whether path ends with one of exts (lower-case, with the dot), in any case."""
    return path.lower().endswith(exts)


def uri_of(root: storage.Location, path: str) -> str:
    """The URI of a path that root's filesystem returned."""
    return f"s3://{path}" if root.remote else path


def path_of(root: storage.Location, uri: str) -> str:
    """The path root's filesystem takes for a URI of a listing row."""
    return uri.removeprefix("s3://") if root.remote else uri


def version(info: dict[str, Any]) -> str:
    """What changes when an object is rewritten: the S3 ETag, else the local mtime."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    return repr(info.get("mtime") or info.get("LastModified") or "")


def top_level(root: storage.Location, file_hint: str) -> list[dict[str, Any]]:
    """The entries directly under a prefix (the listing's fan-out); a clear error if it is a file or missing."""

    def ls() -> list[dict[str, Any]]:
        if not root.fs.isdir(root.path):
            if root.fs.exists(root.path):
                raise DataError(f"{root.uri}: is a file; {file_hint}")
            raise FileNotFoundError(root.path)
        return root.fs.ls(root.path, detail=True)

    return root.call(ls)


def _files(infos: dict[str, dict[str, Any]]) -> Iterator[tuple[str, int, str]]:
    """(path, size, version) of the files among fsspec info entries."""
    for path, info in infos.items():
        if info.get("type") != "directory":
            yield path, int(info.get("size") or 0), version(info)


def _table(root: storage.Location, files: Iterable[tuple[str, int, str]], exts: tuple[str, ...]) -> pa.Table:
    prefix = root.path.rstrip("/") + "/"
    found = sorted(f for f in files if f[0].startswith(prefix) and has_ext(f[0], exts))
    return pa.table(
        {
            "key": [strip_ext(p[len(prefix) :]) for p, _, _ in found],
            "uri": [uri_of(root, p) for p, _, _ in found],
            "size": [s for _, s, _ in found],
            "version": [v for _, _, v in found],
        },
        schema=LISTING_SCHEMA,
    )


def _list_entries(batch: pa.Table, root: storage.Location, exts: tuple[str, ...]) -> pa.Table:
    """List first-level entries (runs as a Ray task): files as they are, folders recursively."""
    files: list[tuple[str, int, str]] = []
    for entry in batch.to_pylist():
        if entry["is_dir"]:
            path = entry["path"]
            files.extend(_files(root.call(lambda: root.fs.find(path, detail=True))))  # noqa: B023
        else:
            files.append((entry["path"], entry["size"], entry["version"]))
    return _table(root, files, exts)


def list_prefix(
    root: storage.Location, exts: tuple[str, ...], file_hint: str, files_per_task: int = 1
) -> ray.data.Dataset | None:
    """A dataset of (key, uri, size, version) for every file under root with one of exts; None if root is empty.

    Each sub-folder is listed by its own task; files directly under root go
    ``files_per_task`` to a task. ``file_hint`` says what to give instead when root is a file.
    """
    entries = top_level(root, file_hint)
    if not entries:
        return None
    items = [
        {
            "path": e["name"],
            "is_dir": e["type"] == "directory",
            "size": int(e.get("size") or 0),
            "version": version(e),
        }
        for e in entries
    ]
    files = sum(not item["is_dir"] for item in items)
    blocks = len(items) - files + -(-files // files_per_task)
    # Let a task's StorageError/DataError reach the driver as itself (Ray Data would wrap it in a
    # UserCodeException whose cause does not survive pickling), so the CLI prints its one line.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(blocks, 200)))
    return ds.map_batches(_list_entries, fn_kwargs={"root": root, "exts": exts}, batch_size=1, batch_format="pyarrow")


def list_table(root: storage.Location, exts: tuple[str, ...], file_hint: str) -> pa.Table:
    """The whole listing as one Arrow table on the driver, for callers that need every row at once."""
    ds = list_prefix(root, exts, file_hint)
    tables = ray.get(ds.to_arrow_refs()) if ds is not None else []
    names = LISTING_SCHEMA.names
    return pa.concat_tables([LISTING_SCHEMA.empty_table(), *(t.select(names).cast(LISTING_SCHEMA) for t in tables)])
