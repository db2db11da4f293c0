"""Experiment tracking: TensorBoard event files under OUT/tensorboard/ and, with `--mlflow-uri`, an MLflow run.

Live: the driver logs each epoch's scalars (TensorBoard, and MLflow metrics) as it learns that the epoch
finished (`LiveLog.rows`, fed by the thread that shows the console's epoch lines, `events.follow`), so
both show a run while it trains. Rank 0 posts each epoch after its checkpoint is written, and after a
restore the checkpoint's history (`events.Resumed`): a re-run that resumes logs the epochs before it
first. Each epoch is logged once per `train` call: a worker group that restarts from an older
checkpoint runs the epochs after it again, and those repeats are skipped, so MLflow keeps the first
values of such an epoch (history.csv, from the final checkpoint, has the repeat's). When training ends
the driver logs to MLflow any epoch of the final history it has not (a post lost in a restart, MLflow
down for a while), then the best epoch's metrics, the model, its card and the plots, which exist only
there; MLflow's client is needed on the driver alone. `train` first asks the tracking server for the
experiment (`check_tracking`), and creates the MLflow run before OUT changes, so a bad or unreachable URI
fails before any work; a failed training marks the run FAILED.

MLflow's own HTTP client retries a failed request 7 times with growing backoff and waits up to 120 s for
each answer: about 4 minutes for a server that is gone. raysegment's MLflow calls run with short bounds
instead (`HTTP_BOUNDS`, where the user set none of their own), and the live ones on a thread of their own,
so the console's epoch lines never wait on them; after the first failure the live logging stops trying
until training ends, when the missed epochs are tried once more.

TensorBoard: `tf.summary.write` with the scalars and images plugins' metadata is exactly what
`tf.summary.scalar` and `tf.summary.image` write; those two are implemented in the `tensorboard`
package, which TensorFlow no longer installs, and the event files need nothing from it. The live file
is written locally and uploaded whole after each epoch (an S3 object cannot be appended to); at the
end `write_tensorboard` replaces the directory with one file from the final history plus the example
overlays, so a finished run's events equal history.csv.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from raysegment import progress, storage
from raysegment.config import MLFLOW_AUTH
from raysegment.errors import ConfigError, StorageError
from raysegment.models.card import CARD_FILE, MODEL_FILE, TRAINED_FILES, TrainingPlan

if TYPE_CHECKING:
    from raysegment.config import TrainSpec
    from raysegment.train.trainer import TrainResult

log = logging.getLogger(__name__)

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
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_EXAMPLE = "http://host:5000"
# MLflow's HTTP client reads these for each request. One retry after 1 s, 10 s for an answer, and no
# sleeping for a server's Retry-After: a gone or hung server costs seconds, not MLflow's default minutes.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
}
# OUT's files an MLflow run keeps: the model and its card under model/, train's other files (TRAINED_FILES)
# at the top.
MODEL_ARTIFACTS = (MODEL_FILE, CARD_FILE)


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

    image = _metadata("images", summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
    with tempfile.TemporaryDirectory() as d:
        writer = tf.summary.create_file_writer(d)
        _write_scalars(writer, history)
        with writer.as_default():
            if examples_png:
                with Image.open(io.BytesIO(examples_png)) as img:
                    width, height = img.size
                # The images plugin's tensor: width, height, then the encoded images.
                blob = tf.constant([str(width).encode(), str(height).encode(), examples_png])
                tf.summary.write(EXAMPLES_TAG, blob, step=best_epoch or 0, metadata=image)
        writer.close()
        storage.remove_tree(dest)
        _upload_events(d, dest)


def _write_scalars(writer: Any, rows: list[dict[str, Any]]) -> None:
    """Each row's scalars at step = its epoch."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    scalar = _metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
    with writer.as_default():
        for row in rows:
            for column, tag in SCALAR_TAGS.items():
                tf.summary.write(tag, tf.constant(row[column], tf.float32), step=row["epoch"], metadata=scalar)
    writer.flush()


def _upload_events(local_dir: str, dest: storage.Location) -> None:
    for name in sorted(os.listdir(local_dir)):
        storage.upload_file(os.path.join(local_dir, name), dest.child(name))


class LiveLog:
    """The epochs of one `train` call, logged as the driver learns of them: each once (see the module doc).

    `rows` is called from the progress thread and never raises (tracking must not stop training): a
    failed upload is a warning; MLflow is logged to on a thread of its own, and its first failure is a
    warning that stops the live logging to it (MLflow gets the epochs it missed in `finish`)."""

    def __init__(self, dest: storage.Location, run: MlflowRun | None) -> None:
        import tensorflow as tf

        self.dest, self.run = dest, run
        self.tensorboard: set[int] = set()  # epochs in the live event file
        self.mlflow: set[int] = set()  # epochs MLflow has (written by the MLflow thread, then by finish)
        self._lock = threading.Lock()
        self._warned = False
        self._mlflow_failed = False  # the live MLflow logging gave up until finish
        self._mlflow_thread = ThreadPoolExecutor(1, thread_name_prefix="raysegment-mlflow") if run else None
        self._tmp = tempfile.TemporaryDirectory(prefix="raysegment-tensorboard-")
        self._writer = tf.summary.create_file_writer(self._tmp.name)
        storage.remove_tree(dest)  # this run's events only: a file from an earlier run would repeat epochs

    def rows(self, rows: list[dict[str, Any]]) -> None:
        """Log the rows (history rows: epoch, metrics) whose epochs are not logged yet."""
        with self._lock:
            new = [r for r in rows if r["epoch"] not in self.tensorboard]
            if new and self._try("write the TensorBoard events", _write_scalars, self._writer, new):
                self.tensorboard.update(r["epoch"] for r in new)
                self._try(
                    f"upload the TensorBoard events to {self.dest.uri}", _upload_events, self._tmp.name, self.dest
                )
            if self._mlflow_thread is not None and not self._mlflow_failed:
                with contextlib.suppress(RuntimeError):  # closed: finish logs what is missing
                    self._mlflow_thread.submit(self._log_live, list(rows))

    def finish(self, out: storage.Location, history: list[dict[str, Any]], result: TrainResult) -> None:
        """After the artifacts: MLflow gets the final history's epochs it has not had, then the result."""
        if self.run is None:
            return
        self._stop_mlflow_thread()
        with self._lock:
            self._log_to_mlflow(history)
        self.run.log_result(out, result)

    def close(self) -> None:
        self._stop_mlflow_thread()
        with self._lock:
            self._writer.close()
            self._tmp.cleanup()

    def _stop_mlflow_thread(self) -> None:
        """Wait for the MLflow calls under way (each bounded by HTTP_BOUNDS; none once logging failed)."""
        if self._mlflow_thread is not None:
            self._mlflow_thread.shutdown(wait=True)

    def __enter__(self) -> LiveLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log_live(self, rows: list[dict[str, Any]]) -> None:
        """On the MLflow thread: the rows' new epochs; the first failure is one warning, and no more tries."""
        if self._mlflow_failed:
            return
        try:
            self._log_to_mlflow(rows)
        except Exception as exc:  # noqa: BLE001 - tried again in finish
            self._mlflow_failed = True
            progress.warn(
                log,
                "train",
                f"could not log epochs to MLflow ({exc}); training goes on without it, and MLflow is tried "
                "again when training ends",
            )

    def _log_to_mlflow(self, rows: list[dict[str, Any]]) -> None:
        assert self.run is not None
        new = {r["epoch"]: r for r in rows if r["epoch"] not in self.mlflow}
        if new:
            self.run.log_epochs(list(new.values()))
            self.mlflow.update(new)

    def _try(self, doing: str, fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # noqa: BLE001 - rewritten at the end
            log.warning("train: could not %s: %s", doing, exc)
            if not self._warned:
                self._warned = True
                progress.note(f"train: could not {doing} ({exc}); written again when training ends")
            return False


# --- MLflow ---------------------------------------------------------------------------------------


def mlflow_client(uri: str) -> Any:
    """An MlflowClient for the tracking URI; ConfigError (exit 2) naming the extra when MLflow is missing, and
    naming the fix when the installed client cannot use the URI (MLflow picks the store when the client is
    made, so `train` learns it before any work)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ConfigError(
            f"--mlflow-uri needs the MLflow client, which is not installed: {MLFLOW_EXTRA} (mlflow-skinny)"
        ) from exc
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as exc:  # noqa: BLE001 - a store MLflow refuses for this URI: the user's to fix
        raise ConfigError(unusable_uri(uri, exc)) from exc


def check_tracking(uri: str) -> None:
    """The client for the URI (`mlflow_client`), and the tracking store's answer about the run's experiment
    within HTTP_BOUNDS: ConfigError (exit 2) in one line naming the URI and the fix when it gives none, so
    `train` refuses a server that is gone, hung or refusing the credentials before any work."""
    client = mlflow_client(uri)
    try:
        with bounded_http():
            client.get_experiment_by_name(experiment_name())
    except Exception as exc:  # noqa: BLE001 - whatever the store says, the user's to fix
        raise ConfigError(unreachable_uri(uri, exc)) from exc


def unreachable_uri(uri: str, exc: Exception) -> str:
    """One line for a tracking store that gave no answer: the URI, MLflow's reason in brief and the fix."""
    if getattr(exc, "error_code", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        fix = f"the server refused the credentials: {MLFLOW_AUTH}"
    else:
        answer = "no answer" if "Caused by " in str(exc) else "an error"  # urllib3's transport error, or the store's
        fix = (
            f"{answer} ({_cause(str(exc))[:300]}); start the tracking server or correct the URI, or leave "
            "--mlflow-uri out"
        )
    return f"--mlflow-uri {storage.redact(uri)}: {fix}"


def _cause(message: str) -> str:
    """MLflow's message in brief. A transport error names the request, then urllib3's error, whose last
    part is the cause: `... (Caused by NewConnectionError("...: [Errno 111] Connection refused"))`."""
    said = " ".join(message.split())
    if "Caused by " not in said:
        return said
    return re.sub(r"""['"]?\)*$""", "", said.rsplit("Caused by ", 1)[1].rsplit(": ", 1)[-1])


def experiment_name() -> str:
    """The run's experiment: $MLFLOW_EXPERIMENT_NAME, default raysegment."""
    return os.environ.get(MLFLOW_EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


_bounds_lock = threading.Lock()
_bounds_users = 0
_bounds_set: list[str] = []  # the HTTP_BOUNDS keys set by the outermost bounded_http (the user set the rest)


@contextlib.contextmanager
def bounded_http() -> Iterator[None]:
    """HTTP_BOUNDS in the environment, for the MLflow calls inside, where the user set no value of their own.

    The environment is the process's: the first of overlapping users (the MLflow thread, the driver) sets the
    bounds and the last one out removes them."""
    global _bounds_users
    with _bounds_lock:
        if _bounds_users == 0:
            _bounds_set[:] = [k for k in HTTP_BOUNDS if k not in os.environ]
            os.environ.update({k: HTTP_BOUNDS[k] for k in _bounds_set})
        _bounds_users += 1
    try:
        yield
    finally:
        with _bounds_lock:
            _bounds_users -= 1
            if _bounds_users == 0:
                for k in _bounds_set:
                    os.environ.pop(k, None)


def unusable_uri(uri: str, exc: Exception) -> str:
    """One line for a tracking URI the installed MLflow client refuses: the URI and the fix."""
    shown = f"--mlflow-uri {storage.redact(uri)}"
    said = " ".join(str(exc).split())
    scheme = urllib.parse.urlparse(uri).scheme.split("+", 1)[0].lower()
    if scheme in ("", "file") and FILE_STORE_ENV in said:
        return (
            f"{shown}: MLflow 3 opens a file store only when {FILE_STORE_ENV}=true is set; set it, or give a "
            f"tracking server ({SERVER_EXAMPLE})"
        )
    if scheme in SQL_SCHEMES and not _full_mlflow():
        return (
            f"{shown}: a {scheme} store needs the full MLflow package (pip install mlflow); the installed "
            f"mlflow-skinny client has no SQL store. Or give a tracking server ({SERVER_EXAMPLE})"
        )
    if scheme not in ("", "file", "http", "https", *SQL_SCHEMES) and "unsupported uri" in said.lower():
        return (
            f"{shown}: MLflow has no store for {scheme}:// URIs; give a tracking server ({SERVER_EXAMPLE}), "
            f"file:///absolute/dir (with {FILE_STORE_ENV}=true) or databricks"
        )
    return f"{shown}: the MLflow client cannot use it ({type(exc).__name__}: {said[:300]})"


def _full_mlflow() -> bool:
    """Whether the full `mlflow` package (SQL stores) is installed, not only mlflow-skinny."""
    try:
        importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@contextlib.contextmanager
def mlflow_errors(uri: str, doing: str) -> Iterator[None]:
    """MLflow's and its transport's failures as one StorageError naming the tracking URI."""
    try:
        yield
    except (ConfigError, StorageError):
        raise
    except Exception as exc:
        first = _cause(str(exc).strip().splitlines()[0])[:500] if str(exc).strip() else ""
        raise StorageError(
            f"--mlflow-uri {storage.redact(uri)}: could not {doing} ({type(exc).__name__}: {first})"
        ) from exc


def run_uri(uri: str, spec: TrainSpec) -> str:
    """DATA or OUT as the model card records it (absolute; s3:// as resolved), without credentials: a relative
    path means nothing to a shared tracking server."""
    return storage.redact(storage.resolve(uri, spec.endpoint_url).uri)


def run_params(spec: TrainSpec, plan: TrainingPlan | None) -> dict[str, str]:
    """The trained spec's values (the plan's filled in) and the plan in brief, as MLflow params."""
    values = spec.model_dump(exclude={"endpoint_url", "mlflow_uri"})
    if not spec.encoder:
        values["encoder_weights"] = None  # the default, unused without an encoder (as the card records it)
    values["data"], values["out"] = run_uri(spec.data, spec), run_uri(spec.out, spec)
    params = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in values.items()}
    if plan is not None:
        params["plan.auto"] = ",".join(plan.auto)
        params["plan.given"] = ",".join(plan.given)
        params["plan.time_budget_s"] = json.dumps(plan.time_budget_s)
    return params


class MlflowRun:
    """One MLflow run of one `train` call, logged from the driver; each call within HTTP_BOUNDS."""

    def __init__(self, client: Any, uri: str, run_id: str) -> None:
        self.client, self.uri, self.run_id = client, uri, run_id
        self.failing = False  # the last call failed: the store is likely gone

    @contextlib.contextmanager
    def _calling(self, doing: str) -> Iterator[None]:
        with mlflow_errors(self.uri, doing), bounded_http():
            try:
                yield
            except BaseException:
                self.failing = True
                raise
            self.failing = False

    @classmethod
    def start(cls, uri: str, spec: TrainSpec, plan: TrainingPlan | None) -> MlflowRun:
        """Create the run (experiment $MLFLOW_EXPERIMENT_NAME, default raysegment) and log its params."""
        from mlflow.entities import Param

        client = mlflow_client(uri)
        name = experiment_name()
        with mlflow_errors(uri, f"create a run in experiment {name!r}"), bounded_http():
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            out = run_uri(spec.out, spec)
            run = client.create_run(
                experiment_id,
                run_name=os.path.basename(out.rstrip("/")) or spec.name,
                tags={"raysegment.out": out, "raysegment.data": run_uri(spec.data, spec)},
            )
            run_id = run.info.run_id
            params = [Param(k, v) for k, v in run_params(spec, plan).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(run_id, params=params[i : i + 100])
            if plan is not None:
                client.log_dict(run_id, plan.model_dump(mode="json", exclude_unset=True), "plan.json")
        return cls(client, uri, run_id)

    def log_epochs(self, rows: list[dict[str, Any]]) -> None:
        """History rows as metrics, step = epoch (what TensorBoard shows, plus epoch_seconds)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(c, float(row[c]), now, row["epoch"]) for row in rows for c in (*SCALAR_TAGS, "epoch_seconds")]
        with self._calling("log the run's epochs"):
            for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
                self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_result(self, out: storage.Location, result: TrainResult) -> None:
        """The best epoch's metrics, the model card and model, and the plots."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        best = result.metrics["best"]
        metrics = [Metric(f"best_{k}", float(best[k]), now, 0) for k in SCALAR_TAGS if k.startswith("val_")]
        with self._calling("log the run's metrics and artifacts"):
            self.client.log_batch(self.run_id, metrics=metrics)
            self.client.set_tag(self.run_id, "raysegment.model_id", result.card.model_id)
            with tempfile.TemporaryDirectory() as d:
                for name in (*MODEL_ARTIFACTS, *TRAINED_FILES):
                    local = _local_copy(out.child(name), d)
                    if local is not None:
                        self.client.log_artifact(self.run_id, local, "model" if name in MODEL_ARTIFACTS else None)

    def end(self, status: str) -> None:
        with self._calling(f"mark the run {status}"):
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
def mlflow_run(spec: TrainSpec, plan: TrainingPlan | None) -> Iterator[MlflowRun | None]:
    """The run while training and writing artifacts (None without --mlflow-uri): FINISHED on a clean exit,
    FAILED when the block raises (the block's error is the one that propagates; not tried when the last MLflow
    call failed, as when the block's error is MLflow's: another wait on a gone store would tell nothing)."""
    if not spec.mlflow_uri:
        yield None
        return
    run = MlflowRun.start(spec.mlflow_uri, spec, plan)
    try:
        yield run
    except BaseException:
        if not run.failing:
            with contextlib.suppress(Exception):
                run.end("FAILED")
        raise
    run.end("FINISHED")
