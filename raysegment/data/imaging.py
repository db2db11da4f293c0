"""Decoding images and masks, resizing, and encoding palette PNG masks.

Two ways to decode an image: `decode_image` (8-bit RGB, as models with a 0..255 normalisation were
trained) and `decode_pixels` (the bands the data set chose, `Channels`, at the file's own precision:
16-bit and float values are never rescaled here; the card's normalisation maps them). TIFFs Pillow
cannot take whole (more than four bands, 16-bit colour, float colour, stacks) are read by `data/tiff.py`;
16-bit colour PNGs (RGB, RGBA, grey + alpha), which Pillow cuts to their high byte, by `_png16` (Pillow's
own PNG decoder, run once for each byte of the 16-bit samples). `decode_image` takes both the same way
and brings them to 8 bits by their own maximum, as it does a 16-bit grey PNG.
`display_rgb` makes any decoded image viewable (`show`, `report`): its first three channels, 16-bit
and float ones contrast-stretched.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
import zlib
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR colour types Pillow opens at 8 bits when their samples are 16-bit: RGB, grey + alpha, RGBA.
_PNG16_COLOUR = {2: ("RGB", 0), 4: ("LA", 1), 6: ("RGBA", 1)}  # colour type -> (bands, trailing alpha bands)
_PNG16_TYPE = {(2, 1): 4, (3, 0): 2, (4, 1): 6}  # (bands, alpha) -> colour type, for `_encode_png16`
# ImageOps.exif_transpose's turns, on arrays (height x width x bands).
_ORIENTED = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def is_png16_colour(data: bytes) -> bool:
    """True for a PNG whose IHDR says 16-bit RGB, RGBA or grey + alpha (bit depth byte 24, colour type 25)."""
    return (
        data.startswith(PNG_SIGNATURE)
        and len(data) >= 29
        and data[12:16] == b"IHDR"
        and data[24] == 16
        and data[25] in _PNG16_COLOUR
    )


def _png_chunks(data: bytes) -> tuple[bytes, bool]:
    """(the IDAT chunks' data joined, whether an eXIf chunk is there) of a PNG; a truncated file gives what
    it holds (its decoding then fails for want of data)."""
    pos, parts, exif = 8, [], False
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4]), data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            parts.append(data[pos + 8 : pos + 8 + length])
        exif = exif or kind == b"eXIf"
        if kind == b"IEND":
            break
        pos += 12 + length
    return b"".join(parts), exif


def _png16(data: bytes, max_pixels: int, upright_bytes: bool = True) -> tuple[np.ndarray, int, bytes]:
    """(height x width x bands uint16, trailing alpha bands, upright bytes) of a 16-bit colour PNG.

    Pillow opens these at 8 bits (their high bytes); its PNG decoder (inflate, unfilter, Adam7) is run here
    twice on the IDAT data, unpacking the high bytes, then the low ones (grey + alpha, four bytes a pixel,
    unpacks whole as RGBA bytes in one run). The header's size is checked first, as for any image; an EXIF
    orientation is applied, and the upright image is then stored as a 16-bit PNG of its own (`upright_bytes`;
    else the file's bytes are returned as they are)."""
    img = _checked_header(data, max_pixels)
    width, height = img.size
    colour_type, interlaced = data[25], data[28]
    mode, alpha = _PNG16_COLOUR[colour_type]
    idat, exif = _png_chunks(data)
    try:
        if mode == "LA":
            both = np.asarray(Image.frombytes("RGBA", (width, height), idat, "zip", "RGBA", interlaced))
            arr = (both[..., 0::2].astype(np.uint16) << 8) | both[..., 1::2]
        else:
            high = Image.frombytes(mode, (width, height), idat, "zip", f"{mode};16B", interlaced)
            low = Image.frombytes(mode, (width, height), idat, "zip", f"{mode};16L", interlaced)
            arr = (np.asarray(high).astype(np.uint16) << 8) | np.asarray(low)
    except Exception as exc:  # Pillow raises ValueError, OSError, zlib errors for damaged pixel data
        raise ImageDecodeError(f"cannot decode image: a 16-bit PNG whose pixel data is damaged ({exc})") from exc
    try:  # read without decoding the 8-bit pixels again, unless the tag comes after them
        orientation = img.getexif().get(EXIF_ORIENTATION, 1) if exif or "xmp" in img.info else 1
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    if orientation in _ORIENTED:
        arr = np.ascontiguousarray(_ORIENTED[orientation](arr))
        data = _encode_png16(arr, alpha) if upright_bytes else data
    return arr, alpha, data


def _encode_png16(arr: np.ndarray, alpha: int) -> bytes:
    """Height x width x bands uint16 as a 16-bit PNG (unfiltered rows, fast deflate): lossless, as `_png`."""
    height, width, bands = arr.shape
    rows = np.zeros((height, 1 + width * bands * 2), np.uint8)  # each row's filter byte: 0 (none)
    rows[:, 1:] = arr.astype(">u2").view(np.uint8).reshape(height, -1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4) + kind + body + zlib.crc32(kind + body).to_bytes(4)

    ihdr = width.to_bytes(4) + height.to_bytes(4) + bytes([16, _PNG16_TYPE[bands, alpha], 0, 0, 0])
    idat = zlib.compress(rows.tobytes(), 1)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _deep(data: bytes, max_pixels: int, upright_bytes: bool = True) -> tuple[np.ndarray, int, bytes] | None:
    """(height x width x bands, trailing alpha bands, upright bytes) of a file Pillow would not decode whole
    (a TIFF `tiff.needs_tifffile` names, a 16-bit colour PNG), at its own precision; None for the rest."""
    try:
        if tiff.needs_tifffile(data):
            arr, alpha = tiff.read_bands(data, max_pixels)
            return arr, alpha, data
    except tiff.TiffError as exc:
        raise _tiff_problem(exc) from exc
    if is_png16_colour(data):
        return _png16(data, max_pixels, upright_bytes)
    return None


def _raw(data: bytes, max_pixels: int, upright_bytes: bool = True) -> tuple[np.ndarray, int, str, bytes]:
    """(height x width x bands, trailing alpha bands, mode, upright bytes) of an image file.

    The bytes are the file's own, or a lossless PNG when an EXIF orientation had to be applied (only with
    `upright_bytes`: prepare stores them, the decoders for a model drop them). What Pillow has no mode for
    (read by tifffile, 16-bit colour PNGs) has the mode dtype x bands ("uint16x3")."""
    deep = _deep(data, max_pixels, upright_bytes)
    if deep is not None:
        arr, alpha, upright = deep
        return arr, alpha, f"{arr.dtype.name}x{arr.shape[2]}", upright
    img = _open(data, max_pixels)
    mode = img.mode
    if img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
        if upright_bytes:
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
    raw, alpha, mode, _ = _raw(data, max_pixels, upright_bytes=False)
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
    return _eight_bit(decode_pixels(data, max_pixels, channels).pixels)


def _eight_bit(pixels: np.ndarray) -> np.ndarray:
    """16-bit and float pixels brought to uint8 by the image's own maximum, truncated; uint8 as is. NaN, +inf,
    -inf and negatives are 0 (the maximum is that of the finite values), so an image without a finite
    pixel is all 0.

    Each value is multiplied in float64 and cast to uint8 by one ufunc (no full-size float copy): the same
    numbers as `export.decode_as_infer`'s float64 product (float32 differs for some maxima: 7, 14, 25...).
    Unsigned integers need no masking (a 2048^2 uint16: 2 ms, where NaN handling and clipping copies took 100)."""
    if pixels.dtype == np.uint8:
        return pixels
    out = np.zeros(pixels.shape, np.uint8)
    if pixels.dtype.kind == "u":
        scale = np.float64(255.0 / (float(np.max(pixels, initial=0)) or 1.0))
        return np.multiply(pixels, scale, out=out, casting="unsafe")
    kept = pixels > 0  # NaN compares False
    if pixels.dtype.kind == "f":
        kept &= np.isfinite(pixels)
    scale = np.float64(255.0 / (float(np.max(pixels, where=kept, initial=0)) or 1.0))
    return np.multiply(pixels, scale, out=out, where=kept, casting="unsafe")


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


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB as meant to be seen (an EXIF orientation is applied, as
    `prepare` stores training images, so a phone photo is predicted upright and its mask is the
    upright image's size); grey, alpha, palette and 16-bit are converted, 16-bit and float by the
    image's own maximum. What Pillow would not decode whole (TIFFs of other band counts or deeper colour,
    16-bit colour PNGs) is read at its own precision first: bands other than grey or RGB, alpha aside,
    are an ImageDecodeError naming their count (`select_channels`), never a guess."""
    deep = _deep(data, max_pixels, upright_bytes=False)
    if deep is not None:
        raw, alpha, _ = deep
        return np.ascontiguousarray(_eight_bit(select_channels(raw, alpha, RGB)))
    img = _open(data, max_pixels)
    if img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Pillow's own conversion clamps: a float image in 0..1 came out black (and 32-bit negatives wrapped).
        img = Image.fromarray(_eight_bit(np.asarray(img)))
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
    w, h = _checked_header(data, max_pixels).size
    return h, w


def _checked_header(data: bytes, max_pixels: int) -> Image.Image:
    """`_header`, its failures as ImageDecodeError."""
    try:
        return _header(data, max_pixels)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(_unidentified(data)) from exc
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


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
