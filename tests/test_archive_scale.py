"""Costs that do not grow on the driver: summary files of many batches, the resume index built by
tasks, compaction beside readers, and `--actors auto`."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from helpers import (
    PipeBarrier,
    assert_one_row_and_mask_per_key,
    has_summary,
    kill_driver_when,
    png,
    wait_for,
    wait_predictors_gone,
    write_images,
)

from raysegment import storage
from raysegment.config import CompactSpec, InferSpec
from raysegment.inference import actors, archives, resume
from raysegment.inference import output as layout
from raysegment.inference.compact import compact
from raysegment.inference.pipeline import infer

SHA = "a" * 64
RAYSEGMENT = str(Path(sys.executable).parent / "raysegment")
pytestmark = pytest.mark.slow


def rows_of(keys: list[str], run_id: str = "r1") -> pa.Table:
    """Summary rows for `keys` as infer writes them (ok rows, no masks needed for these tests)."""
    n = len(keys)
    return pa.table(
        {
            "key": keys,
            "source_uri": [f"/in/{k}.png" for k in keys],
            "mask_uri": [f"/out/masks/{k}.png" for k in keys],
            "mask_offset": [-1] * n,
            "mask_length": [-1] * n,
            "height": np.full(n, 8, np.int32),
            "width": np.full(n, 8, np.int32),
            "status": ["ok"] * n,
            "error": [""] * n,
            "class_fractions": [[1.0, 0.0]] * n,
            "mean_confidence": pa.array([0.9] * n, pa.float32()),
            "model_id": ["m"] * n,
            "model_sha256": [SHA] * n,
            "run_id": [run_id] * n,
            "decode_ms": np.zeros(n, np.float32),
            "predict_ms": np.zeros(n, np.float32),
            "write_ms": np.zeros(n, np.float32),
            "peak_rss_mb": np.zeros(n, np.float32),
        },
        schema=layout.summary_schema(["background", "thing"]),
    )


def committed_keys(out: storage.Location) -> list[str]:
    return sorted(k for t in layout.summary_tables(out, ["key"]) for k in t.column("key").to_pylist())


def write_runs(out: storage.Location, runs: dict[str, list[list[str]]], records: bool = True) -> None:
    """One summary file per batch of keys, per run, as outputs of earlier versions hold them."""
    for run_id, batches in runs.items():
        for keys in batches:
            layout.commit_rows(out, run_id, rows_of(keys, run_id))
        if records:
            layout.write_run_record(out, layout.RunRecord(run_id=run_id))


def test_summary_writer_commits_many_batches_per_file(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    writer = layout.SummaryWriter(out, "r1", max_rows=10)
    keys = [f"k{i:03d}" for i in range(52)]
    for i in range(0, 52, 3):
        writer.add(rows_of(keys[i : i + 3]))
        assert writer.rows < 10  # rows wait for at most one file's worth
    assert len(writer.files) == 5 and committed_keys(out) == keys[:50]  # batches crossing a file's mark split
    writer.close()
    assert [pq.read_metadata(f).num_rows for f in writer.files] == [10, 10, 10, 10, 10, 2]
    assert committed_keys(out) == keys


def test_rows_left_in_the_object_store_are_committed_by_the_committer_slices_and_all(ray_cluster, tmp_path):
    """What infer's driver does: it holds references to the write tasks' blocks (and which of their rows
    are its), and the run's committer actor counts and writes them, so the driver never maps a block."""
    out = storage.resolve(str(tmp_path / "out"))
    keys = [f"k{i:03d}" for i in range(40)]
    blocks = [ray.put(rows_of(keys[i : i + 10])) for i in range(0, 40, 10)]
    committer = layout.start_committer()
    assert ray.get(committer.status_counts.remote(blocks[1], 2, 8)) == (6, 6)
    writer = layout.SummaryWriter(out, "r1", max_rows=15, committer=committer)
    writer.add(layout.PendingRows(blocks[0], 0, 10, 1))
    writer.add(layout.PendingRows(blocks[1], 2, 8, 1))  # a slice: rows 12..17, of which 12..16 fill the file
    assert len(writer.files) == 1 and committed_keys(out) == [*keys[:10], *keys[12:17]]
    writer.add(layout.PendingRows(blocks[2], 0, 10, 1))
    writer.add(layout.PendingRows(blocks[3], 9, 10, 1))
    writer.close()
    assert [pq.read_metadata(f).num_rows for f in writer.files] == [15, 12]
    assert committed_keys(out) == sorted([*keys[:10], *keys[12:18], *keys[20:30], keys[39]])


def test_resume_index_is_built_by_tasks_and_filters_exactly(ray_cluster, tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    done = [f"img/{i:05d}" for i in range(3000)]
    nfc = unicodedata.normalize("NFC", "caf\u00e9")
    nfd = unicodedata.normalize("NFD", nfc)
    write_runs(out, {"r1": [done[i : i + 100] for i in range(0, 3000, 100)], "r2": [[nfc], [nfd]]})
    index = resume.build(out, keys_per_bucket=500)  # several buckets, as at millions of keys
    assert len(index.buckets) == 7
    assert (index.rows, index.keys, index.folded, index.files) == (3002, 3002, 3001, 32)
    assert index.models == {SHA}

    listed = np.asarray([*done[::7], "img/new-1", "img/new-2", nfc, "img/99999"], object)
    batch = {"key": listed, "collides": np.zeros(len(listed), bool)}
    kept = resume.drop_done(batch, [index.buckets])
    assert sorted(kept["key"]) == ["img/99999", "img/new-1", "img/new-2"]
    batch["collides"][0] = True  # a colliding key is reported on every run, done or not
    assert done[0] in resume.drop_done(batch, [index.buckets])["key"]
    assert not resume.build(storage.resolve(str(tmp_path / "empty")))


def test_the_end_of_run_check_reads_the_runs_own_files_and_still_finds_collisions(ray_cluster, tmp_path):
    """A resumed run that added 5 rows to 1M built the whole index again for its check (20 s). It reads its own
    files now, merged into the index it started from; a key of its own that collides with an earlier run's
    (Unicode forms) is still found, and a compaction meanwhile means a full build."""
    out = storage.resolve(str(tmp_path / "out"))
    nfc = unicodedata.normalize("NFC", "caf\u00e9")
    nfd = unicodedata.normalize("NFD", nfc)
    write_runs(out, {"r1": [[f"img/{i:04d}" for i in range(j, j + 100)] for j in range(0, 1000, 100)], "r2": [[nfc]]})
    index = resume.build(out, keys_per_bucket=300)  # several buckets
    assert len(index.buckets) == 4 and len(index.paths) == 11
    write_runs(out, {"r3": [["img/new-1", "img/new-2"], [nfd, "img/new-3"]]})
    earlier = Path(index.paths[0])
    kept = earlier.read_bytes()
    earlier.write_bytes(b"damaged, and never read again")  # the run's check does not read the earlier runs' files
    after = resume.after_run(out, index, "r3")
    assert (after.rows, after.keys, after.folded, after.ok, after.files) == (1005, 1005, 1004, 1005, 13)
    earlier.write_bytes(kept)
    assert after == dataclasses.replace(resume.build(out), buckets=[], folded_buckets=[])
    write_runs(out, {"compacted": [["img/0000"]]})  # a file the run did not write: everything is read again
    again = resume.after_run(out, index, "r3")
    assert (again.rows, again.keys, again.folded) == (1006, 1005, 1004) and again.buckets  # built again
    # A run that adds more rows than the start index held: built again, its buckets sized for all the keys.
    small = storage.resolve(str(tmp_path / "small"))
    write_runs(small, {"s1": [["a"]]})
    start = resume.build(small)
    write_runs(small, {"s2": [[f"b{i}" for i in range(5)]]})
    grown = resume.after_run(small, start, "s2")
    assert (grown.rows, grown.keys) == (6, 6) and grown.buckets


def test_a_multi_batch_summary_file_killed_while_assembled_is_redone_once(tiny_model, ray_cluster, tmp_path):
    """The driver is killed with rows waiting for their summary file (their masks written): the re-run
    redoes exactly those, and every key ends with one row and one mask."""
    _, model = tiny_model
    keys = write_images(tmp_path / "in", 30)
    out = tmp_path / "out"
    cmd = [RAYSEGMENT, "infer", model, str(tmp_path / "in"), str(out), "--batch-size", "2"]
    cmd += ["--summary-rows", "16", "--no-report"]

    def assembling() -> bool:
        """The first file committed (16 rows), and masks of more rows than it holds. Stable, so no race
        with the driver: the pipe also holds the other rows of its listing block (a few), so fewer than
        the 32 rows of a second file arrive, and no other file is written until the job ends."""
        if not has_summary(out):
            return False
        committed = len(committed_keys(storage.resolve(str(out))))
        masks = sum(len(files) for _, _, files in os.walk(out / "masks"))
        return committed == 16 < masks

    with PipeBarrier(tmp_path / "in" / "zz-barrier" / "hold.png") as barrier:
        driver = subprocess.Popen(cmd, env=ray_cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_driver_when(driver, assembling, "rows waiting for their summary file")
        committed = len(committed_keys(storage.resolve(str(out))))
        masks = sum(len(files) for _, _, files in os.walk(out / "masks"))
        assert committed < masks  # rows whose masks exist were lost with the driver
        barrier.replace_with(png(999))
    wait_predictors_gone(ray_cluster.address)
    rerun = subprocess.run([*cmd, "--json"], env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    counts = json.loads(rerun.stdout)["counts"]
    assert counts["skipped"] == committed and counts["processed"] == 31 - committed
    assert_one_row_and_mask_per_key(out, [*keys, "zz-barrier/hold"])


def test_the_two_rewriters_of_summary_files_take_one_lock(tmp_path):
    """`compact` and `infer --retry-errors` both replace summary files; replacing one file twice showed its
    rows twice (and the run then failed as a key collision). Each holds the rewrite lock; the other waits."""
    from raysegment.config import CompactSpec
    from raysegment.inference.compact import compact, drop_error_rows, rewrite_lock
    from raysegment.lock import LockedError

    out = storage.resolve(str(tmp_path / "out"))
    (tmp_path / "out" / "summaries").mkdir(parents=True)
    with rewrite_lock(out):
        with pytest.raises(LockedError, match="another summary rewrite holds the lock"):
            drop_error_rows(out)
        with pytest.raises(LockedError, match="another summary rewrite holds the lock"):
            compact(CompactSpec(output=out.uri))
    assert os.listdir(tmp_path / "out" / "summaries") == []  # released: no lock file left behind


def test_compaction_merges_finished_runs_and_keeps_every_row_once(ray_cluster, tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    keys = [f"k{i:04d}" for i in range(400)]
    write_runs(out, {"r1": [keys[i : i + 16] for i in range(0, 320, 16)]})
    write_runs(out, {"r2-running": [keys[i : i + 16] for i in range(320, 400, 16)]}, records=False)
    before = committed_keys(out)
    r = compact(CompactSpec(output=out.uri, summary_rows=100))
    assert (r["files_before"], r["merged_files"], r["unfinished_runs_left"]) == (25, 20, ["r2-running"])
    assert r["written_files"] == 4 and r["files_after"] == 9  # 320 rows in files of <= 100, 5 left alone
    assert committed_keys(out) == before == keys
    compacted = [p for p in layout.summary_files(out) if f"/{layout.COMPACTED}/" in p]
    assert all(pq.read_metadata(p).num_rows <= 100 for p in compacted)
    assert layout.Summaries(out).class_names == ["background", "thing"]  # the footer keeps the metadata

    again = compact(CompactSpec(output=out.uri, summary_rows=1000, include_unfinished=True))
    assert again["files_after"] == 1 and committed_keys(out) == keys


def test_a_killed_run_that_a_later_run_checked_is_compacted_as_finished(ray_cluster, tmp_path):
    """A killed run never gets a run record, so every compaction left its files and advised "re-run infer",
    which could not help: the run that resumed it wrote _SUCCESS after checking every row of OUTPUT. With
    _SUCCESS there and no run holding OUTPUT's run lock, its files are merged as a finished run's."""
    from click.testing import CliRunner

    from raysegment.cli import main
    from raysegment.inference.pipeline import RUN_LOCK_STALE_S
    from raysegment.lock import RunLock

    out = storage.resolve(str(tmp_path / "out"))
    keys = [f"k{i:03d}" for i in range(64)]
    write_runs(out, {"r1-killed": [keys[i : i + 8] for i in range(0, 32, 8)]}, records=False)
    write_runs(out, {"r2": [keys[i : i + 8] for i in range(32, 64, 8)]})

    # No _SUCCESS (the resumed run failed, or none ran yet): the killed run's files stay, and the note says
    # what merges them.
    r = compact(CompactSpec(output=out.uri, summary_rows=1000))
    assert (r["unfinished_runs_left"], r["killed_runs_checked"], r["merged_files"]) == (["r1-killed"], [], 4)

    # _SUCCESS, but an infer holds the run lock (it removes _SUCCESS next): nothing is taken as checked.
    layout.mark_complete(out, "r2")
    with RunLock(out.child(layout.RUN_LOCK), RUN_LOCK_STALE_S, purpose="infer run into this OUTPUT"):
        r = compact(CompactSpec(output=out.uri, summary_rows=1000))
        assert (r["unfinished_runs_left"], r["killed_runs_checked"]) == (["r1-killed"], [])
        assert (tmp_path / "out" / layout.RUN_LOCK).exists()  # still the running infer's

    result = CliRunner().invoke(main, ["compact", out.uri, "--summary-rows", "1000", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert (r["unfinished_runs_left"], r["killed_runs_checked"], r["merged_files"]) == ([], ["r1-killed"], 5)
    assert "compacted the files of 1 killed runs (no run record) as finished" in result.stderr
    assert "re-run infer" not in result.stderr
    assert len(layout.summary_files(out)) == 1 and committed_keys(out) == keys
    assert not (tmp_path / "out" / layout.RUN_LOCK).exists()  # held for the look only


def test_a_compaction_killed_before_its_deletes_is_read_once_and_finished_next_time(ray_cluster, tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    keys = [f"k{i:03d}" for i in range(64)]
    write_runs(out, {"r1": [keys[i : i + 8] for i in range(0, 64, 8)]})
    originals = storage.parquet_files(out.child(layout.SUMMARIES))
    # What a compaction leaves when killed between its writes and its deletes: both.
    merged = pa.concat_tables([pq.read_table(p) for p in originals])
    meta = dict(merged.schema.metadata or {})
    meta[layout.REPLACES_META] = str([layout.relative_path(out, p) for p in originals]).replace("'", '"').encode()
    target = out.child(layout.SUMMARIES, layout.COMPACTED, "part-killed.parquet")
    os.makedirs(os.path.dirname(target.path))
    pq.write_table(merged.replace_schema_metadata(meta), target.path)
    assert layout.summary_files(out) == [target.path]
    assert committed_keys(out) == keys
    compact(CompactSpec(output=out.uri))
    assert storage.parquet_files(out.child(layout.SUMMARIES)) == [target.path]  # the leftovers are gone
    assert committed_keys(out) == keys


def test_a_reader_during_compaction_sees_every_row_exactly_once(ray_cluster, tmp_path):
    """A pass that listed the files before a compaction and finds one gone starts again; passes
    running beside compactions never see a row twice or miss one."""
    out = storage.resolve(str(tmp_path / "out"))
    keys = [f"k{i:04d}" for i in range(256)]
    write_runs(out, {f"r{j}": [keys[i : i + 8] for i in range(j * 64, j * 64 + 64, 8)] for j in range(4)})

    # Deterministic: a pass that has read one file when the compaction runs.
    attempts = []

    def one_pass() -> list[str]:
        attempts.append(1)
        seen = []
        for i, table in enumerate(layout.summary_tables(out, ["key"])):
            seen += table.column("key").to_pylist()
            if i == 0 and len(attempts) == 1:
                compact(CompactSpec(output=out.uri, summary_rows=64))
        return sorted(seen)

    assert layout.consistent(one_pass) == keys and len(attempts) == 2

    # Free-running: readers in a loop while compactions merge ever larger files.
    write_runs(out, {"r9": [[f"z{i:03d}" for i in range(j, j + 4)] for j in range(0, 64, 4)]})
    expected = sorted([*keys, *(f"z{i:03d}" for i in range(64))])
    stop, reads, wrong = threading.Event(), [], []

    def reader() -> None:
        while not stop.is_set():
            got = layout.consistent(
                lambda: sorted(k for t in layout.summary_tables(out, ["key"]) for k in t.column("key").to_pylist())
            )
            reads.append(1)
            if got != expected:
                wrong.append(len(got))

    def another_read(what: str) -> None:
        n = len(reads)
        wait_for(lambda: len(reads) > n, what)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for rows in (32, 128, 512):
            another_read("a read between compactions")
            compact(CompactSpec(output=out.uri, summary_rows=rows, include_unfinished=True))
        another_read("a read after the last compaction")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not wrong, f"{len(wrong)} of {len(reads)} reads saw a wrong set of rows: {wrong[:5]}"
    assert len(layout.summary_files(out)) == 1


def test_actors_auto_fits_the_cluster():
    spec = InferSpec(model="m", input="i", output="o")
    assert spec.actors == "auto" and spec.gpus_per_actor == "auto"
    # CPU only: one single-threaded actor per core, less an eighth (at least two) for the tasks.
    assert actors.resolve(spec, {"CPU": 4.0}).as_dict() == {
        "actors": [1, 2],
        "gpus_per_actor": 0.0,
        "cpus_per_actor": 1.0,
    }
    assert actors.resolve(spec, {"CPU": 64.0}) == actors.Actors(28, 56, 0.0, 1.0)
    assert actors.resolve(spec, {"CPU": 1.0}).max == 1
    # GPUs: one actor per GPU, whatever the CPUs.
    assert actors.resolve(spec, {"CPU": 64.0, "GPU": 8.0}) == actors.Actors(4, 8, 1.0, 1.0)
    half = InferSpec(model="m", input="i", output="o", gpus_per_actor=0.5)
    assert actors.resolve(half, {"CPU": 8.0, "GPU": 2.0}).max == 4
    # Explicit values are kept.
    fixed = InferSpec(model="m", input="i", output="o", actors="3:5", gpus_per_actor=0)
    assert actors.resolve(fixed, {"CPU": 64.0, "GPU": 8.0}) == actors.Actors(3, 5, 0.0, 1.0)


def test_infer_records_the_resolved_pool_and_one_file_per_run(tiny_model, ray_cluster, tmp_path):
    _, model = tiny_model
    write_images(tmp_path / "in", 40)
    record = infer(InferSpec(model=model, input=str(tmp_path / "in"), output=str(tmp_path / "out"), batch_size=4))
    assert (
        record["actors"]
        == actors.resolve(InferSpec(model="m", input="i", output="o"), ray.cluster_resources()).as_dict()
    )
    assert len(layout.summary_files(storage.resolve(str(tmp_path / "out")))) == 1  # 40 rows, 10 batches


def test_inference_decodes_exif_rotated_photos_upright():
    """A phone photo stored sideways with an EXIF orientation is decoded upright (as prepare stores
    training images), so its mask is the upright image's size."""
    import io

    from PIL import Image

    from raysegment.data import imaging

    upright = np.zeros((20, 40, 3), np.uint8)
    upright[:, :20] = 255  # left half white when upright
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as a camera stores it
    exif = Image.Exif()
    exif[imaging.EXIF_ORIENTATION] = 6  # "rotate 90 clockwise to view"
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)
    decoded = imaging.decode_image(buf.getvalue())
    assert decoded.shape == (20, 40, 3)
    assert decoded[:, :20].mean() > 250 and decoded[:, 20:].mean() < 5


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_resumed_run_does_not_open_archives_whose_members_are_all_done(tiny_model, ray_cluster, tmp_path):
    """The first run records each archive's members; a re-run skips unchanged, finished archives
    unread (one is overwritten with garbage of the same size and mtime: reading it would be an
    error row), and reads a changed one again, for its new member only."""
    _, model = tiny_model
    inputs = tmp_path / "in"
    inputs.mkdir()
    for a in range(3):
        write_tar(inputs / f"a{a}.tar", {f"img{i}.png": png(10 * a + i) for i in range(4)})
    out = storage.resolve(str(tmp_path / "out"))
    spec = InferSpec(model=model, input=str(inputs), output=out.uri, batch_size=4, report=False)
    first = infer(spec)
    assert first["counts"]["processed"] == 12
    assert archives.recorded(out) == 3

    garbage = inputs / "a0.tar"
    stat = garbage.stat()
    garbage.write_bytes(b"\0" * stat.st_size)  # same size and mtime: the same version to the listing
    os.utime(garbage, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    write_tar(inputs / "a1.tar", {f"img{i}.png": png(10 + i) for i in range(5)})  # one member more
    second = infer(spec)
    assert (second["counts"]["processed"], second["counts"]["error"]) == (1, 0)
    # Members skipped unread (a0, a2) and read but done (a1's first four) count alike.
    assert (second["counts"]["skipped"], second["counts"]["total"]) == (12, 13)
    assert sorted(committed_keys(out))[-1] == "a2/img3" and "a1/img4" in committed_keys(out)
    assert archives.recorded(out) == 3
    third = infer(spec)  # a1's new list: nothing opened, nothing to do
    assert third["counts"]["processed"] == 0 and third["status"] == "succeeded"
    assert (third["counts"]["skipped"], third["counts"]["total"]) == (13, 13)


def test_a_uri_list_is_read_by_many_tasks_not_the_one_that_streams_it(ray_cluster, tmp_path):
    """One task streams the list; the reads go out LIST_ROWS_PER_READ_TASK rows to a task, so a
    cluster's nodes share them. Fused into the streaming task, every read ran in one process."""
    from raysegment.data import synthetic
    from raysegment.inference import sources

    n = 3 * sources.LIST_ROWS_PER_READ_TASK + 1
    img, _ = synthetic.make_example(0, size=8)
    data = synthetic.png_bytes(img)
    (tmp_path / "in").mkdir()
    for i in range(n):
        (tmp_path / "in" / f"im{i:04d}.png").write_bytes(data)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{tmp_path}/in/im{i:04d}.png\n" for i in range(n)))
    _, ds = sources.source_rows(str(listing), "list", [".png"], lambda d: d, batch_size=4)
    done = ds.materialize()
    assert done.count() == n
    tasks = re.search(r"MapBatches\(read_uris\)[^:\n]*: (\d+) tasks executed", done.stats())
    assert tasks is not None, done.stats()
    assert int(tasks.group(1)) == 4
