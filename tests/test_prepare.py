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
from raysegment.errors import DataError


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
    assert "3 invalid pairs, 1 image without a mask, 1 mask without an image, nothing written" in msg
    assert not (tmp_path / "data" / "manifest.json").exists()
    assert not (tmp_path / "data" / "shards").exists() or not os.listdir(tmp_path / "data" / "shards")


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
    assert sorted(os.listdir(data / "shards")) == sorted(s.path.split("/")[1] for s in manifest.shards)
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


def test_overwrite_replaces_shards_and_manifest(ray_cluster, tmp_path):
    src = write_source(str(tmp_path / "src"), count=12)
    data = tmp_path / "data"
    first = prepare(PrepareSpec(source=src, dest=str(data), shard_size_mb=0.005))
    assert len(first.shards) > 2
    second = prepare(PrepareSpec(source=src, dest=str(data), overwrite=True, val_keys="00003,00004"))
    assert second.counts.to_json() == {"train": 10, "val": 2} and len(second.shards) == 2
    assert sorted(os.listdir(data / "shards")) == ["train-00000.parquet", "val-00000.parquet"]
    # A failed rewrite leaves no data set behind: the old manifest went first, the new one never came.
    os.remove(tmp_path / "src" / "masks" / "00000.png")
    with pytest.raises(DataError, match="1 image without a mask"):
        prepare(PrepareSpec(source=src, dest=str(data), overwrite=True))
    assert not (data / "manifest.json").exists()


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
