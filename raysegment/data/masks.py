"""Mask encodings: the ways annotation tools and public data sets store labels, read as class ids.

A mask file may be single-channel (L, P, 16-bit I;16 with small ids, 1-bit), grey + alpha
(LA) or RGBA (the grey or colour channels carry the label, fully transparent pixels become
ignore 255), RGB colour-coded (`--mask-colors`: colour -> class id), or a soft binary mask
with anti-aliased edges (`--mask-threshold T`: value >= T -> 1, else 0). EXIF orientation
is applied to masks as to images, so a pair stays aligned.

`read_mask` turns one file into class ids: raw 8-bit values go through the layout's table
(`Listing.lut`, from --mask-values, --num-classes or --mask-zero ignore) unless a threshold or a colour table
gives the ids; transparent pixels become ignore whatever their value.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from raysegment import storage
from raysegment.data import imaging
from raysegment.data.classes import IGNORE_INDEX
from raysegment.errors import ConfigError

PAIR = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*$")
COLOR_EXAMPLE = "'0,0,0:0;128,0,0:1'"
# The share of pixels strictly between 0 and 255 under which a mask looks like a soft binary mask.
SOFT_EDGE_MIN = 64  # an in-between value from here up is an edge's, not a small class id
SOFT_EDGE_SHARE = 0.2
SOFT_HINT = "the values look like a binary mask with soft edges: try --mask-threshold 128 (values >= 128 -> 1, else 0)"


def is_color_file(value: str) -> bool:
    """--mask-colors names a CSV file (path or URI ending in .csv) rather than R,G,B:ID pairs."""
    return value.strip().lower().endswith(".csv")


def parse_color_pairs(value: str | list[str]) -> dict[tuple[int, int, int], int]:
    """'R,G,B:ID;R,G,B:ID' (or whitespace between pairs, or a list of pairs) -> {colour: id}."""
    items = value if isinstance(value, list) else re.split(r"[;\s]+", value)
    out: dict[tuple[int, int, int], int] = {}
    for item in filter(None, (str(i).strip() for i in items)):
        found = PAIR.match(item)
        if not found:
            raise ValueError(f"bad entry '{item}'; write R,G,B:ID pairs separated by ';', e.g. {COLOR_EXAMPLE}")
        *rgb, cid = (int(g) for g in found.groups())
        colour = (rgb[0], rgb[1], rgb[2])
        if max(colour) > 255 or cid > 255:
            raise ValueError(f"bad entry '{item}'; colour channels and ids are 0..255 (255 = ignore)")
        if colour in out:
            raise ValueError(f"colour {','.join(map(str, colour))} is listed twice")
        out[colour] = cid
    if not out:
        raise ValueError(f"no colours; write R,G,B:ID pairs separated by ';', e.g. {COLOR_EXAMPLE}")
    return out


@dataclass(frozen=True)
class ColorTable:
    """Colour -> class id, with the class names and palette when a CSV gave them."""

    colors: dict[tuple[int, int, int], int]
    names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return max((c for c in self.colors.values() if c != IGNORE_INDEX), default=-1) + 1

    def palette(self, num_classes: int = 0) -> list[list[int]]:
        """Each class's colour (the first listed for it); classes without one get the default colour."""
        palette = imaging.default_palette(max(num_classes, self.num_classes))
        seen: set[int] = set()
        for colour, cid in self.colors.items():
            if cid != IGNORE_INDEX and cid not in seen:
                palette[cid] = list(colour)
                seen.add(cid)
        return palette


# Rows of a class_dict.csv that name no class but unlabelled pixels (CamVid's `Void`): ignore (255), so
# they are neither trained nor scored, and the classes after them keep consecutive ids.
VOID_NAMES = frozenset({"void", "unlabeled", "unlabelled", "ignore"})


def parse_color_csv(text: str, uri: str) -> ColorTable:
    """A CamVid class_dict.csv: a header row `name,r,g,b`, then one class per row; row order = class id.
    A row named void (any case; or unlabeled, unlabelled, ignore) is ignore, not a class."""
    rows = list(csv.reader(io.StringIO(text)))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if header[:4] != ["name", "r", "g", "b"]:
        raise ConfigError(f"--mask-colors {uri}: the first row must be the header name,r,g,b (got {header[:4]})")
    colors: dict[tuple[int, int, int], int] = {}
    names: list[str] = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            r, g, b = (int(c) for c in row[1:4])
            if len(row) < 4 or not all(0 <= c <= 255 for c in (r, g, b)):
                raise ValueError
        except ValueError:
            raise ConfigError(f"--mask-colors {uri}: row {n} {row}: write name,r,g,b with r, g, b in 0..255") from None
        if (r, g, b) in colors:
            held = colors[(r, g, b)]
            was = "ignore (a void row)" if held == IGNORE_INDEX else f"class {held}"
            raise ConfigError(f"--mask-colors {uri}: row {n}: colour {r},{g},{b} is already {was}")
        if row[0].strip().lower() in VOID_NAMES:
            colors[(r, g, b)] = IGNORE_INDEX
            continue
        colors[(r, g, b)] = len(names)
        names.append(row[0].strip())
    if len(names) < 2:
        raise ConfigError(f"--mask-colors {uri}: {len(names)} classes; a segmentation needs at least 2")
    if len(names) > IGNORE_INDEX:
        raise ConfigError(f"--mask-colors {uri}: {len(names)} classes; at most {IGNORE_INDEX} (255 = ignore)")
    return ColorTable(colors, names)


def load_color_table(value: str | list[str], endpoint_url: str | None, retry_s: float | None) -> ColorTable:
    """--mask-colors: R,G,B:ID pairs, or a class_dict.csv (path or URI) giving names and palette too."""
    if isinstance(value, str) and is_color_file(value):
        loc = storage.resolve(value, endpoint_url, retry_s)
        if not storage.exists(loc):
            raise ConfigError(f"--mask-colors {value}: file not found; give a CSV of name,r,g,b or R,G,B:ID pairs")
        return parse_color_csv(storage.read_bytes(loc).decode("utf-8-sig", errors="replace"), value)
    try:
        return ColorTable(parse_color_pairs(value))
    except ValueError as exc:
        raise ConfigError(f"--mask-colors: {exc}") from None


@dataclass(frozen=True)
class MaskEncoding:
    """How the shard tasks turn mask files into class ids beyond the layout's value table."""

    threshold: int | None = None  # soft binary masks: value >= threshold -> 1, else 0
    colors: dict[tuple[int, int, int], int] | None = None  # RGB colour-coded masks
    unlisted: Literal["invalid", "ignore"] = "invalid"  # colours not in `colors`
    # Transparent pixels: unlabelled (sparse annotations), or read by their value like the rest (a label
    # layer saved over a transparent background, where transparent is the background class).
    alpha: Literal["ignore", "keep"] = "ignore"


PLAIN = MaskEncoding()  # values as the layout's table reads them


def _grey(rgb: np.ndarray) -> np.ndarray | None:
    """The one channel of an RGB array whose channels are equal everywhere, else None."""
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0]
    return None


def _colors_found(rgb: np.ndarray, limit: int = 8) -> list[str]:
    codes = np.unique(rgb.reshape(-1, 3).astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32))
    return [f"{c >> 16},{(c >> 8) & 255},{c & 255}" for c in codes[:limit].tolist()]


class MaskValueError(ValueError):
    """A decodable mask with values (or colours) that the mapping does not allow; the message says which.
    `deep`: the values over 255 of a 16-bit mask that it names (all of them unless `deep_cut`), from which
    prepare proposes one --mask-values over every mask."""

    def __init__(self, message: str, deep: tuple[int, ...] = (), deep_cut: bool = False):
        super().__init__(message)
        self.deep, self.deep_cut = deep, deep_cut


def _map_colors(rgb: np.ndarray, encoding: MaskEncoding, transparent: np.ndarray | None) -> np.ndarray:
    """HxWx3 colours -> uint8 class ids; unlisted colours are ignore (255) or a MaskValueError."""
    assert encoding.colors is not None
    codes = rgb.reshape(-1, 3).astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32)
    unique, inverse = np.unique(codes, return_inverse=True)
    table = {(r << 16) | (g << 8) | b: cid for (r, g, b), cid in encoding.colors.items()}
    ids = np.asarray([table.get(int(c), -1) for c in unique], np.int16)[inverse].reshape(rgb.shape[:2])
    unlisted = ids < 0
    if transparent is not None:
        unlisted &= ~transparent
    if unlisted.any() and encoding.unlisted == "invalid":
        found = _colors_found(rgb[unlisted])
        raise MaskValueError(
            f"colours not in --mask-colors: {found}{' ...' if len(found) == 8 else ''}; "
            "add them, or pass --unlisted-colors ignore"
        )
    ids[ids < 0] = IGNORE_INDEX
    return ids.astype(np.uint8)


def oriented(data: bytes) -> bool:
    """Whether a mask file carries an EXIF orientation that turns it (its header only)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.getexif().get(imaging.EXIF_ORIENTATION, 1) not in (1, None)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _upright(data: bytes, encoding: MaskEncoding, max_pixels: int) -> Image.Image:
    img = imaging.open_image(data, max_pixels)
    if img.getexif().get(imaging.EXIF_ORIENTATION, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
    if encoding.threshold is not None and img.mode == "1":
        img = img.convert("L")  # 0/255, thresholded like any grey mask
    return img


def _planar_hint(img: Image.Image) -> str:
    """A TIFF of 3 or 4 separate planes is what tifffile writes for a (3, H, W) or (4, H, W) array: often
    a short stack of slices, not a colour mask."""
    tags = getattr(img, "tag_v2", None)
    if img.format != "TIFF" or tags is None or tags.get(284) != 2:  # PlanarConfiguration: separate planes
        return ""
    return (
        "; or, if its planes are slices of a stack, save them as pages "
        "(tifffile.imwrite(path, stack, photometric='minisblack')): the images' too"
    )


def _transparent(img: Image.Image) -> np.ndarray | None:
    return np.asarray(img.getchannel("A")) == 0 if img.mode in ("LA", "RGBA", "PA") else None


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes of 16-bit (and 32-bit integer) masks
MAX_RAW = 65535  # the largest raw mask value --mask-values and --mask-threshold take (16-bit masks)


def own_palette(data: bytes, num_classes: int) -> list[list[int]] | None:
    """The colours a palette (P) mask file gives its first `num_classes` indices (its annotation tool's: `show`
    and `report` draw the classes in them), or None: not a palette mask, too few entries, or a grey ramp."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header and palette only, no pixel decoded
            palette = img.getpalette() if img.mode == "P" else None
    except Exception:
        return None
    if not palette or len(palette) < 3 * num_classes:
        return None
    colours = [palette[3 * i : 3 * i + 3] for i in range(num_classes)]
    return None if all(c == [i, i, i] for i, c in enumerate(colours)) else colours


DEEP_VALUES = "16-bit mask with values"
MAX_DEEP_SHOWN = 32  # a mask's values named in full up to this many (a proposal maps no more)


def _deep_values(found: np.ndarray, prefix: str = "") -> MaskValueError:
    """The error of a 16-bit mask's values over 255, naming them all: prepare proposes one --mask-values
    over every mask's values (from `deep`), where one proposal per mask gave each mask's own ids to the
    same raw values."""
    shown = tuple(found[:MAX_DEEP_SHOWN].tolist())
    cut = len(found) > MAX_DEEP_SHOWN
    text = f"{prefix}{DEEP_VALUES} {', '.join(map(str, shown))}{' ...' if cut else ''} (class ids are 0..254)"
    return MaskValueError(text, shown, cut)


def _raw_values(img: Image.Image) -> np.ndarray:
    """HxW raw values of a mask whose pixels carry them in one (or three equal) channels: uint8, or uint16
    for a 16-bit mask holding values over 255 (binary masks saved as 0/65535, for --mask-values or a
    --mask-threshold to map)."""
    mode = img.mode
    if mode in ("1", "L", "P"):
        return np.asarray(img, dtype=np.uint8)  # 1-bit: 0 and 1
    if mode in SIXTEEN_BIT:
        arr = np.asarray(img)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > MAX_RAW:
            raise imaging.ImageDecodeError(
                f"{mode} mask holds values from {int(arr.min())} to {int(arr.max())}; masks hold values 0..65535"
            )
        return arr.astype(np.uint8 if arr.max(initial=0) <= 255 else np.uint16)
    if mode in ("LA", "PA"):
        return np.asarray(img.getchannel(0), dtype=np.uint8)
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        grey = _grey(rgb)
        if grey is None:
            raise imaging.ImageDecodeError(
                f"{mode} mask with colours ({', '.join(_colors_found(rgb))}); map colours to class ids with "
                f"--mask-colors (R,G,B:ID pairs, e.g. {COLOR_EXAMPLE}, or a class_dict.csv of name,r,g,b)"
                f"{_planar_hint(img)}"
            )
        return grey
    raise imaging.ImageDecodeError(f"mask has mode {mode}; masks are L, P, LA, RGB, RGBA, I;16 or 1-bit")


def _mapped(values: np.ndarray, transparent: np.ndarray | None, lut: np.ndarray, unmapped: str) -> np.ndarray:
    """Raw values through the layout's table (-1 = not allowed: a MaskValueError naming them)."""
    if values.dtype == np.uint16 and int(values.max()) >= len(lut):  # a 16-bit mask; the table is of bytes
        raise _deep_values(np.unique(values), f"{unmapped}: ")
    ids = lut[values]
    bad = ids < 0
    if transparent is not None:
        bad &= ~transparent
    if bad.any():
        found = np.unique(values[bad]).tolist()
        seen = values if transparent is None else values[~transparent]
        soft = values.dtype == np.uint8 and looks_soft_binary(np.bincount(seen.ravel(), minlength=256))
        hint = f"; {SOFT_HINT}" if soft else ""
        raise MaskValueError(f"{unmapped}: {found[:10]}{' ...' if len(found) > 10 else ''}{hint}")
    return np.where(ids < 0, IGNORE_INDEX, ids).astype(np.uint8)


@dataclass(frozen=True)
class MaskRead:
    """A mask's class ids, and how many of its pixels are ignore because they were transparent (not
    because of their value): only those make --mask-alpha keep worth naming."""

    ids: np.ndarray
    transparent: int


def read_mask(
    data: bytes,
    encoding: MaskEncoding,
    lut: np.ndarray | None,
    unmapped: str,
    max_pixels: int = imaging.MAX_PIXELS,
) -> MaskRead:
    """Encoded mask -> HxW uint8 class ids (255 = ignore), EXIF orientation applied.

    `lut` (int16[256], -1 = not allowed) maps raw values; None keeps them as found. A threshold
    or a colour table gives ids directly. Transparent pixels become 255. Raises
    ImageDecodeError for files that are no usable mask, MaskValueError for values not allowed."""
    img = _upright(data, encoding, max_pixels)
    transparent = _transparent(img) if encoding.alpha == "ignore" else None
    if encoding.colors is not None:
        if img.mode not in ("RGB", "RGBA", "P", "PA", "L", "LA"):
            raise imaging.ImageDecodeError(f"mask has mode {img.mode}; colour-coded masks are RGB, RGBA or P")
        ids = _map_colors(np.asarray(img.convert("RGB")), encoding, transparent)
    elif encoding.threshold is not None:
        values = _raw_values(img)
        if encoding.threshold > 255 and img.mode not in SIXTEEN_BIT:  # every pixel would be background
            raise imaging.ImageDecodeError(
                f"--mask-threshold {encoding.threshold} is above every value of an 8-bit mask (0..255); "
                "thresholds over 255 are for 16-bit masks"
            )
        ids = (values >= encoding.threshold).astype(np.uint8)
    elif lut is not None:
        ids = _mapped(_raw_values(img), transparent, lut, unmapped)
    else:
        ids = _raw_values(img)
        if ids.dtype != np.uint8:  # decoded fine: its values are the problem, not the file
            raise _deep_values(np.unique(ids))
    if transparent is None:
        return MaskRead(ids, 0)
    return MaskRead(np.where(transparent, np.uint8(IGNORE_INDEX), ids), int(transparent.sum()))


def looks_soft_binary(hist: np.ndarray) -> bool:
    """Raw values mostly 0 and 255 with a minority in between: a binary mask with anti-aliased edges.

    An edge fades between the two, so it holds mid-range values; class ids with 255 as void (VOC:
    0..20 and 255, Cityscapes' ids up to 33) hold only small values in between, and thresholding them
    would merge every class into one. A fade takes several values: one value in between (0/128/255, a
    trimap or a boundary class) is a class of its own, and thresholding would merge it into another."""
    total = int(hist.sum())
    between = total - int(hist[0]) - int(hist[255])
    fading = int(np.count_nonzero(hist[SOFT_EDGE_MIN:255])) >= 2
    return bool(hist[0]) and bool(hist[255]) and fading and 0 < between <= SOFT_EDGE_SHARE * total
