"""The data-set fingerprint (#15 item 1): crafted pairs with known sizes, modes and object areas."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from raysegment import storage
from raysegment.data.fingerprint import Fingerprint, ShardFingerprint, merge, object_areas


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _pair(h: int, w: int, squares: int, grey: bool) -> tuple[bytes, np.ndarray]:
    """An image of value 100 (grey or RGB) with `squares` 4x4 objects of class 1 on class 0."""
    mask = np.zeros((h, w), np.uint8)
    for i in range(squares):
        mask[2 + 8 * i : 6 + 8 * i, 2:6] = 1
    image = np.full((h, w) if grey else (h, w, 3), 100, np.uint8)
    return _png(image), mask


def test_object_areas_are_4_connected_components():
    mask = np.zeros((8, 8), np.uint8)
    mask[0:2, 0:2] = 1  # 4 px
    mask[5:8, 5:8] = 1  # 9 px
    mask[3, 3] = mask[4, 4] = 1  # diagonal neighbours: two objects of 1 px
    assert sorted(object_areas(mask, 1).tolist()) == [1, 1, 4, 9]
    assert object_areas(mask, 2).size == 0


def test_merged_fingerprint_states_sizes_modes_shares_and_object_sizes():
    a, b = ShardFingerprint(), ShardFingerprint()
    image, mask = _pair(40, 60, squares=2, grey=True)
    a.add("a", image, mask)
    image, mask = _pair(50, 30, squares=3, grey=False)
    b.add("b", image, mask)
    image, mask = _pair(20, 20, squares=0, grey=False)
    b.add("c", image, mask)
    fp = merge([a, b], num_classes=2, class_pixel_share=[0.9, 0.1])
    assert fp.images == 3 and fp.sampled_images == 3
    assert fp.height == {"min": 20, "median": 40.0, "max": 50}
    assert fp.width == {"min": 20, "median": 30.0, "max": 60}
    assert fp.modes == {"L": 1, "RGB": 2} and fp.channels == {"1": 1, "3": 2}
    assert fp.intensity["mean"] == [100.0, 100.0, 100.0] and fp.intensity["std"] == [0.0, 0.0, 0.0]
    assert fp.class_image_share == [1.0, pytest.approx(2 / 3, abs=1e-6)]
    # Background is one object per image (2400-32, 1500-48, 400 px); the squares are 16 px each.
    assert fp.object_area_median == [1452.0, 16.0]
    # The squares sit at the left edge, mostly near the top: the data is oriented left-right.
    assert fp.class_left_share[1] == 1.0 and 0.5 < fp.class_top_share[1] <= 1.0
    assert Fingerprint.from_json(fp.to_json()) == fp


@pytest.mark.slow
def test_prepare_stores_the_fingerprint_and_data_info_recomputes_it(ray_cluster, tmp_path):
    from raysegment.config import PrepareSpec
    from raysegment.data.fingerprint import fingerprint_shards
    from raysegment.data.info import describe
    from raysegment.data.prepare import prepare

    for sub in ("images", "masks"):
        os.makedirs(tmp_path / "src" / sub)
    for i in range(6):
        image, mask = _pair(32 + 8 * i, 48, squares=1 + i % 3, grey=i % 2 == 0)
        (tmp_path / "src" / "images" / f"k{i}.png").write_bytes(image)
        Image.fromarray(mask).save(tmp_path / "src" / "masks" / f"k{i}.png")
    manifest = prepare(PrepareSpec(source=str(tmp_path / "src"), dest=str(tmp_path / "data"), val_fraction=0.3))
    fp = Fingerprint.from_json(manifest.fingerprint)
    assert fp.images == 6 and fp.height == {"min": 32, "median": 52.0, "max": 72}
    assert fp.class_image_share == [1.0, 1.0] and fp.object_area_median[1] == 16.0
    assert fp.modes == {"L": 3, "RGB": 3}
    # A data set prepared before fingerprints: data-info computes the same from the shards.
    again = fingerprint_shards(storage.resolve(str(tmp_path / "data")), manifest)
    assert again.to_json() == manifest.fingerprint
    text = describe(str(tmp_path / "data"))
    assert "median object px" in text and "height 32/52/72" in text
    # `raysegment plan` reads the stored fingerprint and writes the plan it prints (window: the median side, 48;
    # native, as resizing the 72 px images to 48 would shrink the 16 px squares to 7 px).
    from click.testing import CliRunner

    from raysegment.cli import main

    out = tmp_path / "plan.json"
    res = CliRunner().invoke(main, ["plan", str(tmp_path / "data"), "--time-budget", "10m", "--out", str(out)])
    assert res.exit_code == 0, res.output
    written = json.loads(out.read_text())
    assert written["image_size"] == 48 and written["crop"] == "native" and written["time_budget_s"] == 600
    assert "training plan" in res.output and f"written to {out}" in res.output

    # A fingerprint from an earlier version (no side shares, no decoded pixel types) is computed afresh by
    # `plan`, `train` and `data-info`, not read as if it held what this version's rules need.
    from raysegment.plan import read_fingerprint

    old = {k: v for k, v in manifest.fingerprint.items() if k not in ("class_top_share", "dtypes")}
    assert not Fingerprint.is_current(old) and Fingerprint.is_current(manifest.fingerprint)
    stale = dataclasses.replace(manifest, fingerprint=old)
    assert read_fingerprint(storage.resolve(str(tmp_path / "data")), stale).to_json() == manifest.fingerprint


def test_an_earlier_fingerprint_loads_without_the_fields_it_lacks():
    image, mask = _pair(40, 60, squares=2, grey=True)
    part = ShardFingerprint()
    part.add("a", image, mask)
    stored = merge([part], num_classes=2, class_pixel_share=[0.9, 0.1]).to_json()
    old = {k: v for k, v in stored.items() if k not in ("class_top_share", "class_left_share", "dtypes")}
    fp = Fingerprint.from_json({**old, "a_later_field": 1})
    assert fp.class_top_share == [None, None] and fp.class_left_share == [None, None] and fp.dtypes == {}
    assert fp.class_pixel_share == stored["class_pixel_share"] and fp.intensity == stored["intensity"]


def test_infinite_float_pixels_are_left_out_of_the_intensity_statistics():
    """A float image's +-inf (as its NaNs) would make the mean infinite and the std NaN, and with them
    every normalised input pixel."""
    from raysegment.data.fingerprint import _intensity

    values = np.linspace(0.0, 1.0, 200)
    finite = _intensity([[v] for v in values])
    with_inf = _intensity([[v] for v in values] + [[np.inf], [-np.inf], [np.nan]] * 5)
    assert with_inf == finite
    assert all(np.isfinite(v[0]) for v in with_inf.values())


def test_eight_bit_images_among_sixteen_bit_ones_are_warned_of():
    """One 16-bit image switched a whole 8-bit data set to normalisation at 16-bit units, without a word:
    the fingerprint now says so (prepare logs it, data-info prints it)."""
    from raysegment.data.fingerprint import format_fingerprint

    part = ShardFingerprint()
    for i in range(3):
        image, mask = _pair(16, 16, squares=1, grey=True)
        part.add(f"eight{i}", image, mask)
    part.add("deep", _png(np.full((16, 16), 40000, np.uint16)), mask)
    fp = merge([part], num_classes=2, class_pixel_share=[0.9, 0.1])
    assert fp.high_depth and "3 of 4 images are 8-bit" in (fp.mixed_depth or "")
    assert any(
        line.strip().startswith("warning") and "one bit depth" in line for line in format_fingerprint(fp, ["a", "b"])
    )
    only_eight = ShardFingerprint()
    only_eight.add("e", image, mask)
    assert merge([only_eight], num_classes=2, class_pixel_share=[0.9, 0.1]).mixed_depth is None
    # A model of the mixed data set at 16-bit units records that it saw 8-bit images: infer takes them.
    from raysegment.train.config import pixel_type

    assert pixel_type(fp, "zscore_clipped") == ("float32", True)
    assert pixel_type(fp, "scale_0_1") == ("uint8", False)  # all at 8 bits: nothing to take


def test_float_images_in_0_1_among_counts_are_warned_of():
    """A float image normalised to 0..1 among 12-bit counts was accepted without a word; under the counts'
    normalisation it is one constant, and its mask came out as noise marked ok. The fingerprint names it."""
    from raysegment.data.fingerprint import format_fingerprint
    from raysegment.data.imaging import Decoded

    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 1
    rng = np.random.default_rng(0)
    counts = [Decoded(rng.integers(200, 4000, (8, 8, 1)).astype(np.uint16), "I;16", 1) for _ in range(3)]
    unit = Decoded(rng.random((8, 8, 1)).astype(np.float32), "F", 1)
    part = ShardFingerprint()
    for i, image in enumerate([*counts, unit]):
        part.add(f"k{i}", image, mask)
    fp = merge([part], num_classes=2, class_pixel_share=[0.5, 0.5])
    assert fp.unit_range == 1 and "1 of 4 16-bit or float images hold values in 0..1 only" in (fp.mixed_range or "")
    assert any("one range" in line for line in format_fingerprint(fp, ["a", "b"]))
    blank = ShardFingerprint()  # an empty or binary 16-bit tile is no normalised image
    for i, image in enumerate([*counts, Decoded(np.zeros((8, 8, 1), np.uint16), "I;16", 1)]):
        blank.add(f"b{i}", image, mask)
    assert merge([blank], num_classes=2, class_pixel_share=[0.5, 0.5]).mixed_range is None
    only_unit = ShardFingerprint()
    only_unit.add("u", unit, mask)  # a data set of 0..1 floats throughout is one range
    assert merge([only_unit], num_classes=2, class_pixel_share=[0.5, 0.5]).mixed_range is None
    assert Fingerprint.is_current({**fp.to_json()} | {"unit_range": 0}) and "unit_range" in fp.to_json()
    older = {k: v for k, v in fp.to_json().items() if k != "unit_range"}
    assert Fingerprint.is_current(older) and Fingerprint.from_json(older).unit_range == 0  # not recomputed
