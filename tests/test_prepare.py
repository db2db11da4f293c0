"""`prepare` on real Ray: shards and manifest, and a named report for bad pairs."""

import dataclasses
import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import write_source
from PIL import Image

from raysegment import storage
from raysegment.config import PrepareSpec
from raysegment.data.manifest import read_manifest, write_manifest
from raysegment.data.prepare import prepare
from raysegment.errors import DataError, StorageError


def test_prepare_writes_shards_and_manifest(ray_cluster, tmp_path):
    src = write_source(str(tmp_path / "src"), count=30)
    manifest = prepare(PrepareSpec(source=src, dest=str(tmp_path / "data"), shard_size_mb=0.01, val_fraction=0.25))
    assert manifest.num_classes == 4
    assert manifest.counts.train + manifest.counts.val == 30
    assert manifest.counts.val > 0
    assert len(manifest.shards) > 2  # the small target size forces several shards
    rows = 0
    for shard in manifest.shards:
        table = pq.read_table(tmp_path / "data" / shard.path)
        assert table.column_names == ["key", "image", "mask", "height", "width", "split"]
        assert set(table.column("split").to_pylist()) == {shard.split}
        assert os.path.getsize(tmp_path / "data" / shard.path) == shard.bytes
        rows += table.num_rows
    assert rows == 30
    assert abs(sum(manifest.pixel_frequency) - 1) < 1e-6
    _, again = read_manifest(str(tmp_path / "data"))
    assert again.content_hash == manifest.content_hash
    # The typed manifest is the file: read back it equals what prepare returned, and written again it is
    # the same bytes (every key prepare writes is a field, in the file's order, with its JSON value).
    written = (tmp_path / "data" / "manifest.json").read_bytes()
    assert again == manifest and json.loads(written) == again.to_json()
    write_manifest(storage.resolve(str(tmp_path / "copy")), again)
    assert (tmp_path / "copy" / "manifest.json").read_bytes() == written
    with pytest.raises(DataError, match="already exists"):
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "data")))


def test_prepare_reports_bad_pairs_and_writes_nothing(ray_cluster, tmp_path):
    src = write_source(str(tmp_path / "src"), count=6)
    os.remove(tmp_path / "src" / "masks" / "00000.png")  # image without mask
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "src" / "masks" / "extra.png")  # mask without image
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "src" / "masks" / "00001.png")  # size mismatch
    (tmp_path / "src" / "images" / "00002.png").write_bytes(b"garbage")  # undecodable
    os.remove(tmp_path / "src" / "masks" / "00003.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "src" / "masks" / "00003.png")  # a dangling link
    with pytest.raises(DataError) as err:
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "data"), num_classes=4))
    msg = str(err.value)
    for key, problem in [
        ("00000", "image without mask"),
        ("extra", "mask without image"),
        ("00001", "size mismatch"),
        ("00002", "undecodable"),
        ("00003", f"dangling symlink {tmp_path}/src/masks/00003.png -> {tmp_path}/gone.png"),
    ]:
        assert f"{key}: {problem}" in msg
    # SOURCE holds the bad files (DEST, empty, was named first)
    assert msg.startswith(f"{src}: 3 invalid pairs, 1 image without a mask, 1 mask without an image, nothing written")
    assert not (tmp_path / "data" / "manifest.json").exists()
    assert not (tmp_path / "data" / "shards").exists()


def test_prepare_class_ids_out_of_range(ray_cluster, tmp_path):
    src = write_source(str(tmp_path / "src"), count=4)
    with pytest.raises(DataError, match="class ids out of range 0..1"):
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "data"), num_classes=2))


def test_all_background_masks_name_the_way_out(ray_cluster, tmp_path):
    """Masks of one value: the error advised --mask-values 0:0, which is then refused (one class)."""
    src = write_source(str(tmp_path / "src"), count=3)
    for name in os.listdir(tmp_path / "src" / "masks"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "src" / "masks" / name)
    with pytest.raises(DataError, match=r"masks hold only the value 0: one class.*set --num-classes") as caught:
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "data")))
    assert "--mask-values" not in str(caught.value)


def _bad_source(tmp_path, count: int = 8) -> str:
    """Synthetic pairs plus one of each kind of bad pair; returns the source path."""
    src = write_source(str(tmp_path / "src"), count=count)
    os.remove(tmp_path / "src" / "masks" / "00000.png")  # image without mask
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "src" / "masks" / "extra.png")  # mask without image
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "src" / "masks" / "00001.png")  # size mismatch
    (tmp_path / "src" / "images" / "00002.png").write_bytes(b"garbage")  # undecodable image
    (tmp_path / "src" / "masks" / "00003.png").write_bytes(b"")  # undecodable mask
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(tmp_path / "src" / "masks" / "00004.png")  # id out of range
    return src


EXPECTED_PROBLEMS = {
    "00000": "image without mask",
    "extra": "mask without image",
    "00001": "size mismatch: image 32x32, mask 10x10 (width x height)",
    "00002": "undecodable image",
    "00003": "undecodable mask: empty file",
    "00004": "class ids out of range 0..3: [9]",
}


def test_skip_invalid_writes_good_pairs_and_records_the_rest(ray_cluster, tmp_path):
    src = _bad_source(tmp_path)
    data = tmp_path / "data"
    with pytest.raises(
        DataError,
        match="4 invalid pairs, 1 image without a mask, 1 mask without an image, nothing written.*--skip-invalid",
    ):
        prepare(PrepareSpec(source=src, dest=str(data), num_classes=4, shard_size_mb=0.005))
    assert not (data / "manifest.json").exists()
    manifest = prepare(PrepareSpec(source=src, dest=str(data), num_classes=4, skip_invalid=True, shard_size_mb=0.005))
    skipped = {s.key: s.problem for s in manifest.skipped}
    assert set(skipped) == set(EXPECTED_PROBLEMS)
    for key, problem in EXPECTED_PROBLEMS.items():
        assert skipped[key].startswith(problem), (key, skipped[key])
    keys = {k for s in manifest.shards for k in pq.read_table(data / s.path).column("key").to_pylist()}
    assert keys == {"00005", "00006", "00007"}
    assert manifest.counts.total == 3
    # Only shards the manifest lists exist: the ones whose pairs were all bad were never committed.
    assert _files(data / "shards") == sorted(s.path for s in manifest.shards)
    from raysegment.data.info import format_manifest

    shown = format_manifest(str(data), manifest)  # data-info names each skipped pair (it gave only the count)
    assert (
        "skipped       6 invalid or unpaired inputs" in shown
        and "  00001: size mismatch: image 32x32, mask 10x10 (width" in shown
    )


def test_many_bad_pairs_report_each_problem_once_with_its_keys_and_the_count(ray_cluster, tmp_path):
    """One problem shared by many pairs (every mask a JPEG, or missing) was repeated once a pair, up to 20
    times in one line: it is said once, with the count and the first keys."""
    src = write_source(str(tmp_path / "src"), count=25)
    for i in range(23):
        os.remove(tmp_path / "src" / "masks" / f"{i:05d}.png")
    for i, side in ((23, 10), (24, 12)):
        Image.fromarray(np.zeros((side, side), np.uint8)).save(tmp_path / "src" / "masks" / f"{i:05d}.png")
    with pytest.raises(DataError) as err:
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "data")))
    msg = str(err.value)
    assert "2 invalid pairs, 23 images without a mask, nothing written" in msg
    assert msg.count("image without mask") == 1
    assert "23 images (00000, 00001, 00002, 00003, 00004 and 18 more): image without mask" in msg
    assert "00023: size mismatch: image 32x32, mask 10x10 (width x height)" in msg and "00024: size mismatch" in msg


def test_masks_named_with_a_suffix_get_the_suffix_fix_alone_and_files_counted_as_files(ray_cluster, tmp_path, caplog):
    """ISIC-style X.jpg beside X_segmentation.png without --mask-suffix: no file pairs. Two split warnings
    (no pair in val, none in train) with fixes beside the point came first, and 16 images and 16 masks
    were "32 invalid pairs", with --skip-invalid offered though no pair was valid."""
    import logging

    src = write_source(str(tmp_path / "src"), count=4, size=8)
    for name in os.listdir(tmp_path / "src" / "masks"):
        stem = name.rsplit(".", 1)[0]
        os.rename(tmp_path / "src" / "masks" / name, tmp_path / "src" / "masks" / f"{stem}_segmentation.png")
    with caplog.at_level(logging.INFO, logger="raysegment.progress"), pytest.raises(DataError) as err:
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "data")))
    assert "no pair is in" not in caplog.text and "--val-" not in caplog.text
    msg = str(err.value)
    assert "4 images without a mask, 4 masks without an image, nothing written" in msg
    assert "4 masks (00000_segmentation, " in msg and "pass --mask-suffix _segmentation" in msg
    assert "invalid pairs" not in msg and "--skip-invalid" not in msg


def test_invalid_report_names_20_problems_and_the_count_of_the_rest():
    from raysegment.data.prepare import Invalid, Problem, _invalid_report

    invalid = [Invalid(f"k{i:02d}", Problem(f"problem {i}")) for i in range(25)]
    msg = _invalid_report("d", invalid)
    assert "25 invalid pairs" in msg and "(and 5 more problems)" in msg
    assert "k19: problem 19" in msg and "k20" not in msg


def _files(folder) -> list[str]:
    """Every file below folder, as paths relative to the data set (`shards/...`), sorted."""
    root = folder.parent
    return sorted(str(p.relative_to(root)) for p in folder.rglob("*") if p.is_file())


def _intact(data, manifest) -> None:
    """The data set at `data` is `manifest`'s, whole: its manifest reads, each shard it lists is there with
    its size and hash, and shards/ holds nothing else."""
    _, again = read_manifest(str(data))
    assert again == manifest
    for shard in manifest.shards:
        content = (data / shard.path).read_bytes()
        assert len(content) == shard.bytes and hashlib.sha256(content).hexdigest() == shard.sha256
    assert _files(data / "shards") == sorted(s.path for s in manifest.shards)


def test_overwrite_replaces_shards_and_manifest(ray_cluster, tmp_path):
    src = write_source(str(tmp_path / "src"), count=12)
    data = tmp_path / "data"
    first = prepare(PrepareSpec(source=src, dest=str(data), shard_size_mb=0.005))
    assert len(first.shards) > 2
    (generation,) = {s.path.split("/")[1] for s in first.shards}  # each run writes shards/<generation>/
    assert all(s.path == f"shards/{generation}/{s.split}-{s.path[-13:-8]}.parquet" for s in first.shards)
    second = prepare(PrepareSpec(source=src, dest=str(data), overwrite=True, val_keys="00003,00004"))
    assert second.counts.to_json() == {"train": 10, "val": 2} and len(second.shards) == 2
    new = second.shards[0].path.split("/")[1]
    assert new != generation and not (data / "shards" / generation).exists()  # the old generation is removed
    assert _files(data / "shards") == [f"shards/{new}/train-00000.parquet", f"shards/{new}/val-00000.parquet"]
    _intact(data, second)


def test_a_failed_overwrite_leaves_the_old_data_set_whole(ray_cluster, tmp_path):
    """`prepare --overwrite` removed the data set at DEST before its shard tasks found a bad pair in the new
    SOURCE, then said "nothing written": a re-prepare with one wrong mask lost the data set."""
    from raysegment.data.info import describe

    good = write_source(str(tmp_path / "good"), count=10)
    data = tmp_path / "data"
    old = prepare(PrepareSpec(source=good, dest=str(data), num_classes=4, shard_size_mb=0.005))
    manifest_bytes = (data / "manifest.json").read_bytes()
    bad = write_source(str(tmp_path / "bad"), count=10)
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(tmp_path / "bad" / "masks" / "00005.png")
    with pytest.raises(DataError) as err:
        prepare(PrepareSpec(source=bad, dest=str(data), num_classes=4, overwrite=True, shard_size_mb=0.005))
    # SOURCE named (not DEST), and one pair is "1 invalid pair"
    assert str(err.value).startswith(f"{bad}: 1 invalid pair, nothing written: 00005: class ids out of range 0..3")
    assert (data / "manifest.json").read_bytes() == manifest_bytes
    _intact(data, old)  # the failed run's own shards are removed, the old ones all kept
    assert old.content_hash in describe(str(data))  # data-info reads it
    # The same for a source refused as a whole, after its shards were written (no --num-classes: 7 is a value).
    with pytest.raises(DataError, match=r"masks hold the values \[0, 1, 2, 3, 7\], which are not class ids"):
        prepare(PrepareSpec(source=bad, dest=str(data), overwrite=True, shard_size_mb=0.005))
    assert (data / "manifest.json").read_bytes() == manifest_bytes
    _intact(data, old)


def test_a_second_prepare_into_a_dest_being_prepared_is_refused_and_takes_nothing(ray_cluster, tmp_path):
    """Two prepares into one DEST at once (a retried CronJob beside the first): the second's commit removed the
    first's shards as "another generation". DEST's lock refuses the second (exit 5) before it writes anything."""
    from raysegment.data.prepare import PREPARE_LOCK, PREPARE_LOCK_STALE_S
    from raysegment.lock import LockedError, RunLock

    src = write_source(str(tmp_path / "src"), count=6)
    data = tmp_path / "data"
    old = prepare(PrepareSpec(source=src, dest=str(data), val_keys="00001"))
    manifest_bytes = (data / "manifest.json").read_bytes()
    with RunLock(
        storage.resolve(str(data)).child(PREPARE_LOCK), PREPARE_LOCK_STALE_S, purpose="prepare into this DEST"
    ):
        with pytest.raises(LockedError, match=r"_prepare\.lock: another prepare into this DEST holds the lock") as err:
            prepare(PrepareSpec(source=src, dest=str(data), overwrite=True))
        assert err.value.exit_code == 5
        assert (data / "manifest.json").read_bytes() == manifest_bytes
        _intact(data, old)
    again = prepare(PrepareSpec(source=src, dest=str(data), overwrite=True))  # free again: it runs
    _intact(data, again)
    assert not (data / PREPARE_LOCK).exists()


def test_a_failed_manifest_write_leaves_its_shards_for_the_next_prepare(ray_cluster, tmp_path):
    """The docs said a failed run removes its own shards: not when the manifest write fails (on S3 a put that
    timed out may still have committed). They stay, unlisted, and the next prepare's commit removes them."""
    src = write_source(str(tmp_path / "src"), count=4)
    data = tmp_path / "data"
    os.makedirs(data / "manifest.json")  # a folder where the manifest goes: its write fails, after the shards
    with pytest.raises(StorageError, match="is a folder"):
        prepare(PrepareSpec(source=src, dest=str(data), val_keys="00001", overwrite=True))
    assert len(_files(data / "shards")) == 2  # left: the failure came at the commit
    os.rmdir(data / "manifest.json")
    _intact(data, prepare(PrepareSpec(source=src, dest=str(data), val_keys="00001")))  # ... and removed by it


def test_a_data_set_of_an_earlier_release_is_read_and_cleaned_up_by_overwrite(ray_cluster, tmp_path):
    """Earlier releases wrote shards directly under shards/: such a data set still reads, and an --overwrite
    removes its shards (and strays of killed runs) once the new manifest is written."""
    from raysegment.data.pipeline import read_split

    src = write_source(str(tmp_path / "src"), count=8)
    data = tmp_path / "data"
    made = prepare(PrepareSpec(source=src, dest=str(data), val_keys="00001,00002"))
    flat = []
    for shard in made.shards:  # as an earlier release laid it out
        name = shard.path.split("/")[-1]
        os.rename(data / shard.path, data / "shards" / name)
        flat.append(dataclasses.replace(shard, path=f"shards/{name}"))
    os.rmdir(data / made.shards[0].path.rsplit("/", 1)[0])
    earlier = dataclasses.replace(made, shards=tuple(flat))
    write_manifest(storage.resolve(str(data)), earlier)
    os.makedirs(data / "shards" / "20200101T000000Z-dead00")  # a killed run's strays
    (data / "shards" / "20200101T000000Z-dead00" / ".tmp-0123").write_bytes(b"partial")
    loc, manifest = read_manifest(str(data))
    assert manifest.content_hash == made.content_hash
    assert read_split(loc, manifest, "val").count() == 2 and read_split(loc, manifest, "train").count() == 6
    again = prepare(PrepareSpec(source=src, dest=str(data), val_keys="00001,00002", overwrite=True))
    assert again.content_hash == made.content_hash  # the same shards: the hash is over their bytes, not paths
    _intact(data, again)  # the flat shards and the strays are gone


def test_bench_baseline_reads_the_shards_the_manifest_lists(ray_cluster, tmp_path):
    """The plain-Keras baseline listed shards/ for train-*.parquet itself: it found none in a generation folder."""
    from raysegment.bench.train import _load_encoded

    data = tmp_path / "data"
    made = prepare(PrepareSpec(source=write_source(str(tmp_path / "src"), count=6), dest=str(data), val_keys="00001"))
    images, masks = _load_encoded(str(data))
    assert len(images) == len(masks) == made.counts.train == 5


def test_progress_does_not_say_invalid_0_of_pairs_refused_for_their_mask_values(ray_cluster, tmp_path):
    """0/255 masks without --mask-values: the last progress line said `invalid 0`, then every pair was refused."""
    from raysegment import progress

    src = write_source(str(tmp_path / "src"), count=5)
    for name in os.listdir(tmp_path / "src" / "masks"):
        Image.fromarray(np.where(np.eye(32, dtype=bool), 255, 0).astype(np.uint8)).save(
            tmp_path / "src" / "masks" / name
        )
    out = io.StringIO()
    progress.configure(progress.LINES, interval_s=3600, stream=out)
    try:
        with pytest.raises(DataError, match=r"masks hold the values \[0, 255\], which are not class ids"):
            prepare(PrepareSpec(source=src, dest=str(tmp_path / "data")))
    finally:
        progress.configure(progress.OFF)
    (line,) = [line for line in out.getvalue().splitlines() if " prepare  " in line]
    assert "5/5 pairs" in line and line.endswith("invalid 5"), line
    assert not (tmp_path / "data" / "shards").exists()


@pytest.mark.s3
def test_prepare_s3_to_s3(ray_cluster, s3_prefix, tmp_path):
    src = tmp_path / "src"
    write_source(str(src), count=10)
    os.makedirs(src / "images" / "sub dir")
    os.makedirs(src / "masks" / "sub dir")
    os.rename(src / "images" / "00009.png", src / "images" / "sub dir" / "00009.png")
    os.rename(src / "masks" / "00009.png", src / "masks" / "sub dir" / "00009.png")
    (src / "val.txt").write_text("00001\nsub dir/00009\n")
    source = storage.resolve(f"{s3_prefix}/source")
    for path in sorted(src.rglob("*")):
        if path.is_file():
            storage.upload_file(str(path), source.child(str(path.relative_to(src))))
    dest = f"{s3_prefix}/data"
    manifest = prepare(PrepareSpec(source=source.uri, dest=dest, val_keys=f"{source.uri}/val.txt", shard_size_mb=0.01))
    assert manifest.counts.to_json() == {"train": 8, "val": 2} and len(manifest.shards) > 2
    loc, again = read_manifest(dest)
    assert again.content_hash == manifest.content_hash
    keys = {}
    for shard in manifest.shards:
        data = storage.read_bytes(loc.child(shard.path))
        assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
        table = pq.read_table(io.BytesIO(data))
        keys.update(dict(zip(table.column("key").to_pylist(), table.column("split").to_pylist())))
    assert keys["sub dir/00009"] == "val" and keys["00001"] == "val" and len(keys) == 10
    # Readers on the cluster see the same shards through Ray Data.
    from raysegment.data.pipeline import read_split

    assert read_split(loc, manifest, "val").count() == 2
    # An --overwrite on S3 removes the previous generation's objects, and an earlier release's flat shards.
    storage.write_bytes(loc.child("shards", "train-00000.parquet"), b"an earlier release's shard")
    # A zero-byte `shards/` folder marker (a console's "Create folder", Hadoop S3A): s3fs lists it among
    # the folder's children, and removing it recursively removed the new generation too.
    loc.fs.pipe_file(loc.child("shards").path + "/", b"")
    assert loc.child("shards").path + "/" in loc.fs.ls(loc.child("shards").path, detail=False, refresh=True)
    again = prepare(PrepareSpec(source=source.uri, dest=dest, overwrite=True, val_keys=f"{source.uri}/val.txt"))
    listed = [loc.child(s.path).path for s in again.shards]
    assert storage.parquet_files(loc.child("shards")) == sorted(listed) and len(listed) == 2


def test_bench_prepare_reports_memory_and_throughput(ray_cluster, tmp_path):
    from raysegment.bench.prepare import bench_prepare

    result = bench_prepare(pairs=120, size=16, shard_size_mb=0.05, workdir=str(tmp_path / "bench"))
    assert result["rows"] == 120 and result["shards"] > 2
    assert 0 < result["rss_before_mib"] and result["peak_rss_before_mib"] <= result["peak_rss_after_mib"]
    assert result["pairs_per_s"] > 0


def test_a_split_without_val_pairs_is_warned_of_at_prepare(ray_cluster, tmp_path, caplog):
    """Two pairs hashed by --val-fraction can both land in train; train and plan refuse such a data set,
    so prepare says so at once, with the fix (it said nothing, and plan's advice was the flag already given)."""
    import logging

    src = write_source(str(tmp_path / "src"), count=2)
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        manifest = prepare(PrepareSpec(source=src, dest=str(tmp_path / "data"), val_fraction=0.01))
    assert manifest.counts.val == 0
    assert "no pair is in the val split" in caplog.text and "--val-keys" in caplog.text


def test_a_split_without_train_pairs_is_warned_of_at_prepare_and_refused_by_plan(ray_cluster, tmp_path, caplog):
    """One pair (or --val-keys naming every key) leaves train empty: prepare said nothing, plan printed a plan
    for "1 training images", and train's refusal advised a smaller --batch-size, which cannot help."""
    import logging

    from click.testing import CliRunner

    from raysegment.cli import main

    src = write_source(str(tmp_path / "src"), count=2, size=8)
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        manifest = prepare(PrepareSpec(source=src, dest=str(tmp_path / "data"), val_keys="00000,00001", num_classes=4))
    assert manifest.counts.to_json() == {"train": 0, "val": 2}
    assert "no pair is in the train split (--val-keys (2 keys)); put pairs in train: prepare again with fewer " in (
        caplog.text
    )
    # The per-class warnings name several classes in the plural, one in the singular.
    assert "classes class_0, class_2, class_3 have pixels in val but none in train: the model cannot learn them" in (
        caplog.text
    )
    assert "class class_1 has no labelled pixel in any mask" in caplog.text
    planned = CliRunner().invoke(main, ["plan", str(tmp_path / "data"), "--out", str(tmp_path / "plan.json")])
    assert planned.exit_code == 2 and not (tmp_path / "plan.json").exists()
    assert "no training images (2 in val, none in train); put pairs in train" in planned.output
    assert "--batch-size" not in planned.output


def test_voc_void_stays_ignore_in_the_mask_values_advice(ray_cluster, tmp_path):
    """VOC-style masks (0, a class id 15, void 255): the advice said '255 = ignore' and then mapped 255 to a
    class (255:2), which prepared the object borders as a third class."""
    src = write_source(str(tmp_path / "src"), count=3, size=8)
    for name in os.listdir(tmp_path / "src" / "masks"):
        mask = np.zeros((8, 8), np.uint8)
        mask[2:6, 2:6], mask[1, 1:7] = 15, 255
        Image.fromarray(mask).save(tmp_path / "src" / "masks" / name)
    with pytest.raises(DataError) as err:
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "data")))
    msg = str(err.value)
    assert "values [0, 15, 255]" in msg and "e.g. --mask-values 0:0,15:1,255:255, which keeps 255 as" in msg
    assert "--mask-values 0:0,15:1,255:2 " not in msg and "--mask-values 0:0,15:1,255:2," not in msg
    # The advice works as given: two classes, the border ignored.
    prepare(PrepareSpec(source=src, dest=str(tmp_path / "data"), mask_values="0:0,15:1,255:255"))
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["num_classes"] == 2 and sum(manifest["counts"].values()) == 3


def test_colour_masks_without_mask_colors_get_a_concrete_mapping(ray_cluster, tmp_path):
    """RGB colour codes without --mask-colors were 'undecodable', with a flat list of numbers and a generic
    example, repeated for each pair: now 'mask colours not mapped', once, with a --mask-colors to start from."""
    from raysegment.config import PrepareSpec as Spec

    src = write_source(str(tmp_path / "src"), count=3, size=8)
    colours = np.asarray([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
    for i, name in enumerate(sorted(os.listdir(tmp_path / "src" / "masks"))):
        ids = np.zeros((8, 8), np.uint8)
        ids[:4], ids[6:] = 1, 2 if i else 1  # the first mask lacks green: the mapping is the union
        Image.fromarray(colours[ids]).save(tmp_path / "src" / "masks" / name)
    with pytest.raises(DataError) as err:
        prepare(Spec(source=src, dest=str(tmp_path / "data")))
    msg = str(err.value)
    assert "undecodable" not in msg and msg.count("mask colours not mapped") == 2
    assert "2 pairs (00001, 00002): mask colours not mapped: RGB mask with colours 0,0,0; 0,255,0; 255,0,0" in msg
    assert "--mask-colors '0,0,0:0;0,255,0:1;255,0,0:2'" in msg
    manifest = prepare(Spec(source=src, dest=str(tmp_path / "data"), mask_colors="0,0,0:0;0,255,0:1;255,0,0:2"))
    assert manifest.num_classes == 3


def test_a_class_only_in_val_is_warned_of_at_prepare_and_by_data_info(ray_cluster, tmp_path, caplog):
    """A class whose images all fell into val could never be learnt, and nothing said so: prepare and
    data-info now name it (and a class missing from val, which val mIoU cannot score)."""
    import logging

    from click.testing import CliRunner

    from raysegment.cli import main
    from raysegment.data.info import format_manifest

    for i in range(4):
        mask = np.zeros((8, 8), np.uint8)
        mask[:4] = 1 if i < 3 else 2  # class 2 only in v3, which --val-keys puts in val with v0's class 1
        for folder, array in (("images", np.full((8, 8, 3), 40 * i, np.uint8)), ("masks", mask)):
            os.makedirs(tmp_path / "src" / folder, exist_ok=True)
            Image.fromarray(array).save(tmp_path / "src" / folder / f"v{i}.png")
    (tmp_path / "val.txt").write_text("v0\nv3\n")
    spec = PrepareSpec(source=str(tmp_path / "src"), dest=str(tmp_path / "data"), val_keys=str(tmp_path / "val.txt"))
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        manifest = prepare(spec)
    assert manifest.class_pixels == {"train": (64, 64, 0), "val": (64, 32, 32)}
    assert "class class_2 has pixels in val but none in train" in caplog.text
    assert "warning: class class_2 has pixels in val but none in train" in format_manifest("d", manifest)
    planned = CliRunner().invoke(main, ["plan", str(tmp_path / "data"), "--out", str(tmp_path / "plan.json")])
    assert planned.exit_code == 0 and "plan: warning: class class_2 has pixels in val" in planned.stderr
    balanced = {"train": (64, 64, 9), "val": (64, 32, 0)}
    balanced_shown = format_manifest("d", dataclasses.replace(manifest, class_pixels=balanced))
    assert balanced_shown.count("warning: ") == 1  # not in val


def test_no_val_pair_left_after_skip_invalid_is_warned_of(ray_cluster, tmp_path, caplog):
    """The val-split check ran on the listing, before --skip-invalid dropped the invalid pairs: a data set
    whose val pairs were all invalid was written with 0 val images and no word (plan and train refuse it)."""
    import logging

    src = write_source(str(tmp_path / "src"), count=4, size=8)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "src" / "masks" / "00001.png")  # size mismatch
    spec = PrepareSpec(source=src, dest=str(tmp_path / "data"), val_keys="00001", skip_invalid=True)
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        manifest = prepare(spec)
    assert manifest.counts.to_json() == {"train": 3, "val": 0}
    assert "no pair is in the val split: its one pair was invalid and skipped (--val-keys (1 keys))" in caplog.text
    assert "prepare again with --val-keys" in caplog.text
    # plan and train refuse it with the same advice (the manifest's fix; its splits are the key hash's).
    from raysegment.errors import DataError
    from raysegment.train.config import check_val

    with pytest.raises(DataError, match="no validation images; prepare again with --val-keys naming some pairs"):
        check_val(manifest, "d")
