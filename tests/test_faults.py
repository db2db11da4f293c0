"""Faults the jobs survive, with the real parts: SIGKILLed task workers and drivers, an S3 outage,
a corrupt checkpoint (on S3: test_pipeline_s3.py). Each test checks that nothing is lost or duplicated."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
from test_infer import assert_one_row_and_mask_per_key, write_images

from raysegment.config import InferSpec
from raysegment.inference.pipeline import infer

pytestmark = pytest.mark.slow

RAYSEGMENT = str(Path(sys.executable).parent / "raysegment")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def has_summary(out) -> bool:
    return any(f.endswith(".parquet") for _, _, fs in os.walk(os.path.join(out, "summaries")) for f in fs)


def in_thread(fn) -> tuple[threading.Thread, dict]:
    """Run fn in a thread; its result or exception lands in the returned dict."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # the test inspects it
            box["error"] = exc

    job = threading.Thread(target=run)
    job.start()
    return job, box


def test_killed_task_worker_is_retried(tiny_model, tmp_path):
    """SIGKILL the process of a running decode or write task: Ray re-runs the task, nothing is lost."""
    _, model = tiny_model
    keys = write_images(tmp_path / "in", 100)
    out = str(tmp_path / "out")
    job, box = in_thread(lambda: infer(InferSpec(model=model, input=str(tmp_path / "in"), output=out, batch_size=2)))
    killed = []

    def kill_a_task_worker() -> bool:
        for p in psutil.process_iter(["cmdline"]):
            title = " ".join(p.info["cmdline"] or [])
            if title.startswith("ray::MapBatches(write_outputs)") or title.startswith("ray::MapBatches(preprocess)"):
                os.kill(p.pid, signal.SIGKILL)
                killed.append(title)
                return True
        return not job.is_alive()

    wait_for(kill_a_task_worker, 240, "a running task worker", interval=0.05)
    job.join(timeout=600)
    assert killed, "the run finished before a task worker could be killed"
    assert "error" not in box, box.get("error")
    assert box["result"]["counts"]["total"] == 100
    assert_one_row_and_mask_per_key(out, keys)


def test_killed_driver_then_rerun_completes(tiny_model, ray_cluster, tmp_path):
    """SIGKILL the CLI driver mid-run; the same command run again resumes and completes exactly."""
    _, model = tiny_model
    keys = write_images(tmp_path / "in", 100)
    out = str(tmp_path / "out")
    cmd = [RAYSEGMENT, "infer", model, str(tmp_path / "in"), out, "--batch-size", "2", "--no-report"]
    driver = subprocess.Popen(cmd, env=ray_cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: has_summary(out) or driver.poll() is not None, 240, "the first summary file")
        assert driver.poll() is None, "the run finished before its driver could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    # Ray tears down a dead driver's actors and tasks; wait for that before the re-run.
    def predictors_gone() -> bool:
        alive = ray.util.state.list_actors(address=ray_cluster.address, filters=[("state", "=", "ALIVE")])
        return not [a for a in alive if "Predictor" in a.class_name]

    wait_for(predictors_gone, 60, "the killed driver's actors to exit", interval=0.5)
    rerun = subprocess.run(cmd, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already done" in rerun.stdout
    assert_one_row_and_mask_per_key(out, keys)
    assert len(os.listdir(os.path.join(out, "runs"))) == 1  # the killed run never claimed completion


@pytest.mark.s3
def test_s3_outage_is_retried_or_fails_clearly(tiny_model, s3_server, s3_prefix, tmp_path):
    """The S3 server stops mid-run. Past the retry deadline the job fails with a clear message and no
    _SUCCESS; back within the deadline, reads and writes are retried and the job completes exactly."""
    _, model = tiny_model
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint_url}, skip_instance_cache=True)
    bucket = s3_prefix[len("s3://") :]
    keys = write_images(tmp_path / "in", 60)
    fs.put(str(tmp_path / "in"), f"{bucket}/in", recursive=True)
    spec = {"model": model, "input": f"{s3_prefix}/in", "output": f"{s3_prefix}/out", "batch_size": 2}

    def summaries_written() -> bool:
        fs.invalidate_cache()
        return bool(fs.glob(f"{bucket}/out/summaries/**/*.parquet"))

    # 1. Down for longer than a 3 s deadline: a clear failure.
    job, box = in_thread(lambda: infer(InferSpec(**spec, storage_retry_s=3)))
    wait_for(lambda: summaries_written() or not job.is_alive(), 240, "the first summary on S3")
    assert job.is_alive(), "the run finished before the outage"
    s3_server.stop()
    try:
        job.join(timeout=300)
    finally:
        s3_server.start()
    assert "error" in box, "the job reported success with its storage down"
    message = str(box["error"])
    assert "still failing after" in message and "storage_retry_s" in message, message
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/_SUCCESS")

    # 2. Down for a few seconds, well within the default deadline: the job rides it out.
    before = len(fs.glob(f"{bucket}/out/summaries/**/*.parquet"))

    def rerun_wrote() -> bool:
        fs.invalidate_cache()
        return len(fs.glob(f"{bucket}/out/summaries/**/*.parquet")) > before

    job, box = in_thread(lambda: infer(InferSpec(**spec)))
    wait_for(lambda: rerun_wrote() or not job.is_alive(), 240, "the re-run's first summary")
    assert job.is_alive(), "the re-run finished before the outage"
    s3_server.stop()
    try:
        time.sleep(6)
    finally:
        s3_server.start()
    job.join(timeout=600)
    assert "error" not in box, box.get("error")
    fs.invalidate_cache()
    rows = []
    for path in fs.find(f"{bucket}/out/summaries"):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    assert sorted(rows) == sorted(keys)  # one row per key across the failed run and the re-run
    assert sorted(p.rsplit("/", 1)[1][:-4] for p in fs.find(f"{bucket}/out/masks")) == sorted(keys)
    assert fs.exists(f"{bucket}/out/_SUCCESS")
