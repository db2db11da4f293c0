"""`show`: segment one image with a trained model and write it with the mask blended in.

Any image `infer` takes: a slice of a multi-page TIFF is named as infer names its source
(`vol.tif#page=3`; a stack given whole shows its first slice), a multi-band image is shown by
its first three bands of the model's (`--bands`), a 16-bit or float one contrast-stretched.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import numpy as np

from raysegment import overlay, storage
from raysegment.data import imaging, tiff
from raysegment.errors import ConfigError, DataError
from raysegment.inference import rasters
from raysegment.inference.overlap import within
from raysegment.models.card import ModelCard


def default_out(image_uri: str) -> str:
    """`photo.jpg` -> `./photo.overlay.png` (`vol.tif#page=3` -> `./vol.0003.overlay.png`): next to the
    caller, since the image may be on S3."""
    uri, page = tiff.split_page_uri(image_uri)
    stem = posixpath.splitext(posixpath.basename(uri.rstrip("/")))[0] or "image"
    if page is not None:
        stem = f"{stem}.{page:0{tiff.PAGE_DIGITS}d}"
    return os.path.join(os.getcwd(), f"{stem}.overlay.png")


def check_out(target: storage.Location, image: storage.Location, model: storage.Location) -> None:
    """The overlay is a PNG of its own: never written over the image it shows or into MODEL's files."""
    if not target.path.lower().endswith(".png"):
        raise ConfigError(f"--out {target.uri}: the overlay is a PNG; name it with .png")
    if within(target, image):
        raise ConfigError(f"--out {target.uri} is the image shown; choose another --out")
    if within(target, model) and storage.exists(target):
        raise ConfigError(f"--out {target.uri} is a file of MODEL {model.uri}; choose another --out")


def read_image(image_uri: str, endpoint_url: str | None) -> tuple[bytes, dict[str, int]]:
    """(image bytes, page facts): a stack's slice (`#page=N`, else its first) as a file of its own."""
    uri, page = tiff.split_page_uri(image_uri)
    data = storage.read_bytes(storage.resolve(uri, endpoint_url))
    try:
        pages = tiff.page_count(data)
        if page is None and pages == 1:
            return data, {}
        page = page or 0
        if page >= pages:
            raise DataError(f"{image_uri}: the TIFF has {tiff.pages_text(pages)}")
        return tiff.page_bytes(data, page), {"page": page, "pages": pages}
    except tiff.TiffError as exc:
        raise DataError(f"{image_uri}: {exc}") from None


def show_overlay(
    image_uri: str,
    model_uri: str,
    out: str | None = None,
    alpha: float = overlay.ALPHA,
    endpoint_url: str | None = None,
    tta_flip: bool | None = None,
    max_pixels: int = imaging.MAX_PIXELS,
) -> dict[str, Any]:
    """Predict one image as the inference pipeline does; write the overlay PNG at its original size (a
    big raster, a tiled or striped TIFF over `max_pixels`: window by window, the overlay a view)."""
    from raysegment.inference.predictor import Predictor, preprocess

    card = ModelCard.read(model_uri, endpoint_url, verify_model=True)
    target = storage.resolve(out or default_out(image_uri), endpoint_url)
    check_out(
        target,
        storage.resolve(tiff.split_page_uri(image_uri)[0], endpoint_url),
        storage.resolve(model_uri, endpoint_url),
    )
    if rasters.big_raster(storage.resolve(image_uri, endpoint_url), max_pixels):
        return _show_raster(image_uri, model_uri, target, alpha, endpoint_url, tta_flip, card, max_pixels)
    data, page = read_image(image_uri, endpoint_url)
    # The pipeline's own two steps, on a batch of one: same decoding, resizing and model call
    # (native-scale models predict at full resolution, as infer does).
    batch = preprocess(
        {"key": np.asarray(["image"], object), "bytes": np.asarray([data], object)}, card, imaging.MAX_PIXELS
    )
    if batch["error"][0]:
        raise DataError(f"{image_uri}: {batch['error'][0]}")
    image = imaging.decode_display(data, channels=imaging.Channels.of(card.input.bands, card.input.channels))
    batch = Predictor(model_uri, endpoint_url, tta_flip=tta_flip)(batch)
    height, width = int(batch["height"][0]), int(batch["width"][0])
    mask = imaging.resize_mask(np.asarray(batch["pred"][0], np.uint8), (height, width))
    storage.write_bytes(target, overlay.overlay_png(image, mask, card.palette, alpha))
    counts = np.bincount(mask.ravel(), minlength=card.num_classes)[: card.num_classes]
    return {
        "out": target.uri,
        "height": height,
        "width": width,
        "class_fractions": dict(zip(card.class_names, (counts / mask.size).tolist())),
        "mean_confidence": float(batch["mean_confidence"][0]),
        **card.tta(tta_flip).record(),
        **page,
    }


def _show_raster(
    image_uri: str,
    model_uri: str,
    target: storage.Location,
    alpha: float,
    endpoint_url: str | None,
    tta_flip: bool | None,
    card: ModelCard,
    max_pixels: int,
) -> dict[str, Any]:
    """A big raster (a tiled or striped TIFF over the pixel limit): predicted window by window as `infer`
    predicts it (inference/rasters.py), the overlay a view at most `rasters.SHOW_SIDE` pixels per side."""
    from raysegment.inference.predictor import Predictor

    predictor = Predictor(model_uri, endpoint_url, tta_flip=tta_flip)
    image, mask, result = rasters.show_views(predictor, image_uri, max_pixels)
    storage.write_bytes(target, overlay.overlay_png(image, mask, card.palette, alpha))
    return {
        "out": target.uri,
        "height": result.height,
        "width": result.width,
        "view": list(mask.shape),
        "class_fractions": dict(zip(card.class_names, result.class_fractions)),
        "mean_confidence": result.mean_confidence,
        **predictor.tta.record(),
    }
