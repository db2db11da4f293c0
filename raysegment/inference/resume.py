"""Which keys earlier runs finished, found and checked by Ray tasks: resume at archive scale.

A key is done when a summary row holds it. The driver lists the summary files (names only) and
hands them to tasks, up to FILES_PER_TASK at a time; each task reads the `key` and `model_sha256`
columns of its files (several requests in flight) and returns, as objects the driver never
fetches, the sorted 128-bit digests of its keys and of their Unicode-folded forms, plus a few
figures (rows, model hashes). One merge task per range of the digest space (a bucket, about
KEYS_PER_BUCKET keys) then keeps the distinct digests of its range. The filter (`drop_done`)
hashes a batch's keys and looks each up by binary search in its bucket, fetched zero-copy from
the object store. The end-of-run check (one row per key) reads only the run's own summary files and merges
their digests into the index built at the start, a task per bucket (`extend`); the whole index is built again
only when other files changed meanwhile (a compaction).

So the driver's memory and time grow with the number of summary files, never with the number of
keys done, and a batch's filter costs a few microseconds instead of unpickling every done key.
Digests, not keys: 16 bytes a key whatever its length; two keys share a digest with odds of
about n^2 / 2^129 (1e-26 for a billion keys).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray

from raysegment import storage
from raysegment.inference import collisions
from raysegment.inference import output as layout

FILES_PER_TASK = 16
MIN_TASKS = 64
KEYS_PER_BUCKET = 4_000_000
READ_THREADS = 8
DIGEST = np.dtype("S16")

log = logging.getLogger(__name__)


def digests(keys: Iterable[Any]) -> np.ndarray:
    """The keys' 16-byte blake2b digests, one per key, as an S16 array (sortable, searchable)."""
    joined = b"".join(hashlib.blake2b(str(k).encode("utf-8", "surrogateescape"), digest_size=16).digest() for k in keys)
    return np.frombuffer(joined, DIGEST).copy()


def bucket_of(values: np.ndarray, buckets: int) -> np.ndarray:
    """Each digest's bucket: its first two bytes, spread evenly over `buckets`."""
    if buckets == 1 or not values.size:
        return np.zeros(values.size, np.int64)
    raw = values.view(np.uint8).reshape(-1, 16)
    head = raw[:, 0].astype(np.int64) << 8 | raw[:, 1]
    return head * buckets >> 16


def bucket_bounds(b: int, buckets: int) -> tuple[bytes, bytes | None]:
    """The digest range of bucket b: [lo, hi), hi None for the last."""

    def start(i: int) -> bytes:
        head = -(-(i << 16) // buckets)  # the smallest 16-bit head that falls in bucket i
        return head.to_bytes(2, "big") + bytes(14)

    return start(b), start(b + 1) if b + 1 < buckets else None


@dataclass(frozen=True)
class GroupFigures:
    rows: int
    ok: int  # rows with status ok (an output whose rows are all errors segmented nothing)
    models: frozenset[str]
    changed: bool  # a file went away while read (compaction): the index must be built again


@ray.remote(num_cpus=0.25, num_returns=3)
def _read_group(
    output: storage.Location, paths: list[str], without_errors: bool = False
) -> tuple[GroupFigures, np.ndarray, np.ndarray]:
    """(figures, sorted distinct digests of the keys, the same of their folded forms) for these files;
    `without_errors`: of their rows but the error rows (`compact.drop_error_rows` keeps the same), the
    model hashes still of every row."""

    def read(path: str) -> Any:
        try:
            return layout.read_summary(output, path, ["key", "model_sha256", "status"])
        except layout.SummariesChanged:
            return None

    with ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:
        tables = list(pool.map(read, paths))
    if any(t is None for t in tables):
        empty = np.zeros(0, DIGEST)
        return GroupFigures(0, 0, frozenset(), True), empty, empty
    models = frozenset(m for t in tables for m in t.column("model_sha256").unique().to_pylist() if m)
    if without_errors:
        tables = [t.filter(pc.invert(pc.equal(t.column("status"), "error"))) for t in tables]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    exact = np.unique(digests(keys))
    folded = np.unique(digests(collisions.fold(k) for k in keys))
    ok = sum(pc.sum(pc.equal(t.column("status"), "ok")).as_py() or 0 for t in tables)
    return GroupFigures(len(keys), ok, models, False), exact, folded


def span(values: np.ndarray, lo: bytes, hi: bytes | None) -> tuple[int, int]:
    """(start, stop) of the sorted digests in [lo, hi)."""
    start = int(np.searchsorted(values, np.asarray(lo, DIGEST)))
    stop = len(values) if hi is None else int(np.searchsorted(values, np.asarray(hi, DIGEST)))
    return start, stop


def _slice(values: np.ndarray, lo: bytes, hi: bytes | None) -> np.ndarray:
    start, stop = span(values, lo, hi)
    return values[start:stop]


@ray.remote(num_cpus=0.25, num_returns=3)
def _merge_bucket(
    b: int, buckets: int, groups: int, *arrays: np.ndarray
) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """((distinct keys, distinct folded keys) in bucket b, the sorted distinct key digests of it, the same of
    the folded keys in its range).

    `arrays` are every group's exact digests, then every group's folded digests."""
    lo, hi = bucket_bounds(b, buckets)
    exact = np.unique(np.concatenate([_slice(a, lo, hi) for a in arrays[:groups]] or [np.zeros(0, DIGEST)]))
    folded = np.unique(np.concatenate([_slice(a, lo, hi) for a in arrays[groups:]] or [np.zeros(0, DIGEST)]))
    return (len(exact), len(folded)), exact, folded


def _absent(held: np.ndarray, values: np.ndarray) -> int:
    """How many of the sorted distinct `values` the sorted `held` lacks."""
    if not len(held):
        return len(values)
    pos = np.minimum(np.searchsorted(held, values), len(held) - 1)
    return int((held[pos] != values).sum())


@ray.remote(num_cpus=0.25)
def _extend_bucket(
    b: int, buckets: int, groups: int, exact: np.ndarray, folded: np.ndarray, *arrays: np.ndarray
) -> tuple[int, int]:
    """(distinct keys, distinct folded keys) in bucket b once the new files' digests (`arrays`, as for
    `_merge_bucket`) join the bucket's `exact` and `folded` digests."""
    lo, hi = bucket_bounds(b, buckets)
    new = np.unique(np.concatenate([_slice(a, lo, hi) for a in arrays[:groups]] or [np.zeros(0, DIGEST)]))
    new_folded = np.unique(np.concatenate([_slice(a, lo, hi) for a in arrays[groups:]] or [np.zeros(0, DIGEST)]))
    return len(exact) + _absent(exact, new), len(folded) + _absent(folded, new_folded)


@dataclass(frozen=True)
class DoneIndex:
    """What the summaries under an output hold: `keys` distinct keys (their digests in `buckets`,
    object refs), `folded` distinct keys once Unicode forms are folded, `rows` rows, and the model
    hashes that wrote them. More rows than folded keys: two inputs shared a key."""

    buckets: list[Any] = field(default_factory=list)
    keys: int = 0
    folded: int = 0
    rows: int = 0
    ok: int = 0
    models: frozenset[str] = frozenset()
    files: int = 0
    folded_buckets: list[Any] = field(default_factory=list)  # the folded digests in each bucket's range
    paths: tuple[str, ...] = ()  # the summary files it holds (`extend` tells what was added since)

    def __bool__(self) -> bool:
        return self.keys > 0


def build(
    output: storage.Location, keys_per_bucket: int = KEYS_PER_BUCKET, attempts: int = 5, without_errors: bool = False
) -> DoneIndex:
    """The index of every summary row under OUTPUT (again from the start if compaction changed the
    files while they were read). `without_errors` (`infer --retry-errors`): the index OUTPUT has once its
    error rows are dropped, so their keys are inputs again; `models` is still of every row."""
    for _ in range(attempts):
        index = _build_once(output, keys_per_bucket, without_errors)
        if index is not None:
            return index
    raise layout.SummariesChanged(f"{output.uri}: summaries kept changing while read; is a compaction looping?")


def _build_once(output: storage.Location, keys_per_bucket: int, without_errors: bool) -> DoneIndex | None:
    try:
        paths = layout.summary_files(output)
    except layout.SummariesChanged:
        return None
    if not paths:
        return DoneIndex()
    groups = _groups(output, paths, without_errors)
    figures: list[GroupFigures] = ray.get([g[0] for g in groups])
    if any(f.changed for f in figures):
        return None
    rows = sum(f.rows for f in figures)
    buckets = max(1, math.ceil(rows / keys_per_bucket))
    arrays = [g[1] for g in groups] + [g[2] for g in groups]
    merged = [_merge_bucket.remote(b, buckets, len(groups), *arrays) for b in range(buckets)]
    counts = ray.get([m[0] for m in merged])
    return DoneIndex(
        buckets=[m[1] for m in merged],
        keys=sum(c[0] for c in counts),
        folded=sum(c[1] for c in counts),
        rows=rows,
        ok=sum(f.ok for f in figures),
        models=frozenset().union(*(f.models for f in figures)),
        files=len(paths),
        folded_buckets=[m[2] for m in merged],
        paths=tuple(paths),
    )


def _groups(output: storage.Location, paths: list[str], without_errors: bool = False) -> list[Any]:
    # Few large files (100k rows each) get a task each; many small ones (older outputs) go 16 a task.
    per_task = max(1, min(FILES_PER_TASK, math.ceil(len(paths) / MIN_TASKS)))
    return [_read_group.remote(output, paths[i : i + per_task], without_errors) for i in range(0, len(paths), per_task)]


def after_run(output: storage.Location, index: DoneIndex, run_id: str) -> DoneIndex:
    """The counts of every summary row under OUTPUT after run `run_id`, whose index at its start was `index`:
    by `extend` when the run only added its own files, else built again (`build`). Counts only: no buckets."""
    extended = extend(output, index, output.child(layout.SUMMARIES, f"run={run_id}").path.rstrip("/") + "/")
    return build(output) if extended is None else extended


def extend(output: storage.Location, index: DoneIndex, added_under: str) -> DoneIndex | None:
    """`index` with the summary files under `added_under` (a folder's path, with its '/') read and merged in,
    a task per bucket: at 1M keys, a run that added 5 rows read 1M again (20 s) for its end-of-run check.
    None when OUTPUT's other files are not those `index` holds (compaction replaced them meanwhile; an index
    without files): then build it again. Counts only, without bucket refs."""
    try:
        paths = layout.summary_files(output)
    except layout.SummariesChanged:
        return None
    added = [p for p in paths if p.startswith(added_under)]
    if (
        not index.paths
        or set(paths).difference(added) != set(index.paths)
        or len(index.folded_buckets) != len(index.buckets)
    ):
        return None
    if not added:
        return index
    groups = _groups(output, added)
    figures: list[GroupFigures] = ray.get([g[0] for g in groups])
    # More rows than the start index held: its buckets were sized for fewer keys (one task would merge them
    # all), so the index is built again, bucketed for all of them.
    if any(f.changed for f in figures) or sum(f.rows for f in figures) > index.rows:
        return None
    arrays = [g[1] for g in groups] + [g[2] for g in groups]
    buckets = len(index.buckets)
    counts = ray.get(
        [
            _extend_bucket.remote(b, buckets, len(groups), index.buckets[b], index.folded_buckets[b], *arrays)
            for b in range(buckets)
        ]
    )
    return DoneIndex(
        keys=sum(c[0] for c in counts),
        folded=sum(c[1] for c in counts),
        rows=index.rows + sum(f.rows for f in figures),
        ok=index.ok + sum(f.ok for f in figures),
        models=index.models.union(*(f.models for f in figures)),
        files=len(paths),
        paths=tuple(paths),
    )


def known(values: np.ndarray, buckets: list[Any]) -> np.ndarray:
    """Which of these digests the index holds (`buckets`: the index's bucket refs, each fetched
    zero-copy from the object store the first time a digest falls in it)."""
    which = bucket_of(values, len(buckets))
    found = np.zeros(len(values), bool)
    for b in np.unique(which):
        held = ray.get(buckets[int(b)])
        mine = which == b
        if len(held):
            pos = np.minimum(np.searchsorted(held, values[mine]), len(held) - 1)
            found[mine] = held[pos] == values[mine]
    return found


class SkipTally:
    """A run's count of the inputs its filters found done (the run record's `skipped`): a zero-CPU actor each
    filter task adds its batch's count to. The size of the index was shown instead, so an OUTPUT of 960
    rows given 5 new images said "960 already done"; counted per batch, the driver never sees a key.

    Counts are kept by batch id (`batch_id`, from what was skipped), so a task Ray runs again (a retry after
    a worker died, a block rebuilt from its lineage) sets its batch's count again instead of adding it twice."""

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}

    def add(self, batch: bytes, n: int) -> None:
        self.counts[batch] = n

    def total(self) -> int:
        return sum(self.counts.values())


def start_tally() -> Any:
    return ray.remote(SkipTally).options(num_cpus=0).remote()


def batch_id(*parts: bytes) -> bytes:
    """A 16-byte id of what a task skipped (the digests of the keys it dropped; an archive's stamp): the same
    when Ray runs the task again."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.digest()


def count_skipped(tally: Any, batch: bytes, n: int) -> None:
    """Set batch `batch`'s count of skipped inputs in the run's tally, waiting for it: once the stream has
    ended, every filter task has counted (a call still in flight would be lost to the record). Best effort:
    the count is only for the record, so a tally that is gone (its actor died with its node) is logged,
    never a failed task; the run then records `skipped` as 0 (`skipped_total`)."""
    if tally is None or not n:
        return
    try:
        ray.get(tally.add.remote(batch, n))
    except ray.exceptions.RayActorError as exc:  # ActorDiedError, ActorUnavailableError
        log.warning("infer: %d skipped inputs not counted, the run's tally is gone: %s", n, exc)


def skipped_total(tally: Any) -> int:
    """The run's count of inputs found done (0 when none were, or when the tally is gone: then logged)."""
    if tally is None:
        return 0
    try:
        return ray.get(tally.total.remote())
    except ray.exceptions.RayActorError as exc:
        log.warning("infer: the count of inputs found done is lost (its actor died); the run records 0: %s", exc)
        return 0


def drop_done(batch: dict[str, np.ndarray], done: list[list[Any]], tally: Any = None) -> dict[str, np.ndarray]:
    """A listing batch less its done keys (`done`: [the index's bucket refs], wrapped so Ray Data
    passes the refs, not their values), counted in `tally` (a SkipTally actor). A colliding key is
    kept: it is reported on every run."""
    values = digests(batch["key"])
    keep = ~known(values, done[0])
    if "collides" in batch:
        keep |= batch["collides"].astype(bool)
    dropped = np.sort(values[~keep])
    count_skipped(tally, batch_id(b"keys", dropped.tobytes()), len(dropped))
    return {name: col[keep] for name, col in batch.items()}
