"""Progress of the long stages: a tqdm bar on a terminal, a timestamped line every few seconds elsewhere.

A stage (prepare, an epoch, evaluate, infer) counts what it has done of its total and a few
named figures (loss, errors); this module decides how that is shown. Nothing is shown until a
command turns progress on (`configure`, called by `console.session`), so library calls and
tests stay silent. Bars and lines go to stderr: stdout holds results (and only the JSON
object under `--json`). Every final line also goes to the log file.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from raysegment import logs

log = logging.getLogger(__name__)

OFF, BAR, LINES = "off", "bar", "lines"


@dataclass
class Settings:
    """How progress is shown: off (library use), bar (a terminal) or lines (cron, CI, `ray job logs`)."""

    mode: str = OFF
    interval_s: float = 10.0
    stream: TextIO | None = None  # default: sys.stderr at the time of writing
    # Totals announced before their stage starts (nightly knows how many images its infer run gets).
    totals: dict[str, int] = field(default_factory=dict)


settings = Settings()


def configure(mode: str, interval_s: float = 10.0, stream: TextIO | None = None) -> None:
    """Turn progress on (`bar`, `lines`) or off for this process."""
    settings.mode, settings.interval_s, settings.stream = mode, interval_s, stream
    settings.totals.clear()


def mode_for(stream: TextIO) -> str:
    """Bars on a terminal, plain lines anywhere else."""
    try:
        return BAR if stream.isatty() else LINES
    except (AttributeError, ValueError):
        return LINES


def expect_total(name: str, total: int) -> None:
    """Announce the total of the next stage called `name` (for a stage that cannot count its input)."""
    settings.totals[name] = total


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _figure(name: str, value: Any) -> str:
    """`img_per_s=312.5` -> `img/s 312.5`; floats below 10 (losses, metrics) with 4 decimals."""
    label = name.replace("_per_", "/").replace("_", " ")
    if isinstance(value, float):
        return f"{label} {value:.4f}" if abs(value) < 10 else f"{label} {value:.1f}"
    return f"{label} {value}"


class Stage:
    """One stage's progress: done of total, rate, ETA and named figures, shown per `settings.mode`."""

    def __init__(self, name: str, total: int | None = None, unit: str = "images") -> None:
        self.name, self.unit = name, unit
        self.total = total if total is not None else settings.totals.pop(name, None)
        self.done = 0
        self.skipped = 0  # of `done`, found done by an earlier run (`skip`): not in the rate
        self.figures: dict[str, Any] = {}
        # Called before a heartbeat's line: a stage fed by a loop that blocks (Ray's iterators) counts what
        # finished meanwhile, without waiting (infer: blocks its committer counted, inputs resume skipped).
        self.poll: Callable[[], None] | None = None
        self.started = self._last_line = time.time()
        self.mode = settings.mode
        self._bar = self._make_bar() if self.mode == BAR else None
        self._closed = False
        self._lock = threading.RLock()  # the heartbeat thread writes lines too
        self._stop = threading.Event()
        if self.mode == LINES and settings.interval_s > 0:
            _start_heartbeat(self, settings.interval_s)

    def _stream(self) -> TextIO:
        return settings.stream or sys.stderr

    def _make_bar(self) -> Any:
        from tqdm import tqdm

        stream = self._stream()
        # A terminal that reports no width (a fresh pseudo-terminal) would get an empty bar.
        sized = _columns(stream) > 0
        # tqdm's own formats, the rate never inverted: with the unit's leading space (for `12 images`) a slow
        # stage read `1.47s/ images`; now `0.68 images/s`, as the lines say it.
        counts = (
            "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
            if self.total
            else "{desc}: {n_fmt}{unit} [{elapsed}, "
        )
        return tqdm(
            total=self.total,
            desc=self.name,
            unit=f" {self.unit}",
            file=stream,
            dynamic_ncols=sized,
            ncols=None if sized else 100,
            leave=True,
            bar_format=counts + "{rate_noinv_fmt}{postfix}]",
        )

    def update(self, n: int = 0, **figures: Any) -> None:
        """`n` more done (fewer, for a negative `n`); figures (loss=0.41, errors=3) replace the ones shown.
        Nothing once the stage is closed (a poll that ran late)."""
        with self._lock:
            if self._closed:
                return
            self.done += n
            self.figures.update(figures)
            if self._bar is not None:
                if figures:
                    self._bar.set_postfix_str(self._figures_text(), refresh=False)
                self._bar.update(n)
            elif self.mode == LINES:
                self._line_if_due()

    def skip(self, skipped: int) -> None:
        """`skipped` inputs (a running total) were found done by an earlier run: counted in `done`, so a resumed
        stage ends at 100%, but not in the rate, and shown as `already done N`."""
        with self._lock:
            more = skipped - self.skipped
            if more <= 0 or self._closed:
                return
            self.skipped = skipped
            if self._bar is not None:
                self._bar.set_postfix_str(self._figures_text(), refresh=False)
            self.update(more)

    def kept(self, rows: int) -> None:
        """The stage stopped with `rows` of its own rows kept (besides the inputs found done, `skip`): `done` says
        that, whatever was counted as it went. Under the lock, as the heartbeat's `skip` moves `skipped`."""
        with self._lock:
            self.update(rows - (self.done - self.skipped))

    def beat(self) -> None:
        """A line when none was written for `interval_s`, rows or not (the heartbeat thread's call): a stage
        waiting for its first rows (listing, actors starting) showed nothing for 20 s and more. `poll` first,
        outside the lock (it may update the stage), when a line is due."""
        if self.poll is not None and self._due():
            try:
                self.poll()
            except Exception as exc:  # a count missed now is taken at the next beat, or at the end
                log.debug("%s: progress poll failed: %s", self.name, exc)
        with self._lock:
            if not self._closed:
                self._line_if_due()

    def _due(self) -> bool:
        return time.time() - self._last_line >= settings.interval_s and not self._complete()

    def _line_if_due(self) -> None:
        if self._due():
            self._write(self.line())  # a complete stage gets its final line from close()

    def close(self, eta_s: float | None = None, stopped: bool = False, **figures: Any) -> str:
        """The stage is over: its final line (shown in lines mode, kept by the bar, always logged). `stopped`:
        it did not finish (an interrupt, an error), and its line says so instead of the finished `in Ns`."""
        with self._lock:
            if self._closed:
                return self.line()
            self._closed = True
            self._stop.set()
            self.figures.update(figures)
            line = self.line(final=True, eta_s=eta_s, stopped=stopped)
            if self._bar is not None:
                self._bar.set_postfix_str(self._figures_text(eta_s), refresh=False)
                self._bar.close()
            elif self.mode == LINES:
                self._write(line)
        log.info("%s", line)
        return line

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        self.close(stopped=kind is not None)

    def _complete(self) -> bool:
        return bool(self.total) and self.done >= self.total

    def rate(self) -> float:
        """Of the work done here: inputs an earlier run did are not counted."""
        return (self.done - self.skipped) / max(time.time() - self.started, 1e-9)

    def line(self, final: bool = False, eta_s: float | None = None, stopped: bool = False) -> str:
        """`infer  120/400 images (30%)  12.3 images/s  ETA 23s  already done 40  errors 0` (lines mode prefixes
        the time); a final line ends `in 27s`, or `stopped after 24s` for a stage that did not finish."""
        elapsed = time.time() - self.started
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        parts = [self.name, f"{count} {self.unit}"]
        if self.total:
            parts[-1] += f" ({self.done / self.total:.0%})"
        parts.append(f"{self.rate():.1f} {self.unit}/s")
        if final:
            parts.append(f"{'stopped after' if stopped else 'in'} {duration(elapsed)}")
        elif self.total and self.done > self.skipped:
            parts.append(f"ETA {duration((self.total - self.done) / self.rate())}")
        text = self._figures_text(eta_s)
        return "  ".join([*parts, text] if text else parts)

    def _figures_text(self, eta_s: float | None = None) -> str:
        items = [f"already done {self.skipped}"] if self.skipped else []
        items += [_figure(k, v) for k, v in self.figures.items() if v is not None]
        if eta_s is not None:
            items.append(f"ETA {duration(eta_s)}")
        return "  ".join(items)

    def _write(self, line: str) -> None:
        self._last_line = time.time()
        _show(line, self._stream())


def _start_heartbeat(shown: Stage, interval_s: float) -> None:
    """A daemon thread that lets `shown` write its line every `interval_s` while no rows come (the loops that
    feed a stage block in Ray's iterators, so they cannot). It holds the stage weakly and ends at close, or
    when a stage that was never closed is gone."""
    ref, stop = weakref.ref(shown), shown._stop

    def run() -> None:
        wait = interval_s
        while not stop.wait(wait):
            alive = ref()
            if alive is None:
                return
            try:
                alive.beat()
            except Exception:  # progress must never print a thread's traceback, nor fail a command
                return
            # Until the line is due (a row's line may have come meanwhile); a complete stage's, now and then.
            wait = max(alive._last_line + interval_s - time.time(), interval_s / 10)
            del alive

    threading.Thread(target=run, name=f"raysegment-progress-{shown.name}", daemon=True).start()


def stage(name: str, total: int | None = None, unit: str = "images") -> Stage:
    """A new stage's progress; use as a context manager or call close()."""
    return Stage(name, total, unit)


def warn(logger: logging.Logger, kind: str, text: str) -> None:
    """A warning for people: in the log file, and on the console once (the `KIND: warning: ...` progress line,
    or the console log's line when progress is off); both printed it when stderr was not a terminal."""
    noted = settings.mode != OFF
    logger.warning("%s: %s", kind, text, extra={logs.NOTED: noted})
    if noted:
        _show(f"{kind}: warning: {text}")  # the log has the record already


def note(text: str) -> None:
    """A one-off progress line (nightly: listed, new, changed), shown whenever progress is on."""
    log.info("%s", text)
    if settings.mode != OFF:
        _show(text)


# Every line of this module's, from any thread, is one write under this lock: print() wrote a line's text and
# its newline apart, and the heartbeat thread's line could take a warning's text between them.
_writing = threading.Lock()


def _show(text: str, stream: TextIO | None = None) -> None:
    line = f"{time.strftime('%H:%M:%S')} {text}\n"
    out = stream or settings.stream or sys.stderr
    with _writing:
        out.write(line)
        out.flush()
