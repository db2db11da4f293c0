"""Mutated image bytes through decode and mask encode: an error or an image, never a crash,
a hang or an unbounded allocation."""

import io
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from raysegment.data import imaging

DEADLINE_S = 2.0  # per image, far above the ~1 ms a 48x48 decode takes


def encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
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


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_mutated_images_decode_or_fail_cleanly(fmt):
    decoded = failed = 0
    for i, data in enumerate(mutations(encoded(fmt), 300, seed={"PNG": 1, "JPEG": 2, "TIFF": 3}[fmt])):
        t0 = time.perf_counter()
        try:
            img = imaging.decode_image(data, max_pixels=10_000_000)
        except imaging.ImageDecodeError as exc:
            assert str(exc), f"mutation {i}: empty error message"
            failed += 1
        else:
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, f"mutation {i}: {img.shape}"
            decoded += 1
        assert time.perf_counter() - t0 < DEADLINE_S, f"mutation {i} took too long"
    assert failed > 0  # the mutations really do break images


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    t0 = time.perf_counter()
    with pytest.raises(imaging.ImageDecodeError, match="pixels"):
        imaging.decode_image(png_claiming(100_000, 100_000), max_pixels=100_000_000)
    assert time.perf_counter() - t0 < DEADLINE_S


def test_mask_encode_round_trips_any_class_map():
    rng = np.random.default_rng(3)
    palette = imaging.default_palette(21)
    for shape in [(1, 1), (7, 300), (257, 3), (64, 64)]:
        mask = rng.integers(0, 21, size=shape, dtype=np.uint8)
        mask[0, 0] = imaging.IGNORE_INDEX
        back = np.asarray(Image.open(io.BytesIO(imaging.encode_mask(mask, palette))))
        np.testing.assert_array_equal(back, mask)
