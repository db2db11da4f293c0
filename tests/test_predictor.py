"""The predictor on its own (no Ray): tiling and stitching, mixed precision."""

import json

import numpy as np
import pytest

from raysegment import storage
from raysegment.bench.infer import make_model_dir
from raysegment.errors import DataError
from raysegment.inference.predictor import Predictor
from raysegment.inference.stitch import tile_starts
from raysegment.models.card import ModelCard


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (64, 32, 0), (33, 32, 16), (20, 32, 8), (1000, 256, 64)])
def test_tiles_cover_the_length_with_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap


@pytest.fixture(scope="module")
def native_model(tmp_path_factory):
    """A randomly initialised depth-2 U-Net whose card says: predict at full resolution."""
    root = str(tmp_path_factory.mktemp("native"))
    model_dir = make_model_dir(root, image_size=32, depth=2, base_filters=4)
    card = ModelCard.read(model_dir)
    native = card.model_copy(update={"input": card.input.model_copy(update={"resize": "none"})})
    native.write(storage.resolve(model_dir))
    assert ModelCard.read(model_dir).native_scale
    return model_dir


def predict(predictor, img):
    """Predict `img` in a ragged batch beside a 5x7 image (smaller than the padding multiple)."""
    images = np.empty(2, dtype=object)
    images[:] = [img, img[:5, :7]]
    out = predictor({"image": images, "error": np.asarray(["", ""], object)})
    assert out["pred"][1].shape == (5, 7)
    return out["pred"][0], out["mean_confidence"][0]


def test_tiled_prediction_matches_whole_image(native_model):
    """Gaussian-blended windows agree with the whole-image prediction: a window's border pixels see
    less context, and their low weight keeps them from deciding (an untrained model's near-ties
    still flip a few pixels; tests/test_stitch.py checks the blending itself exactly)."""
    rng = np.random.default_rng(0)
    img = (rng.random((150, 203, 3)) * 255).astype(np.uint8)
    whole, whole_conf = predict(Predictor(native_model, tile_size=4096), img)
    tiled, tiled_conf = predict(Predictor(native_model, tile_size=64, tile_overlap=56, batch_size=4), img)
    assert whole.shape == tiled.shape == (150, 203)
    assert len(np.unique(whole)) > 1  # a model that paints one class would make this test vacuous
    assert (whole == tiled).mean() > 0.97
    assert abs(whole_conf - tiled_conf) < 1e-2


def test_bfloat16_predictor_agrees_with_float32(native_model):
    rng = np.random.default_rng(1)
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    full, _ = predict(Predictor(native_model), img)
    half, conf = predict(Predictor(native_model, precision="bfloat16"), img)
    assert half.shape == full.shape and 0.0 < conf <= 1.0
    assert len(np.unique(full)) > 1
    assert (half == full).mean() > 0.9


FIRST_RELEASE_CARD = {
    "model_id": "unet-0123456789ab",
    "model_sha256": "0123456789ab" + "0" * 52,
    "architecture": {"name": "unet", "depth": 2, "base_filters": 4},
    "num_classes": 2,
    "class_names": ["background", "object"],
    "palette": [[0, 0, 0], [128, 0, 0]],
    "ignore_index": 255,
    "input": {"size": [32, 32], "channels": 3, "normalization": "scale_0_1", "resize": "bilinear"},
    "output": "logits",
    "training": {"epochs": 1},
    "data": {"uri": "/data", "content_hash": "h", "counts": {"train": 8, "val": 2}},
    "metrics": {"val_mean_iou": 0.5},
    "best_epoch": 1,
    "versions": {"raysegment": "0.1.0"},
}


def test_model_card_of_the_first_release_loads_and_rewrites_unchanged(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"weights")
    (tmp_path / "model.json").write_text(json.dumps(FIRST_RELEASE_CARD))
    card = ModelCard.read(str(tmp_path))
    assert (card.input_size, card.native_scale, card.size_multiple, card.head) == ((32, 32), False, 4, "softmax")
    card.write(storage.resolve(str(tmp_path / "copy")))
    assert json.loads((tmp_path / "copy" / "model.json").read_text()) == FIRST_RELEASE_CARD


@pytest.mark.parametrize(
    "card,field",
    [
        ({"architectures": ["SegformerForSemanticSegmentation"]}, "model_id"),  # another tool's config
        (
            {**FIRST_RELEASE_CARD, "input": {"size": [32, 32], "normalization": "per_image_magic"}},
            "input.normalization",
        ),
        ({**FIRST_RELEASE_CARD, "class_names": ["background"]}, "class_names"),
    ],
)
def test_foreign_or_broken_model_card_is_one_clear_error(tmp_path, card, field):
    (tmp_path / "model.keras").write_bytes(b"weights")
    (tmp_path / "model.json").write_text(json.dumps(card))
    with pytest.raises(DataError) as err:
        ModelCard.read(str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'model.json'}: not a raysegment model card")
    assert field in message and "raysegment train" in message
