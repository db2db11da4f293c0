"""One parallel lister of a prefix, for `infer`'s files and tar sources and for `nightly`.

The driver lists only the first level below the prefix; every sub-prefix is listed
recursively by its own Ray task, so listing runs in parallel and the rows stream
through Ray's object store, never one Python list on the driver. A flat prefix with
millions of objects is listed by the driver's first-level listing; for those, give a
``list`` source (a Parquet file of URIs) instead.

Rows are (key, uri, size, version, error, collides): the key is the path below the
prefix without extension, the version what changes when an object is rewritten (S3
ETag, local mtime). ``error`` says why an input must not be read: its key collides
with another's (``collisions.within``: the files of one folder are always listed by
one unit, the driver's first level or one sub-prefix task), or it is a local symlink
that is dangling or points outside the prefix (never followed).
"""

from __future__ import annotations

import dataclasses
import operator
import os
import posixpath
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from raysegment import storage
from raysegment.errors import DataError
from raysegment.inference import collisions

# Plain, gzip, bzip2 and xz tars alike, told by their first bytes (`archives.open_stream`).
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# The columns nightly's ledger rows start with.
LISTING_SCHEMA = pa.schema([("key", pa.string()), ("uri", pa.string()), ("size", pa.int64()), ("version", pa.string())])
# What the lister returns: a row with an error is not to be read (it becomes an error row).
LISTED_SCHEMA = pa.schema([*LISTING_SCHEMA, ("error", pa.string()), ("collides", pa.bool_())])


def strip_ext(path: str) -> str:
    """The path without its extension (both parts of .tar.gz)."""
    low = path.lower()
    if low.endswith(ARCHIVE_EXTENSIONS):  # one test for the common case (an image), not one per extension
        for ext in ARCHIVE_EXTENSIONS:
            if low.endswith(ext):
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


@dataclasses.dataclass(frozen=True)
class Entry:
    """One listed file; ``problem`` says why it must not be read ('' if it may). Not ordered: sorting 1M of them
    by the generated comparisons took 25 s, by `SORT_KEY` 2 s (`unit_table`)."""

    path: str
    size: int
    version: str
    problem: str = ""
    folder: bool = False  # a link to a folder outside INPUT: listed (as an error row) whatever its name


# The fields in order, as a tuple made in C: the order the dataclass comparisons gave (path first).
SORT_KEY = operator.attrgetter(*(f.name for f in dataclasses.fields(Entry)))


def hidden(relative: str) -> bool:
    """A name or folder starting with '.' (.DS_Store, macOS's ._photo.png resource forks, .cache/): never an
    input, as `prepare` skips them too."""
    return any(part.startswith(".") and part not in (".", "..") for part in relative.split("/"))


def link_problem(path: str, real_root: str) -> str:
    """Why a local symlink is not followed: dangling, or pointing outside INPUT ('' if inside)."""
    target = os.path.realpath(path)
    if not os.path.exists(target):
        return f"dangling symlink {path} -> {os.readlink(path)}: its target does not exist"
    if not storage.within(target, real_root):
        kind = "folder" if os.path.isdir(target) else "file"
        return f"symlink {path} -> {target}: a {kind} outside INPUT, not followed"
    return ""


def entry(info: dict[str, Any], real_root: str | None) -> Entry:
    """An fsspec info dict as an Entry; local symlinks are checked against the real INPUT folder."""
    path = info["name"]
    problem = link_problem(path, real_root) if real_root is not None and info.get("islink") else ""
    # A link to a folder outside INPUT is an error row whatever its name; one to a folder inside INPUT is
    # not followed either (no problem, no image extension: left out), its files are listed where they are.
    folder = bool(problem) and info.get("type") != "file" and os.path.isdir(path)
    return Entry(path, int(info.get("size") or 0), version(info), problem, folder)


def unit_table(
    root: storage.Location,
    entries: Iterable[Entry],
    exts: tuple[str, ...],
    containers: bool = False,
    claimed: Iterable[str] = (),
) -> pa.Table:
    """The rows of one listing unit, with its key collisions marked."""
    prefix = root.path.rstrip("/") + "/"
    found = sorted(
        (
            e
            for e in entries
            if e.path.startswith(prefix) and not hidden(e.path[len(prefix) :]) and (e.folder or has_ext(e.path, exts))
        ),
        key=SORT_KEY,
    )
    paths, utf8 = zip(*(storage.utf8_name(e.path) for e in found)) if found else ((), ())
    names = [p[len(prefix) :] for p in paths]
    keys = [strip_ext(n) for n in names]
    clashes = collisions.within(keys, names)
    # An archive under another's key is refused as a whole (an error row, not a collision of its own).
    problems = collisions.nested(keys, names, claimed) if containers else [""] * len(keys)
    return pa.table(
        {
            "key": keys,
            "uri": [uri_of(root, p) for p in paths],
            "size": [e.size for e in found],
            "version": [e.version for e in found],
            "error": [
                c or p or storage.utf8_name(e.problem)[0] or ("" if ok else storage.NOT_UTF8)
                for c, p, e, ok in zip(clashes, problems, found, utf8)
            ],
            "collides": [bool(c) for c in clashes],
        },
        schema=LISTED_SCHEMA,
    )


def _list_entries(
    batch: pa.Table,
    root: storage.Location,
    exts: tuple[str, ...],
    real_root: str | None,
    containers: bool,
    claimed: frozenset[str],
) -> pa.Table:
    """List first-level entries (runs as a Ray task): rows the driver made as they are, folders recursively."""
    tables = [batch.filter(pc.invert(batch["is_dir"])).select(LISTED_SCHEMA.names).cast(LISTED_SCHEMA)]
    for path in batch.filter(batch["is_dir"])["path"].to_pylist():
        found = root.call(lambda: root.fs.find(path, detail=True))  # noqa: B023
        files = (entry(i, real_root) for i in found.values() if i.get("type") != "directory")
        tables.append(unit_table(root, files, exts, containers, claimed))
    return pa.concat_tables(tables)


def _real_root(root: storage.Location) -> str | None:
    """The local prefix with its symlinks resolved, to tell links that leave it; None on S3."""
    return None if root.remote else os.path.realpath(root.path)


def _holds_any(root: storage.Location, folders: list[str], exts: tuple[str, ...]) -> bool:
    """Whether any file under the folders has one of exts: walked lazily, stopping at the first."""

    def search() -> bool:
        for folder in folders:
            for here, _, files in root.fs.walk(folder):
                inside = here[len(root.path.rstrip("/")) + 1 :]
                if not hidden(inside) and any(has_ext(f, exts) and not hidden(f) for f in files):
                    return True
        return False

    return root.call(search)


_NO_ROW = {"key": "", "uri": "", "size": 0, "version": "", "error": "", "collides": False}


def list_prefix(
    root: storage.Location, exts: tuple[str, ...], file_hint: str, files_per_task: int = 1, containers: bool = False
) -> ray.data.Dataset | None:
    """A dataset of LISTED_SCHEMA rows for every file under root with one of exts; None if there is none.

    Each sub-folder is listed by its own task; files directly under root (checked for
    collisions here, on the driver) go ``files_per_task`` to a task. ``containers``: the
    files are archives whose members are keyed below the archive's key, so an archive
    under another's key is refused too. ``file_hint`` says what to give instead when root is a file.
    """
    real_root = _real_root(root)
    entries = top_level(root, file_hint)
    folders = [e["name"] for e in entries if e["type"] == "directory" and not hidden(posixpath.basename(e["name"]))]
    top = unit_table(root, (entry(e, real_root) for e in entries if e["type"] != "directory"), exts, containers)
    if not top.num_rows and not _holds_any(root, folders, exts):
        return None
    items = [{"path": "", "is_dir": False, **row} for row in top.to_pylist()]
    for folder in folders:
        shown, utf8 = storage.utf8_name(folder)
        if utf8:
            items.append({"path": folder, "is_dir": True, **_NO_ROW})
        else:  # one error row for the folder: its files' paths could not be keys either
            key = shown.removeprefix(root.path.rstrip("/") + "/")
            error = f"{storage.NOT_UTF8} (a folder: nothing under it is read)"
            items.append(
                {"path": "", "is_dir": False, **_NO_ROW, "key": key, "uri": uri_of(root, shown), "error": error}
            )
    blocks = len(folders) + -(-top.num_rows // files_per_task)
    # Let a task's StorageError/DataError reach the driver as itself (Ray Data would wrap it in a
    # UserCodeException whose cause does not survive pickling), so the CLI prints its one line.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(blocks, 200)))
    kwargs = {
        "root": root,
        "exts": exts,
        "real_root": real_root,
        "containers": containers,
        "claimed": frozenset(top["key"].to_pylist()) if containers else frozenset(),
    }
    return ds.map_batches(_list_entries, fn_kwargs=kwargs, batch_size=1, batch_format="pyarrow")
