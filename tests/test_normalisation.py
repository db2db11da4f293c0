"""Normalisation from the fingerprint (#15): one implementation, applied alike by training, inference and exports.

`card.normalize` (infer, evaluate, show, serve; training through `data.examples`) and the export graph
(`export.segment_fn`) must give the same float32 numbers for the same pixels, 8-bit or 16-bit, for every
kind of normalisation a card can name; older cards keep their meaning.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import tifffile
from helpers import manifest
from PIL import Image

from raysegment.config import TrainSpec
from raysegment.data import imaging
from raysegment.data.examples import decode_for_training
from raysegment.data.fingerprint import ShardFingerprint, merge
from raysegment.errors import DataError
from raysegment.inference.predictor import normalize
from raysegment.models.card import InputSpec, ModelCard
from raysegment.train.config import model_input

STATS = {"mean": [30000.0, 120.0, 0.5], "std": [5000.0, 40.0, 0.25], "low": [1000.0, 3.0, 0.0]}
STATS["high"] = [60000.0, 250.0, 1.0]


def card_for(normalization: str, stats=STATS, size=(8, 8), resize="none") -> ModelCard:
    """An identity 'model' card: 3 'classes' that are the normalised channels themselves (output probabilities)."""
    return ModelCard.create(
        "0" * 64,
        {"name": "identity", "depth": 0},
        num_classes=3,
        class_names=["r", "g", "b"],
        palette=[[0, 0, 0]] * 3,
        input={
            "size": size,
            "normalization": normalization,
            "stats": stats,
            "resize": resize,
            "pixel_type": "float32" if stats else "uint8",
        },
        output="probabilities",
    )


@pytest.fixture(scope="module")
def identity():
    import keras

    inp = keras.Input((None, None, 3))
    return keras.Model(inp, keras.layers.Identity()(inp))


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [
        ("zscore_clipped", np.uint16),
        ("zscore_clipped", np.uint8),
        ("zscore_clipped", np.float32),
        ("zscore", np.uint16),
        ("scale_0_1", np.uint8),
        ("imagenet", np.uint8),
    ],
)
def test_normalize_equals_the_export_graph(identity, kind, dtype):
    import tensorflow as tf

    from raysegment.export import segment_fn

    card = card_for(kind, STATS if kind.startswith("zscore") else None)
    rng = np.random.default_rng(3)
    top = {np.uint8: 255, np.uint16: 65535, np.float32: 1.5}[dtype]
    image = (rng.random((13, 17, 3)) * top).astype(dtype)  # beyond both clip bounds in some pixels
    if dtype == np.float32:
        image[0, 0], image[1, :2], image[2, 0] = np.nan, np.inf, -np.inf  # no data: 0, the mean, in both
    graph = tf.function(
        segment_fn(identity, card, probabilities=True), input_signature=[tf.TensorSpec([None, None, 3], dtype)]
    )
    exported = graph(tf.constant(image))["probabilities"].numpy()
    expected = normalize(image, card)
    assert exported.dtype == expected.dtype == np.float32
    assert np.array_equal(exported, expected)  # bit for bit: the same clip and affine in float32
    if dtype == np.float32:
        assert (expected[:3, 0] == 0).all() and (expected[1, 1] == 0).all() and np.isfinite(expected).all()
    if kind == "zscore_clipped":
        z_high = (np.float32(STATS["high"][0]) - np.float32(STATS["mean"][0])) * np.float32(1 / STATS["std"][0])
        assert expected[..., 0].max() <= z_high + 1e-6  # clipped before the affine


def test_old_cards_keep_scale_0_1_and_zscore_needs_its_statistics():
    old = ModelCard.parse(
        {
            "model_id": "unet-0",
            "model_sha256": "0" * 64,
            "num_classes": 2,
            "class_names": ["a", "b"],
            "palette": [[0, 0, 0], [1, 1, 1]],
            "input": {"size": [32, 32], "channels": 3, "normalization": "scale_0_1", "resize": "bilinear"},
        },
        "model.json",
    )
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    assert old.pixel_clip is None
    assert np.array_equal(normalize(image, old), image.astype(np.float32) * np.float32(1 / 255))
    with pytest.raises(DataError, match="needs stats"):
        ModelCard.parse({**old.as_dict(), "input": {"size": [32, 32], "normalization": "zscore"}}, "model.json")


def _png16(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_sixteen_bit_data_gets_z_scores_from_its_fingerprint_in_training_and_inference():
    """16-bit grey images with hot pixels: the fingerprint's statistics (native units) give the card's
    zscore_clipped; training's pipeline and inference's normalize then give the same z-scores, ~N(0, 1)."""
    rng = np.random.default_rng(0)
    part, files = ShardFingerprint(), []
    for i in range(6):
        values = rng.normal(20000, 3000, (48, 48)).clip(0, 65535)
        values[rng.integers(0, 48, 5), rng.integers(0, 48, 5)] = 65535  # hot pixels (0.2%)
        files.append(_png16(values))
        part.add(f"k{i}", imaging.decode_pixels(files[-1]), np.zeros((48, 48), np.uint8))
    fp = merge([part], 1, [1.0])
    assert fp.high_depth and fp.intensity["p99.5"][0] < 65535  # the hot pixels lie above the clip bound
    spec = TrainSpec(data="d", out="o", image_size=48, normalization="zscore_clipped", crop="native")
    # One class in the fingerprint: set on a crafted two-class manifest (only its fingerprint is read here).
    norm = model_input(spec, dataclasses.replace(manifest(), fingerprint=fp.to_json()), fp)
    assert norm.native_pixels  # 16-bit values reach the z-score as they are, not scaled to 8 bits
    assert norm.stats.mean == tuple(fp.intensity["mean"]) and norm.stats.high == tuple(fp.intensity["p99.5"])

    trained = decode_for_training(
        {"image": np.array(files, dtype=object), "mask": np.array([imaging.encode_mask(np.zeros((48, 48)))] * 6)},
        48,
        None,
        norm,
    )["image"]
    inferred = normalize(np.stack([imaging.decode_pixels(f).pixels for f in files]), norm)
    assert np.array_equal(trained, inferred)
    assert abs(float(trained.mean())) < 0.1 and 0.8 < float(trained.std()) < 1.1
    z_high = (fp.intensity["p99.5"][0] - fp.intensity["mean"][0]) / fp.intensity["std"][0]
    assert float(trained.max()) == pytest.approx(z_high, rel=1e-4)  # hot pixels clipped, not 15 sigma
    with pytest.raises(DataError, match="sampled intensities"):
        model_input(spec, manifest(), None)

    # An 8-bit image given to this model is an error row: its 0..255 clipped to the 16-bit low bound
    # was one constant input, and every such image got the same mask, marked ok.
    from raysegment.inference.predictor import preprocess

    card = ModelCard.create(
        "0" * 64,
        architecture={"name": "unet"},
        num_classes=2,
        class_names=["background", "cell"],
        palette=imaging.default_palette(2),
        ignore_index=imaging.IGNORE_INDEX,
        input=norm.model_dump(mode="json"),
    )
    eight = imaging.encode_mask(np.full((48, 48), 90, np.uint8))
    batch = {"key": np.array(["deep", "eight"], object), "bytes": np.array([files[0], eight], object)}
    errors = preprocess(batch, card, imaging.MAX_PIXELS)["error"].tolist()
    assert errors == ["", imaging.EIGHT_BIT_FOR_DEEP_MODEL]
    # A model trained on a data set that mixed 8-bit images in knows them: they are taken.
    mixed = card.model_copy(update={"input": norm.model_copy(update={"eight_bit_seen": True})})
    batch = {"key": np.array(["deep", "eight"], object), "bytes": np.array([files[0], eight], object)}
    assert preprocess(batch, mixed, imaging.MAX_PIXELS)["error"].tolist() == ["", ""]


def _tif(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, values)
    return buf.getvalue()


def _errors(card: ModelCard, **images: bytes) -> dict[str, str]:
    """infer's, evaluate's, show's and serve's decoding (`preprocess`) of each image: its error, "" when taken."""
    from raysegment.inference.predictor import preprocess

    batch = {"key": np.array(list(images), object), "bytes": np.array(list(images.values()), object)}
    return dict(zip(images, preprocess(batch, card, imaging.MAX_PIXELS)["error"].tolist()))


def test_images_outside_a_deep_models_range_are_error_rows():
    """A float image scaled to 0..1, or 12-bit counts, given to a model of 16-bit values: every value under
    the low clip bound was one constant input and a mask marked ok; an error row names both ranges now."""
    stats = {"mean": [30000.0] * 3, "std": [600.0] * 3, "low": [29500.0] * 3, "high": [31900.0] * 3}
    deep, eight_bit = card_for("zscore_clipped", stats=stats), card_for("scale_0_1", stats=None)
    rng = np.random.default_rng(0)
    sixteen = rng.normal(30000, 600, (32, 32))
    dark = np.full((32, 32), 28000.0)  # below every training pixel, yet in the range's neighbourhood: taken
    dark[:3, :3] = 31000
    images = {
        "sixteen": _png16(sixteen),
        "dark": _png16(dark),
        "twelve": _png16(np.linspace(1000, 3000, 32 * 32).reshape(32, 32)),
        "unit": _tif(rng.random((32, 32)).astype(np.float32)),
    }
    errors = _errors(deep, **images)
    assert errors["sixteen"] == errors["dark"] == ""
    assert errors["twelve"].startswith("pixel values 1000..3000, outside the range of the model's training pixels ")
    assert "(29500..31900)" in errors["twelve"] and "12-bit counts" in errors["twelve"]
    assert errors["unit"].startswith("pixel values 0.0") and "rescaled to 0..1" in errors["unit"]
    # A few values in range are not enough (under 1%); an 8-bit model scales each image by its maximum: no range.
    few = np.full((32, 32), 2000.0)
    few[0, :5] = 30000
    assert _errors(deep, few=_png16(few))["few"].startswith("pixel values 2000..30000")
    assert set(_errors(eight_bit, **images).values()) == {""}


def test_a_rescaled_float_image_is_refused_where_training_pixels_reach_down_to_0():
    """Microscopy's dark background puts the low bound near 0, where widening it by the range's width took any
    value >= 0: a float image scaled to 0..1 gave a 16-bit model's 99.9% foreground mask, marked ok."""
    rescaled = "rescaled to 0..1"
    for low in (257.0, 0.0):
        stats = {"mean": [900.0] * 3, "std": [400.0] * 3, "low": [low] * 3, "high": [2622.0] * 3}
        deep = card_for("zscore_clipped", stats=stats)
        rng = np.random.default_rng(1)
        slice16 = rng.normal(900, 400, (32, 32)).clip(0, 65535)
        dim = np.full((32, 32), 40.0)  # a dark field in the training units: taken
        dim[::4] = 90
        images = {
            "slice": _png16(slice16),
            "dim": _png16(dim),
            "unit": _tif((slice16 / 65535).astype(np.float32)),
            "unit_full": _tif(rng.random((32, 32)).astype(np.float32)),
            "counts_as_float": _tif(slice16.astype(np.float32)),
        }
        errors = _errors(deep, **images)
        assert errors["slice"] == errors["counts_as_float"] == errors["dim"] == "", low
        assert rescaled in errors["unit"] and rescaled in errors["unit_full"], low
    # A model of float data in its own 0..1 units takes 0..1 images, and a dark scene (water, shadow) below its
    # low bound; a model of counts whose darkest pixels are near 0 takes an all-0 frame.
    unit = card_for("zscore_clipped", stats={"mean": [0.4] * 3, "std": [0.2] * 3, "low": [0.02] * 3, "high": [0.6] * 3})
    rng = np.random.default_rng(2)
    images = {"unit": _tif(rng.random((32, 32)).astype(np.float32))}
    images["dark"] = _tif((rng.random((32, 32)) * 0.0018).astype(np.float32))
    assert _errors(unit, **images) == {"unit": "", "dark": ""}
    near0 = {"mean": [300.0] * 3, "std": [200.0] * 3, "low": [1.0] * 3, "high": [900.0] * 3}
    assert _errors(card_for("zscore_clipped", stats=near0), black=_png16(np.zeros((32, 32)))) == {"black": ""}


def test_an_image_with_no_finite_pixel_is_an_error_row(monkeypatch):
    """An all-no-data tile (NaN, infinities) came out as a confident one-class mask, marked ok."""
    none = "no valid pixel: every value is NaN or infinite (no data)"
    stats = {"mean": [0.3] * 3, "std": [0.2] * 3, "low": [-0.1] * 3, "high": [0.6] * 3}
    nan = np.full((16, 16), np.nan, np.float32)
    nan[:4] = np.inf
    nan[4:8] = -np.inf
    one = nan.copy()
    one[9, 9] = 0.2  # one valid pixel: the rest is no data, as in any scene's border
    images = {"nan": _tif(nan), "one": _tif(one), "zeros": _tif(np.zeros((16, 16), np.float32))}
    for card in (card_for("zscore_clipped", stats=stats), card_for("scale_0_1", stats=None)):
        assert _errors(card, **images) == {"nan": none, "one": "", "zeros": ""}
    # An 8-bit model sees no data as 0 (never 255): an image with a pixel above 0 is taken unread again; an
    # all-0 one is decoded again at its own precision only when it is a TIFF (PNG, JPEG... hold no floats).
    decoded, decode = [], imaging.decode_pixels
    monkeypatch.setattr(imaging, "decode_pixels", lambda data, *args: decoded.append(data[:2]) or decode(data, *args))
    bilevel, black = np.eye(16, dtype=np.uint8) * 255, np.zeros((16, 16), np.uint8)
    images = {"binary": imaging.encode_mask(bilevel), "binary_tif": _tif(bilevel)}
    images.update(black_png=imaging.encode_mask(black), black_tif=_tif(black))
    assert _errors(card_for("scale_0_1", stats=None), **images) == dict.fromkeys(images, "")
    assert decoded == [b"II"]  # the black TIFF alone


def test_a_card_round_trips_its_normalisation():
    card = card_for("zscore_clipped")
    again = ModelCard.parse(card.as_dict(), "model.json")
    assert again.pixel_affine == card.pixel_affine and again.pixel_clip == card.pixel_clip
    assert isinstance(again.input, InputSpec) and again.input.native_pixels
