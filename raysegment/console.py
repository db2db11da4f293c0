"""What every command and job entrypoint prints: progress (stderr), one closing summary, results as JSON,
user errors as one line with their exit code.

Shared by the CLI (`cli.py`) and the `ray job submit` entrypoints (`entrypoints.py`), so neither
imports the other. A command that runs a job does it inside `session`: the log file (`logs.py`),
progress on, and under `--json` stdout kept for the one JSON object (everything else goes to stderr).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO

import click

from raysegment import logs, progress
from raysegment.errors import UserError

# What a command's exit code tells a script or a scheduler.
EXIT_MEANINGS = {
    0: "ok",
    2: "user error: fix the input named above",
    3: "the job failed",
    4: "drift flagged (everything written)",
    5: "another nightly run holds the lock (nothing done)",
}


# Ray Data appends its retry advice to the message of an error raised in a task (it rewrites the
# exception's args): "Failed to apply UDF transform after 1/1 attempts ..." and how to configure retries.
# Our errors are not transient, so that advice is noise on the one line the user reads.
_RAY_RETRY_NOTE = re.compile(r"\nFailed to [^\n]* after \d+/\d+ attempts \(total backoff[\s\S]*\Z")


def error_text(err: BaseException) -> str:
    """An error's message as the user reads it: without what Ray appended on the way."""
    return _RAY_RETRY_NOTE.sub("", str(err))


def user_error(exc: BaseException | None) -> UserError | None:
    """The UserError behind an exception, also when Ray wrapped it in a task or train error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # Ray re-raises a task's error as a subclass of both RayTaskError and the error: its text
        # is the remote traceback, so keep walking to the original (its .cause).
        wrapped = any(c.__module__.startswith("ray.") for c in type(exc).__mro__)
        if isinstance(exc, UserError) and not wrapped:
            return exc
        # Ray Train: a worker's error (a damaged shard read by its data feed) is kept per rank.
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict):
            found = (user_error(failures[rank]) for rank in sorted(failures))
            return next((e for e in found if e is not None), None)
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


@dataclass
class Session:
    """One command's run: what it is, where its log is, and the summary and result it ends with."""

    kind: str
    as_json: bool
    results: TextIO  # the real stdout: the summary, or under --json only the JSON object
    log: logs.LogFile
    log_path: str = ""  # where the log file ended up
    lines: list[str] = field(default_factory=list)
    payload: dict[str, Any] | None = None
    exit_code: int = 0
    json_too: bool = False  # the benchmarks print their JSON after the summary also without --json

    def done(
        self, lines: list[str], payload: dict[str, Any] | None, exit_code: int = 0, json_too: bool = False
    ) -> None:
        """The closing summary and the JSON result, printed once the log file is in its place."""
        self.lines, self.payload, self.exit_code, self.json_too = lines, payload, exit_code, json_too

    def print_results(self) -> None:
        human = sys.stderr if self.as_json else self.results
        for line in [*self.lines, f"  log        {self.log_path}", f"  exit {self.exit_code}: {exit_meaning(self)}"]:
            click.echo(line, file=human)
        if self.as_json:
            payload = {"command": self.kind, **(self.payload or {}), "exit_code": self.exit_code}
            print_json({**payload, "log_file": self.log_path}, self.results)
        elif self.json_too and self.payload is not None:
            print_json(self.payload, self.results)


def exit_meaning(s: Session) -> str:
    return EXIT_MEANINGS.get(s.exit_code, "see the lines above")


json_option = click.option(
    "--json", "as_json", is_flag=True, help="print one JSON object on stdout (progress and summary on stderr)"
)

# The latest session of this process: handle_errors reads its log path and JSON mode.
_last: Session | None = None


@contextlib.contextmanager
def _console() -> Iterator[TextIO]:
    """Our own human output (progress, warnings): the terminal or pipe stderr is now, kept while `_fds_into`
    points fd 2 elsewhere."""
    try:
        fd = os.dup(2)
    except OSError:
        yield sys.stderr
        return
    stream = os.fdopen(fd, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8")
    try:
        yield stream
    finally:
        stream.close()


@contextlib.contextmanager
def _fds_into(path: str | None, fds: tuple[int, ...]) -> Iterator[None]:
    """Meanwhile, whatever is written to these file descriptors, by Python, C++ (TensorFlow, Ray's core
    worker) or child processes, goes to `path` (None: to stderr)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else os.dup(2)
    saved: list[tuple[int, int]] = []
    try:
        for fd in fds:
            saved.append((fd, os.dup(fd)))
            os.dup2(target, fd)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in reversed(saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(target)


@contextlib.contextmanager
def session(kind: str, output_uri: str | None = None, as_json: bool = False) -> Iterator[Session]:
    """Run a command: progress on stderr, the rest of stderr (and under --json of stdout) into the log file,
    and at the end the summary (or the JSON object) on stdout. Verbose: nothing is diverted."""
    global _last
    logs.apply_quiet_env()  # before anything imports TensorFlow
    quiet = not logs.verbose()
    with _console() if quiet else contextlib.nullcontext(None) as console:
        log = logs.start(kind, output_uri, console)
        s = _last = Session(kind, as_json, sys.stdout, log)
        progress.configure(progress.mode_for(console or sys.stderr), stream=console)
        # Quiet: stray output (C++ logs, Ray's messages) into the log; verbose --json: stdout onto stderr.
        fds = (1, 2) if quiet else (1,) if as_json else ()
        try:
            with _fds_into(log.path if quiet else None, fds), _python_stdout_to_stderr(as_json):
                try:
                    yield s
                finally:
                    log.close_resources()  # while stray output still goes to the log
        except Exception as exc:
            err = user_error(exc)
            if err is not None and err.exit_code in REFUSED and not log.working:
                # Refused (a folder that is not OUTPUT's to write, a bad option, a lock another run holds): its
                # log stays in the temp folder, so a refused command writes nothing under OUTPUT.
                log.final_dir = None
            raise
        finally:
            progress.configure(progress.OFF)
            s.log_path = log.finish()
    s.print_results()


def _python_stdout_to_stderr(as_json: bool) -> contextlib.AbstractContextManager[Any]:
    """Under --json, print() goes to stderr too (a test runner's stdout has no file descriptor to divert)."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def _error_json(kind: str, err: BaseException, exit_code: int, s: Session | None) -> dict[str, Any]:
    return {"command": kind, "exit_code": exit_code, "error": error_text(err), "log_file": s.log_path if s else None}


INTERRUPTED = 130  # exit code after Ctrl-C
REFUSED = (2, 5)  # a user error, a lock another run holds: before the command began on OUT (logs.began), a refusal
TERMINATED = 143  # exit code after SIGTERM (128 + 15, as shells report it)


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd stop, Kubernetes, `ray job stop`), raised in the main thread. A KeyboardInterrupt, so
    the stack unwinds as after Ctrl-C (`with` blocks release their locks, no `except Exception` takes it for
    a job's error), and so Ray passes it on: a signal handler's exception inside `ray.get`/`ray.wait` comes
    out of them as a plain KeyboardInterrupt (any other BaseException is dropped there, a SystemExit turns
    into SystemExit(1)). `_sigterm_seen` tells handle_errors which signal it was."""


_sigterm_armed = 0  # how many handle_errors calls are running (the handler is ours while any is)
_sigterm_seen = False


def _raise_terminated(signum: int, frame: Any) -> None:
    global _sigterm_seen
    if _sigterm_seen:  # a second one (some supervisors repeat it) while the first unwinds: locks go first
        return
    _sigterm_seen = True
    raise Terminated


def rearm_sigterm() -> None:
    """Make SIGTERM ours again inside a command: `ray.init` installs Ray's driver handler, which calls
    sys.exit(15) (exit 15, no line, nothing on stdout under --json). `init_ray` calls this after it."""
    if _sigterm_armed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Meanwhile SIGTERM raises Terminated (signal handlers can be set in the main thread only)."""
    global _sigterm_armed, _sigterm_seen
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    _sigterm_armed += 1
    _sigterm_seen = False
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        _sigterm_armed -= 1
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


# Set on the KeyboardInterrupt that stops the following of a cluster job (`jobs.wait`): the job goes on.
FOLLOWING = "raysegment_following_job"


def _stopped(
    fn: Callable[..., Any], kwargs: dict[str, Any], how: str, exit_code: int, following: bool = False
) -> NoReturn:
    """End a command stopped from outside (Ctrl-C, SIGTERM): one line saying what is kept, under --json the
    one error object, and the exit code a shell gives that signal, so a scheduler tells "stopped" from
    "failed"."""
    s = _last
    kind = s.kind if s is not None else fn.__name__.replace("_", " ")
    if following:
        text = f"{how}: {kind} stopped following the cluster job (see the line above: the job goes on)"
    elif kind == "serve":  # stopped while loading the model: nothing to keep or go on with
        text = f"{how}: serve stopped"
    else:
        text = (
            f"{how}: {kind} stopped; what it finished is kept: run the same command again (infer, nightly "
            "and train go on where they stopped)"
        )
    click.echo(text, err=True)
    if kwargs.get("as_json") or (s is not None and s.as_json):  # a script still reads one object
        print_json(
            {"command": kind, "exit_code": exit_code, "error": text, "log_file": s.log_path if s else None},
            s.results if s is not None else sys.stdout,
        )
    sys.exit(exit_code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print user-fixable errors as one line (exit 2; 3 for a failed job), no traceback; the log's path follows
    for a failed job and for a user error raised after the command began on OUT (`logs.began`).

    Under `--json` (an `as_json` argument) the error is also the one JSON object on stdout. Ctrl-C exits 130
    and SIGTERM 143, each with one line (and object) saying the command stopped."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _last
        _last = None
        try:
            with _sigterm_raises():
                return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:
            # click alone said "Aborted!" and exited 1, a code that reads as a failure.
            term = isinstance(exc, Terminated) or _sigterm_seen
            how = ("terminated (SIGTERM)", TERMINATED) if term else ("interrupted", INTERRUPTED)
            _stopped(fn, kwargs, *how, following=getattr(exc, FOLLOWING, False))
        except Exception as exc:
            err, s = user_error(exc), _last
            as_json = bool(kwargs.get("as_json") or (s is not None and s.as_json))
            kind = s.kind if s is not None else fn.__name__.replace("_", " ")
            if err is None:
                if s is not None:
                    click.echo(f"details in {s.log_path}", err=True)
                if as_json:  # a crash too leaves one object on stdout; the traceback follows on stderr
                    print_json(_error_json(kind, exc, 1, s), s.results if s is not None else sys.stdout)
                raise
            click.echo(f"error: {error_text(err)}", err=True)
            if s is not None and (err.exit_code not in (0, *REFUSED) or (err.exit_code in REFUSED and s.log.working)):
                # A failed job's log, or a user error's once the command began on OUT (the log kept beside what
                # it left). A refusal stays its one line: it wrote nothing, its log is in the temp folder.
                click.echo(f"  log: {s.log_path}", err=True)
            if as_json:
                print_json(_error_json(kind, err, err.exit_code, s), s.results if s is not None else sys.stdout)
            sys.exit(err.exit_code)

    return wrapper


def print_json(result: dict[str, Any], stream: TextIO | None = None) -> None:
    """Print a result as one indented JSON object (benchmarks end with it; --json prints only it)."""
    click.echo(json.dumps(result, indent=2, default=str), file=stream or sys.stdout)
