"""The nightly ledger, read and compared with the listing by Ray tasks: a night's driver holds counts
and tonight's work, never the archive.

The ledger (OUTPUT/ledger/*.parquet, one row per input each time it was processed) grows with the
archive; so does the listing. Both stay in the object store:

- `build`: tasks read the ledger files (FILES_PER_TASK each) and return their rows sorted by the
  16-byte digest of the key (inference/resume.py's digests); one merge task per bucket (a range of
  the digest space, about ROWS_PER_BUCKET rows) keeps the latest row per key (by recorded_at) and
  returns, besides those rows, the lookup arrays: key digests (sorted), fingerprint digests (size,
  version, model) and whether the latest row is from tonight.
- `classify`: a listing batch gets its `change` (new, changed, unchanged, deferred) by binary search
  in its keys' buckets, fetched zero-copy; it runs as a Ray Data task over the listing.
- `compact`: past LEDGER_MAX_FILES files the merge tasks' latest rows become the ledger, one file
  per bucket, written by the tasks; the old files are deleted after (a night killed in between
  leaves both, which read the same: the latest row wins either way).

An input is up to date when the latest ledger row for its key has the same size, version (S3 ETag,
local mtime) and model hash; "deferred": changed again after being processed into tonight's
partition (the partition already holds a row for it; the next night picks it up).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from raysegment import storage
from raysegment.inference.listing import LISTING_SCHEMA
from raysegment.inference.resume import DIGEST, bucket_bounds, bucket_of, digests, span

LEDGER_SCHEMA = pa.schema(
    [
        *LISTING_SCHEMA,
        ("model_sha256", pa.string()),
        ("status", pa.string()),
        ("date", pa.string()),
        ("run_id", pa.string()),
        ("recorded_at", pa.string()),
    ]
)
LEDGER = "ledger"  # under OUTPUT
LEDGER_MAX_FILES = 16  # ledger files kept before `compact` merges them
FILES_PER_TASK = 4
ROWS_PER_BUCKET = 2_000_000
CHANGES = ("new", "changed", "unchanged", "deferred")


def fingerprints(sizes: pa.Array, versions: pa.Array, models: pa.Array) -> np.ndarray:
    """What must match for an input to be up to date, as one digest per row."""
    joined = pc.binary_join_element_wise(pc.cast(sizes, pa.string()), versions, models, "|")
    return digests(joined.to_pylist())


def _conformed(tables: list[pa.Table]) -> pa.Table:
    """Ledger files as one table of LEDGER_SCHEMA (files of earlier versions may order or type columns
    differently)."""
    return pa.concat_tables(
        [t.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA) for t in tables] or [LEDGER_SCHEMA.empty_table()]
    )


def _sorted_by_digest(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    keys = digests(table["key"].to_pylist())
    order = np.argsort(keys, kind="stable")  # stable: rows of one key keep their file order
    return table.take(pa.array(order)), keys[order]


DAMAGED_LEDGER = "delete it: the images it recorded count as new on the next night and are redone"


@ray.remote(num_cpus=0.25, num_returns=3)
def _read_group(root: storage.Location, paths: list[str]) -> tuple[int, pa.Table, np.ndarray]:
    """(rows, the rows of these ledger files sorted by key digest, those digests)."""
    tables = [storage.read_table(root, path, fix=DAMAGED_LEDGER) for path in paths]
    table, keys = _sorted_by_digest(_conformed(tables))
    return table.num_rows, table, keys


@ray.remote(num_cpus=0.25, num_returns=3)
def _group_of(table: pa.Table) -> tuple[int, pa.Table, np.ndarray]:
    """`_read_group` for a table already in memory (tests, and `plan` on tables)."""
    table, keys = _sorted_by_digest(_conformed([table]))
    return table.num_rows, table, keys


@dataclass(frozen=True)
class Lookup:
    """One bucket's latest rows, as the classifier searches them."""

    keys: np.ndarray  # sorted distinct key digests
    fingerprints: np.ndarray  # of each key's latest row
    tonight: np.ndarray  # bool: the latest row is from tonight's date


@ray.remote(num_cpus=0.25, num_returns=3)
def _merge_bucket(b: int, buckets: int, date: str, groups: int, *parts: Any) -> tuple[int, pa.Table, Lookup]:
    """(keys, the latest row per key in bucket b, its Lookup). `parts`: every group's table, then its digests."""
    lo, hi = bucket_bounds(b, buckets)
    tables, keys = [], []
    for table, values in zip(parts[:groups], parts[groups:]):
        start, stop = span(values, lo, hi)
        tables.append(table.slice(start, stop - start))
        keys.append(values[start:stop])
    table = pa.concat_tables(tables) if tables else LEDGER_SCHEMA.empty_table()
    values = np.concatenate(keys) if keys else np.zeros(0, DIGEST)
    # Latest per key: order by (digest, recorded_at), stable, and keep each digest's last row.
    order = np.lexsort((np.asarray(table["recorded_at"].to_pylist(), dtype=str), values))
    values = values[order]
    last = np.ones(len(values), bool)
    last[:-1] = values[1:] != values[:-1]
    latest = table.take(pa.array(order[last]))
    lookup = Lookup(
        values[last],
        fingerprints(latest["size"], latest["version"], latest["model_sha256"]),
        np.asarray(pc.equal(latest["date"], date).to_numpy(zero_copy_only=False), bool),
    )
    return latest.num_rows, latest, lookup


@dataclass(frozen=True)
class LedgerIndex:
    """The latest ledger row per key, in buckets held by the object store (refs)."""

    lookups: list[Any] = field(default_factory=list)
    latest: list[Any] = field(default_factory=list)
    rows: int = 0
    keys: int = 0
    files: list[str] = field(default_factory=list)


def _index(groups: list[Any], date: str, rows_per_bucket: int, files: list[str]) -> LedgerIndex:
    rows = sum(ray.get([g[0] for g in groups]))
    if not rows:
        return LedgerIndex(files=files)
    buckets = max(1, math.ceil(rows / rows_per_bucket))
    parts = [g[1] for g in groups] + [g[2] for g in groups]
    merged = [_merge_bucket.remote(b, buckets, date, len(groups), *parts) for b in range(buckets)]
    keys = sum(ray.get([m[0] for m in merged]))
    return LedgerIndex([m[2] for m in merged], [m[1] for m in merged], rows, keys, files)


def build(output: storage.Location, date: str, rows_per_bucket: int = ROWS_PER_BUCKET) -> LedgerIndex:
    """The index of OUTPUT's ledger for tonight's `date` (read by tasks)."""
    root = output.child(LEDGER)
    paths = storage.parquet_files(root)
    groups = [_read_group.remote(root, paths[i : i + FILES_PER_TASK]) for i in range(0, len(paths), FILES_PER_TASK)]
    return _index(groups, date, rows_per_bucket, paths)


def index_of(table: pa.Table, date: str, rows_per_bucket: int = ROWS_PER_BUCKET) -> LedgerIndex:
    """The index of ledger rows held in memory."""
    return _index([_group_of.remote(table)] if table.num_rows else [], date, rows_per_bucket, [])


def classify(batch: pa.Table, lookups: list[list[Any]], model_sha256: str) -> pa.Table:
    """A listing batch with its `change` column (`lookups`: [the index's bucket refs], wrapped so
    Ray Data passes the refs, not their values)."""
    n = batch.num_rows
    mine = fingerprints(batch["size"], batch["version"], pa.array([model_sha256] * n, pa.string()))
    found, same, tonight = look_up(lookups[0], digests(batch["key"].to_pylist()), mine)
    change = np.where(~found, "new", np.where(same, "unchanged", np.where(tonight, "deferred", "changed")))
    return batch.append_column("change", pa.array(change.astype(object), pa.string()))


def look_up(
    buckets: list[Any], keys: np.ndarray, mine: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each key digest, against the index's bucket refs: (in the ledger, its latest row's fingerprint is
    `mine`'s (all False without `mine`), its latest row is from tonight's date)."""
    n = len(keys)
    found, same, tonight = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    if not buckets or not n:
        return found, same, tonight
    which = bucket_of(keys, len(buckets))
    for b in np.unique(which):
        lookup: Lookup = ray.get(buckets[int(b)])
        rows = np.flatnonzero(which == b)
        if not len(lookup.keys):
            continue
        pos = np.minimum(np.searchsorted(lookup.keys, keys[rows]), len(lookup.keys) - 1)
        hit = lookup.keys[pos] == keys[rows]
        found[rows] = hit
        if mine is not None:
            same[rows] = hit & (lookup.fingerprints[pos] == mine[rows])
        tonight[rows] = hit & lookup.tonight[pos]
    return found, same, tonight


def compact(output: storage.Location, index: LedgerIndex, name: str) -> int:
    """Past LEDGER_MAX_FILES files, replace the ledger by the index's latest rows (one file per
    bucket, written by tasks, then the old files deleted). Returns the files replaced (0: left alone)."""
    if len(index.files) <= LEDGER_MAX_FILES:
        return 0
    root = output.child(LEDGER)
    ray.get(
        [_write.remote(root.child(f"part-{name}-compacted-{b:04d}.parquet"), t) for b, t in enumerate(index.latest)]
    )
    for path in index.files:
        root.call(lambda path=path: root.fs.rm_file(path))
    return len(index.files)


@ray.remote(num_cpus=0.25)
def _write(loc: storage.Location, table: pa.Table) -> None:
    write_parquet(loc, table)


def write_parquet(loc: storage.Location, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, **storage.PAGE_CHECKSUMS)
    storage.write_bytes(loc, buf.getvalue())


def read(output: storage.Location) -> pa.Table:
    """Every ledger row under OUTPUT (small ledgers: tests and tools; the night itself uses `build`)."""
    root = output.child(LEDGER)
    tables = [storage.read_table(root, path, fix=DAMAGED_LEDGER) for path in storage.parquet_files(root)]
    return _conformed(tables)
