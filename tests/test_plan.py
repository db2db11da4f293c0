"""The training plan's rules (#15 item 2), each on a crafted fingerprint."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from helpers import fingerprint, manifest

from raysegment.data.fingerprint import Fingerprint
from raysegment.plan import Compute, depth_for, format_plan, make_plan, parse_duration

CPU = Compute(workers=2)
GPU = Compute(workers=1, gpus_per_worker=1)


def test_small_images_with_large_objects_are_resized():
    plan = make_plan(fingerprint(side=128), 80, CPU)
    assert (plan.crop, plan.image_size) == ("resize", 128)


def test_images_smaller_than_the_smallest_window_are_resized_up():
    """16 px images with 1 px objects under the 32 px minimum window: the plan said resizing would
    'shrink' the objects (it enlarges them) and chose native windows, three quarters padding."""
    plan = make_plan(fingerprint(side=16, areas=(200.0, 1.0)), 80, CPU)
    assert (plan.crop, plan.image_size) == ("resize", 32)
    assert "resized up, no object shrinks" in plan.reasons["crop"]


def test_images_larger_than_the_window_train_on_native_windows():
    plan = make_plan(fingerprint(side=1024), 80, CPU)
    assert (plan.crop, plan.image_size) == ("native", 256)
    assert make_plan(fingerprint(side=100), 80, CPU).image_size == 112  # a multiple of 16
    assert make_plan(fingerprint(side=1024), 80, GPU).image_size == 512


def test_elongated_images_train_on_native_windows_not_squashed_into_squares():
    # 100x2000 px strips: resizing to a 112 px square would shrink them 18x along their length only.
    strips = dataclasses.replace(
        fingerprint(side=100), width={"min": 1800, "median": 2000.0, "max": 2200}, object_area_median=[1e5, 400.0]
    )
    plan = make_plan(strips, 80, CPU)
    assert (plan.crop, plan.image_size) == ("native", 112) and "squash it 20.0x" in plan.reasons["crop"]
    assert "median image 2000x100 px (width x height)" in plan.reasons["crop"]
    # 4:3 photos of the window's size are resized: a third longer along one side is within the rule.
    photos = dataclasses.replace(fingerprint(side=96), width={"min": 128, "median": 128.0, "max": 128})
    assert make_plan(photos, 80, CPU).crop == "resize"


def test_resizing_that_would_erase_small_objects_keeps_native_scale():
    # Median 128 px but some images 1024 px: resizing those to 128 divides areas by 64.
    mixed = fingerprint(side=128, areas=(30000.0, 16.0))
    mixed = dataclasses.replace(mixed, height={**mixed.height, "max": 1024})
    assert make_plan(mixed, 80, CPU).crop == "native"
    big_objects = dataclasses.replace(mixed, object_area_median=[30000.0, 2000.0])
    assert make_plan(big_objects, 80, CPU).crop == "resize"


def test_the_reason_for_resizing_larger_images_says_they_shrink_not_fit():
    """Portrait 96x128 photos, 96 px window: the reason said the images "fit the 96 px window; resizing
    loses no object" while the largest were shrunk into it."""
    photos = dataclasses.replace(fingerprint(side=96), height={"min": 128, "median": 128.0, "max": 128})
    plan = make_plan(photos, 80, CPU)
    assert (plan.crop, plan.image_size) == ("resize", 96)
    reason = plan.reasons["crop"]
    assert "fit" not in reason
    assert "resizing the largest images (128 px) to 96 px keeps the smallest median object (400 px" in reason
    assert "about 225 px after) at least 9 px" in reason


@pytest.mark.parametrize(("size", "depth"), [(32, 2), (64, 3), (128, 4), (256, 5), (512, 5)])
def test_depth_keeps_an_8_pixel_bottleneck(size, depth):
    assert depth_for(size) == depth
    assert size >> depth >= 8


def test_rare_class_gets_ce_dice_and_oversampled_windows():
    rare = make_plan(fingerprint(side=1024, shares=(0.95, 0.05)), 80, CPU)
    common = make_plan(fingerprint(side=1024, shares=(0.6, 0.4)), 80, CPU)
    assert (rare.crop, rare.loss, rare.oversample) == ("native", "ce+dice", pytest.approx(1 / 3, abs=1e-3))
    assert (common.loss, common.oversample) == ("ce", 0.0)
    # Whole images in every window: nothing to centre on.
    resized = make_plan(fingerprint(side=128, shares=(0.95, 0.05)), 80, CPU)
    assert (resized.crop, resized.loss, resized.oversample) == ("resize", "ce+dice", 0.0)


def test_oriented_data_is_flipped_only_along_the_axis_it_has_no_side_on_and_never_turned():
    street = make_plan(fingerprint(shares=(0.5, 0.3, 0.2), areas=(1e4, 1e4, 1e4), top=(0.95, 0.1, 0.5)), 80, CPU)
    cells = make_plan(fingerprint(), 80, CPU)
    assert (street.flip, street.rotate90) == ("horizontal", False) and "oriented" in street.reasons["augment"]
    assert (cells.flip, cells.rotate90) == ("both", True)
    sideways = dataclasses.replace(fingerprint(), class_left_share=[0.9, 0.2])  # a class keeps to the left
    sideways_plan = make_plan(sideways, 80, CPU)
    assert (sideways_plan.flip, sideways_plan.rotate90) == ("vertical", False)
    both = dataclasses.replace(sideways, class_top_share=[0.9, 0.2])
    assert make_plan(both, 80, CPU).flip == "none"


def _disc_masks(centres: list[tuple[int, int]]) -> Fingerprint:
    """The fingerprint of 64x64 masks, each with one disc (class 1, radius 12) centred at (row, column)."""
    from raysegment.data.fingerprint import ShardFingerprint, merge
    from raysegment.data.imaging import Decoded

    yy, xx = np.mgrid[:64, :64]
    part = ShardFingerprint()
    for i, (cy, cx) in enumerate(centres):
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < 144).astype(np.uint8)
        part.add(f"k{i}", Decoded(np.zeros((64, 64, 1), np.uint8), "L", 1), mask)
    return merge([part], 2, [0.9, 0.1])


def test_orientation_needs_the_images_to_agree_not_pooled_pixels_of_a_few():
    """A class with over 70% of its pixels in one half made data 'oriented' (no turns, no microscopy
    augmentation) for 34% of random 4-image and 13% of 8-image sets: each image now votes, and the vote
    must be significant (a unanimous one needs 8 images)."""
    from raysegment.plan import orientation

    # Four images, three discs near the top edge and one just below the middle: 82% of the pixels on top.
    few = _disc_masks([(8, 20), (10, 40), (6, 30), (36, 30)])
    assert few.class_top_share[1] > 0.7 and few.class_top_votes[1] == [3, 1]
    assert orientation(few)[:2] == ("both", True)
    # Eight images, every one with the disc on top (sky in street scenes): oriented.
    street = _disc_masks([(10, 8 * i) for i in range(8)])
    flip, rotate90, reason = orientation(street)
    assert (flip, rotate90) == ("horizontal", False) and "in 8 of 8 images" in reason
    # ... but not when the images split 6:2 on it, however the pixels pool.
    split = _disc_masks([(4, 8 * i) for i in range(6)] + [(36, 20), (36, 40)])
    assert split.class_top_share[1] > 0.7 and orientation(split)[:2] == ("both", True)
    # A stored fingerprint from before the votes were counted is still current (computing it afresh read
    # every shard on each plan and train); without votes, a side needs as many images as a unanimous vote.
    stored = {k: v for k, v in street.to_json().items() if not k.endswith("_votes")}
    assert Fingerprint.is_current(stored) and Fingerprint.from_json(stored).class_top_votes is None
    old = dataclasses.replace(fingerprint(top=(0.9, 0.1)), images=4)
    assert old.class_top_votes is None and orientation(old)[:2] == ("both", True)
    assert orientation(dataclasses.replace(old, images=8))[:2] == ("horizontal", False)


def test_a_plan_needs_training_images():
    """A data set with no training pair got a plan of '1 training images: 102 passes an epoch'."""
    with pytest.raises(ValueError, match="no training images"):
        make_plan(fingerprint(), 0, CPU)


def test_intensities_of_data_in_0_1_print_with_significant_digits():
    """data-info printed float data's statistics with one decimal (mean 0.1, std 0.2, p50 0.0)."""
    from raysegment.data.fingerprint import format_fingerprint

    unit = dataclasses.replace(
        fingerprint(modes={"F": 100}),
        intensity={
            "mean": [0.093] * 3,
            "std": [0.201] * 3,
            "p0.5": [-0.13] * 3,
            "p50": [0.016] * 3,
            "p99.5": [0.6] * 3,
        },
    )
    line = next(x for x in format_fingerprint(unit, ["a", "b"]) if x.strip().startswith("intensity R"))
    assert "mean 0.093, std 0.201, p0.5 -0.13, p50 0.016, p99.5 0.6" in line
    # 16-bit counts: whole numbers, as the README says (they printed 8035.3 and 11880.3, six digits, under
    # "four significant digits"); below 1000 four significant digits, never an exponent.
    counts = dataclasses.replace(unit, intensity={k: [31872.6] * 3 for k in unit.intensity})
    assert "mean 31873, std 31873" in format_fingerprint(counts, ["a", "b"])[3]
    grey = dataclasses.replace(unit, intensity={"mean": [8035.3] * 3, "p99.5": [11880.3] * 3, "std": [714.1] * 3})
    assert "mean 8035, p99.5 11880, std 714.1" in format_fingerprint(grey, ["a", "b"])[3]
    assert "mean 120.5" in format_fingerprint(dataclasses.replace(unit, intensity={"mean": [120.5] * 3}), ["a", "b"])[3]


def test_many_classes_with_a_scarce_one_get_class_weights():
    street = fingerprint(shares=(0.5, 0.3, 0.195, 0.005), areas=(1e4,) * 4)
    assert make_plan(street, 80, CPU).class_weights == "inverse_sqrt_frequency"
    demo = fingerprint(shares=(0.84, 0.055, 0.07, 0.035), areas=(1e4,) * 4)  # rare, but none under 1%
    assert make_plan(demo, 80, CPU).class_weights == "none"
    assert make_plan(fingerprint(shares=(0.995, 0.005)), 80, CPU).class_weights == "none"  # two classes: Dice
    given = make_plan(street, 80, CPU, given={"class_weights": "inverse_frequency"})
    assert given.class_weights == "inverse_frequency"


def test_a_declared_class_the_data_never_shows_is_absent_not_rare():
    # A third class name given to prepare, no pixel of it: no Dice term, weights or oversampling for it.
    absent = make_plan(fingerprint(side=1024, shares=(0.6, 0.4, 0.0), areas=(1e4, 1e4, None)), 80, CPU)
    assert (absent.loss, absent.class_weights, absent.oversample) == ("ce", "none", 0.0)
    assert "class(es) [2] have no labelled pixel" in absent.reasons["loss"]
    # Beside a labelled rare class it changes nothing: the rare one still gets its rules.
    rare = make_plan(fingerprint(side=1024, shares=(0.7, 0.295, 0.005, 0.0), areas=(1e4,) * 3 + (None,)), 80, CPU)
    assert (rare.loss, rare.class_weights, rare.oversample) == ("ce+dice", "inverse_sqrt_frequency", 0.3333)
    assert "[2]" in rare.reasons["class_weights"] and "[2, 3]" not in rare.reasons["loss"]


def test_sixteen_bit_and_grey_data_are_clipped_before_zscore():
    deep = make_plan(fingerprint(modes={"I;16": 100}), 80, CPU)
    assert deep.normalization == "zscore_clipped" and deep.pixel_stats["low"] == [2.0] * 3
    assert make_plan(fingerprint(modes={"L": 100}), 80, CPU).normalization == "zscore_clipped"
    rgb = make_plan(fingerprint(), 80, CPU)
    assert rgb.normalization == "zscore" and rgb.pixel_stats["mean"] == [120.0] * 3


def test_microscopy_like_data_gets_turns_warps_gamma_and_noise_colour_and_oriented_data_none():
    grey = make_plan(fingerprint(side=256, modes={"L": 100}), 80, CPU)
    assert (grey.rotate, grey.elastic, grey.gamma, grey.noise) == (180.0, 4.0, 0.3, 0.03)
    assert "microscopy-like" in grey.reasons["warp"]
    rgb = make_plan(fingerprint(side=256), 80, CPU)
    assert (rgb.flip, rgb.rotate90) == ("both", True) and (rgb.rotate, rgb.elastic, rgb.gamma, rgb.noise) == (0,) * 4
    oriented = fingerprint(side=256, shares=(0.5, 0.5), top=(0.9, 0.1), modes={"L": 100})
    street = make_plan(oriented, 80, CPU)
    assert (street.flip, street.rotate, street.elastic) == ("horizontal", 0.0, 0.0)
    given = make_plan(fingerprint(side=256), 80, CPU, given={"rotate": 15.0, "noise": 0.1})
    assert (given.rotate, given.noise, given.given) == (15.0, 0.1, ("rotate", "noise"))


def test_budget_sets_epochs_and_width_follows_the_device():
    short, long = make_plan(fingerprint(), 80, CPU, 600), make_plan(fingerprint(), 80, CPU, 2400)
    # Four times the budget, about four times the passes (longer epochs as well as more of them).
    assert long.epochs * long.repeat >= 3 * short.epochs * short.repeat and short.time_budget_s == 600
    default = make_plan(fingerprint(), 80, CPU)
    assert 300 <= default.time_budget_s <= 7200
    assert make_plan(fingerprint(), 80, GPU).base_filters > default.base_filters


def test_a_small_split_is_repeated_to_a_useful_epoch_while_enough_epochs_fit():
    small = make_plan(fingerprint(side=512), 24, CPU, 2400)  # ISBI's 24 slices, 40 minutes
    # About 250 windows an epoch, not 24, while the 20 epochs of the rule still fit the estimate.
    assert 200 <= small.repeat * 24 <= 250 + 24 and small.epochs >= 20
    assert make_plan(fingerprint(side=512), 2000, CPU, 2400).repeat == 1  # already long epochs
    assert make_plan(fingerprint(side=512), 24, CPU, 60).repeat == 1  # 20 epochs of one pass barely fit
    assert make_plan(fingerprint(side=512), 24, CPU, 2400, given={"epochs": 30}).repeat == 1  # epochs = passes
    assert make_plan(fingerprint(side=512), 24, CPU, 2400, given={"repeat": 3}).repeat == 3


def test_a_fast_device_gets_epochs_of_a_minute_not_of_250_windows():
    # ISBI on one GPU: 250 windows are about a second's work there; validation and a checkpoint every second
    # would spend the budget. The epoch is stretched to a minute (estimated), and 20 epochs still fit.
    gpu = make_plan(fingerprint(side=512), 24, GPU, 2400)
    windows_per_s = GPU.pixels_per_s / gpu.image_size**2
    assert gpu.repeat * 24 / windows_per_s >= 60 and gpu.repeat * 24 > 1000 and gpu.epochs >= 20
    assert "a minute" in gpu.reasons["repeat"]
    # On CPU cores 250 windows already take longer than a minute: the window count decides.
    assert make_plan(fingerprint(side=512), 24, CPU, 2400).repeat * 24 <= 250 + 24


def test_plan_values_are_train_spec_fields():
    from raysegment.config import TrainSpec

    plan = make_plan(fingerprint(side=1024), 80, CPU, 900)
    spec = TrainSpec(data="d", out="o", **plan.train_values())
    assert spec.crop == "native" and spec.epochs == plan.epochs
    json.dumps(plan.to_json())


def test_plan_and_data_info_commands_print_what_train_and_the_stored_fingerprint_say(tmp_path):
    """`raysegment plan` writes and prints the plan `train` makes for the same compute and budget (what train
    records in the model card's `plan` and trains: `apply_plan`, short of training, which the slow
    test_train_plan.py does), and `data-info` prints the stored fingerprint; neither starts Ray for a current one."""
    from click.testing import CliRunner

    from raysegment import storage
    from raysegment.cli import main
    from raysegment.config import TrainSpec, load_spec
    from raysegment.data.info import format_manifest
    from raysegment.plan import PLAN_FIELDS, Plan
    from raysegment.train.trainer import apply_plan

    data = manifest(fingerprint=fingerprint(side=1024).to_json())
    (tmp_path / "manifest.json").write_text(json.dumps(data.to_json()))
    loc, out = storage.resolve(str(tmp_path)), tmp_path / "plan.json"
    planned = CliRunner().invoke(
        main, ["plan", str(tmp_path), "--workers", "1", "--time-budget", "10m", "--out", str(out)]
    )
    assert planned.exit_code == 0, planned.output
    written = json.loads(out.read_text())
    # `train DATA MODEL --workers 1 --time-budget 10m`, as the CLI makes its spec.
    spec = load_spec(TrainSpec, None, {"data": str(tmp_path), "out": str(tmp_path / "model"), "workers": 1})
    trained, record = apply_plan(spec.model_copy(update={"time_budget": 600.0}), loc, data)
    assert record.values == {k: written[k] for k in PLAN_FIELDS} == {k: getattr(trained, k) for k in PLAN_FIELDS}
    assert (record.reasons, record.given, record.time_budget_s) == (written["reasons"], [], written["time_budget_s"])
    assert record.normalization == {"kind": written["normalization"], **(written["pixel_stats"] or {})}
    expected = Plan(**{k: v for k, v in written.items() if k != "data"} | {"given": ()})
    assert written["data"] == loc.uri
    assert planned.stdout == "\n".join([*format_plan(expected), f"written to {out}"]) + "\n"
    shown = CliRunner().invoke(main, ["data-info", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == format_manifest(loc.uri, data, fingerprint(side=1024)) + "\n"
    assert "height 1024/1024/1024" in shown.stdout


def test_plan_checks_the_data_set_once(tmp_path, monkeypatch):
    """`raysegment plan` checked the data set (`check_data`), then `plan_for_spec` checked its train and val
    splits again: each check runs once, and the refusals still name DATA's URI (`train`'s name DATA as given)."""
    from raysegment import storage
    from raysegment.config import TrainSpec
    from raysegment.errors import DataError
    from raysegment.plan import write_plan
    from raysegment.train import config

    calls: list[str] = []
    for name in ("check_labelled", "check_train", "check_val"):
        real = getattr(config, name)
        monkeypatch.setattr(config, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps(manifest(fingerprint=fingerprint().to_json()).to_json()))
    spec = TrainSpec(data=str(data), out=str(tmp_path / "plan.json"), workers=1)
    write_plan(spec)
    assert calls == ["check_labelled", "check_train", "check_val"]
    (data / "manifest.json").write_text(json.dumps(manifest(counts={"train": 50, "val": 0}).to_json()))
    with pytest.raises(DataError, match=f"^{storage.resolve(str(data)).uri}: no validation images"):
        write_plan(spec)


def test_durations():
    assert parse_duration("40m") == 2400 and parse_duration("2h") == 7200 and parse_duration("90") == 90
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_a_given_window_gets_a_depth_that_divides_it_and_batches_fit_the_split():
    assert (depth_for(96), depth_for(100), depth_for(24)) == (3, 2, 1)
    plan = make_plan(fingerprint(), 6, CPU)  # 6 training images on 2 workers: 3 a worker
    assert plan.batch_size == 3
    given = make_plan(fingerprint(), 80, CPU, given={"image_size": 96, "loss": "dice"})
    assert (given.image_size, given.depth, given.loss, given.given) == (96, 3, "dice", ("image_size", "loss"))
    assert "loss           dice           given" in "\n".join(format_plan(given))
    with pytest.raises(ValueError, match="not plan fields"):
        make_plan(fingerprint(), 80, CPU, given={"workers": 4})


def test_the_budget_stops_before_an_epoch_that_would_end_past_it():
    from raysegment.train.checkpoint import out_of_budget

    assert not out_of_budget(spent_s=40, last_epoch_s=10, budget_s=60)
    assert out_of_budget(spent_s=55, last_epoch_s=10, budget_s=60)
