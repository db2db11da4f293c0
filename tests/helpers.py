"""Shared test helpers: tiny data sets and bad inputs, checks on an inference output, jobs run in
the background, and the barriers that hold a job until a test has injected its fault.

A fault test must not depend on how fast the machine is: the job is held at a barrier the test
releases only after the fault (a named pipe among the inputs, a hold in Ray Train's controller),
the test waits for events the job signals (a committed summary, a reported checkpoint), never on
a sleep, and a job that fails surfaces its own error (`in_background(...).result()`).
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raysegment import storage
from raysegment.data import synthetic
from raysegment.data.fingerprint import Fingerprint
from raysegment.data.imaging import default_palette
from raysegment.data.manifest import FORMAT_VERSION, Manifest
from raysegment.inference.output import commit_rows, summary_files, write_masks
from raysegment.models.card import ModelCard

T = TypeVar("T")

# No TTA measurement at the end (tests/test_tta.py covers it, on the session's tiny_model).
TINY = {
    "epochs": 1,
    "workers": 2,
    "image_size": 32,
    "batch_size": 4,
    "depth": 2,
    "base_filters": 4,
    "resume": False,
    "tta_check": False,
}

# Extra S3 users of the session's server (conftest.s3_server), for permission-denied tests.
S3_TEST_BUCKET = "raysegment-test"
READ_ONLY_KEY = "raysegment-reader"
MASKS_ONLY_KEY = "raysegment-masks-only"
MASKS_ONLY_OUTPUT = f"s3://{S3_TEST_BUCKET}/masks-only/out"
IDENTITIES = {
    READ_ONLY_KEY: ["Read", "List"],
    # May write OUTPUT's masks (and the write probe), not its summaries: denied mid-run.
    MASKS_ONLY_KEY: [
        "Read",
        "List",
        f"Write:{S3_TEST_BUCKET}/masks-only/out/masks/*",
        f"Write:{S3_TEST_BUCKET}/masks-only/out/.write-probe*",
        f"Write:{S3_TEST_BUCKET}/masks-only/out/_infer.lock*",  # the run's lock, taken before any mask
    ],
}


# --- data ---------------------------------------------------------------------------------------


def untrained_card() -> ModelCard:
    """A 2-class model card for a model no test trains (its model_sha256 matches no file)."""
    return ModelCard(
        model_id="unet-test",
        model_sha256="a" * 64,
        num_classes=2,
        class_names=["background", "thing"],
        palette=[(0, 0, 0), (200, 0, 0)],
        input={"size": (8, 8)},
    )


def fingerprint(side: int = 128, shares=(0.7, 0.3), areas=(5000.0, 400.0), top=None, modes=None) -> Fingerprint:
    """A crafted data set fingerprint (side x side RGB images; per-class shares, object areas, top shares),
    for the training plan's rules without a data set."""
    k = len(shares)
    return Fingerprint(
        images=100,
        height={"min": side, "median": float(side), "max": side},
        width={"min": side, "median": float(side), "max": side},
        modes=modes or {"RGB": 100},
        channels={"3": 100},
        intensity={"mean": [120.0] * 3, "std": [40.0] * 3, "p0.5": [2.0] * 3, "p50": [118.0] * 3, "p99.5": [250.0] * 3},
        class_pixel_share=list(shares),
        class_image_share=[1.0] * k,
        object_area_median=list(areas),
        sampled_images=32,
        class_top_share=list(top or [0.5] * k),
        class_left_share=[0.5] * k,
    )


def manifest(**fields: Any) -> Manifest:
    """A crafted data set's manifest (2 classes, 50 train and 5 val images unless `fields`, manifest.json's keys,
    say otherwise; one shard per split that has images), read as `read_manifest` reads one."""
    counts = fields.get("counts", {"train": 50, "val": 5})
    k = fields.get("num_classes", 2)
    shards = [
        {"path": f"shards/{s}-00000.parquet", "split": s, "rows": n, "bytes": 1, "sha256": "0" * 64}
        for s, n in counts.items()
        if n
    ]
    data = {
        "format_version": FORMAT_VERSION,
        "layout": "pairs",
        "num_classes": k,
        "class_names": [f"class_{i}" for i in range(k)],
        "palette": default_palette(k),
        "ignore_index": 255,
        "counts": counts,
        "shards": shards,
        "content_hash": "h",
        **fields,
    }
    return Manifest.from_json(data, "crafted manifest.json")


def write_source(root: str, count: int = 40, size: int = 32) -> str:
    synthetic.write_pairs(root, count, size=size, seed=7)
    return root


def write_infer_inputs(root: str) -> dict[str, list[str]]:
    """Three good images of odd sizes (one nested) and three bad files."""
    os.makedirs(os.path.join(root, "nested"), exist_ok=True)
    good = {"a": (40, 52), "b": (33, 33), "nested/c": (64, 20)}
    for key, (h, w) in good.items():
        img, _ = synthetic.make_example(hash(key) % 1000, size=64)
        Image.fromarray(img).resize((w, h)).save(os.path.join(root, f"{key}.png"))
    data = open(os.path.join(root, "a.png"), "rb").read()
    with open(os.path.join(root, "corrupt.png"), "wb") as f:
        f.write(data[: len(data) // 3])
    open(os.path.join(root, "empty.png"), "wb").close()
    with open(os.path.join(root, "notes.jpg"), "w") as f:
        f.write("this is a text file, not a JPEG\n")
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("not an image extension: never listed\n")
    return {"good": list(good), "bad": ["corrupt", "empty", "notes"], "sizes": good}


def png(i: int, size: int = 32) -> bytes:
    img, _ = synthetic.make_example(1000 + i, size=size)
    return synthetic.png_bytes(img)


def write_images(root: str | Path, n: int, start: int = 0) -> list[str]:
    """n synthetic PNGs img{i:04d}.png (every fifth spelled .PNG) directly under root; their keys."""
    os.makedirs(root, exist_ok=True)
    keys = []
    for i in range(start, start + n):
        with open(os.path.join(root, f"img{i:04d}.PNG" if i % 5 == 0 else f"img{i:04d}.png"), "wb") as f:
            f.write(png(i))
        keys.append(f"img{i:04d}")
    return keys


# --- inference outputs --------------------------------------------------------------------------


def mask_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.mode == "P"
        arr = np.asarray(img)
    return arr.shape


def write_outputs(
    batch: dict[str, np.ndarray], output: storage.Location, card: ModelCard, run_id: str, mask_format: str
) -> str:
    """One batch's masks and its own summary file, as the pipeline's last stage writes them (no Ray);
    the summary's URI."""
    return commit_rows(output, run_id, write_masks(batch, output, card, run_id, mask_format))


def summaries(out: str | Path) -> list[dict[str, Any]]:
    return pq.read_table(
        os.path.join(out, "summaries"),
        columns=["key", "source_uri", "status", "error", "mask_uri", "mask_offset", "mask_length", "run_id"],
    ).to_pylist()


def has_summary(out: str | Path) -> bool:
    """Whether a local output holds a committed summary file (the commit of a batch)."""
    return any(f.endswith(".parquet") for _, _, fs in os.walk(os.path.join(out, "summaries")) for f in fs)


def assert_one_row_and_mask_per_key(out: str | Path, keys: list[str], unreadable: tuple[str, ...] = ()) -> None:
    """Exactly one summary row per key, a mask for each readable key, and _SUCCESS.

    ``unreadable`` keys (a released PipeBarrier) have their one row, an error row, and no mask."""
    rows = summaries(out)
    assert sorted(r["key"] for r in rows) == sorted([*keys, *unreadable])  # exactly one row per key
    assert all(r["status"] == "error" for r in rows if r["key"] in unreadable)
    masks = []
    for folder, _, files in os.walk(os.path.join(out, "masks")):
        masks += [
            os.path.relpath(os.path.join(folder, os.path.splitext(f)[0]), os.path.join(out, "masks")) for f in files
        ]
    assert sorted(masks) == sorted(keys)
    assert os.path.exists(os.path.join(out, "_SUCCESS"))


def assert_one_row_and_mask_per_key_on_s3(out: str, keys: list[str], unreadable: tuple[str, ...] = ()) -> None:
    """`assert_one_row_and_mask_per_key` for an OUTPUT on S3, the error rows exactly the unreadable keys."""
    loc = storage.resolve(out)
    table = pa.concat_tables(storage.read_table(loc, p, ["key", "status", "error"]) for p in summary_files(loc))
    assert sorted(table["key"].to_pylist()) == sorted([*keys, *unreadable])  # one row per key across every run
    errors = {r["key"]: r["error"] for r in table.to_pylist() if r["status"] == "error"}
    assert sorted(errors) == sorted(unreadable), errors
    masks = loc.fs.find(loc.child("masks").path)
    assert sorted(p.rsplit("/", 1)[1].rsplit(".", 1)[0] for p in masks) == sorted(keys)
    assert storage.exists(loc.child("_SUCCESS"))


# --- background jobs and events -----------------------------------------------------------------


def in_background(fn: Callable[[], T]) -> Future[T]:
    """Run a job in a daemon thread of this process (the Ray driver).

    ``result(timeout)`` returns what the job returned or re-raises the job's own error; a daemon
    thread, so a job a failed test left blocked cannot keep pytest from exiting."""
    future: Future[T] = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the test by result()
                future.set_exception(exc)

    threading.Thread(target=run, name="background-job", daemon=True).start()
    return future


def wait_for(
    predicate: Callable[[], T], what: str, timeout: float = 240, job: Future | None = None, interval: float = 0.2
) -> T:
    """Poll until predicate() is truthy and return its value.

    With a job: if the job ends first, re-raise its error, or fail saying it finished before `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if job is not None and job.done():
            job.result()
            raise AssertionError(f"the job finished before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def kill_driver_when(driver: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
    """SIGKILL a CLI driver once `ready()` holds (failing if it exits first), and reap it."""
    try:
        wait_for(lambda: ready() or driver.poll() is not None, what)
        assert driver.poll() is None, f"the driver exited with {driver.returncode} before {what}"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()


def wait_predictors_gone(address: str) -> None:
    """Ray tears down a dead driver's actors and tasks; wait for that before a re-run."""
    import ray.util.state

    def gone() -> bool:
        alive = ray.util.state.list_actors(address=address, filters=[("state", "=", "ALIVE")])
        return not [a for a in alive if "Predictor" in a.class_name]

    wait_for(gone, "the killed driver's actors to exit", timeout=60, interval=0.5)


# --- barriers -----------------------------------------------------------------------------------


class PipeBarrier:
    """An input file that is a named pipe: a job's read of it blocks until the test releases it.

    Opening a pipe for reading waits for a writer, so a job over an input that holds one cannot
    finish before `release()`. Released, the reader gets an unseekable, empty file: the job records
    one error row for the pipe's key. Use as a context manager: a test that fails before releasing
    still lets the job go, so it does not hold the session's Ray workers.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._writer: int | None = None
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        os.mkfifo(self.path)

    def __enter__(self) -> PipeBarrier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_writer(self) -> int | None:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nobody reads the pipe yet
                return None
            raise

    def hold(self, job: Future, timeout: float = 240) -> None:
        """Wait until the job is reading the pipe; its read stays blocked until `release`."""
        if self._writer is None:
            self._writer = wait_for(self._open_writer, "the job to read the barrier pipe", timeout, job, interval=0.05)

    def release(self, job: Future, timeout: float = 240) -> None:
        """Wait until the job is reading the pipe, then let that read through (it reads no bytes)."""
        self.hold(job, timeout)
        os.close(self._writer)
        self._writer = None

    def replace_with(self, data: bytes) -> None:
        """Make the pipe a regular file (after its job is gone), so a re-run reads real bytes."""
        self.close()
        with open(self.path, "wb") as f:
            f.write(data)

    def close(self) -> None:
        """Let any reader through without waiting for one, and remove the pipe."""
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None
        if not os.path.exists(self.path) or not stat.S_ISFIFO(os.stat(self.path).st_mode):
            return
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)  # never blocks; a waiting reader's open returns
        os.unlink(self.path)  # later readers find no file: an error row
        os.close(fd)


HOLD_DIR_ENV = "RAYSEGMENT_TEST_TRAIN_HOLD"
REPORTED, RELEASED, EPOCHS = "first-checkpoint-reported", "released", "reported-epochs"


class TrainHold:
    """The files through which a test and the Ray Train controller's hold callback talk."""

    def __init__(self, root: Path) -> None:
        self.reported = root / REPORTED
        self.released = root / RELEASED
        self.epochs = root / EPOCHS

    def reported_epochs(self) -> list[int]:
        """The epoch of every report the controller took, in order."""
        return [int(line) for line in self.epochs.read_text().split()]

    def wait_reported(self, job: Future, timeout: float = 300) -> None:
        wait_for(self.reported.exists, "its first checkpoint", timeout, job)

    def release(self) -> None:
        self.released.touch()


@functools.cache
def _hold_callback() -> type:
    """Ray Train's report callback that holds its controller after the first checkpoint.

    Built on first use (it needs ray.train) and defined in a function, so cloudpickle ships it
    by value to the controller, where this module cannot be imported; it uses only the stdlib."""
    from ray.train.v2._internal.execution.callback import ReportCallback

    class HoldAfterFirstCheckpoint(ReportCallback):
        def __init__(self) -> None:  # runs in the driver, where the test set the env
            root = os.environ[HOLD_DIR_ENV]
            self.reported, self.released = os.path.join(root, REPORTED), os.path.join(root, RELEASED)
            self.epochs = os.path.join(root, EPOCHS)

        def after_report(self, training_report: Any, metrics: list[dict[str, Any]]) -> None:
            with open(self.epochs, "a") as f:
                f.write(f"{metrics[0]['epoch']}\n")
            if training_report.checkpoint is None or os.path.exists(self.released):
                return
            open(self.reported, "w").close()
            deadline = time.monotonic() + 600
            while not os.path.exists(self.released) and time.monotonic() < deadline:
                time.sleep(0.1)

    return HoldAfterFirstCheckpoint


def __getattr__(name: str) -> Any:
    # Ray Train imports RAY_TRAIN_CALLBACKS entries as "module.Class".
    if name == "HoldAfterFirstCheckpoint":
        return _hold_callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextmanager
def training_held_after_first_checkpoint(root: Path) -> Iterator[TrainHold]:
    """While inside, a Ray Train run started in this process holds after its first checkpoint.

    The controller stops taking reports once the first checkpoint is persisted (`hold.reported`)
    until `hold.release()`; workers block at a later report, so the run cannot finish meanwhile.
    A worker killed in between is found when the controller goes on: the group restarts from
    that checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    hold = TrainHold(root)
    env = {"RAY_TRAIN_CALLBACKS": f"{__name__}.HoldAfterFirstCheckpoint", HOLD_DIR_ENV: str(root)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield hold
    finally:
        hold.release()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def hashed_model(folder: Path) -> str:
    """A model folder whose card and model file agree (the file is no network), for runs refused before any
    inference."""
    import hashlib

    from raysegment.models.card import MODEL_FILE

    card = untrained_card().model_copy(update={"model_sha256": hashlib.sha256(b"weights").hexdigest()})
    card.write(storage.resolve(str(folder)))
    (folder / MODEL_FILE).write_bytes(b"weights")
    return str(folder)


def run_into_held_lock(spec: str, lock: Path, model: str, inp: Path, out: Path, scratch: Path) -> str:
    """Run `registry.run(spec(model, inp, out))` (spec: a raysegment.config class name) in a subprocess where
    Ray cannot start (its temp folder is a file) while this process holds `lock`; returns its stderr, where a
    LockedError prints `REFUSED <ray.is_initialized()> <message>`."""
    import json
    import sys

    from raysegment.lock import machine_id

    holder = {"owner": "live", "pid": os.getpid(), "machine": machine_id(), "host": "here", "created": "now"}
    lock.write_text(json.dumps(holder))
    script = (
        "import ray, sys\n"
        "from raysegment import registry\n"
        f"from raysegment.config import {spec}\n"
        "from raysegment.lock import LockedError\n"
        "try:\n"
        f"    registry.run({spec}(model=sys.argv[1], input=sys.argv[2], output=sys.argv[3]))\n"
        "except LockedError as exc:\n"
        "    print('REFUSED', ray.is_initialized(), exc, file=sys.__stderr__)\n"
    )
    (scratch / "not-a-folder").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(scratch / "not-a-folder")}
    done = subprocess.run(
        [sys.executable, "-c", script, model, str(inp), str(out)], capture_output=True, text=True, timeout=120, env=env
    )
    return done.stderr
