"""Nightly runs: the ledger diff, the run lock (local and S3), drift, and real runs on local Ray."""

import json
import os
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import hashed_model, run_into_held_lock, untrained_card
from PIL import Image

from raysegment import ledger as night_ledger
from raysegment import nightly, storage
from raysegment.config import InferSpec, NightlySpec, load_spec
from raysegment.data import synthetic
from raysegment.errors import ConfigError, DataError, JobError
from raysegment.inference import pipeline
from raysegment.lock import LockedError, RunLock, create_exclusive
from raysegment.models.card import MODEL_FILE


def listing(rows):
    return pa.table(
        {
            "key": [r[0] for r in rows],
            "uri": [f"/in/{r[0]}.png" for r in rows],
            "size": [r[1] for r in rows],
            "version": [r[2] for r in rows],
        },
        schema=nightly.LISTING_SCHEMA,
    )


def arrow_plan(listing: pa.Table, ledger_rows: pa.Table, model: str, date: str) -> pa.Table:
    """The comparison as the driver made it in one Arrow table before it moved to tasks: the oracle."""

    def fp(size, version, models):
        return pc.binary_join_element_wise(pc.cast(size, pa.string()), version, models, "|")

    listed = listing.append_column("fp", fp(listing["size"], listing["version"], pa.array([model] * listing.num_rows)))
    led = ledger_rows.sort_by([("recorded_at", "ascending")])
    led = led.append_column("fp", fp(led["size"], led["version"], led["model_sha256"]))
    latest = led.group_by("key", use_threads=False).aggregate([("fp", "last"), ("date", "last")])
    joined = listed.join(latest, "key", join_type="left outer").sort_by([("key", "ascending"), ("uri", "ascending")])
    new = pc.is_null(joined["fp_last"])
    same = pc.fill_null(pc.equal(joined["fp"], joined["fp_last"]), False)
    today = pc.fill_null(pc.equal(joined["date_last"], date), False)
    change = pc.if_else(new, "new", pc.if_else(same, "unchanged", pc.if_else(today, "deferred", "changed")))
    return joined.select(listing.column_names).append_column("change", change)


def ledger(rows, model="m1"):
    t = listing([r[:3] for r in rows])
    n = t.num_rows
    extra = {
        "model_sha256": [model] * n,
        "status": ["ok"] * n,
        "date": [r[3] for r in rows],
        "run_id": ["r"] * n,
        "recorded_at": [r[4] for r in rows],
    }
    for name, values in extra.items():
        t = t.append_column(name, pa.array(values, pa.string()))
    return t


def changes(planned):
    return dict(zip(planned["key"].to_pylist(), planned["change"].to_pylist()))


def test_plan_new_changed_unchanged_deferred(ray_cluster):
    seen = ledger(
        [
            ("a", 10, "v1", "2026-01-01", "2026-01-01T01:00:00"),
            ("b", 10, "v1", "2026-01-01", "2026-01-01T01:00:00"),
            ("b", 12, "v2", "2026-01-02", "2026-01-02T01:00:00"),  # the latest row wins
            ("c", 10, "v1", "2026-01-03", "2026-01-03T01:00:00"),
        ]
    )
    now = listing([("a", 10, "v1"), ("b", 12, "v2"), ("c", 11, "v9"), ("d", 5, "v1"), ("e", 10, "v7")])
    assert changes(nightly.plan(now, seen, "m1", "2026-01-04")) == {
        "a": "unchanged",
        "b": "unchanged",
        "c": "changed",
        "d": "new",
        "e": "new",
    }
    # c changed again after being processed into tonight's partition: left for the next night.
    assert changes(nightly.plan(now, seen, "m1", "2026-01-03"))["c"] == "deferred"
    # Another model: everything is redone.
    assert set(changes(nightly.plan(now, seen, "m2", "2026-01-04")).values()) == {"changed", "new"}
    assert set(changes(nightly.plan(now, ledger([]), "m1", "2026-01-04")).values()) == {"new"}


def test_a_ledger_of_many_nights_gives_the_same_plan_by_tasks_and_compacted(ray_cluster, tmp_path):
    """40 nights, each changing some keys: the plan made by tasks over many ledger files in several
    buckets equals the one-table comparison, and so does the plan after compaction (the latest row
    per key, one file per bucket)."""
    import random

    rng = random.Random(0)
    out = storage.resolve(str(tmp_path / "out"))
    versions = {}
    for night in range(40):
        date = f"2026-{1 + night // 28:02d}-{1 + night % 28:02d}"
        keys = rng.sample(range(300), 60)
        rows = []
        for k in keys:
            versions[k] = versions.get(k, 0) + 1
            rows.append((f"k{k:03d}", 10 + versions[k], f"v{versions[k]}", date, f"{date}T01:00:{k % 60:02d}"))
        night_ledger.write_parquet(out.child("ledger", f"part-{date}-{night:04d}.parquet"), ledger(rows))
    full = night_ledger.read(out)
    listed = listing(
        [(f"k{k:03d}", 10 + versions.get(k, 0) + (k % 7 == 0), f"v{versions.get(k, 0)}") for k in range(320)]
    )
    expected = arrow_plan(listed, full, "m1", "2026-02-12")
    assert set(changes(expected).values()) == {"new", "changed", "unchanged", "deferred"}

    def by_tasks(index):
        return night_ledger.classify(listed, [index.lookups], "m1").sort_by([("key", "ascending")])

    index = night_ledger.build(out, "2026-02-12", rows_per_bucket=500)  # 2,400 rows: 5 buckets
    assert (len(index.lookups), index.rows, index.keys, len(index.files)) == (5, 2400, len(versions), 40)
    assert by_tasks(index).equals(expected)
    assert nightly.plan(listed, full, "m1", "2026-02-12").equals(expected)

    assert night_ledger.compact(out, index, "2026-02-12-stamp") == 40
    assert len(storage.parquet_files(out.child("ledger"))) == 5
    assert night_ledger.read(out).num_rows == len(versions) < full.num_rows
    again = night_ledger.build(out, "2026-02-12")
    assert by_tasks(again).equals(expected)
    assert night_ledger.compact(out, again, "2026-02-13-stamp") == 0  # under the limit: left alone


def test_a_date_that_does_not_exist_is_named_as_such():
    """`--date 2026-02-30` was told to write the date as YYYY-MM-DD, which it is; it names the day now."""
    cases = {
        "2026-02-30": "no such day: February 2026 has days 01 to 28",
        "2024-02-30": "no such day: February 2024 has days 01 to 29",
        "2026-04-31": "April 2026 has days 01 to 30",
        "2026-01-00": "January 2026 has days 01 to 31",
        "2026-13-01": "no such day: there is no month 13",
        "0000-01-01": "years start at 0001",
        "2026-1-2": "write the date as YYYY-MM-DD",
        "20260102": "write the date as YYYY-MM-DD",
        "2026-01-02T00:00": "write the date as YYYY-MM-DD",
    }
    for date, said in cases.items():
        with pytest.raises(ConfigError, match="date") as exc:
            load_spec(NightlySpec, None, {"model": "m", "input": "/in", "output": "/out", "date": date})
        assert said in str(exc.value) and "\n" not in str(exc.value).strip(), (date, str(exc.value))
    assert NightlySpec(model="m", input="/in", output="/out", date="2024-02-29").date == "2024-02-29"


def test_drift_flags_a_shift_beyond_the_threshold():
    before = {"date": "2026-01-01", "class_fraction_mean": {"bg": 0.7, "cell": 0.3}}
    assert not nightly.drift({"bg": 0.68, "cell": 0.32}, before, 0.05)["flagged"]
    d = nightly.drift({"bg": 0.5, "cell": 0.5}, before, 0.05)
    assert d["flagged"] and d["max_shift"] == pytest.approx(0.2) and d["compared_with"] == "2026-01-01"
    assert not nightly.drift(None, before, 0.05)["flagged"] and not nightly.drift({"bg": 1.0}, None, 0.05)["flagged"]


def test_drift_skips_earlier_reports_it_cannot_use(tmp_path):
    """A damaged or hand-edited report is skipped with a warning: the night still reports (it crashed
    after writing its ledger rows, and every later night crashed the same way)."""
    reports = tmp_path / "reports"
    reports.mkdir()
    good = {"date": "2026-01-01", "class_fraction_mean": {"bg": 0.7, "cell": 0.3}}
    odd = {
        "2026-01-01.json": json.dumps(good),
        "2026-01-02.json": "[1, 2]",
        "2026-01-03.json": json.dumps({**good, "date": "2026-01-03", "class_fraction_mean": {"bg": "high"}}),
        "2026-01-04.json": json.dumps({"class_fraction_mean": {"bg": 0.1}}),
        "2026-01-05.json": "{not json",
        "2026-01-06.json": json.dumps({**good, "date": "2026-01-06", "class_fraction_mean": None}),
        "2026-01-06-failed-x.json": json.dumps({**good, "date": "2026-01-06"}),
    }
    for name, text in odd.items():
        (reports / name).write_text(text)
    before = nightly.previous_report(storage.resolve(str(reports)), "2026-01-07")
    assert before == good
    assert nightly.drift({"bg": 0.5, "cell": 0.5}, before, 0.05)["compared_with"] == "2026-01-01"
    assert nightly.previous_report(storage.resolve(str(reports)), "2026-01-01") is None


def test_the_nights_infer_run_gets_every_inference_option():
    chosen = {
        "precision": "float32",
        "tile_size": 512,
        "tile_overlap": 32,
        "tta_flip": True,
        "decode": "actor",
        "storage_retry_s": 15.0,
        "extensions": [".png"],
        "actors": (1, 3),
        "mask_format": "npz",
        "report": False,
        "endpoint_url": "http://127.0.0.1:1",
    }
    night = NightlySpec(model="m", input="/in", output="/out", date="2026-01-02", **chosen)
    spec = nightly.night_infer_spec(night, "/out/date=2026-01-02/inputs/x.parquet", "/out/date=2026-01-02")
    assert {name: getattr(spec, name) for name in chosen} == chosen
    assert (spec.model, spec.input, spec.source) == ("m", "/out/date=2026-01-02/inputs/x.parquet", "list")
    # Every option not chosen keeps its default, as in an `infer` spec.
    plain = nightly.night_infer_spec(NightlySpec(model="m", input="/in", output="/out"), "l", "p")
    own = {"input", "output", "source", "fail_if_none_ok", "retry_errors"}
    assert plain.model_dump(exclude=own) == InferSpec(model="m", input="l", output="p").model_dump(exclude=own)
    assert not plain.fail_if_none_ok  # a night of only bad images is reported, not failed and retried nightly


def check_listing(root: storage.Location):
    files = {"top.png": b"1", "A/b.PNG": b"22", "A/deep/c.jpg": b"333", "A/notes.txt": b"x", "B/d.tar.gz": b"4"}
    # Hidden names (macOS resource forks, dot-folders) are never inputs, as prepare skips them.
    hidden = {"._top.png": b"h", ".cache/h.png": b"h", "A/.x.png": b"h"}
    for name, data in {**files, **hidden, "A/two.png": b"5", "A/two.JPG": b"6", "t.jpg": b"7", "t.png": b"8"}.items():
        storage.write_bytes(root.child(name), data)
    import ray

    table = pa.concat_tables(ray.get(nightly.list_inputs(root, (".png", ".jpg")).to_arrow_refs()))
    assert table.select(nightly.LISTED_SCHEMA.names).cast(nightly.LISTED_SCHEMA).num_rows == 7
    rows = sorted(table.to_pylist(), key=lambda r: r["uri"])
    good = [r for r in rows if not r["collides"]]
    assert [(r["key"], r["size"], r["error"]) for r in good] == [("A/b", 2, ""), ("A/deep/c", 3, ""), ("top", 1, "")]
    assert [r["uri"] for r in good] == [root.child(n).uri for n in ("A/b.PNG", "A/deep/c.jpg", "top.png")]
    assert all(r["version"] for r in rows)
    # Key collisions, in a sub-folder's task and in the driver's first level: marked, never read.
    clashes = {r["key"]: r["error"] for r in rows if r["collides"]}
    assert clashes == {
        "A/two": "key collision: A/two.JPG and A/two.png map to key 'A/two'; rename one, then re-run with --overwrite",
        "t": "key collision: t.jpg and t.png map to key 't'; rename one, then re-run with --overwrite",
    }
    assert nightly.list_inputs(root.child("A", "deep"), (".gif",)) is None
    storage.write_bytes(root.child("only-hidden", ".h.png"), b"h")
    assert nightly.list_inputs(root.child("only-hidden"), (".png",)) is None


def test_listing_local(ray_cluster, tmp_path):
    check_listing(storage.resolve(str(tmp_path / "in")))


@pytest.mark.s3
def test_listing_s3(ray_cluster, s3_prefix):
    check_listing(storage.resolve(f"{s3_prefix}/in"))


def check_lock(root: storage.Location):
    loc = root.child("_nightly.lock")
    assert create_exclusive(loc, b"first")
    assert not create_exclusive(loc, b"second")
    assert storage.read_bytes(loc) == b"first"
    storage.remove_tree(loc)
    with RunLock(loc, stale_after_s=3600) as held:
        with pytest.raises(LockedError, match="another run holds the lock") as exc:
            RunLock(loc, stale_after_s=3600).acquire()
        assert exc.value.exit_code == 5
        assert json.loads(storage.read_bytes(loc))["owner"] == held.owner
    assert not storage.exists(loc)  # released
    # A stale lock (its run died) is taken over: aged by the store's clock, two hours on.
    storage.write_bytes(loc, json.dumps({"owner": "dead", "created_ts": time.time()}).encode())
    with RunLock(loc, stale_after_s=3600, now=lambda: time.time() + 7200) as taker:
        assert json.loads(storage.read_bytes(loc))["owner"] == taker.owner
    assert not storage.exists(loc)
    # A run that outlives the stale age is alive: its lock is rewritten while held, so it is not taken over.
    two_hours_on = lambda: time.time() + 7200  # noqa: E731
    with RunLock(loc, stale_after_s=3600, now=two_hours_on, heartbeat_s=0.05) as live:
        first = loc.fs.info(loc.path)
        deadline = time.monotonic() + 60
        while loc.call(lambda: (loc.fs.invalidate_cache(loc.path), loc.fs.info(loc.path))[1]) == first:
            assert time.monotonic() < deadline, "the lock was never rewritten while held"
            time.sleep(0.05)
        assert json.loads(storage.read_bytes(loc))["owner"] == live.owner
    assert not storage.exists(loc)


def test_lock_local(tmp_path):
    check_lock(storage.resolve(str(tmp_path / "out")))
    # A lock two hours old by the store's clock, refreshed by its live holder, is fresh again.
    loc = storage.resolve(str(tmp_path / "out" / "_nightly.lock"))
    held = RunLock(loc, stale_after_s=3600)
    held.acquire()
    past = time.time() - 7200
    os.utime(loc.path, (past, past))
    held.refresh()
    with pytest.raises(LockedError, match="another run holds the lock"):
        RunLock(loc, stale_after_s=3600).acquire()
    assert json.loads(storage.read_bytes(loc))["created_ts"] == held.created  # still when it was taken
    held.release()


@pytest.mark.s3
def test_lock_s3_conditional_put(s3_prefix):
    check_lock(storage.resolve(s3_prefix))


def test_output_inside_input_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="inside INPUT"):
        nightly.check_layout(storage.resolve(str(tmp_path / "in")), storage.resolve(str(tmp_path / "in" / "out")))
    # INPUT inside what nightly writes (a date partition's masks) is refused too; beside it is fine.
    with pytest.raises(ConfigError, match=r"inside what the job writes .* \(date=2026-01-01\)"):
        nightly.check_layout(
            storage.resolve(str(tmp_path / "n" / "date=2026-01-01" / "masks")), storage.resolve(str(tmp_path / "n"))
        )
    nightly.check_layout(storage.resolve(str(tmp_path / "n" / "images")), storage.resolve(str(tmp_path / "n")))


def write_pngs(root, names, seed=0):
    for i, name in enumerate(names):
        path = os.path.join(root, f"{name}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img, _ = synthetic.make_example(seed + i, size=32)
        Image.fromarray(img).save(path)


def summary_keys(partition):
    return sorted(pq.read_table(os.path.join(partition, "summaries"), columns=["key"])["key"].to_pylist())


@pytest.mark.slow
def test_nightly_runs_only_new_and_changed_images(tiny_model, tmp_path, monkeypatch):
    _, model = tiny_model
    calls = []
    real_infer = pipeline.infer
    monkeypatch.setattr(pipeline, "infer", lambda spec: calls.append(spec) or real_infer(spec))
    inp, out = tmp_path / "in", tmp_path / "nightly"
    write_pngs(inp, ["a", "b", "sub/c", "sub/deeper/d"])

    def night(date, **kw):
        return nightly.run_nightly(
            NightlySpec(model=model, input=str(inp), output=str(out), date=date, batch_size=4, **kw)
        )

    r1 = night("2026-01-01", tta_flip=True, precision="float32", storage_retry_s=30)
    assert (calls[0].tta_flip, calls[0].precision, calls[0].storage_retry_s) == (True, "float32", 30)
    assert r1["status"] == "ok" and r1["counts"]["processed"] == 4 and r1["counts"]["new"] == 4
    p1 = out / "date=2026-01-01"
    # Keys are relative to INPUT, as the `files` source makes them.
    assert summary_keys(p1) == ["a", "b", "sub/c", "sub/deeper/d"]
    assert (p1 / "masks" / "sub" / "deeper" / "d.png").exists() and (p1 / "_SUCCESS").exists()
    assert set(r1["class_fraction_mean"]) == set(r1["class_names"])

    # Night 2: two new images, one rewritten; the previous report is doctored to force a drift flag.
    write_pngs(inp, ["e", "sub/f"], seed=10)
    write_pngs(inp, ["b"], seed=20)
    os.utime(inp / "b.png", (time.time() + 5, time.time() + 5))
    rep1 = out / "reports" / "2026-01-01.json"
    doctored = json.loads(rep1.read_text())
    doctored["class_fraction_mean"] = {name: (1.0 if i == 0 else 0.0) for i, name in enumerate(r1["class_names"])}
    rep1.write_text(json.dumps(doctored))
    r2 = night("2026-01-02", drift_threshold=0.01)
    assert (r2["counts"]["new"], r2["counts"]["changed"], r2["counts"]["unchanged"]) == (2, 1, 3)
    assert summary_keys(out / "date=2026-01-02") == ["b", "e", "sub/f"]
    assert r2["drift"]["flagged"] and r2["status"] == "drift" and nightly.exit_code(r2) == 4
    from PIL import Image

    with Image.open(out / "reports" / "2026-01-02-drift.png") as plot:  # the drift as a picture too
        assert plot.size[0] > 200 and plot.size[1] > 100
    assert r2["drift"]["plot"].endswith("2026-01-02-drift.png")
    assert len(calls) == 2

    # Night 3: nothing new: no inference, no partition, a report that says so.
    r3 = night("2026-01-03")
    assert len(calls) == 2
    assert r3["status"] == "nothing_new" and r3["counts"]["processed"] == 0 and r3["counts"]["unchanged"] == 6
    assert not (out / "date=2026-01-03").exists() and nightly.exit_code(r3) == 0
    assert json.loads((out / "reports" / "2026-01-03.json").read_text())["counts"]["processed"] == 0
    ledger_rows = night_ledger.read(storage.resolve(str(out)))
    assert ledger_rows.num_rows == 7 and not (out / "_nightly.lock").exists()

    # A failed run (all inputs bad, no error budget) writes no ledger rows: they are retried next time.
    # A symlink out of INPUT is listed but not followed: an error row of the night's run.
    (inp / "broken.png").write_bytes(b"not a png")
    (tmp_path / "elsewhere.png").write_bytes((inp / "a.png").read_bytes())
    os.symlink(tmp_path / "elsewhere.png", inp / "link.png")
    with pytest.raises(JobError):
        night("2026-01-04", max_error_fraction=0.0)
    r4 = json.loads((out / "reports" / "2026-01-04.json").read_text())
    assert r4["status"] == "failed" and r4["exit_code"] == 3
    rows = pq.read_table(out / "date=2026-01-04" / "summaries", columns=["key", "error"]).to_pylist()
    assert {r["key"] for r in rows} == {"broken", "link"}
    assert "outside INPUT, not followed" in next(r["error"] for r in rows if r["key"] == "link")
    assert night_ledger.read(storage.resolve(str(out))).num_rows == 7
    assert not (out / "_nightly.lock").exists()
    # A failed re-run of a date keeps that date's report and writes its own beside it.
    with pytest.raises(JobError):
        night("2026-01-03", max_error_fraction=0.0)
    assert json.loads((out / "reports" / "2026-01-03.json").read_text())["status"] == "nothing_new"
    (again,) = (out / "reports").glob("2026-01-03-failed-*.json")
    assert json.loads(again.read_text())["status"] == "failed"

    # INPUT empty while the ledger holds earlier images (an unmounted share looks like this): the
    # night fails with the flag that allows it named; given the flag, it is "nothing new".
    assert r3["counts"]["absent"] == 0
    moved = tmp_path / "moved"
    inp.rename(moved)
    inp.mkdir()
    with pytest.raises(JobError, match="lists no images, but the ledger records 6 .*--allow-empty-input"):
        night("2026-01-05")
    r5 = json.loads((out / "reports" / "2026-01-05.json").read_text())
    assert r5["status"] == "failed" and r5["exit_code"] == 3 and r5["counts"]["absent"] == 6
    r5 = night("2026-01-05", allow_empty_input=True)
    assert r5["status"] == "nothing_new" and r5["counts"]["absent"] == 6 and nightly.exit_code(r5) == 0
    assert night_ledger.read(storage.resolve(str(out))).num_rows == 7


def test_a_subfolder_without_images_is_planned_as_nothing(ray_cluster, tmp_path):
    """Ray Data passes a sub-folder's empty listing block through map_batches without calling the
    function, so the block lacks the tally columns: the plan counts it as nothing (it raised KeyError)."""
    root = storage.resolve(str(tmp_path / "in"))
    for name in ("a.png", "b.png", "sub/notes.txt"):
        storage.write_bytes(root.child(name), b"1")
    (tmp_path / "in" / "empty").mkdir()
    index = night_ledger.build(storage.resolve(str(tmp_path / "out")), "2026-01-01")
    night = nightly.plan_night(root, (".png",), index, "m1")
    assert night.counts == {"new": 2, "changed": 0, "unchanged": 0, "deferred": 0, "listed": 2}
    assert night.todo["key"].to_pylist() == ["a", "b"] and night.clashes.num_rows == 0


def test_the_ledger_rows_and_report_figures_of_a_partition_are_as_the_per_row_reading_gave(tmp_path, monkeypatch):
    """The night's closing steps read the partition by Arrow columns (a file at a time for the report,
    a hash lookup for the ledger's statuses): the same ledger rows and report figures as the per-row
    Python reading they replaced (a key's last summary row gives its status; a todo key without a row
    is not recorded; the mean over ok rows to the last bit), also when the ledger is built a slice at a time."""
    import numpy as np

    rng = np.random.default_rng(7)
    part = storage.resolve(str(tmp_path / "out" / "date=2026-12-01"))
    files = []
    for f, keys in enumerate([[f"k{i:04d}" for i in range(0, 300)], [f"k{i:04d}" for i in range(250, 520)]]):
        status = rng.choice(["ok", "ok", "ok", "error"], len(keys)).tolist()
        fractions = rng.dirichlet(np.ones(4), len(keys)).astype(np.float32).tolist()
        fractions = [None if s == "error" else v for s, v in zip(status, fractions)]
        table = pa.table(
            {"key": keys, "status": status, "class_fractions": pa.array(fractions, pa.list_(pa.float32()))}
        )
        pq.write_table(table, tmp_path / f"part-{f}.parquet")
        storage.write_bytes(
            part.child("summaries", f"run=r{f}", f"part-{f}.parquet"), (tmp_path / f"part-{f}.parquet").read_bytes()
        )
        files.append(table)
    todo = listing([(f"k{i:04d}", i, f"v{i}") for i in range(0, 540)])  # k0520.. have no summary row

    # The oracle: every row as Python objects, as the night read them before.
    rows = pa.concat_tables(files)
    status = dict(zip(rows["key"].to_pylist(), rows["status"].to_pylist()))
    done = todo.filter(pc.is_in(todo["key"], pa.array(list(status), pa.string())))
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    means = np.asarray(ok["class_fractions"].to_pylist(), np.float64).mean(axis=0)
    names = ["bg", "a", "b", "c"]

    monkeypatch.setattr(nightly, "LEDGER_SLICE", 64)
    output = storage.resolve(str(tmp_path / "out"))
    nightly._append_ledger(output, todo, part, "m1", "2026-12-01", "run-1", "S")
    written = night_ledger.read(output)
    assert written.select(nightly.LISTING_SCHEMA.names).equals(done.select(nightly.LISTING_SCHEMA.names))
    assert written["status"].to_pylist() == [status[k] for k in done["key"].to_pylist()]
    assert set(written["model_sha256"].to_pylist()) == {"m1"} and set(written["run_id"].to_pylist()) == {"run-1"}
    assert written.num_rows == 520 and set(written["date"].to_pylist()) == {"2026-12-01"}

    figures = nightly.partition_figures(part, names)
    assert (figures.total, figures.ok) == (rows.num_rows, ok.num_rows)
    assert figures.class_fraction_mean == {n: round(float(v), 6) for n, v in zip(names, means)}
    empty = nightly.partition_figures(storage.resolve(str(tmp_path / "none")), names)
    assert (empty.total, empty.ok, empty.class_fraction_mean) == (0, 0, None)


def test_the_console_line_adds_up_with_deferred_inputs():
    counts = {"listed": 5, "new": 0, "changed": 0, "unchanged": 4, "deferred": 1}
    assert nightly.counts_line("2026-12-02", counts) == (
        "nightly 2026-12-02: 5 listed, 0 new, 0 changed, 4 unchanged, 1 deferred"
    )
    # No deferred inputs: the line is as before.
    assert nightly.counts_line("2026-12-02", {**counts, "unchanged": 5, "deferred": 0}).endswith("5 unchanged")


def night_report(status, processed, run_id=None):
    return {"date": "2026-12-01", "status": status, "run_id": run_id, "counts": {"processed": processed}}


def test_a_rerun_report_never_replaces_one_that_records_work(tmp_path):
    """DATE.json holds the date's run that processed the latest work: a re-run that processed nothing
    (or failed) goes beside it, one that processed images takes it and keeps the earlier one beside it."""
    out = storage.resolve(str(tmp_path / "out"))
    date_json = out.child("reports", "2026-12-01.json")

    def placed(report, earlier=None):
        if earlier is None:
            storage.remove_tree(date_json)
        else:
            storage.write_json(date_json, earlier)
        return nightly._placement(report, out, "2026-12-01")

    worked = night_report("ok", 5, "run-1")
    assert placed(worked).name == "2026-12-01.json"
    # Nothing new on a re-run of a date whose report records work: that report stays.
    p = placed(night_report("nothing_new", 0), worked)
    assert p.name.startswith("2026-12-01-rerun-") and p.name.endswith(".json") and p.displaced is None
    assert "run-1" in p.why
    p = placed(night_report("drift", 0), worked)  # drift flagged on the partition's statistics: still a re-run
    assert p.name.startswith("2026-12-01-rerun-")
    assert placed(night_report("failed", 0), worked).name.startswith("2026-12-01-failed-")
    # A re-run that processed images holds the latest work: it takes DATE.json, the earlier report is kept.
    p = placed(night_report("ok", 1, "run-2"), worked)
    assert p.name == "2026-12-01.json" and p.displaced == worked
    assert p.displaced_name.startswith("2026-12-01-replaced-") and p.displaced_name in p.why
    # An earlier report that recorded no work (nothing new) or failed is replaced by any later run.
    for earlier in (night_report("nothing_new", 0), night_report("failed", 0)):
        assert placed(night_report("nothing_new", 0), earlier).name == "2026-12-01.json"
        assert placed(night_report("ok", 2), earlier).displaced is None
    assert placed(night_report("failed", 0), night_report("failed", 0)).name == "2026-12-01.json"
    assert placed(night_report("failed", 0), night_report("nothing_new", 0)).name.startswith("2026-12-01-failed-")
    # The side reports are never the drift baseline: only DATE.json is.
    for name in (p.displaced_name, "2026-12-01-rerun-20261201T000000000000Z.json"):
        assert not nightly.REPORT_NAME.fullmatch(name)


class FakeCard:
    model_id = "fake"
    model_sha256 = "0" * 64
    class_names = ["background", "cell"]


def check_missing_input_fails_the_night(out: str, inp: str, monkeypatch):
    from raysegment.models import card

    monkeypatch.setattr(card.ModelCard, "read", classmethod(lambda cls, *a, **kw: FakeCard()))

    def night(**kw):
        return nightly.run_nightly(NightlySpec(model="/models/m", input=inp, output=out, date="2026-12-03", **kw))

    # A cron job needs a report to watch: the night fails (exit 3) with one naming INPUT and the fix,
    # on the first night too (a mistyped path never looks like "nothing new").
    with pytest.raises(JobError, match=r"INPUT .* does not exist.*check that INPUT .*--allow-empty-input") as exc:
        night()
    assert exc.value.exit_code == nightly.EXIT_FAILED
    report = storage.read_json(storage.resolve(out).child("reports", "2026-12-03.json"))
    assert report["status"] == "failed" and report["exit_code"] == 3 and report["counts"]["listed"] == 0
    assert "does not exist" in report["problem"] and "--allow-empty-input" in report["problem"]
    # Emptied on purpose (on S3 an emptied prefix is not there at all): the flag makes it nothing new.
    report = night(allow_empty_input=True)
    assert report["status"] == "nothing_new" and nightly.exit_code(report) == 0


def test_a_missing_input_fails_the_night_with_a_report(ray_cluster, tmp_path, monkeypatch):
    check_missing_input_fails_the_night(str(tmp_path / "out"), str(tmp_path / "no-such-folder"), monkeypatch)


@pytest.mark.s3
def test_a_missing_input_prefix_fails_the_night_with_a_report(ray_cluster, s3_prefix, monkeypatch):
    check_missing_input_fails_the_night(f"{s3_prefix}/out", f"{s3_prefix}/no-such-prefix", monkeypatch)


@pytest.mark.slow
def test_a_rerun_of_a_date_keeps_the_report_of_the_run_that_did_the_work(tiny_model, tmp_path, monkeypatch):
    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "nightly"
    reports = out / "reports"
    write_pngs(inp, ["a", "b", "c"])
    notes = []
    real_note = nightly.progress.note
    monkeypatch.setattr(nightly.progress, "note", lambda text: notes.append(text) or real_note(text))

    def night(date="2026-12-01"):
        return nightly.run_nightly(NightlySpec(model=model, input=str(inp), output=str(out), date=date, batch_size=4))

    def side(kind):
        return sorted(reports.glob(f"2026-12-01-{kind}-*.json"))

    first = night()
    assert first["status"] == "ok" and first["counts"]["processed"] == 3
    worked = (reports / "2026-12-01.json").read_text()

    # Re-run, nothing new: the report of the run that did the work stays; the re-run's goes beside it.
    again = night()
    assert again["status"] == "nothing_new" and again["counts"]["processed"] == 0
    assert (reports / "2026-12-01.json").read_text() == worked
    (rerun,) = side("rerun")
    assert json.loads(rerun.read_text())["counts"]["processed"] == 0
    from raysegment.registry import nightly_line

    assert again["report_uri"] == str(rerun) and nightly_line(again).endswith(f"report {rerun}")  # not DATE.json

    # An image changed after it was processed into the date: deferred, shown on the console so the counts add up.
    write_pngs(inp, ["b"], seed=20)
    os.utime(inp / "b.png", (time.time() + 5, time.time() + 5))
    deferred = night()
    assert deferred["counts"]["deferred"] == 1 and deferred["counts"]["processed"] == 0
    assert notes[-1] == "nightly 2026-12-01: 3 listed, 0 new, 0 changed, 2 unchanged, 1 deferred"
    # The closing line adds up too: listed = new + changed + unchanged + deferred.
    assert nightly_line(deferred).startswith(
        "nightly 2026-12-01: nothing_new; 3 listed, 0 new, 0 changed, 2 unchanged, 1 deferred, 0 processed"
    )
    assert (reports / "2026-12-01.json").read_text() == worked and len(side("rerun")) == 2

    # A re-run that processes images (one added since) holds the latest work: it takes 2026-12-01.json and
    # the earlier report is kept beside it.
    write_pngs(inp, ["d"], seed=30)
    more = night()
    assert more["status"] == "ok" and more["counts"]["processed"] == 1 and more["counts"]["new"] == 1
    assert more["counts"]["skipped"] == 0  # tonight's one image; the date's 3 earlier rows were not its inputs
    now = json.loads((reports / "2026-12-01.json").read_text())
    assert now["run_id"] == more["run_id"] != first["run_id"] and now["partition_rows"]["total"] == 4
    (replaced,) = side("replaced")
    assert replaced.read_text() == worked
    # The next night's drift compares with 2026-12-01.json, never with a side report.
    previous = nightly.previous_report(storage.resolve(str(reports)), "2026-12-02")
    assert previous["run_id"] == more["run_id"]


def test_a_model_file_that_is_not_the_cards_is_refused_before_output_is_touched(tmp_path):
    """infer refused it before writing, nightly only after the date's inputs/ list was written: a partition
    without _SUCCESS that every later night warned of."""
    model, out = tmp_path / "model", tmp_path / "nightly"
    card = untrained_card()
    card.write(storage.resolve(str(model)))
    (model / MODEL_FILE).write_bytes(b"another model's weights")
    write_pngs(tmp_path / "in", ["a"])
    spec = NightlySpec(model=str(model), input=str(tmp_path / "in"), output=str(out), date="2026-12-01")
    with pytest.raises(DataError, match="does not match model.json's model_sha256"):
        nightly.run_nightly(spec)
    assert not out.exists()


def test_a_rerun_of_an_unfinished_date_masks_images_changed_since(tiny_model, tmp_path):
    """A failed night, its bad images fixed (and one good image replaced), then the same date again: the
    re-run resumed every key, so the fixed images stayed error rows and the replaced one kept its old mask,
    and the ledger recorded the new files as done. Rows of images changed since the unfinished attempt are
    now dropped and masked again; unchanged ones resume. The failed night's report counts what it did."""
    from raysegment.errors import RunFailed

    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "nightly"
    write_pngs(inp, ["a", "b", "c", "d", "e"])
    for name in ("x", "y"):
        (inp / f"{name}.png").write_bytes(b"not a png")

    def night(date="2026-12-01"):
        spec = NightlySpec(model=model, input=str(inp), output=str(out), date=date, batch_size=4)
        return nightly.run_nightly(spec.model_copy(update={"max_error_fraction": 0.2}))

    with pytest.raises(RunFailed, match="2 of 7 images failed"):
        night()
    failed = json.loads((out / "reports" / "2026-12-01.json").read_text())
    assert failed["status"] == "failed" and failed["counts"]["processed"] == 7 and failed["counts"]["error"] == 2
    assert failed["drift"]["flagged"] is False  # the same keys as any report
    first_run = failed["run_id"]
    masks = out / "date=2026-12-01" / "masks"
    assert (masks / "e.png").exists()

    write_pngs(inp, ["x", "y"], seed=10)  # fixed
    write_pngs(inp, ["a"], seed=40)  # replaced by another picture
    (inp / "e.png").write_bytes(b"damaged since")  # its redo fails: no stale mask may stay beside the error row
    for name in ("a", "e"):
        os.utime(inp / f"{name}.png", (time.time() + 5, time.time() + 5))
    again = night()
    assert again["status"] == "ok" and again["counts"]["processed"] == 4 and again["counts"]["skipped"] == 3
    rows = pq.read_table(out / "date=2026-12-01" / "summaries", columns=["key", "status", "run_id"]).to_pylist()
    by_key = {r["key"]: r for r in rows}
    assert len(rows) == 7 and [k for k, r in by_key.items() if r["status"] != "ok"] == ["e"]
    assert not (masks / "e.png").exists() and (masks / "a.png").exists()
    assert {k for k, r in by_key.items() if r["run_id"] == again["run_id"]} == {"a", "e", "x", "y"}
    assert {by_key[k]["run_id"] for k in "bcd"} == {first_run}
    recorded = night_ledger.read(storage.resolve(str(out))).to_pylist()
    assert sorted((r["key"], r["status"]) for r in recorded) == [(k, "error" if k == "e" else "ok") for k in "abcdexy"]


def test_a_date_holding_another_models_rows_defers_the_night(tiny_model, tmp_path):
    """A model deployed mid-day, then the date run again: the partition holds the other model's rows, and
    infer refused it with exit 2 naming --overwrite, which nightly refuses; no report was written, and
    every re-run that day failed so. The work now goes to the next night, which does it. An unfinished
    earlier partition is named on every later night."""
    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "nightly"
    write_pngs(inp, ["a", "b"])

    def night(date):
        return nightly.run_nightly(NightlySpec(model=model, input=str(inp), output=str(out), date=date, batch_size=4))

    assert night("2026-12-01")["counts"]["processed"] == 2
    (part,) = (out / "date=2026-12-01" / "summaries").rglob("*.parquet")
    table = pq.read_table(part)  # as if another model had written the date
    column = table.schema.get_field_index("model_sha256")
    pq.write_table(table.set_column(column, "model_sha256", pa.array(["f" * 64] * table.num_rows)), part)
    write_pngs(inp, ["c"], seed=5)
    held = night("2026-12-01")
    assert held["status"] == "deferred" and held["exit_code"] == 0 and held["counts"]["processed"] == 0
    assert held["counts"]["new"] == 0 and held["counts"]["deferred"] == 1
    assert "holds results of another model (ffffffffffff)" in held["problem"]
    assert json.loads(open(held["report_uri"]).read())["status"] == "deferred"
    nxt = night("2026-12-02")
    assert nxt["counts"]["new"] == 1 and nxt["counts"]["processed"] == 1 and nxt["unfinished_partitions"] == []

    (out / "date=2026-12-02" / "_SUCCESS").unlink()  # as a killed or failed night leaves it
    assert night("2026-12-03")["unfinished_partitions"] == ["date=2026-12-02"]


NFC, NFD = "d\u00e9", "de\u0301"  # one folder name in two Unicode forms (Linux writes NFC, macOS NFD)


def test_keys_that_collide_across_folders_refuse_the_night_before_inference(ray_cluster, tmp_path):
    """The lister checks collisions a folder at a time, so `dé/a.png` under an NFC and an NFD folder name was
    not refused: infer ran, failed its rows-vs-keys check advising --overwrite (which nightly refuses), and
    every re-run of the date failed so. The whole listing is checked now, also against an unchanged image."""
    root = storage.resolve(str(tmp_path / "in"))
    for name in (f"{NFC}/a.png", f"{NFD}/a.png", "b.png", "c.png", "c.jpg", "ok/x.png"):
        storage.write_bytes(root.child(name), b"1")
    # The NFC image recorded by an earlier night (unchanged tonight), the NFD one new: a collision all the same.
    info = os.stat(tmp_path / "in" / NFC / "a.png")
    seen = ledger([(f"{NFC}/a", info.st_size, repr(info.st_mtime), "2026-11-30", "2026-11-30T01:00:00")])
    index = night_ledger.index_of(seen, "2026-12-01")
    night = nightly.plan_night(root, (".png", ".jpg"), index, "m1")
    assert night.counts["listed"] == 6 and night.counts["unchanged"] == 1 and night.todo.num_rows == 5
    assert sorted(night.clashes["uri"].to_pylist()) == sorted(
        str(tmp_path / "in" / n) for n in (f"{NFC}/a.png", f"{NFD}/a.png", "c.jpg", "c.png")
    )
    errors = dict(zip(night.clashes["uri"].to_pylist(), night.clashes["error"].to_pylist()))
    assert "two Unicode forms" in errors[str(tmp_path / "in" / NFD / "a.png")]
    with pytest.raises(JobError, match="4 inputs share keys") as exc:
        nightly.refuse_collisions(night.clashes)
    assert "--overwrite" not in str(exc.value) and str(exc.value).count("rename one, then run the night again") == 2

    storage.remove_tree(root.child(NFD))  # keys that are not ASCII, none colliding
    storage.remove_tree(root.child("c.jpg"))
    night = nightly.plan_night(root, (".png", ".jpg"), index, "m1")
    assert night.clashes.num_rows == 0 and night.todo["key"].to_pylist() == ["b", "c", "ok/x"]
    # Plain ASCII keys (the lister's own check): worded with nightly's fix as well.
    storage.write_bytes(root.child("b.jpg"), b"1")
    storage.remove_tree(root.child(NFC))
    night = nightly.plan_night(root, (".png", ".jpg"), index, "m1")
    with pytest.raises(JobError) as exc:
        nightly.refuse_collisions(night.clashes)
    assert str(exc.value) == (
        "nightly: 2 inputs share keys: key collision: b.jpg and b.png map to key 'b'; rename one, then run the "
        "night again"
    )


def summary_file(partition: storage.Location, name: str, keys: list[str]) -> None:
    """Summary rows as infer writes them, for the columns a re-run reads (`ok` keys with a mask)."""
    status = ["ok" if k.startswith("ok") else "error" for k in keys]
    masks = [partition.child("masks", f"{k}.png").uri if s == "ok" else None for k, s in zip(keys, status)]
    table = pa.table({"key": keys, "status": status, "model_sha256": ["m1"] * len(keys), "mask_uri": masks})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(partition.child("summaries", "run=r1", f"part-{name}.parquet"), buf.getvalue().to_pybytes())
    for mask in [m for m in masks if m]:
        storage.write_bytes(storage.resolve(mask), b"mask")


def test_a_rerun_drops_colliding_rows_unless_the_ledger_points_at_them(ray_cluster, tmp_path):
    """A date's partition holding two rows of keys that differ only in Unicode form (written before nights were
    refused for them): rows nothing points at are dropped (a failed attempt's); a row the ledger records from
    this date stays, and a key of tonight's colliding with it refuses the night before inference."""
    part = storage.resolve(str(tmp_path / "out" / "date=2026-12-01"))
    summary_file(part, "0", [f"{NFC}/a", "b"])
    summary_file(part, "1", [f"{NFD}/a", "c", "c"])  # "c" twice: two inputs of one key
    empty = night_ledger.index_of(ledger([]), "2026-12-01")
    tonight = listing([(f"{NFC}/a", 1, "v"), ("de2/a", 1, "v"), ("b", 1, "v")])
    dropped = nightly._colliding_keys(part, tonight, empty)
    assert sorted(dropped) == sorted([f"{NFC}/a", f"{NFD}/a", "c"])

    # The NFC key recorded from this date (the ledger points at its row), the NFD one new tonight: refused.
    recorded = night_ledger.index_of(ledger([(f"{NFC}/a", 1, "v", "2026-12-01", "2026-12-01T01:00:00")]), "2026-12-01")
    part2 = storage.resolve(str(tmp_path / "out2" / "date=2026-12-01"))
    summary_file(part2, "0", [f"{NFC}/a", "b"])
    with pytest.raises(JobError, match="run the night again") as exc:
        nightly._colliding_keys(part2, listing([(f"{NFD}/a", 1, "v")]), recorded)
    assert "two Unicode forms" in str(exc.value)
    # Recorded by an earlier date instead: the row is a failed attempt's, dropped.
    earlier = night_ledger.index_of(ledger([(f"{NFC}/a", 1, "v", "2026-11-30", "2026-11-30T01:00:00")]), "2026-12-01")
    assert nightly._colliding_keys(part2, listing([(f"{NFD}/a", 1, "v")]), earlier) == [f"{NFC}/a"]
    assert nightly._colliding_keys(part2, listing([("x", 1, "v")]), recorded) == []
    # The NFD key held too (an earlier attempt's error row) and listed tonight: its row goes, but tonight writes
    # it again beside the recorded NFC row. It was let through, and infer failed after inference, every re-run.
    part4 = storage.resolve(str(tmp_path / "out4" / "date=2026-12-01"))
    summary_file(part4, "0", [f"{NFC}/a", f"{NFD}/a", "b"])
    with pytest.raises(JobError, match="two Unicode forms.*run the night again"):
        nightly._colliding_keys(part4, listing([(f"{NFD}/a", 1, "v")]), recorded)
    # Two unrelated collisions: one clause each (one clause named all four keys, "map to key" the first).
    at = ("2026-12-01", "2026-12-01T01:00:00")
    both = night_ledger.index_of(ledger([(f"{NFC}/a", 1, "v", *at), (f"x{NFC}", 1, "v", *at)]), "2026-12-01")
    part5 = storage.resolve(str(tmp_path / "out5" / "date=2026-12-01"))
    summary_file(part5, "0", [f"{NFC}/a", f"x{NFC}"])
    with pytest.raises(JobError) as exc:
        nightly._colliding_keys(part5, listing([(f"{NFD}/a", 1, "v"), (f"x{NFD}", 1, "v")]), both)
    text = str(exc.value)
    assert text.count("map to key") == 2 and f"{NFC}/a and {NFD}/a map to key '{NFC}/a'" in text
    assert f"x{NFC} and x{NFD} map to key 'x{NFC}'" in text

    # The re-run after the NFD image was renamed: the colliding rows (and the mask of one) go, the others stay.
    part3 = storage.resolve(str(tmp_path / "out3" / "date=2026-12-01"))
    summary_file(part3, "0", [f"ok{NFC}/a", "b"])
    summary_file(part3, "1", [f"ok{NFD}/a", "c"])
    storage.write_bytes(part3.child("_SUCCESS"), b"{}")
    tonight = listing([(f"ok{NFC}/a", 1, "v"), ("ok-renamed/a", 1, "v")])
    counts = dict.fromkeys(night_ledger.CHANGES, 0)
    kept = nightly._same_date_rerun(part3, tonight, counts, "m1", {"counts": {}}, empty)
    assert kept.equals(tonight) and not storage.exists(part3.child("_SUCCESS"))
    assert sorted(pq.read_table(part3.path + "/summaries", columns=["key"])["key"].to_pylist()) == ["b", "c"]
    masks = tmp_path / "out3" / "date=2026-12-01" / "masks"
    assert not (masks / f"ok{NFC}" / "a.png").exists() and not (masks / f"ok{NFD}" / "a.png").exists()


def test_a_night_refused_for_colliding_keys_shows_its_closing_line(ray_cluster, tmp_path, monkeypatch):
    """Refused before inference (nothing under the date), with the night's closing line naming its report: a
    night that raised printed only its error line."""
    model, inp, out = hashed_model(tmp_path / "model"), tmp_path / "in", tmp_path / "nightly"
    for name in (f"{NFC}/a.png", f"{NFD}/a.png", "b.png"):
        storage.write_bytes(storage.resolve(str(inp / name)), b"1")
    notes = []
    real_note = nightly.progress.note
    monkeypatch.setattr(nightly.progress, "note", lambda text: notes.append(text) or real_note(text))
    spec = NightlySpec(model=model, input=str(inp), output=str(out), date="2026-12-01")
    with pytest.raises(JobError, match="2 inputs share keys.*two Unicode forms.*rename one, then run the night again"):
        nightly.run_nightly(spec)
    report = json.loads((out / "reports" / "2026-12-01.json").read_text())
    assert (
        report["status"] == "failed" and report["counts"]["processed"] == 0 and "two Unicode forms" in report["problem"]
    )
    assert notes[-1] == (
        "nightly 2026-12-01: failed; 3 listed, 3 new, 0 changed, 0 unchanged, 0 processed (0 ok, 0 errors); "
        f"report {out / 'reports' / '2026-12-01.json'}"
    )
    assert not (out / "date=2026-12-01").exists() and not (out / nightly.LOCK_NAME).exists()


@pytest.mark.slow
def test_a_date_an_earlier_release_let_collide_finishes_once_renamed(tiny_model, tmp_path, monkeypatch):
    """The probe's case end to end: the date's partition holds the rows of `dé/a.png` from an NFC and an NFD
    folder (infer ran on both and failed). The night is now refused before inference, with its closing line,
    and once the NFD folder is renamed the same date finishes: the colliding rows are dropped and redone."""
    from raysegment.errors import RunFailed

    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "nightly"
    write_pngs(inp, [f"{NFC}/a", f"{NFD}/a", "b"])
    part = out / "date=2026-12-01"
    with pytest.raises(RunFailed, match="3 summary rows for 2 distinct keys"):  # what the earlier release left
        pipeline.infer(InferSpec(model=model, input=str(inp), output=str(part), batch_size=4))
    notes = []
    real_note = nightly.progress.note
    monkeypatch.setattr(nightly.progress, "note", lambda text: notes.append(text) or real_note(text))

    def night():
        return nightly.run_nightly(NightlySpec(model=model, input=str(inp), output=str(out), date="2026-12-01"))

    with pytest.raises(JobError, match="2 inputs share keys.*run the night again"):
        night()
    report = json.loads((out / "reports" / "2026-12-01.json").read_text())
    assert report["status"] == "failed" and report["counts"]["processed"] == 0
    assert notes[-1].startswith("nightly 2026-12-01: failed; 3 listed, 3 new") and notes[-1].endswith(
        f"report {out / 'reports' / '2026-12-01.json'}"
    )
    assert len(pq.read_table(part / "summaries", columns=["key"])) == 3  # no inference: nothing written

    os.rename(inp / NFD, inp / "de2")
    done = night()
    assert done["status"] == "ok" and done["counts"]["processed"] == 2 and done["counts"]["skipped"] == 1
    assert any("rows of 2 keys that collide" in n for n in notes)
    rows = pq.read_table(part / "summaries", columns=["key", "status"]).to_pylist()
    assert sorted((r["key"], r["status"]) for r in rows) == [("b", "ok"), ("de2/a", "ok"), (f"{NFC}/a", "ok")]
    assert sorted(night_ledger.read(storage.resolve(str(out)))["key"].to_pylist()) == ["b", "de2/a", f"{NFC}/a"]


def test_the_lock_message_says_when_a_holder_on_this_machine_is_taken_over(tmp_path):
    """A holder on this machine is known alive (else it was taken over at once): the refusal said it would be
    taken over after the stale age, and to delete the lock if that run was dead. It says both ways now: at once
    when its pid dies, after the stale age when it stops refreshing (hung)."""
    from raysegment.lock import machine_id

    loc = storage.resolve(str(tmp_path / "out" / "_nightly.lock"))
    with RunLock(loc, stale_after_s=21600):
        with pytest.raises(LockedError, match="another run holds the lock") as exc:
            RunLock(loc, stale_after_s=21600).acquire()
    text = str(exc.value)
    assert f"if pid {os.getpid()} dies, its lock is taken over at once" in text
    # A live holder that stops refreshing its lock (hung) is taken over after the stale age all the same.
    assert f"or after 21600 s without a refresh; or stop pid {os.getpid()}" in text
    # Another machine's holder: its death cannot be seen from here, so the stale age is what takes it over.
    storage.write_bytes(loc, json.dumps({"owner": "o", "pid": 1, "machine": f"{machine_id()}x"}).encode())
    with pytest.raises(LockedError, match=r"delete the lock if that run is dead \(it is taken over after 21600 s\)"):
        RunLock(loc, stale_after_s=21600).acquire()


def test_a_night_into_a_locked_output_is_refused_before_ray_starts(tmp_path):
    """It started a whole local Ray (10-20 s, beside the live run) before reading the lock. Here Ray cannot
    start at all (its temp folder is a file): the refusal must come first."""
    model, out = hashed_model(tmp_path / "model"), tmp_path / "nightly"
    write_pngs(tmp_path / "in", ["a"])
    out.mkdir()
    stderr = run_into_held_lock("NightlySpec", out / nightly.LOCK_NAME, model, tmp_path / "in", out, tmp_path)
    assert "REFUSED False" in stderr, stderr[-2000:]
    assert f"pid {os.getpid()}" in stderr and not (out / "ledger").exists()
    assert sorted(os.listdir(out)) == [nightly.LOCK_NAME]  # its log too stays out of OUTPUT
