"""Training checkpoints: what one holds (`TrainState`), writing it intact, and resuming from it.

A checkpoint directory holds the model weights, every optimizer variable (Adam
moments and the step count that drives the LR schedule resume exactly) and
`state.json`, written last with the other files' sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raysegment.errors import ConfigError

if TYPE_CHECKING:
    import ray.train

CHECKPOINT_WEIGHTS = "model.weights.h5"
CHECKPOINT_OPTIMIZER = "optimizer.npz"
CHECKPOINT_STATE = "state.json"


@dataclass(frozen=True)
class TrainState:
    """Progress so far; state.json holds exactly these fields (plus the file hashes)."""

    epoch: int = -1  # the last finished epoch
    best_val_mean_iou: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per epoch
    confusion_matrix: list[list[int]] | None = None  # the last epoch's, on the val split
    stopped_early: bool = False
    stopped_by: str | None = None  # "patience" or "time_budget" when stopped_early
    # One entry per resume: the epoch it went on from, the checkpoint, and the newer ones skipped as unreadable.
    resumes: list[dict[str, Any]] = field(default_factory=list)
    # With a time budget: the epochs its first epoch's measured time fitted in it, and that epoch's seconds
    # without one-time costs (`loop.fit_to_budget`); a resumed run trains and schedules to the same length.
    fitted_epochs: int | None = None
    first_epoch_s: float | None = None

    def after_epoch(self, metrics: dict[str, Any], confusion: np.ndarray, patience: int | None) -> TrainState:
        """The state once `metrics["epoch"]` has finished; stopped_early when patience ran out."""
        epoch, miou = metrics["epoch"], metrics["val_mean_iou"]
        best_iou, best_epoch = (
            (miou, epoch) if miou > self.best_val_mean_iou else (self.best_val_mean_iou, self.best_epoch)
        )
        patience_out = bool(patience and epoch - best_epoch >= patience)
        return TrainState(
            epoch=epoch,
            best_val_mean_iou=best_iou,
            best_epoch=best_epoch,
            history=[*self.history, metrics],
            confusion_matrix=confusion.astype(np.int64).tolist(),
            stopped_early=patience_out,
            stopped_by="patience" if patience_out else None,
            resumes=self.resumes,
            fitted_epochs=self.fitted_epochs,
            first_epoch_s=self.first_epoch_s,
        )

    def stopped_at_budget(self) -> TrainState:
        return dataclasses.replace(self, stopped_early=True, stopped_by="time_budget")


def out_of_budget(spent_s: float, last_epoch_s: float, budget_s: float) -> bool:
    """True when another epoch, as long as the last one, would end past the budget."""
    return spent_s + last_epoch_s > budget_s


def file_sha256(path: str) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(directory: str, model, optimizer, state: TrainState) -> None:
    """Weights, optimizer variables, then state.json (the checkpoint is complete once it exists)."""
    model.save_weights(os.path.join(directory, CHECKPOINT_WEIGHTS))
    np.savez(os.path.join(directory, CHECKPOINT_OPTIMIZER), *[np.asarray(v) for v in optimizer.variables])
    # state.json last, with the other files' hashes: a checkpoint is complete and intact
    # exactly when its state file exists and the hashes match.
    digests = {n: file_sha256(os.path.join(directory, n)) for n in (CHECKPOINT_WEIGHTS, CHECKPOINT_OPTIMIZER)}
    with open(os.path.join(directory, CHECKPOINT_STATE), "w") as f:
        json.dump({**dataclasses.asdict(state), "sha256": digests}, f)


def _read_state_file(directory: str) -> tuple[TrainState, dict[str, str]]:
    with open(os.path.join(directory, CHECKPOINT_STATE)) as f:
        saved = json.load(f)
    digests = saved.pop("sha256", {})
    return TrainState(**saved), digests


def read_state(directory: str) -> TrainState:
    """A checkpoint's state (its files are not checked: `load_checkpoint` does that)."""
    return _read_state_file(directory)[0]


def load_checkpoint(directory: str, model, optimizer) -> TrainState:
    """Restore weights and optimizer state; raises ValueError for an incomplete checkpoint."""
    missing = [
        n
        for n in (CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, CHECKPOINT_OPTIMIZER)
        if not os.path.exists(os.path.join(directory, n))
    ]
    if missing:
        raise ValueError(f"checkpoint {directory} is incomplete: missing {missing}")
    state, digests = _read_state_file(directory)
    for name, digest in digests.items():
        if file_sha256(os.path.join(directory, name)) != digest:
            raise ValueError(f"checkpoint {directory}: {name} does not match its recorded sha256 (corrupt or partial)")
    model.load_weights(os.path.join(directory, CHECKPOINT_WEIGHTS))
    with np.load(os.path.join(directory, CHECKPOINT_OPTIMIZER)) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(optimizer.variables):
        raise ValueError(f"checkpoint has {len(values)} optimizer variables, model needs {len(optimizer.variables)}")
    for var, value in zip(optimizer.variables, values):
        var.assign(value)
    return state


def restore(checkpoint: ray.train.Checkpoint, model, optimizer) -> TrainState:
    """Load the newest complete checkpoint of the run: the highest epoch whose files match their hashes.

    Ray Train hands over its latest checkpoint, by its snapshot of the run, which lags the disk: a run
    stopped (SIGTERM, Ctrl-C) just after a checkpoint was written does not list it, and its epoch, shown
    as done, was trained again. So every `checkpoint_*` folder beside it (``num_to_keep``, and such ones)
    is ordered by the epoch its state.json records, Ray's latest first among equals; one with no readable
    state (torn by the stop) is tried last, and one that does not load (corrupt, partial) is skipped for
    the next. Every rank walks the same list, so all agree. `trainer.remove_untracked_checkpoints` removes
    those Ray does not track once the model is written.
    """
    import pyarrow.fs as pafs
    import ray.train

    fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent = os.path.dirname(latest)
    siblings = [
        info.path.rstrip("/")
        for info in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        if info.type == pafs.FileType.Directory
        and os.path.basename(info.path.rstrip("/")).startswith("checkpoint_")
        and info.path.rstrip("/") != latest
    ]
    order = sorted(
        [latest, *siblings], key=lambda p: (_recorded_epoch(fs, p), p == latest, os.path.basename(p)), reverse=True
    )
    problems: list[str] = []
    skipped: list[str] = []
    for path in order:
        try:
            with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
                state = load_checkpoint(d, model, optimizer)
        except Exception as exc:  # h5py, zipfile and json each raise their own kind
            # One line each (h5py's text spans several), under the URI the user gave (s3:// included).
            problems.append(f"{_uri(fs, path)}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            skipped.append(path)
            continue
        # Rank 0 posts this restore to the driver, which notes it at once (events.Resumed); metrics.json lists
        # the run's `resumes` from the final state.
        # `skipped_paths`: as Ray Train names them, so the driver never takes one of them for the best.
        resume = {"from_epoch": state.epoch, "checkpoint": path, "skipped": problems, "skipped_paths": skipped}
        return dataclasses.replace(state, resumes=[*state.resumes, resume])
    # A user error (one line, exit 2): the checkpoints are damaged or of another network, and the fix is the user's.
    raise ConfigError(
        f"no checkpoint in {_uri(fs, os.path.dirname(parent.rstrip('/')) or parent)} loads into this run's network "
        f"(damaged, or trained with other options); pass --no-resume to start over, or choose another OUT: "
        + "; ".join(problems)[:600]
    )


def _recorded_epoch(fs: Any, path: str) -> int:
    """The epoch a checkpoint's state.json records; -1 without a readable one (torn: tried last)."""
    try:
        with fs.open_input_stream(f"{path}/{CHECKPOINT_STATE}") as f:
            return int(json.loads(f.read())["epoch"])
    except Exception:  # missing, partial or not JSON: the load says which, if it comes to that
        return -1


def _uri(fs: Any, path: str) -> str:
    """A checkpoint path as the user wrote its store: Ray Train's S3 paths are bucket/prefix."""
    # Arrow's own S3 filesystem is "s3"; raysegment's (s3fs wrapped) "py::fsspec+('s3', 's3a')".
    return f"s3://{path}" if "s3" in getattr(fs, "type_name", "") else path
