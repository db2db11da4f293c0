"""Faults the jobs survive, with the real parts: SIGKILLed task workers and drivers, an S3 outage,
a corrupt checkpoint (on S3: test_pipeline_s3.py). Each test checks that nothing is lost or duplicated.

The kills cannot race the job: a named pipe among the inputs (helpers.PipeBarrier) holds the job
until the fault is in place, and the test acts on events the job signals (a committed summary)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from helpers import (
    PipeBarrier,
    assert_one_row_and_mask_per_key,
    assert_one_row_and_mask_per_key_on_s3,
    has_summary,
    in_background,
    kill_driver_when,
    png,
    wait_for,
    wait_predictors_gone,
    write_images,
)

from raysegment import storage
from raysegment.config import InferSpec
from raysegment.inference.output import summary_files, write_masks
from raysegment.inference.pipeline import infer

pytestmark = pytest.mark.slow

RAYSEGMENT = str(Path(sys.executable).parent / "raysegment")
BARRIER_KEY = "zz-barrier/hold"


def s3(server) -> s3fs.S3FileSystem:
    """A client with no listing cache, so every poll sees the bucket as it is."""
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint_url}, skip_instance_cache=True)


def running_task(function_name: str) -> int | None:
    """The pid of a Ray worker process running a Ray Data task of that function, if any."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith("ray::") and f"MapBatches({function_name})" in title:
            return p.info["pid"]
    return None


@pytest.mark.s3
def test_killed_task_worker_is_retried(tiny_model, s3_server, s3_prefix, tmp_path):
    """SIGKILL the process of a running write task: Ray re-runs the task, nothing is lost or doubled.

    The task is held for the kill: the barrier keeps the job from finishing until the S3 output is
    paused; released, its batch goes on to a write task that waits on the paused store."""
    _, model = tiny_model
    keys = write_images(tmp_path / "in", 40)
    out = f"{s3_prefix}/out"
    with PipeBarrier(tmp_path / "in" / f"{BARRIER_KEY}.png") as barrier:
        job = in_background(
            lambda: infer(InferSpec(model=model, input=str(tmp_path / "in"), output=out, batch_size=2, summary_rows=2))
        )
        wait_for(lambda: summary_files(storage.resolve(out)), "the first committed summary", job=job)
        with s3_server.paused():
            barrier.release(job)
            writer = wait_for(lambda: running_task(write_masks.__name__), "a write task held by the store", job=job)
            os.kill(writer, signal.SIGKILL)
        record = job.result(timeout=600)
    assert record["counts"]["total"] == 41
    assert_one_row_and_mask_per_key_on_s3(out, keys, unreadable=(BARRIER_KEY,))


def test_killed_driver_then_rerun_completes(tiny_model, ray_cluster, tmp_path):
    """SIGKILL the CLI driver mid-run; the same command run again resumes and completes exactly."""
    _, model = tiny_model
    keys = write_images(tmp_path / "in", 40)  # the pipe holds the run open until the kill, whatever the count
    out = str(tmp_path / "out")
    cmd = [
        RAYSEGMENT,
        "infer",
        model,
        str(tmp_path / "in"),
        out,
        "--batch-size",
        "2",
        "--summary-rows",
        "2",
        "--no-report",
    ]
    with PipeBarrier(tmp_path / "in" / f"{BARRIER_KEY}.png") as barrier:
        driver = subprocess.Popen(cmd, env=ray_cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_driver_when(driver, lambda: has_summary(out), "its first summary file")
        assert not os.path.exists(os.path.join(out, "_SUCCESS"))
        wait_predictors_gone(ray_cluster.address)
        barrier.replace_with(png(999))
    rerun = subprocess.run(cmd, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already done" in rerun.stdout
    assert_one_row_and_mask_per_key(out, [*keys, BARRIER_KEY])
    assert len(os.listdir(os.path.join(out, "runs"))) == 1  # the killed run never claimed completion


@pytest.mark.s3
def test_s3_outage_is_retried_or_fails_clearly(tiny_model, s3_server, s3_prefix, tmp_path):
    """The S3 server stops while the job waits on its last input (a local pipe listed among the S3
    images, so rows are left to write during the outage). Past the retry deadline the job fails with a
    clear message and no _SUCCESS; back within the deadline, writes are retried and the job completes
    exactly."""
    _, model = tiny_model
    fs = s3(s3_server)
    bucket = s3_prefix[len("s3://") :]
    write_images(tmp_path / "in", 20)
    fs.put(str(tmp_path / "in"), f"{bucket}/in", recursive=True)
    hold = tmp_path / "hold" / "hold.png"
    names = sorted(p.name for p in (tmp_path / "in").iterdir())  # some are .PNG
    uris = [f"{s3_prefix}/in/{name}" for name in names]
    keys = [name.rsplit(".", 1)[0] for name in names]
    pq.write_table(pa.table({"uri": [*uris, str(hold)], "key": [*keys, "hold"]}), tmp_path / "list.parquet")
    spec = {"model": model, "input": str(tmp_path / "list.parquet"), "output": f"{s3_prefix}/out"}
    spec |= {"batch_size": 2, "summary_rows": 2}

    # 1. Down for longer than a 3 s deadline: a clear failure.
    with PipeBarrier(hold) as barrier:
        job = in_background(lambda: infer(InferSpec(**spec, storage_retry_s=3)))
        barrier.hold(job)
        s3_server.stop()
        try:
            barrier.release(job)  # the pipe's error row needs its summary file on S3
            error = job.exception(timeout=300)
        finally:
            s3_server.start()
    assert error is not None, "the job reported success with its storage down"
    assert "still failing after" in str(error) and "storage_retry_s" in str(error), error
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/_SUCCESS")

    # 2. Down for a few seconds, well within the default deadline: the job rides it out.
    with PipeBarrier(hold) as barrier:
        job = in_background(lambda: infer(InferSpec(**spec)))
        barrier.hold(job)
        s3_server.stop()
        try:
            barrier.release(job)
            time.sleep(6)  # the length of the outage, not a wait for the job
        finally:
            s3_server.start()
        job.result(timeout=600)
    assert_one_row_and_mask_per_key_on_s3(spec["output"], keys, unreadable=("hold",))  # across both runs
