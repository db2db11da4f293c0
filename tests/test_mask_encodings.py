"""Mask encodings in `prepare` (#19 item 1): grey+alpha and RGBA, soft edges with --mask-threshold,
RGB colour codes (pairs and a class_dict.csv), 16-bit and 1-bit masks, EXIF-rotated pairs.

Each prepared set is read back from its shards: the class ids must be exactly the ones drawn."""

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysegment.config import PrepareSpec, load_spec
from raysegment.data import imaging, masks
from raysegment.data.manifest import Manifest, read_manifest
from raysegment.data.prepare import EXIF_TURN, LOSSY_MASK, _check_pair, prepare
from raysegment.errors import ConfigError, DataError

H, W = 12, 20
EXIF_ORIENTATION = 0x0112


def _ids(seed: int, classes: int = 2) -> np.ndarray:
    """Class ids in blocks (so soft edges have boundaries to sit on)."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, classes, (H // 4, W // 4)), np.ones((4, 4), np.int64)).astype(np.uint8)


def _save(img: Image.Image, path, **kwargs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kwargs)


def _image(root, key: str, seed: int, shape: tuple[int, int] = (H, W)) -> None:
    arr = np.random.default_rng(100 + seed).integers(0, 255, (*shape, 3), dtype=np.uint8)
    _save(Image.fromarray(arr), f"{root}/images/{key}.png")


def _shard_masks(data: str, manifest: Manifest) -> dict[str, np.ndarray]:
    out = {}
    for shard in manifest.shards:
        table = pq.read_table(os.path.join(data, shard.path))
        for key, mask in zip(table.column("key").to_pylist(), table.column("mask").to_pylist()):
            out[key] = imaging.decode_mask(mask)
    return out


def _shard_images(data: str, manifest: Manifest) -> dict[str, bytes]:
    out = {}
    for shard in manifest.shards:
        table = pq.read_table(os.path.join(data, shard.path))
        out.update(zip(table.column("key").to_pylist(), table.column("image").to_pylist()))
    return out


def _soft(ids: np.ndarray) -> np.ndarray:
    """0/255 with anti-aliased edges: pixels left of a 0|1 boundary become 90, right of it 170."""
    grey = ids.astype(np.int32) * 255
    edge = np.zeros_like(ids, bool)
    edge[:, 1:] = ids[:, 1:] != ids[:, :-1]
    grey[:, 1:][edge[:, 1:] & (ids[:, 1:] == 1)] = 170  # still >= 128: foreground
    grey[:, :-1][edge[:, 1:] & (ids[:, :-1] == 0)] = 90  # below 128: background
    return grey.astype(np.uint8)


# --- parsing and spec checks (no Ray) -------------------------------------------------------------


def test_color_pairs_and_csv_parse():
    assert masks.parse_color_pairs("0,0,0:0; 128,0,0:1\n0,128,0:2") == {(0, 0, 0): 0, (128, 0, 0): 1, (0, 128, 0): 2}
    assert masks.parse_color_pairs(["0,0,0:0", "9,9,9:255"]) == {(0, 0, 0): 0, (9, 9, 9): 255}
    with pytest.raises(ValueError, match="bad entry '128,0:1'"):
        masks.parse_color_pairs("0,0,0:0;128,0:1")
    with pytest.raises(ValueError, match="listed twice"):
        masks.parse_color_pairs("0,0,0:0;0,0,0:1")
    table = masks.parse_color_csv("name,r,g,b\nSky,128,128,128\nRoad,128,64,128\n", "class_dict.csv")
    assert table.names == ["Sky", "Road"] and table.colors == {(128, 128, 128): 0, (128, 64, 128): 1}
    assert table.palette() == [[128, 128, 128], [128, 64, 128]]
    # CamVid's own table lists Void: unlabelled pixels, not a class to train and score.
    camvid = masks.parse_color_csv("name,r,g,b\nSky,128,128,128\nVoid,0,0,0\nRoad,128,64,128\n", "class_dict.csv")
    assert camvid.names == ["Sky", "Road"] and camvid.num_classes == 2
    assert camvid.colors == {(128, 128, 128): 0, (0, 0, 0): 255, (128, 64, 128): 1}
    with pytest.raises(ConfigError, match="first row must be the header name,r,g,b"):
        masks.parse_color_csv("Sky,128,128,128\nRoad,128,64,128\n", "c.csv")
    with pytest.raises(ConfigError, match="row 3"):
        masks.parse_color_csv("name,r,g,b\nSky,128,128,128\nRoad,300,64,128\n", "c.csv")


def test_spec_mask_encoding_flags():
    spec = load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_colors": "0,0,0:0;255,0,0:1"})
    assert spec.mask_colors == "0,0,0:0;255,0,0:1" and spec.unlisted_colors == "invalid"
    with pytest.raises(ConfigError, match="mask_colors.*bad entry 'red:1'"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_colors": "red:1"})
    with pytest.raises(ConfigError, match="--mask-values and --mask-threshold are different ways"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_values": "0:0", "mask_threshold": 128})
    with pytest.raises(ConfigError, match="--mask-threshold makes two classes"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_threshold": 128, "num_classes": 3})
    with pytest.raises(ConfigError, match="--mask-colors only apply to --layout pairs"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "layout": "voc", "mask_colors": "0,0,0:0"})
    with pytest.raises(ConfigError, match="mask_threshold"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_threshold": 0})


def test_soft_binary_detection():
    hist = np.zeros(256, np.int64)
    hist[0], hist[255], hist[128] = 500, 400, 30
    # One value in between is a class of its own (0/128/255 trimaps, boundary classes): not a fade.
    assert not masks.looks_soft_binary(hist)
    hist[90], hist[170] = 10, 10  # an anti-aliased edge fades through several values
    assert masks.looks_soft_binary(hist)
    hist[1:255] = 50  # values everywhere: not a binary mask
    assert not masks.looks_soft_binary(hist)
    assert not masks.looks_soft_binary(np.bincount([0, 0, 1, 2], minlength=256))
    # VOC-style class ids with a 255 void border: not soft edges (the hint merged every class into one).
    voc = np.zeros(256, np.int64)
    voc[0], voc[255], voc[1], voc[2], voc[20] = 3000, 64, 144, 144, 50
    assert not masks.looks_soft_binary(voc)


def test_a_threshold_over_255_is_for_16_bit_masks_only():
    """--mask-threshold takes 16-bit values now; over 255 on an 8-bit mask it would make every pixel
    background, so that mask is refused. A 16-bit mask without foreground (all 0) is thresholded as one."""
    eight = _encoded(Image.fromarray(np.full((4, 4), 200, np.uint8)), format="PNG")
    with pytest.raises(imaging.ImageDecodeError, match="--mask-threshold 300 is above every value of an 8-bit"):
        masks.read_mask(eight, masks.MaskEncoding(threshold=300), None, "")
    empty = _encoded(Image.fromarray(np.zeros((4, 4), np.uint16)), format="PNG")
    assert not masks.read_mask(empty, masks.MaskEncoding(threshold=32768), None, "").ids.any()
    full = _encoded(Image.fromarray(np.full((4, 4), 65535, np.uint16)), format="PNG")
    assert masks.read_mask(full, masks.MaskEncoding(threshold=32768), None, "").ids.all()


def _encoded(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, **kwargs)
    return buf.getvalue()


def test_jpeg_masks_need_a_threshold_and_unturned_masks_name_the_exif_tag():
    """A JPEG mask's compression makes new ids along edges (0/1/2 became 0..3 on a real try), which
    pass as extra classes: refused unless thresholded. A mask stored unturned beside a phone photo
    tagged to turn is named as such, not as a plain size mismatch."""
    image = _encoded(Image.fromarray(np.full((H, W, 3), 90, np.uint8)), format="PNG")
    ids = _ids(3, classes=3)
    jpeg_ids = _encoded(Image.fromarray(ids), format="JPEG", quality=90)
    assert len(np.unique(np.asarray(Image.open(io.BytesIO(jpeg_ids))))) > 3  # what it would have passed on
    problem, *_ = _check_pair(image, jpeg_ids, None, "", masks.PLAIN, imaging.OWN)
    assert problem is not None and problem.text == LOSSY_MASK and "--mask-threshold 128" in problem.text
    jpeg_binary = _encoded(Image.fromarray(((ids > 0) * 255).astype(np.uint8)), format="JPEG", quality=90)
    problem, got, *_ = _check_pair(image, jpeg_binary, None, "", masks.MaskEncoding(threshold=128), imaging.OWN)
    assert problem is None and set(np.unique(got)) <= {0, 1}

    sideways = _encoded(Image.fromarray(np.zeros((H, W, 3), np.uint8)), format="JPEG", exif=_exif(6))
    unturned = _encoded(Image.fromarray(_ids(1)), format="PNG")  # H x W, as stored; the photo shows W x H
    problem, *_ = _check_pair(sideways, unturned, None, "", masks.PLAIN, imaging.OWN)
    assert (
        problem is not None
        and problem.text == f"size mismatch: image {H}x{W}, mask {W}x{H} (width x height); {EXIF_TURN}"
    )
    problem, *_ = _check_pair(
        image, _encoded(Image.fromarray(_ids(1).T.copy()), format="PNG"), None, "", masks.PLAIN, imaging.OWN
    )
    assert (
        problem is not None and problem.text == f"size mismatch: image {W}x{H}, mask {H}x{W} (width x height)"
    )  # no tag: no word about one
    # A mask drawn on a copy of twice the size (or half) is named as such, with the resampling that keeps ids.
    double = _encoded(Image.fromarray(np.kron(_ids(1), np.ones((2, 2), np.uint8))), format="PNG")
    problem, *_ = _check_pair(image, double, None, "", masks.PLAIN, imaging.OWN)
    assert problem is not None and problem.text.startswith(
        f"size mismatch: image {W}x{H}, mask {2 * W}x{2 * H} (width x height); the mask is exactly 2x the image"
    )
    assert "nearest-neighbour" in problem.text


# --- prepared on real Ray -------------------------------------------------------------------------


def test_grey_alpha_and_rgba_soft_edges_with_threshold(ray_cluster, tmp_path):
    """LA and RGBA masks with anti-aliased edges: the error suggests --mask-threshold, which maps them
    to 0/1 exactly; fully transparent pixels become 255."""
    src, expected = tmp_path / "src", {}
    for i in range(4):
        ids = _ids(i)
        grey = _soft(ids)
        alpha = np.full((H, W), 255, np.uint8)
        alpha[0, :] = 0  # fully transparent: ignore
        alpha[1, :] = 40  # partly transparent: still labelled
        if i % 2:
            mask = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)])
        else:
            rgb = [Image.fromarray(grey)] * 3
            mask = Image.merge("RGBA", [*rgb, Image.fromarray(alpha)])
        _image(src, f"m{i}", i)
        _save(mask, f"{src}/masks/m{i}.png")
        want = ids.copy()
        want[0, :] = 255
        expected[f"m{i}"] = want
    assert {Image.open(f"{src}/masks/m{i}.png").mode for i in range(4)} == {"LA", "RGBA"}

    with pytest.raises(DataError, match=r"soft edges: try --mask-threshold 128"):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "d0")))
    with pytest.raises(DataError, match=r"mask values not in --mask-values: \[90, 170\].*--mask-threshold 128"):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "d1"), mask_values="0:0,255:1"))

    data = str(tmp_path / "data")
    manifest = prepare(PrepareSpec(source=str(src), dest=data, mask_threshold=128, val_fraction=0.0))
    assert manifest.num_classes == 2 and manifest.mask_threshold == 128
    got = _shard_masks(data, manifest)
    assert set(got) == set(expected)
    for key, want in expected.items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    assert manifest.ignored_pixels == 4 * W


def test_colour_coded_masks_from_class_dict_csv(ray_cluster, tmp_path):
    """RGB (and RGBA) colour codes mapped by a CamVid class_dict.csv: names and palette from the CSV,
    ids exact; an unlisted colour makes the pair invalid, or ignore with --unlisted-colors ignore."""
    colours = {"Sky": (128, 128, 128), "Road": (128, 64, 128), "Car": (64, 0, 128)}
    (tmp_path / "class_dict.csv").write_text(
        "name,r,g,b\n" + "".join(f"{n},{r},{g},{b}\n" for n, (r, g, b) in colours.items())
    )
    lut = np.asarray(list(colours.values()), np.uint8)
    src, expected = tmp_path / "src", {}
    for i in range(4):
        ids = _ids(i, classes=3)
        _image(src, f"c{i}", i)
        rgb = Image.fromarray(lut[ids])
        _save(rgb.convert("RGBA") if i == 3 else rgb, f"{src}/masks/c{i}.png")
        expected[f"c{i}"] = ids
    csv_path = str(tmp_path / "class_dict.csv")

    # Without --mask-colors a colour mask is named as such, with the fix.
    with pytest.raises(DataError, match=r"mask colours not mapped: RGB mask with colours 64,0,128; .*--mask-colors"):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "d0")))

    data = str(tmp_path / "data")
    manifest = prepare(PrepareSpec(source=str(src), dest=data, mask_colors=csv_path, val_fraction=0.0))
    assert manifest.class_names == ("Sky", "Road", "Car")
    assert manifest.palette == tuple(colours.values())
    assert manifest.mask_colors == {"128,128,128": 0, "128,64,128": 1, "64,0,128": 2}
    got = _shard_masks(data, manifest)
    for key, want in expected.items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)

    # A colour the table does not list: the pair is invalid, or ignore by option.
    stray = lut[expected["c0"]].copy()
    stray[0, 0] = (1, 2, 3)
    _save(Image.fromarray(stray), f"{src}/masks/c0.png")
    with pytest.raises(DataError, match=r"c0: colours not in --mask-colors: \['1,2,3'\]; .*--unlisted-colors ignore"):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "d1"), mask_colors=csv_path))
    data2 = str(tmp_path / "data2")
    pairs = "128,128,128:0;128,64,128:1;64,0,128:2"
    manifest = prepare(
        PrepareSpec(source=str(src), dest=data2, mask_colors=pairs, unlisted_colors="ignore", val_fraction=0.0)
    )
    assert manifest.class_names == ("class_0", "class_1", "class_2")
    assert manifest.palette == tuple(colours.values())
    got = _shard_masks(data2, manifest)
    assert got["c0"][0, 0] == 255 and (got["c0"].ravel()[1:] == expected["c0"].ravel()[1:]).all()


def test_16_bit_and_1_bit_masks(ray_cluster, tmp_path):
    src, expected = tmp_path / "src", {}
    for i in range(3):
        ids = _ids(i, classes=3)
        _image(src, f"deep{i}", i)
        _save(Image.fromarray(ids.astype(np.uint16)), f"{src}/masks/deep{i}.png")  # I;16
        expected[f"deep{i}"] = ids
    for i in range(3, 5):
        ids = _ids(i)
        _image(src, f"bit{i}", i)
        _save(Image.fromarray(ids.astype(bool)), f"{src}/masks/bit{i}.png")  # mode 1
        expected[f"bit{i}"] = ids
    assert Image.open(f"{src}/masks/deep0.png").mode.startswith("I")
    assert Image.open(f"{src}/masks/bit3.png").mode == "1"
    data = str(tmp_path / "data")
    manifest = prepare(PrepareSpec(source=str(src), dest=data, val_fraction=0.0))
    assert manifest.num_classes == 3
    got = _shard_masks(data, manifest)
    for key, want in expected.items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)

    # 16-bit values that are no small ids: one clear line, with the mapping that works for every mask.
    _save(Image.fromarray(np.full((H, W), 1000, np.uint16)), f"{src}/masks/deep0.png")
    with pytest.raises(DataError, match=r"deep0: 16-bit mask with values 1000 \(.*--mask-values 0:0,1:1,2:2,1000:3;"):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "d1")))
    # A class raster of four codes: every one mapped (the example mapped two, making the others invalid), and
    # no threshold, which would merge three classes.
    codes = np.array([0, 300, 1200, 3000], np.uint16)[np.arange(H * W).reshape(H, W) % 4]
    _save(Image.fromarray(codes), f"{src}/masks/deep0.png")
    with pytest.raises(DataError, match=r"--mask-values 0:0,1:1,2:2,300:3,1200:4,3000:5;") as refused:
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "d1")))
    assert "--mask-threshold" not in str(refused.value)

    # Binary masks saved at 16 bits (0 and 65535, as ImageJ and some scanners write them) could not be
    # mapped at all: --mask-values took bytes only. Both mappings now take 16-bit values.
    binary = tmp_path / "binary"
    want = {}
    for i in range(3):
        ids = _ids(i)
        _image(binary, f"b{i}", i)
        _save(Image.fromarray(ids.astype(np.uint16) * 65535), f"{binary}/masks/b{i}.png")
        want[f"b{i}"] = ids
    with pytest.raises(DataError, match=r"16-bit mask with values 0, 65535 \(.*0:0,65535:1, or --mask-threshold 32768"):
        prepare(PrepareSpec(source=str(binary), dest=str(tmp_path / "d2")))
    for n, flags in enumerate(({"mask_values": {0: 0, 65535: 1}}, {"mask_threshold": 32768})):
        data = str(tmp_path / f"b{n}")
        manifest = prepare(PrepareSpec(source=str(binary), dest=data, val_fraction=0.0, **flags))
        assert manifest.num_classes == 2
        got = _shard_masks(data, manifest)
        for key, ids in want.items():
            np.testing.assert_array_equal(got[key], ids, err_msg=f"{flags} {key}")
    with pytest.raises(DataError, match=r"mask values not in --mask-values: 16-bit mask with values 0, 65535"):
        prepare(PrepareSpec(source=str(binary), dest=str(tmp_path / "d3"), mask_values={0: 0, 255: 1}))


def test_16_bit_masks_holding_different_values_get_one_mapping_for_all(ray_cluster, tmp_path):
    """ADE-style 16-bit masks, each holding a subset of the ids: each group of masks got its own
    --mask-values proposal, mapping the same raw value to different ids. One mapping covers them all now."""
    subsets = [(0, 12, 300), (0, 300, 1200), (12, 1200), (0, 12, 300, 1200)]
    for i, values in enumerate(subsets):
        _image(tmp_path / "src", f"ade{i}", i)
        raw = np.array(values, np.uint16)[np.arange(H * W).reshape(H, W) % len(values)]
        _save(Image.fromarray(raw), f"{tmp_path}/src/masks/ade{i}.png")
    with pytest.raises(DataError) as refused:
        prepare(PrepareSpec(source=str(tmp_path / "src"), dest=str(tmp_path / "d")))
    msg = str(refused.value)
    assert "ade2: 16-bit mask with values 12, 1200 (class ids are 0..254)" in msg
    assert msg.count("--mask-values") == 1
    assert (
        "the masks hold the values 0, 12, 300, 1200 in all: map them with --mask-values 0:0,12:1,300:2,1200:3;" in msg
    )
    assert "--mask-threshold" not in msg  # four values: no binary mask
    # Under a mapping already given, a whole new one would drop its pairs: the values to add are named.
    with pytest.raises(DataError) as refused:
        prepare(PrepareSpec(source=str(tmp_path / "src"), dest=str(tmp_path / "d"), mask_values="0:0,12:1"))
    msg = str(refused.value)
    assert "add the values 300, 1200 to --mask-values as RAW:ID pairs" in msg and "map them with" not in msg


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif.tobytes()


def test_exif_rotated_jpeg_pairs_stay_aligned(ray_cluster, tmp_path):
    """A phone JPEG stored sideways with EXIF orientation 6 (shown turned 90 degrees clockwise): the
    shard holds the upright pixels; a mask drawn upright, and a mask that carries the same EXIF tag,
    both line up with it."""
    src = tmp_path / "src"
    stored = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)  # sideways, as the camera wrote it
    ids_stored = _ids(1)
    ids_upright = np.rot90(ids_stored, k=-1)  # orientation 6 = turn clockwise to view
    for key in ("upright_mask", "tagged_mask"):
        _save(Image.fromarray(stored), f"{src}/images/{key}.jpg", format="JPEG", quality=95, exif=_exif(6))
    _save(Image.fromarray(np.ascontiguousarray(ids_upright)), f"{src}/masks/upright_mask.png")
    _save(Image.fromarray(ids_stored), f"{src}/masks/tagged_mask.png", exif=_exif(6))
    # Without the orientation the sizes would disagree (20x12 against 12x20).
    assert Image.open(f"{src}/images/upright_mask.jpg").size == (W, H)

    data = str(tmp_path / "data")
    manifest = prepare(PrepareSpec(source=str(src), dest=data, num_classes=2, val_fraction=0.0))
    assert manifest.skipped == ()
    got, images = _shard_masks(data, manifest), _shard_images(data, manifest)
    decoded = np.asarray(Image.open(f"{src}/images/upright_mask.jpg").convert("RGB"))  # JPEG pixels, sideways
    for key in ("upright_mask", "tagged_mask"):
        np.testing.assert_array_equal(got[key], ids_upright, err_msg=key)
        image = imaging.decode_image(images[key])
        assert image.shape == (W, H, 3)
        np.testing.assert_array_equal(image, np.rot90(decoded, k=-1))  # lossless: exactly the JPEG's pixels, turned
        assert Image.open(io.BytesIO(images[key])).getexif().get(EXIF_ORIENTATION, 1) == 1
    assert manifest.exif_turned == 0  # a 90-degree turn: the sizes show the untagged mask is upright


def test_an_exif_turn_the_sizes_cannot_show_is_warned_of(ray_cluster, tmp_path, caplog):
    """An image tagged 180 degrees (or mirrored) beside an untagged mask: the sizes match either way, so
    whether the mask was drawn upright cannot be told; it was taken as upright without a word."""
    import logging

    src = tmp_path / "src"
    for key, orientation in (("flipped", 3), ("mirrored", 2), ("plain", 1)):
        _image(src, key, 1)
        image = Image.open(f"{src}/images/{key}.png")
        _save(image, f"{src}/images/{key}.jpg", format="JPEG", quality=95, exif=_exif(orientation))
        os.remove(f"{src}/images/{key}.png")
        _save(Image.fromarray(_ids(1)), f"{src}/masks/{key}.png")
    _save(Image.fromarray(_ids(1)), f"{src}/masks/mirrored.png", exif=_exif(2))  # tagged too: as the image
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        manifest = prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "data"), num_classes=2, val_fraction=0.0))
    assert manifest.exif_turned == 1 and manifest.skipped == ()
    assert "1 images were turned upright by their EXIF orientation tag and their masks carry none: flipped;" in (
        caplog.text
    )


def test_cli_mask_flags(ray_cluster, tmp_path):
    """The flags reach the spec (one-line errors before Ray work), and a colour-coded set prepares from the CLI."""
    from click.testing import CliRunner

    from raysegment.cli import main

    runner = CliRunner()
    src, dest = tmp_path / "src", tmp_path / "data"
    result = runner.invoke(main, ["prepare", str(src), str(dest), "--mask-colors", "0,0,0:0;255,0:1"])
    assert result.exit_code == 2 and "bad entry '255,0:1'" in result.output
    result = runner.invoke(
        main, ["prepare", str(src), str(dest), "--mask-threshold", "128", "--mask-colors", "0,0,0:0"]
    )
    assert result.exit_code == 2 and "--mask-threshold and --mask-colors are different ways" in result.output

    ids = _ids(5)
    _image(src, "a", 5)
    _save(Image.fromarray(np.asarray([[0, 0, 0], [255, 0, 0]], np.uint8)[ids]), f"{src}/masks/a.png")
    args = ["prepare", str(src), str(dest), "--mask-colors", "0,0,0:0;255,0,0:1", "--class-names", "bg,red"]
    result = runner.invoke(main, [*args, "--val-fraction", "0", "--json"])
    assert result.exit_code == 0, result.output
    _, manifest = read_manifest(str(dest))
    assert manifest.class_names == ("bg", "red") and manifest.palette == ((0, 0, 0), (255, 0, 0))
    np.testing.assert_array_equal(_shard_masks(str(dest), manifest)["a"], ids)


def test_a_transparent_background_is_named_and_kept_with_mask_alpha_keep(ray_cluster, tmp_path, caplog):
    """A label layer saved over a transparent background (GIMP, Photoshop): alpha 0 read as unlabelled
    left the background class without a pixel, the model learnt 'everything is foreground' and scored 1.0,
    and nothing said so. prepare now names the empty class and the fix; --mask-alpha keep reads it."""
    import logging

    src = str(tmp_path / "src")
    for i in range(4):
        ids = _ids(i)
        _image(src, f"t{i}", i)
        layer = np.stack([ids * 255] * 3 + [ids * 255], axis=-1).astype(np.uint8)  # background: alpha 0
        _save(Image.fromarray(layer, "RGBA"), f"{src}/masks/t{i}.png")
    # Without a mapping, transparent pixels read as ignore left one value: the advice mapped it to one class
    # (--mask-values 255:0, refused next) and never named --mask-alpha keep.
    with pytest.raises(DataError) as err:
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "d0"), val_keys=["t0"]))
    assert "--mask-values 255:0" not in str(err.value)
    assert "transparent (alpha 0), read as ignore" in str(err.value)
    assert str(err.value).endswith("prepare with --mask-alpha keep --mask-values 0:0,255:1")
    with pytest.raises(DataError, match=r"gives only 1 class.*--mask-alpha keep --mask-values 0:0,255:1$"):
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "d0"), val_keys=["t0"], mask_values={255: 0}))
    base = {"source": src, "mask_values": {0: 0, 255: 1}, "class_names": ["background", "cell"], "val_keys": ["t0"]}
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        dropped = prepare(PrepareSpec(**base, dest=str(tmp_path / "d1")))
    assert dropped.class_pixels["train"][0] == 0 and dropped.mask_alpha == "ignore"
    assert "class background has no labelled pixel in any mask" in caplog.text
    assert "prepare again with --mask-alpha keep" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        kept = prepare(PrepareSpec(**base, dest=str(tmp_path / "d2"), mask_alpha="keep"))
    assert "no labelled pixel" not in caplog.text and kept.ignored_pixels == 0
    shard_masks = _shard_masks(str(tmp_path / "d2"), kept)
    assert all(np.array_equal(shard_masks[f"t{i}"], _ids(i)) for i in range(4))


def test_mask_alpha_keep_is_named_only_where_transparent_pixels_were_read_as_ignore(ray_cluster, tmp_path, caplog):
    """Cityscapes-style grey masks (255 from the value mapping, no alpha channel) with a class absent: the
    warning advised --mask-alpha keep, and again after it was given, sending the user in a loop. Only
    transparent pixels read as ignore name it now; a manifest from before the count was kept names it never."""
    import logging

    from raysegment.data.classes import manifest_warnings
    from raysegment.data.info import format_manifest

    src = str(tmp_path / "src")
    for i in range(4):
        _image(src, f"g{i}", i)
        grey = _ids(i).copy()
        grey[:, :4] = 255  # a fifth of every mask unlabelled by value
        _save(Image.fromarray(grey), f"{src}/masks/g{i}.png")
    base = {"source": src, "num_classes": 3, "val_keys": ["g0"]}
    for alpha in ("ignore", "keep"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="raysegment.progress"):
            manifest = prepare(PrepareSpec(**base, dest=str(tmp_path / f"d-{alpha}"), mask_alpha=alpha))
        assert manifest.ignored_pixels == 4 * 4 * H and manifest.transparent_ignored_pixels == 0
        assert "class class_2 has no labelled pixel in any mask" in caplog.text
        assert "--mask-alpha" not in caplog.text and "transparent" not in caplog.text
        assert "--mask-alpha" not in format_manifest("d", manifest)
    old = Manifest.from_json({k: v for k, v in manifest.to_json().items() if k != "transparent_ignored_pixels"})
    assert not any("--mask-alpha" in w for w in manifest_warnings(old))  # an older manifest still reads
    # The same masks with the unlabelled fifth transparent instead: the advice, with the transparent share.
    for i in range(4):
        grey = _ids(i)
        alpha = np.full((H, W), 255, np.uint8)
        alpha[:, :4] = 0
        _save(Image.fromarray(np.stack([grey, alpha], axis=-1), "LA"), f"{src}/masks/g{i}.png")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raysegment.progress"):
        manifest = prepare(PrepareSpec(**base, dest=str(tmp_path / "d-la")))
    assert manifest.transparent_ignored_pixels == 4 * 4 * H
    assert "20% of the mask pixels are transparent (alpha 0), read as ignore" in caplog.text
    assert "prepare again with --mask-alpha keep" in format_manifest("d", manifest)


def test_palette_masks_give_the_data_set_their_own_colours(ray_cluster, tmp_path):
    """A palette mask's own colours (its annotation tool's) were replaced by VOC's in the manifest, so `show`
    and `report` drew the classes in colours the annotator never saw. Its palette is the data set's now,
    unless a mapping makes its indices other than class ids."""
    colours = [10, 20, 30, 200, 0, 0, 0, 200, 0]
    src = tmp_path / "src"
    for i in range(3):
        _image(src, f"p{i}", i)
        mask = Image.fromarray(_ids(i, classes=3), mode="P")
        mask.putpalette(colours + [0] * (768 - len(colours)))
        _save(mask, f"{src}/masks/p{i}.png")
    manifest = prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "own"), val_keys=["p0"]))
    assert manifest.palette == ((10, 20, 30), (200, 0, 0), (0, 200, 0))
    mapped = prepare(
        PrepareSpec(source=str(src), dest=str(tmp_path / "mapped"), val_keys=["p0"], mask_values={0: 0, 1: 1, 2: 2})
    )
    assert mapped.to_json()["palette"] == imaging.default_palette(3)


def test_mask_zero_ignore_reads_ade20k_style_masks(ray_cluster, tmp_path):
    """ADE20K's SceneParsing masks store 0 for unlabelled pixels and class c as c+1: without a way to say so,
    value 0 became a class of its own, or the user had to list 151 --mask-values pairs."""
    with pytest.raises(ConfigError, match="--mask-values and --mask-zero are different ways"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_values": "0:0", "mask_zero": "ignore"})
    with pytest.raises(ConfigError, match="--mask-zero only apply to --layout pairs"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "layout": "voc", "mask_zero": "ignore"})
    with pytest.raises(ConfigError, match="at most 254 classes: value 255 stays ignore"):
        load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "mask_zero": "ignore", "num_classes": 255})

    src, want = tmp_path / "src", {}
    for i in range(3):
        raw = _ids(i, classes=4)  # values 0..3: 0 unlabelled, 1..3 the classes 0..2
        raw[0, 0] = 255  # 255 stays ignore
        _image(src, f"a{i}", i)
        _save(Image.fromarray(raw), f"{src}/masks/a{i}.png")
        want[f"a{i}"] = np.where(raw == 0, 255, np.where(raw == 255, 255, raw - 1)).astype(np.uint8)
    data = str(tmp_path / "data")
    manifest = prepare(PrepareSpec(source=str(src), dest=data, val_fraction=0.0, mask_zero="ignore"))
    assert manifest.num_classes == 3 and manifest.mask_zero == "ignore"
    assert manifest.ignored_pixels == sum(int((w == 255).sum()) for w in want.values())
    got = _shard_masks(data, manifest)
    for key, ids in want.items():
        np.testing.assert_array_equal(got[key], ids, err_msg=key)
    # With a class count, a value past it names the encoding.
    with pytest.raises(DataError, match=r"mask values over 2 \(--mask-zero ignore: value v is class v-1 of 2\): \[3\]"):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "d2"), mask_zero="ignore", num_classes=2))
