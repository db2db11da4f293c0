"""`show`: segment one image with a trained model and write it with the mask blended in."""

from __future__ import annotations

import os
import posixpath
from typing import Any

import numpy as np

from raysegment import overlay, storage
from raysegment.data import imaging
from raysegment.errors import DataError
from raysegment.models.card import ModelCard


def default_out(image_uri: str) -> str:
    """`photo.jpg` -> `./photo.overlay.png`: next to the caller, since the image may be on S3."""
    stem = posixpath.splitext(posixpath.basename(image_uri.rstrip("/")))[0] or "image"
    return os.path.join(os.getcwd(), f"{stem}.overlay.png")


def show_overlay(
    image_uri: str,
    model_uri: str,
    out: str | None = None,
    alpha: float = overlay.ALPHA,
    endpoint_url: str | None = None,
    tta_flip: bool = False,
) -> dict[str, Any]:
    """Predict one image as the inference pipeline does; write the overlay PNG at its original size."""
    from raysegment.inference.predictor import Predictor, preprocess

    card = ModelCard.read(model_uri, endpoint_url, verify_model=True)
    data = storage.read_bytes(storage.resolve(image_uri, endpoint_url))
    # The pipeline's own two steps, on a batch of one: same decoding, resizing and model call
    # (native-scale models predict at full resolution, as infer does).
    batch = preprocess(
        {"key": np.asarray(["image"], object), "bytes": np.asarray([data], object)}, card, imaging.MAX_PIXELS
    )
    if batch["error"][0]:
        raise DataError(f"{image_uri}: {batch['error'][0]}")
    image = imaging.decode_image(data)
    batch = Predictor(model_uri, endpoint_url, tta_flip=tta_flip)(batch)
    height, width = int(batch["height"][0]), int(batch["width"][0])
    mask = imaging.resize_mask(np.asarray(batch["pred"][0], np.uint8), (height, width))
    target = storage.resolve(out or default_out(image_uri), endpoint_url)
    storage.write_bytes(target, overlay.overlay_png(image, mask, card.palette, alpha))
    counts = np.bincount(mask.ravel(), minlength=card.num_classes)[: card.num_classes]
    return {
        "out": target.uri,
        "height": height,
        "width": width,
        "class_fractions": dict(zip(card.class_names, (counts / mask.size).tolist())),
        "mean_confidence": float(batch["mean_confidence"][0]),
    }
