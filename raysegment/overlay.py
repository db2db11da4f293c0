"""Masks drawn for people: palette colours, masks blended over images, captioned PNG grids."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from raysegment.data import imaging

TILE = 192  # px: the box one picture of a grid is fitted into
CAPTION = 16  # px: the caption strip under each picture
GAP = 4  # px between cells
ALPHA = 0.5  # share of the mask colour in a blend
BACKGROUND = (40, 40, 40)
IGNORE_COLOUR = (224, 224, 192)  # as in the mask PNGs' palette (imaging.encode_mask)


def lookup_table(palette: Sequence[Sequence[int]] | None) -> np.ndarray:
    """256x3 uint8 colours by class id: the palette, the VOC map past its end, 255 = ignore colour."""
    lut = np.asarray(imaging.default_palette(256), np.uint8)
    if palette:
        lut[: len(palette)] = np.asarray(palette, np.uint8)[:256]
    lut[imaging.IGNORE_INDEX] = IGNORE_COLOUR
    return lut


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]] | None) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 palette colours."""
    return lookup_table(palette)[np.asarray(mask, np.uint8)]


def as_rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3 (or HxW) uint8 or [0, 1] float image -> HxWx3 uint8."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 2 or arr.shape[-1] < 3:  # grey, or a model input of one or two bands: the first, as grey
        arr = np.repeat(arr[..., :1] if arr.ndim == 3 else arr[..., None], 3, axis=-1)
    return arr[..., :3]


def blend(
    image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]] | None, alpha: float = ALPHA
) -> np.ndarray:
    """The image with the mask's palette colours blended in, at the mask's size."""
    rgb = as_rgb(image)
    if rgb.shape[:2] != mask.shape[:2]:
        rgb = imaging.resize_image(np.ascontiguousarray(rgb), mask.shape[:2])
    lut = lookup_table(palette)
    colours = lut[np.asarray(mask, np.uint8)].astype(np.float32)
    # Black is the VOC background colour: tinting it would only darken the picture.
    tinted = lut.any(axis=1)[np.asarray(mask, np.uint8)][..., None]
    out = np.where(tinted, (1.0 - alpha) * rgb + alpha * colours, rgb)
    return out.astype(np.uint8)


def shrink(image: np.ndarray, box: int, nearest: bool = False) -> np.ndarray:
    """Scale down (never up) so the longer side is at most `box`; masks use nearest neighbour."""
    h, w = image.shape[:2]
    scale = box / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.NEAREST if nearest else Image.BILINEAR))


def thumbnail(
    image: np.ndarray | None, mask: np.ndarray, palette: Sequence[Sequence[int]] | None, box: int = TILE
) -> np.ndarray:
    """A blended overlay no larger than box x box; the coloured mask alone when there is no image."""
    # Shrink first: blending a 12-megapixel image only to throw most of it away is slow.
    small = shrink(np.ascontiguousarray(mask, np.uint8), box, nearest=True)
    if image is None:
        return colorize(small, palette)
    return blend(shrink(as_rgb(image), box), small, palette)


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    # Keep the end: keys differ in their last characters more often than in their first.
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


def sheet_size(count: int, columns: int, tile: int = TILE) -> tuple[int, int]:
    """(width, height) in pixels of a grid of `count` captioned cells."""
    cols = max(1, min(columns, count))
    rows = max(1, math.ceil(count / cols))
    return cols * (tile + GAP) + GAP, rows * (tile + CAPTION + GAP) + GAP


def sheet(cells: Sequence[tuple[np.ndarray, str]], columns: int = 4, tile: int = TILE) -> Image.Image:
    """Pictures (each fitted into tile x tile, centred) with a caption under each, row by row."""
    cols = max(1, min(columns, len(cells)))
    canvas = Image.new("RGB", sheet_size(len(cells), columns, tile), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for i, (picture, caption) in enumerate(cells):
        x = GAP + (i % cols) * (tile + GAP)
        y = GAP + (i // cols) * (tile + CAPTION + GAP)
        arr = as_rgb(picture)
        h, w = arr.shape[:2]
        scale = tile / max(h, w)
        # Small pictures (training crops) are enlarged with nearest neighbour so pixels stay visible.
        img = Image.fromarray(arr).resize(
            (max(1, round(w * scale)), max(1, round(h * scale))),
            Image.NEAREST if scale >= 1 else Image.BILINEAR,
        )
        canvas.paste(img, (x + (tile - img.width) // 2, y + (tile - img.height) // 2))
        draw.text((x + 2, y + tile + 2), _fit_text(draw, caption, tile - 4, font), fill=(230, 230, 230), font=font)
    return canvas


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or an RGB array."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(as_rgb(image))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an RGB array: photos inlined in HTML are ten times smaller than as PNG."""
    buf = io.BytesIO()
    Image.fromarray(as_rgb(image)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def overlay_png(
    image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]] | None, alpha: float = ALPHA
) -> bytes:
    """One blended overlay at the mask's (the original) size, as PNG bytes."""
    return png_bytes(blend(image, mask, palette, alpha))


def example_grid(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], palette: Sequence[Sequence[int]] | None
) -> bytes:
    """image | ground truth | prediction, one example per row, palette-coloured, as PNG bytes."""
    cells: list[tuple[np.ndarray, str]] = []
    for i, (image, truth, pred) in enumerate(rows):
        cells += [
            (as_rgb(image), f"#{i} image"),
            (colorize(truth, palette), f"#{i} ground truth"),
            (colorize(pred, palette), f"#{i} prediction"),
        ]
    if not cells:
        raise ValueError("example_grid needs at least one (image, truth, prediction) row")
    return png_bytes(sheet(cells, columns=3))
