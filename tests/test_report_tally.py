"""The report's tally (report_scan.py): `infer`'s end-of-run report reads only the summary files added since
the last report, and says what a full pass over every file says, whatever changed the summaries meanwhile.

A run that added 5 rows to an output of 1M read the 1M again for its report. Each test builds summaries as
the pipeline commits them (`output.commit_rows`: no model, no masks), reports from the tally, and compares
it with a full pass and with `raysegment report`'s page.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path

import fsspec.implementations.local
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from raysegment import report, report_scan, storage
from raysegment.cli import main
from raysegment.config import InferSpec
from raysegment.inference import output as layout
from raysegment.inference import pipeline

NAMES = ["background", "disc", "square"]
SHA = "a" * 64
# Run ids sort by start time; a later run's files sort between earlier runs' and run=_compacted's.
OLD, LATER, NEW = "20260101T000000Z-0000aaaa", "20260301T000000Z-0000cccc", "20260201T000000Z-0000bbbb"


def rows(keys: list[str], run_id: str, seed: int, every_error: int = 4) -> pa.Table:
    """Summary rows of `keys`: every `every_error`-th an error row, random shares and stage times (float sums
    whose value depends on the order of their additions)."""
    rng = np.random.default_rng(seed)
    n = len(keys)
    ok = [i % every_error != 1 for i in range(n)]
    shares = [list(rng.dirichlet(np.ones(len(NAMES))).astype(np.float32)) if o else None for o in ok]
    ms = lambda: rng.uniform(0.1, 90, n).astype(np.float32)  # noqa: E731
    return pa.table(
        {
            "key": keys,
            "source_uri": [f"/in/{k}.png" for k in keys],
            "mask_uri": [f"/out/masks/{k}.png" if o else "" for k, o in zip(keys, ok)],
            "mask_offset": [-1] * n,
            "mask_length": [-1] * n,
            "height": np.full(n, 8, np.int32),
            "width": np.full(n, 8, np.int32),
            "status": ["ok" if o else "error" for o in ok],
            "error": ["" if o else f"cannot decode {k}" for k, o in zip(keys, ok)],
            "class_fractions": shares,
            "mean_confidence": pa.array([0.9 if o else None for o in ok], pa.float32()),
            "model_id": ["m"] * n,
            "model_sha256": [SHA] * n,
            "run_id": [run_id] * n,
            "decode_ms": ms(),
            "predict_ms": ms(),
            "write_ms": ms(),
            "peak_rss_mb": np.zeros(n, np.float32),
        },
        schema=layout.summary_schema(NAMES),
    )


def commit(out: storage.Location, run_id: str, keys: list[str], per_file: int, seed: int) -> None:
    for i in range(0, len(keys), per_file):
        layout.commit_rows(out, run_id, rows(keys[i : i + per_file], run_id, seed + i))
    layout.write_run_record(out, layout.RunRecord(run_id=run_id, model_id="m"))


def earlier_runs(out: storage.Location) -> list[str]:
    """Two finished runs, 1,200 rows (300 errors: more than the report lists), and their report's tally."""
    keys = [f"k{i:05d}" for i in range(0, 2400, 2)]  # even keys: a later run's odd keys fall between
    commit(out, OLD, keys[:700], 100, 1)
    commit(out, LATER, keys[700:], 250, 2)
    report_scan.scan_summaries(out, 16, None)
    assert storage.exists(out.child(layout.REPORT_TALLY))
    return keys


class Reads(fsspec.implementations.local.LocalFileSystem):
    """The local filesystem, noting which summary files' bytes it gave."""

    cachable = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.files: list[str] = []
        self.lock = threading.Lock()

    def cat_file(self, path, *args, **kwargs):
        if path.endswith(".parquet"):  # a summary file, not the tally
            with self.lock:
                self.files.append(os.path.basename(os.path.dirname(path)))
        return super().cat_file(path, *args, **kwargs)


def watched(out: storage.Location) -> storage.Location:
    return storage.Location(out.uri, Reads(), out.path)


def same(tallied: report_scan.Scan, full: report_scan.Scan) -> None:
    """Every figure the same, to the last bit and the order of the lists."""
    assert tallied.tally() == full.tally()
    assert (tallied.run_rows, tallied.stage_sum) == (full.run_rows, full.stage_sum)
    assert (tallied.share_sum == full.share_sum).all()


def same_page(out: storage.Location, run_id: str) -> None:
    """infer's report (from the tally, the record in memory) and `raysegment report`'s (every file) alike."""
    record = layout.RunRecord(run_id=run_id, model_id="m", counts=layout.RunCounts(processed=9))
    layout.write_run_record(out, record)
    run = pipeline.Run(InferSpec(model="m", input="in", output=out.uri), None, out, run_id, *[None] * 5)
    pipeline.write_report(run, record)  # as `infer` writes it: from the tally
    page = Path(out.path, report.REPORT_FILE).read_text()
    res = CliRunner().invoke(main, ["report", out.uri, "--run-id", run_id, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["samples"] == 16
    assert Path(out.path, report.REPORT_FILE).read_text() == page
    assert re.search(r'id="out-error">[0-9,]+<', page)


def test_a_run_adding_rows_reads_only_its_own_files_and_reports_as_a_full_pass(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    keys = earlier_runs(out)
    added = [f"k{i:05d}" for i in range(1, 2400, 97)]  # 25 odd keys spread among the earlier ones
    commit(out, NEW, added, 10, 3)

    seen = watched(out)
    tallied = report_scan.scan_summaries(seen, 16, NEW, tally=True)
    assert seen.fs.files == [f"run={NEW}"] * 3  # the run's 3 files: nothing of the 1,200 rows before
    full = report_scan.scan_summaries(out, 16, NEW)
    same(tallied, full)
    assert (full.rows, full.run_rows, len(full.errors)) == (len(keys) + 25, 25, report_scan.MAX_ERRORS)
    assert any(e["run_id"] == NEW for e in full.errors)  # its errors sort among the earlier ones
    same_page(out, NEW)

    # Nothing added since: the tally alone (no summary file read), and the report of an earlier run from it.
    seen = watched(out)
    again = report_scan.scan_summaries(seen, 4, OLD, tally=True)
    assert seen.fs.files == []
    same(again, report_scan.scan_summaries(out, 4, OLD))


def change_nothing(out: storage.Location) -> None:
    pass


def delete_a_file(out: storage.Location) -> None:
    os.remove(layout.summary_files(out)[1])


def rewrite_a_file_in_place(out: storage.Location) -> None:
    """Same name, other rows (its errors redone by hand): only its stamp tells."""
    path = layout.summary_files(out)[0]
    table = layout.read_summary(out, path)
    n = table.num_rows
    table = table.set_column(7, "status", pa.array(["ok"] * n)).set_column(8, "error", pa.array([""] * n))
    table = table.set_column(9, "class_fractions", pa.array([[1.0, 0.0, 0.0]] * n, pa.list_(pa.float32())))
    pq.write_table(table, path, **storage.PAGE_CHECKSUMS)


def overwrite(out: storage.Location) -> None:
    """--overwrite: the summaries and the tally with them go; the new run's rows are the only ones."""
    layout.clear(out)


def an_older_tally(out: storage.Location) -> None:
    loc = out.child(layout.REPORT_TALLY)
    tally = json.loads(storage.read_bytes(loc))
    storage.write_bytes(loc, json.dumps(tally | {"version": 0, "rows": 1}).encode())


def a_damaged_tally(out: storage.Location) -> None:
    storage.write_bytes(out.child(layout.REPORT_TALLY), b'{"version": 1, "rows"')


EVERY_RUN = sorted(f"run={r}" for r in (OLD, LATER, NEW))


@pytest.mark.parametrize(
    "change, read",
    [
        (change_nothing, [f"run={NEW}"]),
        (delete_a_file, EVERY_RUN),
        (rewrite_a_file_in_place, EVERY_RUN),
        (overwrite, [f"run={NEW}"]),
        (an_older_tally, EVERY_RUN),
        (a_damaged_tally, EVERY_RUN),
    ],
)
def test_a_tally_that_is_not_what_storage_holds_is_not_used(tmp_path, change, read):
    """A file the tally counted gone or rewritten, the summaries cleared, a tally of another version or
    damaged: every file is read, and the report is a full pass's; the tally written then serves the next."""
    out = storage.resolve(str(tmp_path / "out"))
    earlier_runs(out)
    change(out)
    commit(out, NEW, [f"k{i:05d}" for i in range(1, 50, 2)], 10, 3)
    seen = watched(out)
    tallied = report_scan.scan_summaries(seen, 16, NEW, tally=True)
    assert sorted(set(seen.fs.files)) == read
    same(tallied, report_scan.scan_summaries(out, 16, NEW))
    seen = watched(out)
    report_scan.scan_summaries(seen, 16, NEW, tally=True)
    assert seen.fs.files == []


def test_more_samples_than_the_tally_holds_read_every_file(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    earlier_runs(out)
    seen = watched(out)
    tallied = report_scan.scan_summaries(seen, report_scan.TALLY_SAMPLES + 1, None, tally=True)
    assert len(seen.fs.files) == len(layout.summary_files(out))
    same(tallied, report_scan.scan_summaries(out, report_scan.TALLY_SAMPLES + 1, None))


def test_exact_sums_do_not_depend_on_order_or_grouping():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0, 1, (500, 3)), rng.uniform(0, 1e-30, (20, 3)), [[1e300, -1e300, np.nan]]])
    whole = report_scan.ExactSum(3)
    whole.add(values)
    parts = report_scan.ExactSum(3)
    for chunk in np.array_split(values[::-1], 7):
        parts.add(chunk)
    assert (whole.values() == parts.values()).all() and whole.state() == parts.state()

    assert list(whole.values()) == [math.fsum(c[np.isfinite(c)]) for c in values.T]  # correctly rounded
    again = report_scan.ExactSum(3, json.loads(json.dumps(whole.state())))
    assert (again.values() == whole.values()).all()


def test_after_retry_errors_and_compaction_the_report_is_a_full_pass(ray_cluster, tmp_path):
    """`infer --retry-errors` replaces every file holding error rows, `raysegment compact` merges files: the
    tally's files are gone, so the next report reads every file; the one after reads only what was added."""
    from raysegment.config import CompactSpec
    from raysegment.inference.compact import compact, drop_error_rows

    out = storage.resolve(str(tmp_path / "out"))
    earlier_runs(out)
    failed = [
        k
        for t in layout.summary_tables(out, ["key", "status"])
        for k, s in zip(t.column("key").to_pylist(), t.column("status").to_pylist())
        if s == "error"
    ]
    assert drop_error_rows(out) == len(failed) > 300  # as `infer --retry-errors` does before its run
    commit(out, NEW, failed[:150], 50, 4)  # the run redoes them: ok now, but every 4th fails again
    seen = watched(out)
    tallied = report_scan.scan_summaries(seen, 16, NEW, tally=True)
    assert len(seen.fs.files) == len(layout.summary_files(out))  # every file, the replacements included
    same(tallied, report_scan.scan_summaries(out, 16, NEW))
    assert (tallied.rows, tallied.error, tallied.run_rows) == (1200 - len(failed) + 150, 3 * 13, 150)

    r = compact(CompactSpec(output=out.uri, summary_rows=1000))
    assert r["merged_files"] > 1
    later = "20260401T000000Z-0000dddd"
    commit(out, later, failed[150:], 50, 5)
    seen = watched(out)
    tallied = report_scan.scan_summaries(seen, 16, later, tally=True)
    assert len(seen.fs.files) == len(layout.summary_files(out))
    same(tallied, report_scan.scan_summaries(out, 16, later))
    same_page(out, later)

    last = "20260501T000000Z-0000eeee"
    commit(out, last, ["z1", "z2", "z3", "z4", "z5"], 5, 6)  # 5 rows added: only they are read
    seen = watched(out)
    tallied = report_scan.scan_summaries(seen, 16, last, tally=True)
    assert seen.fs.files == [f"run={last}"]
    same(tallied, report_scan.scan_summaries(out, 16, last))
