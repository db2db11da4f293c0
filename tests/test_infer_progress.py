"""The infer stage's progress counts what the run did and kept: rows as their block reaches the writer (a
block's rows were shown only once the next block came, so every line was one block behind, and a night
stopped after 256 committed rows said `0/800`), and the inputs resume found done (a resumed night that
finished all 800 ended at `544/800 (68%)`, a fully done one at `0/800 (0%)`)."""

import io
import re
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from helpers import png, untrained_card, write_outputs

from raysegment import progress, storage
from raysegment.config import InferSpec
from raysegment.inference import output as layout
from raysegment.inference import resume
from raysegment.inference.pipeline import CountedWriter, InferProgress, infer
from raysegment.models.card import ModelCard

LINE = r"\d\d:\d\d:\d\d infer  "
RUN_ID = "20260101T000000Z-0000abcd"


@pytest.fixture
def lines():
    """The progress lines of the test, off a terminal (interval 0: each change writes one)."""
    out = io.StringIO()
    progress.configure(progress.LINES, interval_s=0.0, stream=out)
    try:
        yield lambda: out.getvalue().splitlines()
    finally:
        progress.configure(progress.OFF)


def test_inputs_found_done_count_toward_the_total_not_toward_the_rate(lines):
    with progress.stage("infer", total=10) as shown:
        shown.skip(4)
        shown.skip(4)  # a running total: the same count again adds nothing
        assert lines()[-1].endswith("infer  4/10 images (40%)  0.0 images/s  already done 4")  # no ETA of 0 rows/s
        shown.update(6, errors=0)
        before = time.time() - shown.started
        assert shown.done == 10 and shown.rate() <= 6 / before  # of the 6 done here
    with progress.stage("infer", total=3) as shown:
        shown.skip(3)
    assert re.fullmatch(rf"{LINE}10/10 images \(100%\)  [\d.]+ images/s  in 0s  already done 4  errors 0", lines()[-2])
    assert re.fullmatch(rf"{LINE}3/3 images \(100%\)  0\.0 images/s  in 0s  already done 3", lines()[-1])


def test_a_stop_reads_the_stage_counts_under_its_lock(lines):
    """`stopped` read `done` and `skipped` outside the stage's lock, while the heartbeat's `skip` may have moved
    one and not yet the other: its last line could be off by a tally step. Every read of `done` is checked."""

    class Watched(progress.Stage):
        unlocked = 0

        @property
        def done(self) -> int:
            self.unlocked += not self._lock._is_owned()
            return self._done

        @done.setter
        def done(self, value: int) -> None:
            self._done = value

    shown = Watched("infer", total=10)
    shown.skip(3)
    shown.update(2)
    InferProgress(shown, layout.RunCounts(), None, None).stopped(4)  # 4 rows kept, and the 3 found done
    assert shown.unlocked == 0 and shown.done == 7


def summary_rows(out, keys, errors):
    """Summary rows of `keys` and their masks, as the pipeline's write tasks make them (no model)."""
    n = len(keys)
    batch = {
        "key": np.asarray(keys, object),
        "source_uri": np.asarray([f"/in/{k}.png" for k in keys], object),
        "height": np.full(n, 8),
        "width": np.full(n, 8),
        "pred": np.zeros((n, 8, 8), np.uint8),
        "error": np.asarray(errors, object),
        "mean_confidence": np.full(n, 0.9, np.float32),
        "decode_ms": np.ones(n, np.float32),
        "predict_ms": np.ones(n, np.float32),
    }
    return layout.write_masks(batch, out, untrained_card(), RUN_ID, "png")


def test_a_block_counts_when_it_reaches_the_writer_and_a_stop_keeps_what_was_committed(ray_cluster, tmp_path, lines):
    """Driven as `drain` drives it, with the run's real committer, skip tally and summary writer: a block's
    rows show at once, its errors and the inputs found done at the next heartbeat (`beat`, called here as the
    heartbeat thread calls it) once their actors answered, and the last line of a stopped stage counts the
    rows in summary files and the inputs found done, not the rows still waiting in the writer."""
    out = storage.resolve(str(tmp_path / "out"))
    committer, skips = layout.start_committer(), resume.start_tally()
    counts = layout.RunCounts()
    try:
        block = ray.put(summary_rows(out, ["a", "b", "c", "d"], ["", "unreadable", "", ""]))
        writer = CountedWriter(out, RUN_ID, 3, committer)  # a summary file every 3 rows

        def hand(start, stop):
            seen.add(block, start, stop)
            writer.add(layout.PendingRows(block, start, stop, 100))

        progress.expect_total("infer", 10)  # as nightly announces it: tonight's inputs, done ones included
        with pytest.raises(KeyboardInterrupt), progress.stage("infer") as shown:
            seen = InferProgress(shown, counts, committer, skips)
            shown.poll = seen.poll
            try:
                resume.count_skipped(skips, resume.batch_id(b"keys", b"three"), 3)  # a filter task's count
                hand(0, 2)
                assert re.fullmatch(rf"{LINE}2/10 images \(20%\)  [\d.]+ images/s  ETA \d+s", lines()[0])
                ray.get(list(seen.counting))  # the committer counted the block, the tally its total
                if seen.asked is not None:
                    ray.wait([seen.asked])
                shown.beat()
                assert re.search(r"  5/10 images \(50%\)  .*  already done 3  errors 1$", lines()[-1])
                hand(2, 4)  # a file of a, b, c; d waits in the writer
                assert re.search(r"  7/10 images \(70%\)  ", lines()[-1]) and writer.committed == 3
                raise KeyboardInterrupt
            except BaseException:
                seen.stopped(writer.committed)
                raise
        ray.get(seen.counting)  # the committer's last count, before it is killed
        assert pq.read_table(tmp_path / "out" / "summaries").num_rows == 3
        assert re.fullmatch(
            rf"{LINE}6/10 images \(60%\)  [\d.]+ images/s  stopped after \d+s  already done 3  errors 1", lines()[-1]
        )

        counts = layout.RunCounts()
        progress.expect_total("infer", 10)
        with progress.stage("infer") as shown:  # a run that finishes: counted to the end, before its last line
            seen = InferProgress(shown, counts, committer, skips)
            seen.add(block, 0, 4)
            seen.add(ray.put(summary_rows(out, ["e", "f", "g"], [""] * 3)), 0, 3)
            seen.finish()
        assert counts == layout.RunCounts(skipped=3, processed=7, ok=6, error=1)
        assert re.fullmatch(
            rf"{LINE}10/10 images \(100%\)  [\d.]+ images/s  in \d+s  already done 3  errors 1", lines()[-1]
        )
    finally:
        ray.kill(committer)
        ray.kill(skips)


def test_a_resumed_run_ends_at_its_total_with_the_inputs_already_done(tiny_model, tmp_path, lines):
    """The whole path: `infer` into an OUTPUT holding 3 of its 5 inputs (written by the pipeline's own last
    stage, as if by an earlier run of the model), its total announced as nightly announces it."""
    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for i in range(5):
        (inp / f"{i}.png").write_bytes(png(i))
    done = 3
    batch = {
        "key": np.asarray([str(i) for i in range(done)], object),
        "source_uri": np.asarray([str(inp / f"{i}.png") for i in range(done)], object),
        "height": np.full(done, 32),
        "width": np.full(done, 32),
        "pred": np.zeros((done, 32, 32), np.uint8),
        "error": np.asarray([""] * done, object),
        "mean_confidence": np.full(done, 0.9, np.float32),
        "decode_ms": np.ones(done, np.float32),
        "predict_ms": np.ones(done, np.float32),
    }
    write_outputs(batch, storage.resolve(str(out)), ModelCard.read(model), RUN_ID, "png")
    progress.expect_total("infer", 5)
    record = infer(InferSpec(model=model, input=str(inp), output=str(out), report=False))
    assert record["counts"] == {"total": 5, "skipped": 3, "processed": 2, "ok": 2, "error": 0}
    (last,) = [line for line in lines() if " in " in line]
    assert re.fullmatch(rf"{LINE}5/5 images \(100%\)  [\d.]+ images/s  in \d+s  already done 3  errors 0", last)
