"""`infer`: a streaming Ray Data job over INPUT.

list (parallel) -> drop keys already done (inference/resume.py) -> read bytes -> decode + resize
(CPU tasks) -> predict (actor pool, model loaded once per actor) -> resize back and write masks
(CPU tasks) -> the driver commits their summary rows, many batches to a file. The report, then
``runs/{run_id}.json``, then ``_SUCCESS`` are written last: an output without the marker is
never complete, and a run killed before its record was written leaves none.
A re-run over the same output skips keys that already have a summary row, so a
killed job resumes without duplicates. What lies where under OUTPUT, and how it is
read back, is inference/output.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any

import ray

from raysegment import __version__, logs, progress, storage
from raysegment.config import InferSpec
from raysegment.errors import DataError, RunFailed
from raysegment.inference import actors, compact, resume
from raysegment.inference import output as layout
from raysegment.inference.archives import Archive, MemberIndex
from raysegment.inference.overlap import check_apart, check_outside_model
from raysegment.inference.predictor import Predictor, preprocess, resolve_precision
from raysegment.inference.sources import source_rows
from raysegment.lock import RunLock
from raysegment.models.card import ModelCard
from raysegment.runtime import init_ray

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Run:
    """What the steps of one run share."""

    spec: InferSpec
    card: ModelCard
    output: storage.Location
    run_id: str
    done: resume.DoneIndex  # keys earlier runs finished (under --retry-errors, their error rows left out)
    skips: Any  # a resume.SkipTally actor counting this run's inputs found done (None: none are done)
    actors: actors.Actors  # the predictor pool, resolved against the cluster
    started: float  # time.time() at the start
    lock: RunLock  # OUTPUT's run lock, held for the run (`infer`); checked before _SUCCESS


def infer(spec: InferSpec) -> dict[str, Any]:
    """Run batch inference; returns the run record written to runs/{run_id}.json."""
    with contextlib.ExitStack() as held:
        return _infer(spec, held)


# OUTPUT's run lock: two runs into one OUTPUT (an overlapping cron, a second terminal) each wrote every key,
# 160 rows for 80 images under one _SUCCESS. Refreshed while held. A killed run's is taken over at once on its
# machine (its PID gone), elsewhere after this: long against store outages and other hosts' clocks.
RUN_LOCK_STALE_S = 1800


def _infer(spec: InferSpec, held: contextlib.ExitStack) -> dict[str, Any]:
    run = plan(spec, held)
    # INPUT is listed before OUTPUT changes: one without images is refused with OUTPUT as it was (its
    # _SUCCESS and, under --overwrite, its results kept; the log stays out of it).
    kind, ds = list_inputs(run)
    begin(run)
    ds = write(run, predict(run, ds))
    record = verify(run, kind, *drain(run, ds))
    if spec.report and (record.counts.total or run.done):  # the report is of all of OUTPUT
        write_report(run, record)  # from the record in memory: it is written only after the report
    layout.write_run_record(run.output, record)
    if record.problems:
        raise RunFailed(f"{run.output.uri}: run {run.run_id} failed: " + "; ".join(record.problems), record.as_dict())
    layout.mark_complete(run.output, run.run_id)
    return record.as_dict()


def plan(spec: InferSpec, held: contextlib.ExitStack) -> Run:
    """Check model and locations, take OUTPUT's run lock (`held` keeps it for the run), join Ray and read what
    earlier runs did; nothing of OUTPUT changes yet (`begin`)."""
    started = time.time()
    output = storage.resolve(spec.output, spec.endpoint_url, spec.storage_retry_s)
    # Hashed here, once: a model.keras that is not the card's would stamp every row with a wrong hash.
    card = ModelCard.read(spec.model, spec.endpoint_url, verify_model=True, retry_s=output.retry_s)
    input_loc = storage.resolve(spec.input, spec.endpoint_url, spec.storage_retry_s)
    storage.check_readable(input_loc)
    check_apart(input_loc, output)  # before the first write: outputs are never read as inputs
    check_outside_model(storage.resolve(spec.model, spec.endpoint_url), output)
    storage.check_writable(output)
    # After the refusals, which write nothing: before anything of OUTPUT is read or changed.
    lock = held.enter_context(
        RunLock(output.child(layout.RUN_LOCK), RUN_LOCK_STALE_S, purpose="infer run into this OUTPUT")
    )
    # Ray only now (the infer job kind has joins_ray_first=False): a second run into a locked OUTPUT is refused before
    # it starts a local Ray (10-24 s of raylet, GCS and workers beside the live run). Joined already: a no-op.
    init_ray(min_cpus=actors.min_cpus(spec))
    # --overwrite clears OUTPUT in `begin`: none of its keys is done then. --retry-errors drops the error rows
    # there: their keys are not done, and INPUT is listed once, against the index OUTPUT will have.
    done = resume.DoneIndex() if spec.overwrite else resume.build(output, without_errors=spec.retry_errors)
    other = done.models - {card.model_sha256}
    if other:
        raise DataError(
            f"{output.uri}: holds results of another model ({sorted(other)[0][:12]}); "
            "pass --overwrite to replace them or choose another OUTPUT"
        )
    if done.rows:
        warn_of_changed_settings(output, spec, card)
    pool = actors.resolve(spec, ray.cluster_resources())
    return Run(spec, card, output, layout.new_run_id(), done, _tally(done, held), pool, started, lock)


def _tally(done: resume.DoneIndex, held: contextlib.ExitStack) -> Any:
    """The run's count of inputs found done (None when none is); killed with the run."""
    skips = resume.start_tally() if done else None
    if skips is not None:
        held.callback(ray.kill, skips)
    return skips


def begin(run: Run) -> None:
    """Past the refusals (an INPUT without images, a compaction holding the rewrite lock the last): clear
    OUTPUT (--overwrite) or drop its error rows (--retry-errors, whose keys `plan` left out of the index),
    and mark it incomplete."""
    spec, output = run.spec, run.output
    if not spec.retry_errors:
        logs.began()  # from here OUTPUT changes: its logs/ keeps this command's log
        if spec.overwrite:
            layout.clear(output)
        layout.mark_incomplete(output)
        return
    # The lock first: a compaction holding it refuses this run before _SUCCESS is touched or the log kept.
    with compact.rewrite_lock(output):
        logs.began()
        layout.mark_incomplete(output)
        dropped = compact.drop_error_rows(output, held=True)
    progress.note(f"infer: {dropped} error rows dropped from the summaries; the keys INPUT still lists are redone")


# Options whose change makes a resumed run's masks unlike the earlier ones' (the format, or the pixels).
MASK_SETTINGS = ("mask_format", "tile_size", "tile_overlap", "precision")


def changed_settings(record: layout.RunRecord, spec: InferSpec, card: ModelCard) -> list[str]:
    """What this run would write differently from the earlier run `record` describes."""
    now = spec.model_dump()
    out = [
        f"{k} {record.config[k]} -> {now[k]}"
        for k in MASK_SETTINGS
        if k in record.config and record.config[k] != now[k]
    ]
    before = ((record.model_extra or {}).get("tta") or {}).get("tta_flips")
    flips = list(card.tta(spec.tta_flip).flips)
    if before is not None and before != flips:
        out.append(f"flip TTA {','.join(before) or 'off'} -> {','.join(flips) or 'off'}")
    return out


def warn_of_changed_settings(output: storage.Location, spec: InferSpec, card: ModelCard) -> None:
    """A resumed run with other mask settings than the last run's kept both kinds of mask in one OUTPUT,
    silently (PNGs beside packed files, half the rows with TTA): said once, before the run."""
    try:
        run_id, record = layout.find_run(output)
    except DataError:
        return  # a damaged record: resume does not depend on it
    changes = changed_settings(record, spec, card) if record is not None else []
    if changes:
        note = (
            f"OUTPUT's run {run_id} wrote its masks with other settings ({'; '.join(changes)}); they stay, so "
            "OUTPUT will hold both kinds: pass --overwrite to redo every image with these"
        )
        progress.warn(log, "infer", note)


def list_inputs(run: Run) -> tuple[str, ray.data.Dataset]:
    """(source kind, rows of key/source_uri/bytes/error) for the keys not done yet."""
    spec = run.spec
    # Let a task's StorageError/DataError reach the driver as itself (Ray Data would wrap it in a
    # UserCodeException whose cause does not survive pickling), so the CLI prints its one line.
    ray.data.DataContext.get_current().raise_original_map_exception = True

    def keep(ds: ray.data.Dataset) -> ray.data.Dataset:
        # Right after listing, before any read: skipped images are never fetched.
        if not run.done:
            return ds
        kwargs = {"done": [run.done.buckets], "tally": run.skips}
        return ds.map_batches(resume.drop_done, fn_kwargs=kwargs, batch_format="numpy")

    return source_rows(
        spec.input,
        spec.source,
        spec.extensions,
        keep,
        spec.endpoint_url,
        spec.image_column,
        spec.key_column,
        spec.storage_retry_s,
        spec.batch_size,
        output=spec.output,
        members=CountedMembers(run.output, run.done.buckets, run.skips),
        max_pixels=spec.max_pixels,  # TIFFs over it in blocks: big rasters, read by windows in the actors
        max_bytes=spec.max_input_mb << 20,
    )


@dataclasses.dataclass(frozen=True)
class CountedMembers(MemberIndex):
    """The member index of a run: the members it skips unread (an archive all done is not opened, done members
    are not extracted) never reach `drop_done`, so they are counted here."""

    tally: Any = None

    def done_members(self, archive: Archive) -> frozenset[str] | None:
        keys = self.members(archive) if self.done_buckets else None
        done = self.done_among(keys)
        # By this version of the archive: a read task run again counts it once.
        batch = resume.batch_id(b"archive", archive.stamp())
        resume.count_skipped(self.tally, batch, len(keys or ()) if done is None else len(done))
        return done


def predict(run: Run, ds: ray.data.Dataset) -> ray.data.Dataset:
    """Decode (tasks, or in the actor) and predict (actor pool): rows gain pred and mean_confidence."""
    spec = run.spec
    # Tasks by default: a GPU actor should only predict, and on CPU actors decoding in the
    # actor measured the same (`raysegment bench infer --decode actor|tasks`).
    in_actor = spec.decode == "actor"
    if not in_actor:
        # Decode tasks ask for half a CPU: short tasks pack two to a core, and resources that
        # differ from the actor's keep Ray Data from fusing decoding into the predictor actor,
        # so decoding overlaps with prediction instead of taking turns with it.
        ds = ds.map_batches(
            preprocess,
            fn_kwargs={"card": run.card, "max_pixels": spec.max_pixels},
            batch_size=spec.batch_size,
            batch_format="numpy",
            num_cpus=0.5,
        )
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uri": spec.model,
            "endpoint_url": spec.endpoint_url,
            "retry_s": run.output.retry_s,
            "tta_flip": spec.tta_flip,
            "threads": max(1, int(spec.cpus_per_actor)),
            "precision": resolve_precision(spec.precision, run.actors.gpus),
            "tile_size": spec.tile_size,
            "tile_overlap": spec.tile_overlap,
            "batch_size": spec.batch_size,
            "decode_max_pixels": spec.max_pixels if in_actor else None,
            "output": run.output,  # big rasters' masks are written by the actor, window by window
            "window_pixels": spec.max_pixels,
        },
        batch_size=spec.batch_size,
        batch_format="numpy",
        num_gpus=run.actors.gpus,
        num_cpus=run.actors.cpus,
        compute=ray.data.ActorPoolStrategy(min_size=run.actors.min, max_size=run.actors.max),
    )


def write(run: Run, ds: ray.data.Dataset) -> ray.data.Dataset:
    """Write masks (CPU tasks); each batch yields its summary rows, which `drain` commits."""
    return ds.map_batches(
        layout.write_masks,
        fn_kwargs={"output": run.output, "card": run.card, "run_id": run.run_id, "mask_format": run.spec.mask_format},
        batch_size=run.spec.batch_size,
        batch_format="numpy",
    )


class InferProgress:
    """What the infer stage counts, all of it without waiting, from the loop and from the progress heartbeat
    (the loop blocks in Ray's iterator): rows handed to the writer as they come (their masks are written),
    each block's ok and error rows once the committer has counted them, and the inputs resume found done
    (the run's SkipTally, one call in flight at a time). Counts of whole blocks, never of rows: the driver's
    work does not grow with the images. A stopped stage's last line counts what the run kept: the rows in
    summary files and the inputs found done (`stopped`)."""

    def __init__(self, shown: progress.Stage, counts: layout.RunCounts, committer: Any, skips: Any) -> None:
        self.shown, self.counts, self.committer, self.skips = shown, counts, committer, skips
        self.counting: list[ray.ObjectRef] = []  # the committer's status counts of blocks, not yet tallied
        self.asked: ray.ObjectRef | None = None  # the skip tally's total, asked for and not yet answered
        self._lock = threading.Lock()  # the loop and the heartbeat thread both poll

    def add(self, block: ray.ObjectRef, start: int, stop: int) -> None:
        """Rows block[start:stop] go to the writer: shown now, their ok/error counts when counted."""
        with self._lock:
            self.counting.append(self.committer.status_counts.remote(block, start, stop))
        self.shown.update(stop - start)
        self.poll()

    def poll(self) -> None:
        """Tally what is counted by now (blocks, inputs found done), waiting for nothing."""
        with self._lock:
            if self.counting:
                done, self.counting = ray.wait(self.counting, num_returns=len(self.counting), timeout=0)
                self._tally(done)
        self._skipped(0)

    def _tally(self, refs: list[ray.ObjectRef]) -> None:
        for rows, ok in ray.get(refs):
            self.counts.processed += rows
            self.counts.ok += ok
            self.counts.error += rows - ok
        if refs:
            self.shown.update(0, errors=self.counts.error)

    def _skipped(self, wait_s: float) -> None:
        if self.skips is None:
            return
        with self._lock:
            if self.asked is None:
                self.asked = self.skips.total.remote()
            ready, _ = ray.wait([self.asked], timeout=wait_s)
            if not ready:
                return
            answer, self.asked = self.asked, None
        try:
            self.shown.skip(ray.get(answer))
        except ray.exceptions.RayActorError:
            pass  # the tally is gone: `skipped_total` logs it at the end

    def finish(self) -> None:
        """The stream ended: every block's counts, and the inputs found done (every filter task has counted
        by now: the stream ended after the last of them), so a finished stage's line reads its total."""
        with self._lock:
            refs, self.counting = self.counting, []
            self._tally(refs)
        self.counts.skipped = resume.skipped_total(self.skips)
        self.shown.skip(self.counts.skipped)

    def stopped(self, committed: int) -> None:
        """The stage stops (an interrupt, an error): its last line counts the rows kept, the `committed` ones in
        summary files (those waiting in the writer are redone by the next run; a commit the interrupt cut short
        may still land, uncounted), and the inputs found done (the skip tally gets a second at most)."""
        try:
            self.poll()
            self._skipped(1.0)
        except Exception as exc:  # the stage's own exception is the one to report
            log.debug("infer: counts at the stop: %s", exc)
        self.shown.kept(committed)


class CountedWriter(layout.SummaryWriter):
    """A SummaryWriter that counts the rows of the summary files it wrote: a stopped run kept those (a block
    of 256 rows committed 16 at a time may stop half-way through)."""

    def __init__(self, output: storage.Location, run_id: str, max_rows: int, committer: Any = None) -> None:
        super().__init__(output, run_id, max_rows, committer)
        self.committed = 0

    def flush(self) -> None:
        rows = self.rows
        super().flush()
        self.committed += rows


def drain(run: Run, ds: ray.data.Dataset) -> tuple[layout.RunCounts, layout.FirstBatch | None]:
    """Run the pipeline; the driver counts the rows and commits them, `summary_rows` to a file.

    Rows reach the driver only after their masks are written, so a summary file never points at a
    mask that is not there; rows still waiting when the driver dies are redone by the next run.
    The driver holds references to the write tasks' blocks, never the rows: a zero-CPU actor
    (`layout.BlockCommitter`) counts each block's statuses and writes each summary file."""
    counts = layout.RunCounts()
    committer = layout.start_committer()
    writer = CountedWriter(run.output, run.run_id, run.spec.summary_rows, committer)
    first_batch = None
    try:
        with progress.stage("infer") as shown:  # the total only where the caller knows it (nightly)
            seen = InferProgress(shown, counts, committer, run.skips)
            shown.poll = seen.poll
            try:
                # A block reaches the writer as soon as it exists (no prefetch holds finished rows back).
                for bundle in ds.iter_internal_ref_bundles():
                    for entry, piece in zip(bundle.blocks, bundle.slices):
                        rows = entry.metadata.num_rows
                        if rows is None:  # a map task's output block has it; else count it
                            rows = ray.get(committer.status_counts.remote(entry.ref, 0, None))[0]
                        start, stop = (piece.start_offset, piece.end_offset) if piece else (0, rows)
                        if stop <= start:
                            continue
                        seen.add(entry.ref, start, stop)
                        writer.add(layout.PendingRows(entry.ref, start, stop, entry.metadata.size_bytes or 0))
                        if first_batch is None:
                            first_batch = layout.FirstBatch(
                                seconds=round(time.time() - run.started, 2), rows=stop - start
                            )
                writer.close()
                seen.finish()
            except BaseException:
                seen.stopped(writer.committed)
                raise
    finally:
        ray.kill(committer)
    return counts, first_batch


def verify(run: Run, kind: str, counts: layout.RunCounts, first_batch: layout.FirstBatch | None) -> layout.RunRecord:
    """The run record, checked against what is on storage (not what the driver counted): one row per key."""
    spec = run.spec
    # By tasks, like the resume index: the driver gets counts only. A run that wrote nothing
    # checks the index it started from (compaction keeps rows exactly), not a second pass; one that
    # did, that index with its own files merged in (everything read again if other files changed).
    done = run.done if not counts.processed else resume.after_run(run.output, run.done, run.run_id)
    counts.total = counts.processed + counts.skipped  # this run's inputs; `done` is all of OUTPUT
    seconds = time.time() - run.started
    problems = []
    # Rows against keys over the whole output, not this run's count: a re-run must not pass a
    # collision that an earlier run recorded. Keys count as one when only their Unicode form differs.
    distinct = done.folded
    if done.rows != distinct:
        problems.append(
            f"{done.rows} summary rows for {distinct} distinct keys: some inputs share a key (same path "
            "with different extensions?); rename them, then re-run with --overwrite"
        )
    if not done.keys:
        # A folder without images is refused when it is listed; archives or a table are read by tasks,
        # so one that holds no image is found here, and must not pass as a complete, empty output.
        problems.append(
            f"INPUT {storage.redact(spec.input)} held no images ({kind} source): nothing was inferred; check INPUT, "
            "--source and --extensions"
        )
    elif not done.ok and spec.fail_if_none_ok:
        # Every row an error (the wrong model for these images, a source of something else): no output
        # to mistake for a result, whatever --max-error-fraction allows; every re-run fails the same way.
        problems.append(
            f"none of the {done.keys} inputs in OUTPUT could be segmented: every summary row is an error "
            "(their `error` column, or `raysegment report`, says why); fix the inputs and re-run with "
            "--retry-errors, or with another MODEL into another OUTPUT"
        )
    # Over the whole output too: a re-run of a failed run (resuming every key) must not pass what it failed.
    failed = done.rows - done.ok
    if done.rows and failed / done.rows > spec.max_error_fraction:
        now = f" ({counts.error} of {counts.processed} in this run)" if counts.processed != done.rows else ""
        problems.append(
            f"{failed} of {done.rows} images failed{now}, over --max-error-fraction {spec.max_error_fraction}: "
            "their `error` column (or `raysegment report`) says why; fix them, then re-run with --retry-errors "
            "(nightly: fix or replace the images; a changed image is masked again)"
        )
    if not run.lock.still_held():
        problems.append(
            f"another run took OUTPUT's lock ({layout.RUN_LOCK}) over while this one ran (the store unreachable for "
            f"{RUN_LOCK_STALE_S} s?); rows of both may be mixed: run again with --overwrite"
        )
    return layout.RunRecord(
        run_id=run.run_id,
        status="failed" if problems else "succeeded",
        model_id=run.card.model_id,
        model_sha256=run.card.model_sha256,
        input=storage.redact(spec.input),
        source=kind,
        decoded_in="actor" if spec.decode == "actor" else "tasks",
        output=storage.redact(spec.output),
        counts=counts,
        seconds=round(seconds, 2),
        images_per_second=round(counts.processed / seconds, 2),
        first_batch=first_batch,
        config=spec.model_dump(),
        actors=run.actors.as_dict(),
        tta=run.card.tta(spec.tta_flip).record(),  # the flip TTA the actors ran (their same decision)
        raysegment=__version__,
        problems=problems,
    )


def write_report(run: Run, record: layout.RunRecord) -> None:
    """report.html and overlays.png, under the job's storage deadline; never fails a finished run
    (`raysegment report` redoes them). From the tally the last report left and the summary files added since
    (report_scan.py): a run adding 5 rows to 1M reads its own rows, not 1M."""
    from raysegment.report import write_run_report

    spec, output = run.spec, run.output
    try:
        write_run_report(output.uri, endpoint_url=spec.endpoint_url, retry_s=output.retry_s, record=record, tally=True)
    except Exception as exc:
        log.warning("run report not written (%s); run `raysegment report %s`", exc, storage.redact(run.output.uri))
