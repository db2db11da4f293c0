"""Rasters too big to decode whole: tiled or striped (Geo)TIFFs that `infer` reads, predicts and writes
window by window, so a predictor actor's memory follows the window (``--max-pixels``), not the image.

Recognised when read (`read_input`, headers only, tifffile): a .tif/.tiff input of the files or list
source whose first page has more pixels than ``--max-pixels`` and is stored in blocks (tiles, or strips
of a few rows) that each fit in it. Its row carries no bytes, only ``raster=True``: the decode task passes
it by, and the predictor actor (`predict_rows`) reads it with rasterio (GDAL), predicts each window with
its own tiling (`Predictor._predict_tiled`: the same normalisation, padding and tiles as any image),
writes the kept part of each window into a local tiled GeoTIFF and, at the end, turns that into a
Cloud-Optimised GeoTIFF (GDAL's COG driver: 512x512 deflate tiles, nearest-neighbour overviews, the
palette as its colour table, the source's CRS and transform or GCPs), staged as any large file
(`storage.staged_file`: a rename locally, one upload on S3) to ``masks/{key}.tif``. The row's class
fractions and mean confidence are summed window by window.

Windows are runs of the whole image's own tile grid (`Grid`: the predictor's `tile_starts` over the
padded image), at most ``--max-pixels`` each: square, or as wide as the image and taller where the image is
narrower than that square (a striped source's strips are decoded once per column of windows). The predictor blends the
probabilities of overlapping tiles (`stitch.WindowBlender`), so neighbouring windows share at least one
tile and each pixel is kept from a window holding every tile that touches it: the window blends exactly
what the whole image would, and the stitched mask equals the whole-image prediction (bit for bit in
tests/test_rasters.py; exact where the tile stride is a multiple of the model's size multiple, so that
windows pad as the image does, which the defaults are).

Sources on S3 are first copied to a local temporary file (`storage.download_file`: streamed, under the
job's retry deadline). Every pixel is read anyway, so the copy costs local disk (the compressed file),
not extra transfer; a store failure is then a StorageError like any read (transient: the job fails and a
re-run resumes), and a GDAL error can only mean a damaged file (an error row). GDAL's /vsis3/ would need
storage.py's endpoint, addressing and credentials set up a second time, and its network failures cannot
be told from a damaged file. `read_view` (report, show) reads only the overview it needs, through the
storage layer's file objects (rasterio's ``opener``), since a thumbnail should not cost a download.

Memory per actor: the window's pixels a few times over (source bands, the model's channels, the class
map), a batch of normalised tiles and the blender's band of tile rows; GDAL's block cache is capped at GDAL_CACHE_MB (its default is 5%
of the machine's memory). Each summary row records the actor's peak RSS (`peak_rss_mb`).

rasterio is optional (extra ``geo``): imported only here, only for a big raster, and its absence is one
error naming ``pip install 'raysegment[geo]'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from raysegment import storage
from raysegment.data import imaging, limits, tiff
from raysegment.errors import DataError, StorageError
from raysegment.inference import output as layout
from raysegment.inference.stitch import tile_starts
from raysegment.models.card import ModelCard

if TYPE_CHECKING:
    from raysegment.inference.predictor import Predictor

MASK_EXT = ".tif"
BLOCK = 512  # the mask's tiles
GDAL_CACHE_MB = 64
HEADER_BLOCK = 1 << 18  # read-ahead when probing a header (s3fs would fetch 50 MiB of a big raster)
VIEW_BLOCK = 4 << 20  # read-ahead of views on S3: an overview's tiles, not 50 MiB at a time
VIEW_SIDE = 1024  # report: a raster (mask or source) is read back at most this many pixels per side
SHOW_SIDE = 4096  # show: the overlay of a big raster, at most this many pixels per side
GEO_EXTRA = "pip install 'raysegment[geo]'"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RasterInfo:
    """What a TIFF's first page header says: its size, bands and how it is stored."""

    height: int
    width: int
    bands: int
    dtype: str
    block: tuple[int, int]  # a tile, or a strip (rows per strip x width)

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def windowed(self, max_pixels: int) -> bool:
        """Read window by window: over the limit, and stored in blocks that each fit in it."""
        return self.pixels > max_pixels and self.block[0] * self.block[1] <= max_pixels


def probe(f: Any) -> RasterInfo | None:
    """The first page's facts from a TIFF file object (headers only), or None when it is no readable TIFF."""
    import tifffile

    try:
        with tifffile.TiffFile(f) as tif:
            page = tif.pages.first
            h, w = int(page.imagelength), int(page.imagewidth)
            if page.is_tiled:
                block = (int(page.tilelength), int(page.tilewidth))
            else:
                block = (min(int(page.rowsperstrip) or h, h), w)
            return RasterInfo(h, w, int(page.samplesperpixel), str(np.dtype(page.dtype)), block)
    except Exception:  # noqa: BLE001 - not a TIFF after all: the decoder says what is wrong with it
        return None


def require_rasterio() -> None:
    """rasterio is the extra `geo`: one clear error where a big raster needs it and it is missing."""
    try:
        import rasterio  # noqa: F401
    except ImportError:
        raise DataError(
            f"big rasters (TIFFs over --max-pixels) are read window by window with rasterio; {GEO_EXTRA}"
        ) from None


def read_input(loc: storage.Location, max_pixels: int | None, max_bytes: int | None = None) -> bytes | RasterInfo:
    """An input's bytes, or, for a big raster (`RasterInfo.windowed`), its header facts and nothing more.

    Only TIFF names are probed (one header read; the rest of a small TIFF is read through the same handle).
    An input of more than `max_bytes` is an OSError, unread: a local file by its size (one fstat of the open
    file, and never read past the limit: a /proc file says size 0), an object by one ranged read (no size
    request first), as a local device or socket is (/dev/zero never ends). A named pipe is read as `cat` reads
    one, when its writer comes, up to `max_bytes` (the tests hold jobs on pipes: `helpers.PipeBarrier`)."""
    if not loc.remote:
        return _read_local(loc.path, max_pixels, max_bytes)
    if max_pixels is None or not tiff.is_tiff_name(loc.path):
        if not max_bytes:
            return loc.fs.cat_file(loc.path)
        return _bounded(_ranged(loc, max_bytes + 1), max_bytes)
    with loc.fs.open(loc.path, "rb", block_size=HEADER_BLOCK) as f:
        info = probe(f)
        if info is None or not info.windowed(max_pixels):
            f.seek(0)
            return _bounded(f.read(max_bytes + 1) if max_bytes else f.read(), max_bytes)  # capped at its size
    require_rasterio()
    return info


def _read_local(path: str, max_pixels: int | None, max_bytes: int | None) -> bytes | RasterInfo:
    with open(path, "rb") as f:  # a pipe: waits here for its writer
        mode, size = (st := os.fstat(f.fileno())).st_mode, st.st_size
        if _device_or_socket(mode):
            raise OSError(f"{path}: a device or socket, not a file; not read")
        if not stat.S_ISREG(mode):  # a pipe: no size to judge by, so read in pieces up to the limit
            return _bounded(_upto(f, max_bytes), max_bytes) if max_bytes else f.read()
        if max_bytes and size > max_bytes:
            raise OSError(limits.too_large(max_bytes, size))
        if max_pixels is not None and tiff.is_tiff_name(path):
            info = probe(f)
            if info is not None and info.windowed(max_pixels):
                require_rasterio()
                return info
            f.seek(0)
        # Up to the limit still: a /proc file says size 0, and a file can grow after the fstat.
        return _bounded(_upto(f, max_bytes, size), max_bytes) if max_bytes else f.read()


def _upto(f: Any, max_bytes: int, size: int = 0) -> bytes:
    """A stream's bytes, stopping one byte past `max_bytes`: first the `size` it says it holds (a regular file's,
    within the limit), then a MiB at a time (never allocating the limit whole: `read(n)` reserves n bytes up
    front)."""
    parts, held, step = [], 0, size + 1 if size else 1 << 20
    while held <= max_bytes and (part := f.read(min(step, max_bytes + 1 - held))):
        parts.append(part)
        held, step = held + len(part), 1 << 20
    return b"".join(parts)  # one part: that part, not a copy


def _ranged(loc: storage.Location, end: int) -> bytes:
    """An object's first `end` bytes by one ranged GET; an empty object, which some stores answer with 416
    (no byte 0 to give), is b"" as a plain read would be."""
    try:
        return loc.fs.cat_file(loc.path, start=0, end=end)
    except OSError as exc:
        if "InvalidRange" in str(exc) or "416" in str(exc):
            return b""
        raise


def readable_kind(path: str) -> bool:
    """Whether a local path (its links followed) is a file or a named pipe, not a device or a socket."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True  # not there: the read says so, as for any missing file
    return not _device_or_socket(mode)


def _device_or_socket(mode: int) -> bool:
    """A mode no read of which ends (/dev/zero) or starts (a socket)."""
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)


def _bounded(data: bytes, max_bytes: int | None) -> bytes:
    if max_bytes and len(data) > max_bytes:
        raise OSError(limits.too_large(max_bytes))
    return data


# -- windows ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Window:
    """One window: the rows and columns read (image coordinates), and the part of them kept."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    keep_rows: tuple[int, int]
    keep_cols: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Grid:
    """The predictor's tiles along one axis of the whole (padded) image: a window is a run of them."""

    length: int  # the image's
    tile: int
    starts: list[int]

    @classmethod
    def of(cls, length: int, tile: int, overlap: int, multiple: int) -> Grid:
        padded = -(-length // multiple) * multiple  # as `Predictor._padded` pads the whole image
        tile = min(tile, padded)
        return cls(length, tile, tile_starts(padded, tile, overlap))

    def span(self, first: int, last: int) -> int:
        """Pixels from tile `first`'s start to tile `last`'s end."""
        return self.starts[last] + self.tile - self.starts[first]

    def complete_from(self, first: int) -> int:
        """Where pixels start that no tile before `first` touches."""
        return 0 if first == 0 else self.starts[first - 1] + self.tile

    def complete_to(self, last: int) -> int:
        """Where pixels end that no tile after `last` touches."""
        return self.length if last == len(self.starts) - 1 else self.starts[last + 1]

    def windows(self, per_window: int) -> list[tuple[int, int, int, int]]:
        """(read start, read end, keep start, keep end) of runs of at most `per_window` tiles. Runs overlap
        so that every pixel is kept from a run holding every tile that touches it (a pixel's blend then
        sums exactly what the whole image's does); [] when `per_window` tiles are too few for that."""
        runs, first, n = [], 0, len(self.starts)
        while True:
            last = min(first + per_window - 1, n - 1)
            runs.append((first, last))
            if last == n - 1:
                break
            # The next run starts as late as leaves no pixel between the two without all its tiles.
            later = [f for f in range(first + 1, last + 1) if self.complete_from(f) <= self.complete_to(last)]
            if not later:
                return []
            first = later[-1]
        cuts = [0] + [self.complete_from(f) for f, _ in runs[1:]] + [self.length]
        return [
            (self.starts[f], min(self.starts[f] + self.span(f, last), self.length), cuts[k], cuts[k + 1])
            for k, (f, last) in enumerate(runs)
        ]


def _tiles_within(grid: Grid, pixels: int) -> int:
    """How many consecutive tiles of `grid` fit in `pixels` (at least 1)."""
    n = 1
    while n < len(grid.starts) and grid.span(0, n) <= pixels:
        n += 1
    return n


def windows(height: int, width: int, max_pixels: int, tile: int, overlap: int, multiple: int) -> list[Window]:
    """The windows of a height x width raster, row by row (the order the mask's blocks are written): runs
    of the predictor's own tiles (`Grid`), at most `max_pixels` each: square, or as wide as the image
    and taller where the image is narrower than that square."""
    rows, cols = Grid.of(height, tile, overlap, multiple), Grid.of(width, tile, overlap, multiple)
    across = min(cols.span(0, len(cols.starts) - 1), math.isqrt(max_pixels))
    per_col = _tiles_within(cols, across)
    per_row = _tiles_within(rows, max_pixels // cols.span(0, per_col - 1))
    plan_rows, plan_cols = rows.windows(per_row), cols.windows(per_col)
    largest = rows.span(0, per_row - 1) * cols.span(0, per_col - 1)  # no run is longer than the first
    if not plan_rows or not plan_cols or largest > max_pixels:
        raise DataError(
            f"--max-pixels {max_pixels} is too small for windows of --tile-size {tile} tiles: a window needs "
            "a few tiles per side (neighbours share a tile); raise --max-pixels or lower --tile-size"
        )
    return [
        Window((r0, r1), (c0, c1), (kr0, kr1), (kc0, kc1))
        for r0, r1, kr0, kr1 in plan_rows
        for c0, c1, kc0, kc1 in plan_cols
    ]


# -- reading a window as the model's pixels -------------------------------------------------------------


@contextlib.contextmanager
def gdal_env(threads: int = 1) -> Iterator[None]:
    """GDAL with a bounded block cache (its default is 5% of RAM, far past a window) and `threads` for
    compression; georeferencing warnings off (a plain TIFF has none, and needs none)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB, GDAL_NUM_THREADS=str(max(1, threads))), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def _alpha_bands(src: Any) -> int:
    """Trailing alpha bands, as the whole-image decoder drops them."""
    from rasterio.enums import ColorInterp

    interp = list(src.colorinterp)
    n = 0
    while n < len(interp) and interp[-1 - n] == ColorInterp.alpha:
        n += 1
    return n


def model_pixels(src: Any, window: Window, card: ModelCard) -> np.ndarray:
    """The window's pixels as the model sees them (height x width x channels): the card's bands, as for
    any image (`imaging.select_channels`), 8-bit unless the card's normalisation takes the file's own
    precision (`InputSpec.native_pixels`; a whole 16-bit image would be scaled by its own maximum, which
    a window cannot know)."""
    from rasterio.windows import Window as GdalWindow

    (r0, r1), (c0, c1) = window.rows, window.cols
    bands = src.read(window=GdalWindow(c0, r0, c1 - c0, r1 - r0))
    channels = imaging.Channels.of(card.input.bands, card.input.channels)
    # No-data pixels as the whole-image decoder reads them (`tiff.mark_nodata`: NaN, then 0 after normalisation).
    pixels = tiff.mark_nodata(np.moveaxis(bands, 0, -1), src.nodata)
    pixels = imaging.select_channels(pixels, _alpha_bands(src), channels)
    if pixels.dtype != np.uint8 and not card.input.native_pixels:
        raise imaging.ImageDecodeError(f"{pixels.dtype} pixels, but the model was trained on 8-bit images")
    return np.ascontiguousarray(pixels)


# -- predicting a raster --------------------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    """Per-class pixel counts and the summed confidence of the windows so far."""

    counts: np.ndarray
    confidence: float = 0.0

    def add(self, classes: np.ndarray, mean_confidence: float) -> None:
        k = len(self.counts)
        if k <= 32:  # a byte compare per class beats bincount's cast of every pixel to int64 (20x at k=2)
            self.counts += [np.count_nonzero(classes == c) for c in range(k)]
        else:
            self.counts += np.bincount(classes.ravel(), minlength=k)[:k]
        self.confidence += mean_confidence * classes.size


@dataclasses.dataclass(frozen=True)
class RasterResult:
    """A predicted raster: its size, class fractions and mean confidence (the mask is at the path given)."""

    height: int
    width: int
    class_fractions: list[float]
    mean_confidence: float
    windows: int


def _georeferencing(src: Any) -> dict[str, Any]:
    """The source's CRS and transform, where it has them (a raster placed by GCPs gets those after opening)."""
    geo: dict[str, Any] = {}
    if src.crs is not None:
        geo["crs"] = src.crs
    if not src.transform.is_identity:
        geo["transform"] = src.transform
    return geo


def _mask_profile(src: Any) -> dict[str, Any]:
    """A tiled uint8 GeoTIFF of the source's size and georeferencing: the intermediate the COG is copied from."""
    return {
        "driver": "GTiff",
        "height": src.height,
        "width": src.width,
        "count": 1,
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "deflate",
        "zlevel": 1,  # an intermediate: the COG copy compresses again
        "bigtiff": "IF_SAFER",
        **_georeferencing(src),
    }


def predict_file(predictor: Predictor, source: str, mask_path: str, max_pixels: int, threads: int = 1) -> RasterResult:
    """Predict the local raster `source` window by window into a COG at `mask_path` (local)."""
    import rasterio
    import rasterio.shutil
    from rasterio.errors import RasterioError

    card = predictor.card
    with gdal_env(threads), tempfile.TemporaryDirectory(prefix="raysegment-raster-") as scratch:
        plain = os.path.join(scratch, "mask.tif")
        try:
            src = rasterio.open(source)
        except RasterioError as exc:
            raise imaging.ImageDecodeError(f"cannot read raster: {exc}") from exc
        with src, rasterio.open(plain, "w", **_mask_profile(src)) as dst:
            gcps, gcp_crs = src.gcps
            if gcps and src.transform.is_identity:
                dst.gcps = (gcps, gcp_crs)
            if card.palette:  # before the first block: the colour table makes the TIFF a palette image
                dst.write_colormap(1, {i: (*map(int, rgb), 255) for i, rgb in enumerate(card.palette)})
            plan = windows(src.height, src.width, max_pixels, predictor.tile, predictor.overlap, predictor.multiple)
            tally = Tally(np.zeros(card.num_classes, np.int64))
            for window in plan:
                _predict_window(predictor, src, dst, window, tally)
            dst.update_tags(
                raysegment_model_sha256=card.model_sha256, raysegment_class_names=json.dumps(card.class_names)
            )
            height, width = src.height, src.width
        rasterio.shutil.copy(
            plain,
            mask_path,
            driver="COG",
            compress="DEFLATE",
            blocksize=BLOCK,
            overview_resampling="NEAREST",
            num_threads=str(max(1, threads)),
            bigtiff="IF_SAFER",
        )
    pixels = max(height * width, 1)
    return RasterResult(
        height,
        width,
        (tally.counts / pixels).tolist(),
        tally.confidence / pixels,
        len(plan),
    )


def _predict_window(predictor: Predictor, src: Any, dst: Any, window: Window, tally: Tally) -> None:
    from rasterio.errors import RasterioError
    from rasterio.windows import Window as GdalWindow

    (r0, _), (c0, _) = window.rows, window.cols
    (kr0, kr1), (kc0, kc1) = window.keep_rows, window.keep_cols
    try:
        pixels = model_pixels(src, window, predictor.card)
    except RasterioError as exc:
        raise imaging.ImageDecodeError(f"cannot read raster window at row {r0}, column {c0}: {exc}") from exc
    keep = (kr0 - r0, kr1 - r0, kc0 - c0, kc1 - c0)
    classes, confidence = predictor._predict_tiled(pixels, keep)
    kept = classes[keep[0] : keep[1], keep[2] : keep[3]]
    tally.add(kept, confidence)
    dst.write(kept[None], window=GdalWindow(kc0, kr0, kc1 - kc0, kr1 - kr0))


@contextlib.contextmanager
def local_source(uri: str, endpoint_url: str | None, retry_s: float | None) -> Iterator[str]:
    """A local path for a source: itself, or (S3) a temporary copy, streamed under the storage deadline."""
    loc = storage.resolve(uri, endpoint_url, retry_s)
    if not loc.remote:
        yield loc.path
        return
    with tempfile.TemporaryDirectory(prefix="raysegment-source-") as d:
        path = os.path.join(d, "source" + os.path.splitext(loc.path)[1])
        try:
            storage.download_file(loc, path)
        except StorageError as exc:
            if exc.transient:
                raise  # the store is down, not the input bad: fail the job, keep the key undone
            raise imaging.ImageDecodeError(f"cannot read: {exc}") from exc
        yield path


def predict_to_output(
    predictor: Predictor, key: str, source_uri: str, output: storage.Location, max_pixels: int
) -> tuple[layout.WrittenMask, RasterResult]:
    """Predict one big raster and stage its COG under OUTPUT/masks/{key}.tif (a rename, or one upload)."""
    target = output.child(layout.MASKS, layout.mask_name(key, MASK_EXT))
    with local_source(source_uri, predictor.endpoint_url, predictor.retry_s) as source:
        with storage.staged_file(target) as staged:
            result = predict_file(predictor, source, staged, max_pixels, predictor.threads)
    return layout.WrittenMask(uri=target.uri, class_fractions=result.class_fractions), result


def predict_rows(predictor: Predictor, batch: dict[str, np.ndarray], rows: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Predict the batch's big-raster rows (`rows`): their masks are written here, and the column
    returned (`written`: a `WrittenMask` as JSON, '' for other rows) tells the write task so. A file that
    cannot be read or has unusable pixels is an error row; a store that stays down fails the job."""
    n = len(batch["key"])
    written = np.full(n, "", dtype=object)
    errors = np.array(batch["error"], dtype=object)
    heights, widths = np.array(batch["height"], np.int32), np.array(batch["width"], np.int32)
    for i in np.flatnonzero(rows):
        if errors[i]:
            continue
        if predictor.output is None or predictor.window_pixels is None:
            errors[i] = "big raster: only `raysegment infer` predicts rasters over --max-pixels"
            continue
        if not predictor.card.native_scale:
            errors[i] = (
                "a big raster (a tiled or striped TIFF over --max-pixels): only native-scale models "
                "(input.resize none) predict one window by window; raise --max-pixels to decode it whole"
            )
            continue
        try:
            mask, result = predict_to_output(
                predictor, str(batch["key"][i]), str(batch["source_uri"][i]), predictor.output, predictor.window_pixels
            )
        except (imaging.ImageDecodeError, DataError) as exc:
            errors[i] = str(exc)
            continue
        written[i] = mask.model_dump_json()
        heights[i], widths[i], conf[i] = result.height, result.width, result.mean_confidence
    batch.update(error=errors, height=heights, width=widths)
    return written


# -- views for people (report, show) --------------------------------------------------------------------


def _open(loc: storage.Location) -> Any:
    import rasterio

    if loc.remote:  # GDAL reads through the storage layer's file objects, in blocks of VIEW_BLOCK
        return rasterio.open(loc.path, opener=functools.partial(loc.fs.open, block_size=VIEW_BLOCK))
    return rasterio.open(loc.path)


def _scaled(src: Any, max_side: int, nearest: bool) -> np.ndarray:
    """The whole raster at most `max_side` per side (height x width x bands): GDAL reads the overview that
    fits where the file has them. `nearest` for class ids, else averaged pixels."""
    from rasterio.enums import Resampling

    scale = min(1.0, max_side / max(src.height, src.width))
    shape = (src.count, max(1, round(src.height * scale)), max(1, round(src.width * scale)))
    return np.moveaxis(
        src.read(out_shape=shape, resampling=Resampling.nearest if nearest else Resampling.average), 0, -1
    )


def _viewed(loc: storage.Location, read: Callable[[], T]) -> T:
    """`read()` under the storage deadline; what GDAL cannot read is an ImageDecodeError."""
    from rasterio.errors import RasterioError

    try:
        return loc.call(read)
    except RasterioError as exc:
        raise imaging.ImageDecodeError(f"cannot read raster: {exc}") from exc


def read_view(loc: storage.Location, max_side: int, nearest: bool = False) -> np.ndarray:
    """A raster read whole at most `max_side` pixels per side (see `_scaled`)."""
    require_rasterio()

    def read() -> np.ndarray:
        with gdal_env(), _open(loc) as src:
            return _scaled(src, max_side, nearest)

    return _viewed(loc, read)


def read_mask_view(loc: storage.Location, max_side: int = VIEW_SIDE) -> tuple[np.ndarray, layout.Palette]:
    """(class ids at most `max_side` per side, the colour table as a palette or None) of a raster mask."""
    require_rasterio()

    def read() -> tuple[np.ndarray, layout.Palette]:
        with gdal_env(), _open(loc) as src:
            try:
                table = src.colormap(1)
            except ValueError:  # no colour table
                table = None
            ids = _scaled(src, max_side, nearest=True)[..., 0]
        palette = [list(table[i][:3]) for i in range(len(table))] if table else None
        return np.ascontiguousarray(ids, np.uint8), palette

    return _viewed(loc, read)


def big_raster(loc: storage.Location, max_pixels: int) -> RasterInfo | None:
    """The header facts of a big raster (`RasterInfo.windowed`), or None for any other file (headers only)."""
    if not tiff.is_tiff_name(loc.path):
        return None

    def facts() -> RasterInfo | None:
        with loc.fs.open(loc.path, "rb", block_size=HEADER_BLOCK) as f:
            return probe(f)

    info = loc.call(facts)
    return info if info is not None and info.windowed(max_pixels) else None


def image_view(loc: storage.Location, max_side: int, channels: imaging.Channels = imaging.OWN) -> np.ndarray:
    """A viewable RGB view of a raster at most `max_side` per side: `channels`' bands (else its own first
    three), 16-bit and float contrast-stretched, as `imaging.display_rgb` shows any image."""
    pixels = read_view(loc, max_side)
    if channels.bands:
        pixels = pixels[..., [b - 1 for b in channels.bands if b <= pixels.shape[-1]]]
    return imaging.display_rgb(pixels)


def show_views(
    predictor: Predictor, uri: str, max_pixels: int, max_side: int = SHOW_SIDE
) -> tuple[np.ndarray, np.ndarray, RasterResult]:
    """(image view, class-id view, result) for `raysegment show` on a big raster: predicted window by window
    into a temporary COG as `infer` predicts it, both read back at most `max_side` pixels per side."""
    card = predictor.card
    with local_source(uri, predictor.endpoint_url, predictor.retry_s) as source:
        with tempfile.TemporaryDirectory(prefix="raysegment-show-") as scratch:
            mask = os.path.join(scratch, "mask.tif")
            result = predict_file(predictor, source, mask, max_pixels, predictor.threads)
            ids, _ = read_mask_view(storage.resolve(mask), max_side)
        channels = imaging.Channels(tuple(card.input.bands) if card.input.bands else None, None)
        image = image_view(storage.resolve(source), max_side, channels)
    return image, ids, result
