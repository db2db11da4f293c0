"""Big rasters (inference/rasters.py): TIFFs over --max-pixels read, predicted and written window by window.

A small GeoTIFF checks the stitch (windows of the predictor's own tiles give exactly the whole-image
answer) and the output's georeferencing; a 20,000 x 20,000 GeoTIFF goes through `infer` on real Ray with
the predictor actor's own peak RSS, recorded in its summary row, under 2 GB.
"""

import json
import time

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner
from PIL import Image
from rasterio.windows import Window

from raysegment import storage
from raysegment.bench.infer import make_model_dir
from raysegment.cli import main
from raysegment.config import InferSpec
from raysegment.errors import DataError
from raysegment.inference import rasters
from raysegment.inference.pipeline import infer
from raysegment.inference.predictor import Predictor
from raysegment.models.card import ModelCard
from raysegment.show import show_overlay

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)  # 0.5 m pixels, north up


def write_geotiff(path, height, width, bands, fill, block=256, strip_rows=None):
    """A deflate GeoTIFF written band of rows by band of rows (`fill(row0, rows)` -> bands x rows x width)."""
    layout = (
        {"tiled": True, "blockxsize": block, "blockysize": block}
        if strip_rows is None
        else {
            "tiled": False,
            "blockysize": strip_rows,
        }
    )
    profile = {"driver": "GTiff", "height": height, "width": width, "count": bands, "dtype": "uint8"}
    profile.update(layout, compress="deflate", crs=CRS, transform=TRANSFORM)
    with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(path, "w", **profile) as dst:
        step = 2048
        for r in range(0, height, step):
            rows = min(step, height - r)
            dst.write(fill(r, rows), window=Window(0, r, width, rows))
    return str(path)


def random_fill(seed, bands, width):
    def fill(r, rows):
        return (np.random.default_rng(seed + r).random((bands, rows, width)) * 255).astype(np.uint8)

    return fill


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """A randomly initialised depth-2 U-Net (size multiple 4) whose card says: predict at full resolution."""
    root = str(tmp_path_factory.mktemp("raster-unet"))
    model_dir = make_model_dir(root, image_size=32, depth=2, base_filters=4)
    card = ModelCard.read(model_dir)
    card.model_copy(update={"input": card.input.model_copy(update={"resize": "none"})}).write(
        storage.resolve(model_dir)
    )
    return model_dir


def test_windows_partition_the_raster_and_hold_every_tile_of_what_they_keep():
    for height, width, budget, tile, overlap, multiple in [
        (300, 410, 150 * 150, 64, 32, 4),
        (1000, 70, 200 * 72, 32, 16, 4),
        (20000, 20000, 37_000_000, 1024, 16, 1),
    ]:
        plan = rasters.windows(height, width, budget, tile, overlap, multiple)
        assert max((w.rows[1] - w.rows[0]) * (w.cols[1] - w.cols[0]) for w in plan) <= budget
        for axis, length in (("rows", height), ("cols", width)):
            grid = rasters.Grid.of(length, tile, overlap, multiple)
            kept = sorted({getattr(w, f"keep_{axis}") for w in plan})
            assert kept[0][0] == 0 and kept[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(kept, kept[1:]))  # a partition
            for w in plan:
                (lo, hi), (k0, k1) = getattr(w, axis), getattr(w, f"keep_{axis}")
                touching = [s for s in grid.starts if s < k1 and s + grid.tile > k0]
                assert all(lo <= s and min(s + grid.tile, length) <= hi for s in touching)
    with pytest.raises(DataError, match="--max-pixels 4096 is too small for windows of --tile-size 64"):
        rasters.windows(1000, 1000, 4096, 64, 32, 4)


def test_big_tiffs_in_blocks_are_recognised_from_their_headers(tmp_path):
    tiled = write_geotiff(tmp_path / "tiled.tif", 300, 410, 3, random_fill(0, 3, 410), block=64)
    striped = write_geotiff(tmp_path / "striped.tif", 300, 410, 1, random_fill(1, 1, 410), strip_rows=8)
    whole = write_geotiff(tmp_path / "one-strip.tif", 300, 410, 1, random_fill(2, 1, 410), strip_rows=300)
    info = rasters.read_input(storage.resolve(tiled), 100_000)
    assert info == rasters.RasterInfo(300, 410, 3, "uint8", (64, 64))
    assert rasters.read_input(storage.resolve(striped), 100_000).block == (8, 410)
    # Within the limit, or one strip that would have to be decoded whole: read as bytes, as always.
    assert isinstance(rasters.read_input(storage.resolve(tiled), 300 * 410), bytes)
    assert isinstance(rasters.read_input(storage.resolve(whole), 100_000), bytes)


def test_windows_stitch_to_the_whole_image_prediction_with_the_georeferencing_kept(unet, tmp_path):
    source = write_geotiff(tmp_path / "scene.tif", 300, 410, 3, random_fill(3, 3, 410), block=64)
    predictor = Predictor(unet, tile_size=64, batch_size=8)  # overlap: half a tile
    result = rasters.predict_file(predictor, source, str(tmp_path / "mask.tif"), max_pixels=150 * 150)
    with rasterio.open(source) as src:
        image = np.moveaxis(src.read(), 0, -1)
    whole, whole_conf = predictor._predict_tiled(image)
    assert result.windows > 4 and len(np.unique(whole)) > 1  # several windows; not a one-class model
    with rasterio.open(tmp_path / "mask.tif") as out:
        mask = out.read(1)
        assert (out.crs, out.transform, out.shape, out.dtypes) == (CRS, TRANSFORM, (300, 410), ("uint8",))
        assert out.profile["tiled"] and out.colormap(1)[1][:3] == tuple(ModelCard.read(unet).palette[1])
        assert json.loads(out.tags()["raysegment_class_names"]) == ModelCard.read(unet).class_names
    assert np.array_equal(mask, whole)  # every pixel kept from a window holding all the tiles it blends
    counts = np.bincount(whole.ravel(), minlength=4) / whole.size
    assert np.allclose(result.class_fractions, counts) and abs(result.mean_confidence - whole_conf) < 1e-6


# 144 million pixels in 9 windows of --max-pixels 40 million (README's figures are for 20,000 px: set
# BIG = 20_000 to repeat them; 12,000 keeps the suite quick and the windows' edges at 5056 and 10096).
BIG = 12_000


def stripes(r, rows, width=BIG):
    """Vertical stripes 700 px wide in every third block of 2048 rows, black elsewhere: compresses to ~1 MB."""
    out = np.zeros((1, rows, width), np.uint8)
    if (r // 2048) % 3 == 0:
        out[0, :, (np.arange(width) // 700) % 2 == 1] = 200
    return out


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    """(Keras model, model dir): one 3x3 conv, one foreground logit, bright pixels class 1; imported as a
    native-scale model (size multiple 1) with `raysegment model import`."""
    import keras

    root = tmp_path_factory.mktemp("raster-conv")
    inp = keras.Input((None, None, 3))
    layer = keras.layers.Conv2D(1, 3, padding="same")
    model = keras.Model(inp, layer(inp))
    layer.set_weights([np.full((3, 3, 3, 1), 0.1, np.float32), np.asarray([-1.0], np.float32)])
    model.save(root / "conv.keras")
    result = CliRunner().invoke(
        main,
        ["model", "import", str(root / "conv.keras"), str(root / "model"), "--classes", "dark,bright"]
        + ["--input-size", "native", "--size-multiple", "1", "--output", "logits"],
    )
    assert result.exit_code == 0, result.output
    return model, str(root / "model")


def test_show_overlays_a_view_of_a_big_raster(conv, tmp_path):
    source = write_geotiff(tmp_path / "scene.tif", 2600, 2600, 1, lambda r, n: stripes(r, n, 2600), block=256)
    shown = show_overlay(source, conv[1], str(tmp_path / "shown.png"), max_pixels=4_300_000)  # a big raster here
    assert (shown["height"], shown["width"]) == (2600, 2600) and shown["view"] == [2600, 2600]
    with Image.open(tmp_path / "shown.png") as png:
        assert png.size == (2600, 2600)
    bright = shown["class_fractions"]["bright"]
    assert abs(sum(shown["class_fractions"].values()) - 1) < 1e-6 and 0.3 < bright < 0.42  # stripes in rows 0-2047


@pytest.mark.s3
def test_a_12000_pixel_square_geotiff_on_s3_infers_window_by_window_in_bounded_memory(
    ray_cluster, s3_prefix, conv, tmp_path
):
    t0 = time.monotonic()
    local = write_geotiff(tmp_path / "scene.tif", BIG, BIG, 1, stripes, block=512)
    source = storage.resolve(f"{s3_prefix}/in/scene.tif")
    storage.upload_file(local, source)
    model, model_dir = conv
    generated = time.monotonic() - t0
    spec = InferSpec(
        model=model_dir,
        input=f"{s3_prefix}/in",
        output=f"{s3_prefix}/out",
        max_pixels=40_000_000,  # a window, not the image (144 million pixels)
        tile_size=1024,
        tile_overlap=16,
        batch_size=4,
        actors=(1, 1),
        cpus_per_actor=2,
    )
    record = infer(spec)
    assert record["counts"]["ok"] == 1, record
    out = storage.resolve(f"{s3_prefix}/out")
    (path,) = storage.parquet_files(out.child("summaries"))
    row = storage.read_table(out, path).to_pylist()[0]
    assert row["status"] == "ok" and (row["height"], row["width"]) == (BIG, BIG)
    assert row["mask_uri"] == f"{s3_prefix}/out/masks/scene.tif"
    assert 0 < row["peak_rss_mb"] < 2048, row["peak_rss_mb"]  # the actor's own ru_maxrss
    storage.download_file(storage.resolve(row["mask_uri"]), str(tmp_path / "mask.tif"))
    with rasterio.open(local) as src, rasterio.open(tmp_path / "mask.tif") as mask:
        assert (mask.crs, mask.transform, mask.shape) == (src.crs, src.transform, src.shape)
        assert mask.profile["tiled"] and mask.overviews(1)  # a COG: tiles and overviews
        bright = 0
        # Across stripe edges, windows' edges (5056, 10096) and the image's far corner.
        for r, c in [(0, 550), (4900, 6850), (7000, 4900), (9950, 5000), (BIG - 300, BIG - 450)]:
            box = Window(c, r, 300, 300)
            pixels = np.repeat(src.read(1, window=box)[..., None], 3, axis=-1)
            direct = (model(pixels[None].astype(np.float32) / 255.0).numpy()[0, ..., 0] > 0).astype(np.uint8)
            got = mask.read(1, window=box)
            # Inside the box: at its own edges the direct call lacks the neighbours the mask had.
            assert (got[1:-1, 1:-1] == direct[1:-1, 1:-1]).mean() > 0.999
            bright += int(got.sum())
        assert bright > 0
    assert abs(sum(row["class_fractions"]) - 1) < 1e-6 and 0.15 < row["class_fractions"][1] < 0.25
    report = storage.read_bytes(out.child("report.html")).decode()
    assert "scene" in report and "mask only" not in report  # the overlay from views of source and mask
    print(
        f"RASTER generated {generated:.1f}s infer {record['seconds']}s predict {row['predict_ms'] / 1000:.1f}s total {time.monotonic() - t0:.1f}s peak RSS {row['peak_rss_mb']:.0f} MiB"
    )
