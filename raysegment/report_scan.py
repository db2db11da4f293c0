"""The report's one pass over an output's summaries: counts, class-share histograms, the first
errors (by key) and a sample of ok rows chosen by a hash of their key, kept in a `Scan` (all a report
holds in memory, whatever the number of rows).

The files are read as resume reads them, several in flight (`FILES_IN_FLIGHT`, in order), and only the
columns the scan uses, a row group at a time: a report over 62,500 small files read them one by one
(136 s), and a 100k-row file was decoded whole with its 18 columns.

Every figure of a `Scan` is the same whatever the order or grouping of the rows (counts; sums kept
exactly, `ExactSum`; the errors and samples first by a total order), so a scan can go on from an
earlier one. The pass writes its `Scan` as OUTPUT/report_tally.json, naming the summary files it
counted with their stamps (`output.summary_stamps`), and `infer`'s end-of-run report starts from that
tally and reads only the files added since: a run that added 5 rows to 1M read 1M for its report. A
tally is used only when each file it names is there with its stamp (compaction, --retry-errors and
nightly's rewrites replace files; --overwrite deletes it with the summaries), from this version, with
the class names of the summaries, and with as many samples as asked; else the pass reads every file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysegment import storage
from raysegment.inference import output as layout

log = logging.getLogger(__name__)

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


# Ok rows a scan samples (a report shows the first `samples` of them): a tally serves reports of up to this many.
TALLY_SAMPLES = 64
TALLY_VERSION = 1  # a tally written by another version (another layout) is not read: the pass reads every file
ERROR_FIELDS = ("key", "source_uri", "error", "run_id")


class ExactSum:
    """Column sums of floats kept exactly, each as an integer times a power of two: the same rows give the
    same sums in any order or grouping (a float sum depends on both), and `values` is each sum correctly
    rounded. Non-finite values (a NULL read as NaN) are left out, as `np.nansum` leaves out NaN."""

    CHUNK = 1 << 20  # rows per bincount: its float64 sums of 27-bit parts stay exact (under 2**53)

    def __init__(self, k: int, terms: list[list[int]] | None = None) -> None:
        self.terms: list[tuple[int, int]] = [(int(i), int(e)) for i, e in terms] if terms else [(0, 0)] * k

    def __len__(self) -> int:
        return len(self.terms)

    def add(self, values: np.ndarray) -> None:
        """Add each column of `values` (n x k; n values when k is 1) to its sum."""
        v = np.asarray(values, np.float64)
        v = v.reshape(len(v), -1)
        for start in range(0, len(v), self.CHUNK):
            self._add(v[start : start + self.CHUNK])

    def _add(self, v: np.ndarray) -> None:
        mant, exp = np.frexp(np.where(np.isfinite(v), v, 0.0))
        m = (mant * 2.0**53).astype(np.int64)  # exact: v = m * 2**(exp - 53)
        nonzero = m != 0
        if not nonzero.any():
            return
        base = int(exp[nonzero].min())
        off = np.where(nonzero, exp - base, 0).astype(np.int64)
        bins, k = int(off.max()) + 1, v.shape[1]
        index = (off * k + np.arange(k)).ravel()
        # m = hi * 2**26 + lo, each part summed per (exponent, column); no float rounding in either sum.
        hi = np.bincount(index, (m >> 26).ravel(), bins * k).reshape(bins, k)
        lo = np.bincount(index, (m & (2**26 - 1)).ravel(), bins * k).reshape(bins, k)
        for c in range(k):
            total = 0
            for b in np.flatnonzero((hi[:, c] != 0) | (lo[:, c] != 0)):
                total += ((int(hi[b, c]) << 26) + int(lo[b, c])) << int(b)
            self.terms[c] = _plus(self.terms[c], (total, base - 53))

    def values(self) -> np.ndarray:
        """Each column's sum, correctly rounded to a float."""
        return np.array([float(i << e) if e >= 0 else i / (1 << -e) for i, e in self.terms], np.float64)

    def state(self) -> list[list[int]]:
        return [[i, e] for i, e in self.terms]


def _plus(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """(integer, exponent) + (integer, exponent), exactly; trailing zero bits moved into the exponent."""
    if not b[0]:
        return a
    if not a[0]:
        i, e = b
    else:
        e = min(a[1], b[1])
        i = (a[0] << (a[1] - e)) + (b[0] << (b[1] - e))
    if not i:
        return 0, 0
    zeros = (i & -i).bit_length() - 1
    return i >> zeros, e + zeros


@dataclasses.dataclass
class RunFigures:
    """One run's rows in the summaries, and the sums of their stage times (the report's ms per image)."""

    rows: int = 0
    stages: ExactSum = dataclasses.field(default_factory=lambda: ExactSum(len(STAGES)))


@dataclasses.dataclass
class Scan:
    """What the report keeps from a pass over every summary row (and what its tally holds)."""

    class_names: list[str]
    capacity: int = TALLY_SAMPLES  # ok rows sampled, first by key hash (`samples`)
    run_id: str | None = None  # the run whose rows `run_rows` and `stage_sum` are
    rows: int = 0
    ok: int = 0
    error: int = 0
    hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, HIST_BINS), np.int64))
    shares: ExactSum = dataclasses.field(default_factory=lambda: ExactSum(0))
    present: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the MAX_ERRORS first by key
    samples: list[tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=list)  # (key hash, row)
    runs: dict[str, RunFigures] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # path below summaries/ -> stamp: those counted

    def __post_init__(self) -> None:
        if self.hist.shape[0] != len(self.class_names):
            self.resize(len(self.class_names))

    def resize(self, k: int) -> None:
        self.hist = np.zeros((k, HIST_BINS), np.int64)
        self.shares = ExactSum(k)
        self.present = np.zeros(k, np.int64)

    @property
    def share_sum(self) -> np.ndarray:
        """Per class, the sum of its pixel share over the ok rows."""
        return self.shares.values()

    @property
    def run_rows(self) -> int:
        figures = self.runs.get(self.run_id) if self.run_id is not None else None
        return figures.rows if figures else 0

    @property
    def stage_sum(self) -> dict[str, float]:
        figures = self.runs.get(self.run_id) if self.run_id is not None else None
        sums = figures.stages.values() if figures else np.zeros(len(STAGES))
        return {stage: float(v) for stage, v in zip(STAGES, sums)}

    def tally(self) -> dict[str, Any]:
        """What OUTPUT/report_tally.json holds (`from_tally` reads it back)."""
        return {
            "version": TALLY_VERSION,
            "hist_bins": HIST_BINS,
            "max_errors": MAX_ERRORS,
            "capacity": self.capacity,
            "class_names": self.class_names,
            "rows": self.rows,
            "ok": self.ok,
            "error": self.error,
            "hist": self.hist.tolist(),
            "shares": self.shares.state(),
            "present": self.present.tolist(),
            "errors": self.errors,
            "samples": [[h, row] for h, row in self.samples],
            "runs": {rid: [f.rows, f.stages.state()] for rid, f in self.runs.items()},
            "files": self.files,
        }

    @classmethod
    def from_tally(cls, data: dict[str, Any]) -> Scan:
        """A tally's scan; ValueError for one of another version or layout."""
        if (data.get("version"), data.get("hist_bins"), data.get("max_errors")) != (
            TALLY_VERSION,
            HIST_BINS,
            MAX_ERRORS,
        ):
            raise ValueError(f"version {data.get('version')}, not {TALLY_VERSION}")
        k = len(data["class_names"])
        scan = cls(
            [str(n) for n in data["class_names"]],
            capacity=int(data["capacity"]),
            rows=int(data["rows"]),
            ok=int(data["ok"]),
            error=int(data["error"]),
            hist=np.asarray(data["hist"], np.int64).reshape(k, HIST_BINS),
            shares=ExactSum(k, data["shares"]),
            present=np.asarray(data["present"], np.int64).reshape(k),
            errors=list(data["errors"]),
            samples=[(int(h), dict(row)) for h, row in data["samples"]],
            runs={str(rid): RunFigures(int(n), ExactSum(len(STAGES), st)) for rid, (n, st) in data["runs"].items()},
            files={str(p): str(s) for p, s in data["files"].items()},
        )
        if len(scan.shares) != k or any(len(f.stages) != len(STAGES) for f in scan.runs.values()):
            raise ValueError("sums of another shape")
        return scan


def _key_hash(key: str) -> int:
    # A hash, not a random draw: the same output always gives the same sample.
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _order(row: dict[str, Any], fields: tuple[str, ...]) -> tuple[str, ...]:
    return tuple("" if row.get(f) is None else str(row.get(f)) for f in fields)


def _sample_order(sample: tuple[int, dict[str, Any]]) -> tuple[int, tuple[str, ...]]:
    """Samples by key hash, then the row (rows of one key: an output whose keys collide)."""
    return sample[0], _order(sample[1], SAMPLE_FIELDS)


def _error_order(row: dict[str, Any]) -> tuple[str, ...]:
    return _order(row, ERROR_FIELDS)


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


def scan_summaries(output: storage.Location, samples: int, run_id: str | None, tally: bool = False) -> Scan:
    """Stream every summary row under OUTPUT into counts, histograms, errors and a sample of ok rows
    (again from the start if a compaction replaced files meanwhile: no row counted twice or missed), and write
    what it found as the report's tally. `tally`: start from the tally when it holds what is on storage (see
    the module's doc) and read only the files added since."""
    capacity = max(samples, TALLY_SAMPLES)

    def scan_once() -> tuple[Scan, dict[str, str], int]:
        summaries = layout.Summaries(output)
        files = {layout.relative_path(output, p): stamp for p, stamp in summaries.stamps.items()}
        scan = _prior(output, summaries.class_names, files, samples) if tally else None
        if scan is None:
            scan = Scan(summaries.class_names, capacity)
        todo = [p for p in summaries.paths if layout.relative_path(output, p) not in scan.files]
        before = scan.rows
        for batch in _coalesced(_batches(output, todo)):
            _add_batch(scan, batch)
        if scan.files:
            log.info(
                "report: %d summary rows from the tally, %d in %d files added since",
                before,
                scan.rows - before,
                len(todo),
            )
        return scan, files, len(todo)

    scan, files, read = layout.consistent(scan_once)
    if read or scan.files != files:
        scan.files = files
        _write_tally(output, scan)
    scan.run_id = run_id
    return scan


def _tally_location(output: storage.Location) -> storage.Location:
    return output.child(layout.REPORT_TALLY)


def _prior(output: storage.Location, class_names: list[str], files: dict[str, str], samples: int) -> Scan | None:
    """The tally's scan when every file it counted is there with its stamp (the rows it counted are those on
    storage), else None: then the pass reads every file."""
    loc = _tally_location(output)
    try:
        if not storage.exists(loc):
            return None
        scan = Scan.from_tally(json.loads(storage.read_bytes(loc)))
    except Exception as exc:  # unreadable, damaged or of another version: the pass reads every file
        log.info("report: %s not used (%s); every summary file is read", storage.redact(loc.uri), str(exc)[:200])
        return None
    why = None
    if not class_names or scan.class_names != class_names:
        why = "other class names"
    elif scan.capacity < samples:
        why = f"{scan.capacity} samples, {samples} asked"
    elif any(files.get(path) != stamp for path, stamp in scan.files.items()):
        why = "summary files it counted were replaced or removed (compaction, --retry-errors, a deleted file)"
    if why:
        log.info("report: %s not used (%s); every summary file is read", storage.redact(loc.uri), why)
        return None
    return scan


def _write_tally(output: storage.Location, scan: Scan) -> None:
    """Best effort: a report never fails for its tally (the next one then reads every file)."""
    loc = _tally_location(output)
    try:
        storage.write_bytes(loc, json.dumps(scan.tally(), separators=(",", ":")).encode())
    except Exception as exc:
        log.warning("report: its tally %s not written (%s)", storage.redact(loc.uri), str(exc)[:200])


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
                ahead.append((path, pool.submit(layout.fetch_summary, output, path)))
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


def _add_batch(scan: Scan, batch: pa.RecordBatch) -> None:
    n = batch.num_rows
    if not n:
        return
    names = batch.schema.names
    ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
    k = len(scan.class_names)
    if not k:  # no names in the metadata: number the classes
        k = max((len(v) for v in batch.column("class_fractions").to_pylist() if v), default=0)
        scan.class_names = [f"class {i}" for i in range(k)]
    if scan.hist.shape[0] != k:
        scan.resize(k)
    scan.rows += n
    scan.ok += int(ok.sum())
    scan.error += int(n - ok.sum())

    # Over ok rows only: error rows hold NULL class_fractions.
    shares = _shares(batch.column("class_fractions").filter(pa.array(ok)), int(ok.sum()), k)
    if shares.size:
        bins = np.clip((shares * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
        for c in range(k):
            scan.hist[c] += np.bincount(bins[:, c], minlength=HIST_BINS)
        scan.shares.add(shares)
        scan.present += (shares > 0).sum(axis=0)

    if "run_id" in names:  # every run's rows and stage times: the tally serves a report of any run
        runs = pc.dictionary_encode(pc.fill_null(batch.column("run_id"), ""))
        which = runs.indices.to_numpy(zero_copy_only=False)
        times = np.column_stack(
            [batch.column(s).to_numpy(zero_copy_only=False) if s in names else np.full(n, np.nan) for s in STAGES]
        )
        for i, rid in enumerate(runs.dictionary.to_pylist()):
            mine = which == i
            figures = scan.runs.setdefault(rid, RunFigures())
            figures.rows += int(mine.sum())
            figures.stages.add(times[mine])

    bad = np.flatnonzero(~ok)
    if bad.size:  # the MAX_ERRORS first by key (then run, error, source), whatever the order of the files
        taken = batch.take(pa.array(bad)).select(list(ERROR_FIELDS))
        keys = pc.fill_null(taken.column("key"), "")
        if len(scan.errors) >= MAX_ERRORS:
            taken = taken.filter(pc.less_equal(keys, scan.errors[-1]["key"] or ""))
            keys = pc.fill_null(taken.column("key"), "")
        if taken.num_rows > MAX_ERRORS:
            cut = keys.take(pc.sort_indices(keys))[MAX_ERRORS - 1]
            taken = taken.filter(pc.less_equal(keys, cut))
        if taken.num_rows:
            scan.errors = sorted(scan.errors + taken.to_pylist(), key=_error_order)[:MAX_ERRORS]

    good = np.flatnonzero(ok)
    if scan.capacity <= 0 or not good.size:
        return
    keys = batch.column("key").take(pa.array(good)).to_pylist()
    hashes = np.fromiter((_key_hash(key) for key in keys), np.uint64, len(keys))
    # Ties kept at both cuts (hash <= the cut): the sort by `_sample_order` below decides among them.
    chosen = np.arange(len(hashes))
    if len(scan.samples) >= scan.capacity:
        chosen = chosen[hashes <= np.uint64(scan.samples[-1][0])]
    if chosen.size > scan.capacity:
        cut = np.partition(hashes[chosen], scan.capacity - 1)[scan.capacity - 1]
        chosen = chosen[hashes[chosen] <= cut]
    if not chosen.size:
        return
    fields = [f for f in SAMPLE_FIELDS if f in names]
    rows = batch.take(pa.array(good[chosen])).select(fields).to_pylist()
    found = scan.samples + list(zip((int(h) for h in hashes[chosen]), rows))
    scan.samples = sorted(found, key=_sample_order)[: scan.capacity]
