"""Source layouts (pairs, VOC, Cityscapes), class tables, splits, and the training input pipeline."""

import io
import os
import re
import unicodedata

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from raysegment import storage
from raysegment.config import PrepareSpec, TrainSpec, load_spec
from raysegment.data import classes, imaging
from raysegment.data.examples import Augmentation, decode_for_training, fit_example, photometric
from raysegment.data.info import format_manifest
from raysegment.data.layouts import assign_splits, list_source, no_val_fix, pairs_layout, read_val_keys
from raysegment.data.manifest import Manifest
from raysegment.data.pairlist import list_layout
from raysegment.data.prepare import prepare
from raysegment.errors import ConfigError, DataError
from raysegment.models.card import ModelCard

# The PASCAL VOC devkit colour map (VOCdevkit labelcolormap), written out independently of raysegment.
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 7: (128, 128, 128), 15: (192, 128, 128), 20: (0, 64, 128)}
VOC_VOID = (224, 224, 192)
# Cityscapes labelId -> trainId for the 19 trained classes (cityscapesScripts helpers/labels.py); all else -> 255.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def voc_devkit_palette() -> list[int]:
    """The VOC devkit's bit-interleaved colour map for all 256 indices, flat, with 255 = void (cream)."""
    flat = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        flat += [r, g, b]
    flat[255 * 3 : 256 * 3] = list(VOC_VOID)
    return flat


def save(arr: np.ndarray, path: str, mode: str | None = None, palette: list[int] | None = None, fmt: str = "PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    if palette:
        img.putpalette(palette)
    img.save(path, format=fmt)


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def write_voc(root: str) -> None:
    """A VOC2012-shaped tree: 5 JPEGs (one without a mask, as most VOC images are), palette masks, split files."""
    palette = voc_devkit_palette()
    for i, key in enumerate(["2007_000032", "2007_000039", "2008_000001", "2009_000002", "2010_000003"]):
        save(rgb(20, 24, i), f"{root}/JPEGImages/{key}.jpg", fmt="JPEG")
        if key == "2010_000003":
            continue  # detection-only image: no SegmentationClass mask, not in the split files
        mask = np.zeros((20, 24), np.uint8)
        mask[4:12, 4:14] = 15  # person
        mask[12:18, 14:22] = 1 + i  # aeroplane, bicycle, ...
        mask[3, :] = 255  # VOC draws a void border around objects
        save(mask, f"{root}/SegmentationClass/{key}.png", mode="P", palette=palette)
    os.makedirs(f"{root}/ImageSets/Segmentation", exist_ok=True)
    with open(f"{root}/ImageSets/Segmentation/train.txt", "w") as f:
        f.write("2007_000032\n2008_000001\n2009_000002\n")
    with open(f"{root}/ImageSets/Segmentation/val.txt", "w") as f:
        f.write("2007_000039\n")
    with open(f"{root}/ImageSets/Segmentation/trainval.txt", "w") as f:
        f.write("2007_000032\n2007_000039\n2008_000001\n2009_000002\n")


def write_cityscapes(root: str) -> dict[str, np.ndarray]:
    """Cityscapes-shaped tree: two train cities, one val city, the extra gtFine files and a test split."""
    label_ids = {}
    frames = {
        "train": [("aachen", "000000_000019"), ("bochum", "000000_000313")],
        "val": [("frankfurt", "000000_000294")],
    }
    for split, items in frames.items():
        for n, (city, frame) in enumerate(items):
            base = f"{city}_{frame}"
            save(rgb(16, 32, n), f"{root}/leftImg8bit/{split}/{city}/{base}_leftImg8bit.png")
            ids = np.zeros((16, 32), np.uint8)  # 0 = unlabeled
            ids[:8] = 7  # road
            ids[8:, :8] = 26  # car
            ids[8:, 8:16] = 9  # parking: no train id
            ids[8:, 16:24] = 33  # bicycle
            ids[8:, 24:] = 23 + n  # sky / person
            save(ids, f"{root}/gtFine/{split}/{city}/{base}_gtFine_labelIds.png")
            save(ids, f"{root}/gtFine/{split}/{city}/{base}_gtFine_instanceIds.png")
            save(np.zeros((16, 32, 3), np.uint8), f"{root}/gtFine/{split}/{city}/{base}_gtFine_color.png")
            with open(f"{root}/gtFine/{split}/{city}/{base}_gtFine_polygons.json", "w") as f:
                f.write("{}")
            label_ids[f"{city}/{base}"] = ids
    save(rgb(16, 32), f"{root}/leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png")
    return label_ids


def read_rows(data: str, manifest: Manifest) -> dict[str, dict]:
    rows = {}
    for shard in manifest.shards:
        for row in pq.read_table(os.path.join(data, shard.path)).to_pylist():
            rows[row["key"]] = row
    return rows


# --- class tables -------------------------------------------------------------------------------


def test_voc_classes_and_palette_are_the_devkit_ones():
    assert len(classes.VOC_CLASSES) == 21
    assert classes.VOC_CLASSES[0] == "background" and classes.VOC_CLASSES[15] == "person"
    assert classes.VOC_CLASSES[-1] == "tvmonitor"
    flat = voc_devkit_palette()
    assert classes.VOC_PALETTE == [flat[3 * i : 3 * i + 3] for i in range(21)]
    for i, colour in VOC_COLOURS.items():
        assert tuple(classes.VOC_PALETTE[i]) == colour
    assert imaging.default_palette(21) == classes.VOC_PALETTE


def test_cityscapes_train_ids():
    lut = classes.cityscapes_lut()
    assert {i: lut[i] for i in range(256) if lut[i] != 255} == CITYSCAPES_TRAIN_IDS
    assert len(classes.CITYSCAPES_CLASSES) == 19
    assert classes.CITYSCAPES_CLASSES[0] == "road" and classes.CITYSCAPES_CLASSES[13] == "car"
    assert classes.CITYSCAPES_CLASSES[18] == "bicycle"
    assert classes.CITYSCAPES_PALETTE[0] == [128, 64, 128] and classes.CITYSCAPES_PALETTE[10] == [70, 130, 180]


# --- listing and splits (no Ray) ----------------------------------------------------------------


def test_pairs_match_nested_folders_extensions_and_spaces(tmp_path):
    root = str(tmp_path)
    save(rgb(8, 8), f"{root}/my images/sub dir/a b.png")
    save(rgb(8, 8), f"{root}/my images/sub dir/c.jpg", fmt="JPEG")
    save(rgb(8, 8), f"{root}/my images/top.tif", fmt="TIFF")
    save(rgb(8, 8), f"{root}/my images/dup.png")
    save(rgb(8, 8), f"{root}/my images/dup.jpg", fmt="JPEG")
    for key in ("sub dir/a b", "sub dir/c", "top", "dup", "orphan"):
        save(np.zeros((8, 8), np.uint8), f"{root}/my masks/{key}.png")
    (tmp_path / "my images" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "my images" / "sub dir" / "._a b.png").write_bytes(b"mac resource fork")
    (tmp_path / "my images" / "notes.txt").write_text("not an image")
    # The same name in two Unicode forms (macOS writes NFD): they pair, under the NFC key.
    save(rgb(8, 8), f"{root}/my images/{unicodedata.normalize('NFC', 'crème')}.png")
    save(np.zeros((8, 8), np.uint8), f"{root}/my masks/{unicodedata.normalize('NFD', 'crème')}.png")
    for folder in ("my images", "my masks"):  # a Latin-1 name: its byte 0xe9 is no UTF-8
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.fsencode(f"{root}/{folder}/caf") + b"\xe9.png", "PNG")
    listing = pairs_layout(storage.resolve(root), "my images", "my masks")
    by_key = {p.key: p for p in listing.pairs}
    assert set(by_key) == {"sub dir/a b", "sub dir/c", "top", "dup", "orphan", "caf\\xe9", "crème"}
    assert by_key["crème"].problem is None
    assert by_key["caf\\xe9"].problem.startswith("file name is not UTF-8 text")
    assert by_key["caf\\xe9"].image.endswith("caf\\xe9.png")  # printable: a manifest and a report can hold it
    assert by_key["sub dir/c"].image.endswith("c.jpg") and by_key["sub dir/c"].mask.endswith("c.png")
    assert by_key["sub dir/a b"].problem is None and by_key["top"].problem is None
    assert by_key["orphan"].problem == "mask without image"
    assert by_key["dup"].problem.startswith("several files for one key")
    assert by_key["top"].image_bytes == os.path.getsize(f"{root}/my images/top.tif")
    with pytest.raises(DataError, match="folder not found.*--images-dir"):
        pairs_layout(storage.resolve(root), "images", "my masks")


def test_keys_match_val_keys_and_a_mask_suffix_in_either_unicode_form(tmp_path):
    """A list file's key (and a VOC key) kept the Unicode form of its file name, and --val-keys typed in the
    other form was 'not in the source'; a --mask-suffix typed in one form missed masks named in the other."""
    nfc, nfd = unicodedata.normalize("NFC", "crème"), unicodedata.normalize("NFD", "crème")
    for key in (nfd, "b"):
        save(rgb(4, 4), f"{tmp_path}/imgs/{key}.png")
        save(np.zeros((4, 4), np.uint8), f"{tmp_path}/msks/{key}.png")
    (tmp_path / "pairs.csv").write_text(f"image,mask\nimgs/{nfd}.png,msks/{nfd}.png\nimgs/b.png,msks/b.png\n")
    pairs, _ = assign_splits(list_layout(storage.resolve(str(tmp_path / "pairs.csv"))), "list", [nfc], None, 0)
    assert sorted(p.split for p in pairs) == ["train", "val"] and next(p for p in pairs if p.key != "b").split == "val"
    save(rgb(4, 4), f"{tmp_path}/p/images/a.png")
    save(np.zeros((4, 4), np.uint8), f"{tmp_path}/p/masks/a_{nfc}.png")
    listing = pairs_layout(storage.resolve(str(tmp_path / "p")), mask_suffix=f"_{nfd}")
    assert [(p.key, p.problem) for p in listing.pairs] == [("a", None)]


def test_val_keys_list_file_and_unknown_keys(tmp_path):
    save(rgb(4, 4), f"{tmp_path}/images/a.png")
    save(rgb(4, 4), f"{tmp_path}/images/b.png")
    save(rgb(4, 4), f"{tmp_path}/images/n/c.png")
    for k in ("a", "b", "n/c"):
        save(np.zeros((4, 4), np.uint8), f"{tmp_path}/masks/{k}.png")
    listing = pairs_layout(storage.resolve(str(tmp_path)))
    keys_file = tmp_path / "val.txt"
    keys_file.write_text("b\nn/c\n\n")
    assert read_val_keys(str(keys_file)) == ["b", "n/c"]
    assert read_val_keys("b, n/c") == ["b", "n/c"]
    pairs, source = assign_splits(listing, "pairs", read_val_keys(str(keys_file)), None, 0)
    assert {p.key: p.split for p in pairs} == {"a": "train", "b": "val", "n/c": "val"}
    assert source == "--val-keys (2 keys)"
    with pytest.raises(ConfigError, match="1 keys not in the source: zz"):
        assign_splits(listing, "pairs", ["b", "zz"], None, 0)


def test_hash_split_is_stable_when_images_are_added(tmp_path):
    for k in range(40):
        save(rgb(2, 2), f"{tmp_path}/images/{k}.png")
        save(np.zeros((2, 2), np.uint8), f"{tmp_path}/masks/{k}.png")
    before = dict(
        (p.key, p.split) for p in assign_splits(pairs_layout(storage.resolve(str(tmp_path))), "pairs", None, 0.3, 5)[0]
    )
    for k in range(40, 80):
        save(rgb(2, 2), f"{tmp_path}/images/{k}.png")
        save(np.zeros((2, 2), np.uint8), f"{tmp_path}/masks/{k}.png")
    after = dict(
        (p.key, p.split) for p in assign_splits(pairs_layout(storage.resolve(str(tmp_path))), "pairs", None, 0.3, 5)[0]
    )
    assert all(after[k] == s for k, s in before.items())
    assert 10 < sum(s == "val" for s in after.values()) < 40


def test_prepare_spec_flags():
    spec = load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_values": "0:0, 255:1", "val_keys": "24,25"})
    assert spec.mask_values == {0: 0, 255: 1}
    spec = load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "val_keys": [24, 25]})
    assert spec.val_keys == ["24", "25"]
    with pytest.raises(ConfigError, match="field 'mask_values': bad entry '0-0'"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_values": "0-0"})
    assert load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_values": "0:0,65535:1"}).mask_values
    with pytest.raises(ConfigError, match="raw value 65536 is outside 0..65535"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_values": "65536:1"})
    with pytest.raises(ConfigError, match="--val-keys or --val-fraction, not both"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "val_keys": "a", "val_fraction": 0.1})
    with pytest.raises(ConfigError, match="--mask-values only apply to --layout pairs"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "layout": "voc", "mask_values": "0:0"})
    with pytest.raises(ConfigError, match="maps to class id 2, but there are only 2 classes"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_values": "0:0,1:2", "num_classes": 2})
    with pytest.raises(ConfigError, match="must be one of"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "layout": "coco"})
    # A repeated name hid one class's figures behind the other's in every per-class table; one name is no
    # segmentation (it used to surface as every pair's "class ids out of range").
    for names in (["a", "a"], ["a", "", "b"], ["a", " "], ["a"]):
        with pytest.raises(ConfigError, match="distinct, non-empty class names"):
            load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "class_names": names})
    # A card written with a repeated name (by a build that allowed one, or by hand) is refused when read.
    card = {"model_id": "m", "model_sha256": "a" * 64, "num_classes": 2, "palette": [[0, 0, 0], [9, 9, 9]]}
    with pytest.raises(ValidationError, match="repeat a name or hold an empty one"):
        ModelCard(**card, class_names=["a", "a"], input={"size": (8, 8)})
    for size in ((0, 0), (-32, 32), (100_000, 100_000)):  # a hand-edited size: a traceback, or 28 GiB asked for
        with pytest.raises(ValidationError, match="height and width from 1 to 65536"):
            ModelCard(**card, class_names=["a", "b"], input={"size": size})


# --- prepare on real Ray --------------------------------------------------------------------------


def test_pairs_image_modes_and_mask_values(ray_cluster, tmp_path):
    """L, LA, RGB, RGBA, P, 16-bit and JPEG images; P masks with arbitrary raw values mapped by --mask-values."""
    src = tmp_path / "src"
    base = rgb(12, 10)
    modes = {"l": "L", "la": "LA", "rgb": "RGB", "rgba": "RGBA", "p": "P"}
    for key, mode in modes.items():
        save(base, f"{src}/images/{key}.png", mode=mode)
    save((np.arange(120, dtype=np.uint16).reshape(12, 10) * 500), f"{src}/images/deep/u16.png")
    save(base, f"{src}/images/deep/photo.jpg", fmt="JPEG")
    assert Image.open(f"{src}/images/deep/u16.png").mode.startswith("I")
    raw = np.full((12, 10), 40, np.uint8)
    raw[:6] = 200
    raw[0] = 7  # not a class: ignore
    for key in [*modes, "deep/u16", "deep/photo"]:
        save(raw, f"{src}/masks/{key}.png", mode="P", palette=voc_devkit_palette())
    data = str(tmp_path / "data")
    manifest = prepare(
        PrepareSpec(
            source=str(src), dest=data, mask_values="40:0,200:1,7:255", val_keys="rgb", class_names=["bg", "fg"]
        )
    )
    assert manifest.counts.to_json() == {"train": 6, "val": 1}
    assert manifest.class_names == ("bg", "fg") and manifest.mask_values == {"7": 255, "40": 0, "200": 1}
    rows = read_rows(data, manifest)
    for row in rows.values():
        assert imaging.decode_image(row["image"]).shape == (12, 10, 3)
        mask = imaging.decode_mask(row["mask"])
        assert (mask[0] == 255).all() and (mask[1:6] == 1).all() and (mask[6:] == 0).all()
    assert rows["deep/photo"]["image"] == (src / "images" / "deep" / "photo.jpg").read_bytes()
    assert manifest.pixel_frequency == pytest.approx([60 / 110, 50 / 110])

    # Without --mask-values the raw values are reported, with the flag to map them.
    with pytest.raises(DataError, match=r"values \[7, 40, 200\].*--mask-values 7:0,40:1,200:2"):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "data2")))
    # A value the mapping leaves out is a bad pair.
    with pytest.raises(DataError, match=r"7 invalid pairs.*mask values not in --mask-values: \[7\]"):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "data3"), mask_values="40:0,200:1"))


def test_voc_layout(ray_cluster, tmp_path):
    write_voc(str(tmp_path / "VOC2012"))
    data = str(tmp_path / "data")
    manifest = prepare(PrepareSpec(source=str(tmp_path / "VOC2012"), dest=data, layout="voc"))
    assert manifest.num_classes == 21 and list(manifest.class_names) == classes.VOC_CLASSES
    assert manifest.to_json()["palette"] == classes.VOC_PALETTE and manifest.ignore_index == 255
    assert manifest.counts.to_json() == {"train": 3, "val": 1}
    assert manifest.splits_from.startswith("ImageSets/Segmentation")
    rows = read_rows(data, manifest)
    assert rows["2007_000039"]["split"] == "val" and "2010_000003" not in rows
    mask = imaging.decode_mask(rows["2007_000032"]["mask"])
    assert set(np.unique(mask)) == {0, 1, 15, 255} and (mask[3] == 255).all()
    assert manifest.ignored_pixels == 4 * 24
    freq = manifest.pixel_frequency
    assert freq[15] > 0 and freq[4] > 0 and freq[5] == 0
    with pytest.raises(ConfigError, match="own splits"):
        prepare(
            PrepareSpec(source=str(tmp_path / "VOC2012"), dest=str(tmp_path / "d2"), layout="voc", val_fraction=0.5)
        )
    # A key listed in a split file without its files is a named bad pair.
    with open(tmp_path / "VOC2012/ImageSets/Segmentation/val.txt", "a") as f:
        f.write("2011_999999\n")
    with pytest.raises(DataError, match="2011_999999: mask without image"):
        prepare(PrepareSpec(source=str(tmp_path / "VOC2012"), dest=str(tmp_path / "d3"), layout="voc"))
    with pytest.raises(DataError, match="point SOURCE at the VOC2012 folder"):
        prepare(PrepareSpec(source=str(tmp_path), dest=str(tmp_path / "d4"), layout="voc"))


def test_voc_without_val_txt_is_split_by_val_keys_or_the_key_hash(tmp_path):
    """A VOC export with train.txt but no val.txt gave 0 val pairs, and the --val-keys the warning advised
    was refused ("the voc source has its own splits"): a dead end. Without val.txt the split files now only
    name the pairs, and --val-keys, --val-fraction or the default hash split them."""
    root = tmp_path / "VOC2012"
    write_voc(str(root))
    sets = root / "ImageSets/Segmentation"
    os.remove(sets / "val.txt")
    listing = list_source(storage.resolve(str(root)), "voc")
    assert listing.split_source is None and [p.key for p in listing.pairs] == [
        "2007_000032",
        "2007_000039",  # named by trainval.txt only
        "2008_000001",
        "2009_000002",
    ]
    pairs, source = assign_splits(listing, "voc", ["2008_000001"], None, 0)
    assert [p.key for p in pairs if p.split == "val"] == ["2008_000001"] and source == "--val-keys (1 keys)"
    pairs, source = assign_splits(listing, "voc", None, None, 0)
    assert source.startswith("key hash, val_fraction 0.2") and {p.split for p in pairs} <= {"train", "val"}
    # With val.txt the files are the splits (train.txt, else trainval.txt less val.txt, is train), and the
    # refusal of --val-keys names the way to split by it.
    (sets / "val.txt").write_text("2007_000039\n")
    os.remove(sets / "train.txt")
    listing = list_source(storage.resolve(str(root)), "voc")
    assert {p.key: p.split for p in listing.pairs} == {
        "2007_000032": "train",
        "2007_000039": "val",
        "2008_000001": "train",
        "2009_000002": "train",
    }
    with pytest.raises(ConfigError, match=r"own splits .*drop --val-keys/--val-fraction, or move .*val.txt away"):
        assign_splits(listing, "voc", ["2008_000001"], None, 0)
    assert "move ImageSets/Segmentation/val.txt away" in no_val_fix(listing)


def test_val_keys_file_with_a_byte_order_mark(tmp_path):
    """Notepad and Excel's "CSV UTF-8" start a file with a BOM: its first key was 'not in the source'."""
    keys_file = tmp_path / "val.txt"
    keys_file.write_bytes(b"\xef\xbb\xbfs0\r\ns1\r\n")
    assert read_val_keys(str(keys_file)) == ["s0", "s1"]


def test_a_masks_folder_inside_the_images_folder_is_not_listed_as_images(tmp_path):
    """`dataset/*.jpg` + `dataset/masks/*.png` (--images-dir . --masks-dir masks) listed every mask as an
    image too, each one 'masks/s0: image without mask'."""
    for key in ("s0", "sub/s1"):
        save(rgb(8, 8), f"{tmp_path}/flat/{key}.jpg", fmt="JPEG")
        save(np.zeros((8, 8), np.uint8), f"{tmp_path}/flat/masks/{key}.png")
        save(rgb(8, 8), f"{tmp_path}/nested/images/{key}.png")
        save(np.zeros((8, 8), np.uint8), f"{tmp_path}/nested/images/masks/{key}.png")
    for images_dir in (".", ""):
        listing = list_source(storage.resolve(str(tmp_path / "flat")), "pairs", images_dir, "masks")
        assert [(p.key, p.problem) for p in listing.pairs] == [("s0", None), ("sub/s1", None)]
    listing = list_source(storage.resolve(str(tmp_path / "nested")), "pairs", "images", "images/masks")
    assert [(p.key, p.problem) for p in listing.pairs] == [("s0", None), ("sub/s1", None)]


def test_links_to_folders_are_followed_as_links_to_files_are(tmp_path):
    """Data sets assembled from links into shared storage: a linked sub-folder of images/ or masks/ was
    skipped without a word (its files 'mask without image', or 'no image files found'). It is followed,
    out of SOURCE too, and a link back to a folder it is in is not (it would never end)."""
    shared = tmp_path / "shared"
    for key in ("x0", "x1"):
        save(rgb(8, 8), f"{shared}/imgs/{key}.png")
        save(np.zeros((8, 8), np.uint8), f"{shared}/msks/{key}.png")
    src = tmp_path / "src"
    save(rgb(8, 8), f"{src}/images/real/r0.png")
    save(np.zeros((8, 8), np.uint8), f"{src}/masks/real/r0.png")
    os.symlink(shared / "imgs", src / "images" / "lnk")
    os.symlink("../../shared/msks", src / "masks" / "lnk")  # a relative link
    os.symlink("..", src / "images" / "real" / "loop")  # cycles: to its folder, to SOURCE, and back
    os.symlink(src, src / "masks" / "real" / "up")
    os.symlink(src / "images", shared / "imgs" / "back")
    listing = list_source(storage.resolve(str(src)), "pairs")
    assert {p.key: p.problem for p in listing.pairs} == {"lnk/x0": None, "lnk/x1": None, "real/r0": None}
    assert next(p for p in listing.pairs if p.key == "lnk/x0").image == f"{src}/images/lnk/x0.png"
    assert next(p for p in listing.pairs if p.key == "lnk/x0").image_bytes == os.path.getsize(shared / "imgs/x0.png")
    os.remove(shared / "imgs" / "back")
    only_links = tmp_path / "only"  # every folder a link: 'no image files found'
    for folder, target in (("images", "imgs"), ("masks", "msks")):
        os.makedirs(only_links / folder)
        os.symlink(shared / target, only_links / folder / "sub")
    assert [p.key for p in list_source(storage.resolve(str(only_links)), "pairs").pairs] == ["sub/x0", "sub/x1"]


def test_cityscapes_layout(ray_cluster, tmp_path):
    label_ids = write_cityscapes(str(tmp_path / "cs"))
    data = str(tmp_path / "data")
    manifest = prepare(PrepareSpec(source=str(tmp_path / "cs"), dest=data, layout="cityscapes"))
    assert manifest.num_classes == 19 and list(manifest.class_names) == classes.CITYSCAPES_CLASSES
    assert manifest.to_json()["palette"] == classes.CITYSCAPES_PALETTE
    assert manifest.counts.to_json() == {"train": 2, "val": 1}
    rows = read_rows(data, manifest)
    assert set(rows) == set(label_ids) and rows["frankfurt/frankfurt_000000_000294"]["split"] == "val"
    for key, ids in label_ids.items():
        expected = np.vectorize(lambda v: CITYSCAPES_TRAIN_IDS.get(int(v), 255))(ids)
        assert (imaging.decode_mask(rows[key]["mask"]) == expected).all()
    freq = manifest.pixel_frequency
    assert freq[0] > 0 and freq[13] > 0 and freq[18] > 0 and freq[1] == 0
    assert manifest.ignored_pixels == 3 * (8 * 8)  # the parking block of each frame


def test_data_info_table(ray_cluster, tmp_path):
    write_voc(str(tmp_path / "VOC2012"))
    manifest = prepare(PrepareSpec(source=str(tmp_path / "VOC2012"), dest=str(tmp_path / "data"), layout="voc"))
    text = format_manifest(str(tmp_path / "data"), manifest)
    assert "train 3, val 1 (total 4)" in text
    lines = text.splitlines()
    person = next(line for line in lines if " person " in line)
    assert person.split()[0] == "15" and "#c08080" in person and person.endswith("%")
    assert any(line.startswith("255") and "(ignore)" in line for line in lines)
    assert "total (2 shards)" in text and re.search(r"shards/\S+/train-00000\.parquet", text)


# --- training input pipeline ----------------------------------------------------------------------


def _encoded_pair(h: int, w: int) -> tuple[bytes, bytes, np.ndarray, np.ndarray]:
    img = rgb(h, w, 3)
    mask = np.zeros((h, w), np.uint8)
    mask[:, : w // 2] = 1
    mask[h // 3 :, w // 2 :] = 2
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue(), imaging.encode_mask(mask), img, mask


def test_augmentation_from_spec_and_master_switch():
    spec = TrainSpec(data="d", out="o", crop="random", scale_jitter=0.2, brightness=0.1, contrast=0.2, rotate90=False)
    assert Augmentation.from_spec(spec) == Augmentation("random", True, False, 0.2, 0.1, 0.2)
    assert Augmentation.from_spec(TrainSpec(data="d", out="o", augment=False, crop="random")) is None
    with pytest.raises(ConfigError, match="field 'crop'"):
        load_spec(TrainSpec, None, {"data": "d", "out": "o", "crop": "centre"})


def test_pipeline_shapes_and_masks_never_interpolated():
    img_bytes, mask_bytes, _, mask = _encoded_pair(30, 50)
    batch = {"image": np.array([img_bytes] * 4, dtype=object), "mask": np.array([mask_bytes] * 4, dtype=object)}
    aug = Augmentation(crop="random", scale_jitter=0.3, brightness=0.2, contrast=0.3)
    for augment in (None, Augmentation(), aug):
        out = decode_for_training(batch, 24, augment)
        assert out["image"].shape == (4, 24, 24, 3) and out["image"].dtype == np.float32
        assert out["mask"].shape == (4, 24, 24) and out["mask"].dtype == np.uint8
        assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
        assert set(np.unique(out["mask"])) <= {0, 1, 2, 255}  # labels, or 255 where scale jitter padded
    plain = decode_for_training(batch, 24, None)
    assert (plain["mask"][0] == imaging.resize_mask(mask, (24, 24))).all()


def test_random_crop_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    # The image encodes each pixel's class in its red channel, so alignment survives any crop, flip or turn.
    mask = rng.integers(0, 3, (40, 64)).astype(np.uint8)
    img = np.stack([mask * 100, np.zeros_like(mask), np.zeros_like(mask)], axis=-1).astype(np.uint8)
    # Shorter side already the training size: a pure random window along the long side, flips and turns.
    starts = set()
    for _ in range(20):
        out_img, out_mask = fit_example(img, mask, 40, Augmentation(crop="random"), rng)
        assert out_img.shape == (40, 40, 3) and out_mask.shape == (40, 40)
        assert (out_img[..., 0] == out_mask * 100).all()
        starts.add(out_mask.tobytes())
    assert len(starts) > 5
    # Zooming out pads: black image where the mask says ignore, so the loss never sees the padding.
    padded = 0
    for _ in range(20):
        out_img, out_mask = fit_example(img, mask, 32, Augmentation(crop="random", scale_jitter=0.5), rng)
        assert out_img.shape == (32, 32, 3) and out_mask.shape == (32, 32)
        assert (out_img[out_mask == 255] == 0).all()
        padded += int((out_mask == 255).any())
    assert padded > 0


def test_photometric_is_clipped_and_off_by_default():
    img = np.full((4, 4, 3), 0.5, np.float32)
    assert photometric(img, Augmentation(), np.random.default_rng(0)) is img
    out = photometric(img, Augmentation(brightness=1.0, contrast=0.5), np.random.default_rng(1))
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0


def test_cli_flags_and_one_line_config_errors(tmp_path):
    from click.testing import CliRunner

    from raysegment.cli import main

    runner = CliRunner()
    help_text = runner.invoke(main, ["prepare", "--help"]).output
    for flag in ("--layout", "--mask-values", "--val-keys", "--skip-invalid", "cityscapes"):
        assert flag in help_text
    help_text = runner.invoke(main, ["train", "--help"]).output
    flip = "--flip [auto|none|horizontal|vertical|both]"
    for flag in ("--augment / --no-augment", "--crop", flip, "--no-flip", "--rotate90", "--scale-jitter"):
        assert flag in help_text
    assert "--brightness" in help_text and "--contrast" in help_text
    assert "--pairs" in runner.invoke(main, ["bench", "prepare", "--help"]).output
    # Spec errors come before Ray starts: one line, exit 2.
    result = runner.invoke(main, ["prepare", str(tmp_path), str(tmp_path / "d"), "--layout", "voc", "--masks-dir", "m"])
    assert result.exit_code == 2 and "--masks-dir only apply to --layout pairs" in result.output
    result = runner.invoke(main, ["prepare", str(tmp_path), str(tmp_path / "d"), "--mask-values", "a:b"])
    assert result.exit_code == 2 and "bad entry 'a:b'" in result.output
    result = runner.invoke(main, ["data-info", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest.json" in result.output


def test_masks_named_with_a_suffix_pair_with_mask_suffix_and_are_hinted_without(tmp_path):
    """Kaggle-style a.png + a_mask.png: every pair was 'image without mask' / 'mask without image' with no
    word of why; now the problem names --mask-suffix, which pairs them."""
    root = str(tmp_path)
    for key in ("a", "sub/b", "c"):
        save(rgb(8, 8), f"{root}/images/{key}.png")
        save(np.zeros((8, 8), np.uint8), f"{root}/masks/{key}_mask.png")
    plain = {p.key: p.problem for p in pairs_layout(storage.resolve(root), "images", "masks").pairs}
    assert plain["a_mask"] == "mask without image (masks look named NAME_mask: pass --mask-suffix _mask)"
    assert plain["a"] == "image without mask"
    paired = pairs_layout(storage.resolve(root), "images", "masks", mask_suffix="_mask").pairs
    assert {p.key: p.problem for p in paired} == {"a": None, "sub/b": None, "c": None}
    assert paired[0].mask.endswith("_mask.png")
    with pytest.raises(ValueError, match="--mask-suffix applies to --layout pairs only"):
        PrepareSpec(source="s", dest="d", layout="voc", mask_suffix="_mask")


def test_names_that_differ_only_in_case_are_named_with_each_other(tmp_path):
    """images/Case.png + masks/case.png pair on Windows and macOS; here they were 'image without mask' and
    'mask without image' with no word of why."""
    root = str(tmp_path)
    save(rgb(8, 8), f"{root}/images/Case.png")
    save(np.zeros((8, 8), np.uint8), f"{root}/masks/case.png")
    save(rgb(8, 8), f"{root}/images/alone.png")
    problems = {p.key: p.problem for p in pairs_layout(storage.resolve(root), "images", "masks").pairs}
    assert problems["Case"] == "image without mask (its name differs only in case from 'case': rename one to match)"
    assert problems["case"] == "mask without image (its name differs only in case from 'Case': rename one to match)"
    assert problems["alone"] == "image without mask"


def test_val_keys_naming_a_stack_put_all_its_pages_in_val():
    """`--val-keys vol` for a multi-page stack was refused as a key not in the source, with a hint that
    did not fit (`vol` is the path without extension); its pages are `vol/0000` .... It now names them all."""
    from raysegment.data.layouts import Listing, Pair, assign_splits

    pages = [Pair(f"vol/000{i}", "vol.tif", "m/vol.tif", page=i) for i in range(3)]
    listing = Listing([*pages, Pair("a", "a.png", "m/a.png"), Pair("dir/b", "dir/b.png", "m/dir/b.png")])
    pairs, source = assign_splits(listing, "pairs", ["vol"], None, 0)
    assert source == "--val-keys (3 keys)"
    assert {p.key: p.split for p in pairs} == {
        "vol/0000": "val",
        "vol/0001": "val",
        "vol/0002": "val",
        "a": "train",
        "dir/b": "train",
    }
    pairs, _ = assign_splits(listing, "pairs", ["vol/0001", "a"], None, 0)
    assert [p.key for p in pairs if p.split == "val"] == ["vol/0001", "a"]
    with pytest.raises(ConfigError, match=r"names 1 keys not in the source: dir; .*a folder of keys ends in /"):
        assign_splits(listing, "pairs", ["dir"], None, 0)  # a folder is no stack


def test_val_keys_ending_in_a_slash_name_a_folder():
    """Data sets shipped as training/ and validation/ folders (ADE20K, LoVeDA, most exports) needed a file
    listing every validation key; `--val-keys validation/` now names the folder."""
    from raysegment.data.layouts import Listing, Pair, assign_splits

    names = ["training/a", "training/b", "validation/c", "validation/sub/d", "validationx/e"]
    listing = Listing([Pair(k, f"{k}.png", f"m/{k}.png") for k in names])
    pairs, source = assign_splits(listing, "pairs", ["validation/"], None, 0)
    assert [p.key for p in pairs if p.split == "val"] == ["validation/c", "validation/sub/d"]
    assert source == "--val-keys (2 keys)"
    pairs, _ = assign_splits(listing, "pairs", ["validation/sub/", "training/a"], None, 0)
    assert [p.key for p in pairs if p.split == "val"] == ["training/a", "validation/sub/d"]
    with pytest.raises(ConfigError, match="names 1 keys not in the source: test/"):
        assign_splits(listing, "pairs", ["validation/", "test/"], None, 0)


def test_a_page_count_mismatch_against_one_mask_page_names_a_bands_array_saved_as_pages():
    """tifffile writes an (H, W, bands) array of other than 3 or 4 bands as H pages of W x bands: prepare said
    only that the image has 64 pages and the mask 1."""
    from raysegment.data.layouts import Pair, _page_mismatch

    pair = Pair("s0", "images/s0.tif", "masks/s0.png")
    assert "photometric='minisblack', planarconfig='contig'" in _page_mismatch(pair, 64, 1)
    assert "photometric" not in _page_mismatch(pair, 3, 2)  # a short stack: no word of bands
