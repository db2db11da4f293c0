"""Decoding images and masks, resizing, and encoding palette PNG masks.

Two ways to decode an image: `decode_image` (8-bit RGB, as models with a 0..255 normalisation were
trained) and `decode_pixels` (the bands the data set chose, `Channels`, at the file's own precision:
16-bit and float values are never rescaled here; the card's normalisation maps them). TIFFs Pillow
cannot take whole (more than four bands, 16-bit colour, float colour, stacks) are read by `data/tiff.py`.
`display_rgb` makes any decoded image viewable (`show`, `report`): its first three channels, 16-bit
and float ones contrast-stretched.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from raysegment.data import limits, tiff

IGNORE_INDEX = 255
MAX_PIXELS = limits.MAX_PIXELS  # the decompression-bomb guard (data/limits.py)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")


class ImageDecodeError(ValueError):
    """An image or mask that cannot be decoded; the message says why."""


EIGHT_BIT_FOR_DEEP_MODEL = (
    "an 8-bit image, but the model was trained on 16-bit or float images at their own values; "
    "give it images of the training data's bit depth"
)
NOT_AN_IMAGE = "cannot decode image: not a PNG, JPEG, TIFF, BMP, WebP or GIF file"
# Leading bytes of the formats taken: a file that starts as one but Pillow cannot open (a 0x0 PNG,
# a damaged header) is named as that format, not as "not an image".
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _unidentified(data: bytes) -> str:
    """Why Pillow could not identify the bytes, in the user's terms."""
    kind = next((name for sig, name in _SIGNATURES if data.startswith(sig)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "WebP"
    if kind is None:
        return NOT_AN_IMAGE
    if kind == "PNG" and len(data) >= 24 and 0 in (int.from_bytes(data[16:20]), int.from_bytes(data[20:24])):
        return "cannot decode image: the PNG header gives a size of 0 pixels"
    return f"cannot decode image: a {kind} file whose header is damaged or unsupported"


# The formats Pillow may try ("JPEG" opens phones' MPO files too). Not its other forty: EPS would run
# Ghostscript on the bytes, and formats nobody segments are only attack surface.
PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")


_PILLOW_LIMIT_LOCK = threading.Lock()


def _header(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open (the header only) under raysegment's pixel limit instead of Pillow's own.

    Pillow warns from 89.5M pixels and refuses from twice that, whatever `max_pixels` says: its
    warning is ignored here (the size is checked right after), and an image it refuses that is within
    `max_pixels` is opened again with Pillow's limit raised to `max_pixels`, never lifted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
        except Image.DecompressionBombError as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            if not found or int(found.group(1)) > max_pixels:
                size = f"{int(found.group(1))} pixels" if found else "its header's size"
                raise ImageDecodeError(limits.refusal(size, max_pixels)) from exc
            with _PILLOW_LIMIT_LOCK:
                pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
                try:
                    img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
                finally:
                    Image.MAX_IMAGE_PIXELS = pillow_limit
    if problem := limits.over(*img.size, max_pixels, len(img.getbands())):
        raise ImageDecodeError(problem)
    return img


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        img = _header(data, max_pixels)
        img.load()
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(_unidentified(data)) from exc
    except Exception as exc:  # PIL raises many types for corrupt input
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return img


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded PIL image (pixels loaded), within the pixel limit; raises ImageDecodeError otherwise."""
    return _open(data, max_pixels)


EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Channels:
    """Which bands of an image the model sees. Chosen once per data set by `prepare` (manifest `bands`
    and `channels`), recorded in the model card, applied by every reader (training, infer, evaluate, show).

    Without `bands`, grey and RGB(A) images give 3 channels (grey repeated, alpha dropped, as always)
    and any other image all of its bands (a 6-band scene: 6); `count` is what every image must give."""

    bands: tuple[int, ...] | None = None  # 1-based band numbers (--bands); None: the image's own bands
    count: int | None = 3  # the model's input channels; None: each image's own (prepare, before it knows)

    @classmethod
    def of(cls, bands: list[int] | tuple[int, ...] | None, count: int | None = None) -> Channels:
        """From a manifest's or card's `bands` and `channels` (absent in older ones: RGB)."""
        picked = tuple(bands) if bands else None
        return cls(picked, count if count is not None else (len(picked) if picked else 3))


RGB = Channels()
OWN = Channels(count=None)  # each image's own channels (what prepare sees before it knows the data set's)


@dataclass(frozen=True)
class Decoded:
    """An image decoded at its own precision, with what its file held (for the fingerprint)."""

    pixels: np.ndarray  # height x width x channels, the file's dtype (uint8, uint16, float32, ...)
    mode: str  # Pillow's mode ("L", "RGB", "I;16", "F", ...), or dtype x bands for what tifffile read ("uint16x6")
    bands: int  # bands in the file, alpha included


# Pillow modes brought to one Pillow can hand over as an array without loss.
_CONVERT = {"1": "L", "PA": "RGBA", "La": "LA", "RGBa": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB"}
_CONVERT.update({"HSV": "RGB", "RGBX": "RGB"})


def _pil_bands(img: Image.Image) -> tuple[np.ndarray, int]:
    """(height x width x bands, trailing alpha bands) of an opened (upright) Pillow image."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in _CONVERT:
        img = img.convert(_CONVERT[img.mode])
    arr = np.asarray(img)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))  # I;16B
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr, int(img.mode in ("LA", "RGBA"))


def _tiff_problem(exc: tiff.TiffError) -> ImageDecodeError:
    return ImageDecodeError(str(exc))


def _raw(data: bytes, max_pixels: int) -> tuple[np.ndarray, int, str, bytes]:
    """(height x width x bands, trailing alpha bands, mode, upright bytes) of an image file.

    The bytes are the file's own, or a lossless PNG when an EXIF orientation had to be applied."""
    try:
        if tiff.needs_tifffile(data):
            arr, alpha = tiff.read_bands(data, max_pixels)
            return arr, alpha, f"{arr.dtype.name}x{arr.shape[2]}", data
    except tiff.TiffError as exc:
        raise _tiff_problem(exc) from exc
    img = _open(data, max_pixels)
    mode = img.mode
    if img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
        data = _png(img if img.mode in ("I", *tiff.PNG_MODES) else img.convert("RGB"))  # CMYK, YCbCr JPEGs
    arr, alpha = _pil_bands(img)
    return arr, alpha, mode, data


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def select_channels(raw: np.ndarray, alpha: int, channels: Channels) -> np.ndarray:
    """The channels the model sees from an image's bands (see `Channels`); ImageDecodeError when it has
    too few bands for `--bands`, or not the model's channel count."""
    total = raw.shape[2]
    if channels.bands:
        missing = [b for b in channels.bands if b > total]
        if missing:
            raise ImageDecodeError(f"image has {total} bands; --bands asks for band {missing[0]}")
        return raw[..., [b - 1 for b in channels.bands]]
    data = raw[..., : total - alpha]
    own = 3 if data.shape[2] in (1, 3) else data.shape[2]
    if channels.count is not None and own != channels.count:
        raise ImageDecodeError(
            f"image has {data.shape[2]} bands, the model takes {channels.count} channels; "
            "choose the bands with --bands when preparing (e.g. --bands 1,2,3)"
        )
    return np.repeat(data, 3, axis=2) if data.shape[2] == 1 else data


def decode_pixels(data: bytes, max_pixels: int = MAX_PIXELS, channels: Channels = RGB) -> Decoded:
    """Encoded bytes -> the channels the model sees (see `Channels`), at the file's own precision,
    EXIF orientation applied; raises ImageDecodeError for what cannot be decoded or does not fit."""
    raw, alpha, mode, _ = _raw(data, max_pixels)
    return Decoded(select_channels(raw, alpha, channels), mode, raw.shape[2])


def decode_upright(data: bytes, max_pixels: int = MAX_PIXELS, channels: Channels = OWN) -> tuple[bytes, Decoded]:
    """(bytes to store, decoded pixels) for `prepare`: the file's own bytes, or a lossless PNG of the
    upright image when it had an EXIF rotation; decoded once, for validation and the fingerprint."""
    raw, alpha, mode, upright = _raw(data, max_pixels)
    return upright, Decoded(select_channels(raw, alpha, channels), mode, raw.shape[2])


def model_pixels(data: bytes, max_pixels: int, channels: Channels, native: bool) -> np.ndarray:
    """The pixels a model's normalisation expects: the file's own precision when it was derived from
    the data (`native`: z-scores, from the fingerprint), else 8-bit as `decode_image` (0..255 presets;
    deeper images brought to 8-bit by their own maximum, as `decode_image` always did)."""
    if native:
        return decode_pixels(data, max_pixels, channels).pixels
    if channels == RGB:
        return decode_image(data, max_pixels)
    pixels = decode_pixels(data, max_pixels, channels).pixels
    if pixels.dtype == np.uint8:
        return pixels
    values = np.clip(np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0), 0, None)
    return (values * (255.0 / (values.max() or 1.0))).astype(np.uint8)


def display_rgb(pixels: np.ndarray) -> np.ndarray:
    """Height x width x 3 uint8 for people: the first three channels (one or two: the first, grey);
    16-bit and float channels are contrast-stretched (0.5-99.5 percentiles to 0..255, per channel)."""
    arr = pixels if pixels.ndim == 3 else pixels[..., None]
    arr = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]
    if arr.dtype != np.uint8:
        values = arr.astype(np.float32)
        finite = np.isfinite(values)
        out = np.zeros(values.shape, np.uint8)
        for c in range(values.shape[2]):
            seen = values[..., c][finite[..., c]]
            if not seen.size:
                continue
            low, high = np.percentile(seen, (0.5, 99.5))
            span = float(high - low) or 1.0
            stretched = np.clip((np.nan_to_num(values[..., c], nan=low) - low) * (255.0 / span), 0, 255)
            out[..., c] = (stretched + 0.5).astype(np.uint8)
        arr = out
    return np.ascontiguousarray(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr)


def decode_display(data: bytes, max_pixels: int = MAX_PIXELS, channels: Channels = OWN) -> np.ndarray:
    """Encoded bytes -> a viewable uint8 RGB image of the bands `channels` picks (see `display_rgb`)."""
    return display_rgb(decode_pixels(data, max_pixels, Channels(channels.bands, None)).pixels)


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
        if tiff.needs_tifffile(data):
            h, w = tiff.slice_size(data)
            if problem := limits.over(w, h, max_pixels):
                raise ImageDecodeError(problem)
            return h, w
    except tiff.TiffError as exc:
        raise _tiff_problem(exc) from exc
    try:
        img = _header(data, max_pixels)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(_unidentified(data)) from exc
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    w, h = img.size
    return h, w


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an HxWxC image to (height, width). 8-bit RGB goes through Pillow's RGB path
    (the bytes `raysegment export` reproduces); other 8-bit images channel by channel (still uint8),
    16-bit and float ones channel by channel in float32 (the result is float32: interpolated values)."""
    if img.shape[:2] == size:
        return img
    if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))
    planes = img if img.ndim == 3 else img[..., None]
    dtype = np.uint8 if img.dtype == np.uint8 else np.float32
    out = np.empty((*size, planes.shape[2]), dtype)
    for c in range(planes.shape[2]):
        plane = planes[..., c] if dtype == np.uint8 else planes[..., c].astype(np.float32)
        out[..., c] = np.asarray(
            Image.fromarray(np.ascontiguousarray(plane)).resize((size[1], size[0]), Image.BILINEAR)
        )
    return out if img.ndim == 3 else out[..., 0]


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
