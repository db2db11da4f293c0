"""Multi-class street scenes (#15 item 5): class ids, void, orientation and imbalance along the whole path.

On an unseen street-scene set (11 classes plus void) a class holding ~10% of the pixels scored IoU 0 on the
training split itself. The suspects were a defect in class handling (palette order, an off-by-one with void,
class weights not aligned with ids), augmentation that breaks the scenes' orientation, or the metrics; or
else training that is too short for the rarer classes. A crafted set stands in for the real one: 96x72 RGB
scenes laid out as a street is (sky on top; buildings with a textured ~10% "tree" class on either side;
pavement and road below; small poles, signs, fences, cars, people), 11 classes in CamVid's order and colours
read from a class_dict.csv, and a void region (an unlisted colour, so ignore 255). What the tests found: ids
pass exactly from the colour masks to the loss and the metrics, and the plan keeps the sky on top; what
leaves classes at IoU 0 on the training split is an unweighted loss over a few hundred steps, which the
plan's class weights mostly fix (the last test).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysegment import plan as planning
from raysegment.config import PrepareSpec, TrainSpec
from raysegment.data import imaging
from raysegment.data.examples import Augmentation, decode_for_training, fit_example
from raysegment.data.fingerprint import Fingerprint
from raysegment.data.manifest import Manifest, read_manifest
from raysegment.data.prepare import prepare
from raysegment.models.metrics import confusion_matrix, metrics_from_confusion
from raysegment.storage import Location

NAMES = ["sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian", "bicyclist"]
# CamVid's label colours (class_dict.csv, in id order); void is black, which the CSV does not list.
COLOURS = [
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
]
# What each class looks like in the photographs.
LOOKS = [
    (135, 180, 235),
    (125, 95, 80),
    (210, 210, 90),
    (80, 80, 88),
    (165, 160, 150),
    (50, 135, 45),
    (225, 40, 40),
    (150, 115, 70),
    (40, 45, 170),
    (200, 80, 160),
    (0, 140, 140),
]
SKY, BUILDING, ROAD, TREE, VOID = 0, 1, 3, 5, imaging.IGNORE_INDEX
W, H = 96, 72
PAIRS = 40
WINDOW = 48  # native windows smaller than the images, as 256 px windows of 480x360 scenes
STEPS = 200


def street_scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB photograph, class ids with 255 = void) of one crafted street."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((H, W), np.uint8)
    horizon, kerb = 24 + int(rng.integers(-3, 4)), 46 + int(rng.integers(-2, 3))
    ids[horizon:kerb] = BUILDING
    right = bool(rng.integers(2))  # trees on either side: left and right are alike, up and down are not
    x = 58 + int(rng.integers(-6, 7))
    x = x if right else W - x - 24
    ids[horizon - 7 : kerb, x : x + 24] = TREE
    fence = 16 + int(rng.integers(0, 5))
    if right:
        ids[kerb - 5 : kerb, :fence] = 7
    else:
        ids[kerb - 5 : kerb, W - fence :] = 7
    ids[kerb : kerb + 8] = 4
    ids[kerb + 8 :] = ROAD
    pole = 22 + int(rng.integers(-6, 7))
    pole = pole if right else W - pole - 2
    ids[horizon - 10 : kerb + 4, pole : pole + 2] = 2
    ids[horizon - 14 : horizon - 9, pole - 2 : pole + 4] = 6
    car = int(rng.integers(0, W - 18))
    ids[kerb + 10 : kerb + 18, car : car + 18] = 8
    person = int(rng.integers(30, 50))
    ids[kerb - 4 : kerb + 7, person : person + 3] = 9
    bike = int(rng.integers(0, W - 6))
    ids[kerb + 14 : kerb + 22, bike : bike + 6] = 10
    ids[H - 5 :, 20:76] = VOID  # the car's own bonnet
    photo = np.full((H, W, 3), 10.0, np.float32)
    for c, look in enumerate(LOOKS):
        photo[ids == c] = look
    yy, xx = np.mgrid[:H, :W]
    photo[ids == TREE] += (((yy + xx) // 2 % 2) * 40.0 - 20.0)[ids == TREE, None]  # foliage texture
    photo[ids == BUILDING] += (((yy % 6) < 2) & ((xx % 8) < 3))[ids == BUILDING, None] * 50.0  # windows
    photo += rng.normal(0.0, 8.0, photo.shape)
    return np.clip(photo, 0, 255).astype(np.uint8), ids


def colour_mask(ids: np.ndarray) -> np.ndarray:
    out = np.zeros((*ids.shape, 3), np.uint8)  # void stays black
    for c, colour in enumerate(COLOURS):
        out[ids == c] = colour
    return out


@dataclass(frozen=True)
class Streets:
    data: str
    loc: Location
    manifest: Manifest
    fingerprint: Fingerprint
    truth: dict[str, np.ndarray]  # key -> the class ids the scene was drawn with
    train: dict[str, np.ndarray]  # the training split's shard columns (key, image, mask), as object arrays


@pytest.fixture(scope="module")
def streets(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Streets:
    root = tmp_path_factory.mktemp("streets")
    (root / "src" / "images").mkdir(parents=True)
    (root / "src" / "masks").mkdir()
    truth = {}
    for i in range(PAIRS):
        photo, ids = street_scene(i)
        Image.fromarray(photo).save(root / "src" / "images" / f"{i:03d}.png")
        Image.fromarray(colour_mask(ids)).save(root / "src" / "masks" / f"{i:03d}.png")
        truth[f"{i:03d}"] = ids
    rows = "".join(f"{n},{r},{g},{b}\n" for n, (r, g, b) in zip(NAMES, COLOURS))
    (root / "class_dict.csv").write_text("name,r,g,b\n" + rows)
    spec = PrepareSpec(
        source=str(root / "src"),
        dest=str(root / "data"),
        mask_colors=str(root / "class_dict.csv"),
        unlisted_colors="ignore",
        val_fraction=0.25,
    )
    prepare(spec)
    loc, manifest = read_manifest(spec.dest)
    return Streets(spec.dest, loc, manifest, planning.read_fingerprint(loc, manifest), truth, _columns(root, manifest))


def _columns(root: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    tables = [pq.read_table(root / "data" / s.path) for s in manifest.shards if s.split == "train"]
    return {
        c: np.asarray([v for t in tables for v in t.column(c).to_pylist()], object) for c in ("key", "image", "mask")
    }


def _planned(streets: Streets, **given: Any) -> TrainSpec:
    spec = TrainSpec(data=streets.data, out="unused", workers=1, image_size=WINDOW, batch_size=8, **given)
    return planning.planned_spec(spec, planning.plan_for_spec(spec, streets.loc, streets.manifest))


# --- class ids: prepare -> shards -> training batches -> loss -> metrics --------------------------------------


def test_prepare_keeps_class_ids_void_and_pixel_shares_exact(streets):
    m = streets.manifest
    assert (m.num_classes, list(m.class_names)) == (11, NAMES)
    assert [tuple(c) for c in m.palette] == COLOURS
    truth = np.stack(list(streets.truth.values()))
    labelled = truth[truth != VOID]
    assert m.pixel_frequency == tuple(float(np.sum(labelled == c) / labelled.size) for c in range(11))
    assert m.ignored_pixels == int(np.sum(truth == VOID))
    assert 0.09 < m.pixel_frequency[TREE] < 0.12  # the ~10% class of the report, at a fixed id
    for key, mask in zip(streets.train["key"], streets.train["mask"]):
        assert np.array_equal(imaging.decode_mask(mask), streets.truth[key]), key


def test_training_batches_carry_the_drawn_ids(streets):
    # A native window as wide as the images: the scene whole, padded with ignore above and below.
    aug = Augmentation("native", "none", rotate90=False)
    batch = decode_for_training(streets.train, W, aug)
    assert batch["image"].shape == (len(streets.train["key"]), W, W, 3)
    for key, window in zip(streets.train["key"], batch["mask"]):
        top = int(np.argmax((window != VOID).any(axis=1)))  # the first row with a label (the sky's)
        assert np.array_equal(window[top : top + H], streets.truth[key]), key
        assert (window[:top] == VOID).all() and (window[top + H :] == VOID).all()


def test_the_loss_weighs_each_id_by_its_own_weight_and_ignores_void(streets):
    import tensorflow as tf

    from raysegment.models.losses import class_weights, cross_entropy

    weights = class_weights("inverse_sqrt_frequency", streets.manifest.pixel_frequency)
    assert len(weights) == 11
    # The rarer the class, the larger its weight: weights follow the ids, not the palette or name order.
    order = np.argsort(streets.manifest.pixel_frequency)
    assert list(np.argsort(weights)[::-1]) == list(order)
    labels = next(iter(streets.truth.values()))
    logits = 3.0 * np.eye(11, dtype=np.float32)[np.where(labels == VOID, 0, labels)]  # right everywhere...
    logits[labels == TREE] = 3.0 * np.eye(11, dtype=np.float32)[BUILDING]  # ...but calls the trees buildings
    logits[labels == VOID] = 3.0 * np.eye(11, dtype=np.float32)[ROAD]

    def loss(logits: np.ndarray) -> float:
        return float(cross_entropy(tf.constant(labels[None]), tf.constant(logits[None]), weights)[0])

    # The weighted mean over labelled pixels, each weighed by its own class's weight.
    labelled = labels != VOID
    log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    ce = -np.take_along_axis(log_p[labelled], labels[labelled][:, None].astype(int), axis=1)[:, 0]
    w = np.asarray(weights)[labels[labelled]]
    assert loss(logits) == pytest.approx(float((w * ce).sum() / w.sum()), rel=1e-5)
    w_shifted = np.asarray(weights)[(labels[labelled] + 1) % 11]  # what an off-by-one would weigh
    assert loss(logits) != pytest.approx(float((w_shifted * ce).sum() / w_shifted.sum()), rel=1e-3)
    # Whatever the model says on void, the loss is the same.
    logits[labels == VOID] = 3.0 * np.eye(11, dtype=np.float32)[SKY]
    assert loss(logits) == pytest.approx(float((w * ce).sum() / w.sum()), rel=1e-5)


def test_class_weights_are_at_most_ten_times_apart_even_where_a_listed_class_never_occurs():
    from raysegment.models.losses import frequency_weights

    # A class_dict row no mask uses (share 0) no longer drives every other weight towards 0.
    assert frequency_weights([0.5, 0.5, 0.0]) == [1.0, 1.0, 1.0]
    weights = frequency_weights([0.9, 0.0999, 0.0001, 0.0])
    assert weights[2] / weights[0] == pytest.approx(10.0) and weights[3] == 1.0
    assert np.mean(weights[:3]) == pytest.approx(1.0)
    sqrt = frequency_weights([0.32, 0.0045], power=0.5)  # sky and sign: 8.4x, under the cap
    assert sqrt[1] / sqrt[0] == pytest.approx((0.32 / 0.0045) ** 0.5)


def test_per_class_iou_is_scored_by_id_and_void_is_left_out(streets):
    truth = np.stack(list(streets.truth.values()))
    pred = np.where(truth == TREE, BUILDING, truth)  # every tree called a building...
    pred[truth == VOID] = TREE  # ...and void called tree, which must not count
    scores = metrics_from_confusion(confusion_matrix(truth, pred, 11), NAMES)["per_class_iou"]
    assert scores["tree"] == 0.0
    trees, buildings = np.sum(truth == TREE), np.sum(truth == BUILDING)
    assert scores["building"] == pytest.approx(buildings / (buildings + trees))
    assert all(scores[n] == 1.0 for n in NAMES if n not in ("tree", "building"))


# --- orientation: flips keep the sky on top ---------------------------------------------------------------------


def test_the_plan_for_street_scenes_flips_left_right_only_and_weighs_classes(streets):
    plan = planning.make_plan(streets.fingerprint, streets.manifest.counts.train, planning.Compute(workers=1))
    assert (plan.flip, plan.rotate90, plan.rotate, plan.elastic) == ("horizontal", False, 0.0, 0.0)
    assert plan.class_weights == "inverse_sqrt_frequency" and plan.loss == "ce+dice"
    assert "left-right flips only" in plan.reasons["augment"]
    # `flip: true` (old specs, a bare --flip) is "auto": the plan's axes, not both.
    assert _planned(streets, flip=True).flip == "horizontal"
    assert _planned(streets, flip="both").flip == "both"  # an explicit choice is kept
    assert _planned(streets, flip=False).flip == "none"


def _quadrants(size: int = 8) -> np.ndarray:
    """Ids 0 1 / 2 3 in the four quarters: which way a window was flipped shows in its top row."""
    half = size // 2
    ids = np.zeros((size, size), np.uint8)
    ids[:half, half:], ids[half:, :half], ids[half:, half:] = 1, 2, 3
    return ids


@pytest.mark.parametrize(
    ("flip", "tops"), [("horizontal", {(0, 1), (1, 0)}), ("both", {(0, 1), (1, 0), (2, 3), (3, 2)})]
)
def test_flip_axes(flip, tops):
    ids = _quadrants()
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(64):
        _, out = fit_example(ids[..., None].repeat(3, axis=2), ids, 8, Augmentation("resize", flip, False), rng)
        seen.add((int(out[0, 0]), int(out[0, -1])))
    assert seen == tops


def test_windows_the_plan_trains_on_keep_the_sky_above_the_road(streets):
    spec = _planned(streets)
    aug = Augmentation.from_spec(spec)
    assert (aug.crop, aug.flip, aug.rotate90) == ("native", "horizontal", False)
    masks = np.concatenate([decode_for_training(streets.train, WINDOW, aug)["mask"] for _ in range(4)])
    rows = np.arange(WINDOW)[None, :, None]
    lowest_sky = np.where(masks == SKY, rows, -1).max(axis=1)
    highest_road = np.where(masks == ROAD, rows, WINDOW).min(axis=1)
    assert (lowest_sky < highest_road).all()
    # The old `flip: true` (both axes) and 90-degree turns put sky under road in some windows.
    turned = Augmentation("native", "both", rotate90=True)
    masks = decode_for_training(streets.train, WINDOW, turned)["mask"]
    assert (np.where(masks == SKY, rows, -1).max(axis=1) > np.where(masks == ROAD, rows, WINDOW).min(axis=1)).any()


def test_flip_in_specs_and_on_the_command_line():
    from raysegment.cli import main

    assert [TrainSpec(data="d", out="o", flip=v).flip for v in (True, False, "vertical")] == [
        "auto",
        "none",
        "vertical",
    ]
    assert TrainSpec(data="d", out="o").flip == "auto"
    # Without a plan (--no-plan) "auto" is both axes, as `flip: true` always was.
    assert Augmentation.from_spec(TrainSpec(data="d", out="o", plan=False)).flip == "both"
    command = main.commands["train"]
    for argv, flip, no_flip in (
        (["--flip"], "auto", None),
        (["--flip", "horizontal"], "horizontal", None),
        (["--no-flip"], None, True),
        ([], None, None),
    ):
        params = command.make_context("train", ["d", "o", *argv]).params
        assert (params["flip"], params["no_flip"]) == (flip, no_flip), argv


# --- imbalance: what left classes at IoU 0 on the training split -------------------------------------------------


def _train_briefly(streets: Streets, spec: TrainSpec) -> dict[str, float]:
    """Per-class IoU on the training images (whole, as `infer` sees them at native scale) after STEPS steps of
    what a `train` worker runs: `train_config`'s model, loss with its class weights, optimizer and schedule, on
    `decode_for_training` batches with the plan's augmentation and oversampling. Ray Train left out: seconds."""
    import keras
    import tensorflow as tf

    from raysegment.inference.predictor import normalize
    from raysegment.models.losses import probabilities
    from raysegment.train.config import rare_classes, train_config
    from raysegment.train.loop import make_train_step
    from raysegment.train.optim import make_optimizer

    cfg = train_config(spec, streets.manifest, streets.data, fingerprint=streets.fingerprint)
    keras.mixed_precision.set_global_policy(cfg.dtype_policy)  # as a worker does (float32 on CPU)
    keras.utils.set_random_seed(1)
    model = cfg.model.build()
    optimizer = make_optimizer(cfg)  # the plan's optimizer and LR, scaled for its global batch
    # The worker's own step, as one worker taking batch_size windows (its loss: their mean).
    step = make_train_step(replace(cfg, workers=1), tf.distribute.get_strategy(), model, optimizer)

    aug = Augmentation.from_spec(spec, rare_classes(streets.manifest))
    rng = np.random.default_rng(1)
    for _ in range(cfg.epochs * cfg.steps_per_epoch):
        pick = rng.integers(0, len(streets.train["key"]), cfg.batch_size)
        batch = decode_for_training({k: v[pick] for k, v in streets.train.items()}, WINDOW, aug, cfg.model_input)
        step(tf.constant(batch["image"]), tf.constant(batch["mask"]))
    photos = np.stack([imaging.decode_image(b) for b in streets.train["image"]])
    pred = np.argmax(probabilities(model(normalize(photos, cfg.model_input), training=False)).numpy(), axis=-1)
    truth = np.stack([streets.truth[k] for k in streets.train["key"]])
    return metrics_from_confusion(confusion_matrix(truth, pred, 11), NAMES)["per_class_iou"]


def test_a_short_run_with_the_plan_learns_the_scarce_classes_on_the_training_split(streets):
    """The report's symptom, reproduced: unweighted, 200 steps leave distinct classes at IoU ~0 on the very
    images trained on (2-4 of them over four initialisations; which ones varies), while 600-1000 steps bring
    every class to 0.95 or more, so no id is lost on the way: it is training too short for the imbalance.
    The plan's class weights (1/sqrt(share)) learn most of them in the same 200 steps."""
    epochs = max(1, STEPS // (streets.manifest.counts.train // 8))
    planned = _planned(streets, epochs=epochs)
    assert planned.class_weights == "inverse_sqrt_frequency"
    weighted = _train_briefly(streets, planned)
    unweighted = _train_briefly(streets, _planned(streets, epochs=epochs, class_weights="none"))
    assert weighted["tree"] > 0.5 and unweighted["tree"] > 0.5  # the ~10% class at its fixed id is learnt
    scarce = [n for n, s in zip(NAMES, streets.manifest.pixel_frequency) if s < 0.03]  # pole .. bicyclist
    runs = {"plan": weighted, "none": unweighted}
    mean = {name: np.mean([run[n] for n in scarce]) for name, run in runs.items()}
    assert mean["plan"] > mean["none"] + 0.15, runs
    assert np.mean(list(weighted.values())) > np.mean(list(unweighted.values())) + 0.05, runs
