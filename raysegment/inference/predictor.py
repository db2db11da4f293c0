"""The model on the inference side: pre-processing and the predictor actor (the card is models/card.py)."""

from __future__ import annotations

import os
import resource
import time

import numpy as np

from raysegment import storage
from raysegment.data import imaging, tiff
from raysegment.inference.stitch import WindowBlender, argmax_and_max, tile_starts, upsample_argmax
from raysegment.models.card import TTA_FLIPS, InputSpec, ModelCard, normalize
from raysegment.models.loader import load_model


def preprocess(
    batch: dict[str, np.ndarray], card: ModelCard, max_pixels: int, warm_up: bool = False
) -> dict[str, np.ndarray]:
    """Decode the `bytes` column and resize to the model input; bad images become error rows.

    Native-scale models keep each image at its size, and the column holds one array per row. The card's
    bands are taken (`imaging.Channels`) and pixels travel as the card's `pixel_type` (one type per run, as
    Ray Data wants): uint8, or float32 for 16-bit and float data at their own values.
    """
    size, resize = card.input_size, not card.native_scale
    channels, native = imaging.Channels.of(card.input.bands, card.input.channels), card.input.native_pixels
    dtype = np.dtype(card.input.pixel_type)
    data = batch.pop("bytes")
    n = len(data)
    images = np.zeros((n, *size, channels.count), dtype) if resize else np.empty(n, dtype=object)
    if not resize:
        images[:] = [np.zeros((1, 1, channels.count), dtype) for _ in range(n)]
    heights = np.zeros(n, np.int32)
    widths = np.zeros(n, np.int32)
    errors = np.asarray(batch.get("error", [""] * n), dtype=object)
    raster = np.asarray(batch.get("raster", np.zeros(n, bool)), bool)  # read by windows in the actor
    t0 = time.perf_counter()
    for i in range(n):
        if errors[i] or raster[i]:
            continue
        try:
            img = imaging.model_pixels(data[i], max_pixels, channels, native)
        except imaging.ImageDecodeError as exc:
            errors[i] = str(exc)
            continue
        # Serve's warm-up image is 8-bit zeros, whatever the model takes.
        problem = "" if warm_up else unusable_pixels(img, card, data[i], max_pixels, channels)
        if problem:
            errors[i] = problem
            continue
        img = img.astype(dtype, copy=False)
        heights[i], widths[i] = img.shape[:2]
        images[i] = imaging.resize_image(img, size) if resize else img
    batch.update(image=images, height=heights, width=widths, error=errors)
    batch["decode_ms"] = np.full(n, (time.perf_counter() - t0) * 1000 / max(n, 1), np.float32)
    return batch


NO_VALID_PIXEL = "no valid pixel: every value is NaN or infinite (no data)"
# An image of a 16-bit or float model with under this share of its finite values in the model's range (widened
# by its width on each side: darker or brighter images than the training ones still pass) is refused.
IN_RANGE_MIN = 0.01


def unusable_pixels(img: np.ndarray, card: ModelCard, data: bytes, max_pixels: int, channels: imaging.Channels) -> str:
    """Why an image's decoded pixels (`imaging.model_pixels`) cannot give a meaningful mask, or "".

    Each of these was a mask marked ok that says nothing about the image: no finite pixel at all (no data
    reaches the model as the z-score mean, and a wholly empty tile came out as one confident class); and, for
    models of 16-bit or float pixels at their own values, an 8-bit image the model never saw, or values that
    lie almost entirely outside the range of the training pixels (a float image scaled to 0..1, 12-bit counts
    given to a model of 16-bit ones): they all clip to one bound, the same input for every such image."""
    spec = card.input
    if img.dtype.kind == "f" and not np.isfinite(img).any():
        return NO_VALID_PIXEL
    if not spec.native_pixels:
        # 8-bit models see float images brought to 8 bits by `imaging._eight_bit`, which makes NaN, +inf, -inf
        # (and negatives) 0: a pixel above 0 came from a finite value. Only an all-0 image may have had no data,
        # and only a TIFF can hold floats; such an image alone is decoded again at its own precision to know.
        if img[::16, ::16].any() or img.any():  # the sample settles almost every image
            return ""
        if bytes(data[:4]) not in tiff.TIFF_MAGIC:  # PNG, JPEG, BMP, WebP and GIF hold no floats
            return ""
        try:
            raw = imaging.decode_pixels(data, max_pixels, channels).pixels
        except imaging.ImageDecodeError:  # decoded once already; this reading is only for the check
            return ""
        return NO_VALID_PIXEL if raw.dtype.kind == "f" and not np.isfinite(raw).any() else ""
    if img.dtype == np.uint8:
        # 0..255 would all clip to a 16-bit model's low end; a data set that mixed 8-bit images in knows them.
        return "" if spec.eight_bit_seen else imaging.EIGHT_BIT_FOR_DEEP_MODEL
    return _outside_training_range(img, spec)


def _outside_training_range(img: np.ndarray, spec: InputSpec) -> str:
    """The error for a 16-bit or float image whose finite values lie (almost) all outside the range of the
    training pixels: the card's per-channel 0.5-99.5 percentiles (zscore_clipped's clip bounds, kept for
    zscore too), else mean +- 3 std (about the same for normal data). "" when the image shares the range."""
    stats = spec.stats
    if stats is None:
        return ""
    if stats.low is not None and stats.high is not None:
        low, high = np.asarray(stats.low, np.float64), np.asarray(stats.high, np.float64)
    else:
        mean, std = np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64)
        low, high = mean - 3 * std, mean + 3 * std
    width = high - low
    used = width > 0  # a constant channel is the same input whatever its value: nothing to compare
    if not used.any():
        return ""
    # A strided sample of about a million pixels (a view) is plenty for a 1% threshold, and spares a big
    # image's copies.
    step = max(1, int(np.ceil(np.sqrt(img.shape[0] * img.shape[1] / 2**20))))
    x = img[::step, ::step]
    if not used.all():
        x, low, high, width = x[..., used], low[used], high[used], width[used]
    finite = np.isfinite(x) if x.dtype.kind == "f" else np.ones(x.shape, bool)
    count = int(finite.sum())
    if count == 0:
        return ""
    values = x[finite]
    # Widened by the range's width each side. For counts (a channel spanning more than 8 bits' worth, its low
    # bound 10 or more) never below a tenth of the low bound: microscopy and CT backgrounds sit near 0, where
    # low - width is negative and took any value >= 0 (a 0..1 float image given to a model of counts 257..2622
    # got a 99.9% foreground mask, marked ok). Data in physical units (reflectance 0.02..0.6) keep the width.
    counts = width > 255
    lower = np.where(counts & (low >= 10), np.maximum(low - width, low / 10), low - width)
    inside = int(((x >= lower) & (x <= high + width)).sum())  # NaN compares False: never inside
    if inside < IN_RANGE_MIN * count:
        return (
            f"pixel values {float(values.min()):.6g}..{float(values.max()):.6g}, outside the range of the model's "
            f"training pixels ({float(low.min()):.6g}..{float(high.max()):.6g}), so the mask would mean nothing; "
            "give it images in the training data's units (its bit depth and scale: "
            "not floats rescaled to 0..1, nor 12-bit counts to a model of 16-bit ones)"
        )
    # Fractions within -1..1 in every channel of counts: the image rescaled, even where the training range
    # reaches down to 0 and so holds 0..1.
    if x.dtype.kind == "f" and counts.any():
        wide = x[..., counts][finite[..., counts]]
        if wide.size and float(np.abs(wide).max()) <= 1 and bool((wide != np.round(wide)).any()):
            return (
                f"pixel values {float(values.min()):.6g}..{float(values.max()):.6g}: fractions within -1..1, "
                f"where the model's training pixels were counts ({float(low.min()):.6g}..{float(high.max()):.6g}), "
                "so the mask would mean nothing; give it images in the training data's units (not floats "
                "rescaled to 0..1)"
            )
    return ""


def reflect_padding(height, width, pad_h, pad_w):
    """Whether a native-scale image is padded to the size multiple by reflection (natural border context
    for the convolutions): when it has more pixels than the pad, else its edge is repeated. Python ints
    here, tensors in `raysegment export`'s graph."""
    return (pad_h < height) & (pad_w < width)


def class_probabilities(scores, output: str):
    """Per-class probabilities (N, H, W, K) from the model's output, logits or probabilities (the card's
    `output`); either head (K channels, or one foreground channel for 2 classes)."""
    import tensorflow as tf

    from raysegment.models.losses import probabilities

    if output == "logits":
        return probabilities(scores)
    probs = tf.cast(scores, tf.float32)
    return tf.concat([1.0 - probs, probs], axis=-1) if probs.shape[-1] == 1 else probs


def averaged_probabilities(model, output: str, flips: tuple[str, ...] = ()):
    """One tf.function: a batch's class probabilities (N, H, W, K), averaged over the plain pass and the
    passes `flips` (`card.TTA_FLIPS`: flip TTA, transposes too), each turned back before the average."""
    import tensorflow as tf

    passes = [(TTA_FLIPS[f][0], [a + 1 for a in TTA_FLIPS[f][1]]) for f in flips]  # image axes -> batch axes
    swap = [0, 2, 1, 3]  # rows <-> columns of (N, H, W, C)

    @tf.function(reduce_retracing=True)
    def probabilities(x):
        probs = class_probabilities(model(x, training=False), output)
        for transpose, axes in passes:  # unrolled when traced: 1 + len(flips) model calls in one graph
            y = tf.transpose(x, swap) if transpose else x
            y = tf.reverse(y, axis=axes) if axes else y
            p = class_probabilities(model(y, training=False), output)
            p = tf.reverse(p, axis=axes) if axes else p
            probs += tf.transpose(p, swap) if transpose else p
        return probs / float(1 + len(passes)) if passes else probs

    return probabilities


def resolve_precision(precision: str, gpus: float) -> str:
    """'auto' is bfloat16 on GPU actors (half the memory traffic) and float32 on CPU."""
    if precision == "auto":
        return "bfloat16" if gpus > 0 else "float32"
    return precision


class Predictor:
    """A Ray Data actor: loads the model once, turns resized images into class maps.

    `tta_flip`: None follows the card (`ModelCard.tta`); with TTA on, probabilities are averaged over the
    plain pass and the mirror images the model was trained on (`averaged_probabilities`).

    Resized models predict at the card's input size and their probabilities are upsampled to
    each image's size before the argmax (`stitch.upsample_argmax`). Native-scale models
    (`ModelCard.native_scale`) predict at full resolution; images wider or taller than
    ``tile_size`` go through Gaussian-weighted sliding windows (`stitch.WindowBlender`), so
    memory per image stays bounded by a band of rows whatever its size.
    """

    def __init__(
        self,
        model_uri: str,
        endpoint_url: str | None = None,
        tta_flip: bool | None = None,
        threads: int | None = None,
        precision: str = "float32",
        tile_size: int = 1024,
        tile_overlap: int | None = None,
        batch_size: int = 16,
        decode_max_pixels: int | None = None,
        retry_s: float | None = None,
        output: storage.Location | None = None,
        window_pixels: int | None = None,
    ) -> None:
        self.decode_max_pixels = decode_max_pixels  # set when the actor decodes its own batches
        # Big rasters (inference/rasters.py): read from storage and written to OUTPUT here, by windows of this size.
        self.output, self.window_pixels = output, window_pixels
        self.endpoint_url, self.retry_s, self.threads = endpoint_url, retry_s, threads or 1
        if threads:
            # Ray sets OMP_NUM_THREADS to the actor's CPUs (1 by default) and TF then runs its
            # kernels on one core; use the cores the actor was given (measured: 2x on 2 cores).
            os.environ["OMP_NUM_THREADS"] = str(threads)
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)

        # retry_s: the driver's storage deadline (a worker's environment may say otherwise).
        self.card = ModelCard.read(model_uri, endpoint_url, retry_s=retry_s)
        self.model = load_model(storage.resolve(model_uri, endpoint_url, retry_s), self.card, precision)
        model = self.model
        multiple = self.card.size_multiple
        self.multiple = multiple
        self.tile = max(multiple, tile_size // multiple * multiple)
        # Default half a tile (nnU-Net's step of 0.5): each pixel is seen by up to four windows.
        overlap = self.tile // 2 if tile_overlap is None else min(tile_overlap, self.tile // 2)
        # The stride a multiple of the size multiple: windows stay on the U-Net's pooling grid, so a big
        # raster's windows (inference/rasters.py) reproduce the whole-image answer exactly.
        self.overlap = self.tile - max(multiple, (self.tile - overlap) // multiple * multiple)
        self.batch_size = batch_size

        # Flip TTA: given, else the card's recommendation (`ModelCard.tta`, the driver's same decision); every
        # path below (resized batches, whole images, sliding windows) predicts through this one function.
        self.tta = self.card.tta(tta_flip)
        self._probabilities = averaged_probabilities(model, self.card.output, self.tta.flips)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.decode_max_pixels is not None:
            batch = preprocess(batch, self.card, self.decode_max_pixels)
        images = batch.pop("image")
        n = len(images)
        raster = np.asarray(batch.get("raster", np.zeros(n, bool)), bool)  # big rasters: by windows, below
        ok = np.asarray([not e for e in batch["error"]], bool) & ~raster
        preds = np.zeros(images.shape[:3] if images.dtype != object else (n, 1, 1), np.uint8)  # replaced when native
        conf = np.zeros(n, np.float32)
        t0 = time.perf_counter()
        if self.card.native_scale:
            # Full resolution: shapes may differ per row (Ray Data hands a ragged column as
            # an object array, a uniform one as a plain array).
            preds = self._predict_each(images, ok, conf)
        elif ok.any():
            # Probabilities at the model's size, upsampled bilinearly to each image's own size.
            probs = self._probabilities(normalize(images[ok], self.card)).numpy()
            preds = np.empty(n, dtype=object)
            preds[:] = [np.zeros((1, 1), np.uint8) for _ in range(n)]
            # The decoded size (`preprocess`); a batch already at the model's size may come without it.
            heights, widths = batch.get("height"), batch.get("width")
            for j, i in enumerate(np.flatnonzero(ok)):
                size = (int(heights[i]), int(widths[i])) if heights is not None else probs.shape[1:3]
                preds[i], conf[i] = upsample_argmax(probs[j], size)
        batch["written"] = np.full(n, "", dtype=object)
        if raster.any():
            from raysegment.inference import rasters

            batch["written"] = rasters.predict_rows(self, batch, raster, conf)
        batch["pred"] = preds
        batch["mean_confidence"] = conf
        batch["predict_ms"] = np.full(n, (time.perf_counter() - t0) * 1000 / max(n, 1), np.float32)
        # The actor's own peak resident memory so far (Linux: KiB): what sizing an actor needs.
        batch["peak_rss_mb"] = np.full(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, np.float32)
        return batch

    def _predict_each(self, images: np.ndarray, ok: np.ndarray, conf: np.ndarray) -> np.ndarray:
        """Full-resolution prediction, image by image (tiled when larger than the tile size)."""
        preds = np.empty(len(images), dtype=object)
        for i, img in enumerate(images):
            if not ok[i]:
                preds[i] = np.zeros(img.shape[:2], np.uint8)
                continue
            preds[i], conf[i] = self._predict_tiled(img)
        return preds

    def _padded(self, img: np.ndarray) -> np.ndarray:
        """Reflect-pad to a multiple of 2**depth (natural border context for the convolutions)."""
        h, w = img.shape[:2]
        ph, pw = -h % self.multiple, -w % self.multiple
        if not (ph or pw):
            return img
        return np.pad(img, [(0, ph), (0, pw), (0, 0)], mode="reflect" if reflect_padding(h, w, ph, pw) else "edge")

    def _predict_tiled(
        self, img: np.ndarray, keep: tuple[int, int, int, int] | None = None
    ) -> tuple[np.ndarray, float]:
        """(class map, mean top probability over `keep`: rows r0:r1, columns c0:c1, default the whole
        image). Larger than a tile: Gaussian-weighted sliding windows (`stitch.WindowBlender`)."""
        h, w = img.shape[:2]
        r0, r1, c0, c1 = keep or (0, h, 0, w)
        x = self._padded(img)
        th, tw = min(self.tile, x.shape[0]), min(self.tile, x.shape[1])
        rows, cols = tile_starts(x.shape[0], th, self.overlap), tile_starts(x.shape[1], tw, self.overlap)
        if len(rows) == len(cols) == 1:
            probs = self._probabilities(normalize(x[None], self.card)).numpy()[0, :h, :w]
            classes, top = argmax_and_max(probs)
            top = top[r0:r1, c0:c1]
            return classes, float(top.sum(dtype=np.float64)) / max(1, top.size)
        blender = WindowBlender(x.shape[0], x.shape[1], (th, tw), self.card.num_classes)
        out = np.zeros(x.shape[:2], np.uint8)
        top_sum = 0.0

        def finish(until: int) -> None:
            nonlocal top_sum
            for start, classes, top in blender.finish_rows(until):
                out[start : start + len(classes)] = classes
                lo, hi = max(r0, start), min(r1, start + len(classes))
                if hi > lo:
                    top_sum += float(top[lo - start : hi - start, c0:c1].sum(dtype=np.float64))

        windows = [(r, c) for r in rows for c in cols]
        for b in range(0, len(windows), self.batch_size):
            chunk = windows[b : b + self.batch_size]
            probs = self._probabilities(normalize(np.stack([x[r : r + th, c : c + tw] for r, c in chunk]), self.card))
            for k, (r, c) in enumerate(chunk):
                finish(r)  # rows above this row of windows are final
                blender.add(r, c, probs[k].numpy())
        finish(x.shape[0])
        return out[:h, :w], top_sum / max(1, (r1 - r0) * (c1 - c0))
