"""Mutated image bytes through decode and mask encode: an error or an image, never a crash,
a hang (pytest-timeout) or an unbounded allocation."""

import io
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from raysegment.data import imaging


def encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    if fmt == "PNG16":  # 16-bit RGB, which imaging decodes past Pillow (Pillow would keep the high bytes)
        rows = (rng.random((48, 40, 3)) * 65535).astype(">u2").view(np.uint8).reshape(48, -1)
        raw = np.concatenate([np.zeros((48, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 a row
        return png_file(40, 48, zlib.compress(raw), depth=16)
    img = Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def mutations(data: bytes, count: int, seed: int):
    """Bit flips, byte runs overwritten, truncations and splices, reproducible by seed."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        b = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:
            for pos in rng.integers(0, len(b), size=rng.integers(1, 8)):
                b[pos] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            start = int(rng.integers(0, len(b)))
            b[start : start + int(rng.integers(1, 64))] = rng.integers(0, 256, size=64, dtype=np.uint8).tobytes()
        elif kind == 2:
            b = b[: int(rng.integers(0, len(b)))]
        else:
            at = int(rng.integers(0, len(b)))
            b = b[:at] + rng.integers(0, 256, size=int(rng.integers(1, 256)), dtype=np.uint8).tobytes() + b[at:]
        yield bytes(b)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "PNG16"])
def test_mutated_images_decode_or_fail_cleanly(fmt):
    decoded = failed = 0
    for i, data in enumerate(mutations(encoded(fmt), 300, seed={"PNG": 1, "JPEG": 2, "TIFF": 3, "PNG16": 4}[fmt])):
        try:
            img = imaging.decode_image(data, max_pixels=10_000_000)
        except imaging.ImageDecodeError as exc:
            assert str(exc), f"mutation {i}: empty error message"
            failed += 1
        else:
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, f"mutation {i}: {img.shape}"
            decoded += 1
    assert failed > 0  # the mutations really do break images


def png_file(width: int, height: int, idat: bytes, depth: int = 8) -> bytes:
    """A PNG (RGB, 8-bit unless `depth` says) with the given header size and compressed pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([depth, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(width: int, height: int, depth: int = 8) -> bytes:
    """A valid PNG of zeros: a few hundred KB that decode to width x height x 3 samples."""
    z = zlib.compressobj()
    row = bytes(1 + 3 * width * depth // 8)  # filter byte, then RGB
    return png_file(width, height, b"".join(z.compress(row) for _ in range(height)) + z.flush(), depth)


def pixel_buffers() -> int:
    """How many images Pillow's core has allocated in this process (each decode allocates one)."""
    return Image.core.get_stats()["new_count"]


@pytest.mark.parametrize(
    "width, height, max_pixels, bomb",
    [
        # Only the header claims 10^10 pixels: over Pillow's own limit, refused in our terms.
        pytest.param(100_000, 100_000, 100_000_000, False, id="header-claims-1e10"),
        # Real pixel data: 8000 x 8000 zeros (190 MB decoded), under Pillow's limit, over ours.
        pytest.param(8000, 8000, 1_000_000, True, id="zeros-over-max-pixels"),
        # The same at 16 bits (decoded past Pillow's 8-bit reading): the header is still checked first.
        pytest.param(8000, 8000, 1_000_000, 16, id="zeros16-over-max-pixels"),
    ],
)
def test_decompression_bomb_is_refused_before_decoding(width, height, max_pixels, bomb):
    depth = 16 if bomb == 16 else 8
    data = png_bomb(width, height, depth) if bomb else png_file(width, height, zlib.compress(b"\0" * 1024))
    before = pixel_buffers()
    tracemalloc.start()
    try:
        with pytest.raises(imaging.ImageDecodeError, match="over the limit"):
            imaging.decode_image(data, max_pixels=max_pixels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pixel_buffers() == before  # Pillow allocated no pixel buffer
    assert peak < width * height * 3 // 100  # and no array was allocated (numpy's are traced)
    imaging.decode_image(encoded("PNG"))
    assert pixel_buffers() > before  # the probe does see a decode


def test_mask_encode_round_trips_any_class_map():
    rng = np.random.default_rng(3)
    palette = imaging.default_palette(21)
    for shape in [(1, 1), (7, 300), (257, 3), (64, 64)]:
        mask = rng.integers(0, 21, size=shape, dtype=np.uint8)
        mask[0, 0] = imaging.IGNORE_INDEX
        back = np.asarray(Image.open(io.BytesIO(imaging.encode_mask(mask, palette))))
        np.testing.assert_array_equal(back, mask)
