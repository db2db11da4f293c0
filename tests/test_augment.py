"""Augmentation on the Ray Data CPU tasks (#15): warps keep image and mask aligned and never interpolate
labels, exposed borders are ignored, intensity changes stay in the data's range, and rare-class
oversampling moves the share of windows that contain a rare class as stated (a third of them centred)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import manifest

from raysegment.config import TrainSpec
from raysegment.data import augment
from raysegment.data.examples import Augmentation, fit_example, photometric
from raysegment.data.imaging import IGNORE_INDEX
from raysegment.train.config import rare_classes


def ramps(h: int, w: int) -> np.ndarray:
    """An image whose channel 0 is each pixel's row and channel 1 its column (bilinear sampling is exact on it)."""
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([rows, cols, np.ones_like(rows)], axis=-1)


@pytest.mark.parametrize("kw", [{"rotate": 180.0}, {"rotate": 30.0, "elastic": 6.0, "scale": 0.8}])
def test_warp_moves_image_and_mask_together_and_ignores_what_it_exposes(kw):
    """Masks holding each pixel's row (or column) must come back within half a pixel of the image's bilinear
    value at the same output pixel: one coordinate map for both, nearest-neighbour for the labels."""
    h, w = 90, 120
    img = ramps(h, w)
    row_mask = np.repeat(np.arange(h, dtype=np.uint8)[:, None], w, axis=1)
    col_mask = np.repeat(np.arange(w, dtype=np.uint8)[None, :], h, axis=0)
    exposed = 0
    for seed in range(10):
        out_img, out_rows = augment.warp(img, row_mask, 64, np.random.default_rng(seed), **kw)
        _, out_cols = augment.warp(img, col_mask, 64, np.random.default_rng(seed), **kw)
        inside = out_rows != IGNORE_INDEX
        assert (inside == (out_cols != IGNORE_INDEX)).all()
        assert np.abs(out_img[..., 0][inside] - out_rows[inside]).max() <= 0.5 + 1e-3
        assert np.abs(out_img[..., 1][inside] - out_cols[inside]).max() <= 0.5 + 1e-3
        assert set(np.unique(out_rows[inside])) <= set(range(h))  # labels copied, never blended
        assert (out_img[~inside] == 0).all()  # outside the image: black pixels, ignored labels
        exposed += int((~inside).any())
    assert exposed > 0  # turned windows reach past the image's edge


def test_warp_turns_by_varied_angles():
    img, mask = ramps(200, 200), np.zeros((200, 200), np.uint8)
    rng = np.random.default_rng(1)
    directions = set()
    for _ in range(12):
        out, _ = augment.warp(img, mask, 32, rng, rotate=180.0)
        drow, dcol = out[16, 20, 0] - out[16, 12, 0], out[16, 20, 1] - out[16, 12, 1]  # image step along a row
        directions.add(round(float(np.degrees(np.arctan2(drow, dcol))) / 30))
    assert len(directions) >= 5  # any angle, not only multiples of 90


def test_elastic_field_is_smooth_and_as_strong_as_asked():
    field = augment.elastic_field(np.random.default_rng(0), 256, 4.0)
    assert field.shape == (2, 256, 256) and field.dtype == np.float32
    assert 1.5 < float(field.std()) < 6.0
    assert float(np.abs(np.diff(field, axis=2)).max()) < 1.0  # neighbours move together: no tearing


def test_intensity_augmentation_stays_in_range_with_its_own_factors_per_image():
    images = np.random.default_rng(0).random((8, 16, 16, 3)).astype(np.float32)
    low, high = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = augment.intensity(images, np.random.default_rng(1), 0.3, 0.2, 0.5, 0.1, low, high)
    assert out.shape == images.shape and out.dtype == np.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert len({round(float(d), 4) for d in (out - images).mean(axis=(1, 2, 3))}) == 8
    unclipped = augment.intensity(images, np.random.default_rng(1), 0.0, 0.5, 0.0, 0.0, low, high, clip=False)
    assert float(unclipped.max()) > 1.0 or float(unclipped.min()) < 0.0
    one = images[0]
    assert photometric(one, Augmentation(), np.random.default_rng(0)) is one  # nothing asked: untouched


def _windows_with_rare(aug: Augmentation, seed: int, count: int = 240) -> tuple[float, float]:
    """(share of windows containing class 1, share of class 1 among their labelled pixels) over `count`
    64 px windows of 320 px images with one 6x6 object of the rare class 1 each."""
    rng = np.random.default_rng(seed)
    hits, rare_px, labelled = 0, 0, 0
    for _ in range(count):
        mask = np.zeros((320, 320), np.uint8)
        r, c = rng.integers(0, 314, 2)
        mask[r : r + 6, c : c + 6] = 1
        img = np.repeat(mask[..., None] * 200, 3, axis=2).astype(np.uint8)
        _, window = fit_example(img, mask, 64, aug, rng)
        hits += int((window == 1).any())
        rare_px += int((window == 1).sum())
        labelled += int((window != IGNORE_INDEX).sum())
    return hits / count, rare_px / labelled


@pytest.mark.parametrize("rotate", [0.0, 90.0])
def test_oversampling_centres_a_third_of_the_windows_on_a_rare_class(rotate):
    """Plain random 64 px windows of a 320 px image contain a given 6x6 object (69/257)^2 = 7% of the
    time; with a third centred on a rare pixel, 1/3 + 2/3 x 7% = 38%. Bounds at about 4 sigma for 240."""
    plain = Augmentation("native", False, False, rotate=rotate)
    sampled = Augmentation("native", False, False, rotate=rotate, oversample=1 / 3, rare_classes=(1,))
    base_hits, base_share = _windows_with_rare(plain, seed=0)
    hits, share = _windows_with_rare(sampled, seed=0)
    assert base_hits < 0.15
    assert 0.26 < hits < 0.50
    assert share > 3 * base_share  # the rare class's share of the labelled pixels the loss sees


def test_oversampling_follows_the_spec_and_the_rare_classes_of_the_data_set():
    spec = TrainSpec(data="d", out="o", crop="native", oversample=0.33, rotate=45, elastic=3, gamma=0.2, noise=0.05)
    assert rare_classes(manifest(num_classes=3, pixel_frequency=[0.9, 0.07, 0.03])) == (1, 2)
    # No pixel of class 2 to centre on:
    assert rare_classes(manifest(num_classes=3, pixel_frequency=[0.93, 0.07, 0.0])) == (1,)
    aug = Augmentation.from_spec(spec, (1, 2))
    assert (aug.oversample, aug.rare_classes, aug.rotate, aug.elastic, aug.gamma, aug.noise) == (
        0.33,
        (1, 2),
        45,
        3,
        0.2,
        0.05,
    )
    assert Augmentation.from_spec(spec, ()).oversample == 0.0  # no rare class: nothing to centre on


def test_train_flags_override_the_plans_augmentation():
    from click.testing import CliRunner

    from raysegment.cli import main
    from raysegment.config import load_spec

    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for flag in ("--rotate", "--elastic", "--gamma", "--noise", "--oversample", "--normalization"):
        assert flag in help_text
    spec = load_spec(TrainSpec, None, {"data": "d", "out": "o", "rotate": 0.0, "gamma": 0.5, "normalization": "zscore"})
    assert {"rotate", "gamma", "normalization"} <= spec.model_fields_set  # given: the plan keeps them


@pytest.mark.parametrize("shape", [(512, 512), (300, 1000), (40, 1000), (8, 8), (2048, 257)])
def test_native_validation_scores_each_pixel_of_the_val_images_once(shape):
    """A native-scale model was validated on each val image's central window only: on a data set of 512 px
    slices and 256 px windows, a quarter of the val pixels chose the best checkpoint; on 40x1000 strips, 4%.
    The grid of windows that covers the data set's largest image scores each pixel once (at most
    MAX_VAL_GRID windows a side: past that, the windows are spread over the image)."""
    from raysegment.data.examples import MAX_VAL_GRID, decode_for_training, grid_windows, native_validation
    from raysegment.data.imaging import encode_mask

    h, w = shape
    size = 256
    aug = native_validation(size, 2048, 1000)
    assert aug.grid == (MAX_VAL_GRID, 4) and native_validation(size, 512, 512).grid == (2, 2)
    # Each pixel's row and column, in two channels: a scored window pixel says where it came from.
    rows, cols = np.indices((h, w))
    img = np.stack([rows, cols], axis=-1).astype(np.uint16)
    mask = np.ones((h, w), np.uint8)
    imgs, masks = grid_windows(img, mask, size, aug.grid)
    assert imgs.shape == (16, size, size, 2) and masks.shape == (16, size, size)
    k, y, x = np.nonzero(masks != IGNORE_INDEX)
    where = imgs[k, y, x].astype(np.int64)  # (row, col) of each scored pixel in the image
    assert len(np.unique(where[:, 0] * w + where[:, 1])) == len(where)  # none scored twice
    # Every pixel where the windows a side reach across the image; past that, all the windows' pixels.
    reach = MAX_VAL_GRID * size
    assert len(where) == min(h, reach) * min(w, reach)
    # Through the pipeline's decode: 16 rows per val image, the row count training pads by.
    grey = (mask * 3).astype(np.uint8)
    batch = {"image": np.array([encode_mask(grey)], object), "mask": np.array([encode_mask(mask)], object)}
    out = decode_for_training(batch, size, aug)
    assert out["image"].shape[0] == out["mask"].shape[0] == 16
    assert np.array_equal(out["mask"], masks)
