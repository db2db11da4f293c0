"""Issue #20, the output side: what a job writes stays bounded and honest when storage, names and
model files are hostile. Reports and prepare give up on a dead store after the job's deadline; keys
too long for a file name get a safe stored name; a swapped model.keras is refused; the run record is
written after the report; error rows hold NULL, not zeros.

The dead store is a closed loopback port (connection refused, nothing to wait on), so the tests assert
what was attempted, not how long it took.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from click.testing import CliRunner
from helpers import (
    PipeBarrier,
    has_summary,
    in_background,
    png,
    summaries,
    untrained_card,
    wait_for,
    write_outputs,
)

from raysegment import report, storage
from raysegment.cli import main
from raysegment.config import InferSpec, PrepareSpec
from raysegment.data.layouts import Pair
from raysegment.data.prepare import _build_shard, prepare
from raysegment.errors import StorageError
from raysegment.inference import output as layout
from raysegment.inference.pipeline import infer
from raysegment.models.card import CARD_FILE, MODEL_FILE

DEAD_BUCKET = "s3://raysegment-dead"
GAVE_UP = r"still failing after \d+ attempts over 1s"


@pytest.fixture
def dead_endpoint(monkeypatch: pytest.MonkeyPatch) -> str:
    """An S3 endpoint nothing listens on, and credentials, so the client gets as far as connecting."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "raysegment-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "raysegment-test-secret")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return f"http://127.0.0.1:{port}"


def write_run(out: storage.Location, keys: list[str], sources: list[str], errors: list[str] | None = None) -> None:
    """One batch of summary rows and masks, written by the pipeline's own last stage (no Ray, no model)."""
    card = untrained_card()
    n = len(keys)
    batch = {
        "key": np.asarray(keys, object),
        "source_uri": np.asarray(sources, object),
        "height": np.full(n, 8),
        "width": np.full(n, 8),
        "pred": np.zeros((n, 8, 8), np.uint8),
        "error": np.asarray(errors or [""] * n, object),
        "mean_confidence": np.full(n, 0.9, np.float32),
        "decode_ms": np.ones(n, np.float32),
        "predict_ms": np.ones(n, np.float32),
    }
    write_outputs(batch, out, card, "20260101T000000Z-0000abcd", "png")


# -- 1. the report runs under the job's storage deadline ------------------------------------------------


def test_report_gives_up_on_a_dead_source_store_after_one_deadline(tmp_path, dead_endpoint):
    """Six sampled sources on a store that is gone: the first is retried for the deadline, the other
    five are not tried at all (it used to be one deadline, and one attempt at least, per sample)."""
    out = storage.resolve(str(tmp_path / "out"))
    keys = [f"k{i}" for i in range(6)]
    write_run(out, keys, [f"{DEAD_BUCKET}/in/{k}.png" for k in keys])
    result = report.write_run_report(out.uri, samples=6, endpoint_url=dead_endpoint, retry_s=1)
    assert (result["samples"], result["mask_only"], result["unreachable"]) == (6, 6, 5)
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("storage endpoint unreachable") == 1  # the one sample that was tried
    assert page.count(report.UNREACHABLE) == 5


def test_report_command_takes_the_deadline_from_the_flag_or_the_environment(dead_endpoint, monkeypatch):
    """An output on a dead store: one line naming the deadline, exit 2; the flag and the env var both set it."""
    run_uri = f"{DEAD_BUCKET}/out"
    res = CliRunner().invoke(main, ["report", run_uri, "--endpoint-url", dead_endpoint, "--storage-retry-s", "1"])
    assert res.exit_code == 2, res.output
    assert "storage endpoint unreachable" in res.output
    assert len(re.findall(GAVE_UP, res.output)) == 1, res.output
    monkeypatch.setenv(storage.RETRY_ENV, "1")
    res = CliRunner().invoke(main, ["report", run_uri, "--endpoint-url", dead_endpoint])
    assert res.exit_code == 2 and "over 1s" in res.output, res.output


# -- 6. prepare runs under the job's storage deadline -----------------------------------------------------


def test_prepare_gives_up_after_its_storage_deadline(tmp_path, dead_endpoint):
    spec = PrepareSpec(source=f"{DEAD_BUCKET}/src", dest=str(tmp_path / "data"), endpoint_url=dead_endpoint)
    spec.storage_retry_s = 1
    with pytest.raises(StorageError, match=GAVE_UP):
        prepare(spec)
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_prepare_shard_tasks_retry_for_the_drivers_deadline(ray_cluster, tmp_path, dead_endpoint):
    """The store dies after listing: a shard task's reads retry for the deadline the driver fixed
    (their Locations carry it), then fail the job as an outage, not as an invalid pair."""
    source = storage.resolve(f"{DEAD_BUCKET}/src", dead_endpoint, retry_s=1)
    dest = storage.resolve(str(tmp_path / "data"))
    pair = Pair("a", "raysegment-dead/src/images/a.png", "raysegment-dead/src/masks/a.png", split="train")
    task = _build_shard.remote(source, dest, "train-00000.parquet", "train", [pair], None, "", True)
    with pytest.raises(StorageError, match=GAVE_UP):
        ray.get(task, timeout=120)


def test_prepare_command_has_the_deadline_flag():
    res = CliRunner().invoke(main, ["prepare", "--help"])
    assert res.exit_code == 0 and "--storage-retry-s" in res.output


# -- 2. long keys: a safe stored name, the key kept in the row ---------------------------------------------


def test_mask_names_stay_within_what_filesystems_and_s3_allow():
    assert layout.png_mask_name("a/b c") == "a/b c.png"
    assert layout.png_mask_name("b" * 251) == "b" * 251 + ".png"  # 255 bytes: the longest legal name
    for key in ("b" * 252, "é" * 126, "/".join(["d" * 200] * 3)):  # a part over 255 bytes; the whole over 512
        name = layout.png_mask_name(key)
        assert name.startswith(f"{layout.LONG_NAMES}/") and len(name) == len(layout.LONG_NAMES) + 1 + 64 + 4
        assert name == layout.png_mask_name(key)  # a function of the key: a re-run finds the same file
    assert layout.png_mask_name("x" * 300) != layout.png_mask_name("x" * 301)


@pytest.mark.slow
def test_keys_too_long_for_a_file_name_are_stored_under_a_safe_name(tiny_model, tmp_path):
    """Parquet keys of any length: the job exits 0, every row is ok and points at a mask that exists;
    the re-run is a no-op. (A key of 300 characters used to fail the whole job, every time.)"""
    _, model = tiny_model
    keys = ["plain", "b" * 251, "k" * 300, "/".join(["é" * 120] * 3)]
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"id": keys, "image": [png(i) for i in range(len(keys))]}), tmp_path / "in" / "t.parquet")
    spec = InferSpec(model=model, input=str(tmp_path / "in"), output=str(tmp_path / "out"), key_column="id")
    first = infer(spec)
    assert first["status"] == "succeeded" and first["counts"]["ok"] == len(keys), first
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "summaries").to_pylist()}
    assert sorted(rows) == sorted(keys)
    for key, row in rows.items():
        assert row["status"] == "ok" and os.path.isfile(row["mask_uri"]), row
        assert (f"/masks/{layout.LONG_NAMES}/" in row["mask_uri"]) == (key in keys[2:])
        mask, _ = layout.read_mask(storage.resolve(str(tmp_path / "out")), row)
        assert mask.shape == (32, 32)
    again = infer(spec)
    assert again["counts"] == {"total": 4, "skipped": 4, "processed": 0, "ok": 0, "error": 0}
    assert (tmp_path / "out" / "_SUCCESS").exists()


# -- 3. the card's model_sha256 is checked against model.keras --------------------------------------------


@pytest.mark.slow
def test_a_model_file_that_is_not_the_cards_is_refused(tiny_model, tmp_path):
    _, model = tiny_model
    swapped = tmp_path / "model"
    swapped.mkdir()
    shutil.copy(Path(model) / CARD_FILE, swapped / CARD_FILE)
    (swapped / MODEL_FILE).write_bytes((Path(model) / MODEL_FILE).read_bytes() + b"another model")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png(0))
    res = CliRunner().invoke(main, ["infer", str(swapped), str(tmp_path / "in"), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert f"{swapped / MODEL_FILE}: sha256 " in res.output
    assert "does not match model.json's model_sha256" in res.output and "copy model.keras and model.json" in res.output
    assert not (tmp_path / "out" / "summaries").exists()  # refused before any row


# -- 5. error rows hold NULL, not zeros -------------------------------------------------------------------


def test_error_rows_hold_null_class_fractions_and_confidence(tmp_path):
    """An average over the summaries that forgets `status` must not count a failed image as background."""
    out = storage.resolve(str(tmp_path / "out"))
    write_run(out, ["good", "bad"], ["/in/good.png", "/in/bad.png"], errors=["", "cannot decode image"])
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "summaries").to_pylist()}
    assert rows["bad"]["class_fractions"] is None and rows["bad"]["mean_confidence"] is None
    assert rows["good"]["class_fractions"] == [1.0, 0.0] and rows["good"]["mean_confidence"] == pytest.approx(0.9)
    result = report.write_run_report(out.uri)  # the report's statistics are over the ok rows
    assert (result["ok"], result["error"]) == (1, 1)
    assert re.search(r"background</td><td class=\"n\">100\.00%", (tmp_path / "out" / "report.html").read_text())


# -- 4. the report before the run record ---------------------------------------------------------------------


def _reader_waiting(fifo: Path) -> int | None:
    """A write end of the pipe once someone has it open for reading, else None."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise


def _has_row(out: Path, key: str) -> bool:
    return has_summary(out) and any(r["key"] == key for r in summaries(out))


@pytest.mark.slow
def test_report_is_built_before_the_run_record(tiny_model, tmp_path):
    """Once `a` is committed, its source becomes a named pipe: the report's read of it waits there,
    so the test sees what a kill during the report step leaves: no run record, no _SUCCESS.
    (A 250-character file name rides along: an ok row with its mask, 254 bytes, kept as is.)"""
    _, model = tiny_model
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    long_name = "f" * 250
    (src / "a.png").write_bytes(png(0))
    (src / f"{long_name}.png").write_bytes(png(1))
    # In a sub-folder, so its own read task holds the job while the files above are committed.
    with PipeBarrier(src / "zz-barrier" / "hold.png") as barrier:
        job = in_background(
            lambda: infer(
                InferSpec(model=model, input=str(src), output=str(out), batch_size=1, summary_rows=1, actors=1)
            )
        )
        wait_for(lambda: _has_row(out, "a"), "the summary row of a", job=job)
        (src / "a.png").unlink()
        os.mkfifo(src / "a.png")  # read again only by the report, which samples every ok row
        barrier.release(job)
        reader = wait_for(lambda: _reader_waiting(src / "a.png"), "the report to read a's source", job=job)
        try:
            assert not list((out / "runs").glob("*.json")) and not (out / "_SUCCESS").exists()
        finally:
            os.close(reader)  # the report reads nothing and goes on: "source not readable"
        record = job.result(timeout=300)
    assert (out / "runs" / f"{record['run_id']}.json").exists() and (out / "_SUCCESS").exists()
    assert "source not readable" in (out / "report.html").read_text()

    rows = {r["key"]: r["status"] for r in summaries(out)}
    assert rows == {"a": "ok", long_name: "ok", "zz-barrier/hold": "error"}
    assert (out / "masks" / f"{long_name}.png").is_file()
