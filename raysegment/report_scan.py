"""The report's one pass over an output's summaries: counts, class-share histograms, the first
errors and a sample of ok rows chosen by a hash of their key, kept in a `Scan` (all a report holds
in memory, whatever the number of rows).

The files are read as resume reads them, several in flight (`FILES_IN_FLIGHT`, in order), and only the
columns the scan uses, a row group at a time: a report over 62,500 small files read them one by one
(136 s), and a 100k-row file was decoded whole with its 18 columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysegment import storage
from raysegment.errors import StorageError
from raysegment.inference import output as layout

HIST_BINS = 20
MAX_ERRORS = 200  # error rows listed in the page; the count covers all of them
SAMPLE_FIELDS = ("key", "source_uri", "mask_uri", "mask_offset", "mask_length", "run_id")
STAGES = ("decode_ms", "predict_ms", "write_ms")
# The columns `_add_batch` reads (the rest of a summary row is never read by a report).
SCAN_COLUMNS = ("key", "status", "error", "class_fractions", "run_id", *SAMPLE_FIELDS[1:-1], *STAGES)
FILES_IN_FLIGHT = 8  # summary files fetched ahead of the scan (on S3 a request each)
# Small files' rows are scanned together: one `_add_batch` per 16-row file cost more than its read. Not
# more: 64k rows held as 4,000 small batches took 90 MB more of the driver (100k rows in 16-row files).
BATCH_ROWS = 4096


@dataclasses.dataclass
class Scan:
    """What the report keeps from a pass over every summary row."""

    class_names: list[str]
    rows: int = 0
    ok: int = 0
    error: int = 0
    hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, HIST_BINS), np.int64))
    share_sum: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    present: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    samples: list[tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=list)
    run_rows: int = 0
    stage_sum: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


def _key_hash(key: str) -> int:
    # A hash, not a random draw: the same output always gives the same sample.
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _shares(column: pa.ChunkedArray | pa.Array, n: int, k: int) -> np.ndarray:
    """class_fractions (list<float>) -> n x k float array; short or NULL lists count as zeros."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if flat.size == n * k and (pc.min(pc.list_value_length(arr)).as_py() or 0) == k:
        return flat.reshape(n, k).astype(np.float64)
    out = np.zeros((n, k))
    for i, row in enumerate(arr.to_pylist()):
        vals = (row or [])[:k]
        out[i, : len(vals)] = vals
    return out


def scan_summaries(output: storage.Location, samples: int, run_id: str | None) -> Scan:
    """Stream every summary row under OUTPUT into counts, histograms, errors and a sample of ok rows
    (again from the start if a compaction replaced files meanwhile: no row counted twice or missed)."""

    def scan_once() -> Scan:
        summaries = layout.Summaries(output)
        scan = Scan(summaries.class_names)
        for batch in _coalesced(_batches(output, summaries.paths)):
            _add_batch(scan, batch, samples, run_id)
        scan.errors.sort(key=lambda e: e["key"])
        return scan

    return layout.consistent(scan_once)


def _fetch(output: storage.Location, path: str) -> bytes:
    """One summary file's bytes, under the output's retry deadline; SummariesChanged if compaction removed it."""
    try:
        return storage.call(output, lambda: output.fs.cat_file(path))
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise layout.SummariesChanged(path) from None
        raise


def _file_batches(output: storage.Location, path: str, data: bytes) -> Iterator[pa.RecordBatch]:
    """The scan's columns of one summary file, a row group at a time (pages checked, as `storage.read_table`)."""

    def damaged(exc: Exception) -> Exception:
        return storage.damaged_parquet(output, path, exc, layout.DAMAGED_SUMMARY)

    try:
        parquet = pq.ParquetFile(io.BytesIO(data), **storage.VERIFY_PAGES)
        names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:  # not Parquet, or cut short
        raise damaged(exc) from exc
    if not {"key", "status"} <= set(names):
        raise layout._not_a_summary(output, path, names)
    columns = [c for c in SCAN_COLUMNS if c in names]  # older runs lack some
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=columns)
        except (pa.ArrowException, OSError) as exc:  # OSError: a page's CRC
            raise damaged(exc) from exc
        yield from table.replace_schema_metadata(None).to_batches()


def _batches(output: storage.Location, paths: list[str]) -> Iterator[pa.RecordBatch]:
    """Every summary file's batches in the order of `paths`, with the next files fetched meanwhile."""
    pool = ThreadPoolExecutor(FILES_IN_FLIGHT, thread_name_prefix="report-read")
    ahead: deque[tuple[str, Future[bytes]]] = deque()
    todo = iter(paths)
    try:
        while True:
            while len(ahead) < FILES_IN_FLIGHT and (path := next(todo, None)) is not None:
                ahead.append((path, pool.submit(_fetch, output, path)))
            if not ahead:
                return
            path, data = ahead.popleft()
            yield from _file_batches(output, path, data.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _coalesced(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Consecutive batches of one schema as batches of up to about BATCH_ROWS rows (row order kept)."""
    held: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        if held and (rows + batch.num_rows > BATCH_ROWS or not batch.schema.equals(held[0].schema)):
            yield pa.Table.from_batches(held).combine_chunks().to_batches()[0] if len(held) > 1 else held[0]
            held, rows = [], 0
        held.append(batch)
        rows += batch.num_rows
    if held:
        yield pa.Table.from_batches(held).combine_chunks().to_batches()[0] if len(held) > 1 else held[0]


def _add_batch(scan: Scan, batch: pa.RecordBatch, samples: int, run_id: str | None) -> None:
    n = batch.num_rows
    if not n:
        return
    ok = pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False)
    k = len(scan.class_names)
    if not k:  # no names in the metadata: number the classes
        k = max((len(v) for v in batch.column("class_fractions").to_pylist() if v), default=0)
        scan.class_names = [f"class {i}" for i in range(k)]
    if scan.hist.shape[0] != k:
        scan.hist = np.zeros((k, HIST_BINS), np.int64)
        scan.share_sum = np.zeros(k)
        scan.present = np.zeros(k, np.int64)
    scan.rows += n
    scan.ok += int(ok.sum())
    scan.error += int(n - ok.sum())

    # Over ok rows only: error rows hold NULL class_fractions.
    shares = _shares(batch.column("class_fractions").filter(pa.array(ok)), int(ok.sum()), k)
    if shares.size:
        bins = np.clip((shares * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
        for c in range(k):
            scan.hist[c] += np.bincount(bins[:, c], minlength=HIST_BINS)
        scan.share_sum += shares.sum(axis=0)
        scan.present += (shares > 0).sum(axis=0)

    if run_id is not None:
        mine = pc.equal(batch.column("run_id"), run_id).to_numpy(zero_copy_only=False)
        scan.run_rows += int(mine.sum())
        for stage in STAGES:
            if stage in batch.schema.names:
                values = batch.column(stage).to_numpy(zero_copy_only=False)
                scan.stage_sum[stage] += float(np.nansum(values[mine]))

    bad = np.flatnonzero(~ok)
    room = MAX_ERRORS - len(scan.errors)
    if room > 0 and bad.size:
        taken = batch.take(pa.array(bad[:room])).select(["key", "source_uri", "error", "run_id"])
        scan.errors += taken.to_pylist()

    good = np.flatnonzero(ok)
    if samples <= 0 or not good.size:
        return
    keys = batch.column("key").take(pa.array(good)).to_pylist()
    hashes = np.fromiter((_key_hash(key) for key in keys), np.uint64, len(keys))
    limit = scan.samples[-1][0] if len(scan.samples) >= samples else None
    chosen = np.argsort(hashes)[:samples]
    if limit is not None:
        chosen = chosen[hashes[chosen] < limit]
    if not chosen.size:
        return
    fields = [f for f in SAMPLE_FIELDS if f in batch.schema.names]
    rows = batch.take(pa.array(good[chosen])).select(fields).to_pylist()
    scan.samples = sorted(scan.samples + list(zip((int(h) for h in hashes[chosen]), rows)), key=lambda s: s[0])[
        :samples
    ]
