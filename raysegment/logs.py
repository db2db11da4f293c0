"""Where logs go: a quiet console, the whole detail in one log file per command, chatter off in our workers.

By default the console shows our progress, warnings and result. TensorFlow's and CUDA's C++
start-up notices are switched off (environment, set before TensorFlow is imported, in the driver
and, through the runtime env, in every Ray worker the job starts); Ray's driver logs, Ray Data's
execution plans and Ray's deprecation warnings go to the log file; the workers' output (Ray Train's
reports, TensorFlow's INFO lines) stays in Ray's own log files (`/tmp/ray/session_*/logs`), as
`ray.init(log_to_driver=False)` leaves it. `-v` or RAYSEGMENT_LOG_LEVEL=INFO|DEBUG (for scheduled
runs) shows all of it on the console again.

The log file is written under the temp folder while the command runs and moved to OUT/logs/ at
the end when OUT is a local folder; for s3:// outputs it stays where it is (its path is printed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

LEVEL_ENV = "RAYSEGMENT_LOG_LEVEL"
# C++ logging of TensorFlow (oneDNN notice, cudart stub, cuInit errors) and of gRPC, which TF's
# collectives use; read when TensorFlow loads, so set before that in every process.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
# Ray's job client: its packaging (ray._private.runtime_env) and SDK (ray.dashboard.modules.job) loggers
# propagate to `ray`, the one with its own console handler.
JOB_CLIENT_LOGGERS = ("ray",)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def level() -> int:
    """The console's log level: WARNING by default, INFO or DEBUG from -v / RAYSEGMENT_LOG_LEVEL."""
    name = os.environ.get(LEVEL_ENV, "").strip().upper()
    value = logging.getLevelName(name) if name else logging.WARNING
    return value if isinstance(value, int) else logging.WARNING


def verbose() -> bool:
    """Full logs on the console (workers' output, Ray's and TensorFlow's logs)."""
    return level() < logging.WARNING


def apply_quiet_env() -> None:
    """Silence TensorFlow's C++ logging in this process and the local Ray it starts (a value already set wins)."""
    if not verbose():
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)


def worker_env_vars() -> dict[str, str]:
    """The quiet variables for a runtime env, less those a submitted job's own runtime env sets (Ray refuses
    to merge two values of one variable)."""
    if verbose():
        return {}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = set(((job.get("runtime_env") or {}).get("env_vars") or {}).keys())
    return {key: os.environ.get(key, value) for key, value in QUIET_ENV.items() if key not in taken}


# A log record's attribute: its line is on the console already (`progress.warn`), so the console log leaves it out.
NOTED = "raysegment_noted"


class _ConsoleFilter(logging.Filter):
    """Quiet console: our own warnings, anybody's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, NOTED, False):
            return False
        return record.levelno >= logging.ERROR or (
            record.levelno >= logging.WARNING and record.name.startswith("raysegment")
        )


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Forward(logging.Handler):
    """Passes a Ray logger's records (which do not propagate) to the log file; ray.init re-formats
    the handlers of its logger, so the file handler itself is not attached there."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.target.level:
            self.target.handle(record)


@dataclass
class LogFile:
    """This command's log file: written at `path` while it runs, moved into `final_dir` at the end."""

    path: str
    final_dir: str | None
    handlers: list[tuple[logging.Logger, logging.Handler]] = field(default_factory=list)
    ray_levels: list[tuple[logging.Handler, int]] = field(default_factory=list)
    ray_progress_bars: bool | None = None
    # Run first by finish(): the command's own Ray goes down while its output still lands in the file.
    closers: list[Callable[[], None]] = field(default_factory=list)
    # Set by began(): the command passed its refusals and started on OUT, whose logs/ then keeps this file.
    working: bool = False

    def close_resources(self) -> None:
        """Run the closers (last registered first)."""
        while self.closers:
            try:
                self.closers.pop()()
            except Exception as exc:  # closing must not hide the command's own outcome
                logging.getLogger(__name__).warning("while closing: %s", exc)

    def finish(self) -> str:
        """Detach and close the handlers; move the file next to the outputs if they are local. Its path."""
        global current
        if current is self:
            current = None
        if self.final_dir is None and not self.handlers:
            return self.path  # finished already
        self.close_resources()
        for logger, handler in self.handlers:
            logger.removeHandler(handler)
            handler.close()
        for handler, old in self.ray_levels:
            handler.setLevel(old)
        if self.ray_progress_bars is not None and "ray.data" in sys.modules:
            sys.modules["ray.data"].DataContext.get_current().enable_progress_bars = self.ray_progress_bars
        self.handlers, self.ray_levels = [], []
        logging.captureWarnings(False)
        if self.final_dir and os.path.isdir(os.path.dirname(self.final_dir)):
            try:
                os.makedirs(self.final_dir, exist_ok=True)
                dest = os.path.join(self.final_dir, os.path.basename(self.path))
                shutil.move(self.path, dest)
                self.path, self.final_dir = dest, None
            except OSError:
                pass  # a read-only output keeps the log in the temp folder
        return self.path


# The running command's log file (init_ray routes Ray's loggers to it); None outside a command.
current: LogFile | None = None


def began() -> None:
    """The command is past its refusals and starts changing OUT: a user error from here on (a store gone
    mid-job, a checkpoint that cannot be restored) keeps the log in OUT/logs, beside what the run left."""
    if current is not None:
        current.working = True


def _local_dir(output_uri: str | None) -> str | None:
    """OUT/logs for a local output folder; None for object storage."""
    from raysegment import storage

    if not output_uri or storage.is_remote(output_uri):
        return None
    return os.path.join(os.path.abspath(storage.file_path(output_uri)), "logs")


TEMP_LOGS = "raysegment-logs"


def start(kind: str, output_uri: str | None, console_stream: TextIO | None = None) -> LogFile:
    """Open `raysegment-{kind}-{time}.log` and route every logger to it; the console (`console_stream`, default
    sys.stderr) gets the quiet filter."""
    # Not $TMPDIR/raysegment: a Ray worker started in $TMPDIR has it on sys.path, where a folder of that name
    # is a namespace package shadowing an editable install (every task failed to import raysegment).
    folder = os.path.join(tempfile.gettempdir(), TEMP_LOGS)
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = LogFile(os.path.join(folder, f"raysegment-{kind}-{stamp}-{os.getpid()}.log"), _local_dir(output_uri))
    file_handler = logging.FileHandler(log.path, encoding="utf-8")
    file_handler.setLevel(logging.DEBUG if level() <= logging.DEBUG else logging.INFO)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    console = logging.StreamHandler(console_stream) if console_stream is not None else _Stderr()
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if verbose():
        console.setLevel(level())
    else:
        console.addFilter(_ConsoleFilter())
    root = logging.getLogger()
    root.setLevel(min(logging.INFO, level()))
    for handler in (file_handler, console):
        root.addHandler(handler)
        log.handlers.append((root, handler))
    logging.captureWarnings(True)  # RayDeprecationWarning and friends: into the log, not on the console
    global current
    current = log
    return log


def route_ray_logs(log: LogFile, loggers: tuple[str, ...] = RAY_LOGGERS) -> None:
    """Ray's loggers keep their own console handlers and do not propagate: quiet those, copy records to the file.

    Call once `ray` is imported (before ray.init, so its own start-up lines are quiet too). With
    JOB_CLIENT_LOGGERS (`submit`), Ray Data is not imported for its logger and progress bars: seconds."""
    if "ray.data" in loggers:
        import ray.data  # its import configures the `ray.data` logger; adjust it after

        if log.ray_progress_bars is None:
            context = ray.data.DataContext.get_current()
            log.ray_progress_bars = context.enable_progress_bars
            context.enable_progress_bars = verbose()
    else:
        import ray  # noqa: F401 - its import gives the `ray` logger its console handler; adjust it after

    file_handler = next(h for _, h in log.handlers if isinstance(h, logging.FileHandler))
    for name in loggers:
        logger = logging.getLogger(name)
        if logger.propagate:
            continue  # reaches the root handlers already
        if not any(isinstance(h, _Forward) and h.target is file_handler for h in logger.handlers):
            forward = _Forward(file_handler)
            logger.addHandler(forward)
            log.handlers.append((logger, forward))
        if verbose():
            continue
        for handler in logger.handlers:
            console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            # Errors too: a failed job ends with our one line; Ray's tracebacks are in the file.
            if console and handler.level < logging.CRITICAL:
                log.ray_levels.append((handler, handler.level))
                handler.setLevel(logging.CRITICAL)
