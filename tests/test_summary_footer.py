"""One reader of a summary file's footer (`output._footer_schema`): the report's class names
(`_summary_schema`, `Summaries`) and read_summary's naming of a stray Parquet file (`_schema_names`) both
read the schema through it, and a damaged, stray or vanished file gives each caller the error it had."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysegment import storage
from raysegment.errors import DataError
from raysegment.inference import output as layout

CLASSES = ["background", "thing"]


def error_rows(n: int) -> pa.Table:
    """n error rows of a run (no masks to write), in the summaries' schema."""
    rows = [
        {"key": f"k{i}", "source_uri": f"/in/k{i}.png", "status": "error", "error": "unreadable", "run_id": "r1"}
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=layout.summary_schema(CLASSES))


def test_one_footer_reader_for_a_summary_a_truncated_one_and_a_stray_file(tmp_path, monkeypatch):
    out = storage.resolve(str(tmp_path / "out"))
    uri = layout.commit_rows(out, "r1", error_rows(3))
    (path,) = layout.summary_files(out)
    assert os.path.samefile(uri, path)

    # A real summary: its columns and the class names in its metadata, by both callers.
    schema = layout._summary_schema(out, path)
    assert schema.names == list(layout.SUMMARY_COLUMNS)
    assert layout._schema_names(out, path) == list(layout.SUMMARY_COLUMNS)
    assert layout.Summaries(out).class_names == CLASSES
    # A footer longer than the first ranged read: read again from where it starts.
    monkeypatch.setattr(layout, "FOOTER_GUESS", 16)
    assert layout._summary_schema(out, path).names == list(layout.SUMMARY_COLUMNS)
    monkeypatch.undo()

    # Cut short (a copy that stopped midway): damaged, named with the fix; read_summary keeps its own error.
    data = open(path, "rb").read()
    for cut in (data[: len(data) // 2], data[:-3], b""):
        with open(path, "wb") as f:
            f.write(cut)
        with pytest.raises(DataError, match=r"damaged Parquet file .*run `infer` again"):
            layout._summary_schema(out, path)
        assert layout._schema_names(out, path) is None
        with pytest.raises(DataError, match="damaged Parquet file") as read:
            layout.read_summary(out, path, columns=["key", "status"])
        assert "not a raysegment summary" not in str(read.value)

    # Someone's table beside them: named as not a summary by the footer reader and by read_summary.
    os.remove(path)
    stray = os.path.join(tmp_path, "out", "summaries", "export.parquet")
    pq.write_table(pa.table({"a": [1, 2]}), stray)
    assert layout._schema_names(out, stray) == ["a"]
    for read in (
        lambda: layout._summary_schema(out, stray),
        lambda: layout.read_summary(out, stray, columns=["key", "status"]),
    ):
        with pytest.raises(DataError, match=r"export.parquet: not a raysegment summary \(columns \['a'\]"):
            read()

    # Gone since it was listed (compaction removed it): read again, not damaged.
    os.remove(stray)
    with pytest.raises(layout.SummariesChanged):
        layout._summary_schema(out, stray)
    assert layout._schema_names(out, stray) is None
