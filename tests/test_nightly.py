"""Nightly runs: the ledger diff, the run lock (local and S3), drift, and real runs on local Ray."""

import json
import os
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysegment import ledger as night_ledger
from raysegment import nightly, storage
from raysegment.config import InferSpec, NightlySpec
from raysegment.data import synthetic
from raysegment.errors import ConfigError, JobError
from raysegment.inference import pipeline
from raysegment.lock import LockedError, RunLock, create_exclusive


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
