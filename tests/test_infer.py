"""`infer`: sources, resume without duplicates, overwrite, actor failure, packed masks, error budget."""

import io
import json
import os
import signal
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from helpers import (
    PipeBarrier,
    assert_one_row_and_mask_per_key,
    has_summary,
    in_background,
    png,
    summaries,
    wait_for,
    write_images,
)
from PIL import Image

from raysegment import storage
from raysegment.config import InferSpec
from raysegment.errors import DataError, JobError
from raysegment.inference import output as layout
from raysegment.inference import resume
from raysegment.inference.archives import Archive
from raysegment.inference.pipeline import CountedMembers, infer

pytestmark = pytest.mark.slow


def test_resume_skips_done_keys_and_overwrite_redoes_all(tiny_model, tmp_path):
    _, model = tiny_model
    keys = write_images(tmp_path / "in", 12)
    out = str(tmp_path / "out")
    first = infer(InferSpec(model=model, input=str(tmp_path / "in"), output=out, batch_size=4))
    assert first["counts"]["processed"] == 12
    assert 0 < first["first_batch"]["seconds"] <= first["seconds"] and 0 < first["first_batch"]["rows"] <= 12
    keys += write_images(tmp_path / "in", 3, start=12)
    second = infer(InferSpec(model=model, input=str(tmp_path / "in"), output=out, batch_size=4))
    assert second["counts"] == {"total": 15, "skipped": 12, "processed": 3, "ok": 3, "error": 0}
    assert_one_row_and_mask_per_key(out, keys)
    # Another INPUT into the same OUTPUT: the counts are its own inputs' (one done, one new), not OUTPUT's
    # 15 rows ("inferred 1 image; 15 already done", total 16, before).
    other = write_images(tmp_path / "in2", 1, start=14) + write_images(tmp_path / "in2", 1, start=20)
    fed = infer(InferSpec(model=model, input=str(tmp_path / "in2"), output=out, batch_size=4))
    assert fed["counts"] == {"total": 2, "skipped": 1, "processed": 1, "ok": 1, "error": 0}
    assert_one_row_and_mask_per_key(out, [*keys, other[1]])
    third = infer(InferSpec(model=model, input=str(tmp_path / "in"), output=out, batch_size=4, overwrite=True))
    assert third["counts"]["processed"] == 15
    rows = summaries(out)
    assert {r["run_id"] for r in rows} == {third["run_id"]}
    assert_one_row_and_mask_per_key(out, keys)


def test_other_model_output_is_refused(tiny_model, tmp_path):
    _, model = tiny_model
    write_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    infer(InferSpec(model=model, input=str(tmp_path / "in"), output=str(out)))
    part = next((out / "summaries").rglob("*.parquet"))
    table = pq.read_table(part)
    table = table.set_column(
        table.schema.get_field_index("model_sha256"), "model_sha256", pa.array(["f" * 64] * table.num_rows)
    )
    pq.write_table(table, part)
    with pytest.raises(DataError, match="holds results of another model"):
        infer(InferSpec(model=model, input=str(tmp_path / "in"), output=str(out)))


def test_killed_actor_and_rerun_leave_one_row_per_key(tiny_model, ray_cluster, tmp_path):
    """SIGKILL the predictor actor after the first committed summary: Ray restarts it, re-runs its
    batches, and the job still completes exactly. A named pipe among the inputs holds the job
    until the kill is done, so the job cannot finish first however fast or slow the machine."""
    _, model = tiny_model
    keys = write_images(tmp_path / "in", 120)
    out = str(tmp_path / "out")
    with PipeBarrier(tmp_path / "in" / "zz-barrier" / "hold.png") as barrier:
        job = in_background(
            lambda: infer(InferSpec(model=model, input=str(tmp_path / "in"), output=out, batch_size=2, summary_rows=2))
        )
        wait_for(lambda: has_summary(out), "the first committed summary", job=job)

        def predictor_pid() -> int | None:
            alive = ray.util.state.list_actors(address=ray_cluster.address, filters=[("state", "=", "ALIVE")])
            return next((a.pid for a in alive if "Predictor" in a.class_name), None)

        os.kill(wait_for(predictor_pid, "a live predictor actor", job=job), signal.SIGKILL)
        barrier.release(job)
        record = job.result(timeout=600)
    assert record["counts"]["total"] == 121
    assert_one_row_and_mask_per_key(out, keys, unreadable=("zz-barrier/hold",))


def test_a_skip_counted_again_by_a_retried_task_counts_once_and_a_dead_tally_fails_nothing(ray_cluster, tmp_path):
    """Ray runs a filter task again when its worker dies (or rebuilds its block from the lineage): its count of
    done inputs was added again, inflating `skipped` and `total`. And once the tally's actor had died, every
    filter task failed, so the run did, over a number only for the record."""
    done = [ray.put(np.sort(resume.digests(["a", "b", "t/1"])))]
    batch = {"key": np.array(["a", "b", "c"])}
    output = storage.resolve(str(tmp_path / "out"))
    archive = Archive(str(tmp_path / "t.tar"), 10, "v1")
    CountedMembers(output, done).record(archive, ["t/1", "t/2"])
    tally = resume.start_tally()
    for _ in range(2):  # a task, then Ray's run of it again (each with its own copy of the arguments)
        assert resume.drop_done(dict(batch), [done], tally)["key"].tolist() == ["c"]
        assert CountedMembers(output, done, tally).done_members(archive) == {"t/1"}
    assert resume.skipped_total(tally) == 3
    ray.kill(tally)
    assert resume.drop_done(dict(batch), [done], tally)["key"].tolist() == ["c"]
    assert CountedMembers(output, done, tally).done_members(archive) == {"t/1"}
    assert resume.skipped_total(tally) == 0  # lost: logged, the run goes on


def test_tar_source(tiny_model, tmp_path):
    _, model = tiny_model
    os.makedirs(tmp_path / "in" / "day1")
    for shard in range(2):
        with tarfile.open(tmp_path / "in" / "day1" / f"shard-{shard}.tar.gz", "w:gz") as tar:
            for i in range(3):
                # `tar -cf x.tar .` writes ./sample1.png: the '.' segment is dropped from the key.
                image = f"./sample{i}.png" if i == 1 else f"sample{i}.png"
                for name, data in [(image, png(shard * 10 + i)), (f"sample{i}.json", b"{}")]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            fork = tarfile.TarInfo("._sample0.png")  # macOS tar's AppleDouble companion: skipped, no row
            fork.size = 4
            tar.addfile(fork, io.BytesIO(b"abcd"))
            link = tarfile.TarInfo("alias.png")  # a link member: an error row (it was dropped without a row)
            link.type, link.linkname = tarfile.SYMTYPE, "sample0.png"
            tar.addfile(link)
            evil = tarfile.TarInfo("../../escape.png")
            evil.size = 4
            tar.addfile(evil, io.BytesIO(b"abcd"))
    out = tmp_path / "out"
    run = infer(InferSpec(model=model, input=str(tmp_path / "in"), output=str(out)))
    assert run["source"] == "tar"
    rows = {r["key"]: r for r in summaries(out)}
    good = {f"day1/shard-{s}/sample{i}" for s in range(2) for i in range(3)}
    assert {k for k, r in rows.items() if r["status"] == "ok"} == good
    evil_rows = [r for r in rows.values() if r["status"] == "error" and not r["key"].endswith("/alias")]
    assert len(evil_rows) == 2 and all("unsafe member name" in r["error"] for r in evil_rows)
    links = [r["error"] for k, r in rows.items() if k.endswith("/alias")]
    assert links == ["member is a link to sample0.png, not followed; store the file"] * 2
    assert not list(tmp_path.rglob("escape*"))  # nothing escaped the output prefix
    assert all((out / "masks" / f"{k}.png").exists() for k in good)
    # A re-run finds every member done, ./sample1.png too (its key is the one its row was written under).
    again = infer(InferSpec(model=model, input=str(tmp_path / "in"), output=str(out)))
    assert again["counts"]["processed"] == 0 and again["status"] == "succeeded"
    # Skipped members are counted whether the filter dropped them or the archive was not opened.
    assert again["counts"]["skipped"] == again["counts"]["total"] == run["counts"]["processed"]


def test_parquet_table_source_and_packed_masks(tiny_model, tmp_path):
    _, model = tiny_model
    os.makedirs(tmp_path / "in")
    table = pa.table({"id": [f"row{i}" for i in range(5)], "image": [png(i) for i in range(4)] + [b"broken"]})
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    out = tmp_path / "out"
    run = infer(
        InferSpec(
            model=model,
            input=str(tmp_path / "in"),
            output=str(out),
            key_column="id",
            mask_format="packed",
            tta_flip=True,
        )
    )
    assert run["source"] == "parquet" and run["counts"]["ok"] == 4 and run["counts"]["error"] == 1
    for r in summaries(out):
        if r["status"] != "ok":
            continue
        with open(r["mask_uri"], "rb") as f:
            f.seek(r["mask_offset"])
            mask = Image.open(io.BytesIO(f.read(r["mask_length"])))
            assert mask.size == (32, 32) and mask.mode == "P"


def test_uri_list_source_and_npz_masks(tiny_model, tmp_path):
    _, model = tiny_model
    write_images(tmp_path / "imgs", 3)
    listing = tmp_path / "list.txt"
    first, *rest = sorted((tmp_path / "imgs").iterdir())
    # A relative entry lies beside the list, wherever the command runs; blank and comment lines are skipped.
    listing.write_text(
        f"# images\n\nimgs/{first.name}\n" + "".join(f"{p}\n" for p in rest) + f"{tmp_path}/imgs/missing.png\n"
    )
    out = tmp_path / "out"
    run = infer(InferSpec(model=model, input=str(listing), output=str(out), mask_format="npz"))
    assert run["source"] == "list" and run["counts"]["ok"] == 3 and run["counts"]["error"] == 1
    rows = [r for r in summaries(out) if r["status"] == "ok"]
    path, key = rows[0]["mask_uri"].split("#")
    with np.load(path) as packed:
        assert packed[key].shape == (32, 32)

    # A Parquet list may carry the keys; blank and comment lines are skipped.
    uris = [str(p) for p in sorted((tmp_path / "imgs").iterdir())]
    pq.write_table(
        pa.table({"uri": [*uris, "", "# note"], "key": ["x/0", "x/1", "x/2", "", ""]}), tmp_path / "l.parquet"
    )
    run = infer(InferSpec(model=model, input=str(tmp_path / "l.parquet"), output=str(tmp_path / "out2"), report=False))
    assert run["source"] == "list" and run["counts"]["ok"] == 3
    assert sorted(r["key"] for r in summaries(tmp_path / "out2")) == ["x/0", "x/1", "x/2"]


def test_mask_of_a_key_under_a_folder_named_masks_is_its_own(tmp_path):
    """Key photos/masks/a (INPUT/photos/masks/a.png): its mask file is found as its own, not key a's (a nightly
    re-run deletes what own_mask_files names), where it was written and after the output moved."""
    out = storage.resolve(str(tmp_path / "out"))
    pngs = layout.PngMasks(out, "b", None)
    pngs.write("a", np.zeros((2, 2), np.uint8))
    ref = pngs.write("photos/masks/a", np.ones((2, 2), np.uint8))
    pngs.finish()
    tif = out.child("masks", "photos/masks/a.tif").uri  # a big raster's mask, as the predictor names it
    rows = pa.table({"key": ["photos/masks/a"] * 2, "mask_uri": [ref.uri, tif], "mask_offset": [-1, -1]})
    assert [loc.path for loc in layout.own_mask_files(out, rows)] == [
        str(tmp_path / "out/masks/photos/masks/a.png"),
        str(tmp_path / "out/masks/photos/masks/a.tif"),
    ]
    assert [loc.path for loc in layout.own_mask_files(out, rows.drop_columns(["key"]))][0].endswith(
        "photos/masks/a.png"
    )
    os.rename(tmp_path / "out", tmp_path / "masks")  # moved, under a folder named masks itself
    moved = storage.resolve(str(tmp_path / "masks"))
    assert [loc.path for loc in layout.own_mask_files(moved, rows)] == [
        str(tmp_path / "masks/masks/photos/masks/a.png"),
        str(tmp_path / "masks/masks/photos/masks/a.tif"),
    ]
    # A hand-edited or foreign summary naming a file outside OUTPUT/masks names nothing to delete.
    (tmp_path / "important.png").write_bytes(b"keep")
    outside = [str(tmp_path / "important.png"), f"{moved.uri}/masks/../../important.png", "s3://bucket/important.png"]
    rows = pa.table({"key": ["k", "masks/k", "a"], "mask_uri": outside, "mask_offset": [-1] * 3})
    assert layout.own_mask_files(moved, rows) == []
    assert layout.own_mask_files(moved, rows.drop_columns(["key"])) == []


def test_stale_mask_files_are_deleted_in_lists_those_gone_skipped(tmp_path, monkeypatch):
    """compact._without asked whether each dropped key's mask existed, then deleted it: two requests a key, one
    key after another (a nightly re-run dropping 100k keys spent most of an hour). Now one fs.rm per 1000
    files; files already gone are skipped, and a name with [ ] is no pattern (on S3 a list is globbed)."""
    from raysegment.inference import compact

    masks = storage.resolve(str(tmp_path / "masks"))
    names = ["a.png", "b.png", "gone.png", "x[12].png", "x1.png", "x2.png"]
    for name in names:
        if name != "gone.png":
            (tmp_path / "masks" / name).parent.mkdir(exist_ok=True)
            (tmp_path / "masks" / name).write_bytes(b"m")
    calls = []
    rm = masks.fs.rm
    monkeypatch.setattr(masks.fs, "rm", lambda paths: calls.append(list(paths)) or rm(paths))
    monkeypatch.setattr(compact, "DELETE_CHUNK", 2)
    compact._delete(masks, [masks.child(n).path for n in names[:4]])
    assert sorted(os.listdir(tmp_path / "masks")) == ["x1.png", "x2.png"]  # x[12].png's pattern matched none
    assert [len(c) for c in calls] == [2, 1]  # a.png b.png; gone.png (x[12].png alone)


def test_npz_pack_keys_named_like_numpy_arguments_or_members(tmp_path):
    """Keys are not savez keyword names: `file` raised, `allow_pickle` was lost, `a.npy` read `a`'s mask."""
    out = storage.resolve(str(tmp_path / "out"))
    keys = ["file", "allow_pickle", "a", "a.npy", "d/masks/x.npz#y"]
    pack = layout.NpzMasks(out, layout.batch_name(np.asarray(keys)), None)
    refs = {k: pack.write(k, np.full((2, 3), i, np.uint8)) for i, k in enumerate(keys)}
    pack.finish()
    for i, key in enumerate(keys):
        row = {"key": key, "mask_uri": refs[key].uri}
        assert layout.read_mask(out, row)[0].tolist() == [[i] * 3] * 2, key
    with np.load(refs["a"].uri.split("#")[0]) as packed:  # arrays named by key (README)
        assert packed["a.npy"][0, 0] == 3 and packed["a"][0, 0] == 2
    # A pack an earlier version wrote (np.savez_compressed: members {key}.npy) still reads.
    old = out.child("masks", "part-0123abcd.npz")
    buf = io.BytesIO()
    np.savez_compressed(buf, **{"k": np.full((2, 2), 5, np.uint8), "d/k": np.full((2, 2), 6, np.uint8)})
    storage.write_bytes(old, buf.getvalue())
    assert layout.read_mask(out, {"key": "d/k", "mask_uri": f"{old.uri}#d/k"})[0].tolist() == [[6, 6]] * 2
    with pytest.raises(DataError, match="holds no mask of key 'missing'"):
        layout.read_mask(out, {"key": "missing", "mask_uri": f"{old.uri}#missing"})


def test_png_mask_of_a_key_holding_npz_hash_is_a_png(tmp_path):
    """Image scan.npz#2.png with --mask-format png: its row is a PNG's, not an npz pack member's."""
    out = storage.resolve(str(tmp_path / "out"))
    pngs = layout.PngMasks(out, "b", None)
    ref = pngs.write("scan.npz#2", np.ones((2, 2), np.uint8))
    pngs.finish()
    row = {"key": "scan.npz#2", "mask_uri": ref.uri, "mask_offset": -1, "mask_length": -1}
    assert layout.read_mask(out, row)[0].tolist() == [[1, 1]] * 2
    rows = pa.table({"key": [row["key"]], "mask_uri": [ref.uri], "mask_offset": [-1]})
    assert [loc.path for loc in layout.own_mask_files(out, rows)] == [str(tmp_path / "out/masks/scan.npz#2.png")]


def test_max_error_fraction_fails_without_success(tiny_model, tmp_path):
    _, model = tiny_model
    write_images(tmp_path / "in", 2)
    for i in range(3):
        (tmp_path / "in" / f"bad{i}.png").write_bytes(b"nope")
    out = tmp_path / "out"
    with pytest.raises(JobError, match="3 of 5 images failed"):
        infer(InferSpec(model=model, input=str(tmp_path / "in"), output=str(out), max_error_fraction=0.5))
    assert not (out / "_SUCCESS").exists()
    run = json.loads(next((out / "runs").iterdir()).read_text())
    assert run["status"] == "failed"
    # Run again unchanged, it resumed every key and passed (exit 0, _SUCCESS over 60% errors): the fraction
    # is the whole OUTPUT's.
    spec = InferSpec(model=model, input=str(tmp_path / "in"), output=str(out), max_error_fraction=0.5)
    with pytest.raises(JobError, match=r"3 of 5 images failed \(0 of 0 in this run\).*--retry-errors"):
        infer(spec)
    assert not (out / "_SUCCESS").exists()
    for i in range(3):
        (tmp_path / "in" / f"bad{i}.png").write_bytes(png(i))
    assert infer(spec.model_copy(update={"retry_errors": True}))["counts"]["ok"] == 3
    assert (out / "_SUCCESS").exists()


def test_key_collision_is_reported(tiny_model, tmp_path):
    _, model = tiny_model
    os.makedirs(tmp_path / "in")
    (tmp_path / "in" / "same.png").write_bytes(png(1))
    (tmp_path / "in" / "same.jpg").write_bytes(png(2))
    with pytest.raises(JobError, match="share a key"):
        infer(InferSpec(model=model, input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.s3
def test_resume_on_s3(tiny_model, s3_server, s3_prefix, tmp_path):
    """Resume on the real S3 server: a re-run processes only the new keys, one row per key."""
    import s3fs

    _, model = tiny_model
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url}, skip_instance_cache=True)
    bucket = s3_prefix[len("s3://") :]
    keys = write_images(tmp_path / "in", 6)
    (tmp_path / "in" / "corrupt.png").write_bytes(png(99)[:40])
    fs.put(str(tmp_path / "in"), f"{bucket}/in", recursive=True)
    first = infer(InferSpec(model=model, input=f"{s3_prefix}/in", output=f"{s3_prefix}/out", batch_size=4))
    assert first["counts"] == {"total": 7, "skipped": 0, "processed": 7, "ok": 6, "error": 1}
    new = write_images(tmp_path / "more", 2, start=50)
    fs.put(str(tmp_path / "more") + "/", f"{bucket}/in/", recursive=True)
    second = infer(InferSpec(model=model, input=f"{s3_prefix}/in", output=f"{s3_prefix}/out", batch_size=4))
    assert second["counts"] == {"total": 9, "skipped": 7, "processed": 2, "ok": 2, "error": 0}
    rows = []
    for path in fs.find(f"{bucket}/out/summaries"):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    assert sorted(rows) == sorted(keys + new + ["corrupt"])
    masks = sorted(p.rsplit("/", 1)[1][:-4] for p in fs.find(f"{bucket}/out/masks"))
    assert masks == sorted(keys + new)
    assert fs.exists(f"{bucket}/out/_SUCCESS")


def test_decoding_in_tasks_or_in_the_actor_gives_the_same_results(tiny_model, tmp_path):
    """The two plans (decode in CPU tasks beside a GPU actor, or inside a CPU actor) write the
    same rows, errors and masks; the run record says which one ran."""
    from helpers import write_infer_inputs

    _, model = tiny_model
    inputs = write_infer_inputs(str(tmp_path / "in"))
    results = {}
    for decode in ("tasks", "actor"):
        out = str(tmp_path / decode)
        record = infer(InferSpec(model=model, input=str(tmp_path / "in"), output=out, decode=decode, report=False))
        assert record["decoded_in"] == decode
        rows = sorted((r["key"], r["status"], r["error"]) for r in summaries(out))
        masks = {k: np.asarray(Image.open(os.path.join(out, "masks", f"{k}.png"))) for k in inputs["good"]}
        results[decode] = rows, masks
    assert [k for k, status, _ in results["actor"][0] if status == "error"] == sorted(inputs["bad"])
    assert results["tasks"][0] == results["actor"][0]
    for key in inputs["good"]:
        np.testing.assert_array_equal(results["tasks"][1][key], results["actor"][1][key])


def test_bench_infer_measures_all_three_on_the_same_images(ray_cluster, tmp_path):
    from raysegment.bench.infer import bench_infer

    r = bench_infer(
        images=100,
        image_size=32,
        depth=1,
        base_filters=4,
        batch_size=8,
        actors=1,
        workdir=str(tmp_path),
        source_size=48,
        cpus_per_actor=1.0,
    )
    assert r["pipeline_rows"] == 100 and r["pipeline_errors"] == 0
    assert min(r["model_only_ips"], r["baseline_ips"], r["pipeline_ips"], r["pipeline_steady_ips"]) > 0
    # (a) is the faster of the two model-only layouts, both measured in this run.
    assert r["model_only_ips"] == max(r["model_only_one_process_ips"], r["model_only_per_core_ips"])
    assert r["ratio_vs_model_only"] == pytest.approx(r["pipeline_ips"] / r["model_only_ips"], abs=2e-3)
    assert r["ratio_vs_baseline"] == pytest.approx(r["pipeline_ips"] / r["baseline_ips"], abs=2e-3)
    assert r["pipeline_first_batch_s"] > 0 and r["cpus_per_actor"] == 1.0 and r["source_size"] == 48
    assert r["peak_rss_mb"]["workers_total"] > 0
    assert not os.listdir(tmp_path)  # the temp folder is removed
