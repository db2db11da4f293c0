"""TIFF inputs (#19 item 2): multi-page stacks (one pair / one input per slice), multi-band images
(`--bands`, or every band into the model), 16-bit and float images kept at their own precision.

Fixtures are generated with tifffile; every prepared set is read back from its shards: keys, pixel
values and class ids must be exactly the ones written. One tiny model trained on 6-band 16-bit images
covers the bands path through train, infer (a stack among the inputs), show and the report."""

import io
import json
import os
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from raysegment import storage
from raysegment.config import InferSpec, PrepareSpec, TrainSpec, load_spec
from raysegment.data import imaging, tiff
from raysegment.data.manifest import Manifest
from raysegment.data.prepare import prepare
from raysegment.errors import ConfigError, DataError
from raysegment.models.card import ModelCard

H, W = 16, 24
BANDS = 6
GDAL_NODATA = 42113  # the GeoTIFF tag that names a raster's no-data value


def _tiff(path, arr: np.ndarray, **kwargs) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tifffile.imwrite(path, arr, **kwargs)


def _png(path, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def _ids(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 2, (H // 4, W // 4)), np.ones((4, 4), np.int64)).astype(np.uint8)


def _bands(ids: np.ndarray, seed: int) -> np.ndarray:
    """H x W x 6 uint16 over the whole 16-bit range; band 3 says the class (bright on class 1)."""
    arr = np.random.default_rng(seed).integers(0, 60_000, (*ids.shape, BANDS)).astype(np.uint16)
    arr[..., 2] = np.where(ids == 1, 50_000, 8_000) + arr[..., 2] % 1000
    return arr


def _shard_rows(data: str, manifest: Manifest) -> dict[str, dict]:
    rows = {}
    for shard in manifest.shards:
        for row in pq.read_table(os.path.join(data, shard.path)).to_pylist():
            rows[row["key"]] = row
    return rows


def _tiff_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


# --- decoding (no Ray) ----------------------------------------------------------------------------


def test_decoding_keeps_bands_and_precision():
    ids = _ids(0)
    planar = _bands(ids, 1)
    data = _tiff_bytes(np.moveaxis(planar, -1, 0), photometric="minisblack", planarconfig="separate")
    # Every band, interleaved whatever the file's planar configuration, values exact.
    own = imaging.decode_pixels(data, channels=imaging.OWN)
    assert own.pixels.dtype == np.uint16 and own.mode == "uint16x6" and own.bands == BANDS
    np.testing.assert_array_equal(own.pixels, planar)
    picked = imaging.decode_pixels(data, channels=imaging.Channels.of([5, 1, 3]))
    np.testing.assert_array_equal(picked.pixels, planar[..., [4, 0, 2]])
    assert imaging.image_size(data) == (H, W)
    with pytest.raises(imaging.ImageDecodeError, match="image has 6 bands, the model takes 3 channels.*--bands"):
        imaging.decode_pixels(data)
    with pytest.raises(imaging.ImageDecodeError, match="image has 6 bands; --bands asks for band 7"):
        imaging.decode_pixels(data, channels=imaging.Channels.of([1, 7]))

    # 16-bit and float grey: repeated to RGB at their own precision (not rescaled to 8 bits).
    deep = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 151
    got = imaging.decode_pixels(_tiff_bytes(deep)).pixels
    assert got.dtype == np.uint16 and (got == deep[..., None]).all()
    real = np.linspace(-3.5, 1e6, H * W, dtype=np.float32).reshape(H, W)
    got = imaging.decode_pixels(_tiff_bytes(real)).pixels
    assert got.dtype == np.float32 and (got == real[..., None]).all()
    # A float raster's GDAL_NODATA value reads as NaN (no data), Pillow's single-band path or not.
    real[0, :5] = -9999.0
    nodata = {"extratags": [(GDAL_NODATA, "s", 0, "-9999", True)]}
    got = imaging.decode_pixels(_tiff_bytes(real, **nodata)).pixels[..., 0]
    assert np.isnan(got[0, :5]).all() and np.array_equal(got[1:], real[1:])
    _check_integer_nodata(deep)
    colour16 = planar[..., :3]
    got = imaging.decode_pixels(_tiff_bytes(colour16, photometric="rgb")).pixels  # Pillow would cut to 8 bits
    assert got.dtype == np.uint16 and (got == colour16).all()

    # Shown to people: the first three bands, contrast-stretched to the full 8-bit range.
    shown = imaging.display_rgb(own.pixels)
    assert shown.dtype == np.uint8 and shown.shape == (H, W, 3)
    assert shown[..., 0].min() == 0 and shown[..., 0].max() == 255
    # Resized at float precision, channel by channel.
    assert imaging.resize_image(own.pixels, (8, 12)).dtype == np.float32


def _check_integer_nodata(deep: np.ndarray) -> None:
    """A 16-bit raster's GDAL_NODATA (0 here, as satellite scenes have) reads as NaN in a float32 copy; a value
    the type cannot hold (-9999 for uint16, which tifffile itself reads as 0) marks nothing; an 8-bit raster
    keeps its nodata as a value."""
    zero = {"extratags": [(GDAL_NODATA, "s", 0, "0", True)]}
    got = imaging.decode_pixels(_tiff_bytes(deep, **zero)).pixels[..., 0]
    assert got.dtype == np.float32 and (deep == 0).sum() > 0
    assert np.array_equal(np.isnan(got), deep == 0) and np.array_equal(got[deep != 0], deep[deep != 0])
    outside = {"extratags": [(GDAL_NODATA, "s", 0, "-9999", True)]}
    got = imaging.decode_pixels(_tiff_bytes(deep, **outside)).pixels[..., 0]
    assert not np.isnan(got).any() and np.array_equal(got, deep)
    small = (deep % 251).astype(np.uint8)
    got = imaging.decode_pixels(_tiff_bytes(small, **zero)).pixels[..., 0]
    assert got.dtype == np.uint8 and np.array_equal(got, small)


def test_big_raster_windows_read_integer_nodata_as_the_whole_image_decoder_does(tmp_path):
    """The window-by-window reader (`rasters.model_pixels`, rasterio) marks a uint16 GeoTIFF's nodata as the
    whole-image decoder does: the same NaNs, so a big raster and a small one reach the model alike."""
    rasterio = pytest.importorskip("rasterio")
    from raysegment.inference import rasters

    deep = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 151 % 4000).astype(np.uint16)
    path = tmp_path / "scene.tif"
    profile = {"driver": "GTiff", "height": H, "width": W, "count": 1, "dtype": "uint16", "nodata": 0}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(deep, 1)
    stats = {"mean": (2000.0,), "std": (1000.0,)}
    card = ModelCard(
        model_id="unet-test",
        model_sha256="a" * 64,
        num_classes=2,
        class_names=["a", "b"],
        palette=[(0, 0, 0), (200, 0, 0)],
        input={
            "size": (16, 16),
            "channels": 1,
            "bands": [1],
            "pixel_type": "float32",
            "normalization": "zscore",
            "stats": stats,
        },
    )
    whole = imaging.model_pixels(path.read_bytes(), imaging.MAX_PIXELS, imaging.Channels.of([1], 1), True)
    window = rasters.Window(rows=(0, H), cols=(0, W), keep_rows=(0, H), keep_cols=(0, W))
    with rasterio.open(path) as src:
        got = rasters.model_pixels(src, window, card)
    assert got.dtype == whole.dtype == np.float32 and (deep == 0).sum() > 0
    assert np.array_equal(np.isnan(got[..., 0]), deep == 0) and np.array_equal(got, whole, equal_nan=True)


def test_stack_slices_and_infer_rows():
    stack = np.random.default_rng(2).integers(0, 255, (5, H, W), dtype=np.uint8)
    data = _tiff_bytes(stack, photometric="minisblack")
    assert tiff.page_count(data) == 5 and tiff.page_count(b"\x89PNG....") == 1
    assert tiff.page_bytes(data, 3)[:4] == b"\x89PNG"  # 8-bit: a PNG of the slice
    np.testing.assert_array_equal(imaging.decode_pixels(tiff.page_bytes(data, 3)).pixels[..., 0], stack[3])
    floats = np.random.default_rng(3).random((3, H, W)).astype(np.float32)
    page = tiff.page_bytes(_tiff_bytes(floats, photometric="minisblack"), 2)
    assert tiff.is_tiff(page)  # float: a single-page TIFF, values exact
    np.testing.assert_array_equal(imaging.decode_pixels(page).pixels[..., 0], floats[2])
    assert tiff.page_key("vol", 3, 30) == "vol/0003" and tiff.page_key("vol", 3, 12_000) == "vol/00003"
    assert tiff.split_page_uri("s3://b/vol.tif#page=3") == ("s3://b/vol.tif", 3)
    assert tiff.split_page_uri("s3://b/a#page=3.png") == ("s3://b/a#page=3.png", None)

    # infer's rows: a stack becomes one row per slice, other rows pass unchanged.
    png = io.BytesIO()
    Image.fromarray(stack[0]).save(png, format="PNG")
    batch = {
        "key": np.asarray(["vol", "a"], object),
        "source_uri": np.asarray(["/in/vol.tif", "/in/a.png"], object),
        "bytes": np.asarray([data, png.getvalue()], object),
        "error": np.asarray(["", ""], object),
        "collides": np.asarray([False, False]),
    }
    rows = tiff.split_stacks(batch)
    assert list(rows["key"]) == [f"vol/000{i}" for i in range(5)] + ["a"]
    assert rows["source_uri"][2] == "/in/vol.tif#page=2" and rows["bytes"][5] == png.getvalue()
    np.testing.assert_array_equal(imaging.decode_pixels(rows["bytes"][4]).pixels[..., 0], stack[4])


def _looping(pages: int = 3) -> bytes:
    """A classic little-endian TIFF whose last page points back at its first: a page list without end."""
    data = bytearray(_tiff_bytes(np.zeros((pages, 4, 4), np.uint8), photometric="minisblack"))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        first, last = tif.pages[0].offset, tif.pages[pages - 1].offset
    tags = int.from_bytes(data[last : last + 2], "little")
    data[last + 2 + 12 * tags : last + 6 + 12 * tags] = first.to_bytes(4, "little")
    return bytes(data)


@pytest.mark.timeout(60)
def test_hostile_tiffs_are_one_error_each_never_a_hang_or_a_crash(monkeypatch):
    """Each comes as bytes a client may send to `serve` or a folder may hold for `infer`: a looping page
    list (it used to walk for ever), a damaged page header tifffile raises its own errors for, more pages
    than MAX_PAGES, a few pixels of thousands of bands, and PostScript (Pillow would hand it to Ghostscript)."""
    looping = _looping()
    for read in (tiff.page_count, lambda d: tiff.page_bytes(d, 1)):
        with pytest.raises(tiff.TiffError, match="page list loops"):
            read(looping)
    rows = tiff.split_stacks(
        {
            "key": np.asarray(["vol"], object),
            "bytes": np.asarray([looping], object),
            "source_uri": np.asarray(["/in/vol.tif"], object),
            "error": np.asarray([""], object),
        }
    )
    assert list(rows["key"]) == ["vol"] and "page list loops" in rows["error"][0]
    assert imaging.image_size(looping) == (4, 4)  # the first slice is all a header check reads

    damaged = bytearray(_tiff_bytes(np.zeros((2, 4, 4), np.uint8), photometric="minisblack"))
    with tifffile.TiffFile(io.BytesIO(bytes(damaged))) as tif:
        second = tif.pages[1].offset
    damaged[second : second + 2] = (5000).to_bytes(2, "little")  # 5000 tags claimed, past the file's end
    with pytest.raises(tiff.TiffError, match="cannot read TIFF"):
        tiff.page_count(bytes(damaged))

    monkeypatch.setattr(tiff, "MAX_PAGES", 4)
    with pytest.raises(tiff.TiffError, match="more than 4 pages; split the stack"):
        tiff.page_count(_tiff_bytes(np.zeros((6, 4, 4), np.uint8), photometric="minisblack"))

    bands = _tiff_bytes(np.zeros((10, 10, 4000), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(imaging.ImageDecodeError, match="10x10 pixels of 4000 bands .* over the limit of 10000"):
        imaging.decode_pixels(bands, max_pixels=10_000)
    with pytest.raises(tiff.TiffError, match="4000 bands"):
        tiff.page_bytes(bands, 0, max_pixels=10_000)
    assert imaging.decode_pixels(bands, 1_000_000, imaging.OWN).pixels.shape == (10, 10, 4000)

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    for read in (imaging.image_size, imaging.decode_image):
        with pytest.raises(imaging.ImageDecodeError, match="not a PNG, JPEG, TIFF, BMP, WebP or GIF"):
            read(eps)


def test_bands_option_is_checked():
    spec = load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "bands": "4, 2,6"})
    assert spec.bands == [4, 2, 6]
    for bad in ("0,1", "1,1", "a,b", ""):
        with pytest.raises(ConfigError, match="bands"):
            load_spec(PrepareSpec, None, {"source": "s", "dest": "d", "bands": bad})


# --- prepared on real Ray -------------------------------------------------------------------------


def test_stack_pairs_one_pair_per_slice(ray_cluster, s3_prefix, tmp_path):
    """ISBI-style volumes: an image stack + a label stack (0/255) give `vol/0000`..`vol/0004`, each slice's
    pixels and class ids exact; page counts that differ are one problem naming both files. From S3 (page
    headers read with small blocks) the shards are the same bytes."""
    src = tmp_path / "src"
    rng = np.random.default_rng(4)
    volume = rng.integers(0, 255, (5, H, W), dtype=np.uint8)
    labels = np.stack([_ids(10 + i) * 255 for i in range(5)]).astype(np.uint8)
    for folder, arr in (("images", volume), ("masks", labels)):
        _tiff(f"{src}/{folder}/vol.tif", arr, photometric="minisblack")
    _tiff(f"{src}/images/short.tif", volume[:3], photometric="minisblack")
    _tiff(f"{src}/masks/short.tif", labels[:2], photometric="minisblack")

    mismatch = "short: image short.tif has 3 pages but mask short.tif has 2: a TIFF stack needs one mask page"
    with pytest.raises(DataError, match=mismatch):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "d0"), mask_values="0:0,255:1"))

    data = str(tmp_path / "data")
    manifest = prepare(
        PrepareSpec(
            source=str(src),
            dest=data,
            mask_values="0:0,255:1",
            val_keys="vol/0003,vol/0004",
            skip_invalid=True,
        )
    )
    assert manifest.counts.to_json() == {"train": 3, "val": 2} and manifest.channels == 3
    assert [s.key for s in manifest.skipped] == ["short"]
    rows = _shard_rows(data, manifest)
    assert sorted(rows) == [f"vol/000{i}" for i in range(5)]
    for i in range(5):
        row = rows[f"vol/000{i}"]
        assert (row["height"], row["width"], row["split"]) == (H, W, "val" if i >= 3 else "train")
        np.testing.assert_array_equal(imaging.decode_pixels(row["image"]).pixels[..., 0], volume[i])
        np.testing.assert_array_equal(imaging.decode_mask(row["mask"]), labels[i] // 255)

    remote = storage.resolve(f"{s3_prefix}/stacks")
    for path in sorted(src.rglob("*.tif")):
        storage.write_bytes(remote.child(*path.relative_to(src).parts), path.read_bytes())
    again = prepare(
        PrepareSpec(
            source=remote.uri,
            dest=str(tmp_path / "from-s3"),
            mask_values="0:0,255:1",
            val_keys="vol/0003,vol/0004",
            skip_invalid=True,
        )
    )
    assert again.content_hash == manifest.content_hash and again.skipped == manifest.skipped


def test_16_bit_and_float_images_keep_their_values(ray_cluster, tmp_path):
    src, written = tmp_path / "src", {}
    for i in range(3):
        ids = _ids(20 + i)
        deep = (np.random.default_rng(i).integers(0, 4000, (H, W)) + 20_000 * ids.astype(np.int64)).astype(np.uint16)
        real = (np.random.default_rng(i).random((H, W)) * 1e-3 - 0.5 + ids).astype(np.float32)
        for key, arr in ((f"deep{i}", deep), (f"real{i}", real)):
            _tiff(f"{src}/images/{key}.tif", arr)
            _png(f"{src}/masks/{key}.png", ids)
            written[key] = arr
    data = str(tmp_path / "data")
    manifest = prepare(PrepareSpec(source=str(src), dest=data, val_fraction=0.0))
    rows = _shard_rows(data, manifest)
    for key, arr in written.items():
        assert rows[key]["image"] == (src / "images" / f"{key}.tif").read_bytes()  # the file's own bytes
        got = imaging.decode_pixels(rows[key]["image"]).pixels
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got[..., 0], arr, err_msg=key)
    fp = manifest.fingerprint
    assert fp["modes"] == {"F": 3, "I;16": 3} and fp["dtypes"] == {"float32": 3, "uint16": 3}
    assert fp["intensity"]["p99.5"][0] > 20_000  # native units, not 0..255


def test_multiband_bands_or_all_of_them(ray_cluster, tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        ids = _ids(30 + i)
        arr = _bands(ids, 30 + i)
        if i % 2:
            _tiff(f"{src}/images/s{i}.tif", np.moveaxis(arr, -1, 0), photometric="minisblack", planarconfig="separate")
        else:
            _tiff(f"{src}/images/s{i}.tif", arr, photometric="minisblack", planarconfig="contig")
        _png(f"{src}/masks/s{i}.png", ids)

    picked = str(tmp_path / "picked")
    manifest = prepare(PrepareSpec(source=str(src), dest=picked, bands=[2, 3, 6], val_fraction=0.0))
    assert manifest.bands == (2, 3, 6) and manifest.channels == 3
    assert len(manifest.fingerprint["intensity"]["mean"]) == 3
    assert manifest.fingerprint["intensity"]["mean"][1] > 8_000  # band 3, 16-bit values
    rows = _shard_rows(picked, manifest)
    assert rows["s1"]["image"] == (src / "images" / "s1.tif").read_bytes()

    every = str(tmp_path / "every")
    manifest = prepare(PrepareSpec(source=str(src), dest=every, val_fraction=0.0))
    assert manifest.bands is None and manifest.channels == BANDS
    assert manifest.fingerprint["channels"] == {"6": 4} and manifest.fingerprint["modes"] == {"uint16x6": 4}

    # A 6-band scene beside an RGB photo: no common channel count without --bands.
    _png(f"{src}/images/rgb.png", np.zeros((H, W, 3), np.uint8))
    _png(f"{src}/masks/rgb.png", _ids(1))
    with pytest.raises(DataError, match=r"3 channels: 1 images \(e.g. rgb\); 6 channels: 4 images.*--bands"):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "mixed")))
    with pytest.raises(DataError, match=r"rgb: undecodable image: image has 3 bands; --bands asks for band 6"):
        prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "mixed"), bands=[2, 3, 6]))


@pytest.fixture(scope="module")
def band_model(ray_cluster, tmp_path_factory):
    """(data dir, model dir, source dir): a tiny U-Net trained for one short epoch on 6-band 16-bit images and
    float ones with no-data pixels (a quarter NaN or GDAL_NODATA -9999, as GeoTIFF rasters have)."""
    from raysegment.train.trainer import train

    root = tmp_path_factory.mktemp("bands")
    for i in range(8):
        ids = _ids(40 + i)
        arr, tags = _bands(ids, 40 + i), {}
        if i % 2:
            arr = arr.astype(np.float32)
            arr[: H // 4] = -9999.0 if i % 4 == 1 else np.nan
            tags = {"extratags": [(GDAL_NODATA, "s", 0, "-9999", True)]}
        _tiff(f"{root}/src/images/b{i}.tif", arr, photometric="minisblack", planarconfig="contig", **tags)
        _png(f"{root}/src/masks/b{i}.png", ids)
    prepare(PrepareSpec(source=str(root / "src"), dest=str(root / "data"), val_fraction=0.25, seed=1))
    tiny = {"epochs": 1, "workers": 1, "image_size": 16, "batch_size": 2, "depth": 1, "base_filters": 4}
    train(TrainSpec(data=str(root / "data"), out=str(root / "model"), resume=False, tta_check=False, **tiny))
    return root / "data", root / "model", root / "src"


def test_band_model_trains_infers_shows_and_reports(band_model, tmp_path):
    """The network takes the data set's 6 bands; infer splits a stack of 6-band slices into one mask each,
    keeps 16-bit and float inputs at their precision, and refuses an RGB photo; show and report draw them."""
    import keras

    from raysegment.inference.pipeline import infer
    from raysegment.report import write_run_report
    from raysegment.show import show_overlay

    data, model, _ = band_model
    card = ModelCard.read(str(model))
    assert card.input.channels == BANDS and card.input.bands is None
    assert json.loads((model / "model.json").read_text())["input"]["channels"] == BANDS
    # No-data pixels are neither statistics nor inputs: the -9999s would set the 0.5th percentile, and one
    # NaN in a training window would turn the loss, then every weight, into NaN.
    fp = json.loads((data / "manifest.json").read_text())["fingerprint"]
    assert min(fp["intensity"]["p0.5"]) >= 0 and fp["dtypes"] == {"float32": 4, "uint16": 4}
    weights = keras.models.load_model(model / "model.keras", compile=False).get_weights()
    assert all(np.isfinite(w).all() for w in weights)

    inputs = tmp_path / "in"
    stack = np.stack([_bands(_ids(50 + i), 50 + i) for i in range(3)])
    _tiff(f"{inputs}/vol.tif", stack, photometric="minisblack", planarconfig="contig")
    _tiff(f"{inputs}/scene.tif", _bands(_ids(60), 60), photometric="minisblack", planarconfig="contig")
    real = _bands(_ids(61), 61).astype(np.float32)  # counts as floats, as the training floats hold them
    real[:2, :3] = np.nan  # no data: predicted from its neighbours, not an error row
    _tiff(f"{inputs}/real.tif", real, photometric="minisblack", planarconfig="contig")
    # The same scaled to 0..1: every value sits below the training pixels' (257..59,777), an error row.
    _tiff(f"{inputs}/unit.tif", real / 60_000, photometric="minisblack", planarconfig="contig")
    _png(f"{inputs}/photo.png", np.zeros((H, W, 3), np.uint8))
    out = tmp_path / "out"
    record = infer(InferSpec(input=str(inputs), output=str(out), model=str(model), actors="1", report=False))
    assert record["counts"]["processed"] == 7
    table = pq.read_table(out / "summaries", columns=["key", "source_uri", "status", "error"]).to_pylist()
    rows = {r["key"]: r for r in table}
    assert sorted(rows) == ["photo", "real", "scene", "unit", "vol/0000", "vol/0001", "vol/0002"]
    assert "outside the range of the model's training pixels" in rows["unit"]["error"]
    assert rows["vol/0002"]["source_uri"].endswith("vol.tif#page=2")
    assert "image has 3 bands, the model takes 6 channels" in rows["photo"]["error"]
    for key in ("real", "scene", "vol/0000", "vol/0001", "vol/0002"):
        assert rows[key]["status"] == "ok", rows[key]["error"]
        assert Image.open(out / "masks" / f"{key}.png").size == (W, H)

    # A re-run finds the slices done by their own keys: nothing is predicted twice.
    again = infer(InferSpec(input=str(inputs), output=str(out), model=str(model), actors="1", report=False))
    assert again["counts"]["processed"] == 0 and again["status"] == "succeeded"

    report = write_run_report(str(out), samples=8)
    assert report["samples"] == 5 and report["mask_only"] == 0  # every source read, the slices from their stack

    shown = show_overlay(f"{inputs}/vol.tif#page=1", str(model), out=str(tmp_path / "page1.png"))
    assert (shown["page"], shown["pages"]) == (1, 3) and (shown["height"], shown["width"]) == (H, W)
    assert Image.open(tmp_path / "page1.png").size == (W, H)


def test_a_planar_tiff_mask_is_named_as_a_possible_stack():
    """tifffile writes a (4, H, W) array as one page of 4 separate planes: a short label stack read as an
    RGBA colour mask got only the --mask-colors advice. The error now names the other reading."""
    from raysegment.data import masks

    labels = np.zeros((4, 16, 16), np.uint8)
    labels[1, 2:5], labels[2, :, 3] = 255, 255
    planar = io.BytesIO()
    tifffile.imwrite(planar, labels)
    with pytest.raises(imaging.ImageDecodeError, match=r"--mask-colors .*save them as pages .*minisblack"):
        masks.read_mask(planar.getvalue(), masks.PLAIN, None, "x")
    rgb = io.BytesIO()
    Image.fromarray(np.moveaxis(labels[:3], 0, -1)).save(rgb, format="TIFF")  # interleaved colour: no such hint
    with pytest.raises(imaging.ImageDecodeError) as caught:
        masks.read_mask(rgb.getvalue(), masks.PLAIN, None, "x")
    assert "--mask-colors" in str(caught.value) and "pages" not in str(caught.value)


# --- 16-bit colour PNGs, and RGB models given other band counts (no Ray) ---------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4) + kind + body + zlib.crc32(kind + body).to_bytes(4)


def _filtered(rows: np.ndarray, bpp: int) -> bytes:
    """Scanlines (uint8, one a row) filtered as encoders do, the five PNG filter types in turn (0..4)."""
    out, prev = [], np.zeros(rows.shape[1], np.int32)
    for y, row in enumerate(rows.astype(np.int32)):
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        corner = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        guess = left + prev - corner
        d_left, d_up, d_corner = abs(guess - left), abs(guess - prev), abs(guess - corner)
        paeth = np.where((d_left <= d_up) & (d_left <= d_corner), left, np.where(d_up <= d_corner, prev, corner))
        kind = y % 5
        diff = (row, row - left, row - prev, row - (left + prev) // 2, row - paeth)[kind]
        out.append(bytes([kind]) + (diff % 256).astype(np.uint8).tobytes())
        prev = row
    return b"".join(out)


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png16(arr: np.ndarray, interlaced: bool = False, exif: bytes = b"") -> bytes:
    """A 16-bit PNG (grey + alpha, RGB or RGBA by the band count), every filter type used, Adam7 or not, its
    IDAT split in two chunks; written here as encoders write them (Pillow writes no 16-bit colour PNG)."""
    height, width, bands = arr.shape
    colour_type = {2: 4, 3: 2, 4: 6}[bands]
    big = arr.astype(">u2")
    passes = ADAM7 if interlaced else ((0, 0, 1, 1),)
    raw = b""
    for x0, y0, dx, dy in passes:
        part = big[y0::dy, x0::dx]
        if part.size:
            raw += _filtered(part.view(np.uint8).reshape(part.shape[0], -1), 2 * bands)
    packed = zlib.compress(raw)
    ihdr = width.to_bytes(4) + height.to_bytes(4) + bytes([16, colour_type, 0, 0, int(interlaced)])
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + (_png_chunk(b"eXIf", exif) if exif else b"")
        + _png_chunk(b"IDAT", packed[:40])
        + _png_chunk(b"IDAT", packed[40:])
        + _png_chunk(b"IEND", b"")
    )


def _as_tiff(arr: np.ndarray) -> bytes:
    """The same pixels as a 16-bit TIFF, its alpha marked (ExtraSamples) as a PNG's alpha is."""
    bands = arr.shape[2]
    alpha = {"extrasamples": ["unassalpha"]} if bands in (2, 4) else {}
    return _tiff_bytes(arr, photometric="rgb" if bands >= 3 else "minisblack", planarconfig="contig", **alpha)


def _twelve_bit(bands: int, seed: int) -> np.ndarray:
    """A 12-bit camera's values (about 1000, +60 on an object): 3..4 when cut to their high byte."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(1000, 30, (H + 3, W + 5, bands))
    arr[4:12, 6:14] += 60
    if bands in (2, 4):
        arr[..., -1] = rng.integers(0, 65536, arr.shape[:2])  # alpha over the whole 16-bit range
    return arr.clip(0, 65535).astype(np.uint16)


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()[6:]  # the TIFF structure, without Pillow's "Exif\0\0" prefix


def _card(**given) -> ModelCard:
    """The card of a 2-class RGB model (what preprocess reads: infer's, show's and evaluate's decoding)."""
    return ModelCard.create(
        "0" * 64,
        architecture={"name": "unet"},
        num_classes=2,
        class_names=["background", "object"],
        palette=imaging.default_palette(2),
        ignore_index=imaging.IGNORE_INDEX,
        input={"size": [16, 16], "channels": 3, "resize": "bilinear", **given},
    )


@pytest.mark.parametrize("bands", [3, 4, 2])
def test_16_bit_colour_pngs_keep_their_precision_as_the_same_tiff_does(bands):
    """A 16-bit RGB, RGBA or grey + alpha PNG was opened by Pillow at 8 bits (its high bytes: a 12-bit camera's
    ~1000 became 3..4) although the README promises 16-bit PNGs their precision. Each decoder now gives what the
    same pixels as a 16-bit TIFF give: prepare's (and the fingerprint's), infer's for a 16-bit model and for an
    8-bit one (stretched by the image's own maximum), and show's."""
    from raysegment.data.fingerprint import ShardFingerprint, merge
    from raysegment.inference.predictor import preprocess

    arr = _twelve_bit(bands, bands)
    seen = np.repeat(arr[..., :1], 3, axis=2) if bands == 2 else arr[..., :3]  # alpha dropped, grey repeated
    tif = _as_tiff(arr)
    for interlaced in (False, True):
        png = _png16(arr, interlaced)
        for channels in (imaging.OWN, imaging.RGB):
            got, want = imaging.decode_pixels(png, channels=channels), imaging.decode_pixels(tif, channels=channels)
            assert (got.mode, got.bands, got.pixels.dtype) == (want.mode, want.bands, want.pixels.dtype)
            assert (got.mode, got.bands, got.pixels.dtype) == (f"uint16x{bands}", bands, np.uint16)
            np.testing.assert_array_equal(got.pixels, want.pixels)
            np.testing.assert_array_equal(got.pixels, seen)
        stored, decoded = imaging.decode_upright(png)
        assert stored == png and np.array_equal(decoded.pixels, seen)
        # An 8-bit (RGB) model: 16 bits stretched by the image's own maximum, as for a 16-bit grey PNG.
        eight = imaging.decode_image(png)
        assert eight.dtype == np.uint8 and eight.shape == (H + 3, W + 5, 3)
        np.testing.assert_array_equal(eight, imaging.decode_image(tif))
        np.testing.assert_array_equal(eight, (seen * (255.0 / seen.max())).astype(np.uint8))
        assert imaging.display_rgb(decoded.pixels).max() == 255  # show stretches the 16-bit values

    fingerprints = []
    for data in (_png16(arr), tif):
        part = ShardFingerprint()
        part.add("k", imaging.decode_upright(data)[1], np.zeros(arr.shape[:2], np.uint8))
        fingerprints.append(merge([part], 1, [1.0]).to_json())
    assert fingerprints[0] == fingerprints[1] and fingerprints[0]["intensity"]["p50"][0] > 900

    stats = {"mean": [1000.0] * 3, "std": [30.0] * 3, "low": [900.0] * 3, "high": [1100.0] * 3}
    native = _card(normalization="zscore_clipped", pixel_type="float32", stats=stats)
    eight_bit = _card(normalization="scale_0_1")
    batch = {"key": np.array(["png", "tif"], object), "bytes": np.array([_png16(arr), tif], object)}
    for card in (native, eight_bit):
        out = preprocess(dict(batch), card, imaging.MAX_PIXELS)
        assert out["error"].tolist() == ["", ""]  # not "an 8-bit image" for the 16-bit model
        np.testing.assert_array_equal(out["image"][0], out["image"][1])


def test_16_bit_colour_pngs_are_turned_upright_checked_and_refused_as_other_images():
    arr = _twelve_bit(3, 7)
    upright = np.rot90(arr, -1)  # EXIF orientation 6: turn 90 degrees clockwise
    stored, decoded = imaging.decode_upright(_png16(arr, exif=_orientation(6)))
    np.testing.assert_array_equal(decoded.pixels, upright)
    # What prepare stores is the upright image, still 16-bit, without the tag.
    np.testing.assert_array_equal(imaging.decode_pixels(stored, channels=imaging.OWN).pixels, upright)
    assert imaging.decode_image(stored).shape == (W + 5, H + 3, 3)
    for value in range(2, 9):
        pixels = (arr // 257).astype(np.uint8)  # the 8-bit image of the same high bytes, same tag
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", exif=_orientation(value))
        eight = imaging.decode_pixels(buf.getvalue()).pixels
        deep = imaging.decode_pixels(_png16(pixels.astype(np.uint16) * 257, exif=_orientation(value))).pixels
        np.testing.assert_array_equal(deep, eight.astype(np.uint16) * 257, err_msg=f"orientation {value}")

    png = _png16(arr)
    with pytest.raises(imaging.ImageDecodeError, match="over the limit of 100 pixels"):
        imaging.decode_pixels(png, max_pixels=100)  # the header's size, before any pixel is decoded
    with pytest.raises(imaging.ImageDecodeError, match="16-bit PNG whose pixel data is damaged"):
        imaging.decode_pixels(png[:-60])  # the second IDAT cut short
    garbled = bytearray(png)
    garbled[60:70] = b"\xff" * 10  # inside the deflate stream
    for read in (imaging.decode_pixels, imaging.decode_image):
        with pytest.raises(imaging.ImageDecodeError, match="cannot decode image"):
            read(bytes(garbled))


def test_rgb_models_name_the_band_count_of_any_other_tiff():
    """An RGB model given a 2- or 5-band 16-bit TIFF said "a TIFF file whose header is damaged or unsupported",
    and a 2-band 8-bit one (SAR VV/VH) was read as grey, band 2 dropped, and marked ok. Each is now the error
    row naming its band count, as prepare reads them; 16-bit colour TIFFs are stretched by their own maximum."""
    from raysegment.inference.predictor import preprocess

    rng = np.random.default_rng(3)
    files = {
        "two8": (rng.integers(0, 256, (H, W, 2)).astype(np.uint8), "contig", 2),
        "two": (rng.integers(0, 60_000, (H, W, 2)).astype(np.uint16), "contig", 2),
        "five": (rng.integers(0, 60_000, (H, W, 5)).astype(np.uint16), "contig", 5),
        "five_planar": (rng.integers(0, 60_000, (H, W, 5)).astype(np.uint16), "separate", 5),
    }
    card = _card(normalization="scale_0_1")
    encoded = {}
    for key, (arr, planar, bands) in files.items():
        stored = np.moveaxis(arr, -1, 0) if planar == "separate" else arr
        encoded[key] = _tiff_bytes(stored, photometric="minisblack", planarconfig=planar)
        assert imaging.decode_pixels(encoded[key], channels=imaging.OWN).bands == bands  # as prepare reads it
        for read in (imaging.decode_image, lambda d: imaging.model_pixels(d, imaging.MAX_PIXELS, imaging.RGB, False)):
            with pytest.raises(imaging.ImageDecodeError, match=f"image has {bands} bands, the model takes 3 channels"):
                read(encoded[key])
    colour = files["five"][0][..., :3]
    encoded["colour16"] = _tiff_bytes(colour, photometric="rgb")
    out = preprocess(
        {"key": np.array(list(encoded), object), "bytes": np.array(list(encoded.values()), object)},
        card,
        imaging.MAX_PIXELS,
    )
    errors = dict(zip(encoded, out["error"].tolist()))
    for key, (_, _, bands) in files.items():
        assert errors[key].startswith(f"image has {bands} bands, the model takes 3 channels"), errors[key]
    assert errors["colour16"] == ""
    np.testing.assert_array_equal(
        imaging.decode_image(encoded["colour16"]), (colour * (255.0 / colour.max())).astype(np.uint8)
    )
