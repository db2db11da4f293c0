"""`raysegment compact OUTPUT`: merge many small summary files into few large ones, safely beside readers.

Outputs written before summaries held many batches (one file per batch of 16) have tens of
thousands of files per million images; every pass over them (resume, reports, DuckDB) pays a
request per file. Compaction rewrites them as files of about `summary_rows` rows under
`summaries/run=_compacted/`, each naming in its footer the files it replaces, and only then
deletes those. A reader that lists between the two steps sees both and reads only the new file
(`output.summary_files`); one that listed before and finds a file gone starts its pass again
(`output.consistent`). So no reader sees a row twice or misses one. A compaction killed before its
deletes leaves both, which readers treat the same way, and the next compaction deletes the rest.

Only files of finished runs are merged, unless `include_unfinished`: a run in progress is still
adding files. A run is finished when it has a run record, or when it was killed and a later run
checked its rows: `_SUCCESS` there while no run holds OUTPUT's run lock (`_checked_by_success`). The
work is Ray tasks: footers read in parallel, one task per merged file; the driver holds one (path,
rows) pair per file, never the rows.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from raysegment import progress, storage
from raysegment.config import CompactSpec
from raysegment.errors import DataError
from raysegment.inference import output as layout
from raysegment.lock import LockedError, RunLock

FILES_PER_TASK = 64
READ_THREADS = 8


def _rows_of(output: storage.Location, paths: list[str]) -> list[int]:
    loc = output.child(layout.SUMMARIES)

    def rows(path: str) -> int:
        def read() -> int:
            with loc.fs.open(path, "rb") as f:
                try:
                    return pq.read_metadata(f).num_rows
                except pa.ArrowException as exc:  # cut short or emptied: name the file, not the folder
                    raise storage.damaged_parquet(loc, path, exc, layout.DAMAGED_SUMMARY) from exc

        return loc.call(read)

    with ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:
        return list(pool.map(rows, paths))


@ray.remote(num_cpus=0.25)
def _count_rows(output: storage.Location, paths: list[str]) -> list[int]:
    return _rows_of(output, paths)


@ray.remote(num_cpus=0.5)
def _merge(output: storage.Location, paths: list[str], relative: list[str]) -> tuple[str, int]:
    """Read `paths` and write them as one compacted file that names them; (its URI, rows)."""
    with ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:
        tables = list(pool.map(lambda p: storage.read_table(output, p), paths))
    merged = pa.concat_tables(tables, promote_options="default")  # older files lack newer columns
    meta = dict(tables[0].schema.metadata or {})
    meta[layout.REPLACES_META] = json.dumps(sorted(relative)).encode()
    merged = merged.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(merged, buf, row_group_size=layout.ROW_GROUP_ROWS, **storage.PAGE_CHECKSUMS)
    target = output.child(
        layout.SUMMARIES, layout.COMPACTED, f"part-{layout.batch_name(sorted(relative))}.parquet"
    )  # named by what it replaces: a retried task rewrites the same file
    storage.write_bytes(target, buf.getvalue())
    return target.uri, merged.num_rows


def _run_of(relative: str) -> str:
    return relative.split("/", 1)[0][len("run=") :] if relative.startswith("run=") else ""


def _finished_runs(output: storage.Location) -> set[str]:
    runs = output.child(layout.RUNS)
    if not storage.exists(runs):
        return set()
    return {posixpath.basename(p)[: -len(".json")] for p in storage.list_files(runs, (".json",))}


def _checked_by_success(output: storage.Location) -> bool:
    """Whether the last infer run into OUTPUT checked every summary file listed before this call, killed
    runs' included: `_SUCCESS` is there while no run holds OUTPUT's run lock. Every run takes that lock,
    removes `_SUCCESS` before it writes a row, and writes it again only after checking the rows of all of
    OUTPUT (one per key); so a file written before `_SUCCESS` is seen under the lock is part of an output
    that checked out. The lock is held only for the look: a run starting after it writes files under its
    own run id, which were not listed."""
    from raysegment.inference.pipeline import RUN_LOCK_STALE_S  # pipeline imports this module

    if not layout.is_complete(output):
        return False  # cheap first: no lock written for an output whose last run did not finish
    try:
        with RunLock(output.child(layout.RUN_LOCK), RUN_LOCK_STALE_S, purpose="compact (a look at _SUCCESS)"):
            return layout.is_complete(output)
    except LockedError:
        return False  # an infer is running into OUTPUT: nothing is checked until it ends


def _remove(output: storage.Location, paths: list[str]) -> None:
    _delete(output.child(layout.SUMMARIES), paths)


DELETE_CHUNK = 1000  # keys in one S3 DeleteObjects request


def _delete(loc: storage.Location, paths: list[str]) -> None:
    """Delete these files (paths on loc's store), those already gone skipped: one `fs.rm` of a list per
    DELETE_CHUNK paths (one request on S3, where a missing key is no error), never a request per file to ask
    first. A path holding * ? or [ is deleted alone (`fs.rm` of a list takes it for a pattern: on S3 it would
    match other keys' files)."""
    for i in range(0, len(paths), DELETE_CHUNK):
        chunk = paths[i : i + DELETE_CHUNK]
        loc.call(lambda chunk=chunk: _delete_chunk(loc.fs, chunk))


def _delete_chunk(fs: Any, paths: list[str]) -> None:
    plain = [p for p in paths if not glob.has_magic(p)]
    alone = [p for p in paths if glob.has_magic(p)]
    if plain:
        try:
            fs.rm(plain)
        except FileNotFoundError:  # a local file already gone stops the list there: the rest one by one
            alone = plain + alone
    for path in alone:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)


@ray.remote(num_cpus=0.5)
def _without(
    output: storage.Location, paths: list[str], relative: list[str], keys: pa.Array | None
) -> list[tuple[str, int]]:
    """For each of these files that holds rows to drop (error rows; with `keys`, the rows of those keys):
    write its other rows as a file that replaces it (none when every row goes), and delete the mask files
    of dropped keys. (path, rows dropped) of each such file; the caller deletes them.

    A dropped key's mask files are deleted before any file without its row is written (a task killed between
    the two would leave them for good), gathered over the files that go whole, DELETE_CHUNK to a request."""
    found: list[tuple[str, int]] = []
    stale: list[str] = []  # mask files of dropped keys, not yet deleted
    masks = output.child(layout.MASKS)
    for path, rel in zip(paths, relative):
        column = "status" if keys is None else "key"
        values = storage.read_table(output, path, columns=[column]).column(column)
        drop = pc.equal(values, "error") if keys is None else pc.is_in(values, keys)
        errors = pc.sum(drop).as_py() or 0
        if not errors:
            continue
        table = storage.read_table(output, path) if errors < len(values) or keys is not None else None
        if keys is not None:  # a dropped key's own mask file goes with its row (the error rows have none)
            stale += [loc.path for loc in layout.own_mask_files(output, table.filter(drop))]
        if errors < len(values):
            _delete(masks, stale)
            stale = []
            kept = table.filter(pc.invert(drop))
            meta = dict(table.schema.metadata or {})
            meta[layout.REPLACES_META] = json.dumps([rel]).encode()
            buf = io.BytesIO()
            pq.write_table(
                kept.replace_schema_metadata(meta), buf, row_group_size=layout.ROW_GROUP_ROWS, **storage.PAGE_CHECKSUMS
            )
            what = "without-errors" if keys is None else f"without-{len(keys)}-keys"
            name = f"part-{layout.batch_name([what, rel])}.parquet"  # a retried task writes the same
            storage.write_bytes(output.child(layout.SUMMARIES, layout.COMPACTED, name), buf.getvalue())
        found.append((path, errors))
    _delete(masks, stale)
    return found


REWRITE_LOCK = "_rewrite.lock"  # in summaries/, beside the Parquet files (which alone are listed as summaries)
REWRITE_STALE_S = 3600  # a rewrite takes minutes; a lock this old was left by a killed one


def rewrite_lock(output: storage.Location) -> RunLock:
    """Held by the rewriters of summary files (`compact`, `infer --retry-errors`, a nightly re-run dropping
    changed images' rows): two replacing one file would show its rows twice."""
    return RunLock(output.child(layout.SUMMARIES, REWRITE_LOCK), REWRITE_STALE_S, purpose="summary rewrite")


def drop_error_rows(output: storage.Location, held: bool = False) -> int:
    """`infer --retry-errors`: take the error rows out of OUTPUT's summaries, so their keys are inputs again;
    the error rows dropped. Each file with errors is replaced as compaction replaces files (the new file
    first, naming the old; the old deleted after), so a reader never sees a row twice or a kept row missing.
    `held`: the caller holds `rewrite_lock` already."""
    return _drop_rows(output, None, held)


def drop_key_rows(output: storage.Location, keys: list[str], held: bool = False) -> int:
    """`nightly`: take the rows of these keys out of OUTPUT's summaries (their images changed since an
    unfinished attempt wrote them), as `drop_error_rows` takes error rows; the rows dropped. `held`: the
    caller holds `rewrite_lock` already."""
    return _drop_rows(output, pa.array(keys, pa.string()), held) if keys else 0


def _drop_rows(output: storage.Location, keys: pa.Array | None, held: bool) -> int:
    root = output.child(layout.SUMMARIES)
    if not storage.exists(root):
        return 0
    with contextlib.nullcontext() if held else rewrite_lock(output):
        # Listed before `live`, as compact() does: a file written between the two listings is then live
        # (a leftover only if it is replaced), never deleted as one.
        every = storage.parquet_files(root)
        live = layout.summary_files(output)
        # Files a killed compaction left are hidden only by the files that replace them: removed before
        # any of those is replaced in turn.
        alive = set(live)
        _remove(output, [p for p in every if p not in alive])
        return _drop(output, live, keys)


def _drop(output: storage.Location, live: list[str], keys: pa.Array | None) -> int:
    groups = [live[i : i + FILES_PER_TASK] for i in range(0, len(live), FILES_PER_TASK)]
    shared = ray.put(keys)
    found = [
        f
        for done in ray.get(
            [_without.remote(output, g, [layout.relative_path(output, p) for p in g], shared) for g in groups]
        )
        for f in done
    ]
    _remove(output, [p for p, _ in found])
    return sum(n for _, n in found)


def compact(spec: CompactSpec) -> dict[str, Any]:
    """Merge the summary files of finished runs into files of about `summary_rows` rows."""
    output = storage.resolve(spec.output, spec.endpoint_url, spec.storage_retry_s)
    root = output.child(layout.SUMMARIES)
    if not storage.exists(root):
        from raysegment.nightly import partition_fix  # nightly imports this module

        fix = partition_fix(output, "compact")
        raise DataError(fix or f"{output.uri}: no inference summaries ({layout.SUMMARIES}/); nothing to compact")
    with rewrite_lock(output):
        return _compact(spec, output, root)


def _compact(spec: CompactSpec, output: storage.Location, root: storage.Location) -> dict[str, Any]:
    every = storage.parquet_files(root)
    live = set(layout.summary_files(output))
    # Left over by a compaction killed before its deletes: replaced, so readers skip them already.
    # Removed first, while the files that replace them still exist.
    leftovers = [p for p in every if p not in live]
    _remove(output, leftovers)
    finished = _finished_runs(output)
    compacted = layout.COMPACTED[len("run=") :]
    killed = {_run_of(layout.relative_path(output, p)) for p in live} - finished - {compacted}
    # Runs without a record (killed or running) are finished once a later run checked them: their files were
    # listed above, before the look at _SUCCESS.
    checked = killed if killed and not spec.include_unfinished and _checked_by_success(output) else set()
    finished |= checked

    def movable(path: str) -> bool:
        run = _run_of(layout.relative_path(output, path))
        return run != compacted and (spec.include_unfinished or run in finished)

    candidates = sorted(p for p in live if movable(p) or layout.relative_path(output, p).startswith(layout.COMPACTED))
    groups = [candidates[i : i + FILES_PER_TASK] for i in range(0, len(candidates), FILES_PER_TASK)]
    rows = [n for counts in ray.get([_count_rows.remote(output, g) for g in groups]) for n in counts]
    # Files already holding half a target file's rows stay as they are.
    small = [(p, n) for p, n in zip(candidates, rows) if n < spec.summary_rows // 2]
    chunks: list[list[tuple[str, int]]] = [[]]
    held = 0  # the last chunk's rows (summed again per file, 62,500 files into one took a minute)
    for path, n in small:
        if chunks[-1] and held + n > spec.summary_rows:
            chunks.append([])
            held = 0
        chunks[-1].append((path, n))
        held += n
    chunks = [c for c in chunks if len(c) > 1]
    merged: list[tuple[str, int]] = []
    with progress.stage("compact", len(chunks), unit="files") as shown:
        pending = [
            _merge.remote(output, [p for p, _ in c], [layout.relative_path(output, p) for p, _ in c]) for c in chunks
        ]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            merged.append(ray.get(ready[0]))
            shown.update(1)
    # Only once every new file is whole: the files they replace (and any a killed compaction left).
    replaced = [p for c in chunks for p, _ in c]
    _remove(output, replaced)
    unfinished = {_run_of(layout.relative_path(output, p)) for p in live if not movable(p)}
    return {
        "output": storage.redact(output.uri),
        "files_before": len(live),
        "files_after": len(live) - len(replaced) + len(merged),
        "merged_files": len(replaced),
        "written_files": len(merged),
        "rows_moved": sum(n for _, n in merged),
        "leftovers_removed": len(leftovers),
        "unfinished_runs_left": sorted(unfinished - {compacted}),
        "killed_runs_checked": sorted(checked),
    }
