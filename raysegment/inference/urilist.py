"""The ``list`` source's listing: (key, path) rows from a .txt file (one URI per line) or a
Parquet file (a ``uri`` column, optional ``key`` and ``error`` columns).

One task streams the file with pyarrow in LIST_ROWS blocks, so a list of millions of
URIs is read in bounded memory; `ray.data.read_parquet` starts footer-reader actors
and costs seconds per execution (a minute on a loaded 2-node cluster). The task reads
the list twice: first for key collisions (``collisions.duplicated``: a hash per key),
then to emit rows. A URI listed twice under one key is read once; different URIs
under one key are error rows, as are URIs that name this job's own outputs. An
``error`` column (nightly writes one) carries problems its lister found: such rows
are not read. The task asks for a quarter CPU: resources unlike the readers' keep Ray
Data from fusing the images' reads into this one task (`sources.source_rows` cuts its
rows into read-task blocks that spread over the cluster).
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from raysegment import storage
from raysegment.errors import DataError
from raysegment.inference import collisions
from raysegment.inference.listing import strip_ext
from raysegment.inference.overlap import OutputParts

LIST_ROWS = 4096  # URIs per block when streaming a list
FIX = "rename one or give it its own key (a Parquet list's key column), then re-run with --overwrite"


@dataclasses.dataclass
class Block:
    """Entries of a list, blank and comment lines dropped."""

    keys: list[str] = dataclasses.field(default_factory=list)
    paths: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)


CREDENTIALS_IN_URI = (
    "the URI holds credentials (user:secret@), which are never read from a list nor kept: give them through "
    "the environment or the AWS config (README: Storage and credentials) and list the URI without them"
)


def _uri_key(uri: str) -> str:
    """The URI's path without its extension. An "extension" holding a space is none (`a.png  # note`, a
    comment after an entry): stripped, that line took the key of `a.png` on the line before, and both
    became collision rows; kept whole, it is a missing file's error row of its own."""
    rest = (uri.split("://", 1)[1] if "://" in uri else uri).lstrip("/")
    return rest if any(c.isspace() for c in posixpath.splitext(rest)[1]) else strip_ext(rest)


def _block(
    uris: list[str | None],
    keys: list[str | None] | None,
    errors: list[str | None] | None,
    folder: str,
    first_row: int | None = None,
) -> Block:
    """The non-blank, non-comment URIs, relative ones below the list's `folder`; keys from the list or from
    each URI. In a Parquet table (`first_row`: the batch's first row number) a row that names a key is an
    input whatever its uri: without one it is an error row under that key, never dropped like a blank line."""
    block = Block()
    for i, raw in enumerate(uris):
        uri = (raw or "").strip()
        # A key is a value that is not null or empty text: an integer key 0 is a key.
        keyed = first_row is not None and keys is not None and keys[i] is not None and str(keys[i]) != ""
        if keyed and not uri:
            block.keys.append(str(keys[i]))
            block.paths.append("")
            block.errors.append(f"row {first_row + i} of the list has no uri")
            continue
        if uri and (keyed or not uri.startswith("#")):
            uri = storage.beside(uri, folder)
            error = str(errors[i] or "") if errors is not None else ""
            if storage.redact(uri) != uri:  # never read, nor kept in a key, a summary or a log
                uri, error = storage.redact(uri), CREDENTIALS_IN_URI
            block.keys.append(("" if keys[i] is None else str(keys[i])) if keys is not None else _uri_key(uri))
            block.paths.append(uri)
            block.errors.append(error)
    return block


def _lines(f: Any, uri: str) -> Iterator[str]:
    """A text list's lines; one that is not UTF-8 stops the job with its line number (a file name
    decoded wrongly would be read as another file's, or as none)."""
    for n, raw in enumerate(f, 1):
        try:
            yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DataError(
                f"{uri}: line {n} is not UTF-8 text; a URI list is UTF-8, one URI per line: "
                "convert it (iconv -t UTF-8) and run again"
            ) from None


def _blocks(root: storage.Location) -> Iterator[Block]:
    """Stream a list file, LIST_ROWS URIs at a time."""
    folder = posixpath.dirname(root.uri)
    with storage.storage_errors(root.uri), root.fs.open(root.path, "rb") as f:
        if root.path.lower().endswith(".parquet"):
            pf = pq.ParquetFile(f)
            columns = [c for c in ("uri", "key", "error") if c in pf.schema_arrow.names]
            first = 0
            for rb in pf.iter_batches(batch_size=LIST_ROWS, columns=columns):
                column = {c: rb.column(c).to_pylist() for c in columns}
                yield _block(column["uri"], column.get("key"), column.get("error"), folder, first)
                first += rb.num_rows
            return
        lines: list[str | None] = []
        for line in _lines(f, root.uri):
            lines.append(line)
            if len(lines) == LIST_ROWS:
                yield _block(lines, None, None, folder)
                lines = []
        yield _block(lines, None, None, folder)


def _marked(
    block: Block, clashes: dict[str, list[str]], emitted: set[tuple[str, str]], parts: OutputParts | None
) -> dict[str, np.ndarray]:
    """The block's rows with collisions and outputs marked; a URI already emitted under its key is left out."""
    keys, paths, errors, collides = [], [], [], []
    for key, path, error in zip(block.keys, block.paths, block.errors):
        collide = False
        folded = collisions.fold(key) if clashes else key
        if folded in clashes:
            if (folded, path) in emitted:
                continue  # the same URI listed again under the same key: read once
            emitted.add((folded, path))
            names = list(dict.fromkeys(clashes[folded]))
            if len(names) > 1:
                error, collide = collisions.message(names, key, FIX), True
        keys.append(key)
        paths.append(path)
        errors.append(error or (parts.problem(path) if parts else ""))
        collides.append(collide)
    return {
        "key": np.asarray(keys, dtype=object),
        "path": np.asarray(paths, dtype=object),
        "error": np.asarray(errors, dtype=object),
        "collides": np.asarray(collides, bool),
    }


def _read_list(
    batch: dict[str, np.ndarray], root: storage.Location, parts: OutputParts | None
) -> Iterator[dict[str, np.ndarray]]:
    """Runs as the one task that streams the list: collisions first (a pass retried whole under the
    job's storage deadline), then the rows (a stream: a store lost mid-way fails the task, and the run)."""
    clashes = root.call(lambda: collisions.duplicated(lambda: ((b.keys, b.paths) for b in _blocks(root))))
    emitted: set[tuple[str, str]] = set()
    for block in _blocks(root):
        yield _marked(block, clashes, emitted, parts)


def list_uris(root: storage.Location, output: storage.Location | None = None) -> ray.data.Dataset:
    """(key, path, error, collides) rows of a URI list; entries under OUTPUT's own folders are error rows."""
    if root.path.lower().endswith(".parquet"):

        def columns() -> list[str]:
            with root.fs.open(root.path, "rb") as f:
                return pq.ParquetFile(f).schema_arrow.names

        names = root.call(columns)
        if "uri" not in names:
            raise DataError(f"{root.uri}: a URI list in Parquet needs a 'uri' column (has {names})")
    elif not storage.exists(root):
        raise DataError(f"{root.uri}: URI list not found")
    # An empty list would "finish" with nothing done; read up to its first entry to refuse it here.
    if not root.call(lambda: any(block.paths for block in _blocks(root))):
        raise DataError(f"{root.uri}: the URI list names no images (only blank or comment lines); nothing to infer")
    parts = OutputParts.of(output) if output is not None else None
    ds = ray.data.from_items([{"list": root.uri}])
    return ds.map_batches(
        _read_list, fn_kwargs={"root": root, "parts": parts}, batch_size=1, batch_format="numpy", num_cpus=0.25
    )
