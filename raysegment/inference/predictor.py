"""The model on the inference side: pre-processing and the predictor actor (the card is models/card.py)."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from raysegment import storage
from raysegment.data import imaging
from raysegment.models.card import MODEL_FILE, ModelCard, model_file


def preprocess(batch: dict[str, np.ndarray], card: ModelCard, max_pixels: int) -> dict[str, np.ndarray]:
    """Decode the `bytes` column and resize to the model input; bad images become error rows.

    Native-scale models keep each image at its size, and the column holds one array per row.
    """
    size, resize = card.input_size, not card.native_scale
    data = batch.pop("bytes")
    n = len(data)
    images = np.zeros((n, *size, 3), np.uint8) if resize else np.empty(n, dtype=object)
    if not resize:
        images[:] = [np.zeros((1, 1, 3), np.uint8) for _ in range(n)]
    heights = np.zeros(n, np.int32)
    widths = np.zeros(n, np.int32)
    errors = np.asarray(batch.get("error", [""] * n), dtype=object)
    t0 = time.perf_counter()
    for i in range(n):
        if errors[i]:
            continue
        try:
            img = imaging.decode_image(data[i], max_pixels)
        except imaging.ImageDecodeError as exc:
            errors[i] = str(exc)
            continue
        heights[i], widths[i] = img.shape[:2]
        images[i] = imaging.resize_image(img, size) if resize else img
    batch.update(image=images, height=heights, width=widths, error=errors)
    batch["decode_ms"] = np.full(n, (time.perf_counter() - t0) * 1000 / max(n, 1), np.float32)
    return batch


def normalize(images: np.ndarray, card: ModelCard) -> np.ndarray:
    """uint8 RGB -> the model's float32 input, per the card's normalisation (`raysegment export`'s
    graph applies the same `pixel_affine` in the same float32 arithmetic)."""
    scale, offset = (np.asarray(v, np.float32) for v in card.pixel_affine)
    return images.astype(np.float32) * scale + offset


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


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `length`, consecutive tiles sharing >= `overlap`."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def tile_bounds(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """The part of each tile that is kept: overlaps are split at their middle, so the kept
    parts partition [0, length) and every pixel comes from the tile where it is farthest
    from an edge (convolutions see the most context there)."""
    cuts = [0] + [(nxt + prev + tile) // 2 for prev, nxt in zip(starts, starts[1:])] + [length]
    return list(zip(cuts, cuts[1:]))


def resolve_precision(precision: str, gpus: float) -> str:
    """'auto' is bfloat16 on GPU actors (half the memory traffic) and float32 on CPU."""
    if precision == "auto":
        return "bfloat16" if gpus > 0 else "float32"
    return precision


class Predictor:
    """A Ray Data actor: loads the model once, turns resized images into class maps.

    Native-scale models (`ModelCard.native_scale`) predict at full resolution;
    images wider or taller than ``tile_size`` are cut into overlapping tiles that are
    predicted as one batch and stitched (see `tile_bounds`), so memory per image stays
    bounded whatever its size.
    """

    def __init__(
        self,
        model_uri: str,
        endpoint_url: str | None = None,
        tta_flip: bool = False,
        threads: int | None = None,
        precision: str = "float32",
        tile_size: int = 1024,
        tile_overlap: int = 64,
        batch_size: int = 16,
        decode_max_pixels: int | None = None,
        retry_s: float | None = None,
    ) -> None:
        self.decode_max_pixels = decode_max_pixels  # set when the actor decodes its own batches
        if threads:
            # Ray sets OMP_NUM_THREADS to the actor's CPUs (1 by default) and TF then runs its
            # kernels on one core; use the cores the actor was given (measured: 2x on 2 cores).
            os.environ["OMP_NUM_THREADS"] = str(threads)
        import keras
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)

        # retry_s: the driver's storage deadline (a worker's environment may say otherwise).
        self.card = ModelCard.read(model_uri, endpoint_url, retry_s=retry_s)
        with tempfile.TemporaryDirectory() as d:
            local = os.path.join(d, MODEL_FILE)
            storage.download_file(model_file(storage.resolve(model_uri, endpoint_url, retry_s)), local)
            self.model = keras.models.load_model(local, compile=False)
        if precision != "float32":
            self.model = _with_policy(self.model, f"mixed_{precision}")
        model = self.model
        multiple = self.card.size_multiple
        self.multiple = multiple
        self.tile = max(multiple, tile_size // multiple * multiple)
        self.overlap = min(tile_overlap, self.tile // 2)
        self.batch_size = batch_size

        output = self.card.output

        @tf.function(reduce_retracing=True)
        def predict(x):
            probs = class_probabilities(model(x, training=False), output)
            if tta_flip:
                # Test-time augmentation: average with the prediction on the mirrored image.
                flipped = class_probabilities(model(tf.reverse(x, axis=[2]), training=False), output)
                probs = (probs + tf.reverse(flipped, axis=[2])) / 2.0
            return tf.argmax(probs, axis=-1, output_type=tf.int32), tf.reduce_max(probs, axis=-1)

        self._predict = predict

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.decode_max_pixels is not None:
            batch = preprocess(batch, self.card, self.decode_max_pixels)
        images = batch.pop("image")
        ok = np.asarray([not e for e in batch["error"]], bool)
        n = len(images)
        preds = np.zeros(images.shape[:3] if images.dtype != object else (n, 1, 1), np.uint8)  # replaced when native
        conf = np.zeros(n, np.float32)
        t0 = time.perf_counter()
        if self.card.native_scale:
            # Full resolution: shapes may differ per row (Ray Data hands a ragged column as
            # an object array, a uniform one as a plain array).
            preds = self._predict_each(images, ok, conf)
        elif ok.any():
            classes, probs = self._predict(normalize(images[ok], self.card))
            preds[ok] = classes.numpy().astype(np.uint8)
            conf[ok] = probs.numpy().reshape(int(ok.sum()), -1).mean(axis=1)
        batch["pred"] = preds
        batch["mean_confidence"] = conf
        batch["predict_ms"] = np.full(n, (time.perf_counter() - t0) * 1000 / max(n, 1), np.float32)
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

    def _predict_tiled(self, img: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = img.shape[:2]
        x = self._padded(img)
        th, tw = min(self.tile, x.shape[0]), min(self.tile, x.shape[1])
        rows, cols = tile_starts(x.shape[0], th, self.overlap), tile_starts(x.shape[1], tw, self.overlap)
        windows = [(r, c) for r in rows for c in cols]
        row_keep, col_keep = (
            dict(zip(rows, tile_bounds(rows, th, x.shape[0]))),
            dict(zip(cols, tile_bounds(cols, tw, x.shape[1]))),
        )
        out = np.zeros(x.shape[:2], np.uint8)
        conf_sum = 0.0
        for b in range(0, len(windows), self.batch_size):
            chunk = windows[b : b + self.batch_size]
            tiles = normalize(np.stack([x[r : r + th, c : c + tw] for r, c in chunk]), self.card)
            classes, probs = self._predict(tiles)
            classes, probs = classes.numpy(), probs.numpy()
            for k, (r, c) in enumerate(chunk):
                (r0, r1), (c0, c1) = row_keep[r], col_keep[c]
                out[r0:r1, c0:c1] = classes[k, r0 - r : r1 - r, c0 - c : c1 - c]
                # Confidence over the image's own pixels only (not the padding).
                r1, c1 = min(r1, h), min(c1, w)
                if r1 > r0 and c1 > c0:
                    conf_sum += float(probs[k, r0 - r : r1 - r, c0 - c : c1 - c].sum())
        return out[:h, :w], conf_sum / (h * w)


def _with_policy(model, policy: str):
    """The same model with a mixed-precision dtype policy (weights copied, kept in float32)."""
    import keras

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = policy
        return layer.__class__.from_config(config)

    mixed = keras.models.clone_model(model, clone_function=clone)
    mixed.set_weights(model.get_weights())
    return mixed
