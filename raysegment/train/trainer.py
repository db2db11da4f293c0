"""`train`: wire the data set, Ray Train's trainer and artifacts together (driver side)."""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import os
import posixpath
import signal
import tempfile
import threading
import time
from typing import Any

import numpy as np
import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from raysegment import __version__, logs, overlay, plots, progress, storage
from raysegment import plan as planning
from raysegment.config import TrainSpec
from raysegment.data.classes import manifest_warnings
from raysegment.data.examples import NATIVE_VAL, Augmentation, native_validation
from raysegment.data.manifest import Manifest, read_manifest
from raysegment.data.pipeline import padded_for_workers, training_dataset
from raysegment.errors import ConfigError, JobError, StorageError
from raysegment.evaluate import TTA_MIN_GAIN, measure_tta
from raysegment.models.card import (
    CARD_FILE,
    CONFUSION_FILE,
    CURVES_FILE,
    EXAMPLES_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TENSORBOARD_DIR,
    InferenceAdvice,
    ModelCard,
    TrainingPlan,
)
from raysegment.train import events, tracking
from raysegment.train.backend import TFClusterConfig
from raysegment.train.checkpoint import CHECKPOINT_WEIGHTS, TrainState, file_sha256, read_state
from raysegment.train.config import TrainConfig, rare_classes, train_config
from raysegment.train.loop import more_epochs, train_loop_per_worker

log = logging.getLogger(__name__)

HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "val_pixel_accuracy",
    "val_mean_iou",
    "val_mean_dice",
    "learning_rate",
    "images_per_second",
    "epoch_seconds",
    "epochs",  # the run's length as known at the epoch's end (a time budget re-fits it)
)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns: OUT, the model's card and metrics.json; `already_trained`: the finished run in OUT
    had these options, so nothing was trained (`finished_run`). The JSON result is `registry._train_payload`'s."""

    out: str
    card: ModelCard
    metrics: dict[str, Any]  # metrics.json as written
    mlflow_run_id: str | None = None
    already_trained: bool = False


def history_csv(history: list[dict[str, Any]]) -> bytes:
    """Per-epoch metrics as CSV, one row per epoch."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue().encode()


def validation_dataset(
    data_loc: storage.Location, manifest: Manifest, spec: TrainSpec, cfg: TrainConfig, grid: bool = True
):
    """The val split as training sees it: no augmentation; for native-scale models, windows at the images'
    scale, a grid covering the largest image (`grid`; else the central window, as examples.png shows)."""
    return training_dataset(
        data_loc, manifest, "val", spec.image_size, augment=val_windows(manifest, spec, grid), norm=cfg.model_input
    )


def val_windows(manifest: Manifest, spec: TrainSpec, grid: bool = True) -> Augmentation | None:
    """How val images become windows: None (resized whole) unless the model is native-scale. The grid comes
    from the largest image in the manifest's fingerprint (a data set prepared before fingerprints: one
    central window, as then)."""
    if spec.crop != "native":
        return None
    fingerprint = manifest.fingerprint or {}
    try:
        high, wide = int(fingerprint["height"]["max"]), int(fingerprint["width"]["max"])
    except (KeyError, TypeError, ValueError):
        high = wide = 0
    return native_validation(spec.image_size, high, wide) if grid else NATIVE_VAL


def val_rows(manifest: Manifest, spec: TrainSpec) -> int:
    """The val dataset's rows: windows per image (native-scale models) times the val images."""
    windows = val_windows(manifest, spec)
    per_image = windows.grid[0] * windows.grid[1] if windows is not None else 1
    return manifest.counts.val * per_image


def validation_examples(model, spec: TrainSpec, manifest: Manifest, cfg: TrainConfig, count: int = 8) -> bytes:
    """image | ground truth | prediction for the first validation images, as a PNG grid."""
    from raysegment.models.losses import probabilities

    data_loc = storage.resolve(spec.data, spec.endpoint_url)
    val = validation_dataset(data_loc, manifest, spec, cfg, grid=False)  # one window per image: more images
    batch = val.take_batch(count, batch_format="numpy")
    pred = np.argmax(probabilities(model(batch["image"], training=False)).numpy(), axis=-1)
    # The model's input is normalised (z-scores): each image stretched to its own min..max to be seen.
    shown = [(x - x.min()) / max(float(x.max() - x.min()), 1e-6) for x in batch["image"]]
    return overlay.example_grid(list(zip(shown, batch["mask"], pred)), manifest.palette)


def tta_advice(out: storage.Location, spec: TrainSpec, manifest: Manifest) -> InferenceAdvice:
    """Whether flip TTA pays for the model in OUT: its val mIoU without and with it (`evaluate.measure_tta`)."""
    advice = measure_tta(out.uri, storage.resolve(spec.data, spec.endpoint_url), manifest, spec.endpoint_url)
    plain, tta = advice.val_mean_iou["plain"], advice.val_mean_iou["tta"]
    progress.note(
        f"train: flip TTA ({', '.join(advice.flips)}) on {advice.images} val images: mIoU {plain:.4f} plain, "
        f"{tta:.4f} with it: {'on' if advice.tta_flip else 'off'} by default (gain >= {TTA_MIN_GAIN} turns it on)"
    )
    return advice


def train(spec: TrainSpec) -> TrainResult:
    """Run distributed training and write OUT/model.keras, model.json and metrics.json."""
    t0 = time.time()
    if spec.mlflow_uri:
        # A missing MLflow package, a URI the installed client refuses or a tracking server that does not answer
        # (within seconds) is one ConfigError here, before any work.
        tracking.check_tracking(spec.mlflow_uri)
    data_loc, manifest = read_manifest(spec.data, spec.endpoint_url)
    out = storage.resolve(spec.out, spec.endpoint_url)
    storage.check_writable(out)
    for warning in manifest_warnings(manifest):
        progress.warn(log, "train", warning)
    spec, plan_record = apply_plan(spec, data_loc, manifest)
    fingerprint = planning.read_fingerprint(data_loc, manifest) if spec.normalization != "scale_0_1" else None
    # With a time budget the first epoch's measured time sets the epochs: any number where the plan chose them.
    from_budget = plan_record is not None and "epochs" in plan_record.auto
    # An encoder's weights file on the driver goes to the workers through Ray's object store.
    cfg = train_config(spec, manifest, data_loc.uri, from_budget, fingerprint)
    cfg.model.check_weights()  # a weights file that is not the encoder's: one line, before Ray Train and OUT
    cfg = dataclasses.replace(cfg, model=cfg.model.ship_weights())
    identity = run_identity(cfg, manifest.content_hash, spec, rare_classes(manifest))
    if spec.resume:
        folder = RunFolder.read(out.child(spec.name))  # read once, for both
        finished = finished_run(out, folder)
        check_resumable(folder, identity, spec.out, cfg.model.encoder_weights, finished is not None)
        if finished is not None:
            return finished  # trained with these options already: model.keras (its model_id) stays as it is
    # The MLflow run (with --mlflow-uri) exists from here, before OUT changes (a store that refuses it is a
    # refusal too): FINISHED once the artifacts are logged, else FAILED.
    with tracking.mlflow_run(spec, plan_record) as run:
        logs.began()  # past the refusals: from here OUT changes
        # A stale artifact must not pass for this run's result while it trains.
        storage.remove_success(out)
        # Each epoch goes to TensorBoard (and MLflow) as the driver learns that it finished.
        live = tracking.LiveLog(out.child(TENSORBOARD_DIR), run)
        with live, events.follow(cfg.epochs, live.rows) as inbox:
            result = fit(spec, out, cfg, training_datasets(spec, data_loc, manifest, cfg), inbox, identity)
        if result.error:
            raise result.error
        with result.checkpoint.as_directory() as d:
            state = read_state(d)
        check_all_epochs(out, state, cfg)
        progress.note(f"train: writing the model, its card and plots to {out.uri}")
        best_ckpt, best_metrics = best_checkpoint(result, state)  # each resume was noted as it happened (events)
        # The history's row of that epoch: what the epoch reported also holds the progress line's ETA.
        best_row = next((row for row in state.history if row["epoch"] == best_metrics["epoch"]), best_metrics)
        summary = write_artifacts(out, spec, manifest, cfg, best_ckpt, best_row, state, time.time() - t0, plan_record)
        try:  # the model is written and marked: a store that refuses a delete costs only disk
            remove_untracked_checkpoints(out.child(spec.name), result)
        except (StorageError, OSError) as exc:
            log.warning("train: checkpoints Ray Train does not track were not removed: %s", exc)
        live.finish(out, state.history, summary)
    return summary if run is None else dataclasses.replace(summary, mlflow_run_id=run.run_id)


def check_all_epochs(out: storage.Location, state: TrainState, cfg: TrainConfig) -> None:
    """Refuse a run Ray Train ended without an error short of its epochs (not stopped early): seen when a worker
    was lost after its training function returned, before the controller took its last report, which then never
    completed. Nothing is written as the model; the checkpoints stay in OUT for the resume."""
    if more_epochs(state, cfg):
        raise JobError(
            f"{out.uri}: Ray Train ended the run after epoch {state.epoch + 1} of {state.fitted_epochs or cfg.epochs} "
            "without an error (a worker lost as it finished); run the same command again: it resumes from the last "
            "checkpoint"
        )


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """OUT's run folder as train finds it, read once at start-up for `finished_run` and `check_resumable`: its
    checkpoint_* folders (`_checkpoint_dirs`) and its record (RUN_IDENTITY) of what they were trained on."""

    run_dir: storage.Location
    checkpoints: list[str]
    # RUN_IDENTITY is there beside a checkpoint (not looked for without one: a record alone is no run to resume)
    record_beside_checkpoint: bool = False
    record: Any = None  # its JSON; None when there is none or it cannot be read

    @classmethod
    def read(cls, run_dir: storage.Location) -> RunFolder:
        checkpoints = _checkpoint_dirs(run_dir)
        loc = run_dir.child(RUN_IDENTITY)
        if not (checkpoints and storage.exists(loc)):
            return cls(run_dir, checkpoints)
        try:
            return cls(run_dir, checkpoints, True, storage.read_json(loc))
        except StorageError:
            return cls(run_dir, checkpoints, True)


def finished_run(out: storage.Location, folder: RunFolder) -> TrainResult | None:
    """What a finished run in OUT recorded (its card and metrics, as `train` returns them, `already_trained`),
    or None: a run is finished when OUT has its _SUCCESS (train removes it first) and, in its run folder as
    read (`folder`), checkpoints."""
    try:
        # Read, not listed: a listing cached before the marker went (s3fs's) would still show it.
        success = storage.read_json(out.child(storage.SUCCESS))
        metrics = storage.read_json(out.child(METRICS_FILE))
        card = ModelCard.model_validate(storage.read_json(out.child(CARD_FILE)))
        _ = (metrics["best"]["epoch"], metrics["best"]["val_mean_iou"], metrics["epochs_run"])
        if success["model_id"] != card.model_id or not folder.checkpoints:
            return None
        # Only a run that recorded its training options can show that it had these: a record without them (or
        # none) would call any options "the same"; such a run is resumed, as before. One recorded before some
        # of them (the augmentation, seed, precision) is kept when those it has are this run's
        # (`check_resumable`, as it resumes): it was "already trained" under the release that wrote it.
        if not (isinstance(folder.record, dict) and isinstance(folder.record.get("training"), dict)):
            return None
    except (StorageError, OSError, KeyError, TypeError, ValueError):
        return None  # no _SUCCESS (stopped, or training now), or not what train writes: train (over it)
    return TrainResult(out.uri, card, metrics, already_trained=True)


def _checkpoint_dirs(run_dir: storage.Location) -> list[str]:
    """The names of the run folder's checkpoint_* folders (listed, not globbed: an OUT named runs/[exp1] is
    no pattern); none when the folder does not exist. Folders only: Ray's own record of them,
    checkpoint_manager_snapshot.json, shares the prefix (removed with the "untracked", the next run resumed
    nothing)."""
    if not storage.exists(run_dir):
        return []
    entries = run_dir.call(lambda: run_dir.fs.ls(run_dir.path, detail=True))
    names = (posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")
    return sorted(n for n in names if n.startswith("checkpoint_"))


def best_checkpoint(result: ray.train.Result, state: TrainState) -> tuple[ray.train.Checkpoint, dict[str, Any]]:
    """The checkpoint the model is written from: the best val mIoU among those Ray Train keeps and those this
    run resumed from, the later epoch on a tie; never one a resume found damaged (Ray still lists it, with
    the metrics it had: its weights failed to load, or worse, loaded wrong)."""
    damaged = {p.rstrip("/") for resume in state.resumes for p in resume.get("skipped_paths", [])}
    kept = [
        cm
        for cm in [*result.best_checkpoints, *resumed_checkpoints(result, state)]
        if cm[0].path.rstrip("/") not in damaged
    ]
    return max(kept, key=lambda cm: (cm[1]["val_mean_iou"], cm[1].get("epoch", -1)))


def resumed_checkpoints(result: ray.train.Result, state: TrainState) -> list[tuple[ray.train.Checkpoint, dict]]:
    """The checkpoints this run resumed from that Ray Train does not track, with their epochs' metrics: one
    written just before an interrupt is on disk, complete, but missing from Ray's snapshot (`restore` takes
    it up), so Ray never weighs it for the best."""
    tracked = _tracked(result)
    rows = {row["epoch"]: row for row in state.history}
    found = []
    for resume in state.resumes:
        path = resume["checkpoint"].rstrip("/")
        if path not in tracked and resume["from_epoch"] in rows:
            checkpoint = ray.train.Checkpoint(path, filesystem=result.checkpoint.filesystem)
            if checkpoint.filesystem.get_file_info(path).type.name == "Directory":
                found.append((checkpoint, rows[resume["from_epoch"]]))
    return found


def _tracked(result: ray.train.Result) -> set[str]:
    """The paths of the checkpoints Ray Train tracks: those it keeps by val mIoU, and its latest."""
    return {c.path.rstrip("/") for c, _ in result.best_checkpoints} | {result.checkpoint.path.rstrip("/")}


def remove_untracked_checkpoints(run_dir: storage.Location, result: ray.train.Result) -> None:
    """Once the model is written, remove the checkpoints Ray Train does not track (it keeps `num_to_keep` by
    val mIoU and the latest, and deletes the rest): one written just before an interrupt, or torn by it,
    would stay in OUT for good."""
    tracked = {posixpath.basename(path) for path in _tracked(result)}
    for name in _checkpoint_dirs(run_dir):
        if name not in tracked:
            storage.remove_tree(run_dir.child(name))


def apply_plan(
    spec: TrainSpec, data_loc: storage.Location, manifest: Manifest
) -> tuple[TrainSpec, TrainingPlan | None]:
    """The spec to train (the plan's values where the user gave none) and the card's record of the plan;
    `plan: false` trains the spec as written and records no plan."""
    if not spec.plan:
        return spec, None
    plan = planning.plan_for_spec(spec, data_loc, manifest)
    planned = planning.planned_spec(spec, plan)
    auto = ", ".join(f"{k} {v}" for k, v in plan.train_values().items() if k in plan.auto)
    progress.note(f"train: plan for the data set: {auto or 'every planned field given'}")
    log.info("train: plan reasons %s", plan.reasons)
    record = planning.card_record(plan, planning.compute_of(spec))
    return planned, record.model_copy(update={"stop_at_s": planned.time_budget})


def training_datasets(
    spec: TrainSpec, data_loc: storage.Location, manifest: Manifest, cfg: TrainConfig
) -> dict[str, Any]:
    """The train split (augmented, repeated, rare classes oversampled) and the val split (plain), as Ray
    datasets, both normalised as the model card will say (`cfg.model_input`)."""
    augment = Augmentation.from_spec(spec, rare_classes(manifest))
    return {
        "train": training_dataset(
            data_loc, manifest, "train", spec.image_size, augment, repeat=spec.repeat, norm=cfg.model_input
        ),
        "val": padded_for_workers(
            validation_dataset(data_loc, manifest, spec, cfg),
            val_rows(manifest, spec),
            spec.workers,
            spec.image_size,
            cfg.model_input.channels,
        ),
    }


def fit(
    spec: TrainSpec,
    out: storage.Location,
    cfg: TrainConfig,
    datasets: dict[str, Any],
    inbox: Any,
    identity: dict[str, Any],
) -> ray.train.Result:
    """Run the Ray Train job; rank 0 posts progress to `inbox` (None: no progress shown). `identity` is
    recorded beside the checkpoints (`check_resumable` read it before)."""
    trainer = _Trainer(
        # Bound here rather than passed as `train_loop_config`, which Ray types as a dict.
        functools.partial(train_loop_per_worker, cfg, inbox),
        backend_config=TFClusterConfig(),  # TensorflowTrainer's set-up without its TF import (see backend.py)
        scaling_config=ScalingConfig(
            num_workers=spec.workers,
            use_gpu=spec.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": spec.cpus_per_worker,
                **({"GPU": spec.gpus_per_worker} if spec.gpus_per_worker else {}),
            },
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all"),
        run_config=RunConfig(
            name=spec.name,
            # With a custom filesystem Ray Train wants the path inside it (bucket/prefix).
            storage_path=out.path,
            storage_filesystem=out.arrow_fs() if out.remote else None,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_mean_iou", checkpoint_score_order="max"
            ),
            # A dead worker restarts the whole group from the latest checkpoint.
            failure_config=FailureConfig(max_failures=spec.max_failures),
        ),
    )
    if not spec.resume:
        storage.remove_tree(out.child(spec.name))
    storage.write_json(out.child(spec.name, RUN_IDENTITY), identity)
    before = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        if threading.current_thread() is threading.main_thread() and before is not None:
            signal.signal(signal.SIGINT, before)  # whatever Ray Train set stays out of the rest of the command


class _Trainer(DataParallelTrainer):
    """Ray Train's trainer, with Ctrl-C left as the command's: Ray's SIGINT handler asks the controller to
    abort and then ends the process with sys.exit(0) (exit 1, no line, no --json object; its third Ctrl-C
    exits 0, a stopped run reported as a success). Left alone, Ctrl-C raises KeyboardInterrupt in the
    driver's `ray.get`, which `console.handle_errors` ends with exit 130 and its "interrupted" line; the
    controller and the workers are the driver's, ended with it, as after SIGTERM."""

    def _register_sigint_handler(self, controller: Any) -> None:
        return None


RUN_IDENTITY = "raysegment-run.json"  # beside Ray Train's checkpoints: what they were trained on
# Its version, the record's "record" field. 1 (a record without the field): floats kept to the tenth, and no
# augmentation, seed or precision (`_as_recorded_now` reads it as today's); 2: floats to 12 digits, all of them.
RUN_RECORD = 2


# The options a resumed run must share with its checkpoints: they set the schedule (its length, steps, rates),
# the effective batch, what is optimised, the precision and the random streams (the seed); with the spec's
# `repeat` and the augmentation as it takes effect (`run_identity`), what the training windows are. Changed
# mid-run they mixed two runs in one history and card.
TRAINING_OPTIONS = (
    "epochs",
    "time_budget_s",
    "workers",
    "batch_size",
    "steps_per_epoch",
    "peak_learning_rate",
    "schedule",
    "warmup_epochs",
    "optimizer",
    "momentum",
    "loss",
    "class_weights",
    "patience",
    "dtype_policy",  # --mixed-precision as it took effect (auto: bfloat16 with GPUs, else float32)
    "seed",
)


def run_identity(cfg: TrainConfig, data_hash: str, spec: TrainSpec, rare: tuple[int, ...]) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed by it: the data set, the network and the
    training options (`TRAINING_OPTIONS` of `cfg`; the spec's `repeat`, which reads the train split that many
    times an epoch; and the augmentation `training_datasets` trains with, `Augmentation.from_spec` of the spec
    and the data set's `rare` classes, None when off: the fields it ignores, or `oversample` without a rare
    class, are no option of the run)."""
    network = dataclasses.asdict(dataclasses.replace(cfg.model, shipped_weights=None))
    shipped = cfg.model.shipped_weights
    if shipped is not None and cfg.model.encoder_weights != "imagenet":
        network["encoder_weights"] = f"sha256:{shipped.sha256}"  # a weights file by content: moved, still it
    augment = Augmentation.from_spec(spec, rare)
    augmentation = None if augment is None else {k: _rounded(k, v) for k, v in dataclasses.asdict(augment).items()}
    identity = {
        "record": RUN_RECORD,
        "data set": data_hash,
        "network": network,
        "classes": list(cfg.class_names),
        "input": cfg.model_input.model_dump(mode="json"),
        "training": {
            **{k: _rounded(k, getattr(cfg, k)) for k in TRAINING_OPTIONS},
            "repeat": spec.repeat,
            "augmentation": augmentation,
        },
    }
    return json.loads(json.dumps(identity))  # as it reads back: tuples as lists


def _rounded(key: str, value: Any) -> Any:
    """A budget to the tenth of a second: 1.1h and 66m are one budget (3960.0000000000005 and 3960.0); other
    floats to 12 significant digits (to the tenth, a learning rate of 0.001 was 0.003's: both 0.0)."""
    if not isinstance(value, float):
        return value
    return round(value, 1) if key == "time_budget_s" else float(f"{value:.12g}")


def check_resumable(
    folder: RunFolder,
    identity: dict[str, Any],
    out_uri: str,
    weights_path: str | None = None,
    finished: bool = False,
) -> None:
    """Refuse to resume checkpoints of another data set, network or training options (those of `folder`, the
    run folder as read), before anything in OUT is touched; `finished`: the run in OUT finished
    (`finished_run`), so it is not resumed but kept.

    Ray Train resumes whatever checkpoint the run folder holds: another data set's was taken up at
    its last epoch and written out as a model of this one, and another network's failed to load with
    a traceback. Other training options (learning rate, epochs, budget, batch, workers, augmentation, seed,
    mixed precision) went on silently from the checkpoint's epoch, one history and card for two runs; a
    finished run re-run with more epochs trained none and recorded the new options. Run folders from before
    this record are resumed (or kept) as they were (a version-1 record, without training options or some of
    them, takes this run's for those: `_as_recorded_now`), and a record without a checkpoint beside it (a run
    stopped before its first) refuses nothing: there is nothing to resume."""
    if not folder.record_beside_checkpoint:  # nothing to resume
        return
    held = folder.record  # None: unreadable, a record of nothing this run can be
    version = held.get("record", 1) if isinstance(held, dict) else None
    if isinstance(held, dict):
        held = _as_recorded_now(held, identity, weights_path)
    if held == identity:
        return
    differs = sorted(k for k in identity if not isinstance(held, dict) or held.get(k) != identity[k])
    # Another data set, network, classes or input is named alone: the training options may differ with it
    # (crop native also changes the input's resize), but the run cannot be resumed whatever they are.
    groups = [k for k in differs if k != "training"]
    if groups or not differs:
        raise ConfigError(
            f"{out_uri}: holds a training run on another {' and '.join(groups) or 'record'} "
            "(its checkpoints cannot be resumed by this one); pass --no-resume to start over there, "
            "or choose another OUT"
        )
    was = held.get("training") if isinstance(held.get("training"), dict) else {}
    options = "; ".join(_differences(was, identity["training"], version))
    if finished:
        raise ConfigError(
            f"{out_uri}: holds a finished training run with other training options ({options}); "
            "pass --no-resume to train again there from the start, or choose another OUT"
        )
    raise ConfigError(
        f"{out_uri}: holds an unfinished training run with other training options ({options}): resumed, "
        "it would mix the two; run it with its own options to finish it, pass --no-resume to start over "
        "there, or choose another OUT"
    )


def _differences(was: dict[str, Any], now: dict[str, Any], version: int | None) -> list[str]:
    """The training options that differ, each "KEY OLD there, NEW now"; the augmentation by its fields
    (`augmentation.brightness 0.1 there, 0.2 now`, or `augmentation off there, on now`). A float of a
    version-1 record is shown as recorded, to the tenth (an old learning rate of 0.001 reads 0.0)."""

    def shown(key: str, value: Any) -> Any:
        tenth = version == 1 and isinstance(value, float) and key != "time_budget_s" and value == round(value, 1)
        return f"{value} (recorded to 0.1)" if tenth else value

    lines = []
    for key, new in now.items():
        old = was.get(key)
        if old == new:
            continue
        if key == "augmentation" and isinstance(old, dict) and isinstance(new, dict):
            lines += [f"{key}.{k} {old.get(k)} there, {v} now" for k, v in new.items() if old.get(k) != v]
        elif key == "augmentation" and (old is None or new is None):
            lines.append(f"augmentation {'off' if old is None else 'on'} there, {'off' if new is None else 'on'} now")
        else:
            lines.append(f"{key} {shown(key, old)} there, {new} now")
    return lines


def _as_recorded_now(held: dict[str, Any], identity: dict[str, Any], weights_path: str | None) -> dict[str, Any]:
    """A record written before its latest fields, read as it would be written now: `eight_bit_seen` follows
    from the data set and normalisation (both compared), and an encoder weights file named by its path is
    this run's file when that is the path given now (the old record cannot show its content). A version-1
    record (`RUN_RECORD`) without training options, or without some of them (the augmentation, seed and
    precision came later), resumes with this run's for those it lacks (as it did before they were recorded);
    its floats were recorded to the tenth, so one that is this run's to the tenth is this run's."""
    held = json.loads(json.dumps(held))
    now = identity["training"]
    if held.get("record", 1) == 1:
        held["record"] = identity["record"]
        training = held.setdefault("training", dict(now))  # recorded before the training options were
        if isinstance(training, dict):
            for k, v in now.items():
                if isinstance(v, float) and training.get(k) == round(v, 1):
                    training[k] = v
            # Today's options, this run's where it lacks one (the augmentation, seed and precision).
            held["training"] = {k: training.get(k, v) for k, v in now.items()}
    if isinstance(held.get("input"), dict):
        held["input"].setdefault("eight_bit_seen", identity["input"].get("eight_bit_seen", False))
    old, new = held.get("network"), identity["network"]
    if isinstance(old, dict) and weights_path and old.get("encoder_weights") == weights_path:
        old["encoder_weights"] = new.get("encoder_weights")
    return held


def write_artifacts(
    out: storage.Location,
    spec: TrainSpec,
    manifest: Manifest,
    cfg: TrainConfig,
    checkpoint: ray.train.Checkpoint,
    best: dict[str, Any],
    state: TrainState,
    seconds: float,
    plan: TrainingPlan | None = None,
) -> TrainResult:
    """Rebuild the model from the best checkpoint; write model.keras, model card, metrics, history."""
    import keras
    import tensorflow as tf

    model = cfg.model.build()
    with tempfile.TemporaryDirectory() as d:
        with checkpoint.as_directory() as ckpt_dir:
            model.load_weights(os.path.join(ckpt_dir, CHECKPOINT_WEIGHTS))
            best_cm = read_state(ckpt_dir).confusion_matrix
        local = os.path.join(d, MODEL_FILE)
        model.save(local)
        model_hash = file_sha256(local)
        storage.upload_file(local, out.child(MODEL_FILE))
    history = state.history
    if plan is not None and state.fitted_epochs is not None:
        # The plan's epochs were an estimate; its first epoch measured what fits the budget.
        plan = plan.model_copy(update={"fitted_epochs": state.fitted_epochs, "first_epoch_s": state.first_epoch_s})
    # The plan in brief (the model card has all of it): which fields it chose, which were given.
    brief = None if plan is None else {"auto": plan.auto, "given": plan.given, "time_budget_s": plan.time_budget_s}
    metrics = {
        "best": best,
        "last": history[-1],
        "epochs_run": len(history),
        "epochs_planned": cfg.epochs,
        "epochs_fitted": state.fitted_epochs,
        "stopped_early": state.stopped_early,
        "stopped_by": state.stopped_by,
        # The labelled val pixels the metrics scored (a native-scale model's: those its val windows cover).
        "val_pixels": int(np.sum(best_cm)) if best_cm else None,
        "resumes": state.resumes,
        "plan": brief,
        "seconds": round(seconds, 1),
    }
    storage.write_bytes(out.child(HISTORY_FILE), history_csv(history))
    storage.write_bytes(out.child(CURVES_FILE), plots.training_curves(history))
    if best_cm:
        storage.write_bytes(out.child(CONFUSION_FILE), plots.confusion_matrix_png(best_cm, list(manifest.class_names)))
    examples = validation_examples(model, spec, manifest, cfg)
    storage.write_bytes(out.child(EXAMPLES_FILE), examples)
    tracking.write_tensorboard(out.child(TENSORBOARD_DIR), history, examples, best.get("epoch"))
    card = ModelCard.create(
        model_hash,
        architecture={
            "name": f"{spec.architecture}-{spec.encoder}" if spec.encoder else spec.architecture,
            "encoder": spec.encoder,
            "encoder_weights": spec.encoder_weights if spec.encoder else None,
            "depth": spec.model_depth,
            "base_filters": spec.base_filters,
            "batch_norm": spec.batch_norm,
            "upsampling": spec.upsampling,
            "head": spec.head,
        },
        num_classes=manifest.num_classes,
        class_names=list(manifest.class_names),
        palette=list(manifest.palette),
        ignore_index=manifest.ignore_index,
        # Size, bands, native scale and the normalisation the training pipeline applied (`model_input`).
        input=cfg.model_input,
        output="logits",
        training=spec.model_dump(exclude={"endpoint_url"}),
        data={
            "uri": storage.redact(spec.data),
            "content_hash": manifest.content_hash,
            "counts": manifest.counts.to_json(),
        },
        metrics={k: best[k] for k in ("val_pixel_accuracy", "val_mean_iou", "val_mean_dice") if k in best},
        best_epoch=best.get("epoch"),
        **({"plan": plan} if plan is not None else {}),
        versions={
            "raysegment": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "ray": ray.__version__,
        },
    )
    if spec.tta_check:
        card.write(out)  # first without the advice: `measure_tta` loads the model through its card, as infer does
        card = card.model_copy(update={"inference": tta_advice(out, spec, manifest)})
    storage.write_json(out.child(METRICS_FILE), metrics)
    card.write(out)
    storage.mark_success(out, {"model_id": card.model_id})
    return TrainResult(out.uri, card, metrics)
