"""Inputs, specs, storage and clocks as a hostile or unlucky user would give them (issue #20).

Key collisions are error rows before any mask is written and fail every run until renamed;
outputs are never read as inputs; symlinks never lead out of INPUT; a folder without images
is one error; every storage call of nightly and the lock keeps the job's deadline; a lock's
age is the store's, not its writer's clock.
"""

import datetime
import io
import json
import os
import socket
import tarfile
import time
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import hashed_model, png, run_into_held_lock, summaries

from raysegment import nightly, storage
from raysegment.cli import main
from raysegment.config import InferSpec, NightlySpec, load_spec
from raysegment.errors import ConfigError, DataError, JobError, StorageError
from raysegment.inference.pipeline import infer
from raysegment.inference.sources import unsafe_key_reason
from raysegment.inference.urilist import list_uris
from raysegment.lock import LockedError, RunLock

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


def rows_by_key(out) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in summaries(out):
        found.setdefault(row["key"], []).append(row)
    return found


def masks(out) -> set[str]:
    root = os.path.join(out, "masks")
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


# --- key collisions, symlinks, odd names: one folder, three runs ---------------------------------


def hostile_folder(tmp_path):
    inp, outside = tmp_path / "in", tmp_path / "outside"
    (inp / "sub").mkdir(parents=True)
    outside.mkdir()
    for name, i in [
        ("a.png", 1),
        ("a.jpg", 2),
        ("b.png", 3),
        (".png", 4),
        (f"sub/{NFC}.png", 5),
        (f"sub/{NFD}.png", 6),
    ]:
        (inp / name).write_bytes(png(i))
    (outside / "secret.png").write_bytes(png(7))
    os.symlink(outside / "secret.png", inp / "link.png")  # leaves INPUT: not followed
    os.symlink(tmp_path / "nowhere.png", inp / "dang.png")  # dangling
    os.symlink("../b.png", inp / "sub" / "inside.png")  # stays inside INPUT: followed
    os.symlink(outside, inp / "outdir")  # folders outside INPUT: not followed, at the top and below
    os.symlink(outside, inp / "sub" / "deep")
    os.symlink(inp / "sub", inp / "alias")  # a folder inside INPUT: its files are listed where they are
    # Latin-1 names (byte 0xe9, no UTF-8): a file, a folder at the top (the driver lists it) and one below.
    for path in (b"caf\xe9.png", b"top\xe9/y.png", b"sub/dir\xe9/x.png"):
        os.makedirs(os.path.dirname(os.fsencode(inp) + b"/" + path), exist_ok=True)
        with open(os.fsencode(inp) + b"/" + path, "wb") as f:
            f.write(png(8))
    return inp


@pytest.mark.slow
def test_collisions_fail_every_run_until_renamed_and_links_stay_inside(tiny_model, tmp_path):
    _, model = tiny_model
    inp, out = hostile_folder(tmp_path), tmp_path / "out"

    def run(**kw):
        return infer(InferSpec(model=model, input=str(inp), output=str(out), report=False, **kw))

    with pytest.raises(JobError, match="share a key") as exc:
        run()
    assert exc.value.exit_code == 3 and not (out / "_SUCCESS").exists()
    rows = rows_by_key(out)
    # Every colliding input is an error row and no mask was written for it: nothing overwritten.
    expected = "key collision: a.jpg and a.png map to key 'a'; rename one, then re-run with --overwrite"
    assert [r["error"] for r in rows["a"]] == [expected, expected]
    café = rows[f"sub/{NFC}"] + rows.get(f"sub/{NFD}", [])
    assert len(café) == 2 and all("two Unicode forms" in r["error"] for r in café)
    assert "outside INPUT, not followed" in rows["link"][0]["error"]
    assert "dangling symlink" in rows["dang"][0]["error"] and "dang.png" in rows["dang"][0]["error"]
    # '.png' is a hidden name (as macOS's ._a.png forks): no input, as in prepare; no row, no mask.
    assert masks(out) == {"b.png", "sub/inside.png"} and ".png" not in rows
    for key in ("caf\\xe9", "top\\xe9", "sub/dir\\xe9/x"):  # shown escaped, refused, never read
        assert rows[key][0]["error"].startswith("file name is not UTF-8 text"), key
    assert "a folder: nothing under it is read" in rows["top\\xe9"][0]["error"]
    for key in ("outdir", "sub/deep"):
        assert "a folder outside INPUT, not followed" in rows[key][0]["error"], key
    assert not any(key.startswith("alias") for key in rows)

    # The same command again must not pass the collision an earlier run recorded.
    with pytest.raises(JobError, match="share a key"):
        run()
    assert not (out / "_SUCCESS").exists() and "a.png" not in masks(out)

    (inp / "a.jpg").rename(inp / "c.jpg")
    (inp / "sub" / f"{NFD}.png").unlink()
    record = run(overwrite=True)
    assert (
        record["counts"]["ok"] == 5 and record["counts"]["error"] == 7
    )  # four links, three Latin-1 names; .png is hidden
    assert (out / "_SUCCESS").exists() and {"a.png", "c.png", f"sub/{NFC}.png"} <= masks(out)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_tar_collisions_within_and_across_archives(tiny_model, tmp_path):
    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "n").mkdir(parents=True)
    for name in ("dup.tar", "dup.tgz"):  # one archive key, 'dup'
        with tarfile.open(inp / name, "w:gz" if name.endswith("tgz") else "w") as tar:
            add_member(tar, "x.png", png(1))
    with tarfile.open(inp / "m.tar", "w") as tar:
        for i, name in enumerate(["x.png", "x.jpg", "y.png", "y.png"]):  # a repeated key, a repeated name
            add_member(tar, name, png(10 + i))
        for name in ("y.jpg", "../up.png"):  # links take the file rules: a repeated key, an unsafe name
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, "x.png"
            tar.addfile(link)
    with tarfile.open(inp / "n.tar", "w") as tar:
        add_member(tar, "k/z.png", png(20))  # key n/k/z
    with tarfile.open(inp / "n" / "k.tar", "w") as tar:
        add_member(tar, "z.png", png(21))  # key n/k/z again, from an archive below n.tar's key
    with tarfile.open(inp / "l.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        add_member(tar, "café.png", png(22))  # stored as Latin-1 bytes: no UTF-8 name
        add_member(tar, "ok.png", png(23))
    with pytest.raises(JobError, match="share a key"):
        infer(InferSpec(model=model, input=str(inp), output=str(out), source="tar", report=False))
    rows = rows_by_key(out)
    assert [r["status"] for r in rows["dup/(archive)"]] == ["error", "error"]
    assert rows["l/caf\\xe9"][0]["error"].startswith("member file name is not UTF-8 text")
    assert [r["status"] for r in rows["l/ok"]] == ["ok"]
    assert all("key collision: dup.tar and dup.tgz" in r["error"] for r in rows["dup/(archive)"])
    assert sorted(r["status"] for r in rows["m/x"]) == ["error", "ok"]
    assert sorted(r["status"] for r in rows["m/y"]) == ["error", "error", "ok"]
    assert "repeats key 'm/x' of member x.png" in next(r["error"] for r in rows["m/x"] if r["error"])
    assert "member y.jpg repeats key 'm/y'" in " ".join(r["error"] for r in rows["m/y"])
    assert [r["error"].startswith("unsafe member name") for r in rows["m/../up"]] == [True]
    assert [r["status"] for r in rows["n/k/z"]] == ["ok"]
    assert "lies under the key of archive 'n'" in rows["n/k/(archive)"][0]["error"]
    assert masks(out) == {"m/x.png", "m/y.png", "n/k/z.png", "l/ok.png"}


@pytest.mark.slow
def test_parquet_key_column_duplicates_across_files(tiny_model, tmp_path):
    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    pq.write_table(pa.table({"id": ["r0", "r1"], "image": [png(0), png(1)]}), inp / "part-0.parquet")
    # Keys that would name a file outside OUTPUT/masks are error rows, as a listed file's are.
    unsafe = ["../../escape", "../evil", "/abs/x", None]
    ids = ["r1", "r2", *unsafe]
    pq.write_table(pa.table({"id": ids, "image": [png(i) for i in range(2, 2 + len(ids))]}), inp / "part-1.parquet")
    with pytest.raises(JobError, match="share a key"):
        infer(InferSpec(model=model, input=str(inp), output=str(out), key_column="id", report=False))
    rows = rows_by_key(out)
    assert [r["status"] for r in rows["r1"]] == ["error", "error"]
    assert "part-0.parquet row 1 and part-1.parquet row 0 map to key 'r1'" in rows["r1"][0]["error"]
    assert masks(out) == {"r0.png", "r2.png"}
    for key in ("../../escape", "../evil", "/abs/x"):
        assert [r["error"].split(":")[0] for r in rows[key]] == ["unsafe key"], key
    # The null: no key (not 'None'), an error row under its file and row, so that one row per key holds.
    assert [r["error"] for r in rows["part-1/5"]] == [
        "no key: --key-column id is null or empty in part-1.parquet row 5; fill it, then re-run"
    ]
    assert rows["part-1/5"][0]["source_uri"].endswith("in/part-1.parquet#5")
    assert {p.name for p in tmp_path.rglob("*.png")} == {"r0.png", "r2.png"}  # nothing outside masks/


def test_archives_and_tables_a_source_passes_over_are_named(tiny_model, tmp_path, caplog):
    """A tar and a table beside loose images, or zip and bz2 archives under a tar source, were passed over
    without a word: the run reported only the images it read, complete, exit 0. Now it says what it left."""
    import logging

    from raysegment.inference.sources import unread_inputs_note

    _, model = tiny_model
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "p.png").write_bytes(png(0))
    with tarfile.open(mixed / "more.tar", "w") as tar:
        tar.add(mixed / "p.png", arcname="q.png")
    pq.write_table(pa.table({"image": [png(1)]}), mixed / "t.parquet")
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        run = infer(InferSpec(model=model, input=str(mixed), output=str(tmp_path / "out"), report=False))
    assert run["source"] == "files" and run["counts"]["processed"] == 1
    assert "INPUT also holds 2 files not read (more.tar, t.parquet)" in caplog.text
    assert "--source tar or parquet" in caplog.text
    archives = tmp_path / "archives"
    archives.mkdir()
    for name in ("a.tar", "b.tar.bz2", "c.zip"):
        (archives / name).write_bytes(b"")
    note = unread_inputs_note(storage.resolve(str(archives)), "tar")
    assert note is not None and "1 files not read (c.zip)" in note and "repack them" in note  # bz2 tars are read
    assert unread_inputs_note(storage.resolve(str(archives / "a.tar")), "tar") is None  # one file: nothing beside it


def test_a_resumed_run_with_other_mask_settings_says_so(tiny_model, tmp_path, caplog):
    """Resuming with another --mask-format (or TTA, tiles, precision) left PNGs beside packed files, or half
    the rows with TTA, in one OUTPUT without a word. The masks stay (resume keeps what is done); it is said."""
    import logging

    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "a.png").write_bytes(png(0))
    infer(InferSpec(model=model, input=str(inp), output=str(out), report=False))
    (inp / "b.png").write_bytes(png(1))
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        infer(InferSpec(model=model, input=str(inp), output=str(out), report=False))  # the same settings
    assert "other settings" not in caplog.text
    (inp / "c.png").write_bytes(png(2))
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        run = infer(InferSpec(model=model, input=str(inp), output=str(out), report=False, mask_format="packed"))
    assert run["counts"]["processed"] == 1
    assert "wrote its masks with other settings (mask_format png -> packed)" in caplog.text
    assert "--overwrite" in caplog.text


def test_one_archive_is_an_input_and_one_image_gets_advice_that_fits(tiny_model, tmp_path):
    """INPUT naming one .tar was refused even with --source tar, with advice (--source list) that led to
    an iconv message about the archive's bytes. One archive is read as its folder would read it."""
    _, model = tiny_model
    inp = tmp_path / "in"
    inp.mkdir()
    (tmp_path / "a.png").write_bytes(png(0))
    with tarfile.open(inp / "outer.tar.xz", "w:xz") as tar:  # xz and bz2 tars stream as gzip ones do
        tar.add(tmp_path / "a.png", arcname="a.png")
        tar.add(tmp_path / "a.png", arcname="sub/b.png")
    spec = InferSpec(model=model, input=str(inp / "outer.tar.xz"), output=str(tmp_path / "out"), report=False)
    run = infer(spec)
    assert run["source"] == "tar" and sorted(rows_by_key(tmp_path / "out")) == ["outer/a", "outer/sub/b"]
    assert infer(spec)["counts"]["processed"] == 0  # resumed: its member list says all are done
    with pytest.raises(DataError, match=r"a.png: is a file; give a prefix \(folder\), one .tar/.tar.gz archive"):
        infer(InferSpec(model=model, input=str(tmp_path / "a.png"), output=str(tmp_path / "o2"), report=False))


def test_parquet_rows_are_keyed_by_their_own_files_row_numbers(tiny_model, tmp_path):
    """Row keys were numbered over Ray's blocks, which merge small files: a table's second file got keys
    from the first's count (`b/2` for b's only row), and adding a table renumbered the others, so a
    re-run wrote second rows and masks for images already done. Keys are FILE/ROW of the file's own
    rows now, and a dictionary-encoded image column (as writers that share repeated values store it) reads."""
    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    pq.write_table(pa.table({"image": [png(0), png(1)]}), inp / "a.parquet")
    pq.write_table(pa.table({"image": [png(2)]}), inp / "b.parquet")
    spec = InferSpec(model=model, input=str(inp), output=str(out), source="parquet", report=False)
    infer(spec)
    assert sorted(rows_by_key(out)) == ["a/0", "a/1", "b/0"]
    assert rows_by_key(out)["a/1"][0]["source_uri"] == f"{inp}/a.parquet#1"
    shared = pa.array([png(3), png(3), png(4)]).dictionary_encode()
    pq.write_table(pa.table({"image": shared}), inp / "0.parquet", row_group_size=2)
    again = infer(spec)
    assert again["counts"] == {"total": 6, "skipped": 3, "processed": 3, "ok": 3, "error": 0}
    assert sorted(rows_by_key(out)) == ["0/0", "0/1", "0/2", "a/0", "a/1", "b/0"]
    assert masks(out) == {f"{k}.png" for k in rows_by_key(out)}


@pytest.mark.slow
def test_uri_list_duplicates_outputs_and_collisions(tiny_model, tmp_path):
    _, model = tiny_model
    imgs, out = tmp_path / "imgs", tmp_path / "out"
    imgs.mkdir()
    for name, i in [("i0.png", 0), ("c.png", 1), ("c.jpg", 2)]:
        (imgs / name).write_bytes(png(i))
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "old.png").write_bytes(png(3))
    entries = [imgs / "i0.png", imgs / "i0.png", out / "masks" / "old.png", imgs / "c.png", imgs / "c.jpg"]
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in entries))
    with pytest.raises(JobError, match="share a key"):
        infer(InferSpec(model=model, input=str(tmp_path / "list.txt"), output=str(out), report=False))
    rows = {key.rsplit("/", 1)[1]: found for key, found in rows_by_key(out).items()}  # keys are the URIs' paths
    assert [r["status"] for r in rows["i0"]] == ["ok"]  # listed twice, read once
    assert "an output of this job" in rows["old"][0]["error"]
    assert [r["status"] for r in rows["c"]] == ["error", "error"]


def test_a_uri_list_without_entries_or_not_utf8_is_one_error(tmp_path):
    """Refused on the driver before any job starts, naming the list (and the line that is not UTF-8)."""
    empty, comments, latin1 = tmp_path / "empty.txt", tmp_path / "comments.txt", tmp_path / "latin1.txt"
    empty.write_bytes(b"")
    comments.write_text("# nothing yet\n\n   \n")
    latin1.write_bytes(b"/data/a.png\n/data/caf\xe9.png\n")
    for listing in (empty, comments):
        with pytest.raises(DataError, match=f"{listing}: the URI list names no images"):
            list_uris(storage.resolve(str(listing)))
    with pytest.raises(DataError, match=f"{latin1}: line 2 is not UTF-8 text.*iconv"):
        list_uris(storage.resolve(str(latin1)))


# --- outputs never inputs; folders without images --------------------------------------------------


@pytest.mark.slow
def test_output_inside_input_is_refused_before_anything_is_written(tiny_model, tmp_path):
    _, model = tiny_model
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(png(0))
    os.symlink(tmp_path / "in", tmp_path / "alias")
    for output in (tmp_path / "in" / "out", tmp_path / "alias" / "out", tmp_path / "in"):
        with pytest.raises(ConfigError, match="is inside INPUT") as exc:
            infer(InferSpec(model=model, input=str(tmp_path / "in"), output=str(output)))
        assert exc.value.exit_code == 2 and "choose an OUTPUT outside INPUT" in str(exc.value)
    assert sorted(os.listdir(tmp_path / "in")) == ["a.png"]
    # Reading what the job writes is refused too (and --overwrite would delete it).
    (tmp_path / "out" / "masks").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"inside what the job writes under OUTPUT .* \(masks\)"):
        infer(InferSpec(model=model, input=str(tmp_path / "out" / "masks"), output=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="nightly: OUTPUT .* is inside INPUT"):
        nightly.run_nightly(NightlySpec(model=model, input=str(tmp_path / "in"), output=str(tmp_path / "in" / "n")))
    # OUTPUT in MODEL's folder: the run's masks and summaries would be mixed into the model's files.
    model_files = sorted(os.listdir(model))
    for output in (model, os.path.join(model, "out")):
        with pytest.raises(ConfigError, match="is inside MODEL .* choose an OUTPUT outside MODEL"):
            infer(InferSpec(model=model, input=str(tmp_path / "in"), output=output))
        with pytest.raises(ConfigError, match="nightly: OUTPUT .* is inside MODEL"):
            nightly.run_nightly(NightlySpec(model=model, input=str(tmp_path / "in"), output=output))
    assert sorted(os.listdir(model)) == model_files


@pytest.mark.slow
def test_a_folder_without_images_is_one_error(tiny_model, tmp_path):
    _, model = tiny_model
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "only" / "empty").mkdir(parents=True)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "README.txt").write_text("no images here")
    for name in ("empty", "nested", "text"):
        with pytest.raises(DataError, match="no files ending in .png, .jpg.* nothing to infer"):
            infer(InferSpec(model=model, input=str(tmp_path / name), output=str(tmp_path / f"out-{name}")))
        assert not (tmp_path / f"out-{name}" / "_SUCCESS").exists()
    # Refused before OUTPUT changes: an OUTPUT a run completed kept neither its _SUCCESS nor, under --overwrite,
    # its masks, and the refusal's log landed in OUTPUT/logs (README: exit 2 before it began writes nothing).
    done = tmp_path / "done"
    storage.mark_success(storage.resolve(str(done)), {"run_id": "earlier"})
    (done / "masks").mkdir()
    (done / "masks" / "a.png").write_bytes(png(0))
    for flags in ([], ["--overwrite"], ["--retry-errors"]):
        r = CliRunner().invoke(main, ["infer", model, str(tmp_path / "empty"), str(done), *flags])
        assert r.exit_code == 2 and "nothing to infer" in r.output and "log:" not in r.output, r.output
        assert sorted(os.listdir(done)) == ["_SUCCESS", "masks"] and os.listdir(done / "masks") == ["a.png"]
    # Archives without an image member are read by tasks: the run fails at its end, not "0 images, ok".
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "notes.tar", "w") as tar:
        tar.add(tmp_path / "text" / "README.txt", arcname="README.txt")
    with pytest.raises(JobError, match=r"INPUT .*tars held no images \(tar source\)"):
        infer(InferSpec(model=model, input=str(tmp_path / "tars"), output=str(tmp_path / "out-tars"), source="tar"))
    assert not (tmp_path / "out-tars" / "_SUCCESS").exists()


@pytest.mark.slow
def test_nightly_refuses_colliding_keys_before_inference(tiny_model, tmp_path):
    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "n"
    inp.mkdir()
    for name, i in [("a.png", 0), ("a.jpg", 1), ("b.png", 2)]:
        (inp / name).write_bytes(png(i))
    with pytest.raises(JobError, match="2 inputs share keys: key collision: a.jpg and a.png"):
        nightly.run_nightly(NightlySpec(model=model, input=str(inp), output=str(out), date="2026-01-01"))
    report = json.loads((out / "reports" / "2026-01-01.json").read_text())
    assert (report["status"], report["exit_code"]) == ("failed", 3) and "a.jpg and a.png" in report["problem"]
    assert not (out / "date=2026-01-01").exists() and not (out / "ledger").exists()
    assert not (out / "_nightly.lock").exists()


# --- specs, keys, clocks, deadlines (no Ray) ---------------------------------------------------------


def test_a_night_after_tomorrow_is_refused_with_the_rule_it_breaks():
    """The day after tomorrow was refused as "in the future; a night's date is today ... or an earlier one",
    while tomorrow (also in the future) passed: the message contradicted the rule it enforced."""
    tomorrow = datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)
    spec = {"model": "m", "input": "/in", "output": "/out"}
    assert load_spec(NightlySpec, overrides={**spec, "date": tomorrow.isoformat()}).date == tomorrow.isoformat()
    after = (tomorrow + datetime.timedelta(days=1)).isoformat()
    with pytest.raises(ConfigError) as refused:
        load_spec(NightlySpec, overrides={**spec, "date": after})
    assert f"date': {after} is after tomorrow ({tomorrow}, UTC); a night's date is at most tomorrow's in UTC" in str(
        refused.value
    )


def test_keys_with_empty_segments_are_unsafe():
    # 'a//b' would write the mask of 'a/b' on a local output.
    assert "empty segment" in unsafe_key_reason("a//b") and "empty segment" in unsafe_key_reason("a/")
    assert unsafe_key_reason(".png") is None and unsafe_key_reason(NFD) is None


def write_lock(loc: storage.Location, created_ts: float) -> None:
    body = {"owner": "other", "host": "elsewhere", "pid": 1, "created": "?", "created_ts": created_ts}
    storage.write_bytes(loc, json.dumps(body).encode())


def test_a_lock_is_aged_by_the_store_not_by_its_writers_clock(tmp_path):
    loc = storage.resolve(str(tmp_path / "_nightly.lock"))
    # Written by a host whose clock is ten years ahead: live now, stale once its real age passes.
    write_lock(loc, time.time() + 10 * 365 * 86400)
    with pytest.raises(LockedError, match="another run holds the lock"):
        RunLock(loc, stale_after_s=3600).acquire()
    with RunLock(loc, stale_after_s=3600, now=lambda: time.time() + 7200) as taker:
        assert json.loads(storage.read_bytes(loc))["owner"] == taker.owner
    # Written by a host whose clock lags ten years: still live, never taken over at once.
    write_lock(loc, time.time() - 10 * 365 * 86400)
    with pytest.raises(LockedError, match=r"\d+ s old by the store's clock"):
        RunLock(loc, stale_after_s=3600).acquire()
    # An empty lock (a create caught before its write) is a held lock, not a free one.
    storage.write_bytes(loc, b"")
    with pytest.raises(LockedError):
        RunLock(loc, stale_after_s=3600).acquire()


@pytest.fixture
def unreachable(monkeypatch) -> storage.Location:
    """OUTPUT on an S3 endpoint nobody listens on, with a 1 s storage deadline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    return storage.resolve("s3://nowhere/out", endpoint_url=f"http://127.0.0.1:{port}", retry_s=1)


@pytest.mark.parametrize(
    "step",
    [
        lambda out: RunLock(out.child(nightly.LOCK_NAME), stale_after_s=3600).acquire(),
        lambda out: nightly.previous_report(out.child("reports"), "2026-01-02"),
    ],
    ids=["lock", "reports"],
)
def test_nightly_storage_calls_keep_the_jobs_deadline(unreachable, step):
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"still failing after \d+ attempts over 1s") as exc:
        step(unreachable)
    assert exc.value.transient and time.monotonic() - t0 < 60


def test_a_parquet_uri_lists_rows_without_a_uri_are_error_rows(tmp_path):
    """A row that names a key is an input: with a null or empty uri it is an error row under that key, not
    dropped as a text list's blank line is (such keys silently had no row); a row without a key keeps the text
    list's rule (blank and '#' rows skipped)."""
    from raysegment.inference import urilist

    listing = tmp_path / "list.parquet"
    table = pa.table({"uri": ["a.png", None, "", "#b.png", "", "# note"], "key": ["a", "c", "d", "e", None, ""]})
    pq.write_table(table, listing)
    (block,) = list(urilist._blocks(storage.resolve(str(listing))))
    assert block.keys == ["a", "c", "d", "e"]  # rows without a key keep the text list's rule: blank, comment
    assert block.errors == ["", "row 1 of the list has no uri", "row 2 of the list has no uri", ""]
    assert block.paths[3].endswith("/#b.png")
    # An integer key column: 0 is a key like any other (it was taken for 'no key').
    pq.write_table(pa.table({"uri": ["a.png", None, "b.png"], "key": [0, 0, 1]}), listing)
    (block,) = list(urilist._blocks(storage.resolve(str(listing))))
    assert block.keys == ["0", "0", "1"] and block.errors[1] == "row 1 of the list has no uri"


def test_a_file_localhost_uri_in_a_list_is_the_local_absolute_path(tmp_path):
    """`file://localhost/PATH` is /PATH (RFC 8089); it was read as the relative `localhost/PATH` below the
    list's folder, so the image was never found, and as an argument below the current folder. `file:///`
    URIs are percent-decoded, as `Path.as_uri()` writes them."""
    from raysegment.inference import urilist

    image = tmp_path / "imgs" / "x.png"
    image.parent.mkdir()
    image.write_bytes(png(0))
    listing = tmp_path / "lists" / "list.txt"
    listing.parent.mkdir()
    listing.write_text(f"file://localhost{image}\nFILE://LOCALHOST{image}\nfile://{image}\nfile://rel/y.png\n")
    spaced = tmp_path / "imgs" / "a b é.png"  # Path.as_uri() percent-encodes it: file:///.../a%20b%20%C3%A9.png
    with listing.open("a") as f:
        f.write(f"{spaced.as_uri()}\n")
    (block,) = list(urilist._blocks(storage.resolve(str(listing))))
    assert block.paths == [str(image)] * 3 + [str(listing.parent / "rel" / "y.png"), str(spaced)]
    assert block.keys[:3] == [str(image.with_suffix("")).lstrip("/")] * 3  # the key of the plain path
    # A comment after an entry is no extension: its line keeps a key of its own, not x.png's (both were
    # collision rows, and x.png got no mask).
    listing.write_text(f"{image}\n{image}  # the first slide\n")
    (block,) = list(urilist._blocks(storage.resolve(str(listing))))
    assert len(set(block.keys)) == 2 and block.keys[0] == str(image.with_suffix("")).lstrip("/")
    # As an argument too (OUTPUT was written below ./localhost/ of the current folder); file://P stays literal.
    assert storage.resolve(f"file://localhost{tmp_path}/o").path == f"{tmp_path}/o"
    assert storage.resolve(spaced.as_uri()).path == str(spaced)
    assert storage.resolve("file://x%20y").path == os.path.abspath("x%20y")


def test_a_parquet_table_with_the_wrong_columns_is_named_before_the_run(ray_cluster, tmp_path):
    """The columns offered are the file's (Ray's own `path` was listed as one), and a text column given as
    --image-column is refused (every row was an 'empty or missing image bytes' error row, exit 0)."""
    from raysegment.inference.sources import read_parquet_table

    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"img": [png(0)], "name": ["a"]}), tmp_path / "t" / "part.parquet")
    root = storage.resolve(str(tmp_path / "t"))
    with pytest.raises(DataError, match=r"Parquet columns are \['img', 'name'\] in part.parquet; set --image-column"):
        read_parquet_table(root, "image", None)
    with pytest.raises(DataError, match="column 'name' holds string in part.parquet, not the images' encoded bytes"):
        read_parquet_table(root, "name", None)
    assert read_parquet_table(root, "img", None).count() == 1


def test_a_run_where_no_input_could_be_segmented_fails(tiny_model, tmp_path):
    """Every input an error row (files that are no images, the wrong model for them) passed as a complete
    output with exit 0 under the default --max-error-fraction 1.0. It now fails, and so does every re-run,
    until an input is segmented; one good input among bad ones passes as before."""
    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for name in ("a.png", "b.jpg"):
        (inp / name).write_bytes(b"not an image at all")
    spec = InferSpec(model=model, input=str(inp), output=str(out), report=False)
    for _ in range(2):  # the re-run reads nothing new and fails on what OUTPUT holds
        with pytest.raises(JobError, match="none of the 2 inputs in OUTPUT could be segmented"):
            infer(spec)
        assert not (out / "_SUCCESS").exists()
    (inp / "c.png").write_bytes(png(3))
    assert infer(spec)["counts"] == {"total": 3, "skipped": 2, "processed": 1, "ok": 1, "error": 0}
    assert (out / "_SUCCESS").exists()


def test_retry_errors_redoes_only_the_error_rows(tiny_model, tmp_path, monkeypatch):
    """Error rows were never retried: a fixed image kept its error row on every resume, and only
    --overwrite (redoing every image) cleared it. --retry-errors drops the error rows first (a file with ok
    rows too is replaced, as compaction replaces files; one of errors alone is deleted), then resumes."""
    from raysegment.inference import pipeline
    from raysegment.inference.output import summary_files
    from raysegment.inference.sources import source_rows

    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "a.png").write_bytes(b"damaged")
    (inp / "b.png").write_bytes(png(1))
    spec = InferSpec(model=model, input=str(inp), output=str(out), report=False)
    infer(spec)  # a summary file of one ok row and one error row
    (inp / "d.png").write_bytes(b"damaged too")
    infer(spec)  # a summary file of one error row
    for name in ("a.png", "d.png"):
        (inp / name).write_bytes(png(2))
    assert infer(spec)["counts"]["processed"] == 0  # a plain resume keeps the error rows
    ok_before = next(r for r in summaries(out) if r["key"] == "b")
    # INPUT is listed once, against the index without the error rows: once the rows were dropped it was listed
    # again (its warnings twice, a second tally actor).
    listed = []
    monkeypatch.setattr(pipeline, "source_rows", lambda *a, **k: listed.append(1) or source_rows(*a, **k))
    record = infer(spec.model_copy(update={"retry_errors": True}))
    assert len(listed) == 1
    assert record["counts"] == {"total": 3, "skipped": 1, "processed": 2, "ok": 2, "error": 0}
    rows = rows_by_key(out)
    assert sorted(rows) == ["a", "b", "d"] and all(len(r) == 1 and r[0]["status"] == "ok" for r in rows.values())
    assert rows["b"][0] == ok_before  # the ok row kept as it was, not redone
    assert masks(out) == {"a.png", "b.png", "d.png"} and (out / "_SUCCESS").exists()
    assert len(summary_files(storage.resolve(str(out)))) == 2  # b's replacement, and this run's file
    with pytest.raises(ValueError, match="give one of them"):
        InferSpec(model=model, input=str(inp), output=str(out), retry_errors=True, overwrite=True)


def test_inflated_inputs_and_devices_are_refused_unread(tiny_model, tmp_path):
    """A 1 MB .tar.gz holding a 1 GiB member and a 43 KB zstd table holding a 1 GiB value took a read task to
    4-6 GB, and a device listed as an input (/dev/zero) was read without end. Each is now its own error row,
    the tar member and the table's values judged by the sizes their headers give (--max-input-mb) before any
    is inflated, and the good inputs beside them are segmented."""
    _, model = tiny_model
    zeros = bytes(3 << 20)  # 3 MiB: over --max-input-mb 1

    def run(name: str, source: str, **extra) -> dict[str, list[dict]]:
        out = tmp_path / f"out-{name}"
        spec = InferSpec(
            model=model, input=str(tmp_path / name), output=str(out), source=source, max_input_mb=1, report=False
        )
        infer(spec.model_copy(update=extra))
        return {k: v[0] for k, v in rows_by_key(out).items()}

    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "t.tar.gz", "w:gz") as tar:
        add_member(tar, "big.png", zeros)
        add_member(tar, "small.png", png(0))
    rows = run("tars", "tar")
    assert "over --max-input-mb 1 (3145728 bytes" in rows["t/big"]["error"]
    assert rows["t/small"]["status"] == "ok"

    (tmp_path / "tables").mkdir()
    schema = pa.schema([("image", pa.binary()), ("id", pa.string())])
    with pq.ParquetWriter(tmp_path / "tables" / "t.parquet", schema, compression="zstd") as writer:
        writer.write_table(pa.table({"image": [zeros, png(1)], "id": ["bomb", "beside"]}, schema=schema))
        writer.write_table(
            pa.table({"image": [bytes(3 << 19), png(2), png(3), png(4)], "id": ["big", "c", "d", "e"]}, schema=schema)
        )
    assert (tmp_path / "tables" / "t.parquet").stat().st_size < 100_000
    rows = run("tables", "parquet", key_column="id")
    # The first group decompresses to over 1 MiB a row: not read, its rows keyed from the key column alone.
    assert all("row group 0 of t.parquet" in rows[k]["error"] for k in ("bomb", "beside"))
    assert "over --max-input-mb 1 (1572864 bytes" in rows["big"]["error"]  # read with its group, then refused
    assert [rows[k]["status"] for k in "cde"] == ["ok"] * 3

    # Files (one read path for a files source and a list): by their size, and a device not at all.
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "big.png").write_bytes(zeros)
    (tmp_path / "files" / "ok.png").write_bytes(png(5))
    (tmp_path / "list.txt").write_text(f"/dev/zero\n{tmp_path}/files/ok.png\n{tmp_path}/files/big.png\n")
    rows = {k.rsplit("/", 1)[-1]: v for k, v in run("list.txt", "list").items()}
    assert "over --max-input-mb 1 (3145728 bytes" in rows["big"]["error"]
    assert "a device or socket, not a file" in rows["zero"]["error"] and rows["ok"]["status"] == "ok"


def test_two_infer_runs_into_one_output_do_not_overlap(tiny_model, tmp_path):
    """Two runs started into one OUTPUT at once each wrote every key: 160 rows for 80 images under one
    _SUCCESS, and every later run failed as a key collision. A run holds OUTPUT's lock; a second is refused
    (exit 5) before it reads or changes anything, and the lock goes with the run that held it."""
    from raysegment.inference.output import RUN_LOCK

    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for i in range(3):
        (inp / f"i{i}.png").write_bytes(png(i))
    spec = InferSpec(model=model, input=str(inp), output=str(out), report=False)
    other = RunLock(storage.resolve(str(out / RUN_LOCK)), 120, purpose="infer run into this OUTPUT")
    with other:  # the first run, as the second finds it
        with pytest.raises(LockedError, match="another infer run into this OUTPUT holds the lock") as refused:
            infer(spec)
        assert refused.value.exit_code == 5 and sorted(os.listdir(out)) == [RUN_LOCK]
    assert infer(spec)["counts"]["ok"] == 3
    assert not (out / RUN_LOCK).exists() and all(len(v) == 1 for v in rows_by_key(out).values())


def test_an_infer_into_a_locked_output_is_refused_before_ray_starts(tmp_path):
    """It started a whole local Ray (10-24 s of raylet, GCS and dashboard beside the live run) before reading
    OUTPUT's run lock. Here Ray cannot start at all (its temp folder is a file): the refusal must come first."""
    from raysegment.inference.output import RUN_LOCK

    model, inp, out = hashed_model(tmp_path / "model"), tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "a.png").write_bytes(png(0))
    out.mkdir()
    stderr = run_into_held_lock("InferSpec", out / RUN_LOCK, model, inp, out, tmp_path)
    assert "REFUSED False" in stderr, stderr[-2000:]
    assert f"pid {os.getpid()}" in stderr and sorted(os.listdir(out)) == [RUN_LOCK]  # its log kept out too


def test_retry_errors_refused_by_a_compaction_keeps_its_log_out_of_output(ray_cluster, tmp_path):
    """A compaction holding the summaries' rewrite lock refuses `--retry-errors` (exit 5) before anything
    changes, yet the run counted as begun: its log went into OUTPUT/logs and its path was printed, as was every
    exit-5 refusal's. It stays out, _SUCCESS stays."""
    from raysegment.inference.compact import rewrite_lock

    model, inp, out = hashed_model(tmp_path / "model"), tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "a.png").write_bytes(png(0))
    storage.mark_success(storage.resolve(str(out)), {"run_id": "earlier"})
    (out / "summaries").mkdir()
    with rewrite_lock(storage.resolve(str(out))):
        r = CliRunner().invoke(main, ["infer", model, str(inp), str(out), "--retry-errors"])
        assert r.exit_code == 5 and "another summary rewrite holds the lock" in r.output, r.output
        assert "log:" not in r.output  # a refusal is its one error line
        assert sorted(os.listdir(out)) == ["_SUCCESS", "summaries"]


def test_a_lock_whose_process_is_dead_is_taken_over_at_once(tmp_path):
    """A SIGKILLed driver leaves its lock; its re-run on the same machine takes it over at once instead of
    waiting out the stale age, as it does a lock this process left when its release failed (the store down
    as the run failed; the next run in the process was refused). A live holder, or one on another machine,
    still holds."""
    import subprocess
    import sys

    from raysegment.lock import machine_id

    loc = storage.resolve(str(tmp_path / "_infer.lock"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid, machine, held in (
        (int(gone.stdout), machine_id(), False),
        (os.getpid(), machine_id(), False),  # this process, but no `with` block of it holds that owner's lock
        (os.getppid(), machine_id(), True),
    ):
        body = {"owner": "other", "host": socket.gethostname(), "pid": pid, "created_ts": time.time()}
        storage.write_bytes(loc, json.dumps(body | {"machine": machine}).encode())
        if held:
            with pytest.raises(LockedError, match="another run holds the lock"):
                RunLock(loc, stale_after_s=3600).acquire()
        else:
            with RunLock(loc, stale_after_s=3600) as taker:
                assert json.loads(storage.read_bytes(loc))["owner"] == taker.owner
    write_lock(loc, time.time())  # another machine's: it ages out, whatever its pid
    with pytest.raises(LockedError):
        RunLock(loc, stale_after_s=3600).acquire()
    # A holder finds out that its lock was taken over (infer then fails instead of writing _SUCCESS).
    storage.remove_tree(loc)
    with RunLock(loc, stale_after_s=3600) as mine:
        assert mine.still_held()
        write_lock(loc, time.time())
        assert not mine.still_held()


def test_a_stray_parquet_file_in_summaries_is_named_not_damaged(tiny_model, tmp_path):
    """Someone's DuckDB export saved in summaries/: `report` ended in a KeyError traceback and `infer` called
    the healthy file damaged, with Arrow's internals in the message. Both now name it and the fix."""
    from raysegment.report import write_run_report

    _, model = tiny_model
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "a.png").write_bytes(png(0))
    spec = InferSpec(model=model, input=str(inp), output=str(out), report=False)
    infer(spec)
    pq.write_table(pa.table({"a": [1, 2]}), out / "summaries" / "analysis.parquet")
    for job in (lambda: write_run_report(str(out), samples=2), lambda: infer(spec)):
        with pytest.raises(DataError, match=r"analysis.parquet: not a raysegment summary \(columns \['a'\]"):
            job()


def test_parquet_rows_sharing_one_value_are_read_once_and_blocked_by_bytes(tmp_path, monkeypatch):
    """A dictionary-encoded image column lets many rows share one stored value: 20 MB of file took 2 GB for
    each block read, as every row's copy is whole, and the footer's size counted the value once. The column
    is now read as its dictionary, blocks are cut at PARQUET_BLOCK_BYTES of image bytes, and a value over
    --max-input-mb is refused by its length before any row copies it."""
    import dataclasses

    from raysegment.inference import sources

    monkeypatch.setattr(sources, "PARQUET_BLOCK_BYTES", 20 << 20)
    big, small = bytes(8 << 20), png(1)  # 8 MiB of zeros: a few KB once compressed
    index = [0] * 60 + [1, 0, 1, 0]
    column = pa.DictionaryArray.from_arrays(pa.array(index, pa.int32()), pa.array([big, small]))
    table = pa.table({"image": column, "id": [f"k{i}" for i in range(64)]})
    pq.write_table(table, tmp_path / "t.parquet", store_schema=False)  # no Arrow schema (as Spark writes)
    assert (tmp_path / "t.parquet").stat().st_size < 1_000_000
    root = storage.resolve(str(tmp_path))
    (group,) = sources._row_groups(root, "image", "id")
    assert group.dictionary and group.rows == 64 and group.image_bytes < 10 << 20  # the footer counts it once
    batch = {k: [v] for k, v in dataclasses.asdict(group).items()}

    def blocks(max_bytes):
        for block in sources.read_row_groups(batch, root, "image", "id", {}, max_bytes):
            yield block, pa.total_allocated_bytes()

    held, sizes, keys, same = [], [], [], {}
    for block, in_pool in blocks(64 << 20):  # each block let go before the next: 8 MiB values add up
        held.append(in_pool)
        sizes.append(sum(len(b) for b in block["bytes"]))
        keys += list(block["key"])
        same.update({k: b == (small if k in ("k60", "k62") else big) for k, b in zip(block["key"], block["bytes"])})
    # Read densely, one block of 64 rows held 512 MiB in Arrow's pool; as a dictionary it holds one copy.
    assert max(held) < 64 << 20
    assert max(sizes) <= 20 << 20 and sizes[:2] == [16 << 20, 16 << 20]
    assert keys == [f"k{i}" for i in range(64)] and all(same.values())

    # Over --max-input-mb: refused by length (no copy made), so the small rows share one block.
    (refused,) = [block for block, _ in blocks(1 << 20)]
    errors = dict(zip(refused["key"], refused["error"]))
    assert "over --max-input-mb 1 (8388608 bytes" in errors["k0"] and errors["k60"] == errors["k62"] == ""


# --- tar headers and members that tarfile holds, and local reads past fstat --------------------------------


def tar_block(kind: bytes, body: bytes, name: str = "././@PaxHeader", fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    """One raw tar entry: a header of type `kind` and its body, padded to whole blocks."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(body)
    return info.tobuf(format=fmt) + body + bytes(-len(body) % tarfile.BLOCKSIZE)


def pax(**records: str) -> bytes:
    """A pax header's body: records '<length> <key>=<value>\\n', the length counting itself."""
    out = b""
    for key, value in records.items():
        rest = f" {key}={value}\n".encode()
        length = len(rest) + len(str(len(rest)))
        out += str(length + (len(str(length)) > len(str(len(rest))))).encode() + rest
    return out


def archive_rows(path, max_bytes: int = 1 << 20) -> list[tuple[str, str]]:
    """(key, error) of the rows one archive yields, read as a tar source's read task reads it."""
    from raysegment.inference import sources
    from raysegment.inference.archives import Archive

    archive = Archive(str(path), path.stat().st_size, "v1")
    rows = sources._archive_rows(
        storage.resolve(str(path.parent)), "t", archive, (".png",), None, frozenset(), max_bytes
    )
    return [(k, e) for block in rows for k, e in zip(block["key"], block["error"])]


def test_tar_headers_over_their_limits_end_the_archive_with_an_error_row(tmp_path):
    """A 1 MB .tar.gz holding a 1000 MB pax header took a read task to 3.1 GB: tarfile reads a header whole
    before --max-input-mb sees its member. A GNU long name did the same and then renamed the image after it,
    which vanished without a row. Headers are now held to archives.MAX_TAR_HEADER_BYTES (global ones and
    chains too), checked before tarfile reads them; a damaged header mid-archive (tarfile takes it for the
    end) and one tarfile cannot parse (a ValueError that failed the task) end the archive the same way: one
    error row naming it, the members before it kept."""
    import gzip
    import tracemalloc

    huge = 8 << 20  # over the 1 MiB limit; a few KB once compressed
    a, b = tar_block(tarfile.REGTYPE, png(1), "a.png"), tar_block(tarfile.REGTYPE, png(2), "b.png")
    hostile = {
        "pax": (tar_block(tarfile.XHDTYPE, pax(comment="a" * huge)), "hold over 1 MiB"),
        "gnu": (tar_block(tarfile.GNUTYPE_LONGNAME, b"a" * huge + b".png\0", "././@LongLink"), "hold over 1 MiB"),
        "global": (tar_block(tarfile.XGLTYPE, pax(comment="g" * (20 << 10))), "global pax headers over 16 KiB"),
        "chain": (tar_block(tarfile.XHDTYPE, pax(comment="c")) * 17, "over 16 tar headers in front of one member"),
        "damaged": (b"\x01" * tarfile.BLOCKSIZE, f"damaged tar header at byte {len(a)} (invalid header)"),
        "sparse": (tar_block(tarfile.XHDTYPE, pax(**{"GNU.sparse.size": "zz"})), "damaged tar header (ValueError"),
    }
    for name, (blocks, error) in hostile.items():
        path = tmp_path / f"{name}.tar.gz"
        path.write_bytes(gzip.compress(a + blocks + b + bytes(2 * tarfile.BLOCKSIZE)))
        assert path.stat().st_size < 100_000
        tracemalloc.start()
        rows = archive_rows(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert [k for k, _ in rows] == ["t/a", "t/(archive)"] and rows[0][1] == "", name  # b is not read
        assert rows[1][1].startswith(f"cannot read archive {name}.tar.gz: TarHeaderError: "), name
        assert error in rows[1][1] and "the rest of the archive is not read" in rows[1][1], name
        assert peak < 1 << 20, name  # the 8 MiB headers were never read (they took 24-41 MB)

    # Real headers pass: a long GNU name, a pax path and link, a global header as git archive writes one.
    long = "d/" * 150 + "x.png"
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, long, png(3))
    with open(good, "rb") as f:
        gnu = f.read().rstrip(b"\0")
    gnu += bytes(-len(gnu) % tarfile.BLOCKSIZE)
    git = tar_block(tarfile.XGLTYPE, pax(comment="3f2a" * 10), "pax_global_header")
    link = tar_block(tarfile.XHDTYPE, pax(path=f"p/{long}", linkpath=long)) + tar_block(tarfile.SYMTYPE, b"", "l")
    path_only = tar_block(tarfile.XHDTYPE, pax(path=f"q/{long}")) + tar_block(tarfile.REGTYPE, png(4), "q.png")
    good.write_bytes(git + gnu + link + path_only + bytes(2 * tarfile.BLOCKSIZE))
    rows = dict(archive_rows(good))
    key = f"t/{long.removesuffix('.png')}"
    assert sorted(rows) == sorted([key, f"t/p/{key[2:]}", f"t/q/{key[2:]}"])
    assert rows[key] == rows[f"t/q/{key[2:]}"] == "" and "not followed" in rows[f"t/p/{key[2:]}"]


def test_a_compressed_archive_is_inflated_only_as_far_as_it_is_read(tmp_path):
    """tarfile's stream inflated each 10 KB of an archive in one call, whatever it held, and copied what was
    left on every later read: 311 bytes of .tar.bz2 holding a 200 MB member of zeros took over 5 minutes, and
    323 bytes holding a 200 MB pax header 780 MB (refused, but inflated first). Archives are now inflated by
    Python's gzip, bz2 and lzma readers, only as far as tarfile reads."""
    import bz2
    import gzip
    import lzma
    import tracemalloc

    body = tar_block(tarfile.REGTYPE, bytes(16 << 20), "zeros.bin") + tar_block(tarfile.REGTYPE, png(1), "a.png")
    fast = {
        "tar.gz": lambda b: gzip.compress(b, 1),
        "tar.bz2": bz2.compress,
        "tar.xz": lambda b: lzma.compress(b, preset=0),
    }
    for ext, compress in fast.items():
        path = tmp_path / f"z.{ext}"
        path.write_bytes(compress(body + bytes(2 * tarfile.BLOCKSIZE)))
        tracemalloc.start()
        rows = archive_rows(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert rows == [("t/a", "")], ext
        assert peak < 2 << 20, ext  # each took 31-52 MB


def test_a_tar_archive_on_a_named_pipe_is_read_as_a_stream(tmp_path):
    """README: a named pipe is read as `cat` reads one. archives.open_stream read the first bytes to tell the
    compression and sought back, which a pipe refuses ("File or stream is not seekable"); the bytes read are now
    put back in front of the stream, for plain and gzip tars alike."""
    import gzip
    import threading

    from raysegment.inference.archives import open_stream

    body = tar_block(tarfile.REGTYPE, png(1), "a.png") + tar_block(tarfile.REGTYPE, png(2), "b.png")
    body += bytes(2 * tarfile.BLOCKSIZE)
    for name, data in (("plain.tar", body), ("packed.tar.gz", gzip.compress(body))):
        path = tmp_path / name
        os.mkfifo(path)

        def write(path=path, data=data) -> None:
            try:
                with open(path, "wb") as w:
                    w.write(data)
            except BrokenPipeError:  # the reader gave up: its assertion says why
                pass

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        with open(path, "rb") as f, open_stream(f) as tar:  # a pipe: opened when its writer comes
            got = {m.name: tar.extractfile(m).read() for m in tar}
        writer.join(10)
        assert got == {"a.png": png(1), "b.png": png(2)}, name


def test_a_tar_stream_keeps_no_member_it_has_passed(tmp_path):
    """In stream mode tarfile still kept every member's TarInfo: 1M empty members (a 4.7 MB .tar.gz) took a
    read task to +440 MB. Members are now dropped as the stream passes them."""
    import gzip
    import tracemalloc

    members = b"".join(tar_block(tarfile.REGTYPE, b"", f"d/{i:06d}.txt") for i in range(10_000))
    path = tmp_path / "many.tar.gz"
    path.write_bytes(gzip.compress(members + tar_block(tarfile.REGTYPE, png(1), "a.png") + bytes(1024)))
    tracemalloc.start()
    rows = archive_rows(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows == [("t/a", "")]
    assert peak < 1 << 20  # 10,000 TarInfos held 6 MB


def test_a_local_read_stops_at_the_limit_whatever_fstat_said(tmp_path):
    """A local file was judged by its fstat size, then read to its end: a /proc file (size 0) or a file that
    grew after the check got past --max-input-mb. It is now read up to the limit and a byte, and refused past it."""
    from raysegment.inference import rasters

    status = storage.resolve("/proc/self/status")  # size 0, over 100 bytes
    assert os.stat(status.path).st_size == 0
    with pytest.raises(OSError, match=r"over --max-input-mb .*\(larger than that"):
        rasters.read_input(status, None, 100)
    assert len(rasters.read_input(status, None, 1 << 20)) > 100
    (tmp_path / "a.png").write_bytes(png(1))
    exact = storage.resolve(str(tmp_path / "a.png"))
    assert rasters.read_input(exact, None, len(png(1))) == png(1)
    with pytest.raises(OSError, match=r"over --max-input-mb .*\(\d+ bytes"):
        rasters.read_input(exact, None, len(png(1)) - 1)  # refused by its size, unread
