"""Flip test-time augmentation: the passes follow the flips the model trained with, `train` records in the card
whether TTA pays on the val split, and infer and evaluate follow that advice unless told (issue #15)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import write_images

from raysegment.config import EvaluateSpec, InferSpec
from raysegment.data import synthetic
from raysegment.evaluate import TTA_MIN_GAIN, evaluate
from raysegment.inference.pipeline import infer
from raysegment.inference.predictor import Predictor, normalize
from raysegment.models.card import CARD_FILE, MODEL_FILE, TTA, ModelCard

pytestmark = pytest.mark.slow

# The mirrored passes each training flip should bring, as batch axes (N, H, W, C): written out here, not taken
# from the library, so a wrong mapping there fails.
EXPECTED_AXES = {"none": [(2,)], "horizontal": [(2,)], "vertical": [(1,)], "both": [(2,), (1,), (1, 2)]}


def model_copy(model: str, root: Path, **card_changes) -> str:
    """The tiny model in a folder of its own, its card's JSON updated (`training` keys merged)."""
    dest = root / "model"
    dest.mkdir(parents=True)
    shutil.copy(Path(model) / MODEL_FILE, dest / MODEL_FILE)
    card = json.loads((Path(model) / CARD_FILE).read_text())
    card["training"] = {**card["training"], **card_changes.pop("training", {})}
    card.update(card_changes)
    (dest / CARD_FILE).write_text(json.dumps(card))
    return str(dest)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_tta(model, x: np.ndarray, flip: str) -> np.ndarray:
    """The mean of the softmax over the plain and mirrored inputs, each mirrored back: the test's own oracle."""
    passes = [softmax(model(x, training=False).numpy())]
    for axis in EXPECTED_AXES[flip]:
        passes.append(np.flip(softmax(model(np.flip(x, axis).copy(), training=False).numpy()), axis))
    return np.mean(passes, axis=0)


def test_tta_averages_the_flips_the_model_trained_with(tiny_model, tmp_path):
    _, model = tiny_model
    both = Predictor(model_copy(model, tmp_path / "both", training={"flip": "both"}), tta_flip=True)
    assert both.tta == TTA(("horizontal", "vertical", "horizontal+vertical"), "given")
    assert both.card.output == "logits" and both.card.num_classes == 4  # the oracle's softmax over 4 logits
    images = np.stack([synthetic.make_example(i, size=32)[0] for i in range(3)])
    x = normalize(images, both.card)
    got = both._probabilities(x).numpy()
    np.testing.assert_allclose(got, numpy_tta(both.model, x, "both"), atol=1e-5)
    # The oracle is not the plain pass: a TTA that ran one pass (or only the horizontal) would fail above.
    assert not np.allclose(numpy_tta(both.model, x, "horizontal"), numpy_tta(both.model, x, "both"), atol=1e-4)

    # Native scale, a whole image at full resolution (52x40: no padding at depth 2): the class map of the
    # average over the vertical pass.
    native = json.loads((Path(model) / CARD_FILE).read_text())["input"] | {"resize": "none"}
    vertical = Predictor(
        model_copy(model, tmp_path / "vertical", training={"flip": "vertical"}, input=native), tta_flip=True
    )
    image = synthetic.make_example(5, size=64)[0][:52, :40]
    column = np.empty(1, object)  # native scale: one array per row, as `preprocess` hands them on
    column[0] = image
    pred = vertical({"image": column, "error": np.asarray([""], object)})["pred"][0]
    expected = numpy_tta(vertical.model, normalize(image[None], vertical.card), "vertical")[0].argmax(-1)
    assert pred.shape == (52, 40) and vertical.tta.flips == ("vertical",)
    np.testing.assert_array_equal(pred, expected)


@pytest.mark.parametrize(
    ("training", "flips"),
    [
        ({"flip": "none"}, ("horizontal",)),  # no flips in training: the one horizontal pass TTA always had
        ({"flip": "horizontal"}, ("horizontal",)),
        ({"flip": "vertical"}, ("vertical",)),
        ({"flip": "both", "augment": False}, ("horizontal",)),  # augmentation off: no flips were seen
        ({"flip": "auto"}, ("horizontal", "vertical", "horizontal+vertical")),  # --no-plan trains both
        (None, ("horizontal",)),  # imported models have no training record
    ],
)
def test_tta_flips_follow_the_training_record(training, flips):
    card = ModelCard.create(
        "0" * 64, {}, num_classes=2, class_names=["a", "b"], palette=[(0, 0, 0), (1, 1, 1)], input={"size": (8, 8)}
    )
    card = card.model_copy(update={"training": training})
    assert card.tta(True).flips == flips
    # A card without the trainer's advice (older ones, imported models): off unless asked for.
    assert card.inference is None and card.tta() == TTA((), "card") and card.tta(False) == TTA((), "given")


def test_train_records_whether_tta_pays(tiny_model):
    data, model = tiny_model
    card = ModelCard.read(model)
    advice = card.inference
    assert advice is not None, "train wrote no `inference` into the card"
    val = json.loads((Path(data) / "manifest.json").read_text())["counts"]["val"]
    plain, tta = advice.val_mean_iou["plain"], advice.val_mean_iou["tta"]
    assert advice.images == min(val, 64) and 0 <= plain <= 1 and 0 <= tta <= 1
    assert advice.tta_flip == (tta - plain >= TTA_MIN_GAIN) and advice.min_gain == TTA_MIN_GAIN
    assert advice.flips == list(card.tta_flips)


def test_evaluate_and_infer_follow_the_card_unless_told(tiny_model, tmp_path):
    data, model = tiny_model
    advice = ModelCard.read(model).inference
    assert advice is not None
    on = advice.tta_flip
    # Not told: the card's advice, scored exactly as train measured it (same images, same code path).
    m = evaluate(EvaluateSpec(model=model, data=data, out=str(tmp_path / "a.json")))
    assert (m["tta_flip"], m["tta_from"]) == (on, "card")
    assert m["mean_iou"] == pytest.approx(advice.val_mean_iou["tta" if on else "plain"], abs=1e-9)
    # Told otherwise: the flag wins, and the score is the other measurement.
    m = evaluate(EvaluateSpec(model=model, data=data, out=str(tmp_path / "b.json"), tta_flip=not on))
    assert (m["tta_flip"], m["tta_from"]) == (not on, "given")
    assert m["mean_iou"] == pytest.approx(advice.val_mean_iou["plain" if on else "tta"], abs=1e-9)
    # infer, on a card advising the opposite: the run record says the card's choice was run.
    other = model_copy(model, tmp_path / "other", inference=advice.model_dump() | {"tta_flip": not on})
    write_images(tmp_path / "in", 4)
    record = infer(InferSpec(model=other, input=str(tmp_path / "in"), output=str(tmp_path / "out"), report=False))
    assert record["counts"]["ok"] == 4
    assert (record["tta"]["tta_flip"], record["tta"]["tta_from"]) == (not on, "card")
    assert record["tta"]["tta_flips"] == (list(ModelCard.read(other).tta_flips) if not on else [])
