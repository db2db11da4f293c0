"""Training progress from rank 0 to the driver: a tiny Ray actor that rank 0 posts to and the driver polls.

The driver keeps the workers' output off the console (`ray.init(log_to_driver=False)`), and Ray
Train's report callbacks run in its controller, not the driver, and only at epoch ends; the
steps inside an epoch come through here, and each finished epoch for live tracking
(`tracking.LiveLog`). Posting is fire-and-forget (one actor call, no wait), at most about once a
second, so it costs the training loop nothing measurable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from raysegment import progress, storage

log = logging.getLogger(__name__)

POST_EVERY_S = 1.0
POLL_EVERY_S = 0.5


@dataclass(frozen=True)
class Step:
    """Rank 0 is `step` steps into `epoch` (0-based) of `steps`; `loss` is its latest step's (None at step 0)."""

    epoch: int
    step: int
    steps: int
    loss: float | None


@dataclass(frozen=True)
class EpochEnd:
    """One epoch's row of the history (`loop.epoch_metrics`)."""

    metrics: dict[str, Any]
    stopped_by: str | None  # "patience" or "time_budget" when training stops after this epoch


@dataclass(frozen=True)
class Resumed:
    """Rank 0 restored `checkpoint` (its path as Ray Train names it), written after epoch `from_epoch` (0-based),
    with this history (the epochs up to it): the driver notes it at once, and tracking logs the epochs it
    lacks. `skipped`: the newer checkpoints that did not load, one line each."""

    history: list[dict[str, Any]]
    from_epoch: int
    checkpoint: str
    skipped: tuple[str, ...]


Event = Step | EpochEnd | Resumed


class Inbox:
    """The actor's state: events in arrival order until the driver takes them."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def put(self, event: Event) -> None:
        self.events.append(event)

    def take(self) -> list[Event]:
        events, self.events = self.events, []
        return events


class Poster:
    """Rank 0's side: post steps (throttled), epoch ends and a restored checkpoint's history."""

    def __init__(self, inbox: Any) -> None:
        self.inbox = inbox
        self._last = 0.0

    def step(self, epoch: int, step: int, steps: int, loss: Any = None) -> None:
        """Step 0 (the epoch starts) and the last step always; between them about once a second."""
        now = time.time()
        if now - self._last >= POST_EVERY_S or step in (0, steps):
            self._last = now
            self.inbox.put.remote(Step(epoch, step, steps, None if loss is None else float(loss)))

    def epoch_end(self, metrics: dict[str, Any], stopped_by: str | None) -> None:
        self.inbox.put.remote(EpochEnd(metrics, stopped_by))

    def resumed(self, history: list[dict[str, Any]], resume: dict[str, Any]) -> None:
        """`resume`: the restore's entry in the state's `resumes` (`checkpoint.restore`)."""
        skipped = tuple(resume.get("skipped", ()))
        self.inbox.put.remote(Resumed(history, resume["from_epoch"], resume["checkpoint"], skipped))


def note_resumed(event: Resumed) -> None:
    """The driver's lines for a restore, as soon as it learns of it (before the resumed run's first epoch line):
    a warning per checkpoint skipped as unreadable, then which checkpoint the run goes on from. Each restore
    posts one event (a re-run resumed twice, or a restarted worker group, is noted each time, once)."""
    for problem in event.skipped:
        progress.warn(log, "train", f"skipped unreadable checkpoint {problem}")
    progress.note(f"train: resumed after epoch {event.from_epoch + 1} from {storage.redact(event.checkpoint)}")


class EpochView:
    """The driver's side: one progress stage per epoch, closed with its loss, val metrics and ETA."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.current: progress.Stage | None = None
        self.epoch = -1

    def show(self, event: Event) -> None:
        if isinstance(event, Step):
            self._step(event)
        elif isinstance(event, EpochEnd):
            self._end(event)
        elif isinstance(event, Resumed):
            self.close()  # a restarted worker group: the epoch it was in never finished
            self.current, self.epoch = None, -1
            note_resumed(event)

    def _stage(self, epoch: int, steps: int) -> progress.Stage:
        if self.current is None or self.epoch != epoch:
            if self.current is not None:
                self.current.close(stopped=True)  # a restarted worker group began this epoch again
            self.current = progress.stage(f"epoch {epoch + 1}/{self.epochs}", steps, unit="steps")
            self.epoch = epoch
        return self.current

    def _step(self, event: Step) -> None:
        stage = self._stage(event.epoch, event.steps)
        stage.update(event.step - stage.done, loss=event.loss)

    def _end(self, event: EpochEnd) -> None:
        m = event.metrics
        self.epochs = m.get("epochs", self.epochs)  # the time budget's fitted epochs, once the first is measured
        stage = self._stage(m["epoch"], None)
        stage.name = f"epoch {m['epoch'] + 1}/{self.epochs}"  # the first epoch's line: the count it fitted
        stage.close(
            eta_s=None if event.stopped_by else m["eta_s"],  # the loop's: at most what is left of a time budget
            loss=m["train_loss"],
            val_mIoU=m["val_mean_iou"],
            pixel_acc=m["val_pixel_accuracy"],
            img_per_s=f"{m['images_per_second']:.1f}",
        )
        if event.stopped_by == "patience":
            progress.note("train: early stop, no val mIoU gain for the last epochs")
        elif event.stopped_by == "time_budget":
            progress.note("train: stopped at the time budget (another epoch would end past it); best checkpoint kept")
        self.current = None

    def close(self) -> None:
        if self.current is not None:
            self.current.close(stopped=True)  # an epoch still open at the end never finished


def deliver(
    event: Event, view: EpochView | None, on_epochs: Callable[[list[dict[str, Any]]], None] | None = None
) -> None:
    """One event on the driver, in arrival order: shown by `view` (a restore is noted, and logged, with progress
    off too), and each finished epoch's row, or a restored checkpoint's history, handed to `on_epochs`."""
    if view is not None:
        view.show(event)
    elif isinstance(event, Resumed):
        note_resumed(event)
    if on_epochs is not None and isinstance(event, EpochEnd):
        on_epochs([event.metrics])
    elif on_epochs is not None and isinstance(event, Resumed):
        on_epochs(event.history)


@contextmanager
def follow(epochs: int, on_epochs: Callable[[list[dict[str, Any]]], None] | None = None) -> Iterator[Any | None]:
    """While training runs: the inbox actor and a thread showing its events and handing each finished
    epoch's row, and a restored checkpoint's history, to `on_epochs` (live tracking) as they arrive.
    None, and no thread, when progress is off and nobody takes the epochs."""
    view = None if progress.settings.mode == progress.OFF else EpochView(epochs)
    if view is None and on_epochs is None:
        yield None
        return
    import ray

    inbox = ray.remote(num_cpus=0)(Inbox).remote()
    stop = threading.Event()

    def poll() -> None:
        while True:
            done = stop.is_set()
            try:
                for event in ray.get(inbox.take.remote(), timeout=30):
                    deliver(event, view, on_epochs)
            except Exception:  # progress must never fail a training run
                return
            if done:
                return
            stop.wait(POLL_EVERY_S)

    thread = threading.Thread(target=poll, name="raysegment-train-progress", daemon=True)
    thread.start()
    try:
        yield inbox
    finally:
        stop.set()
        thread.join(timeout=35)
        if view is not None:
            view.close()
        ray.kill(inbox)
