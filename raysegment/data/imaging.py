"""Decoding images and masks, resizing, and encoding palette PNG masks."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

IGNORE_INDEX = 255
# Decompression-bomb guard: refuse anything larger than this before decoding pixels.
MAX_PIXELS = 100_000_000

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")


class ImageDecodeError(ValueError):
    """An image or mask that cannot be decoded; the message says why."""


NOT_AN_IMAGE = "cannot decode image: not a PNG, JPEG, TIFF, BMP, WebP or GIF file"


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"image is {w}x{h} pixels, over the limit of {max_pixels} (--max-pixels)")
            img.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow refuses headers over twice its own limit before we see the size: say it in our terms.
        raise ImageDecodeError(
            f"image is {_pillow_pixels(exc)}, over the limit of {max_pixels} (--max-pixels)"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(NOT_AN_IMAGE) from exc
    except Exception as exc:  # PIL raises many types for corrupt input
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return img


def _pillow_pixels(exc: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(found.group(1))} pixels" if found else "size from its header"


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded PIL image (pixels loaded), within the pixel limit; raises ImageDecodeError otherwise."""
    return _open(data, max_pixels)


EXIF_ORIENTATION = 0x0112


def upright_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[bytes, int, int]:
    """(bytes, height, width) of an image as it is meant to be seen: an EXIF orientation other than
    1 (phone photos) is applied and the pixels re-encoded as lossless PNG; other images keep their bytes."""
    img = _open(data, max_pixels)
    if img.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
        return data, img.size[1], img.size[0]
    img = ImageOps.exif_transpose(img)
    if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        img = img.convert("RGB")  # CMYK and YCbCr JPEGs
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), img.size[1], img.size[0]


def verify_image(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of an image whose pixels fully decode; raises ImageDecodeError otherwise."""
    img = _open(data, max_pixels)
    return img.size[1], img.size[0]


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB as meant to be seen (an EXIF orientation is applied, as
    `prepare` stores training images, so a phone photo is predicted upright and its mask is the
    upright image's size); grey, alpha, palette and 16-bit are converted."""
    img = _open(data, max_pixels)
    if img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / hi)).astype(np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if "A" in img.mode or img.mode == "P" else img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def decode_mask(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded single-channel mask -> HxW uint8 of raw values (palette indices kept)."""
    img = _open(data, max_pixels)
    if img.mode not in ("L", "P"):
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img)
            if arr.max() > 255:
                raise ImageDecodeError("mask values above 255; masks must be 8-bit class ids")
            return arr.astype(np.uint8)
        raise ImageDecodeError(f"mask has mode {img.mode}; masks must be single-channel (L or P)")
    return np.asarray(img, dtype=np.uint8)


def image_size(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) from the header only."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(NOT_AN_IMAGE) from exc
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(f"image is {w}x{h} pixels, over the limit of {max_pixels} (--max-pixels)")
    return h, w


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an HxWx3 uint8 image to (height, width)."""
    if img.shape[:2] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of class ids: never interpolate labels."""
    if mask.shape[:2] == size:
        return mask
    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))


def encode_mask(mask: np.ndarray, palette: list[list[int]] | None = None) -> bytes:
    """HxW uint8 class ids -> PNG bytes, palette mode when a palette is given (VOC convention)."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    if palette:
        img = img.convert("P")
        flat = [c for rgb in palette for c in rgb]
        flat += [0, 0, 0] * (256 - len(palette))
        flat[IGNORE_INDEX * 3 : IGNORE_INDEX * 3 + 3] = [224, 224, 192]
        img.putpalette(flat)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def default_palette(num_classes: int) -> list[list[int]]:
    """The PASCAL VOC colour map, which gives distinct colours for any class count."""
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette
