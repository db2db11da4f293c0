"""The console a user reads (issue #17): quiet through a pipe, a bar on a terminal, one JSON object under --json.

One short CLI train and one infer run through a pipe, in subprocesses that join the session's Ray;
the other commands run in this process (CliRunner) against the session's model and data set.
"""

from __future__ import annotations

import fcntl
import glob
import io
import json
import logging
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import TINY, write_images, write_source

from raysegment import logs, progress
from raysegment.cli import main

RAYSEGMENT = str(Path(sys.executable).parent / "raysegment")
# Lines that are TensorFlow's, absl's, CUDA's or Ray's, never ours.
NOISE = re.compile(
    r"oneDNN|cudart|cuInit|absl::InitializeLog|INFO:tensorflow|WARNING:tensorflow|Reporting training result"
    r"|Execution plan of Dataset|RayDeprecationWarning|tqdm is not installed|CollectiveAllReduceStrategy"
    r"|core_worker\.cc|PreemptionWatcher|Started a local Ray instance|Connecting to existing Ray cluster"
)
# The documented --json keys (README, "Results as JSON"), besides command, exit_code and log_file.
KEYS = {
    "prepare": {"dest", "counts", "shards", "num_classes", "class_names", "skipped", "content_hash", "seconds"},
    "train": {
        "out",
        "model_id",
        "best",
        "last",
        "epochs_run",
        "stopped_early",
        "val_pixels",
        "seconds",
        "mlflow_run_id",
    },
    "evaluate": {
        "pixel_accuracy",
        "mean_iou",
        "mean_dice",
        "per_class_iou",
        "errors_by_edge_distance",
        "images",
        "split",
        "written_to",
    },
    "infer": {"run_id", "status", "counts", "seconds", "images_per_second", "output"},
    "nightly": {"date", "status", "counts", "drift", "run_id", "partition"},
    "report": {"report", "overlays", "run_id", "rows", "ok", "error", "samples"},
    "bench-prepare": {"rows", "shards", "pairs_per_s", "peak_rss_after_mib"},
    "compact": {"output", "files_before", "files_after", "merged_files", "written_files", "unfinished_runs_left"},
}


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if NOISE.search(line)]


def one_json(stdout: str, kind: str) -> dict:
    """stdout is exactly one JSON object, with the command's documented keys."""
    result = json.loads(stdout)
    assert isinstance(result, dict) and result["command"] == kind
    missing = (KEYS[kind] | {"exit_code", "log_file"}) - set(result)
    assert not missing, f"{kind} --json lacks {sorted(missing)}"
    return result


def run_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run([RAYSEGMENT, *argv], env=env, capture_output=True, text=True, timeout=600)
    print(f"$ raysegment {' '.join(argv)} -> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def piped(tiny_model, ray_cluster, tmp_path_factory):
    """A short `train --json` and an `infer --json` through pipes: (root, train, infer)."""
    data, model = tiny_model
    root = tmp_path_factory.mktemp("piped")
    write_images(root / "in", 6)
    # One Ray Train worker: what is piped does not depend on their number (two cost a TF start for nothing).
    flags = [
        f"--{k.replace('_', '-')}={v}" for k, v in (TINY | {"workers": 1}).items() if k not in ("resume", "tta_check")
    ]
    train = run_cli("train", data, str(root / "model"), *flags, "--no-resume", "--json", env=ray_cluster.env)
    infer = run_cli(
        "infer", model, str(root / "in"), str(root / "out"), "--batch-size", "2", "--json", env=ray_cluster.env
    )
    return root, train, infer


@pytest.mark.slow
def test_train_through_a_pipe_is_quiet_shows_each_epoch_once_and_logs_the_detail(piped, ray_cluster):
    root, train, _ = piped
    assert train.returncode == 0, train.stderr[-3000:]
    assert noise(train.stdout + train.stderr) == []
    result = one_json(train.stdout, "train")
    assert result["epochs_run"] == 1 and result["exit_code"] == 0
    assert len(re.findall(r"^\d\d:\d\d:\d\d epoch 1/1 .* in \d+s .*loss .*val mIoU", train.stderr, re.M)) == 1
    assert "trained " in train.stderr and "exit 0: ok" in train.stderr  # the summary, on stderr under --json
    # The summary counts epochs from 1, as the progress line ("epoch 1/1"); the JSON keeps history's 0-based.
    assert result["best"]["epoch"] == 0 and ": best epoch 1, val mean_iou" in train.stderr
    log = Path(result["log_file"])
    assert log.parent == root / "model" / "logs"
    detail = log.read_text()
    assert "epoch 1/1" in detail and "Ray's own logs" in detail and "Started a local Ray instance" not in train.stderr
    # The same command again (resuming, the default) finds the run finished: nothing trained, model.keras (its
    # model_id) kept; it trained 0 epochs, rewrote the model and recorded the new flags.
    model = (root / "model" / "model.keras").read_bytes()
    argv = [a for a in train.args[1:] if a != "--no-resume"]
    again = run_cli(*argv, env=ray_cluster.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{root / 'model'}: already trained (1 epochs, best epoch 1, val mIoU " in again.stderr
    assert "nothing to do — pass --no-resume to train again" in again.stderr and "epoch 1/1" not in again.stderr
    rerun = one_json(again.stdout, "train")
    assert rerun["already_trained"] and rerun["model_id"] == result["model_id"] and rerun["best"] == result["best"]
    assert (root / "model" / "model.keras").read_bytes() == model


@pytest.mark.slow
def test_infer_through_a_pipe_is_quiet_and_the_log_holds_ray_datas_plan(piped):
    root, _, infer = piped
    assert infer.returncode == 0, infer.stderr[-3000:]
    assert noise(infer.stdout + infer.stderr) == []
    result = one_json(infer.stdout, "infer")
    assert result["counts"]["processed"] == 6
    assert re.search(r"^\d\d:\d\d:\d\d infer  6 images .* in \d+s  errors 0$", infer.stderr, re.M)
    assert "Execution plan of Dataset" in Path(result["log_file"]).read_text()
    assert Path(result["log_file"]).parent == root / "out" / "logs"


@pytest.mark.slow
def test_json_of_prepare_evaluate_report_nightly_and_bench(piped, tiny_model, ray_cluster, tmp_path):
    root, _, infer = piped
    data, model = tiny_model
    runner = CliRunner()

    def invoke(*argv: str) -> dict:
        r = runner.invoke(main, [*argv, "--json"], catch_exceptions=False)
        assert r.exit_code == 0, r.stderr[-3000:]
        return one_json(r.stdout, argv[0] if argv[0] != "bench" else f"bench-{argv[1]}")

    # Five classes for four-class masks: a warning, once on the console (it was a log line and a progress line).
    src = write_source(str(tmp_path / "src"), count=8)
    r = run_cli("prepare", src, str(tmp_path / "data"), "--num-classes", "5", "--json", env=ray_cluster.env)
    assert r.returncode == 0 and sum(one_json(r.stdout, "prepare")["counts"].values()) == 8
    assert r.stderr.count("class class_4 has no labelled pixel in any mask") == 1, r.stderr
    assert invoke("evaluate", model, data, "--out", str(tmp_path / "eval.json"))["images"] > 0
    assert invoke("report", str(root / "out"))["rows"] == 6
    compacted = invoke("compact", str(root / "out"))
    assert compacted["files_before"] == compacted["files_after"] == 1  # one run, one file: nothing to merge
    write_images(tmp_path / "night", 2)
    night = invoke("nightly", "--model", model, "--input", str(tmp_path / "night"), "--output", str(tmp_path / "n"))
    assert night["counts"]["processed"] == 2 and night["status"] == "ok"
    bench = invoke("bench", "prepare", "--pairs", "16", "--size", "16", "--workdir", str(tmp_path / "bench"))
    assert bench["rows"] == 16


def test_json_error_is_one_object_and_one_line(ray_cluster, tmp_path):
    (tmp_path / "nomodel").mkdir()  # there, without a model in it (a path not there is "not found")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nomodel"), str(tmp_path / "data"), "--json"])
    assert r.exit_code == 2
    assert json.loads(r.stdout)["exit_code"] == 2 and "not a trained model" in json.loads(r.stdout)["error"]
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: {tmp_path / 'nomodel'}: not a trained model (needs model.keras and model.json); run `raysegment train`"
    ]


@pytest.mark.slow
def test_a_terminal_gets_a_progress_bar(ray_cluster, tmp_path):
    """`prepare` under a real pseudo-terminal draws a tqdm bar (carriage returns, a full bar at the end)."""
    src = write_source(str(tmp_path / "src"), count=12)
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns, as a terminal
    proc = subprocess.Popen(
        [RAYSEGMENT, "prepare", src, str(tmp_path / "data")],
        env=ray_cluster.env,
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the terminal's last writer closed it
            break
        if not chunk:
            break
        screen += chunk
    os.close(primary)
    assert proc.wait(timeout=300) == 0, screen.decode(errors="replace")[-3000:]
    text = screen.decode(errors="replace")
    print(text)
    assert re.search(r"prepare: 100%\|█+\| 12/12 \[", text), text[-2000:]
    assert "\r" in text and noise(text) == []
    assert glob.glob(str(tmp_path / "data" / "logs" / "raysegment-prepare-*.log"))


def test_progress_lines_off_a_terminal():
    """Lines with the time, counts, rate and ETA at the interval, and a final line; nothing when off."""
    out = io.StringIO()
    progress.configure(progress.LINES, interval_s=0.0, stream=out)
    try:
        with progress.stage("infer", total=10) as shown:
            shown.update(4, errors=1)
        progress.expect_total("infer", 3)
        assert progress.stage("infer").total == 3
    finally:
        progress.configure(progress.OFF)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d infer  4/10 images \(40%\)  [\d.]+ images/s  ETA \d+s  errors 1", lines[0])
    assert re.fullmatch(r"\d\d:\d\d:\d\d infer  4/10 images \(40%\)  [\d.]+ images/s  in \d+s  errors 1", lines[1])
    silent = io.StringIO()
    progress.configure(progress.OFF, stream=silent)
    with progress.stage("infer", total=2) as shown:
        shown.update(2)
    assert silent.getvalue() == ""


class Said(io.StringIO):
    """A stream that tells when something was written to it (the heartbeat writes from its thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write(self, text: str) -> int:
        n = super().write(text)
        self.written.set()
        return n


def test_a_running_stage_shows_a_line_each_interval_before_any_row():
    """Listing and actor start-up passed without a line: a 27 s infer resume printed its first 23 s in."""
    out = Said()
    progress.configure(progress.LINES, interval_s=0.05, stream=out)
    try:
        with progress.stage("infer", total=4) as shown:
            assert out.written.wait(30), "no line while the stage waited for its first rows"
            assert shown.done == 0
    finally:
        progress.configure(progress.OFF)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d infer  0/4 images \(0%\)  0\.0 images/s", lines[0]), lines
    assert re.search(r"  in \d+s$", lines[-1]), lines


def test_a_stage_stopped_midway_says_so_in_its_last_line():
    """SIGINT or SIGTERM (or an error) inside a stage: its last line ended `in 24s`, as a finished stage's."""
    out = io.StringIO()
    progress.configure(progress.LINES, interval_s=3600, stream=out)
    try:
        with pytest.raises(KeyboardInterrupt), progress.stage("infer", total=10) as shown:
            shown.update(4)
            raise KeyboardInterrupt
        with progress.stage("infer", total=2) as shown:
            shown.update(2)
    finally:
        progress.configure(progress.OFF)
    stopped, finished = out.getvalue().splitlines()
    assert re.search(r"infer  4/10 images \(40%\)  [\d.]+ images/s  stopped after \d+s$", stopped), stopped
    assert re.search(r"infer  2/2 images \(100%\)  [\d.]+ images/s  in \d+s$", finished), finished


def test_a_slow_stage_bar_shows_images_per_second():
    """Under one image a second tqdm inverts the rate: with the unit's leading space it read `1.47s/ images`."""
    out = io.StringIO()
    progress.configure(progress.BAR, stream=out)
    try:
        for total in (10, None):
            shown = progress.stage("infer", total=total)
            shown.update(1)
            bar = shown._bar
            text = bar.format_meter(**{**bar.format_dict, "elapsed": 100.0, "rate": None})  # 1 image in 100 s
            assert " 0.01 images/s" in text and "s/ images" not in text, text
            shown.close()
    finally:
        progress.configure(progress.OFF)


class Writes(io.StringIO):
    """A stream that keeps each write call: a line written in two parts could take another thread's between."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_each_progress_line_is_one_write():
    """print() wrote a line's text and its newline apart, so the heartbeat's line and a warning could merge."""
    out = Writes()
    progress.configure(progress.LINES, interval_s=0.0, stream=out)
    try:
        with progress.stage("infer", total=2) as shown:
            shown.update(1)
        progress.note("infer: 2 listed")
        progress.warn(logging.getLogger(__name__), "infer", "a warning")
    finally:
        progress.configure(progress.OFF)
    assert len(out.calls) == 4, out.calls
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in out.calls), out.calls


def test_a_prepare_that_fails_says_its_stage_stopped(ray_cluster, tmp_path):
    """prepare's stage was never closed on an error: no `stopped after` line, and its heartbeat thread went on
    printing `prepare N/M pairs` while the shards were removed."""
    from raysegment import storage
    from raysegment.config import PrepareSpec
    from raysegment.data import prepare as prep

    spec = PrepareSpec(source=write_source(str(tmp_path / "src"), count=4), dest=str(tmp_path / "data"))
    source, dest = storage.resolve(spec.source), storage.resolve(spec.dest)
    listing, encoding, pairs, _ = prep._list_pairs(spec, source)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shards").write_bytes(b"")  # a file where the shards folder goes: every write fails
    out = io.StringIO()
    progress.configure(progress.LINES, interval_s=3600, stream=out)
    try:
        shown = progress.stage("prepare", len(pairs), unit="pairs")
        with pytest.raises(Exception, match="shards"):
            prep._run_shard_tasks(
                source,
                dest,
                prep._plan_shards(pairs, 1 << 20),
                listing,
                encoding,
                False,
                [],
                [],
                generation=prep._generation(),
                shown=shown,
            )
    finally:
        progress.configure(progress.OFF)
    assert re.fullmatch(r"\S+ prepare  0/4 pairs \(0%\)  [\d.]+ pairs/s  stopped after \d+s\n", out.getvalue()), (
        out.getvalue()
    )


def test_log_level_from_the_environment(monkeypatch):
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    assert not logs.verbose()
    monkeypatch.setenv(logs.LEVEL_ENV, "info")
    assert logs.verbose() and logs.worker_env_vars() == {}
    monkeypatch.setenv(logs.LEVEL_ENV, "warning")
    assert not logs.verbose() and logs.worker_env_vars()["TF_CPP_MIN_LOG_LEVEL"] == "3"
    job = {"runtime_env": {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert "TF_CPP_MIN_LOG_LEVEL" not in logs.worker_env_vars()  # a submitted job's own value is not merged twice


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["demo", "--epochs", "0", "--out", "{tmp}/out"],
            "Invalid value for '--epochs': 0 is not in the range 1<=x<=100000",
        ),
        (
            ["report", "{tmp}/run", "--samples", "-1"],
            "Invalid value for '--samples': -1 is not in the range 0<=x<=1000",
        ),
        (  # click's FloatRange lets nan through: every pixel of the overlay came out black
            ["show", "{tmp}/a.png", "--model", "{tmp}/m", "--alpha", "nan"],
            "Invalid value for '--alpha': 'nan' is not a number in the range 0.0<=x<=1.0",
        ),
    ],
)
def test_out_of_range_counts_fail_before_any_work(tmp_path, args, named):
    """`demo --epochs 0` used to prepare its whole data set before TrainSpec refused it; now click refuses it
    first, and nothing is written."""
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2 and named in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_user_error_in_a_train_worker_is_one_line_without_rays_retry_advice():
    """A training worker's data feed that read a damaged shard raised DataError; Ray Data appended its retry
    advice to the message and Ray Train wrapped it per rank, and `train` ended with a traceback (exit 1). The
    console finds it among the worker failures and prints its own text (checked end to end by hand: one line,
    exit 2). Ray's own code does the wrapping here."""
    from ray.data._internal.util import iterate_with_retry
    from ray.train import WorkerGroupError

    from raysegment.console import error_text, user_error
    from raysegment.errors import DataError

    def damaged():
        raise DataError("s/train-0.parquet: damaged Parquet file (CRC); run `raysegment prepare` again")
        yield

    with pytest.raises(DataError) as caught:
        list(iterate_with_retry(damaged, "apply UDF transform", match=[], max_attempts=1))
    assert "Failed to apply UDF transform after 1/1 attempts" in str(caught.value)  # what Ray does to it
    group = WorkerGroupError("[Rank 1 Error Snippet] ...", {1: caught.value, 0: RuntimeError("not ours")})
    assert user_error(group) is caught.value
    assert error_text(caught.value) == "s/train-0.parquet: damaged Parquet file (CRC); run `raysegment prepare` again"
    assert user_error(WorkerGroupError("x", {0: RuntimeError("a crash")})) is None  # a crash keeps its traceback


@pytest.mark.parametrize("command", ["compact", "report"])
def test_a_refused_command_writes_nothing_into_the_folder_it_was_given(tmp_path, command):
    """The log of a command refused with exit 2 stays in the temp folder: `compact` or `report` on a folder
    that is no inference output (and `infer` with OUTPUT inside INPUT) used to leave logs/ in it."""
    (tmp_path / "a.txt").write_text("not an output")
    result = CliRunner().invoke(main, [command, str(tmp_path)])
    assert result.exit_code == 2 and "no inference summaries" in result.output, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("began", [False, True])
def test_a_user_error_keeps_its_log_in_out_only_once_the_command_began_on_out(tmp_path, capsys, began):
    """A refusal (exit 2 before any work) leaves OUT as it was and is one line; a user error after the command
    began on OUT (a store gone mid-job, a checkpoint that cannot be restored) keeps its log in OUT/logs beside
    what the run left, where the next engineer looks for it, and the console names it (`prepare` refusing mask
    values after it began left DEST/logs/... unnamed: only --json's log_file said where it was)."""
    from raysegment import console
    from raysegment.errors import StorageError

    out = tmp_path / "out"
    out.mkdir()

    @console.handle_errors
    def infer() -> None:
        with console.session("infer", str(out)):
            if began:
                logs.began()
            raise StorageError(f"{out}: the store went away")

    with pytest.raises(SystemExit) as exited:
        infer()
    path = console._last.log_path
    kept = glob.glob(str(out / "logs" / "raysegment-infer-*.log"))
    assert exited.value.code == 2 and kept == ([path] if began else []) and os.path.exists(path)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error: ", "  log: "))]
    assert err == [f"error: {out}: the store went away", *([f"  log: {path}"] if began else [])]


def test_ctrl_c_exits_130_and_says_the_command_resumes(capsys):
    """Ctrl-C ended a command with click's bare "Aborted!" and exit 1, a code the README does not list:
    a scheduler could not tell an interrupted run from a failed one."""
    from raysegment.console import INTERRUPTED, handle_errors

    @handle_errors
    def infer() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        infer()
    assert stopped.value.code == INTERRUPTED == 130
    assert "interrupted: infer stopped; what it finished is kept: run the same command again (infer" in (
        capsys.readouterr().err
    )


def test_serve_stopped_while_loading_says_no_more_than_that(capsys):
    """serve stopped while its model loaded told the user infer, nightly and train go on where they stopped."""
    from raysegment.console import INTERRUPTED, handle_errors

    @handle_errors
    def serve() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        serve()
    assert stopped.value.code == INTERRUPTED
    assert capsys.readouterr().err.strip() == "interrupted: serve stopped"


def test_ctrl_c_while_following_a_cluster_job_says_the_job_goes_on(capsys):
    """`submit --wait` stopped by Ctrl-C said "run the same command again", while the cluster job ran on.
    Stopped before there is a job to follow (connecting, uploading), it still says to run it again."""
    from raysegment.console import FOLLOWING, handle_errors

    @handle_errors
    def submit(following: bool) -> None:
        exc = KeyboardInterrupt()
        setattr(exc, FOLLOWING, following)  # as jobs.submit_and_follow marks it while it follows the job
        raise exc

    with pytest.raises(SystemExit):
        submit(following=True)
    err = capsys.readouterr().err
    assert "submit stopped following the cluster job" in err and "run the same command again" not in err
    with pytest.raises(SystemExit):
        submit(following=False)
    assert "run the same command again" in capsys.readouterr().err


def test_ctrl_c_under_json_still_prints_one_object(capsys):
    """A --json run stopped by Ctrl-C left stdout empty: a script parsing it got no object to read."""
    from raysegment.console import INTERRUPTED, handle_errors

    @handle_errors
    def infer(as_json: bool) -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        infer(as_json=True)
    out = json.loads(capsys.readouterr().out)
    assert stopped.value.code == INTERRUPTED and out["exit_code"] == INTERRUPTED and out["command"] == "infer"
    assert "run the same command again" in out["error"]


# A command that holds OUTPUT's run lock in a `with` block (as infer does), says it is ready through the FIFO
# it is given, and waits until a signal ends it: with Ray, in `ray.get` of a task that says so (Ray checks
# for signals there itself); without, on stdin, which the test never writes.
STOPPABLE = """
import os, sys, threading
import ray
from raysegment import storage
from raysegment.console import handle_errors, session
from raysegment.lock import RunLock

out, ready, with_ray = sys.argv[1], sys.argv[2], sys.argv[3] == "ray"

def say_ready(fifo):
    with open(fifo, "w") as f:
        f.write("ready")

@ray.remote
def hold(fifo):
    say_ready(fifo)
    threading.Event().wait()

@handle_errors
def infer(as_json):
    with session("infer", out, as_json=as_json):
        if with_ray:
            from raysegment.runtime import init_ray
            init_ray()  # installs Ray's driver SIGTERM handler
        with RunLock(storage.resolve(out).child("_infer.lock"), 3600):
            if with_ray:
                ray.get(hold.remote(ready))
            else:
                say_ready(ready)
                os.read(0, 1)

infer(as_json=True)
"""


def assert_stopped(returncode: int, stdout: str, stderr: str, command: str, code: int, said: str) -> None:
    """A command stopped by a signal: its exit code, its one line (`said`, then the advice) and its --json object."""
    assert returncode == code, stderr[-3000:]
    assert f"{said}; what it finished is kept: run the same command again" in stderr
    result = json.loads(stdout)
    assert (result["command"], result["exit_code"]) == (command, code) and result["log_file"]


@pytest.mark.parametrize("with_ray", ["no-ray", "ray"])
def test_sigterm_exits_143_with_one_line_and_object_after_the_locks_are_released(with_ray, request, tmp_path):
    """SIGTERM (systemd stop, Kubernetes, `ray job stop`) ended a command with Ray's driver handler's
    sys.exit(15) (exit 1 inside `ray.get`), or before ray.init killed it outright: no line, nothing on stdout
    under --json, and without Ray a run lock left behind. It now ends a command as Ctrl-C does, exit 143."""
    from raysegment.console import TERMINATED

    env = request.getfixturevalue("ray_cluster").env if with_ray == "ray" else dict(os.environ)
    out, fifo = tmp_path / "out", tmp_path / "ready"
    os.mkfifo(fifo)
    ready = os.open(fifo, os.O_RDWR)  # never blocks, never EOF: the deadline below is the only wait
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE, str(out), str(fifo), with_ray],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if not select.select([ready], [], [], 120)[0]:
            proc.kill()
            pytest.fail(f"the command never got ready: {proc.communicate()[1][-3000:]}")
        assert os.read(ready, 5) == b"ready"
        assert (out / "_infer.lock").exists()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        os.close(ready)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert TERMINATED == 143
    assert_stopped(proc.returncode, stdout, stderr, "infer", 143, "terminated (SIGTERM): infer stopped")
    assert not (out / "_infer.lock").exists()  # the `with` block ran its exit: the lock is released


@pytest.mark.slow
def test_ctrl_c_in_train_exits_130_with_one_line_and_object(tiny_model, ray_cluster, tmp_path):
    """Ray Train's own SIGINT handler ended `train` with sys.exit(0): exit 1, no line, no --json object (its
    third Ctrl-C: exit 0, a stopped run as a success). Ctrl-C is the command's again: exit 130, as SIGTERM 143."""
    from raysegment.console import INTERRUPTED

    data, _ = tiny_model
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k not in ("resume", "tta_check", "epochs")]
    argv = [RAYSEGMENT, "train", data, str(tmp_path / "model"), *flags, "--workers=1", "--epochs=1000", "--json"]
    proc = subprocess.Popen(argv, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        while not any(re.search(r" epoch 1/1000 ", line) for line in seen):  # the job says an epoch finished
            if not select.select([proc.stderr], [], [], 300)[0] or proc.poll() is not None:
                pytest.fail(f"no epoch line: {''.join(seen)[-3000:]}")
            seen.append(proc.stderr.readline())
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert INTERRUPTED == 130
    assert_stopped(proc.returncode, stdout, stderr, "train", 130, "interrupted: train stopped")


def test_the_temp_log_folder_cannot_shadow_the_package(tmp_path):
    """Logs went to $TMPDIR/raysegment/logs: a command run from $TMPDIR started Ray workers with $TMPDIR on
    sys.path, where that folder was a namespace package named raysegment, shadowing an editable install:
    every task failed with "cannot import name '__version__' from 'raysegment'"."""
    import tempfile

    from raysegment.console import session

    with session("report", str(tmp_path / "out")) as s:
        pass
    below = os.path.relpath(s.log_path, tempfile.gettempdir()).split(os.sep)[0]
    assert not below.isidentifier(), below  # no folder Python could import as a package
