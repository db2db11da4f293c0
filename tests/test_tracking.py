"""Experiment tracking (#18 item 4): TensorBoard event files under OUT/tensorboard/, read back with
TensorFlow's own event reader, and `--mlflow-uri` logged to a real MLflow file store in tmp_path.

The MLflow tests need the `mlflow` extra (mlflow-skinny, about 60 MB, so not in the `test` extra):
`pip install -e '.[test,mlflow]'`. Without it they are skipped, and the missing-package error is
still tested. MLflow 3 keeps its file store only behind MLFLOW_ALLOW_FILE_STORE=true; the file store
needs nothing beyond mlflow-skinny, where a sqlite URI would need SQLAlchemy and Alembic too.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers import in_background, training_held_after_first_checkpoint, untrained_card, wait_for, write_source
from PIL import Image

from raysegment import storage
from raysegment.config import PrepareSpec, TrainSpec, load_spec
from raysegment.errors import ConfigError, StorageError
from raysegment.models.card import TENSORBOARD_DIR, TrainingPlan
from raysegment.train import tracking

HISTORY = [
    {
        "epoch": e,
        "train_loss": 1.0 / (e + 1),
        "val_pixel_accuracy": 0.5 + e / 10,
        "val_mean_iou": 0.25 + e / 10,
        "val_mean_dice": 0.3 + e / 10,
        "learning_rate": 1e-3,
        "images_per_second": 10.0 + e,
        "epoch_seconds": 2.0,
    }
    for e in range(3)
]


def png_bytes(h: int = 6, w: int = 10) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)).save(buf, format="PNG")
    return buf.getvalue()


def read_events(tb_dir: str | Path) -> tuple[list[str], dict[str, list[tuple[int, object]]], dict[str, str]]:
    """(event files, tag -> [(step, value)] in file order, tag -> plugin name), with TensorFlow's reader."""
    import tensorflow as tf

    files = sorted(f for f in os.listdir(tb_dir) if f.startswith("events.out.tfevents"))
    values: dict[str, list[tuple[int, object]]] = {}
    plugins: dict[str, str] = {}
    for name in files:
        for event in tf.compat.v1.train.summary_iterator(os.path.join(tb_dir, name)):
            for v in event.summary.value:
                plugins.setdefault(v.tag, v.metadata.plugin_data.plugin_name)
                array = tf.make_ndarray(v.tensor)
                values.setdefault(v.tag, []).append((event.step, array.item() if array.ndim == 0 else list(array)))
    return files, values, plugins


def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real MLflow file store under tmp_path (MLflow 3 wants the opt-in for it)."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install -e '.[mlflow]'")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv(tracking.MLFLOW_EXPERIMENT_ENV, raising=False)
    return (tmp_path / "mlruns").as_uri()


# --- TensorBoard, without training ----------------------------------------------------------------


def test_tensorboard_has_every_epoch_once_and_the_examples_at_the_best_epoch(tmp_path):
    dest = storage.resolve(str(tmp_path / "tensorboard"))
    examples = png_bytes()
    tracking.write_tensorboard(dest, HISTORY[:2], examples, best_epoch=1)
    # A re-run that resumed writes the whole history again: the directory is replaced, not added to.
    tracking.write_tensorboard(dest, HISTORY, examples, best_epoch=2)
    files, values, plugins = read_events(dest.path)
    assert len(files) == 1
    for column, tag in tracking.SCALAR_TAGS.items():
        assert plugins[tag] == "scalars"
        assert values[tag] == [(row["epoch"], pytest.approx(row[column])) for row in HISTORY]
    assert plugins[tracking.EXAMPLES_TAG] == "images"
    [(step, blob)] = values[tracking.EXAMPLES_TAG]
    assert step == 2 and blob == [b"10", b"6", examples]  # width, height, the PNG


@pytest.mark.s3
def test_tensorboard_on_s3_is_written_locally_then_uploaded_whole(s3_prefix, tmp_path):
    dest = storage.resolve(f"{s3_prefix}/model/tensorboard")
    tracking.write_tensorboard(dest, HISTORY[:2], png_bytes(), best_epoch=1)
    tracking.write_tensorboard(dest, HISTORY, png_bytes(), best_epoch=2)
    [path] = storage.list_files(dest)  # the second write replaced the first
    storage.download_file(dest.child(path.rsplit("/", 1)[1]), str(tmp_path / "events.out.tfevents.copy"))
    _, values, _ = read_events(tmp_path)
    assert [step for step, _ in values["val/mean_iou"]] == [0, 1, 2]


# --- MLflow, without training ---------------------------------------------------------------------


def test_a_missing_mlflow_package_is_one_clear_error_before_any_work(monkeypatch, tmp_path):
    from raysegment.train.trainer import train

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    (tmp_path / "spec.yaml").write_text(
        f"data: {tmp_path / 'no-data'}\nout: {tmp_path / 'out'}\nmlflow_uri: http://127.0.0.1:1\n"
    )
    spec = load_spec(TrainSpec, str(tmp_path / "spec.yaml"))
    with pytest.raises(ConfigError, match=r"pip install 'raysegment\[mlflow\]'") as err:
        train(spec)  # before the data set is read: it does not exist
    assert err.value.exit_code == 2


def test_a_failed_training_leaves_a_failed_run_with_its_params(tmp_path, monkeypatch):
    uri = mlflow_store(tmp_path, monkeypatch)
    spec = TrainSpec(data="s3://b/data", out="s3://b/models/unet1", epochs=3, mlflow_uri=uri)
    plan = TrainingPlan(values={"epochs": 3}, auto=["epochs", "crop"], given=["batch_size"], time_budget_s=60.0)
    with pytest.raises(RuntimeError, match="worker died"), tracking.mlflow_run(spec, plan) as run:
        raise RuntimeError("worker died")
    got = tracking.mlflow_client(uri).get_run(run.run_id)
    assert got.info.status == "FAILED" and got.info.run_name == "unet1"
    assert got.data.params["epochs"] == "3" and got.data.params["out"] == "s3://b/models/unet1"
    assert got.data.params["plan.auto"] == "epochs,crop" and got.data.params["plan.given"] == "batch_size"
    assert "mlflow_uri" not in got.data.params and "endpoint_url" not in got.data.params


def test_relative_data_and_out_are_recorded_as_the_absolute_paths_the_card_has(tmp_path, monkeypatch):
    uri = mlflow_store(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    spec = TrainSpec(data="data", out="models/unet1/", epochs=1, mlflow_uri=uri)
    with tracking.mlflow_run(spec, None) as run:
        pass
    got = tracking.mlflow_client(uri).get_run(run.run_id)
    data, out = str(tmp_path / "data"), str(tmp_path / "models" / "unet1")
    assert got.data.params["data"] == data and got.data.params["out"] == out and got.info.run_name == "unet1"
    assert got.data.tags["raysegment.data"] == data and got.data.tags["raysegment.out"] == out


def test_a_tracking_uri_the_client_refuses_is_one_line_naming_the_fix_before_any_work(tmp_path, monkeypatch):
    """MLflow picks its store when the client is made: a file store without the opt-in, a SQL store with
    mlflow-skinny, an unknown scheme were a traceback and exit 1."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install -e '.[mlflow]'")
    from raysegment.train.trainer import train

    monkeypatch.delenv(tracking.FILE_STORE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    fixes = {
        (tmp_path / "mlruns").as_uri(): "MLflow 3 opens a file store only when MLFLOW_ALLOW_FILE_STORE=true is set",
        "mlruns": "MLFLOW_ALLOW_FILE_STORE=true",  # a relative path is a file store too
        "bogus://x": r"MLflow has no store for bogus:// URIs; give a tracking server \(http://host:5000\)",
    }
    if not tracking._full_mlflow():  # the full package opens SQL stores
        fixes[f"sqlite:///{tmp_path}/ml.db"] = r"a sqlite store needs the full MLflow package \(pip install mlflow\)"
    for uri, fix in fixes.items():
        spec = TrainSpec(data=str(tmp_path / "no-data"), out=str(tmp_path / "out"), mlflow_uri=uri)
        with pytest.raises(ConfigError, match=fix) as err:
            train(spec)  # before the data set is read: it does not exist
        assert err.value.exit_code == 2 and "\n" not in str(err.value)
        assert str(err.value).startswith(f"--mlflow-uri {uri}: ")
    assert sorted(os.listdir(tmp_path)) == []  # no store, no OUT


def test_an_unreachable_tracking_server_fails_before_training(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install -e '.[mlflow]'")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spec = TrainSpec(data="d", out="o", mlflow_uri="http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(StorageError, match=r"--mlflow-uri http://127.0.0.1:9: could not create a run"):
        with tracking.mlflow_run(spec, None):
            pytest.fail("the run must not start")


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TinyServer(ThreadingHTTPServer):
    """A real HTTP server that reads each request and answers it with `answers[method]` (status, JSON body);
    a method it has no answer for is held without one until `release` is set, then its connection is
    closed unanswered (a server that stops answering). `requests` has the paths and bodies it read."""

    daemon_threads = True

    def __init__(self, answers: dict[str, tuple[int, dict]] | None = None) -> None:
        self.release = threading.Event()
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                server.requests.append((self.path, body))
                if self.command not in (answers or {}):
                    server.release.wait()
                    self.close_connection = True
                    return
                status, reply = (answers or {})[self.command]
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> TinyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def own_http_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLflow HTTP settings of the user's: raysegment's bounds apply."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install -e '.[mlflow]'")
    for key in tracking.HTTP_BOUNDS:
        monkeypatch.delenv(key, raising=False)


@pytest.mark.timeout(60)  # MLflow's own retries took about 4 minutes for a refused connection
def test_an_unreachable_tracking_server_is_refused_in_seconds_before_the_data_set_is_read(tmp_path, own_http_env):
    """The start-up check asks the server, within raysegment's bounds: a gone server was noticed only when the
    run was created, after the plan and minutes of MLflow's retries. The user's own MLflow settings are kept."""
    from raysegment.train.trainer import train

    uri = f"http://127.0.0.1:{closed_port()}"
    spec = TrainSpec(data=str(tmp_path / "no-data"), out=str(tmp_path / "out"), mlflow_uri=uri)
    with pytest.raises(ConfigError) as err:
        train(spec)  # before the data set is read: it does not exist
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert str(err.value).startswith(f"--mlflow-uri {uri}: no answer (") and "Connection refused" in str(err.value)
    assert "start the tracking server or correct the URI" in str(err.value)
    assert not any(key in os.environ for key in tracking.HTTP_BOUNDS)  # the bounds were for the check alone
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.timeout(60)
def test_a_tracking_server_that_stops_answering_is_refused_within_the_users_timeout(monkeypatch, own_http_env):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the user's: kept
    with TinyServer() as server, pytest.raises(ConfigError, match=r"no answer \(Read timed out. \(read timeout=1\)"):
        tracking.check_tracking(server.uri)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1"


@pytest.mark.timeout(60)
def test_mlflow_gone_mid_run_never_holds_the_epochs_and_is_one_warning(tmp_path, monkeypatch, caplog, own_http_env):
    """The live MLflow calls ran in the progress thread, which prints the epoch lines, with MLflow's retries:
    a server gone mid-run stopped the console for minutes, and each epoch waited again. Here the server
    holds the first request unanswered: the epochs go on meanwhile (TensorBoard has them), and after the
    failure MLflow is not tried again until training ends, when the failure is quick."""
    from raysegment.train.trainer import TrainResult

    uri = mlflow_store(tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")  # without a thread of its own rows() would hang
    with tracking.mlflow_run(TrainSpec(data="d", out=str(tmp_path / "o"), mlflow_uri=uri), None) as created:
        pass
    out = storage.resolve(str(tmp_path / "model"))
    dest = out.child(TENSORBOARD_DIR)
    h0, h1, h2 = HISTORY
    with TinyServer() as server:
        run = tracking.MlflowRun(tracking.mlflow_client(server.uri), server.uri, created.run_id)
        with tracking.LiveLog(dest, run) as live:
            live.rows([h0])
            wait_for(lambda: server.requests, "the epoch 0 request at the server", 30)
            live.rows([h1])  # while epoch 0's request is held
            assert live_epochs(Path(dest.path)) == [0, 1]
            server.release.set()  # the server goes: connections closed unanswered
        held = len(server.requests)  # epoch 0's request and MLflow's one retry: none for epoch 1
        assert {m["step"] for _, body in server.requests for m in json.loads(body)["metrics"]} == {0}
        live.rows([h2])  # after close: logged in finish only
        with pytest.raises(StorageError, match=rf"--mlflow-uri {server.uri}: could not log the run's epochs"):
            live.finish(out, [h0, h1, h2], TrainResult(out.uri, untrained_card(), {"best": h2}))
        assert len(server.requests) > held  # tried again at the end
    warnings = [r for r in caplog.records if "could not log epochs to MLflow" in r.getMessage()]
    assert len(warnings) == 1 and run.failing


@pytest.mark.timeout(60)
def test_a_tracking_server_that_refuses_the_credentials_names_mlflows_own(own_http_env):
    with TinyServer({"GET": (401, {"error_code": "UNAUTHENTICATED", "message": "login"})}) as server:
        with pytest.raises(
            ConfigError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
        ):
            tracking.check_tracking(server.uri)


def test_credentials_in_the_mlflow_uri_are_refused_naming_mlflows_variables(tmp_path):
    """The refusal named AWS_* variables, which MLflow does not read."""
    flags = {"data": str(tmp_path / "d"), "out": str(tmp_path / "o")}
    with pytest.raises(ConfigError) as err:
        load_spec(TrainSpec, None, {**flags, "mlflow_uri": "http://alice:s3cret@127.0.0.1:5000"})
    said = str(err.value)
    assert (
        "mlflow_uri" in said
        and "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN" in said
    )
    assert "AWS" not in said and "s3cret" not in said
    with pytest.raises(ConfigError, match="use AWS_\\* env vars or a profile"):  # object storage's own fix
        load_spec(TrainSpec, None, {**flags, "out": "s3://key:secret@bucket/o"})


def test_encoder_weights_are_a_param_only_where_an_encoder_uses_them(tmp_path):
    """A plain U-Net logged encoder_weights=imagenet, the unused default (its card says null)."""
    plain = tracking.run_params(TrainSpec(data="d", out="o"), None)
    assert plain["encoder"] == "null" and plain["encoder_weights"] == "null"
    encoded = tracking.run_params(TrainSpec(data="d", out="o", encoder="mobilenetv3large"), None)
    assert encoded["encoder"] == "mobilenetv3large" and encoded["encoder_weights"] == "imagenet"


# --- live: each epoch once, as the driver learns of it --------------------------------------------


def test_live_log_writes_each_epoch_once_across_restarts_and_resumes(tmp_path, monkeypatch):
    """The rows the driver hands LiveLog (events.follow): epoch ends, and a restored checkpoint's history. A worker
    group that restarts from checkpoint 0 posts its history and epoch 1 again: nothing is logged twice. A re-run
    that resumes starts from the checkpoint's history in a new MLflow run and a fresh TensorBoard directory."""
    from raysegment.train.trainer import TrainResult

    uri = mlflow_store(tmp_path, monkeypatch)
    out = storage.resolve(str(tmp_path / "model"))
    dest = out.child(TENSORBOARD_DIR)
    h0, h1, h2 = HISTORY
    spec = TrainSpec(data="d", out=out.uri, mlflow_uri=uri)
    result = TrainResult(out.uri, untrained_card(), {"best": h2})
    with tracking.mlflow_run(spec, None) as run:
        with tracking.LiveLog(dest, run) as live:
            live.rows([h0])
            live.rows([h1])
            _, values, _ = read_events(dest.path)  # uploaded after each epoch, while training goes on
            assert [step for step, _ in values["train/loss"]] == [0, 1]
            live.rows([h0])  # Resumed: the restart's checkpoint history
            live.rows([{**h1, "train_loss": 9.0}])  # epoch 1 run again: its first values stay
            live.rows([h2])
        live.finish(out, [h0, h1, h2], result)
    files, values, _ = read_events(dest.path)
    assert len(files) == 1 and values["train/loss"] == [
        (e, pytest.approx(r["train_loss"])) for e, r in enumerate(HISTORY)
    ]
    client = tracking.mlflow_client(uri)
    assert client.get_run(run.run_id).data.tags["raysegment.model_id"] == "unet-test"  # the result's card
    loss = client.get_metric_history(run.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in loss) == [(r["epoch"], pytest.approx(r["train_loss"])) for r in HISTORY]

    # A re-run that resumed after epoch 1: the history first, then epoch 2; the final history has an epoch
    # whose post was lost (epoch 3), which finish() adds.
    h3 = {**h2, "epoch": 3}
    with tracking.mlflow_run(spec, None) as again:
        with tracking.LiveLog(dest, again) as live:
            live.rows([h0, h1])
            live.rows([h2])
        live.finish(out, [h0, h1, h2, h3], result)
    files, values, _ = read_events(dest.path)
    assert len(files) == 1 and [step for step, _ in values["val/mean_iou"]] == [0, 1, 2]  # the live file, alone
    steps = sorted(m.step for m in client.get_metric_history(again.run_id, "val_mean_iou"))
    assert steps == [0, 1, 2, 3] and client.get_run(again.run_id).data.metrics["best_val_mean_iou"] == pytest.approx(
        h2["val_mean_iou"]
    )


# --- one real tiny training run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(ray_cluster, tmp_path_factory):
    from raysegment.data.prepare import prepare

    root = tmp_path_factory.mktemp("tracking")
    src = write_source(str(root / "src"), count=24)
    prepare(PrepareSpec(source=src, dest=str(root / "data"), val_fraction=0.25))
    return root


def invoke_train(*argv: str):
    from click.testing import CliRunner

    from raysegment.cli import main

    result = CliRunner().invoke(main, ["train", *argv])
    print(result.output[-3000:])
    return result


def live_epochs(tb_dir: Path) -> list[int]:
    """The epochs of train/loss in OUT/tensorboard's event files so far."""
    if not tb_dir.is_dir():
        return []
    return [step for step, _ in read_events(tb_dir)[1].get("train/loss", [])]


@pytest.mark.timeout(120)
def test_a_tracking_server_that_refuses_the_run_leaves_a_finished_model_as_it_was(tiny_data, tmp_path, own_http_env):
    """The server answers the start-up check but refuses to create the run: train fails, and OUT's _SUCCESS
    (a finished model's marker) stays. It was removed before the run was created."""
    from raysegment.train.trainer import train

    out = storage.resolve(str(tmp_path / "model"))
    storage.mark_success(out, {"model_id": "unet-earlier"})
    marker = (tmp_path / "model" / "_SUCCESS").read_bytes()
    answers = {
        "GET": (404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}),
        "POST": (403, {"error_code": "PERMISSION_DENIED", "message": "may not create experiments"}),
    }
    with TinyServer(answers) as server:
        spec = TrainSpec(
            data=str(tiny_data / "data"), out=out.uri, epochs=1, workers=1, image_size=32, depth=2, base_filters=4,
            tta_check=False, mlflow_uri=server.uri,
        )  # fmt: skip
        with pytest.raises(StorageError, match="could not create a run.*PERMISSION_DENIED"):
            train(spec)
    assert (tmp_path / "model" / "_SUCCESS").read_bytes() == marker


@pytest.mark.slow
def test_training_logs_each_epoch_while_it_runs_then_writes_the_artifacts(tiny_data, tmp_path, monkeypatch):
    """Ray Train's controller holds the run after its first checkpoint (helpers.training_held_after_first_checkpoint),
    so it cannot end while the test looks: epoch 0 is in the TensorBoard events and the RUNNING MLflow run."""
    from raysegment.train.trainer import train

    uri = mlflow_store(tmp_path, monkeypatch)
    out = tmp_path / "model"
    spec = TrainSpec(
        data=str(tiny_data / "data"), out=str(out), epochs=2, workers=1, image_size=32, batch_size=4, depth=2,
        base_filters=4, max_steps=1, resume=False, tta_check=False, mlflow_uri=uri,
    )  # fmt: skip
    client = tracking.mlflow_client(uri)
    with training_held_after_first_checkpoint(tmp_path / "hold") as hold:
        job = in_background(lambda: train(spec))
        hold.wait_reported(job)
        wait_for(lambda: 0 in live_epochs(out / "tensorboard"), "epoch 0 in OUT/tensorboard", 120, job)
        [run] = client.search_runs([client.get_experiment_by_name("raysegment").experiment_id])
        # MLflow is logged to on a thread of its own, after the TensorBoard events.
        wait_for(
            lambda: 0 in [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")],
            "epoch 0 in the MLflow run",
            60,
            job,
        )
        assert run.info.status == "RUNNING" and not job.done() and not (out / "model.keras").exists()
        hold.release()
        result = job.result(timeout=600)
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in history] == [0, 1] and result.mlflow_run_id == run.info.run_id

    files, values, _ = read_events(out / "tensorboard")
    assert len(files) == 1  # the final file replaced the live one
    for column, tag in tracking.SCALAR_TAGS.items():
        assert values[tag] == [(int(row["epoch"]), pytest.approx(float(row[column]))) for row in history]
    card = json.loads((out / "model.json").read_text())
    [(step, blob)] = values[tracking.EXAMPLES_TAG]
    assert step == card["best_epoch"] and blob[2] == (out / "examples.png").read_bytes()

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raysegment.model_id"] == card["model_id"]
    assert run.data.params["epochs"] == "2" and run.data.params["max_steps"] == "1"
    assert "plan.auto" in run.data.params  # the plan filled in what the spec did not give
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in loss) == [
        (int(row["epoch"]), pytest.approx(float(row["train_loss"]))) for row in history
    ]
    assert run.data.metrics["best_val_mean_iou"] == pytest.approx(card["metrics"]["val_mean_iou"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "plan.json", "metrics.json", "history.csv", "examples.png"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert model_files == {"model/model.keras", "model/model.json"}
    logged_card = client.download_artifacts(run.info.run_id, "model/model.json", str(tmp_path))
    assert json.loads(Path(logged_card).read_text()) == card


@pytest.mark.slow
def test_cli_with_mlflow_uri_but_no_mlflow_exits_2(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    r = invoke_train(str(tmp_path / "data"), str(tmp_path / "out"), "--mlflow-uri", "http://127.0.0.1:1")
    assert r.exit_code == 2 and "pip install 'raysegment[mlflow]'" in r.output


def test_the_train_summary_names_the_mlflow_run():
    """The run id was in train's result only: neither the summary nor --json showed where the run went."""
    from raysegment import registry
    from raysegment.train.trainer import TrainResult

    best = {"epoch": 1, "val_mean_iou": 0.9, "val_pixel_accuracy": 0.95}
    metrics = {"best": best, "last": best, "epochs_run": 2, "stopped_early": False, "seconds": 3.0, "plan": None}
    result = TrainResult("/m", untrained_card(), metrics, mlflow_run_id="abc123")
    assert "  mlflow     run abc123" in registry._train_lines(None, result)
    assert registry._train_payload(None, result) == {
        "out": "/m", "model_id": "unet-test", "best": best, "last": best, "epochs_run": 2, "stopped_early": False,
        "val_pixels": None, "seconds": 3.0, "mlflow_run_id": "abc123", "already_trained": False,
    }  # fmt: skip
    result = dataclasses.replace(result, mlflow_run_id=None)
    assert not any("mlflow" in line for line in registry._train_lines(None, result))
