"""From the model's probabilities to a class map at the image's own size.

Two cases, both on class probabilities, never on class ids:

- Resized models predict at the card's input size; the probabilities are upsampled bilinearly
  (half-pixel centres, edges clamped: the coordinates of `tf.image.resize(..., "bilinear")`) to the
  image's size and the argmax is taken there, so a class boundary lands between model pixels
  instead of on a nearest-neighbour staircase. `raysegment export` builds the same arithmetic
  in graph ops (`bilinear_weights` with tensors), so the exported mask equals infer's.
- Native-scale models on images larger than a tile: sliding windows with overlap (default half a
  tile), each window's probabilities weighted by a Gaussian centred on it (sigma = tile / 8, as
  nnU-Net), summed, and the argmax of the sum. A window's border pixels see the least context;
  the weighting lets the window where a pixel is most central decide it.

Memory stays bounded by a band of rows: windows are visited row by row and rows no later window
touches are finished and dropped (`WindowBlender`), so a tall image costs one tile-high band of
probabilities, not the image's.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

SIGMA_FRACTION = 1 / 8
MIN_WEIGHT = 1e-3  # of the centre's: the corners of a window still count a little
ROWS_PER_CHUNK = 256


def argmax_and_max(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 argmax, max) over the last (class) axis, the first class on ties as np.argmax. A loop over
    the K planes: numpy reduces a short last axis about 50x slower than it compares whole planes
    (measured: max over K=2 of 400M pixels 14.6 s, the loop 0.3 s)."""
    top = probs[..., 0].copy()
    classes = np.zeros(probs.shape[:-1], np.uint8)
    for k in range(1, probs.shape[-1]):
        plane = probs[..., k]
        classes[plane > top] = k
        np.maximum(top, plane, out=top)
    return classes, top


def bilinear_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first source index, second source index, float32 weight of the second) for each of `dst`
    output pixels resampled from `src` (half-pixel centres, edges clamped)."""
    pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    low = np.floor(pos)
    first = np.clip(low, 0, src - 1).astype(np.int64)
    second = np.clip(low + 1, 0, src - 1).astype(np.int64)
    return first, second, (pos - low).astype(np.float32)


def upsample_argmax(probs: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """(uint8 class map of `size`, mean top probability) from (h, w, K) probabilities, resized
    bilinearly ROWS_PER_CHUNK output rows at a time (a 12-megapixel photo never holds K full planes)."""
    height, width = size
    c0, c1, cw = bilinear_weights(probs.shape[1], width)
    left, right = probs[:, c0], probs[:, c1]
    cols = left + (right - left) * cw[None, :, None]  # (h, width, K): x first, as tf.image.resize
    r0, r1, rw = bilinear_weights(probs.shape[0], height)
    out = np.empty((height, width), np.uint8)
    top_sum = 0.0
    for start in range(0, height, ROWS_PER_CHUNK):
        stop = min(height, start + ROWS_PER_CHUNK)
        upper, lower = cols[r0[start:stop]], cols[r1[start:stop]]
        chunk = upper + (lower - upper) * rw[start:stop, None, None]
        out[start:stop], top = argmax_and_max(chunk)
        top_sum += float(top.sum(dtype=np.float64))
    return out, top_sum / max(1, height * width)


def gaussian_window(height: int, width: int) -> np.ndarray:
    """(height, width) float32 weights: 1 at the centre, sigma = SIGMA_FRACTION of each side."""

    def axis(n: int) -> np.ndarray:
        d = np.arange(n, dtype=np.float64) - (n - 1) / 2
        return np.exp(-(d**2) / (2 * (max(n * SIGMA_FRACTION, 1e-6)) ** 2))

    weights = np.outer(axis(height), axis(width))
    return np.maximum(weights / weights.max(), MIN_WEIGHT).astype(np.float32)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of `tile` pixels covering `length`, neighbours sharing >= `overlap`."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


class WindowBlender:
    """Gaussian-weighted sum of window probabilities over a (height, width) image, kept one band of
    rows at a time: add every window of a row of windows (`add`), then `finish_rows` hands back the
    class map of the rows no later window reaches."""

    def __init__(self, height: int, width: int, tile: tuple[int, int], classes: int) -> None:
        self.height, self.width = height, width
        self.th, self.tw = tile
        self.weights = gaussian_window(*tile)
        self.top = 0  # the image row of the band's first row
        self.band = np.zeros((self.th, width, classes), np.float32)
        self.norm = np.zeros((self.th, width), np.float32)
        self.scratch = np.zeros((self.th, self.tw, classes), np.float32)

    def add(self, row: int, col: int, probs: np.ndarray) -> None:
        """One window's (th, tw, K) probabilities at (row, col); row is the current row of windows."""
        r = row - self.top
        np.multiply(probs, self.weights[..., None], out=self.scratch)  # no new array per window
        self.band[r : r + self.th, col : col + self.tw] += self.scratch
        self.norm[r : r + self.th, col : col + self.tw] += self.weights

    def finish_rows(self, until: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first row, class map, top probability) of rows [top, until), which no later window
        touches; the band moves down to start at `until`."""
        n = until - self.top
        if n <= 0:
            return
        for start in range(0, n, ROWS_PER_CHUNK):
            stop = min(n, start + ROWS_PER_CHUNK)
            classes, top = argmax_and_max(self.band[start:stop])
            yield self.top + start, classes, top / np.maximum(self.norm[start:stop], 1e-12)
        self.band = np.concatenate([self.band[n:], np.zeros((n, *self.band.shape[1:]), np.float32)])
        self.norm = np.concatenate([self.norm[n:], np.zeros((n, self.width), np.float32)])
        self.top = until
