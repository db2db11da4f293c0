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

# The extra passes each training flip should bring, as (transpose rows and columns first, batch axes to reverse)
# of (N, H, W, C): written out here, not taken from the library, so a wrong mapping there fails. With 90-degree
# turns in training too: all 8 symmetries of the square.
FLIPS = [(False, (2,)), (False, (1,)), (False, (1, 2))]
EXPECTED_PASSES = {
    "none": [(False, (2,))],
    "horizontal": [(False, (2,))],
    "vertical": [(False, (1,))],
    "both": FLIPS,
    "both+rotate90": FLIPS + [(True, ())] + [(True, axes) for _, axes in FLIPS],
}
SQUARE = (  # the 7 passes besides the plain one: every symmetry of the square
    "horizontal",
    "vertical",
    "horizontal+vertical",
    "transpose",
    "transpose+horizontal",
    "transpose+vertical",
    "transpose+horizontal+vertical",
)


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
    for transpose, axes in EXPECTED_PASSES[flip]:
        y = np.flip(x.transpose(0, 2, 1, 3) if transpose else x, axes).copy()
        p = np.flip(softmax(model(y, training=False).numpy()), axes)
        passes.append(p.transpose(0, 2, 1, 3) if transpose else p)
    return np.mean(passes, axis=0)


def test_tta_averages_the_flips_the_model_trained_with(tiny_model, tmp_path):
    _, model = tiny_model
    both = Predictor(model_copy(model, tmp_path / "both", training={"flip": "both", "rotate90": False}), tta_flip=True)
    assert both.tta == TTA(("horizontal", "vertical", "horizontal+vertical"), "given")
    assert both.card.output == "logits" and both.card.num_classes == 4  # the oracle's softmax over 4 logits
    images = np.stack([synthetic.make_example(i, size=32)[0] for i in range(3)])
    x = normalize(images, both.card)
    got = both._probabilities(x).numpy()
    np.testing.assert_allclose(got, numpy_tta(both.model, x, "both"), atol=1e-5)
    # The oracle is not the plain pass: a TTA that ran one pass (or only the horizontal) would fail above.
    assert not np.allclose(numpy_tta(both.model, x, "horizontal"), numpy_tta(both.model, x, "both"), atol=1e-4)

    # Trained with 90-degree turns as well: the 8 symmetries of the square, on a non-square batch (32x64: a
    # transposed pass must come back to the batch's own shape).
    turned = Predictor(
        model_copy(model, tmp_path / "turned", training={"flip": "both", "rotate90": True}), tta_flip=True
    )
    assert turned.tta == TTA(SQUARE, "given")
    wide = normalize(np.stack([synthetic.make_example(i, size=64)[0][:32] for i in range(2)]), turned.card)
    got = turned._probabilities(wide).numpy()
    assert got.shape[:3] == (2, 32, 64)
    np.testing.assert_allclose(got, numpy_tta(turned.model, wide, "both+rotate90"), atol=1e-5)
    assert not np.allclose(got, numpy_tta(turned.model, wide, "both"), atol=1e-4)

    # Native scale, a whole image at full resolution (52x40: no padding at depth 2): the class map of the
    # average over the vertical pass.
    native = json.loads((Path(model) / CARD_FILE).read_text())["input"] | {"resize": "none"}
    vertical = Predictor(
        model_copy(model, tmp_path / "vertical", training={"flip": "vertical", "rotate90": False}, input=native),
        tta_flip=True,
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
        ({"flip": "both", "rotate90": True}, SQUARE),  # flips and 90-degree turns: every symmetry
        ({"flip": "horizontal", "rotate90": True}, SQUARE),  # a turn and one mirror make them all
        ({"flip": "none", "rotate90": True}, ("horizontal+vertical", "transpose+horizontal", "transpose+vertical")),
        ({"flip": "both", "rotate90": True, "augment": False}, ("horizontal",)),
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
