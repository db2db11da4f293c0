"""The workers' training config: every field from the spec or the manifest, frozen, picklable; the epoch state."""

import dataclasses
import json
import pickle

import numpy as np
import pytest

from raysegment.config import TrainSpec
from raysegment.data.prepare import FORMAT_VERSION
from raysegment.errors import DataError
from raysegment.train.checkpoint import TrainState
from raysegment.train.config import TrainConfig, train_config

MANIFEST = {
    "num_classes": 2,
    "class_names": ["background", "cell"],
    "counts": {"train": 50, "val": 5},
    "pixel_frequency": [0.9, 0.1],
}


def config(**fields) -> TrainConfig:
    return train_config(TrainSpec(data="d", out="o", **fields), MANIFEST, "d")


def test_spec_defaults_reach_the_workers():
    """The spec's own defaults, not the reader's: the schedule is cosine unless the spec says otherwise."""
    spec = TrainSpec(data="d", out="o")
    cfg = config()
    assert cfg.schedule == spec.schedule == "cosine"
    assert (cfg.optimizer, cfg.loss, cfg.patience, cfg.class_weights) == ("adam", "ce", None, None)
    assert cfg.model.batch_norm and cfg.model.upsampling == "transpose" and cfg.model.head == "softmax"


def test_spec_knobs_and_manifest_facts():
    cfg = config(
        workers=2,
        batch_size=4,
        learning_rate=0.01,
        repeat=2,
        schedule="step",
        optimizer="sgd",
        momentum=0.9,
        loss="ce+dice",
        class_weights="inverse_frequency",
        head="sigmoid",
        dropout=0.2,
        patience=3,
        seed=5,
    )
    assert cfg.model.num_classes == 2 and cfg.class_names == ("background", "cell")
    assert cfg.global_batch == 8
    assert cfg.steps_per_epoch == 50 * 2 // 8
    assert cfg.peak_learning_rate == pytest.approx(0.01)  # a global batch of 8 keeps the rate
    assert (cfg.schedule, cfg.optimizer, cfg.momentum, cfg.loss) == ("step", "sgd", 0.9, "ce+dice")
    assert cfg.class_weights is not None and cfg.class_weights[1] > cfg.class_weights[0]
    assert (cfg.model.head, cfg.model.dropout, cfg.patience, cfg.seed) == ("sigmoid", 0.2, 3, 5)
    assert config(max_steps=2).steps_per_epoch == 2
    assert config(workers=4, batch_size=4).peak_learning_rate == pytest.approx(2e-3)


@pytest.mark.parametrize(
    ("mixed_precision", "gpus", "policy"),
    [("auto", 0, "float32"), ("auto", 1, "mixed_bfloat16"), ("off", 1, "float32"), ("float16", 0, "mixed_float16")],
)
def test_dtype_policy(mixed_precision, gpus, policy):
    assert config(mixed_precision=mixed_precision, gpus_per_worker=gpus).dtype_policy == policy


def test_frozen_and_picklable():
    cfg = config(class_weights="inverse_frequency")
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "counts", "message"),
    [
        ({"image_size": 40, "depth": 4}, {"train": 50, "val": 5}, "multiple of 2\\*\\*depth"),
        ({"workers": 4, "batch_size": 16}, {"train": 50, "val": 5}, "fewer than one global batch"),
        # No batch size helps an empty train split: the fix is pairs in train (it said "lower --batch-size").
        ({}, {"train": 0, "val": 1}, "no training images \\(1 in val, none in train\\); put pairs in train: "),
        ({}, {"train": 50}, "no validation images; prepare again with --val-keys"),
        # A layout's own splits refuse --val-keys: the fix prepare recorded for it (`layouts.no_val_fix`).
        (
            {"no_val_fix": "put some pairs in val in ImageSets/Segmentation/{train,val}.txt"},
            {"train": 50},
            "in ImageSets",
        ),
    ],
)
def test_data_set_that_cannot_train(fields, counts, message):
    source = {"no_val_fix": fields.pop("no_val_fix")} if "no_val_fix" in fields else {}
    with pytest.raises(DataError, match=message):
        train_config(TrainSpec(data="d", out="o", **fields), {**MANIFEST, **source, "counts": counts}, "d")


def test_encoder_weights_the_driver_does_not_have_are_refused_before_the_run(tmp_path):
    """A path the driver cannot ship failed on every worker after start-up, with h5py's traceback."""
    from raysegment.errors import ConfigError

    with pytest.raises(ConfigError, match="--encoder-weights /nonexistent/w.h5: no such file on this machine"):
        train_config(
            TrainSpec(data="d", out="o", encoder="resnet50", encoder_weights="/nonexistent/w.h5"), MANIFEST, "d"
        )
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"")
    for given in ("imagenet", "none", str(weights)):
        train_config(TrainSpec(data="d", out="o", encoder="resnet50", encoder_weights=given), MANIFEST, "d")


def test_a_data_set_whose_masks_label_no_pixel_is_refused_by_train_and_plan(tmp_path):
    void = {**MANIFEST, "pixel_frequency": [0.0, 0.0], "ignored_pixels": 4096}
    with pytest.raises(DataError, match="no mask labels a pixel \\(4096 pixels are 255"):
        train_config(TrainSpec(data="d", out="o"), void, "d")
    from click.testing import CliRunner

    from raysegment.cli import main

    shards = [
        {"path": f"shards/{s}-00000.parquet", "split": s, "rows": n, "bytes": 1} for s, n in MANIFEST["counts"].items()
    ]
    whole = {**void, "format_version": FORMAT_VERSION, "shards": shards, "palette": [[0, 0, 0], [255, 0, 0]]}
    (tmp_path / "manifest.json").write_text(json.dumps(whole))
    result = CliRunner().invoke(main, ["plan", str(tmp_path)])
    assert result.exit_code == 2 and "no mask labels a pixel" in result.output
    assert not (tmp_path / "plan.json").exists()

    # No val images: train refuses them (the best checkpoint is chosen by val), so plan does too.
    no_val = {**whole, "pixel_frequency": MANIFEST["pixel_frequency"], "counts": {**MANIFEST["counts"], "val": 0}}
    no_val["shards"] = [s for s in shards if s["split"] == "train"]
    (tmp_path / "manifest.json").write_text(json.dumps(no_val))
    result = CliRunner().invoke(main, ["plan", str(tmp_path)])
    assert result.exit_code == 2 and "no validation images" in result.output, result.output
    assert "--val-keys" in result.output  # the fix that works for a data set already split by --val-fraction
    assert not (tmp_path / "plan.json").exists()


def test_optimizer_follows_the_config():
    import keras

    from raysegment.train.optim import learning_rate_schedule, make_optimizer

    assert isinstance(learning_rate_schedule(config()), keras.optimizers.schedules.CosineDecay)
    assert learning_rate_schedule(config(schedule="constant")) == pytest.approx(1e-3 * 16 / 8)
    assert isinstance(make_optimizer(config(mixed_precision="float16")), keras.optimizers.LossScaleOptimizer)
    assert isinstance(make_optimizer(config(optimizer="sgd")), keras.optimizers.SGD)


def test_state_tracks_the_best_epoch_and_patience():
    cm = np.eye(2)
    state = TrainState()
    for epoch, miou in enumerate([0.5, 0.6, 0.55, 0.58]):
        state = state.after_epoch({"epoch": epoch, "val_mean_iou": miou}, cm, patience=2)
        assert state.epoch == epoch and len(state.history) == epoch + 1
    assert (state.best_epoch, state.best_val_mean_iou) == (1, 0.6)
    assert state.stopped_early  # two epochs without a gain
    assert not TrainState().after_epoch({"epoch": 5, "val_mean_iou": 0.1}, cm, patience=None).stopped_early


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--workers", "0"], "field 'workers': Input should be greater than or equal to 1"),
        (["--cpus-per-worker", "0"], "field 'cpus_per_worker': Input should be greater than 0"),
        (["--gpus-per-worker", "-1"], "field 'gpus_per_worker'"),
        (["--time-budget", "-5m"], "field 'time_budget': Input should be greater than 0 (got -300.0)"),
        (["--time-budget", "0"], "field 'time_budget'"),
        (["--time-budget", "forty"], "'forty' is not a duration"),
    ],
)
def test_plan_refuses_the_compute_and_budgets_train_refuses(tmp_path, flags, named):
    """`plan` checks its flags with TrainSpec's bounds, as `train` does: no plan for a run train would refuse
    (--workers 0 was a ZeroDivisionError, a negative budget a plan with -5 minutes)."""
    from click.testing import CliRunner

    from raysegment.cli import main

    out = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["plan", str(tmp_path), *flags, "--out", str(out)])
    assert result.exit_code == 2 and named in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_a_run_is_resumable_by_its_network_data_and_weights_content_not_their_path(tmp_path):
    """The run record named the encoder's weights file by its path (the same file moved blocked a resume),
    and it was written before the first checkpoint (a run stopped before one blocked the next run)."""
    from raysegment import storage
    from raysegment.errors import ConfigError
    from raysegment.models.pretrained import ShippedWeights
    from raysegment.train.trainer import RUN_IDENTITY, check_resumable, run_identity

    def identity(path: str, sha: str) -> dict:
        cfg = config(encoder="resnet50", encoder_weights=path)
        shipped = ShippedWeights("w.weights.h5", sha, None, path)
        return run_identity(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, shipped_weights=shipped)), "h"
        )

    (tmp_path / "a.weights.h5").write_bytes(b"")
    (tmp_path / "b.weights.h5").write_bytes(b"")
    first = identity(str(tmp_path / "a.weights.h5"), "1" * 64)
    assert first == identity(str(tmp_path / "b.weights.h5"), "1" * 64)
    other = identity(str(tmp_path / "a.weights.h5"), "2" * 64)
    assert other != first
    folder = tmp_path / "runs[exp1]" / "train"  # glob characters in OUT: listed, not matched as a pattern
    run = storage.resolve(str(folder))
    storage.write_json(run.child(RUN_IDENTITY), first)
    check_resumable(run, other, "out")  # no checkpoint yet: nothing to resume, nothing refused
    (folder / "checkpoint_000000").mkdir()
    check_resumable(run, first, "out")
    with pytest.raises(ConfigError, match="holds a training run on another network"):
        check_resumable(run, other, "out")
    # A record from before its latest fields (no eight_bit_seen; the weights file by its path) is this run's.
    older = json.loads(json.dumps(first))
    del older["input"]["eight_bit_seen"]
    older["network"]["encoder_weights"] = str(tmp_path / "a.weights.h5")
    storage.write_json(run.child(RUN_IDENTITY), older)
    check_resumable(run, first, "out", str(tmp_path / "a.weights.h5"))
    with pytest.raises(ConfigError, match="another network"):  # the record's file is not the one given now
        check_resumable(run, first, "out", str(tmp_path / "b.weights.h5"))
