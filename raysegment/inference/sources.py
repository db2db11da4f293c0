"""Inference sources: turn INPUT into a Ray dataset of (key, source_uri, bytes, error) rows.

Kinds (``--source``, default ``auto``):
- ``files``: every image file under a prefix (recursive, extension filter, any case).
- ``tar``: every .tar / .tar.gz / .tgz under a prefix; each image member is a row
  keyed ``{archive path without extension}/{member path without extension}``.
- ``parquet``: Parquet tables with an image-bytes column (``--image-column``) and
  optionally a key column (``--key-column``).
- ``list``: a .txt file (one URI per line) or a Parquet file with a ``uri`` column.

Files and tar archives are listed in parallel by ``listing.list_prefix`` (the lister
nightly uses too): keys stream through Ray's object store, never one Python list.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from raysegment import storage
from raysegment.errors import DataError
from raysegment.inference.listing import ARCHIVE_EXTENSIONS, has_ext, list_prefix, path_of, strip_ext

LIST_EXTENSIONS = (".txt", ".parquet")
MAX_KEY_LENGTH = 512
BATCH_ROWS = 64


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
    return None


def _rows(keys: list[str], uris: list[str], data: list[bytes], errors: list[str]) -> dict[str, np.ndarray]:
    return {
        "key": np.asarray(keys, dtype=object),
        "source_uri": np.asarray(uris, dtype=object),
        "bytes": np.asarray(data, dtype=object),
        "error": np.asarray(errors, dtype=object),
    }


# Image files directly under INPUT are read this many batches to a task: a task per handful
# of files cost more in scheduling than the reads, and much bigger blocks hold back the
# first masks (an actor hands on a block when all of it is predicted).
BATCHES_PER_READ_TASK = 4


def _listed(root: storage.Location, exts: tuple[str, ...], files_per_task: int = 1) -> ray.data.Dataset:
    """(key, uri, size, version) of the files under INPUT; an empty prefix is an error."""
    ds = list_prefix(root, exts, "give a prefix (folder) or use --source list", files_per_task)
    if ds is None:
        raise DataError(f"{root.uri}: empty prefix, nothing to infer")
    return ds


def _read_each(keys: np.ndarray, uris: list[str], read: Callable[[int], bytes]) -> dict[str, np.ndarray]:
    """Rows for keys read one by one; an unsafe key or a failed read becomes an error row."""
    data, errors = [], []
    for i, key in enumerate(keys):
        problem = unsafe_key_reason(key)
        if problem:
            data.append(b"")
            errors.append(f"unsafe key: {problem}")
            continue
        try:
            data.append(read(i))
            errors.append("")
        except (OSError, storage.StorageError) as exc:
            if getattr(exc, "transient", False):
                raise  # the store is down, not the input bad: fail the job, keep the key undone
            data.append(b"")
            errors.append(f"cannot read: {exc}")
    return _rows(list(keys), uris, data, errors)


def read_files(batch: dict[str, np.ndarray], root: storage.Location) -> dict[str, np.ndarray]:
    """Read each listed file under root."""
    uris = [str(u) for u in batch["uri"]]
    return _read_each(batch["key"], uris, lambda i: root.call(lambda: root.fs.cat_file(path_of(root, uris[i]))))


def read_archives(
    batch: dict[str, np.ndarray], root: storage.Location, exts: tuple[str, ...]
) -> Iterator[dict[str, np.ndarray]]:
    """Stream the image members of each tar archive as rows, BATCH_ROWS at a time."""
    for key, uri in zip(batch["key"], batch["uri"]):
        keys: list[str] = []
        uris: list[str] = []
        data: list[bytes] = []
        errors: list[str] = []
        try:
            with root.fs.open(path_of(root, uri), "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile() or not has_ext(member.name, exts):
                        continue
                    member_key = f"{key}/{strip_ext(member.name)}"
                    keys.append(member_key)
                    uris.append(f"{uri}#{member.name}")
                    problem = unsafe_key_reason(strip_ext(member.name))
                    if problem:
                        data.append(b"")
                        errors.append(f"unsafe member name: {problem}")
                    else:
                        extracted = tar.extractfile(member)
                        data.append(extracted.read() if extracted else b"")
                        errors.append("")
                    if len(keys) >= BATCH_ROWS:
                        yield _rows(keys, uris, data, errors)
                        keys, uris, data, errors = [], [], [], []
        except (OSError, tarfile.TarError, EOFError) as exc:
            if root.remote and storage.is_transient(exc):
                raise storage.StorageError(f"{uri}: storage unreachable mid-archive ({exc})") from exc
            # A damaged archive is one error row; members read before the damage are kept.
            keys.append(f"{key}/(archive)")
            uris.append(uri)
            data.append(b"")
            errors.append(f"cannot read archive: {type(exc).__name__}: {exc}")
        if keys:
            yield _rows(keys, uris, data, errors)


def _parquet_rows(
    batch: dict[str, np.ndarray], uri: str, image_column: str, key_column: str | None
) -> dict[str, np.ndarray]:
    images = batch[image_column]
    n = len(images)
    keys = batch[key_column] if key_column else batch["__row"]
    return _rows(
        [str(k) for k in keys],
        [f"{uri}#{k}" for k in keys],
        [b if isinstance(b, bytes) else b"" for b in images],
        ["" if isinstance(b, bytes) and b else "empty or missing image bytes" for b in images] if n else [],
    )


def read_parquet_table(root: storage.Location, image_column: str, key_column: str | None) -> ray.data.Dataset:
    """Rows of Parquet image tables; keys from key_column, else file/row-number."""
    ds = ray.data.read_parquet(root.path, filesystem=root.arrow_fs(), include_paths=key_column is None)
    names = ds.schema().names
    if image_column not in names or (key_column and key_column not in names):
        raise DataError(
            f"{root.uri}: Parquet columns are {names}; set --image-column / --key-column to existing columns"
        )
    if key_column is None:
        prefix = root.path.rstrip("/") + "/"

        def add_row_keys(batch: dict[str, Any]) -> dict[str, Any]:
            paths = batch["path"]
            batch["__row"] = np.asarray(
                [
                    f"{strip_ext(p[len(prefix) :] if p.startswith(prefix) else posixpath.basename(p))}/{i}"
                    for i, p in enumerate(paths)
                ],
                dtype=object,
            )
            return batch

        # Row numbers are per file: one batch per file keeps them stable across runs.
        ds = ds.map_batches(add_row_keys, batch_size=None, batch_format="numpy")
    return ds.map_batches(
        _parquet_rows,
        fn_kwargs={"uri": root.uri, "image_column": image_column, "key_column": key_column},
        batch_format="numpy",
    )


def _uri_key(uri: str) -> str:
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    return strip_ext(rest.lstrip("/"))


LIST_ROWS = 4096  # URIs per block when streaming a list


def _list_rows(uris: list[str], keys: list[str] | None) -> dict[str, np.ndarray]:
    """(key, path) for the non-blank, non-comment URIs; keys from the list or from each URI."""
    out_keys, paths = [], []
    for i, raw in enumerate(uris):
        uri = (raw or "").strip()
        if uri and not uri.startswith("#"):
            out_keys.append(keys[i] if keys is not None else _uri_key(uri))
            paths.append(uri)
    return {"key": np.asarray(out_keys, dtype=object), "path": np.asarray(paths, dtype=object)}


def _read_list(batch: dict[str, np.ndarray], root: storage.Location) -> Iterator[dict[str, np.ndarray]]:
    """Stream a list file, LIST_ROWS URIs at a time (bounded memory for millions of URIs)."""
    with storage.storage_errors(root.uri), root.fs.open(root.path, "rb") as f:
        if root.path.lower().endswith(".parquet"):
            pf = pq.ParquetFile(f)
            columns = ["uri", "key"] if "key" in pf.schema_arrow.names else ["uri"]
            for rb in pf.iter_batches(batch_size=LIST_ROWS, columns=columns):
                keys = rb.column("key").to_pylist() if "key" in columns else None
                yield _list_rows(rb.column("uri").to_pylist(), keys)
            return
        lines: list[str] = []
        for raw in io.TextIOWrapper(f, encoding="utf-8"):
            lines.append(raw)
            if len(lines) == LIST_ROWS:
                yield _list_rows(lines, None)
                lines = []
        yield _list_rows(lines, None)


def list_uris(root: storage.Location) -> ray.data.Dataset:
    """(key, path) rows from a .txt list (one URI per line) or a Parquet list (`uri` column, and
    an optional `key` column; without one the key is the URI's path without extension).

    One task streams the file with pyarrow: `ray.data.read_parquet` starts footer-reader
    actors and costs seconds per execution (a minute on a loaded 2-node cluster).
    """
    if root.path.lower().endswith(".parquet"):
        with storage.storage_errors(root.uri), root.fs.open(root.path, "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
        if "uri" not in names:
            raise DataError(f"{root.uri}: a URI list in Parquet needs a 'uri' column (has {names})")
    elif not storage.exists(root):
        raise DataError(f"{root.uri}: URI list not found")
    ds = ray.data.from_items([{"list": root.uri}])
    return ds.map_batches(_read_list, fn_kwargs={"root": root}, batch_size=1, batch_format="numpy")


def read_uris(batch: dict[str, np.ndarray], endpoint_url: str | None, retry_s: float | None) -> dict[str, np.ndarray]:
    """Read each URI of a list source, with one filesystem per scheme and the job's retry deadline."""
    filesystems: dict[str, storage.Location] = {}

    def read(i: int) -> bytes:
        uri = str(batch["path"][i])
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        if scheme == "file":
            loc = storage.resolve(uri, endpoint_url)
        else:
            if scheme not in filesystems:
                filesystems[scheme] = storage.resolve(uri, endpoint_url, retry_s)
            loc = storage.Location(uri, filesystems[scheme].fs, uri.split("://", 1)[1], endpoint_url, retry_s)
        return loc.call(lambda: loc.fs.cat_file(loc.path))

    return _read_each(batch["key"], [str(u) for u in batch["path"]], read)


def detect_kind(root: storage.Location) -> str:
    """Guess the source kind from INPUT: a list file, Parquet tables, tar shards or image files."""
    low = root.path.lower()
    if low.endswith(".txt"):
        return "list"

    def look() -> str | list[str]:
        if not root.fs.exists(root.path):
            raise FileNotFoundError(root.path)
        if low.endswith(".parquet") and root.fs.isfile(root.path):
            with root.fs.open(root.path, "rb") as f:
                return "list" if "uri" in pq.ParquetFile(f).schema_arrow.names else "parquet"
        return [p for p, _ in zip(root.fs.find(root.path), range(1000))]

    sample = root.call(look)
    if isinstance(sample, str):
        return sample
    if sample and all(has_ext(p, ARCHIVE_EXTENSIONS) for p in sample):
        return "tar"
    if sample and all(p.lower().endswith(".parquet") for p in sample):
        return "parquet"
    return "files"


KeyFilter = Callable[[ray.data.Dataset], ray.data.Dataset]


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
) -> tuple[str, ray.data.Dataset]:
    """(kind, dataset of key/source_uri/bytes/error rows) for INPUT.

    ``keep`` drops keys already done; it runs on the listing where keys are known
    before reading (files, list) so skipped images are never read.
    """
    root = storage.resolve(uri, endpoint_url, retry_s)
    kind = detect_kind(root) if kind == "auto" else kind
    exts = tuple(extensions)  # lower-case with the dot: InferOptions normalises them
    if kind == "files":
        ds = keep(_listed(root, exts, BATCHES_PER_READ_TASK * batch_size)).map_batches(
            read_files, fn_kwargs={"root": root}, batch_format="numpy"
        )
    elif kind == "list":
        ds = keep(list_uris(root)).map_batches(
            read_uris, fn_kwargs={"endpoint_url": endpoint_url, "retry_s": root.retry_s}, batch_format="numpy"
        )
    elif kind == "tar":
        archives = _listed(root, ARCHIVE_EXTENSIONS)
        ds = keep(
            archives.map_batches(
                read_archives, fn_kwargs={"root": root, "exts": exts}, batch_size=1, batch_format="numpy"
            )
        )
    elif kind == "parquet":
        ds = keep(read_parquet_table(root, image_column, key_column))
    else:
        raise DataError(f"unknown source kind '{kind}'; use auto, files, tar, parquet or list")
    return kind, ds
