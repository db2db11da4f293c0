"""The workers' training config: every field from the spec or the manifest, frozen, picklable; the epoch state."""

import dataclasses
import json
import pickle

import numpy as np
import pytest
from helpers import manifest, untrained_card

from raysegment.config import TrainSpec
from raysegment.errors import DataError
from raysegment.train.checkpoint import TrainState
from raysegment.train.config import TrainConfig, train_config

FIELDS = {
    "num_classes": 2,
    "class_names": ["background", "cell"],
    "counts": {"train": 50, "val": 5},
    "pixel_frequency": [0.9, 0.1],
}
MANIFEST = manifest(**FIELDS)


def config(**fields) -> TrainConfig:
    return train_config(TrainSpec(data="d", out="o", **fields), MANIFEST, "d")


def identity(data_hash: str = "h", shares: list[float] | None = None, **fields) -> dict:
    """The run record `train` writes for a spec with these fields, on MANIFEST's data set (`data_hash`; with
    `shares`, its pixel_frequency: 0.1 is no rare class, 0.05 is one)."""
    from raysegment.train.config import rare_classes
    from raysegment.train.trainer import run_identity

    data = MANIFEST if shares is None else manifest(**{**FIELDS, "pixel_frequency": shares})
    spec = TrainSpec(data="d", out="o", **fields)
    return run_identity(train_config(spec, data, "d"), data_hash, spec, rare_classes(data))


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
        ({}, {"train": 50, "val": 0}, "no validation images; prepare again with --val-keys"),
        # A layout's own splits refuse --val-keys: the fix prepare recorded for it (`layouts.no_val_fix`).
        (
            {"no_val_fix": "put some pairs in val in ImageSets/Segmentation/{train,val}.txt"},
            {"train": 50, "val": 0},
            "in ImageSets",
        ),
    ],
)
def test_data_set_that_cannot_train(fields, counts, message):
    source = {"no_val_fix": fields.pop("no_val_fix")} if "no_val_fix" in fields else {}
    with pytest.raises(DataError, match=message):
        train_config(TrainSpec(data="d", out="o", **fields), manifest(**{**FIELDS, **source, "counts": counts}), "d")


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


def test_encoder_weights_that_are_not_the_encoders_are_one_line_before_ray_train_and_out(tmp_path):
    """A weights file that is not HDF5 (a failed download) or of another backbone: Ray Train started, every
    worker failed in h5py, and the CLI printed a 66-line traceback (exit 1), leaving a run record in OUT."""
    import keras

    from raysegment.errors import ConfigError
    from raysegment.models.encoders import backbone
    from raysegment.train.trainer import train

    text = tmp_path / "wrong.weights.h5"
    text.write_text("<html>404 Not Found</html>")
    small = tmp_path / "small.weights.h5"
    backbone("mobilenetv3small", None).save_weights(str(small))
    keras.backend.clear_session()
    config(encoder="mobilenetv3small", encoder_weights=str(small)).model.check_weights()  # its own: loads
    with pytest.raises(ConfigError, match="small.weights.h5: not a Keras weights file for mobilenetv3large"):
        config(encoder="mobilenetv3large", encoder_weights=str(small)).model.check_weights()
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST.to_json()))
    out = tmp_path / "out"
    spec = TrainSpec(
        data=str(tmp_path), out=str(out), plan=False, encoder="mobilenetv3small", encoder_weights=str(text)
    )
    with pytest.raises(ConfigError) as refused:
        train(spec)
    assert str(refused.value).startswith(f"--encoder-weights {text}: not a Keras weights file for mobilenetv3small (")
    assert "\n" not in str(refused.value)
    assert not out.exists() or not any(out.iterdir())  # nothing in OUT: no run record, no checkpoint folder


def test_a_data_set_whose_masks_label_no_pixel_is_refused_by_train_and_plan(tmp_path):
    void = manifest(**{**FIELDS, "pixel_frequency": [0.0, 0.0], "ignored_pixels": 4096})
    with pytest.raises(DataError, match="no mask labels a pixel \\(4096 pixels are 255"):
        train_config(TrainSpec(data="d", out="o"), void, "d")
    from click.testing import CliRunner

    from raysegment.cli import main

    (tmp_path / "manifest.json").write_text(json.dumps(void.to_json()))
    result = CliRunner().invoke(main, ["plan", str(tmp_path)])
    assert result.exit_code == 2 and "no mask labels a pixel" in result.output
    assert not (tmp_path / "plan.json").exists()

    # No val images: train refuses them (the best checkpoint is chosen by val), so plan does too.
    no_val = manifest(**{**FIELDS, "counts": {"train": 50, "val": 0}})
    (tmp_path / "manifest.json").write_text(json.dumps(no_val.to_json()))
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
    from raysegment.train.trainer import RUN_IDENTITY, RunFolder, check_resumable, run_identity

    def weights_identity(path: str, sha: str) -> dict:
        spec = TrainSpec(data="d", out="o", encoder="resnet50", encoder_weights=path)
        cfg = train_config(spec, MANIFEST, "d")
        shipped = ShippedWeights("w.weights.h5", sha, None, path)
        return run_identity(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, shipped_weights=shipped)), "h", spec, ()
        )

    (tmp_path / "a.weights.h5").write_bytes(b"")
    (tmp_path / "b.weights.h5").write_bytes(b"")
    first = weights_identity(str(tmp_path / "a.weights.h5"), "1" * 64)
    assert first == weights_identity(str(tmp_path / "b.weights.h5"), "1" * 64)
    other = weights_identity(str(tmp_path / "a.weights.h5"), "2" * 64)
    assert other != first
    folder = tmp_path / "runs[exp1]" / "train"  # glob characters in OUT: listed, not matched as a pattern
    run = storage.resolve(str(folder))
    storage.write_json(run.child(RUN_IDENTITY), first)
    check_resumable(RunFolder.read(run), other, "out")  # no checkpoint yet: nothing to resume, nothing refused
    (folder / "checkpoint_000000").mkdir()
    check_resumable(RunFolder.read(run), first, "out")
    with pytest.raises(ConfigError, match="holds a training run on another network"):
        check_resumable(RunFolder.read(run), other, "out")
    # A record from before its latest fields (no eight_bit_seen; the weights file by its path) is this run's.
    older = json.loads(json.dumps(first))
    del older["input"]["eight_bit_seen"]
    older["network"]["encoder_weights"] = str(tmp_path / "a.weights.h5")
    storage.write_json(run.child(RUN_IDENTITY), older)
    check_resumable(RunFolder.read(run), first, "out", str(tmp_path / "a.weights.h5"))
    with pytest.raises(ConfigError, match="another network"):  # the record's file is not the one given now
        check_resumable(RunFolder.read(run), first, "out", str(tmp_path / "b.weights.h5"))


def test_a_resume_takes_the_newest_complete_checkpoint_not_rays_lagging_latest(tmp_path):
    """Stopped just after a checkpoint was written, Ray's snapshot did not list it: the re-run resumed from
    the one before and trained the epoch shown as done again. The newest complete one is taken now; a torn
    one (no state.json) and a damaged one are passed over, the damaged one named."""
    import ray.train

    from raysegment.train.checkpoint import restore, save_checkpoint
    from raysegment.train.optim import learning_rate_schedule, make_optimizer

    cfg = config(image_size=32, depth=2, base_filters=4)
    model = cfg.model.build()
    optimizer = make_optimizer(cfg, learning_rate_schedule(cfg))
    optimizer.build(model.trainable_variables)
    run = tmp_path / "train"

    def written(second: int, epoch: int):
        folder = run / f"checkpoint_2026-01-01_00-00-0{second}.000000"
        folder.mkdir(parents=True)
        save_checkpoint(str(folder), model, optimizer, TrainState(epoch=epoch, best_epoch=epoch))
        return folder

    written(1, 1)
    listed = written(2, 2)  # Ray's latest, by its snapshot
    newest = written(3, 3)  # complete on disk, not in the snapshot yet
    (written(4, 4) / "state.json").unlink()  # torn by the stop: no state
    damaged = written(5, 5)
    (damaged / "model.weights.h5").write_bytes(b"partial")
    state = restore(ray.train.Checkpoint(str(listed)), model, optimizer)
    assert state.epoch == 3 and state.resumes[-1]["checkpoint"] == str(newest)
    assert state.resumes[-1]["from_epoch"] == 3
    assert [s.split(":")[0] for s in state.resumes[-1]["skipped"]] == [str(damaged)]

    # Ray's record of the checkpoints shares their prefix: it is no checkpoint, never one to remove.
    from raysegment import storage
    from raysegment.train.trainer import _checkpoint_dirs

    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert _checkpoint_dirs(storage.resolve(str(run))) == sorted(p.name for p in run.iterdir() if p.is_dir())

    # The model is written from the best checkpoint Ray keeps, never one the resume found damaged (Ray still
    # lists it with the metrics it had), and the later epoch on a tie.
    from raysegment.train.trainer import best_checkpoint

    def ckpt(folder, epoch: int, miou: float):
        return ray.train.Checkpoint(str(folder)), {"epoch": epoch, "val_mean_iou": miou}

    kept = [ckpt(listed, 2, 0.5), ckpt(newest, 3, 0.5), ckpt(damaged, 5, 0.9)]
    result = ray.train.Result(metrics={}, checkpoint=kept[1][0], error=None, path=str(run), best_checkpoints=kept)
    chosen, metrics = best_checkpoint(result, state)
    assert chosen.path == str(newest) and metrics["epoch"] == 3


def test_a_run_is_resumed_or_kept_only_with_its_own_training_options(tmp_path):
    """Resumed with another learning rate (or workers: the global batch) the run went on silently, one history
    and card for two runs; a finished run re-run with more epochs trained none and recorded the new flags."""
    from raysegment import storage
    from raysegment.errors import ConfigError
    from raysegment.registry import _train_lines, _train_payload
    from raysegment.train.trainer import RUN_IDENTITY, RunFolder, check_resumable, finished_run

    folder = tmp_path / "out" / "train"
    run = storage.resolve(str(folder))
    first = identity()
    storage.write_json(run.child(RUN_IDENTITY), first)
    (folder / "checkpoint_000000").mkdir()
    check_resumable(RunFolder.read(run), first, "out")
    lr = identity(learning_rate=0.05)
    with pytest.raises(ConfigError, match=r"^out: holds an unfinished training run with other training options "):
        check_resumable(RunFolder.read(run), lr, "out")
    with pytest.raises(ConfigError, match=r"\(workers 2 there, 1 now; .*--no-resume to start over"):
        check_resumable(RunFolder.read(run), identity(workers=1), "out")
    with pytest.raises(ConfigError, match=r"finished training run with other training options \(epochs 10 there, 40"):
        check_resumable(RunFolder.read(run), identity(epochs=40), "out", finished=True)
    with pytest.raises(ConfigError, match=r"time_budget_s None there, 60.0 now.*--no-resume"):
        check_resumable(RunFolder.read(run), identity(time_budget=60), "out", finished=True)
    with pytest.raises(ConfigError, match="another data set"):  # the data set still named as before
        check_resumable(RunFolder.read(run), identity("other", learning_rate=0.05), "out")
    # 1.1h and 66m are one budget, though their floats differ in the last bit.
    assert identity(time_budget=1.1 * 3600) == identity(time_budget=3960.0)
    older = {k: v for k, v in first.items() if k not in ("record", "training")}  # before the training options
    storage.write_json(run.child(RUN_IDENTITY), older)
    check_resumable(RunFolder.read(run), lr, "out")  # resumed as before

    # A finished run (its _SUCCESS, metrics and card, and its checkpoints) is kept: one line, nothing trained.
    out = storage.resolve(str(tmp_path / "out"))
    assert finished_run(out, RunFolder.read(run)) is None
    best = {"epoch": 20, "val_mean_iou": 0.99334, "val_pixel_accuracy": 0.998}
    storage.write_json(out.child("metrics.json"), {"best": best, "last": best, "epochs_run": 26})
    card = untrained_card()
    card.write(out)
    assert finished_run(out, RunFolder.read(run)) is None  # no _SUCCESS: stopped, or training now
    storage.mark_success(out, {"model_id": card.model_id})
    # Recorded without training options (an older version): nothing shows these were its options, so it is
    # resumed as before, not kept whatever the flags.
    assert finished_run(out, RunFolder.read(run)) is None
    storage.write_json(run.child(RUN_IDENTITY), first)
    done = finished_run(out, RunFolder.read(run))
    assert done is not None and done.already_trained and done.card == card
    assert _train_lines(None, done) == [
        f"{out.uri}: already trained (26 epochs, best epoch 21, val mIoU 0.9933); nothing to do — pass "
        "--no-resume to train again"
    ]
    payload = _train_payload(None, done)
    assert payload["already_trained"] and payload["model_id"] == card.model_id and payload["best"] == best


def test_the_run_folder_is_read_once_for_both_start_up_checks(tmp_path):
    """finished_run and check_resumable each listed the checkpoints and read raysegment-run.json: train reads the
    run folder once (`RunFolder`) and both judge that one reading, as each judged its own before."""
    from raysegment import storage
    from raysegment.errors import ConfigError
    from raysegment.train.trainer import RUN_IDENTITY, RunFolder, check_resumable, finished_run

    out = storage.resolve(str(tmp_path / "out"))
    run = out.child("train")
    first = identity()
    storage.write_json(run.child(RUN_IDENTITY), first)
    assert RunFolder.read(run) == RunFolder(run, [])  # a record without a checkpoint: no run to resume or keep
    (tmp_path / "out" / "train" / "checkpoint_000000").mkdir()
    best = {"epoch": 3, "val_mean_iou": 0.5, "val_pixel_accuracy": 0.9}
    storage.write_json(out.child("metrics.json"), {"best": best, "last": best, "epochs_run": 4})
    untrained_card().write(out)
    storage.mark_success(out, {"model_id": untrained_card().model_id})
    folder = RunFolder.read(run)
    assert (folder.checkpoints, folder.record_beside_checkpoint, folder.record) == (["checkpoint_000000"], True, first)
    # Both judge what was read: neither reads the run folder again (it is gone since).
    storage.remove_tree(run)
    done = finished_run(out, folder)
    assert done is not None and done.already_trained
    check_resumable(folder, first, "out", finished=True)
    with pytest.raises(ConfigError, match=r"finished training run with other training options \(epochs 10 there, 40"):
        check_resumable(folder, identity(epochs=40), "out", finished=True)
    assert finished_run(out, RunFolder.read(run)) is None  # read now: no checkpoint left
    # A record that cannot be read, beside a checkpoint: no finished run, and another run's (refused).
    (tmp_path / "out" / "train" / "checkpoint_000001").mkdir(parents=True)
    storage.write_bytes(run.child(RUN_IDENTITY), b"{not json")
    folder = RunFolder.read(run)
    assert folder.record_beside_checkpoint and folder.record is None
    assert finished_run(out, folder) is None
    with pytest.raises(ConfigError, match=r"^out: holds a training run on another .*--no-resume to start over"):
        check_resumable(folder, first, "out")


def test_a_run_is_resumed_only_with_its_own_augmentation_seed_and_precision(tmp_path):
    """The run record held neither the augmentation, the seed nor the mixed precision: a re-run with other
    ones went on from the checkpoint silently, two runs in one history and card (and floats were compared to
    the tenth: a learning rate of 0.001 was 0.002's)."""
    from raysegment import storage
    from raysegment.errors import ConfigError
    from raysegment.train.trainer import RUN_IDENTITY, RunFolder, check_resumable

    folder = tmp_path / "out" / "train"
    run = storage.resolve(str(folder))
    first = identity(brightness=0.1)
    storage.write_json(run.child(RUN_IDENTITY), first)
    (folder / "checkpoint_000000").mkdir()
    check_resumable(RunFolder.read(run), identity(brightness=0.1), "out")
    unfinished = r"^out: holds an unfinished training run with other training options \("
    with pytest.raises(ConfigError, match=unfinished + r"augmentation.brightness 0.1 there, 0.12 now\): resumed"):
        check_resumable(RunFolder.read(run), identity(brightness=0.12), "out")
    with pytest.raises(ConfigError, match=unfinished + r"augmentation on there, off now\)"):
        check_resumable(RunFolder.read(run), identity(brightness=0.1, augment=False), "out")
    flips = r"\(augmentation.flip both there, none now; augmentation.rotate90 True there, False now\)"
    with pytest.raises(ConfigError, match=flips):
        check_resumable(RunFolder.read(run), identity(brightness=0.1, flip="none", rotate90=False), "out")
    with pytest.raises(ConfigError, match=r"\(steps_per_epoch 3 there, 6 now; repeat 1 there, 2 now\)"):
        check_resumable(RunFolder.read(run), identity(brightness=0.1, repeat=2), "out")
    with pytest.raises(ConfigError, match=unfinished + r"seed 0 there, 7 now\)"):
        check_resumable(RunFolder.read(run), identity(brightness=0.1, seed=7), "out")
    with pytest.raises(ConfigError, match=unfinished + r"dtype_policy float32 there, mixed_float16 now\)"):
        check_resumable(RunFolder.read(run), identity(brightness=0.1, mixed_precision="float16"), "out")
    with pytest.raises(ConfigError, match=r"\(peak_learning_rate 0.002 there, 0.004 now\)"):
        check_resumable(RunFolder.read(run), identity(brightness=0.1, learning_rate=0.002), "out")
    finished = r"^out: holds a finished training run with other training options \("
    crop = r"augmentation.crop resize there, random now; augmentation.elastic 0.0 there, 4.0 now\)"
    with pytest.raises(ConfigError, match=finished + crop):
        check_resumable(RunFolder.read(run), identity(brightness=0.1, crop="random", elastic=4.0), "out", finished=True)
    # A native-scale model is another input (it is run at full resolution): named once, as the input.
    with pytest.raises(ConfigError, match=r"^out: holds a training run on another input \(its checkpoints") as exc:
        check_resumable(RunFolder.read(run), identity(brightness=0.1, crop="native"), "out")
    assert "training options" not in str(exc.value) and "crop" not in str(exc.value)


def test_the_record_holds_the_augmentation_that_takes_effect(tmp_path):
    """The record held the spec's raw augmentation fields: with `augment: false` another brightness refused the
    resume, and `oversample` counted though no class was rare enough for it (`Augmentation.from_spec`)."""
    from raysegment import storage
    from raysegment.errors import ConfigError
    from raysegment.train.trainer import RUN_IDENTITY, RunFolder, check_resumable

    assert identity(augment=False, brightness=0.1, crop="random") == identity(augment=False, brightness=0.3)
    assert identity(augment=False)["training"]["augmentation"] is None
    assert identity(flip="auto") == identity(flip="both")  # no plan resolved it: both axes
    assert identity(oversample=0.5) == identity(oversample=0.0)  # no rare class: no window is centred on one
    assert identity(oversample=0.5, shares=[0.95, 0.05]) != identity(oversample=0.0, shares=[0.95, 0.05])
    assert identity(shares=[0.95, 0.05]) == identity()  # a rare class without oversample: none centred on it
    augmentation = identity(oversample=0.5, shares=[0.95, 0.05])["training"]["augmentation"]
    assert (augmentation["oversample"], augmentation["rare_classes"], augmentation["flip"]) == (0.5, [1], "both")

    folder = tmp_path / "out" / "train"
    run = storage.resolve(str(folder))
    storage.write_json(run.child(RUN_IDENTITY), identity(augment=False, brightness=0.1))
    (folder / "checkpoint_000000").mkdir()
    check_resumable(RunFolder.read(run), identity(augment=False, brightness=0.3), "out")
    with pytest.raises(ConfigError, match=r"\(augmentation off there, on now\)"):
        check_resumable(RunFolder.read(run), identity(brightness=0.3), "out")
    storage.write_json(run.child(RUN_IDENTITY), identity(shares=[0.95, 0.05]))
    oversampled = r"\(augmentation.oversample 0.0 there, 0.5 now; augmentation.rare_classes \[\] there, \[1\] now\)"
    with pytest.raises(ConfigError, match=oversampled):
        check_resumable(RunFolder.read(run), identity(oversample=0.5, shares=[0.95, 0.05]), "out")


def test_a_record_of_the_previous_version_resumes_and_is_kept_as_before(tmp_path):
    """A run finished under the previous release (its record without the augmentation, seed or precision, and
    without a version) was trained again by the same command: `_SUCCESS` removed, model.keras rewritten with a
    new model_id. Its floats were recorded to the tenth: another learning rate read `0.0 there`, the real
    value nowhere, and a record's missing seed was what marked that rounding."""
    from raysegment import storage
    from raysegment.errors import ConfigError
    from raysegment.train.trainer import RUN_IDENTITY, RUN_RECORD, RunFolder, check_resumable, finished_run

    first = identity(learning_rate=0.0005)
    assert first["record"] == RUN_RECORD == 2 and first["training"]["peak_learning_rate"] == 0.001
    older = json.loads(json.dumps(first))  # as the previous release wrote it
    del older["record"]
    for key in ("seed", "dtype_policy", "repeat", "augmentation"):
        del older["training"][key]
    older["training"]["peak_learning_rate"] = 0.0
    folder = tmp_path / "out" / "train"
    run = storage.resolve(str(folder))
    storage.write_json(run.child(RUN_IDENTITY), older)
    (folder / "checkpoint_000000").mkdir()
    # What it lacks is this run's, and a float that is this run's to the tenth is this run's.
    check_resumable(
        RunFolder.read(run), identity(learning_rate=0.0005, brightness=0.3, seed=7, mixed_precision="float16"), "out"
    )
    check_resumable(RunFolder.read(run), identity(learning_rate=0.001), "out")
    with pytest.raises(ConfigError, match=r"\(epochs 10 there, 40 now\)"):  # what it did record is compared
        check_resumable(RunFolder.read(run), identity(learning_rate=0.0005, epochs=40), "out")
    with pytest.raises(ConfigError, match=r"\(peak_learning_rate 0.0 \(recorded to 0.1\) there, 0.1 now\)"):
        check_resumable(RunFolder.read(run), identity(learning_rate=0.05), "out")
    # Finished, it is kept (one line, nothing trained) when the options it recorded are this run's.
    out = storage.resolve(str(tmp_path / "out"))
    best = {"epoch": 3, "val_mean_iou": 0.5, "val_pixel_accuracy": 0.9}
    storage.write_json(out.child("metrics.json"), {"best": best, "last": best, "epochs_run": 4})
    untrained_card().write(out)
    storage.mark_success(out, {"model_id": untrained_card().model_id})
    done = finished_run(out, RunFolder.read(run))
    assert done is not None and done.already_trained
    check_resumable(RunFolder.read(run), identity(learning_rate=0.0005, brightness=0.3), "out", finished=True)
    with pytest.raises(ConfigError, match=r"^out: holds a finished training run with other .*\(epochs 10 there"):
        check_resumable(RunFolder.read(run), identity(learning_rate=0.0005, epochs=40), "out", finished=True)
    # Today's version is compared as recorded: no seed is no marker of rounded floats any more.
    storage.write_json(run.child(RUN_IDENTITY), {**older, "record": RUN_RECORD})
    with pytest.raises(
        ConfigError, match=r"peak_learning_rate 0.0 there, 0.001 now; dtype_policy None there, float32 now; seed None"
    ):
        check_resumable(RunFolder.read(run), first, "out")


def test_a_resume_trains_no_epoch_past_an_early_stop():
    """A run resumed from the checkpoint of the epoch that stopped it (patience, or the budget) trained one
    more epoch (a run that stopped before its `_SUCCESS`)."""
    from raysegment.train.loop import more_epochs

    cfg = config(epochs=10)
    state = TrainState().after_epoch({"epoch": 4, "val_mean_iou": 0.5}, np.eye(2), patience=None)
    assert more_epochs(state, cfg)
    assert not more_epochs(state.stopped_at_budget(), cfg)
    assert not more_epochs(dataclasses.replace(state, stopped_early=True, stopped_by="patience"), cfg)
    assert not more_epochs(dataclasses.replace(state, epoch=9), cfg)
    assert not more_epochs(dataclasses.replace(state, fitted_epochs=5), cfg)


def test_a_run_ray_train_ends_short_of_its_epochs_without_an_error_is_refused(tmp_path):
    """Ray Train ended a run "successfully" after epoch 1 of 2 when a worker was lost after its training function
    returned and before the controller took its last report (1 run in 3 of test_train's kill, with 2 epochs): train
    then wrote epoch 1's model as the run's, `epochs_run` 1, exit 0. Now that is exit 3 naming the resume."""
    from raysegment import storage
    from raysegment.errors import JobError
    from raysegment.train.trainer import check_all_epochs

    out = storage.resolve(str(tmp_path))
    cfg = config(epochs=2)
    one = TrainState().after_epoch({"epoch": 0, "val_mean_iou": 0.5}, np.eye(2), None)
    with pytest.raises(JobError, match=r"ended the run after epoch 1 of 2 without an error .* resumes from the last"):
        check_all_epochs(out, one, cfg)
    assert JobError.exit_code == 3
    check_all_epochs(out, one.after_epoch({"epoch": 1, "val_mean_iou": 0.4}, np.eye(2), None), cfg)  # all run
    check_all_epochs(out, dataclasses.replace(one, stopped_early=True, stopped_by="patience"), cfg)  # stopped
    check_all_epochs(out, dataclasses.replace(one, fitted_epochs=1), cfg)  # the budget fitted one epoch
