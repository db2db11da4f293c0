"""Experiment tracking: TensorBoard event files under OUT/tensorboard/ and, with `--mlflow-uri`, an MLflow run.

Both are written by the driver from the history in the final checkpoint, the one history.csv is
written from. Why not rank 0 as the epochs end: a worker group that restarts from a checkpoint runs
the epochs after it again, so a per-epoch writer records them twice (or, after falling back past a
corrupt checkpoint, keeps values the model no longer has); the checkpointed history holds each epoch
exactly once, resumes included. The final model, its card and the plots exist only on the driver,
and MLflow's client is then needed there alone, not on every worker node. The cost: TensorBoard and
MLflow show a run's epochs when it ends (the console shows each one as it finishes); the MLflow run is
created before training, so a bad URI fails before any work, and a failed training marks it FAILED.

TensorBoard: `tf.summary.write` with the scalars and images plugins' metadata is exactly what
`tf.summary.scalar` and `tf.summary.image` write; those two are implemented in the `tensorboard`
package, which TensorFlow no longer installs, and the event files need nothing from it. The
directory is rewritten whole at the end of every `train` (one event file), so a re-run that resumes
never adds a second copy of an epoch.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from raysegment import storage
from raysegment.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from raysegment.config import TrainSpec

TENSORBOARD_DIR = "tensorboard"
# history.csv column -> TensorBoard tag; the MLflow metrics keep the column names.
SCALAR_TAGS = {
    "train_loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "images_per_second": "train/images_per_second",
    "val_pixel_accuracy": "val/pixel_accuracy",
    "val_mean_iou": "val/mean_iou",
    "val_mean_dice": "val/mean_dice",
}
EXAMPLES_TAG = "val/examples"
MLFLOW_EXTRA = "pip install 'raysegment[mlflow]'"
MLFLOW_EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "raysegment"
# OUT's files an MLflow run keeps: the model and its card under model/, the rest at the top.
MODEL_ARTIFACTS = ("model.keras", "model.json")
RUN_ARTIFACTS = ("metrics.json", "history.csv", "training_curves.png", "confusion_matrix.png", "examples.png")


# --- TensorBoard ----------------------------------------------------------------------------------


def _metadata(plugin: str, data_class: int) -> Any:
    from tensorflow.core.framework import summary_pb2

    # Version 0 of both plugins' data protos serialises to empty content.
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin, content=b""), data_class=data_class
    )


def write_tensorboard(
    dest: storage.Location, history: list[dict[str, Any]], examples_png: bytes, best_epoch: int | None
) -> None:
    """One event file under dest: each history row's scalars at step = its epoch, the examples at the best epoch.

    Written locally, then uploaded over whatever dest held (a local OUT the same way)."""
    import tensorflow as tf
    from PIL import Image
    from tensorflow.core.framework import summary_pb2

    scalar = _metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
    image = _metadata("images", summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
    with tempfile.TemporaryDirectory() as d:
        writer = tf.summary.create_file_writer(d)
        with writer.as_default():
            for row in history:
                for column, tag in SCALAR_TAGS.items():
                    tf.summary.write(tag, tf.constant(row[column], tf.float32), step=row["epoch"], metadata=scalar)
            if examples_png:
                with Image.open(io.BytesIO(examples_png)) as img:
                    width, height = img.size
                # The images plugin's tensor: width, height, then the encoded images.
                blob = tf.constant([str(width).encode(), str(height).encode(), examples_png])
                tf.summary.write(EXAMPLES_TAG, blob, step=best_epoch or 0, metadata=image)
        writer.close()
        storage.remove_tree(dest)
        for name in sorted(os.listdir(d)):
            storage.upload_file(os.path.join(d, name), dest.child(name))


# --- MLflow ---------------------------------------------------------------------------------------


def mlflow_client(uri: str) -> Any:
    """An MlflowClient for the tracking URI; ConfigError (exit 2) naming the extra when MLflow is missing."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ConfigError(
            f"--mlflow-uri needs the MLflow client, which is not installed: {MLFLOW_EXTRA} (mlflow-skinny)"
        ) from exc
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def mlflow_errors(uri: str, doing: str) -> Iterator[None]:
    """MLflow's and its transport's failures as one StorageError naming the tracking URI."""
    try:
        yield
    except (ConfigError, StorageError):
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
        raise StorageError(
            f"--mlflow-uri {storage.redact(uri)}: could not {doing} ({type(exc).__name__}: {first})"
        ) from exc


def run_params(spec: TrainSpec, plan: dict[str, Any] | None) -> dict[str, str]:
    """The trained spec's values (the plan's filled in) and the plan in brief, as MLflow params."""
    values = spec.model_dump(exclude={"endpoint_url", "mlflow_uri"})
    values["data"], values["out"] = storage.redact(spec.data), storage.redact(spec.out)
    params = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in values.items()}
    if plan is not None:
        params["plan.auto"] = ",".join(plan["auto"])
        params["plan.given"] = ",".join(plan["given"])
        params["plan.time_budget_s"] = json.dumps(plan["time_budget_s"])
    return params


class MlflowRun:
    """One MLflow run of one `train` call, logged from the driver."""

    def __init__(self, client: Any, uri: str, run_id: str) -> None:
        self.client, self.uri, self.run_id = client, uri, run_id

    @classmethod
    def start(cls, uri: str, spec: TrainSpec, plan: dict[str, Any] | None) -> MlflowRun:
        """Create the run (experiment $MLFLOW_EXPERIMENT_NAME, default raysegment) and log its params."""
        from mlflow.entities import Param

        client = mlflow_client(uri)
        name = os.environ.get(MLFLOW_EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
        with mlflow_errors(uri, f"create a run in experiment {name!r}"):
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            run = client.create_run(
                experiment_id,
                run_name=os.path.basename(spec.out.rstrip("/")) or spec.name,
                tags={"raysegment.out": storage.redact(spec.out), "raysegment.data": storage.redact(spec.data)},
            )
            run_id = run.info.run_id
            params = [Param(k, v) for k, v in run_params(spec, plan).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(run_id, params=params[i : i + 100])
            if plan is not None:
                client.log_dict(run_id, plan, "plan.json")
        return cls(client, uri, run_id)

    def log_result(self, out: storage.Location, history: list[dict[str, Any]], result: dict[str, Any]) -> None:
        """Metrics per epoch (step = epoch), the best epoch's, the model card and model, and the plots."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(column, float(row[column]), now, row["epoch"])
            for row in history
            for column in (*SCALAR_TAGS, "epoch_seconds")
        ]
        best = result["metrics"]["best"]
        metrics += [Metric(f"best_{k}", float(best[k]), now, 0) for k in SCALAR_TAGS if k.startswith("val_")]
        with mlflow_errors(self.uri, "log the run's metrics and artifacts"):
            for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
            self.client.set_tag(self.run_id, "raysegment.model_id", result["model_card"]["model_id"])
            with tempfile.TemporaryDirectory() as d:
                for name in (*MODEL_ARTIFACTS, *RUN_ARTIFACTS):
                    local = _local_copy(out.child(name), d)
                    if local is not None:
                        self.client.log_artifact(self.run_id, local, "model" if name in MODEL_ARTIFACTS else None)

    def end(self, status: str) -> None:
        with mlflow_errors(self.uri, f"mark the run {status}"):
            self.client.set_terminated(self.run_id, status)


def _local_copy(loc: storage.Location, tmp: str) -> str | None:
    """A local path holding loc's file (loc itself when it is local); None when there is no such file."""
    if not storage.exists(loc):
        return None
    if not loc.remote:
        return loc.path
    local = os.path.join(tmp, os.path.basename(loc.path))
    storage.download_file(loc, local)
    return local


@contextlib.contextmanager
def mlflow_run(spec: TrainSpec, plan: dict[str, Any] | None) -> Iterator[MlflowRun | None]:
    """The run while training and writing artifacts (None without --mlflow-uri): FINISHED on a clean exit,
    FAILED when the block raises (the block's error is the one that propagates)."""
    if not spec.mlflow_uri:
        yield None
        return
    run = MlflowRun.start(spec.mlflow_uri, spec, plan)
    try:
        yield run
    except BaseException:
        with contextlib.suppress(Exception):
            run.end("FAILED")
        raise
    run.end("FINISHED")
