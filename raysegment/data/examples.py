"""One training example, numpy only: a decoded pair resized or windowed to the training size, augmented
(`Augmentation`) and normalised as inference normalises.

No Ray here: `data/pipeline.py` maps `decode_for_training` over Ray Data, `bench train`'s plain-Keras side and
`jobs/gpu_check.py` (a GPU machine without Ray) call the same functions. The maths of each op is in
`data/augment.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raysegment.data import augment as ops
from raysegment.data import imaging
from raysegment.models.card import InputSpec, normalize

if TYPE_CHECKING:
    from raysegment.config import TrainSpec


def data_range(norm: InputSpec) -> tuple[np.ndarray, np.ndarray, bool]:
    """(low, high, clip): the data's range per channel in model units, which photometric augmentation measures
    brightness and noise in, and whether augmented pixels are clipped to it. 8-bit presets: 0..255, clipped (the
    model never sees values beyond); z-scores: the fingerprint's 0.5-99.5 percentiles, clipped only where
    inference clips too (zscore_clipped)."""
    stats = norm.stats
    if stats is not None and stats.low is not None and stats.high is not None:
        raw, clip = (stats.low, stats.high), norm.pixel_clip is not None
    else:
        raw, clip = ((0.0,) * norm.channels, (255.0,) * norm.channels), True
    low, high = normalize(np.asarray(raw, np.float32), norm)
    return low, high, clip


# Flip axes: horizontal mirrors left and right, vertical top and bottom (`TrainSpec.flip`).
FLIP_AXES = {"none": (), "horizontal": (1,), "vertical": (0,), "both": (1, 0)}


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation; the defaults are the flips and turns `augment: true` always meant."""

    crop: str = "resize"  # resize: whole image to SxS; random: shorter side to S, random SxS crop
    flip: str = "both"  # axes (FLIP_AXES); True and False mean both and none, as they did
    rotate90: bool = True
    scale_jitter: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    rotate: float = 0.0  # degrees either way (180: any angle); with `elastic`, windows are warped (`augment.warp`)
    elastic: float = 0.0  # standard deviation of the elastic displacements, pixels
    gamma: float = 0.0
    noise: float = 0.0
    oversample: float = 0.0  # share of windows centred on a pixel of a class in `rare_classes`
    rare_classes: tuple[int, ...] = ()
    grid: tuple[int, int] = (1, 1)  # crop "center": windows per image down and across (`grid_windows`)

    def __post_init__(self) -> None:
        if isinstance(self.flip, bool):
            object.__setattr__(self, "flip", "both" if self.flip else "none")
        if self.flip not in FLIP_AXES:
            raise ValueError(f"flip {self.flip!r}: use one of {', '.join(FLIP_AXES)}")

    @classmethod
    def from_spec(cls, spec: TrainSpec, rare_classes: tuple[int, ...] = ()) -> Augmentation | None:
        """The train spec's augmentation, or None when its master switch `augment` is off."""
        if not spec.augment:
            # A native-scale model still trains on windows, just without augmentation.
            return cls("native", "none", False) if spec.crop == "native" else None
        return cls(
            spec.crop,
            # "auto" is left only where no plan resolved it (--no-plan): both axes, as `flip: true` always did.
            "both" if spec.flip == "auto" else spec.flip,
            spec.rotate90,
            spec.scale_jitter,
            spec.brightness,
            spec.contrast,
            spec.rotate,
            spec.elastic,
            spec.gamma,
            spec.noise,
            spec.oversample if rare_classes else 0.0,
            tuple(rare_classes) if spec.oversample else (),  # only what windows are centred on (the run record)
        )

    @property
    def warps(self) -> bool:
        return bool(self.rotate or self.elastic)


# Validation for `crop: native` models: deterministic windows at the original scale, no augmentation.
NATIVE_VAL = Augmentation(crop="center", flip="none", rotate90=False)
# At most this many windows per side of a val image: a 2048 px image and 256 px windows is scored on 4x4
# windows spread over it, not 8x8 (validation runs every epoch).
MAX_VAL_GRID = 4


def native_validation(size: int, max_height: int, max_width: int) -> Augmentation:
    """Validation for a data set whose largest image is max_height x max_width: the grid of windows that covers
    it (at most MAX_VAL_GRID per side). Every val image gives the same number of windows (the row count
    is known before reading), and each pixel is scored by one window (`grid_windows`). A single central window
    scored 10% of a data set's val pixels, and picked the best checkpoint on them."""
    grid = tuple(min(MAX_VAL_GRID, max(1, math.ceil(extent / size))) for extent in (max_height, max_width))
    return dataclasses.replace(NATIVE_VAL, grid=grid)


def _crop_or_pad(
    rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, size: int, target: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A random SxS window (around `target` where given); where the image is smaller, pad (image 0, mask
    255 = ignore, so no loss there)."""
    for axis in (0, 1):
        extent = img.shape[axis]
        if extent > size:
            if target is None:
                start = int(rng.integers(extent - size + 1))
            else:
                start = int(min(max(round(target[axis] - (size - 1) / 2), 0), extent - size))
            window = (slice(None), slice(start, start + size)) if axis else (slice(start, start + size),)
            img, mask = img[window], mask[window]
        elif extent < size:
            before = int(rng.integers(size - extent + 1))
            pad = [(0, 0)] * img.ndim
            pad[axis] = (before, size - extent - before)
            img = np.pad(img, pad)
            mask = np.pad(mask, pad[:2], constant_values=imaging.IGNORE_INDEX)
    return img, mask


def _fitted_size(h: int, w: int, size: int, crop: str, scale: float) -> tuple[int, int]:
    """(height, width) the image is resized to before its window is taken."""
    if crop == "native":
        # Original scale (x jitter): the model learns at the resolution it will predict at.
        return max(1, round(h * scale)), max(1, round(w * scale))
    if crop == "random":
        # Keep the aspect ratio and bring the shorter side to S (x scale): at scale 1 a square image
        # is seen as inference sees it, and a long one gives a random window along its long side.
        f = size * scale / min(h, w)
        return max(1, round(h * f)), max(1, round(w * f))
    return max(1, round(size * scale)), max(1, round(size * scale))


def _rescaled(target: tuple[int, int] | None, before: tuple[int, ...], after: tuple[int, int]):
    """A pixel position carried through a resize from `before` to `after` (pixel centres kept)."""
    if target is None:
        return None
    return tuple((t + 0.5) * a / b - 0.5 for t, a, b in zip(target, after, before[:2]))


def fit_example(
    img: np.ndarray, mask: np.ndarray, size: int, aug: Augmentation | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Resize or randomly crop one decoded pair to SxS and apply the geometric augmentation."""
    if aug is None:
        return imaging.resize_image(img, (size, size)), imaging.resize_mask(mask, (size, size))
    if aug.crop == "center":
        return center_window(img, mask, size)
    scale = float(rng.uniform(1.0 - aug.scale_jitter, 1.0 + aug.scale_jitter)) if aug.scale_jitter else 1.0
    # nnU-Net's foreground oversampling: this share of windows is centred on a pixel of a rare class.
    target = ops.rare_target(rng, mask, aug.rare_classes) if aug.oversample and rng.random() < aug.oversample else None
    h, w = img.shape[:2]
    if aug.warps:
        # One warp does the zoom, the window's place, the rotation and the elastic field; only the resize
        # to the training size (crop resize/random, as inference resizes) happens before it.
        th, tw = _fitted_size(h, w, size, aug.crop, 1.0)
        if (th, tw) != (h, w):
            img, mask, target = (
                imaging.resize_image(img, (th, tw)),
                imaging.resize_mask(mask, (th, tw)),
                _rescaled(target, (h, w), (th, tw)),
            )
        img, mask = ops.warp(img, mask, size, rng, scale, aug.rotate, aug.elastic, target)
    else:
        th, tw = _fitted_size(h, w, size, aug.crop, scale)
        img = imaging.resize_image(img, (th, tw))
        mask = imaging.resize_mask(mask, (th, tw))  # nearest: class ids are never interpolated
        img, mask = _crop_or_pad(rng, img, mask, size, _rescaled(target, (h, w), (th, tw)))
    for axis in FLIP_AXES[aug.flip]:
        if rng.random() < 0.5:
            img, mask = np.flip(img, axis), np.flip(mask, axis)
    if aug.rotate90:
        k = int(rng.integers(4))
        img, mask = np.rot90(img, k), np.rot90(mask, k)
    return img, mask


def center_window(img: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The central SxS window at the original scale (padded with ignore where the image is smaller)."""
    imgs, masks = grid_windows(img, mask, size, (1, 1))
    return imgs[0], masks[0]


def _owned_spans(extent: int, size: int, count: int) -> list[tuple[int, int, int]]:
    """(start, first owned, end owned) of `count` windows along one side: evenly spread over it (one:
    central), each owning the pixels nearer its centre than any other window's that covers them."""
    if extent <= size:
        starts = [0] * count
    elif count == 1:
        starts = [(extent - size) // 2]
    else:
        starts = [round(i * (extent - size) / (count - 1)) for i in range(count)]
    # Between neighbours, the midpoint of their centres; a window owns nothing past its own edges.
    cuts = [(a + b + size) // 2 for a, b in zip(starts, starts[1:])]
    bounds = [0, *cuts, extent]
    return [(s, max(s, lo), min(s + size, hi, extent)) for s, lo, hi in zip(starts, bounds, bounds[1:])]


def grid_windows(img: np.ndarray, mask: np.ndarray, size: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """grid[0] x grid[1] SxS windows of one image at its scale, for validation. Each pixel is scored once:
    a window's mask keeps the pixels it owns (`_owned_spans`) and is ignore elsewhere, as where it passes
    the image (padded). With windows that cover the image, every pixel is scored."""
    h, w = img.shape[:2]
    imgs = np.zeros((grid[0] * grid[1], size, size, img.shape[2]), img.dtype)
    masks = np.full((grid[0] * grid[1], size, size), imaging.IGNORE_INDEX, np.uint8)
    k = 0
    for top, y0, y1 in _owned_spans(h, size, grid[0]):
        for left, x0, x1 in _owned_spans(w, size, grid[1]):
            window = img[top : top + size, left : left + size]
            imgs[k, : window.shape[0], : window.shape[1]] = window
            if y1 > y0 and x1 > x0:
                masks[k, y0 - top : y1 - top, x0 - left : x1 - left] = mask[y0:y1, x0:x1]
            k += 1
    return imgs, masks


def photometric(
    img: np.ndarray, aug: Augmentation | None, rng: np.random.Generator, norm: InputSpec | None = None
) -> np.ndarray:
    """Random contrast, brightness, gamma and noise (`augment.intensity`) on normalised float32 images
    (one, or a batch with per-image factors), clipped to the data's range (`data_range`; [0, 1] for scale_0_1)."""
    if aug is None or not (aug.brightness or aug.contrast or aug.gamma or aug.noise):
        return img
    low, high, clip = data_range(norm or InputSpec(size=img.shape[-3:-1]))
    return ops.intensity(img, rng, aug.contrast, aug.brightness, aug.gamma, aug.noise, low, high, clip)


def decode_for_training(
    batch: dict[str, np.ndarray], size: int, augment: Augmentation | None, norm: InputSpec | None = None
) -> dict[str, np.ndarray]:
    """Decode, resize or crop to the training size, augment, normalise (`norm`, the model card's input; default
    scale_0_1) and augment intensities, one batch at once."""
    rng = np.random.default_rng()
    n = len(batch["image"])
    norm = norm or InputSpec(size=(size, size))
    # The card's bands, at the files' own precision where its normalisation was computed on them.
    channels, native = imaging.Channels.of(norm.bands, norm.channels), norm.native_pixels
    # Validation windows (crop "center") are a grid of k per image; anything else one example per image.
    k = augment.grid[0] * augment.grid[1] if augment is not None and augment.crop == "center" else 1
    pixels = np.empty((n * k, size, size, norm.channels), np.float32)  # float32 holds uint8 and uint16 values exactly
    masks = np.empty((n * k, size, size), np.uint8)
    for i in range(n):
        img = imaging.model_pixels(batch["image"][i], imaging.MAX_PIXELS, channels, native)
        mask = imaging.decode_mask(batch["mask"][i])
        rows = slice(i * k, (i + 1) * k)
        if k > 1:
            pixels[rows], masks[rows] = grid_windows(img, mask, size, augment.grid)
        else:
            pixels[i], masks[i] = fit_example(img, mask, size, augment, rng)
    return {"image": photometric(normalize(pixels, norm), augment, rng, norm), "mask": masks}
