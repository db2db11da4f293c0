"""The `list` layout: SOURCE is a CSV or Parquet file of `image,mask[,split]` URIs.

The form most teams keep in their data catalogue. Relative paths resolve against the list
file's folder; every entry must be in one store (local files, or s3://). A pair's key is its
image path without extension, relative to the deepest folder holding every listed image
(`imgs/a/x.png`, `imgs/b/y.png` -> `a/x`, `b/y`); two rows with one key are one error
naming both. An optional `split` column (train|val) gives the splits. Sizes come from one
listing per folder, not one request per file.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections import defaultdict
from dataclasses import dataclass

import pyarrow.parquet as pq

from raysegment import storage
from raysegment.data.layouts import SPLITS, Listing, Pair
from raysegment.errors import DataError

COLUMNS = ("image", "mask")


@dataclass(frozen=True)
class Row:
    where: str  # "line 3" (CSV, the header is line 1) or "row 3" (Parquet, 1-based)
    image: str
    mask: str
    split: str | None


def _csv_rows(text: str, uri: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader, [])]
    _check_columns(header, uri)
    col = {name: header.index(name) for name in (*COLUMNS, "split") if name in header}
    rows = []
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        cells = cells + [""] * (len(header) - len(cells))
        split = cells[col["split"]].strip().lower() if "split" in col else None  # Excel's 'Train ' too
        rows.append(Row(f"line {line}", cells[col["image"]].strip(), cells[col["mask"]].strip(), split))
    return rows


def _parquet_rows(data: bytes, uri: str) -> list[Row]:
    table = pq.read_table(io.BytesIO(data))
    _check_columns(table.column_names, uri)
    split = table.column("split").to_pylist() if "split" in table.column_names else None
    images, masks = table.column("image").to_pylist(), table.column("mask").to_pylist()
    return [
        Row(
            f"row {i + 1}",
            str(img or "").strip(),
            str(msk or "").strip(),
            str(split[i] or "").strip().lower() if split else None,
        )
        for i, (img, msk) in enumerate(zip(images, masks))
    ]


def _check_columns(names: list[str], uri: str) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{uri}: a pair list needs the columns image,mask[,split] (a header row in CSV); missing {missing}, has {names}"
        )


def _fs_path(uri: str) -> str:
    """The path the store's filesystem understands: bucket/key on S3, the absolute path locally."""
    return uri.split("://", 1)[1] if "://" in uri else posixpath.normpath(uri)


def _store(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "local"


def _read_rows(source: storage.Location) -> list[Row]:
    data = storage.read_bytes(source)
    if source.path.lower().endswith(".parquet"):
        try:
            return _parquet_rows(data, source.uri)
        except DataError:
            raise
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise DataError(f"{source.uri}: cannot read the pair list as Parquet: {exc}") from exc
    return _csv_rows(data.decode("utf-8-sig", errors="replace"), source.uri)


def _sizes(root: storage.Location, paths: list[str]) -> dict[str, int]:
    """Path -> size for the listed paths that exist: one listing per folder."""
    folders: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        folders[posixpath.dirname(path)].add(path)
    sizes: dict[str, int] = {}
    for folder, wanted in folders.items():

        def listing(folder: str = folder) -> list[dict]:
            try:
                return root.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return []  # every pair in it is reported as not found

        for info in root.call(listing):
            name = info["name"].rstrip("/")
            if name in wanted and info.get("type") != "directory":
                sizes[name] = int(info.get("size") or 0)
    return sizes


def _key_root(paths: list[str]) -> str:
    folders = [posixpath.dirname(p) for p in paths]
    return posixpath.commonpath(folders) if len({f.startswith("/") for f in folders}) == 1 else ""


def _backslash_hint(entry: str) -> str:
    """A list written on Windows (`imgs\\a.png`): here a backslash is part of a file name, not a folder."""
    return "; write paths with / (\\ is not a folder separator here)" if "\\" in entry else ""


def list_layout(source: storage.Location) -> Listing:
    """The pairs of a list file (CSV or Parquet, local or s3://)."""
    rows = _read_rows(source)
    if not rows:
        raise DataError(f"{source.uri}: the pair list has no rows")
    folder = source.uri.rsplit("/", 1)[0]
    for row in rows:
        if not row.image or not row.mask:
            raise DataError(f"{source.uri}: {row.where} has an empty image or mask; every row needs both")
        if row.split is not None and row.split not in SPLITS:
            raise DataError(f"{source.uri}: {row.where} has split '{row.split}'; the split column holds train or val")
    entries = [(storage.beside(r.image, folder), storage.beside(r.mask, folder)) for r in rows]
    stores = {_store(u) for pair in entries for u in pair}
    if len(stores) > 1:
        raise DataError(
            f"{source.uri}: the list mixes stores ({', '.join(sorted(stores))}); keep every image and mask in one store"
        )
    root = storage.resolve(entries[0][0], source.endpoint_url, source.retry_s)
    paths = [(_fs_path(img), _fs_path(msk)) for img, msk in entries]
    base = _key_root([img for img, _ in paths])
    sizes = _sizes(root, [p for pair in paths for p in pair])
    seen: dict[str, int] = {}
    pairs = []
    for i, (row, (img, msk)) in enumerate(zip(rows, paths)):
        key = posixpath.splitext(posixpath.relpath(img, base) if base else img.lstrip("/"))[0]
        if key in seen:
            first = rows[seen[key]]
            raise DataError(
                f"{source.uri}: {first.where} ({first.image}) and {row.where} ({row.image}) have the same key '{key}' "
                "(image path without extension below the images' common folder); remove or rename one"
            )
        seen[key] = i
        problem = None
        if img not in sizes:
            problem = f"image not found: {row.image}{_backslash_hint(row.image)}"
        elif msk not in sizes:
            problem = f"mask not found: {row.mask}{_backslash_hint(row.mask)}"
        pairs.append(Pair(key, img, msk, sizes.get(img, 0), sizes.get(msk, 0), row.split, problem))
    has_splits = rows[0].split is not None
    if not has_splits:
        return Listing(pairs, root=root)
    return Listing(pairs, split_source="the list's split column", splits_off="drop the split column", root=root)
