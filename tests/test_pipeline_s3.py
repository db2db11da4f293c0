"""Every stage with every URI on s3:// against the real S3 server (SeaweedFS)."""

import csv
import io
import json
import os

import pyarrow.parquet as pq
import pytest
import s3fs
from helpers import TINY, write_infer_inputs, write_source

from raysegment import storage
from raysegment.config import EvaluateSpec, InferSpec, PrepareSpec, TrainSpec
from raysegment.data.prepare import prepare
from raysegment.errors import StorageError
from raysegment.evaluate import evaluate
from raysegment.inference.pipeline import infer
from raysegment.train.trainer import train

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_prepare_train_evaluate_infer_on_s3(ray_cluster, s3_prefix, tmp_path, caplog):
    """Every stage on S3; then a truncated latest checkpoint in the bucket is detected (sha256 in
    state.json) and the one before it used: resuming keeps every epoch exactly once."""
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": ray_cluster.s3.endpoint_url})
    bucket_path = s3_prefix[len("s3://") :]
    fs.put(write_source(str(tmp_path / "src"), count=40), f"{bucket_path}/src", recursive=True)
    write_infer_inputs(str(tmp_path / "in"))
    fs.put(str(tmp_path / "in"), f"{bucket_path}/in", recursive=True)

    manifest = prepare(PrepareSpec(source=f"{s3_prefix}/src", dest=f"{s3_prefix}/data", val_fraction=0.25))
    assert manifest.counts.total == 40
    assert fs.exists(f"{bucket_path}/data/manifest.json")

    spec = {"data": f"{s3_prefix}/data", "out": f"{s3_prefix}/model"} | TINY | {"epochs": 2}
    train(TrainSpec(**spec))
    for name in ("model.keras", "model.json", "metrics.json", "_SUCCESS"):
        assert fs.exists(f"{bucket_path}/model/{name}"), name
    checkpoints = sorted(p for p in fs.glob(f"{bucket_path}/model/train/checkpoint_*") if fs.isdir(p))
    assert len(checkpoints) == 2, "Ray Train checkpoints go to the bucket, one per epoch"

    m = evaluate(EvaluateSpec(model=f"{s3_prefix}/model", data=f"{s3_prefix}/data"))
    assert m["images"] == manifest.counts.val and m["written_to"].startswith("s3://")

    run = infer(InferSpec(model=f"{s3_prefix}/model", input=f"{s3_prefix}/in", output=f"{s3_prefix}/out", batch_size=2))
    assert run["counts"] == {"total": 6, "skipped": 0, "processed": 6, "ok": 3, "error": 3}
    masks = sorted(p.split("/masks/", 1)[1] for p in fs.find(f"{bucket_path}/out/masks"))
    assert masks == ["a.png", "b.png", "nested/c.png"]
    with fs.open(fs.find(f"{bucket_path}/out/summaries")[0], "rb") as f:
        assert "status" in pq.read_schema(f).names
    assert json.loads(fs.cat_file(f"{bucket_path}/out/_SUCCESS"))["run_id"] == run["run_id"]

    latest = checkpoints[-1]
    assert json.loads(fs.cat_file(f"{latest}/state.json"))["epoch"] == 1
    weights = fs.cat_file(f"{latest}/model.weights.h5")
    fs.pipe_file(f"{latest}/model.weights.h5", weights[: len(weights) // 2])
    # As if stopped while its last checkpoint was written: no _SUCCESS (a finished run is kept, not resumed).
    fs.rm(f"{bucket_path}/model/_SUCCESS")
    result = train(TrainSpec(**spec | {"resume": True}))
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{bucket_path}/model/history.csv").decode())))
    assert [int(r["epoch"]) for r in rows] == [0, 1]  # epoch 1 redone from the epoch-0 checkpoint
    assert result.metrics["epochs_run"] == 2
    (resumed,) = result.metrics["resumes"]
    assert resumed["from_epoch"] == 0 and "checkpoint_" in resumed["checkpoint"]
    assert len(resumed["skipped"]) == 1 and latest.rstrip("/").rsplit("/", 1)[1] in resumed["skipped"][0]
    assert "skipped unreadable checkpoint" in caplog.text
    assert_no_credentials(fs, bucket_path, ray_cluster.s3)


def assert_no_credentials(fs, bucket_path: str, server) -> None:
    """The credentials in the environment appear in no output object and no Ray log."""
    import ray

    secrets = [server.secret_key.encode(), server.access_key.encode()]
    checked = 0
    for path in fs.find(bucket_path):
        data = fs.cat_file(path)
        assert not any(s in data for s in secrets), f"credentials in s3://{path}"
        checked += 1
    logs = ray._private.worker._global_node.get_logs_dir_path()
    for root, _, files in os.walk(logs):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            assert not any(s in data for s in secrets), f"credentials in Ray log {name}"
            checked += 1
    assert checked > 20  # manifest, shards, checkpoints, model card, summaries, masks, run record, logs


def test_storage_errors_name_the_uri(s3_server, monkeypatch):
    missing = storage.resolve("s3://no-such-bucket-raysegment/x")
    with pytest.raises(StorageError, match="s3://no-such-bucket-raysegment/x: (bucket does not exist|not found)"):
        storage.check_readable(missing)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    bad = storage.resolve(f"s3://{s3_server.bucket}/x")
    with pytest.raises(StorageError, match="access denied or bad credentials") as err:
        storage.check_writable(bad)
    assert "wrong-secret" not in str(err.value)
