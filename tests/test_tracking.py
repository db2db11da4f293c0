"""Experiment tracking (#18 item 4): TensorBoard event files under OUT/tensorboard/, read back with
TensorFlow's own event reader, and `--mlflow-uri` logged to a real MLflow file store in tmp_path.

The MLflow tests need the `mlflow` extra (mlflow-skinny, about 60 MB, so not in the `test` extra):
`pip install -e '.[test,mlflow]'`. Without it they are skipped, and the missing-package error is
still tested. MLflow 3 keeps its file store only behind MLFLOW_ALLOW_FILE_STORE=true; the file store
needs nothing beyond mlflow-skinny, where a sqlite URI would need SQLAlchemy and Alembic too.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import in_background, training_held_after_first_checkpoint, wait_for, write_source
from PIL import Image

from raysegment import storage
from raysegment.config import PrepareSpec, TrainSpec, load_spec
from raysegment.errors import ConfigError, StorageError
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
    plan = {"auto": ["epochs", "crop"], "given": ["batch_size"], "time_budget_s": 60.0, "values": {"epochs": 3}}
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


# --- live: each epoch once, as the driver learns of it --------------------------------------------


def test_live_log_writes_each_epoch_once_across_restarts_and_resumes(tmp_path, monkeypatch):
    """The rows the driver hands LiveLog (events.follow): epoch ends, and a restored checkpoint's history. A worker
    group that restarts from checkpoint 0 posts its history and epoch 1 again: nothing is logged twice. A re-run
    that resumes starts from the checkpoint's history in a new MLflow run and a fresh TensorBoard directory."""
    uri = mlflow_store(tmp_path, monkeypatch)
    out = storage.resolve(str(tmp_path / "model"))
    dest = out.child(tracking.TENSORBOARD_DIR)
    h0, h1, h2 = HISTORY
    spec = TrainSpec(data="d", out=out.uri, mlflow_uri=uri)
    result = {"metrics": {"best": h2}, "model_card": {"model_id": "unet-0"}}
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
        assert 0 in [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert run.info.status == "RUNNING" and not job.done() and not (out / "model.keras").exists()
        hold.release()
        result = job.result(timeout=600)
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in history] == [0, 1] and result["mlflow_run_id"] == run.info.run_id

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
