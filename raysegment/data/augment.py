"""Training-time augmentation maths (numpy/scipy), run in the Ray Data CPU tasks of `data/pipeline.py`.

- `warp`: one coordinate map per training window folds together where the window sits (random, or
  centred on a rare-class pixel: `rare_target`), scale jitter, a rotation by any angle and an elastic
  deformation, and samples it once with scipy's `map_coordinates`: the image bilinear at its own
  precision (float32 out), the mask nearest-neighbour with 255 (ignore) wherever the window leaves the
  image, so borders a rotation exposes carry no loss. Sampling the original image (not a cut-out
  window) means a rotated window shows real pixels wherever the image has them.
- `intensity`: contrast, brightness, gamma and Gaussian noise on a whole batch of normalised images at
  once (per-image random factors broadcast), clipped to the data's range; brightness and noise are
  shares of that range, so they mean the same for 8-bit, 16-bit and z-scored data.

Each runs on every window with a random strength up to its setting (nnU-Net draws them per sample too).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from raysegment.data.imaging import IGNORE_INDEX

# Control points of the elastic field are this many output pixels apart (a smooth field, cheap to make).
ELASTIC_GRID = 32


def rare_target(rng: np.random.Generator, mask: np.ndarray, rare: tuple[int, ...]) -> tuple[int, int] | None:
    """(row, col) of a random pixel of a random rare class present in `mask` (each present class equally
    likely, so the rarest gets as many windows as the others), or None when the mask has none of them."""
    counts = np.bincount(mask.ravel(), minlength=256)
    present = [c for c in rare if counts[c]]
    if not present:
        return None
    cls = present[int(rng.integers(len(present)))]
    where = np.flatnonzero(mask == cls)
    flat = int(where[int(rng.integers(len(where)))])
    return divmod(flat, mask.shape[1])


def window_centre(rng: np.random.Generator, extent: int, half: float, target: float | None = None) -> float:
    """Centre (pixel-index units) of a window reaching `half` either side along an axis of `extent` pixels:
    random where the whole window fits inside, else covering the axis with random margins; with a `target`,
    as near it as the image allows (the target stays inside the window)."""
    lo, hi = half - 0.5, extent - 0.5 - half  # the window's edge meets the image's edge
    lo, hi = min(lo, hi), max(lo, hi)
    if target is not None:
        return float(min(max(target, lo), hi))
    return float(rng.uniform(lo, hi))


def elastic_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """(2, size, size) float32 displacements (pixels): Gaussian control points every ELASTIC_GRID pixels,
    bicubically interpolated (Pillow on float32 images: about a millisecond)."""
    n = max(3, math.ceil(size / ELASTIC_GRID) + 1)
    coarse = rng.normal(0.0, sigma, (2, n, n)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(c, mode="F").resize((size, size), Image.BICUBIC)) for c in coarse])


def warp(
    img: np.ndarray,
    mask: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: float = 1.0,
    rotate: float = 0.0,
    elastic: float = 0.0,
    target: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A size x size training window of (img, mask): zoomed by `scale`, turned by a random angle in
    [-rotate, rotate] degrees about its centre, deformed by an elastic field of standard deviation
    `elastic` pixels, placed at random (or on `target`). Image float32 (bilinear, 0 outside), mask uint8
    (nearest, 255 outside)."""
    from scipy import ndimage

    h, w = mask.shape
    half = size / (2.0 * scale)
    cy = window_centre(rng, h, half, None if target is None else target[0])
    cx = window_centre(rng, w, half, None if target is None else target[1])
    d = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) / scale
    angle = math.radians(rng.uniform(-rotate, rotate)) if rotate else 0.0
    cos, sin = math.cos(angle), math.sin(angle)
    rows = cy + cos * d[:, None] - sin * d[None, :]
    cols = cx + sin * d[:, None] + cos * d[None, :]
    if elastic:
        field = elastic_field(rng, size, float(rng.uniform(0.0, elastic)))
        rows, cols = rows + field[0], cols + field[1]
    coords = np.stack([rows, cols])
    out_mask = ndimage.map_coordinates(mask, coords, order=0, mode="constant", cval=IGNORE_INDEX, output=np.uint8)
    out_img = np.empty((size, size, img.shape[2]), np.float32)
    for c in range(img.shape[2]):
        ndimage.map_coordinates(img[..., c], coords, output=out_img[..., c], order=1, mode="constant", cval=0.0)
    return out_img, out_mask


def intensity(
    images: np.ndarray,
    rng: np.random.Generator,
    contrast: float,
    brightness: float,
    gamma: float,
    noise: float,
    low: np.ndarray,
    high: np.ndarray,
    clip: bool = True,
) -> np.ndarray:
    """Random contrast (around each image's mean, x[1-c, 1+c]), brightness (a shift in [-b, b] of the range),
    gamma (exponent log-uniform in [1/(1+g), 1+g] on each image's own min..max) and Gaussian noise (standard
    deviation up to `noise` of the range) on normalised float32 images (..., H, W, C); the range is
    [low, high] per channel (normalised), and the result is clipped to it when `clip`. Each image of a batch
    gets its own random factors."""
    lead = images.shape[:-3]
    per_image = lead + (1, 1, 1)
    span = (high - low).astype(np.float32)
    x = images
    if contrast:
        mean = x.mean(axis=(-3, -2, -1), keepdims=True)
        x = (x - mean) * rng.uniform(1.0 - contrast, 1.0 + contrast, per_image).astype(np.float32) + mean
    if brightness:
        x = x + rng.uniform(-brightness, brightness, per_image).astype(np.float32) * span
    if gamma:
        lo = x.min(axis=(-3, -2, -1), keepdims=True)
        width = np.maximum(x.max(axis=(-3, -2, -1), keepdims=True) - lo, 1e-6)
        exponent = np.exp(rng.uniform(-math.log1p(gamma), math.log1p(gamma), per_image)).astype(np.float32)
        x = lo + width * np.power(np.maximum((x - lo) / width, 0.0), exponent)
    if noise:
        sigma = rng.uniform(0.0, noise, per_image).astype(np.float32) * span
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * sigma
    if clip:
        x = np.clip(x, low, high)
    return x.astype(np.float32, copy=False)
