"""TIFF files beyond what Pillow decodes whole: multi-page stacks, more than four bands, 16-bit colour, float.

Pages are slices: a stack such as the ISBI 2012 volumes (`train-volume.tif` + `train-labels.tif`)
becomes one pair (in `prepare`) or one input (in `infer`) per page, keyed `{stem}/{page:04d}`
from 0. Reduced-resolution pages (a pyramid's overviews, NewSubfileType bit 0) are no slices and
are skipped. Bands are the samples of one page (a multispectral scene, interleaved or planar).

Pillow reads 8-bit grey, RGB(A), palette, CMYK, 1-bit and single-band 16-bit or float TIFFs
losslessly and applies their orientation, so those stay with it (`pil_reads`); the rest is read
here with tifffile. Without the optional imagecodecs package tifffile decodes uncompressed, zlib
(deflate) and LZMA TIFFs; LZW, JPEG or packbits ones are read with rasterio when it is installed
(extra `geo`), else they are one clear error naming the fix.
"""

from __future__ import annotations

import io
import itertools
import math
import posixpath
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np

from raysegment.data import limits

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
TIFF_EXTENSIONS = (".tif", ".tiff")
PAGE_DIGITS = 4
# `infer` names a page's source `{file uri}#page={n}`; `show` and `report` read such a URI back.
PAGE_FRAGMENT = re.compile(r"#page=(\d+)$")
_PALETTE, _SEPARATED, _YCBCR = 3, 5, 6  # TIFF photometric interpretations Pillow converts to RGB itself
_ALPHA = (1, 2)  # ExtraSamples: associated, unassociated alpha
_GDAL_NODATA = 42113  # GeoTIFF tag: the value of pixels that hold no data
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")  # Pillow modes a PNG holds losslessly


T = TypeVar("T")
# Pages walked in one file at most: a real stack of 100,000 slices is split into files long before.
MAX_PAGES = 100_000


class TiffError(ValueError):
    """A TIFF that cannot be read as asked; the message says why and, where there is one, the fix."""


def is_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_MAGIC


def is_tiff_name(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in TIFF_EXTENSIONS


def _open(data: bytes) -> Any:
    import tifffile

    return _tifffile(lambda: tifffile.TiffFile(io.BytesIO(data)))


def _slices(tif: Any) -> Iterator[int]:
    """Indices of the pages that are slices (full resolution; overviews are left out), walked lazily.

    A file's page chain is the file's to say: one that points back at a page already read would walk
    forever (tifffile reads pages one by one and does not catch it), and a small file of empty pages could
    take minutes, so a repeated page and more than MAX_PAGES pages are errors. tifffile's own exceptions
    for damaged headers become TiffError."""
    seen: set[int] = set()
    try:
        for i, page in enumerate(tif.pages):
            offset = getattr(page, "offset", None)
            if offset in seen:
                raise TiffError(f"TIFF page {i} repeats an earlier page (its page list loops): a damaged file")
            seen.add(offset)
            if i >= MAX_PAGES:
                raise TiffError(f"TIFF has more than {MAX_PAGES} pages; split the stack into smaller files")
            if not getattr(page, "is_reduced", False):
                yield i
    except TiffError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged page headers
        raise TiffError(f"cannot read TIFF: {type(exc).__name__}: {exc}") from exc


def slice_pages(tif: Any) -> list[int]:
    """Indices of every slice (see `_slices`)."""
    return list(_slices(tif))


def first_slice(tif: Any) -> int | None:
    """The index of the first slice, reading no further page headers than it takes (None: no slice)."""
    return next(_slices(tif), None)


def count_pages(read: Callable[[], Any]) -> int:
    """Slices in a TIFF given an opener of its file object (only the headers are read)."""
    import tifffile

    try:
        with read() as f, tifffile.TiffFile(f) as tif:
            return len(slice_pages(tif))
    except (OSError, TiffError):
        raise
    except Exception as exc:
        raise TiffError(f"cannot read TIFF: {type(exc).__name__}: {exc}") from exc


def page_count(data: bytes) -> int:
    """Slices in an encoded TIFF (1 for anything else)."""
    if not is_tiff(data):
        return 1
    with _open(data) as tif:
        return len(slice_pages(tif))


def pages_text(count: int) -> str:
    """A stack's pages for a message: "1 page (0)", "3 pages (0..2)"."""
    return "1 page (0)" if count == 1 else f"{count} pages (0..{count - 1})"


def page_key(key: str, page: int, pages: int) -> str:
    """`vol` page 3 of 30 -> `vol/0003` (more digits past 9,999 pages, so keys still sort)."""
    return f"{key}/{page:0{max(PAGE_DIGITS, len(str(pages - 1)))}d}"


def page_uri(uri: str, page: int) -> str:
    return f"{uri}#page={page}"


def split_page_uri(uri: str) -> tuple[str, int | None]:
    """`.../vol.tif#page=3` -> (`.../vol.tif`, 3); any other URI -> (uri, None)."""
    found = PAGE_FRAGMENT.search(uri)
    if found and is_tiff_name(uri[: found.start()]):
        return uri[: found.start()], int(found.group(1))
    return uri, None


def _alpha_bands(page: Any) -> int:
    return sum(1 for s in page.extrasamples if int(s) in _ALPHA)


def marks_nodata(dtype: np.dtype) -> bool:
    """Whether a raster of this pixel type has its no-data value read as NaN: float, and integers of 16 bits
    or more (float32 holds 16-bit values exactly). 8-bit rasters keep theirs as a value: marking it would make
    every such image float, and 8-bit models take 0..255 pixels (the presets), where NaN has no place."""
    return dtype.kind == "f" or (dtype.kind in "iu" and dtype.itemsize >= 2)


def _nodata(page: Any) -> float | None:
    """The page's GDAL_NODATA sentinel (-9999, 0, 65535, -3.4e38, ...) where `marks_nodata` its pixel type,
    else None. The tag is parsed here: tifffile reads an unparsable or out-of-range value as 0, which would
    mark every real 0 as no data."""
    if page.dtype is None or _GDAL_NODATA not in page.tags or not marks_nodata(np.dtype(page.dtype)):
        return None
    text = page.tags[_GDAL_NODATA].value
    try:
        return float(str(text).strip().strip("\x00").replace(",", "."))
    except ValueError:
        return None


def mark_nodata(arr: np.ndarray, nodata: float | None) -> np.ndarray:
    """`arr` with its `nodata` pixels NaN (integer rasters as float32 copies; `marks_nodata` says which), as a
    float image's own NaNs: left out of the fingerprint, 0 after normalisation (`card.normalize`). A value the
    pixel type cannot hold marks nothing (an integer raster is still read as float32, as its tag says)."""
    if nodata is None or not marks_nodata(arr.dtype):
        return arr
    if arr.dtype.kind == "f":
        return arr if math.isnan(nodata) else np.where(arr == nodata, np.asarray(np.nan, arr.dtype), arr)
    info = np.iinfo(arr.dtype)
    hit = arr == arr.dtype.type(nodata) if nodata.is_integer() and info.min <= nodata <= info.max else None
    arr = arr.astype(np.float32)
    if hit is not None:
        arr[hit] = np.nan
    return arr


def pil_reads(page: Any) -> bool:
    """True when Pillow decodes this page without losing bands or precision (or a raster's marked nodata)."""
    if page.dtype is None:  # odd bit depths: tifffile says what it cannot do
        return False
    if _nodata(page) is not None:  # Pillow reads past the GDAL tag
        return False
    dtype, samples, photometric = np.dtype(page.dtype), page.samplesperpixel, int(page.photometric)
    if photometric == _PALETTE or dtype == np.bool_:
        return True
    if dtype == np.uint8:
        alpha = _alpha_bands(page)
        return photometric in (_SEPARATED, _YCBCR) or (alpha <= 1 and samples - alpha in (1, 3))
    return samples == 1 and dtype in (np.uint16, np.float32)


def needs_tifffile(data: bytes) -> bool:
    """True for a TIFF whose first slice Pillow cannot decode losslessly (see `pil_reads`)."""
    if not is_tiff(data):
        return False
    with _open(data) as tif:
        first = first_slice(tif)
        return first is not None and not _tifffile(lambda: pil_reads(tif.pages[first]))


def _tifffile(read: Callable[[], T]) -> T:
    """A tifffile call (opening a file, reading a page's header); its many exception types for damaged
    headers become TiffError."""
    try:
        return read()
    except TiffError:
        raise
    except Exception as exc:
        raise TiffError(f"cannot read TIFF: {type(exc).__name__}: {exc}") from exc


def slice_size(data: bytes, page: int = 0) -> tuple[int, int]:
    """(height, width) of a slice, from the headers only (those of the pages up to it)."""
    with _open(data) as tif:
        index = next(itertools.islice(_slices(tif), page, None), None)
        if index is None:
            raise TiffError(f"page {page} asked for; the TIFF has {pages_text(len(slice_pages(tif)))}")
        return _tifffile(lambda: (tif.pages[index].imagelength, tif.pages[index].imagewidth))


def _as_yxs(page: Any, arr: np.ndarray) -> np.ndarray:
    """A page's array as height x width x samples, whatever its planar configuration."""
    axes = page.axes
    if axes.startswith("S"):  # planar (band-sequential) storage
        arr = np.moveaxis(arr, 0, -1)
    return arr if arr.ndim == 3 else arr[..., None]


def _with_rasterio(data: bytes, why: Exception) -> np.ndarray:
    try:
        from rasterio.io import MemoryFile
    except ImportError:
        raise TiffError(
            f"{why}; install imagecodecs (pip install imagecodecs) or rasterio (pip install 'raysegment[geo]'), "
            "or save the TIFF uncompressed or with deflate"
        ) from None
    with MemoryFile(data) as mem, mem.open() as src:
        return np.moveaxis(src.read(), 0, -1)


def read_bands(data: bytes, max_pixels: int, page: int = 0) -> tuple[np.ndarray, int]:
    """(height x width x bands at the file's own precision, how many trailing bands are alpha) of one slice."""
    with _open(data) as tif:
        pages = slice_pages(tif)
        if page >= len(pages):
            raise TiffError(f"page {page} asked for; the TIFF has {pages_text(len(pages))}")
        p = tif.pages[pages[page]]
        if problem := limits.over(p.imagewidth, p.imagelength, max_pixels, p.samplesperpixel):
            raise TiffError(problem)
        try:
            arr = _as_yxs(p, p.asarray())
        except ValueError as exc:
            if "imagecodecs" not in str(exc) or len(pages) > 1:
                raise TiffError(f"cannot decode TIFF: {exc}") from exc
            arr = _with_rasterio(data, exc)
        return mark_nodata(arr, _nodata(p)), _alpha_bands(p)


def page_bytes(data: bytes, page: int, max_pixels: int = limits.MAX_PIXELS) -> bytes:
    """One slice of a stack as a file of its own, lossless: PNG where PNG holds it (8-bit grey or RGB,
    16-bit grey, 1-bit), else a single-page TIFF (deflate) at the slice's own precision and bands.
    A slice over `max_pixels` is refused before it is decoded."""
    from PIL import Image

    with _open(data) as tif:
        pages = slice_pages(tif)
        if page >= len(pages):
            raise TiffError(f"page {page} asked for; the TIFF has {pages_text(len(pages))}")
        p = tif.pages[pages[page]]
        if problem := _tifffile(lambda: limits.over(p.imagewidth, p.imagelength, max_pixels, p.samplesperpixel)):
            raise TiffError(problem)
        index, easy = pages[page], _tifffile(lambda: pil_reads(p))
    if easy:  # Pillow reads it (LZW and JPEG included) and applies its palette and orientation
        try:
            with warnings.catch_warnings():  # the slice's size is checked above; Pillow's guard is for page 0
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=["TIFF"])
        except Image.DecompressionBombError as exc:
            raise TiffError(
                limits.refusal("over Pillow's 179-million-pixel limit on its first page", max_pixels)
            ) from exc
        img.seek(index)
        img.load()
        if img.mode not in (*PNG_MODES, "F", "I", "I;16B", "I;16L"):
            img = img.convert("RGBA" if img.mode.upper().endswith("A") else "RGB")  # CMYK, YCbCr, premultiplied
        if img.mode in PNG_MODES:
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=1)
            return buf.getvalue()
        arr = np.asarray(img)
        arr = arr.astype(arr.dtype.newbyteorder("="))
    else:
        arr, _ = read_bands(data, max_pixels, page)
    return encode_tiff(arr)


def encode_tiff(arr: np.ndarray) -> bytes:
    """Height x width (x bands) pixels as one deflate-compressed TIFF page, bands interleaved."""
    import tifffile

    buf = io.BytesIO()
    photometric = "rgb" if arr.ndim == 3 and arr.shape[2] == 3 else "minisblack"
    tifffile.imwrite(buf, arr, photometric=photometric, planarconfig="contig", compression="zlib")
    return buf.getvalue()


def split_stacks(batch: dict[str, np.ndarray], max_pixels: int = limits.MAX_PIXELS) -> dict[str, np.ndarray]:
    """Inference rows (key, source_uri, bytes, error, collides, ...): each multi-page TIFF becomes one row
    per slice, keyed `{key}/{page:04d}`, its source `{uri}#page={n}`, its bytes the slice alone. A stack that
    cannot be split is one error row under its own key; other rows pass unchanged."""
    out: dict[str, list[Any]] = {name: [] for name in batch}
    for i in range(len(batch["key"])):
        row = {name: batch[name][i] for name in batch}
        data = row.get("bytes")
        pages = 1
        if not row.get("error") and isinstance(data, bytes) and is_tiff(data):
            try:
                pages = page_count(data)
            except TiffError as exc:
                row["error"] = str(exc)
        if pages <= 1:
            for name in batch:
                out[name].append(row[name])
            continue
        for page in range(pages):
            piece = dict(row, key=page_key(str(row["key"]), page, pages))
            piece["source_uri"] = page_uri(str(row["source_uri"]), page)
            try:
                piece["bytes"] = page_bytes(data, page, max_pixels)
            except (TiffError, OSError) as exc:
                piece["bytes"], piece["error"] = b"", f"cannot read page {page}: {exc}"
            for name in batch:
                out[name].append(piece[name])
    return {name: np.asarray(values, dtype=batch[name].dtype) for name, values in out.items()}
