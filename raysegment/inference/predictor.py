"""The model artifact on the inference side: model card, pre-processing, the predictor actor."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np

from raysegment import storage
from raysegment.data import imaging
from raysegment.errors import DataError

MODEL_FILE = "model.keras"
MODEL_CARD = "model.json"


def load_model_card(model_uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """The model card of a trained model directory, or a clear error."""
    loc = storage.resolve(model_uri, endpoint_url)
    card_loc = loc.child(MODEL_CARD)
    if not storage.exists(card_loc) or not storage.exists(loc.child(MODEL_FILE)):
        raise DataError(f"{loc.uri}: not a trained model (needs {MODEL_FILE} and {MODEL_CARD}); run `raysegment train`")
    return storage.read_json(card_loc)


def preprocess(
    batch: dict[str, np.ndarray], size: tuple[int, int], max_pixels: int, resize: bool = True
) -> dict[str, np.ndarray]:
    """Decode the `bytes` column and resize to the model input; bad images become error rows.

    With resize=False (models trained at native scale) images keep their size and the
    column holds one array per row.
    """
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


class Predictor:
    """A Ray Data actor: loads the model once, turns resized images into class maps."""

    def __init__(
        self, model_uri: str, endpoint_url: str | None = None, tta_flip: bool = False, threads: int | None = None
    ) -> None:
        if threads:
            # Ray sets OMP_NUM_THREADS to the actor's CPUs (1 by default) and TF then runs its
            # kernels on one core; use the cores the actor was given (measured: 2x on 2 cores).
            os.environ["OMP_NUM_THREADS"] = str(threads)
        import keras
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)

        loc = storage.resolve(model_uri, endpoint_url)
        self.card = storage.read_json(loc.child(MODEL_CARD))
        with tempfile.TemporaryDirectory() as d:
            local = os.path.join(d, MODEL_FILE)
            storage.download_file(loc.child(MODEL_FILE), local)
            self.model = keras.models.load_model(local, compile=False)
        model = self.model

        from raysegment.models.losses import probabilities

        @tf.function(reduce_retracing=True)
        def predict(x):
            probs = probabilities(model(x, training=False))
            if tta_flip:
                # Test-time augmentation: average with the prediction on the mirrored image.
                flipped = probabilities(model(tf.reverse(x, axis=[2]), training=False))
                probs = (probs + tf.reverse(flipped, axis=[2])) / 2.0
            return tf.argmax(probs, axis=-1, output_type=tf.int32), tf.reduce_max(probs, axis=-1)

        self._predict = predict

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        ok = np.asarray([not e for e in batch["error"]], bool)
        n = len(images)
        preds = np.zeros(images.shape[:3] if images.dtype != object else (n, 1, 1), np.uint8)  # replaced when native
        conf = np.zeros(n, np.float32)
        t0 = time.perf_counter()
        if self.card["input"].get("resize") == "none":
            # Full resolution: shapes may differ per row (Ray Data hands a ragged column as
            # an object array, a uniform one as a plain array).
            preds = self._predict_each(images, ok, conf)
        elif ok.any():
            classes, probs = self._predict(images[ok].astype(np.float32) * (1.0 / 255.0))
            preds[ok] = classes.numpy().astype(np.uint8)
            conf[ok] = probs.numpy().reshape(int(ok.sum()), -1).mean(axis=1)
        batch["pred"] = preds
        batch["mean_confidence"] = conf
        batch["predict_ms"] = np.full(n, (time.perf_counter() - t0) * 1000 / max(n, 1), np.float32)
        return batch

    def _predict_each(self, images: np.ndarray, ok: np.ndarray, conf: np.ndarray) -> np.ndarray:
        """Full-resolution prediction, one image at a time, padded to a multiple of 2**depth."""
        multiple = 2 ** self.card.get("architecture", {}).get("depth", 0)
        preds = np.empty(len(images), dtype=object)
        for i, img in enumerate(images):
            if not ok[i]:
                preds[i] = np.zeros(img.shape[:2], np.uint8)
                continue
            h, w = img.shape[:2]
            ph, pw = -h % multiple, -w % multiple
            # Reflect padding keeps the border context natural for the convolutions.
            x = np.pad(img, [(0, ph), (0, pw), (0, 0)], mode="reflect") if ph or pw else img
            classes, probs = self._predict(x[None].astype(np.float32) * (1.0 / 255.0))
            preds[i] = classes.numpy()[0, :h, :w].astype(np.uint8)
            conf[i] = float(probs.numpy()[0, :h, :w].mean())
        return preds
