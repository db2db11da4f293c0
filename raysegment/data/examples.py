"""One training example, numpy only: a decoded pair resized or windowed to the training size, augmented
(`Augmentation`) and normalised as inference normalises.

No Ray here: `data/pipeline.py` maps `decode_for_training` over Ray Data, `bench train`'s plain-Keras side and
`jobs/gpu_check.py` (a GPU machine without Ray) call the same functions. The maths of each op is in
`data/augment.py`.
"""

from __future__ import annotations

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
            tuple(rare_classes),
        )

    @property
    def warps(self) -> bool:
        return bool(self.rotate or self.elastic)


# Validation for `crop: native` models: a deterministic central window, no augmentation.
NATIVE_VAL = Augmentation(crop="center", flip="none", rotate90=False)


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
    h, w = img.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    img, mask = img[top : top + size, left : left + size], mask[top : top + size, left : left + size]
    ph, pw = size - img.shape[0], size - img.shape[1]
    if ph or pw:
        img = np.pad(img, [(0, ph), (0, pw), (0, 0)])
        mask = np.pad(mask, [(0, ph), (0, pw)], constant_values=imaging.IGNORE_INDEX)
    return img, mask


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
    pixels = np.empty((n, size, size, norm.channels), np.float32)  # float32 holds uint8 and uint16 values exactly
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):
        img = imaging.model_pixels(batch["image"][i], imaging.MAX_PIXELS, channels, native)
        mask = imaging.decode_mask(batch["mask"][i])
        pixels[i], masks[i] = fit_example(img, mask, size, augment, rng)
    return {"image": photometric(normalize(pixels, norm), augment, rng, norm), "mask": masks}
