"""Decoding, resizing and encoding: bad input is a clear ImageDecodeError, labels never interpolated."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from raysegment.data import imaging
from raysegment.data.synthetic import png_bytes


def test_decode_converts_modes():
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    for mode in ("L", "LA", "RGBA", "P", "RGB"):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, format="PNG")
        out = imaging.decode_image(buf.getvalue())
        assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 5), 4000, np.uint16)).save(buf, format="PNG")
    assert imaging.decode_image(buf.getvalue()).shape == (4, 5, 3)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not an image", "cannot decode"),
        (png_bytes(np.zeros((32, 32, 3), np.uint8))[:60], "cannot decode"),
        (b"this is not an image", "not a PNG, JPEG, TIFF, BMP, WebP or GIF file"),
        # A 0x0 PNG, or a header Pillow cannot read, is named as what it is, not "not a PNG".
        (_png_header(0, 0), "the PNG header gives a size of 0 pixels"),
        (_png_header(0, 7), "the PNG header gives a size of 0 pixels"),
        (b"GIF89a\x00", "a GIF file whose header is damaged or unsupported"),
    ],
)
def test_bad_images_raise_clear_error(data, reason):
    with pytest.raises(imaging.ImageDecodeError, match=reason):
        imaging.decode_image(data)
    if reason != "cannot decode" and data:  # a header that cannot be read fails the size check too
        with pytest.raises(imaging.ImageDecodeError, match=reason):
            imaging.image_size(data)


def test_pixel_limit():
    data = png_bytes(np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(imaging.ImageDecodeError, match="over the limit"):
        imaging.decode_image(data, max_pixels=5000)


def test_mask_resize_is_nearest_and_palette_roundtrip():
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 1
    mask[4:, 4:] = 2
    big = imaging.resize_mask(mask, (31, 17))
    assert set(np.unique(big)) == {0, 1, 2}
    palette = imaging.default_palette(3)
    data = imaging.encode_mask(big, palette)
    img = Image.open(io.BytesIO(data))
    assert img.mode == "P" and img.size == (17, 31)
    assert img.getpalette()[:9] == [c for rgb in palette for c in rgb]
    np.testing.assert_array_equal(imaging.decode_mask(data), big)


def test_rgb_mask_rejected():
    with pytest.raises(imaging.ImageDecodeError, match="single-channel"):
        imaging.decode_mask(png_bytes(np.zeros((4, 4, 3), np.uint8)))


def test_voc_palette_prefix():
    assert imaging.default_palette(4) == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]


def png_header(width: int, height: int) -> bytes:
    """A PNG of that size with no pixel data: enough for a header read."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


def test_the_pixel_limit_is_max_pixels_not_pillows():
    # Pillow warns from 89.5M pixels and refuses from 179M whatever the limit asked for.
    assert imaging.image_size(png_header(9600, 9600)) == (9600, 9600)  # 92M: under the default 100M
    with pytest.raises(imaging.ImageDecodeError) as no_pixels:
        imaging.decode_image(png_header(9600, 9600))
    assert "limit" not in str(no_pixels.value)  # refused for its missing pixel data, not its size
    with pytest.raises(imaging.ImageDecodeError, match="over the limit of 100000000 pixels"):
        imaging.image_size(png_header(15_000, 15_000))
    assert imaging.image_size(png_header(15_000, 15_000), max_pixels=300_000_000) == (15_000, 15_000)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own limit is back as it was


def test_header_over_pillows_own_limit_is_refused_in_our_terms():
    # 100000 x 100000: Pillow refuses it before we read the size; the message still names --max-pixels.
    data = png_header(100_000, 100_000)
    with pytest.raises(
        imaging.ImageDecodeError,
        match=r"10000000000 pixels, over the limit of 1000 pixels \(infer and serve: raise --max-pixels",
    ):
        imaging.decode_image(data, max_pixels=1000)


def test_a_float_image_for_an_8_bit_model_is_scaled_not_clamped():
    """Pillow converts a float TIFF to RGB by clamping: an image in 0..1 reached an 8-bit model all black,
    and its mask was marked ok. It is brought to 8 bits by its own maximum, as 16-bit images are."""
    values = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(values, mode="F").save(buf, format="TIFF")
    rgb = imaging.decode_image(buf.getvalue())
    assert rgb.shape == (16, 16, 3) and rgb.max() == 255 and len(np.unique(rgb)) > 200


def test_eight_bit_gives_a_float64_products_numbers_and_no_data_0():
    """`_eight_bit` (decode_image of 16-bit and float images) took a 2048^2 uint16 from 119 to 444 ms with
    NaN handling and clipping copies it needs only for floats and signed integers. Its numbers are the float64
    product truncated, as `export.decode_as_infer`'s (float32 differs for maxima 7, 14, 25...); NaN, +-inf and
    negatives are 0, so an image with no finite pixel is all 0 (what predictor.unusable_pixels relies on)."""
    for top in (7, 14, 25, 4095, 65535):
        x = np.arange(top + 1, dtype=np.uint16)
        assert (imaging._eight_bit(x) == (x.astype(np.float64) * (255.0 / top)).astype(np.uint8)).all(), top
    big_endian = np.array([[0, 300, 600]], ">u2")
    assert imaging._eight_bit(big_endian).tolist() == [[0, 127, 255]]
    assert imaging._eight_bit(np.array([[-5, 0, 10, 20]], np.int32)).tolist() == [[0, 0, 127, 255]]
    floats = np.array([[np.inf, 0.5, np.nan, -np.inf, -2.0, 1.0]], np.float32)
    assert imaging._eight_bit(floats).tolist() == [[0, 127, 0, 0, 0, 255]]
    assert not imaging._eight_bit(np.array([[np.nan, np.inf], [-np.inf, np.nan]])).any()
    grey = np.full((3, 3), 7, np.uint8)
    assert imaging._eight_bit(grey) is grey
