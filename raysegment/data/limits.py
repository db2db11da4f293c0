"""The decompression-bomb guards every reader shares: how much an image may decode to, how large one input's
encoded bytes may be, and the refusals.

A header is checked before any pixel is decoded. The limit counts pixels of up to four bands (RGBA);
a pixel of more bands counts as bands/4 pixels, so a small file of a few pixels and thousands of bands
cannot decode to gigabytes either.
"""

from __future__ import annotations

MAX_PIXELS = 100_000_000
# One input's encoded bytes (infer's --max-input-mb): a 100-megapixel RGBA image stored raw is 400 MB. A tar
# member or a Parquet value is inflated by its container before any header can be read; this bounds that.
MAX_INPUT_MB = 512


def too_large(max_bytes: int, size: int | None = None) -> str:
    """The error text for an input over the limit of encoded bytes (a file, member or table value); `size`
    when known (a ranged read stops one byte past the limit)."""
    held = f"{size} bytes" if size is not None else "larger than that"
    return (
        f"input over --max-input-mb {max_bytes / (1 << 20):g} ({held}: one image's encoded bytes; raise the "
        "limit for larger images); not read"
    )


def refusal(size: str, max_pixels: int) -> str:
    """The error text for an image of `size` over the limit, with the fix each command has."""
    return (
        f"image is {size}, over the limit of {max_pixels} pixels (infer and serve: raise --max-pixels; "
        f"prepare takes up to {MAX_PIXELS}: cut larger images into tiles)"
    )


def over(width: int, height: int, max_pixels: int, bands: int = 1) -> str | None:
    """The refusal when a width x height image of `bands` bands is over the limit, else None."""
    if width * height * max(bands, 4) <= max_pixels * 4:
        return None
    size = f"{width}x{height} pixels" + (
        f" of {bands} bands (each counts as {bands / 4:g} pixels)" if bands > 4 else ""
    )
    return refusal(size, max_pixels)
