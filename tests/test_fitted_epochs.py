"""Epochs from measured epochs (#15): with a time budget, the first epoch's time (one-time costs taken out)
sets how many epochs fit, the epochs after it re-fit that number from their own mean, the learning-rate
schedule follows, and the model card records the plan's estimate beside the fitted number."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import manifest

from raysegment import progress
from raysegment.config import TrainSpec
from raysegment.train.checkpoint import TrainState
from raysegment.train.config import train_config
from raysegment.train.events import EpochEnd, EpochView, Step
from raysegment.train.loop import epoch_end, eta_seconds, fitted_epochs, measured_epoch_seconds, steady_epoch_seconds

MANIFEST = manifest(
    num_classes=2, class_names=["background", "cell"], counts={"train": 40, "val": 5}, pixel_frequency=[0.9, 0.1]
)


def test_the_epochs_that_fit_the_budget():
    # 100 s budget, the first epoch took 20 s, the next ones take 10: 8 more fit.
    assert fitted_epochs(100, 20, 10, done=1, cap=None) == 9
    assert fitted_epochs(100, 20, 10, done=1, cap=5) == 5  # given epochs are a ceiling
    assert fitted_epochs(15, 20, 10, done=1, cap=None) == 1  # the first epoch alone outlasted the budget
    # The first step's one-time costs (tracing, the pipeline's start) count as one ordinary step.
    assert steady_epoch_seconds(epoch_s=12.0, train_s=11.0, first_step_s=6.0, steps=6) == pytest.approx(7.0)
    assert steady_epoch_seconds(epoch_s=12.0, train_s=11.0, first_step_s=6.0, steps=1) == 12.0


def test_later_epochs_refit_from_their_own_mean():
    rows = [{"epoch": e, "epoch_seconds": t} for e, t in enumerate([47.0, 35.0, 34.0, 36.0])]
    assert measured_epoch_seconds(rows[:1], run_first_epoch=0) is None  # only the first: nothing measured yet
    assert measured_epoch_seconds(rows, run_first_epoch=0) == pytest.approx(35.0)  # the first is left out
    assert measured_epoch_seconds(rows, run_first_epoch=2) == pytest.approx(36.0)  # a resumed run's own epochs
    many = [{"epoch": e, "epoch_seconds": 10.0 if e < 6 else 20.0} for e in range(11)]
    assert measured_epoch_seconds(many, run_first_epoch=0) == pytest.approx(20.0)  # the last five
    # ISBI on 2 cores: the first epoch's estimate (28.9 s) fitted 82 epochs into 2400 s; at 35 s an epoch,
    # the mean of epochs 2-3 fits 69, and the schedule is re-fitted to end there.
    assert fitted_epochs(2400, 47.3, 28.9, done=1, cap=None) == 82
    assert fitted_epochs(2400, 47.3 + 35 + 34, 34.5, done=3, cap=None) == 69


def test_the_eta_never_passes_the_budget():
    # `--time-budget 1m`, the first epoch 19 s with its one-time costs: 10 more at 19 s said ETA 3m07s.
    assert eta_seconds(10, epoch_s=4.0, budget_s=60, spent_s=19) == 40  # the fit's steady epochs
    assert eta_seconds(10, epoch_s=19.0, budget_s=60, spent_s=19) == 41  # at most the budget's rest
    assert eta_seconds(3, epoch_s=19.0, budget_s=60, spent_s=70) == 0
    assert eta_seconds(10, epoch_s=19.0, budget_s=None, spent_s=19) == 190  # no budget: the epochs left


def test_the_eta_stays_out_of_the_history():
    """The loop set `eta_s` on the row the history already held: checkpoints, `train --json`'s best and last rows
    carried it. The row keeps `epochs` (history.csv's column); only what the epoch reports has the ETA."""
    row = {"epoch": 1, "train_loss": 0.5, "val_mean_iou": 0.3, "epoch_seconds": 19.0}
    first = {**row, "epoch": 0, "epochs": 25}
    state = TrainState(history=[first]).after_epoch(dict(row), np.zeros((2, 2)), patience=None)
    state, shown = epoch_end(state, total=11, epoch_s=4.0, budget_s=60)
    assert state.history == [first, {**row, "epochs": 11}]
    assert shown == {**row, "epochs": 11, "eta_s": 22.0}  # 9 more at 4 s, within the 22 s left of the budget


def test_the_first_epoch_line_shows_the_fitted_epochs_and_the_loops_eta():
    """The stage is named when the epoch starts (`epoch 1/25`, the plan's count); its closing line takes the count
    the first epoch fitted, and the ETA the loop worked out (not 10 x the first epoch's 19 s)."""
    out = io.StringIO()
    progress.configure(progress.LINES, interval_s=3600, stream=out)
    try:
        view = EpochView(25)
        view.show(Step(0, 0, 8, None))
        view.show(Step(0, 8, 8, 0.5))
        metrics = {"epoch": 0, "epochs": 11, "epoch_seconds": 19.0, "eta_s": 41.0, "train_loss": 0.5}
        metrics |= {"val_mean_iou": 0.3, "val_pixel_accuracy": 0.9, "images_per_second": 12.0}
        view.show(EpochEnd(metrics, None))
    finally:
        progress.configure(progress.OFF)
    (line,) = out.getvalue().splitlines()
    assert " epoch 1/11  8/8 steps" in line and line.endswith("ETA 41s"), line


def cosine(step: int, total: int, warmup: int, peak: float) -> float:
    """Keras' CosineDecay with warm-up and alpha 0.01, written out."""
    if step < warmup:
        return peak / 10 + (peak - peak / 10) * step / warmup
    done = min(step - warmup, total - warmup) / (total - warmup)
    return peak * (0.99 * 0.5 * (1 + math.cos(math.pi * done)) + 0.01)


def test_refit_changes_the_schedule_a_compiled_step_already_reads():
    import tensorflow as tf

    from raysegment.train.optim import learning_rate_schedule, refit

    cfg = train_config(TrainSpec(data="d", out="o", batch_size=4, workers=1, epochs=10, warmup_epochs=1), MANIFEST, "d")
    schedule = learning_rate_schedule(cfg)
    lr_at = tf.function(lambda step: schedule(step))
    steps, peak = cfg.steps_per_epoch, cfg.peak_learning_rate
    assert float(lr_at(tf.constant(3 * steps))) == pytest.approx(cosine(3 * steps, 10 * steps, steps, peak), rel=1e-5)
    refit(schedule, cfg, 4)
    assert float(lr_at(tf.constant(3 * steps))) == pytest.approx(cosine(3 * steps, 4 * steps, steps, peak), rel=1e-5)
    assert float(lr_at(tf.constant(4 * steps))) == pytest.approx(peak * 0.01, rel=1e-5)  # the end of the schedule
    step = learning_rate_schedule(
        train_config(TrainSpec(data="d", out="o", batch_size=4, workers=1, epochs=10, schedule="step"), MANIFEST, "d")
    )
    refit(step, cfg, 2)
    assert float(step(tf.constant(2 * steps))) == pytest.approx(peak * 0.01)  # past 85% of the new length


@pytest.mark.slow
def test_a_budgeted_run_trains_the_epochs_its_first_epoch_fits(tiny_model, ray_cluster, tmp_path):
    """The plan chooses the epochs from its cost estimate; one worker's first epoch then sets them. Whatever
    the machine's speed: the run trains the fitted epochs (or stops at the budget), every epoch after the
    first follows the cosine re-fitted to them, and card and metrics record the estimate and the fit."""
    from raysegment.train.trainer import train

    data = tiny_model[0]
    spec = TrainSpec(
        data=data,
        out=str(tmp_path / "m"),
        workers=1,
        batch_size=4,
        depth=2,
        base_filters=4,
        time_budget=6,
        tta_check=False,
    )
    train(spec)
    card = json.loads((Path(tmp_path) / "m" / "model.json").read_text())
    metrics = json.loads((Path(tmp_path) / "m" / "metrics.json").read_text())
    plan = card["plan"]
    planned, fitted = plan["values"]["epochs"], plan["fitted_epochs"]
    assert "epochs" in plan["auto"] and (metrics["epochs_planned"], metrics["epochs_fitted"]) == (planned, fitted)
    assert plan["first_epoch_s"] > 0 and fitted >= 1
    assert metrics["epochs_run"] == fitted or metrics["stopped_by"] == "time_budget"
    rows = list(csv_rows(Path(tmp_path) / "m" / "history.csv"))
    steps = json.loads((Path(data) / "manifest.json").read_text())["counts"]["train"] // 4  # global batch 4
    warmup = int(plan["values"]["warmup_epochs"] * steps)
    peak = 1e-3 * 4 / 8
    assert rows[0]["learning_rate"] == pytest.approx(cosine(steps, planned * steps, warmup, peak), rel=1e-4)
    # Each epoch trains on the cosine fitted at the end of the one before (its row's `epochs`).
    for epoch, row in enumerate(rows[1:], start=1):
        length = rows[epoch - 1]["epochs"]
        expected = cosine((epoch + 1) * steps, length * steps, warmup, peak)
        assert row["learning_rate"] == pytest.approx(expected, rel=1e-4), (epoch, planned, length)
    assert rows[-1]["epochs"] == fitted  # the card records the last fit
    assert card["input"]["normalization"] == "zscore" and len(card["input"]["stats"]["mean"]) == 3
    assert "eta_s" not in metrics["last"] and "eta_s" not in metrics["best"]  # the progress line's, not history's


def csv_rows(path: Path):
    import csv

    with open(path) as f:
        for row in csv.DictReader(f):
            yield {k: float(v) for k, v in row.items()}
