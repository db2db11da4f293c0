"""`nightly`: infer only on the images under INPUT that are new or changed, then report.

Layout under OUTPUT (see DESIGN.md, "Nightly runs"):

    date=YYYY-MM-DD/            that night's `infer` output: masks/, summaries/, runs/, _SUCCESS,
                                plus inputs/{stamp}.parquet, the key/uri list it was given
    ledger/part-{date}-{stamp}.parquet
                                one row per input processed: key, uri, size, version, model_sha256,
                                status, date, run_id, recorded_at; appended only after _SUCCESS
    reports/YYYY-MM-DD.json     counts, mean class fractions, drift against the previous report: the
                                date's run that processed the latest work (see `_placement`)
    reports/YYYY-MM-DD-{failed,rerun,replaced}-{stamp}.json
                                a re-run's report that does not take YYYY-MM-DD.json, or the earlier
                                report a re-run that processed images took it from
    _nightly.lock               while a run is in progress (conditional create, see lock.py)

An input is up to date when the latest ledger row for its key has the same size,
version (S3 ETag, local mtime) and model hash; everything else is inferred again. The
listing, the ledger and the comparison stay in Ray's object store (ledger.py): the driver
gets counts and tonight's work.
"""

from __future__ import annotations

import datetime
import io
import logging
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from raysegment import __version__, ledger, logs, plots, progress, storage
from raysegment.config import InferSpec, NightlySpec
from raysegment.errors import DataError, JobError, RunFailed, StorageError
from raysegment.inference import collisions
from raysegment.inference.listing import LISTED_SCHEMA, LISTING_SCHEMA, list_prefix, path_of
from raysegment.inference.overlap import check_apart, check_outside_model
from raysegment.inference.resume import DIGEST, digests
from raysegment.lock import RunLock

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_DRIFT = 0, 3, 4
LOCK_NAME = "_nightly.lock"
# reports/DATE.json; DATE-{failed,rerun,replaced}-STAMP.json (see _placement) are not one, nor compared with.
REPORT_NAME = re.compile(r"\d{4}-\d{2}-\d{2}\.json")
PARTITION = re.compile(r"date=(\d{4}-\d{2}-\d{2})")


def partition_name(date: str) -> str:
    """The date partition of one night's output."""
    return f"date={date}"


def input_exists(root: storage.Location) -> bool:
    """Whether INPUT is there at all: a local path that exists, an S3 prefix with at least one object."""
    return root.call(lambda: root.fs.exists(root.path))


def list_inputs(root: storage.Location, exts: tuple[str, ...]) -> ray.data.Dataset | None:
    """(key, uri, size, version, error, collides) of every image under root, listed in parallel as
    infer lists (None: nothing there)."""
    return list_prefix(root, exts, "nightly needs a prefix (folder) of images")


def night_infer_spec(spec: NightlySpec, list_uri: str, partition_uri: str) -> InferSpec:
    """The night's `infer` run: every inference option of the nightly spec, on the list of new and changed images."""
    return InferSpec.model_validate(
        {
            **spec.infer_options(),
            "model": spec.model,
            "input": list_uri,
            "output": partition_uri,
            "source": "list",
            # A night of only bad images is reported (ok 0): failing it would hold them as new every night.
            "fail_if_none_ok": False,
        }
    )


def plan(listing: pa.Table, ledger_rows: pa.Table, model_sha256: str, date: str) -> pa.Table:
    """The listing with a `change` column (new, changed, unchanged, deferred), by key and uri: the
    night's comparison (ledger.classify) on tables in memory."""
    index = ledger.index_of(ledger_rows, date)
    return ledger.classify(listing, [index.lookups], model_sha256).sort_by([("key", "ascending"), ("uri", "ascending")])


@dataclass(frozen=True)
class NightPlan:
    """What tonight's listing holds against the ledger: counts, and the rows the driver needs."""

    counts: dict[str, int]
    todo: pa.Table  # new and changed inputs, by key
    clashes: pa.Table  # inputs whose keys collide


def empty_plan() -> NightPlan:
    """The plan of a listing with no images in it (or no INPUT to list)."""
    empty = LISTED_SCHEMA.empty_table().append_column("change", pa.array([], pa.string()))
    return NightPlan({**dict.fromkeys(ledger.CHANGES, 0), "listed": 0}, empty, empty)


def counts_line(date: str, counts: dict[str, int]) -> str:
    """The console line of the night's plan; its parts add up to `listed` (deferred shown when there are any)."""
    deferred = f", {counts['deferred']} deferred" if counts["deferred"] else ""
    return (
        f"nightly {date}: {counts['listed']} listed, {counts['new']} new, {counts['changed']} changed, "
        f"{counts['unchanged']} unchanged{deferred}"
    )


def _tally(batch: pa.Table) -> pa.Table:
    unicode = pc.sum(pc.invert(pc.string_is_ascii(batch["key"]))).as_py() or 0
    return pa.table({**{c: [_count(batch["change"], c)] for c in ledger.CHANGES}, "unicode": [unicode]})


def _rows_needed(batch: pa.Table) -> pa.Table:
    needed = pc.or_(pc.is_in(batch["change"], pa.array(["new", "changed"])), batch["collides"])
    return batch.filter(needed)


def plan_night(input_loc: storage.Location, exts: tuple[str, ...], index: ledger.LedgerIndex, model: str) -> NightPlan:
    """List INPUT and classify every image by tasks; the driver gets counts and the rows to act on."""
    listed = list_inputs(input_loc, exts)
    if listed is None:
        return empty_plan()
    kwargs = {"lookups": [index.lookups], "model_sha256": model}
    planned = listed.map_batches(ledger.classify, fn_kwargs=kwargs, batch_format="pyarrow").materialize()
    # Ray Data passes an empty block (a sub-folder without images) through map_batches without
    # calling the function, so such a block lacks the function's columns: only blocks with rows count.
    tallies = [t for t in ray.get(planned.map_batches(_tally, batch_format="pyarrow").to_arrow_refs()) if t.num_rows]
    counts = {c: int(sum(pc.sum(t[c]).as_py() or 0 for t in tallies)) for c in ledger.CHANGES}
    counts["listed"] = sum(counts.values())
    unicode = sum(pc.sum(t["unicode"]).as_py() or 0 for t in tallies)
    # Tonight's work stays on the driver on purpose, as Arrow columns (key, uri, size, version, error,
    # change, collides: about 100 bytes a row): it is the night's list source, and the ledger rows it
    # gets. Only new, changed and colliding rows come; every other listed row stays in the object store.
    schema = planned.schema().base_schema
    # Blocks without rows (a sub-folder without images) lack the function's columns: left out before the cast.
    needed = ray.get(planned.map_batches(_rows_needed, batch_format="pyarrow").to_arrow_refs())
    rows = pa.concat_tables([t.cast(schema) for t in needed if t.num_rows] or [schema.empty_table()])
    del needed
    rows = rows.sort_by([("key", "ascending"), ("uri", "ascending")])  # the fetched blocks are let go
    # The lister sees one folder at a time; keys of two folders collide when their folders' names differ only
    # in Unicode form (NFC `dé/a` and NFD `dé/a`). Such a key is not plain ASCII, so a night of ASCII keys
    # skips the check across the whole listing.
    clashes = (
        _clashes_across(input_loc, planned, schema) if unicode else _colliding(input_loc, rows.filter(rows["collides"]))
    )
    # Without collisions every row is new or changed: no second copy.
    todo = rows.filter(pc.is_in(rows["change"], pa.array(["new", "changed"]))) if clashes.num_rows else rows
    return NightPlan(counts, todo, clashes)


_NONE = np.zeros(0, DIGEST)


@ray.remote(num_cpus=0.25)
def _fold_digests(block: pa.Table) -> np.ndarray:
    """The digest of each key of a listing block in its Unicode-folded form (`collisions.fold`, the rule
    every key collision check applies): two keys that collide have the same one."""
    return digests(_folded(block["key"].combine_chunks()).to_pylist()) if "key" in block.column_names else _NONE


@ray.remote(num_cpus=0.25)
def _repeated(*blocks: np.ndarray) -> np.ndarray:
    """The digests that occur more than once over every block's (sorted)."""
    values, counts = np.unique(np.concatenate([_NONE, *blocks]), return_counts=True)
    return values[counts > 1]


@ray.remote(num_cpus=0.25)
def _rows_folding_to(block: pa.Table, mine: np.ndarray, repeated: np.ndarray) -> pa.Table:
    """A listing block's rows whose folded key's digest (`mine`, from `_fold_digests`) is among `repeated`."""
    if not block.num_rows or not len(repeated):
        return block.slice(0, 0)
    pos = np.minimum(np.searchsorted(repeated, mine), len(repeated) - 1)
    return block.filter(pa.array(repeated[pos] == mine))


def _clashes_across(input_loc: storage.Location, planned: ray.data.Dataset, schema: pa.Schema) -> pa.Table:
    """Every listed row whose key collides with another's anywhere in the listing, with its error naming
    them all (`collisions.within` over the rows found): by tasks, which pass the driver a digest of each
    key's folded form (16 bytes a row, in the object store) and then only the colliding rows."""
    blocks = planned.to_arrow_refs()
    folded = [_fold_digests.remote(b) for b in blocks]  # each key folded and hashed once
    repeated = _repeated.remote(*folded)
    found = [
        t for t in ray.get([_rows_folding_to.remote(b, d, repeated) for b, d in zip(blocks, folded)]) if t.num_rows
    ]
    return _colliding(input_loc, pa.concat_tables([t.cast(schema) for t in found] or [schema.empty_table()]))


def _colliding(input_loc: storage.Location, rows: pa.Table) -> pa.Table:
    """The rows whose key collides with another's among them, each error naming them all and saying to run
    the night again (`NIGHT_FIX`: nightly has no --overwrite, and a refused night wrote nothing)."""
    prefix = input_loc.path.rstrip("/") + "/"
    names = [path_of(input_loc, u).removeprefix(prefix) for u in rows["uri"].to_pylist()]
    errors = collisions.within(rows["key"].to_pylist(), names, NIGHT_FIX)
    rows = rows.set_column(rows.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    rows = rows.set_column(
        rows.schema.get_field_index("collides"), "collides", pa.array([bool(e) for e in errors], pa.bool_())
    )
    return rows.filter(rows["collides"]).sort_by([("key", "ascending"), ("uri", "ascending")])


def _partition_statuses(partition: storage.Location) -> pa.Table:
    """key and status of every summary row in a date partition, read a file at a time as Arrow columns
    (a few tens of bytes a row; the class fractions are not read)."""
    from raysegment.inference.output import consistent, summary_tables

    empty = pa.table({"key": pa.array([], pa.string()), "status": pa.array([], pa.string())})
    tables = consistent(lambda: list(summary_tables(partition, ["key", "status"])))
    return pa.concat_tables([t.cast(empty.schema) for t in tables] or [empty])


@dataclass(frozen=True)
class PartitionFigures:
    """A date partition's rows as its report gives them: counts and the mean class fractions."""

    total: int
    ok: int
    class_fraction_mean: dict[str, float] | None


class FractionSums:
    """The mean of class_fractions over ok rows, added up a summary file at a time.

    The sum runs row after row in float64, as numpy's mean over one array of every row did (its
    reduction down the rows is sequential), so the figures are the same to the last bit."""

    def __init__(self) -> None:
        self.sums: np.ndarray | None = None
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        """Add the ok rows of one table (status, class_fractions)."""
        ok = table.filter(pc.equal(table["status"], "ok"))
        if not ok.num_rows:
            return
        fractions = _fractions(ok["class_fractions"])
        stacked = fractions if self.sums is None else np.concatenate([self.sums[None, :], fractions])
        self.sums = np.add.reduce(stacked, axis=0)
        self.rows += ok.num_rows

    def means(self, class_names: list[str]) -> dict[str, float] | None:
        """By class name; None without ok rows."""
        if self.sums is None:
            return None
        return {name: round(float(v), 6) for name, v in zip(class_names, self.sums / self.rows)}


def _fractions(column: pa.ChunkedArray) -> np.ndarray:
    """Rows of class fractions as a float64 (rows, classes) array, from the list values where every row
    is a list of as many (no Python floats; a null fraction is NaN either way), else as numpy reads the
    lists (a null or ragged row fails there, as it did)."""
    lengths = pc.list_value_length(column)
    if not lengths.null_count and pc.min(lengths).as_py() == pc.max(lengths).as_py():
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        return values.astype(np.float64).reshape(len(column), pc.min(lengths).as_py())
    return np.asarray(column.to_pylist(), np.float64)


def partition_figures(partition: storage.Location, class_names: list[str]) -> PartitionFigures:
    """Rows, ok rows and mean class fractions of a date partition, a summary file at a time: the driver
    holds one file's status and class_fractions columns, never the partition's rows."""
    from raysegment.inference.output import consistent, summary_tables

    def read() -> PartitionFigures:
        total = ok = 0
        sums = FractionSums()
        for table in summary_tables(partition, ["status", "class_fractions"]):
            total += table.num_rows
            ok += _count(table["status"], "ok")
            sums.add(table)
        return PartitionFigures(total, ok, sums.means(class_names))

    return consistent(read)


def previous_report(reports: storage.Location, date: str) -> dict[str, Any] | None:
    """The latest report before `date` that has class statistics."""

    def find() -> list[str]:
        if not reports.fs.exists(reports.path):
            return []
        return sorted(posixpath.basename(p) for p in reports.fs.find(reports.path, maxdepth=1) if p.endswith(".json"))

    names = reports.call(find)
    for name in reversed([n for n in names if REPORT_NAME.fullmatch(n) and n < f"{date}.json"]):
        loc = reports.child(name)
        try:
            report = storage.read_json(loc)
        except StorageError as exc:
            log.warning("nightly: skipping report %s for drift: %s", storage.redact(loc.uri), exc)
            continue
        if not _has_class_means(report):
            if not isinstance(report, dict) or report.get("class_fraction_mean") is not None:
                log.warning("nightly: skipping report %s for drift: no usable date and class_fraction_mean", name)
            continue
        return report
    return None


def _has_class_means(report: Any) -> bool:
    """Whether a report read back can be compared against: a date and finite per-class means."""
    if not isinstance(report, dict) or not isinstance(report.get("date"), str):
        return False
    means = report.get("class_fraction_mean")
    return (
        isinstance(means, dict)
        and bool(means)
        and all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in means.values())
    )


def drift(now: dict[str, float] | None, before: dict[str, Any] | None, threshold: float) -> dict[str, Any]:
    """Per-class shift of the mean fractions against the previous report; flagged beyond threshold."""
    out: dict[str, Any] = {"threshold": threshold, "compared_with": None, "shifts": {}, "max_shift": None}
    if now and before:
        prev = before["class_fraction_mean"]
        shifts = {k: round(abs(v - prev[k]), 6) for k, v in now.items() if k in prev}
        out.update(compared_with=before["date"], shifts=shifts, max_shift=max(shifts.values(), default=None))
    out["flagged"] = out["max_shift"] is not None and out["max_shift"] > threshold
    return out


def exit_code(report: dict[str, Any]) -> int:
    """What a scheduler acts on: 0 ok (also nothing new), 3 the job failed, 4 drift flagged."""
    return int(report["exit_code"])


def _written(name: str) -> bool:
    """Whether a name directly under OUTPUT is one nightly writes (partitions, ledger, reports, lock)."""
    return name.startswith("date=") or name in ("ledger", "reports", LOCK_NAME)


def check_layout(input_loc: storage.Location, output: storage.Location) -> None:
    """OUTPUT outside INPUT, INPUT outside what nightly writes: masks are never listed as new images."""
    check_apart(input_loc, output, _written, job="nightly")


# What a refused night's collisions say to do: nightly has no --overwrite, and a refused night wrote nothing.
NIGHT_FIX = "rename one, then run the night again"


def refuse_collisions(clashes: pa.Table) -> None:
    """Key collisions fail the night before any inference: one error naming the first few.

    Infer would mark them as error rows, but a night's partition then holds two rows for
    one key and its re-run could never pass; refused here, the same night re-runs cleanly
    once the inputs are renamed.
    """
    if clashes.num_rows:
        shown = list(dict.fromkeys(clashes["error"].to_pylist()))  # one per collision, each ending with NIGHT_FIX
        more = f" (and {len(shown) - 3} more)" if len(shown) > 3 else ""
        raise JobError(f"nightly: {clashes.num_rows} inputs share keys: " + "; ".join(shown[:3]) + more)


def _count(values: pa.ChunkedArray, value: str) -> int:
    return int(pc.sum(pc.equal(values, value)).as_py() or 0)


def _stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")


def run_nightly(spec: NightlySpec) -> dict[str, Any]:
    """One night: list, diff against the ledger, infer the rest into OUTPUT/date=D, report."""
    from raysegment.inference.actors import min_cpus
    from raysegment.inference.output import is_complete
    from raysegment.inference.pipeline import infer
    from raysegment.models.card import ModelCard
    from raysegment.runtime import init_ray

    t0 = time.time()
    date = spec.date or datetime.datetime.now(datetime.UTC).date().isoformat()
    # Hashed before anything is written: a model.keras that is not the card's, refused by infer only after the
    # date's inputs/ list was written, left a partition without _SUCCESS that later nights warned of.
    card = ModelCard.read(spec.model, spec.endpoint_url, verify_model=True, retry_s=spec.storage_retry_s)
    input_loc = storage.resolve(spec.input, spec.endpoint_url, spec.storage_retry_s)
    output = storage.resolve(spec.output, spec.endpoint_url, spec.storage_retry_s)
    check_layout(input_loc, output)
    check_outside_model(storage.resolve(spec.model, spec.endpoint_url), output, job="nightly")
    storage.check_writable(output)
    partition = output.child(partition_name(date))

    with RunLock(output.child(LOCK_NAME), spec.lock_stale_after_s, purpose="nightly run"):
        logs.began()  # a refusal by the lock (exit 5) keeps its log out of OUTPUT, as infer's does
        # Ray only now: a second night into a locked OUTPUT is refused before it starts a local Ray (10-20 s of
        # raylet, GCS and workers beside the live run) or reads anything of OUTPUT.
        init_ray(min_cpus=min_cpus(spec))
        index = ledger.build(output, date)
        ledger.compact(output, index, f"{date}-{_stamp()}")  # a year of nights stays a few files
        # No INPUT at all (a mistyped path or prefix, a share not mounted): the night fails below with a report.
        missing = not input_exists(input_loc)
        night = empty_plan() if missing else plan_night(input_loc, tuple(spec.extensions), index, card.model_sha256)
        counts, todo = dict(night.counts), night.todo
        # Keys the ledger holds that tonight's listing lacks: deleted, moved, or a share not mounted.
        counts["absent"] = max(0, index.keys - (counts["listed"] - counts["new"]))
        progress.note(counts_line(date, counts))
        report: dict[str, Any] = {
            "date": date,
            "status": "nothing_new",
            "exit_code": EXIT_OK,
            "input": storage.redact(spec.input),
            "output": storage.redact(spec.output),
            "partition": None,
            "model_id": card.model_id,
            "model_sha256": card.model_sha256,
            "run_id": None,
            "counts": {**counts, "processed": 0, "ok": 0, "error": 0, "skipped": 0},
            "class_names": card.class_names,
            "unfinished_partitions": unfinished_partitions(output, date),
        }
        if report["unfinished_partitions"]:
            progress.warn(log, "nightly", _unfinished_note(output, report["unfinished_partitions"]))
        try:
            refuse_collisions(night.clashes)
            if missing and not spec.allow_empty_input:
                earlier = f", and the ledger records {index.keys} images from earlier nights" if index.keys else ""
                raise JobError(
                    f"nightly: INPUT {storage.redact(spec.input)} does not exist (no such folder, or no object "
                    f"under the prefix){earlier}: check that INPUT is mounted and its path or prefix is right; "
                    "if it was emptied on purpose, run again with --allow-empty-input"
                )
            if not counts["listed"] and index.keys and not spec.allow_empty_input:
                raise JobError(
                    f"nightly: INPUT {storage.redact(spec.input)} lists no images, but the ledger records "
                    f"{index.keys} from earlier nights: check that INPUT is mounted and its prefix is right; "
                    "if it was emptied on purpose, run again with --allow-empty-input"
                )
            todo = _same_date_rerun(partition, todo, counts, card.model_sha256, report, index)
        except JobError as exc:
            _fail(report, exc, spec, output, date, t0)
            raise
        progress.expect_total("infer", todo.num_rows)
        if todo.num_rows:
            stamp = _stamp()
            list_loc = partition.child("inputs", f"{stamp}.parquet")
            # The lister's errors (symlinks it will not follow) become error rows of the night's run.
            # With each image's size and version: a re-run of the date tells a changed image from a resumed one.
            ledger.write_parquet(list_loc, todo.select(["uri", "key", "error", "size", "version"]))
            infer_spec = night_infer_spec(spec, list_loc.uri, partition.uri)
            report["partition"] = storage.redact(partition.uri)
            try:
                record = infer(infer_spec)
            except (JobError, DataError) as exc:
                # No ledger rows: every key of this run stays new/changed for the next attempt.
                if isinstance(exc, RunFailed):
                    _counted(report, exc.record)
                _fail(report, exc, spec, output, date, t0)
                raise
            _counted(report, record)
            report["status"] = "ok"
            _append_ledger(output, todo, partition, card.model_sha256, date, record["run_id"], stamp)
        if report["status"] != "deferred" and is_complete(partition):
            # The report describes the whole date partition, also on a second run the same day (not another
            # model's partition, whose figures this model's class names would mislabel).
            figures = partition_figures(partition, card.class_names)
            report["partition"] = storage.redact(partition.uri)
            report["partition_rows"] = {"total": figures.total, "ok": figures.ok}
            report["class_fraction_mean"] = figures.class_fraction_mean
        else:
            report["class_fraction_mean"] = None
        previous = previous_report(output.child("reports"), date)
        report["drift"] = drift(report["class_fraction_mean"], previous, spec.drift_threshold)
        placed = _placement(report, output, date)
        if report["class_fraction_mean"] and previous:
            # The same comparison as a picture: per-class share before, now and the change (beside the report).
            plot = output.child("reports", placed.name.removesuffix(".json") + "-drift.png")
            storage.write_bytes(plot, plots.drift_png(previous["class_fraction_mean"], report["class_fraction_mean"]))
            report["drift"]["plot"] = storage.redact(plot.uri)
        if report["drift"]["flagged"]:
            report.update(status="drift", exit_code=EXIT_DRIFT)
        _finish(report, output, date, t0, placed)
    return report


def _counted(report: dict[str, Any], record: dict[str, Any]) -> None:
    c = record["counts"]
    report["run_id"] = record["run_id"]
    report["counts"].update(processed=c["processed"], ok=c["ok"], error=c["error"], skipped=c["skipped"])


def _failed(report: dict[str, Any], exc: Exception, spec: NightlySpec) -> None:
    """A failed night's report: the same keys as any other (no statistics to compare)."""
    code = exc.exit_code if isinstance(exc, DataError) else EXIT_FAILED
    report.update(status="failed", exit_code=code, problem=str(exc), class_fraction_mean=None)
    report["drift"] = drift(None, None, spec.drift_threshold)


def _fail(
    report: dict[str, Any], exc: Exception, spec: NightlySpec, output: storage.Location, date: str, t0: float
) -> None:
    """Write a failed night's report, and show its closing line (the counts and where the report went) before
    the error's own line: a night that raises gets no other summary."""
    from raysegment.registry import nightly_line

    _failed(report, exc, spec)
    _finish(report, output, date, t0)
    progress.note(nightly_line(report))


def _same_date_rerun(
    partition: storage.Location,
    todo: pa.Table,
    counts: dict[str, int],
    model: str,
    report: dict[str, Any],
    index: ledger.LedgerIndex,
) -> pa.Table:
    """Tonight's work, where the date's partition holds rows an unfinished attempt (failed or killed, so
    not in the ledger) wrote. Such a row stands when its image is as that attempt listed it (the run
    resumes); an image changed since has its row dropped, so it is masked again (a stale mask recorded
    as current, or a fixed image left an error, before). A partition of another model's rows cannot take
    this model's: the work is deferred to the next night's partition."""
    from raysegment.inference import compact, resume
    from raysegment.inference.output import mark_incomplete

    if not todo.num_rows or not storage.exists(partition.child("summaries")):
        return todo
    others = sorted(resume.build(partition).models - {model})  # by tasks, as infer's own check
    if others:
        moved = {c: _count(todo["change"], c) for c in ("new", "changed")}
        counts.update(new=counts["new"] - moved["new"], changed=counts["changed"] - moved["changed"])
        counts["deferred"] += todo.num_rows
        report["counts"].update(counts)
        report["status"] = "deferred"
        report["problem"] = (
            f"{storage.redact(partition.uri)} holds results of another model ({others[0][:12]}): this model's "
            f"{todo.num_rows} new and changed images go to the next night's partition (or remove the partition "
            "and run this date again to redo it with this model)"
        )
        progress.warn(log, "nightly", report["problem"])
        return todo.slice(0, 0)
    colliding = _colliding_keys(partition, todo, index)
    if colliding:
        with compact.rewrite_lock(partition):
            mark_incomplete(partition)
            dropped = compact.drop_key_rows(partition, colliding, held=True)
        progress.note(
            f"nightly: {dropped} rows of {len(colliding)} keys that collide with another key in "
            f"{storage.redact(partition.uri)} (an earlier attempt of this date wrote them) are dropped; the images "
            "of those keys listed tonight are masked again"
        )
    earlier = _earlier_listing(partition)
    if earlier is None:
        return todo
    # Keys listed before with another size or version; one without a row in the partition drops nothing.
    now = todo.select(["key", "size", "version"]).join(earlier, "key", join_type="inner", right_suffix="_then")
    moved = pc.or_(
        pc.not_equal(now["size"], now["size_then"]),
        pc.not_equal(pc.fill_null(now["version"], ""), pc.fill_null(now["version_then"], "")),
    )
    stale = now.filter(pc.fill_null(moved, True))["key"].to_pylist()
    if stale:
        # The lock first, as infer's --retry-errors: a compaction holding it refuses this before _SUCCESS goes.
        with compact.rewrite_lock(partition):
            mark_incomplete(partition)
            dropped = compact.drop_key_rows(partition, stale, held=True)
        if dropped:
            progress.note(
                f"nightly: {dropped} images changed since an unfinished run of this date masked them: their rows "
                "are dropped, and they are masked again"
            )
    return todo


def _folded(keys: pa.Array) -> pa.Array:
    """Each key in the form key collisions compare (`collisions.fold`), by columns: only keys that are not plain
    ASCII (which folding leaves as they are) go through Python."""
    odd = pc.invert(pc.string_is_ascii(keys))
    if not pc.any(odd).as_py():
        return keys
    folded = [collisions.fold(k) for k in keys.filter(odd).to_pylist()]
    return pc.replace_with_mask(keys, odd, pa.array(folded, pa.string()))


def _shared(keys: pa.Array, folded: pa.Array) -> pa.Array:
    """The distinct keys among `keys` (rows, repeats included) whose folded form more than one row has."""
    if not len(keys):
        return keys
    times = pa.table({"f": folded}).group_by("f").aggregate([("f", "count")])
    many = times.filter(pc.greater(times["f_count"], 1))["f"]
    return pc.unique(keys.filter(pc.is_in(folded, value_set=many.combine_chunks())))


def _colliding_keys(partition: storage.Location, todo: pa.Table, index: ledger.LedgerIndex) -> list[str]:
    """Keys whose rows in the date's partition must go before tonight's run into it: rows of colliding keys
    (two inputs of one key, or keys that differ only in Unicode form, `collisions.fold`), among the partition's
    rows and tonight's keys, that an attempt of this date made before nights were refused for them (infer then
    wrote a row for each, and failed its rows-vs-keys check; every re-run failed so, renamed inputs or not).

    Such a key's rows are dropped when tonight redoes the key (it is new or changed) or when the ledger holds
    no row of this date for it (a failed attempt's row: nothing points at it, and an image renamed since is
    listed under its new key). A key the ledger records from this date keeps its row and mask, which the
    ledger points at; if one of tonight's keys still collides with it, the night is refused (JobError) before
    inference. By Arrow columns: the partition's key column (read a file at a time), Python only for keys that
    are not plain ASCII and for the few that collide."""
    held = _partition_statuses(partition)["key"].combine_chunks()
    tonight = todo["key"].combine_chunks()
    keys = pa.concat_arrays([held, tonight.filter(pc.invert(pc.is_in(tonight, value_set=held)))])
    folded = _folded(keys)
    involved = _shared(keys, folded)
    if not len(involved):
        return []
    mine = involved.filter(pc.is_in(involved, value_set=held))
    redone = np.asarray(pc.is_in(mine, value_set=tonight).to_numpy(zero_copy_only=False), bool)
    drop = mine.filter(pa.array(redone | ~_recorded_tonight(index, mine.to_pylist())))
    # The keys after the drop: the partition's kept rows and every key tonight writes again (a dropped key that
    # tonight redoes is written again, beside the recorded row it may collide with).
    kept = held.filter(pc.invert(pc.is_in(held, value_set=drop)))
    after = pa.concat_arrays([kept, tonight.filter(pc.invert(pc.is_in(tonight, value_set=kept)))])
    still = _shared(after, _folded(after))
    if len(still):
        keys = still.to_pylist()
        fix = "rename tonight's image, then run the night again"
        shown = list(dict.fromkeys(collisions.within(keys, keys, fix)))  # one message per collision group
        more = f" (and {len(shown) - 3} more)" if len(shown) > 3 else ""
        raise JobError(
            f"nightly: {storage.redact(partition.uri)} holds rows this date's run recorded in the ledger, and "
            f"tonight's images have keys colliding with them: " + "; ".join(shown[:3]) + more
        )
    return drop.to_pylist()


def _recorded_tonight(index: ledger.LedgerIndex, keys: list[str]) -> np.ndarray:
    """For each key, whether its latest ledger row is from tonight's date (the ledger points at its row and mask
    in tonight's partition)."""
    return ledger.look_up(index.lookups, digests(keys))[2]


def _earlier_listing(partition: storage.Location) -> pa.Table | None:
    """key, size, version of each image as the date's latest earlier run that listed it saw it (the
    partition's inputs/ lists, in stamp order); None when none records sizes (written by older versions)."""
    root = partition.child("inputs")
    if not storage.exists(root):
        return None
    tables = []
    for order, path in enumerate(sorted(storage.parquet_files(root))):
        table = storage.read_table(root, path)  # one list at a time: its uri column is let go at once
        if "size" in table.column_names:  # lists written before sizes were recorded say nothing
            table = table.select(["key", "size", "version"])
            tables.append(table.append_column("order", pa.array(np.full(len(table), order, np.int32))))
    if not tables:
        return None
    listed = pa.concat_tables(tables)  # in stamp order already
    latest = listed.group_by("key", use_threads=False).aggregate([("size", "last"), ("version", "last")])
    return latest.select(["key", "size_last", "version_last"]).rename_columns(["key", "size", "version"])


def partitions(output: storage.Location) -> list[str]:
    """The names of OUTPUT's date partitions (`date=YYYY-MM-DD`), oldest first."""
    return [n for n in storage.folders(output) if PARTITION.fullmatch(n)]


def partition_fix(output: storage.Location, command: str) -> str | None:
    """The fix for `compact` or `report` given a nightly OUTPUT (date=YYYY-MM-DD partitions, each one night's
    infer output, beside ledger/ and reports/) instead of one infer output: a partition, the latest named.
    None when OUTPUT holds no partition."""
    names = partitions(output)
    if not names:
        return None
    return (
        f"{output.uri}: a nightly OUTPUT ({len(names)} date partitions), not one infer output; give a "
        f"partition: raysegment {command} {output.child(names[-1]).uri} (the latest)"
    )


def unfinished_partitions(output: storage.Location, date: str) -> list[str]:
    """Earlier date partitions without _SUCCESS: a failed or killed night's, whose rows a reader of the
    partitions must skip (their images have no ledger rows, so a later night redoes them)."""
    from raysegment.inference.output import is_complete

    names = [n for n in partitions(output) if n < partition_name(date)]
    with ThreadPoolExecutor(16) as pool:
        complete = list(pool.map(lambda n: is_complete(output.child(n)), names))
    return [n for n, done in zip(names, complete) if not done]


def _unfinished_note(output: storage.Location, names: list[str]) -> str:
    """What an unfinished partition holds, by its date's report: a date whose report records a run that
    processed images has ledger rows pointing at that partition's masks (a re-run of the date failed or was
    killed after), so it is kept; one without has no ledger rows, so a later night redoes its images."""
    reports = output.child("reports")
    kept = [n for n in names if _processed(_earlier_report(reports.child(f"{n.removeprefix('date=')}.json")) or {})]
    dropped = [n for n in names if n not in kept]

    def shown(part: list[str]) -> str:
        return ", ".join(part[:3]) + (f" and {len(part) - 3} more" if len(part) > 3 else "")

    notes = []
    if dropped:
        notes.append(
            f"{shown(dropped)} have no _SUCCESS (a night failed or was killed): their images were not recorded in "
            "the ledger, so a later night redoes them; skip or remove those partitions when reading the output"
        )
    if kept:
        notes.append(
            f"{shown(kept)} have no _SUCCESS (a re-run of the date failed or was killed after its night recorded "
            "images): the ledger points at masks there, so keep them; run nightly with that --date to finish them"
        )
    return "; ".join(notes)


LEDGER_SLICE = 1 << 16  # ledger rows built and written at a time


def _append_ledger(
    output: storage.Location,
    todo: pa.Table,
    partition: storage.Location,
    model: str,
    date: str,
    run_id: str,
    stamp: str,
) -> None:
    """Record the inputs that now have a summary row in the partition, with the status of their key's last
    row there; the run's _SUCCESS is already written. By Arrow columns, never a Python object a row: the
    partition's key and status columns (a few tens of bytes a row, let go once each key's last status is
    taken), a hash lookup of tonight's keys in them, and the ledger's repeated columns made a slice at a time."""
    rows = _partition_statuses(partition)
    # Last row first: a key's first match (index_in's) is then its last row, which gives its status.
    latest = rows.take(pa.array(np.arange(rows.num_rows - 1, -1, -1, dtype=np.int64)))
    del rows
    where = pc.index_in(todo["key"], value_set=latest["key"])  # null: no summary row for that key
    if where.null_count:
        found = pc.is_valid(where)
        todo, where = todo.filter(found), where.filter(found)
    status = latest["status"].take(where)
    del latest
    recorded = datetime.datetime.now(datetime.UTC).isoformat()
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, ledger.LEDGER_SCHEMA, **storage.PAGE_CHECKSUMS) as writer:
        for start in range(0, todo.num_rows, LEDGER_SLICE):
            done = todo.slice(start, LEDGER_SLICE)
            n = done.num_rows
            writer.write_table(
                pa.table(
                    {
                        **{name: done[name] for name in LISTING_SCHEMA.names},
                        "model_sha256": pa.repeat(pa.scalar(model, pa.string()), n),
                        "status": status.slice(start, n),
                        "date": pa.repeat(pa.scalar(date, pa.string()), n),
                        "run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
                        "recorded_at": pa.repeat(pa.scalar(recorded, pa.string()), n),
                    },
                    schema=ledger.LEDGER_SCHEMA,
                )
            )
    storage.write_bytes(output.child(ledger.LEDGER, f"part-{date}-{stamp}.parquet"), buf.getvalue())


def _finish(
    report: dict[str, Any], output: storage.Location, date: str, t0: float, placed: Placement | None = None
) -> None:
    report["seconds"] = round(time.time() - t0, 2)
    report["raysegment"] = __version__
    placed = placed or _placement(report, output, date)
    if placed.displaced is not None:
        # Kept beside it before DATE.json is rewritten: a run killed in between leaves both copies.
        storage.write_json(output.child("reports", placed.displaced_name), placed.displaced)
    if placed.why:
        log.warning("nightly %s %s; this run's report is %s", date, placed.why, storage.redact(placed.target.uri))
    report["report_uri"] = storage.redact(placed.target.uri)  # where it went: DATE.json or a side file
    storage.write_json(placed.target, report)


@dataclass(frozen=True)
class Placement:
    """Where a night's report goes under OUTPUT/reports, and the earlier report it displaces."""

    name: str  # DATE.json, or DATE-{failed,rerun}-STAMP.json beside it
    target: storage.Location
    why: str = ""  # for the console, when the report does not simply take DATE.json
    displaced: dict[str, Any] | None = None  # the earlier DATE.json, kept as displaced_name
    displaced_name: str = ""


def _placement(report: dict[str, Any], output: storage.Location, date: str) -> Placement:
    """Where this run's report goes: DATE.json holds the date's run that processed the latest work.

    - a failed run takes DATE.json only if that holds no run that did not fail (else DATE-failed-STAMP.json);
    - a run that processed images takes it; an earlier report there that recorded processed images is
      kept as DATE-replaced-STAMP.json;
    - a run that processed nothing takes it unless it holds a run that processed images (a re-run
      after the night's work): then DATE-rerun-STAMP.json.

    Drift compares only DATE.json reports (REPORT_NAME), so a side report is never its baseline.
    """
    reports = output.child("reports")
    name = f"{date}.json"
    earlier = _earlier_report(reports.child(name))
    if earlier is None or earlier.get("status") == "failed":
        return Placement(name, reports.child(name))
    worked = _processed(earlier)
    if report["status"] == "failed":
        side, why = "failed", "failed; the report of the earlier run on that date is kept"
    elif _processed(report):
        if not worked:
            return Placement(name, reports.child(name))
        kept = f"{date}-replaced-{_stamp()}.json"
        why = f"processed images again; the earlier run's report (run {earlier.get('run_id')}) is kept as {kept}"
        return Placement(name, reports.child(name), why, earlier, kept)
    elif worked:
        side = "rerun"
        why = f"processed nothing; {name} keeps the report of the earlier run (run {earlier.get('run_id')})"
    else:
        return Placement(name, reports.child(name))
    side_name = f"{date}-{side}-{_stamp()}.json"
    return Placement(side_name, reports.child(side_name), why)


def _earlier_report(loc: storage.Location) -> dict[str, Any] | None:
    """The report there, if one can be read (a damaged one is replaced, as if there were none)."""
    if not storage.exists(loc):
        return None
    try:
        earlier = storage.read_json(loc)
    except StorageError:
        return None
    return earlier if isinstance(earlier, dict) and earlier.get("status") is not None else None


def _processed(report: dict[str, Any]) -> bool:
    """Whether a report records a run that did not fail and processed images."""
    counts = report.get("counts")
    processed = counts.get("processed") if isinstance(counts, dict) else None
    return report.get("status") != "failed" and isinstance(processed, int) and processed > 0
