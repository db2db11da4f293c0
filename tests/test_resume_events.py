"""The driver's side of a restore (`events.Resumed`): noted when rank 0 restores, before the resumed epochs."""

import io
import logging

from raysegment import progress
from raysegment.train.events import EpochEnd, EpochView, Resumed, Step, deliver


def metrics(epoch: int) -> dict:
    row = {"epoch": epoch, "epochs": 10, "epoch_seconds": 2.0, "eta_s": 10.0, "train_loss": 0.5}
    return row | {"val_mean_iou": 0.3, "val_pixel_accuracy": 0.9, "images_per_second": 12.0}


def test_a_restore_is_noted_when_the_driver_learns_of_it_once_each_before_the_epochs_after_it():
    """`train: resumed after epoch N from CKPT` came only after training ended (from the final state, every
    resume the checkpoint remembered). Each restore is noted as its event arrives, once, before the next
    epoch's line, with its skipped checkpoints' warnings; a worker group restarted mid-epoch closes that
    epoch's line as stopped first."""
    out = io.StringIO()
    rows: list[list[dict]] = []
    progress.configure(progress.LINES, interval_s=3600, stream=out)
    try:
        view = EpochView(10)
        skipped = ("/o/train/checkpoint_2: ValueError: does not match its recorded sha256",)
        events = [
            Resumed([metrics(0)], 0, "/o/train/checkpoint_1", skipped),
            Step(1, 0, 8, None),
            Step(1, 8, 8, 0.5),
            EpochEnd(metrics(1), None),
            Step(2, 0, 8, None),
            Step(2, 4, 8, 0.5),  # the worker group dies here and restarts from epoch 2's checkpoint
            Resumed([metrics(0), metrics(1)], 1, "s3://key:secret@bucket/o/train/checkpoint_3", ()),
            Step(2, 0, 8, None),
            Step(2, 8, 8, 0.4),
            EpochEnd(metrics(2), None),
        ]
        for event in events:
            deliver(event, view, rows.append)
        view.close()
    finally:
        progress.configure(progress.OFF)
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]  # without the time
    assert len(lines) == 6, lines
    assert lines[0] == f"train: warning: skipped unreadable checkpoint {skipped[0]}"
    assert lines[1] == "train: resumed after epoch 1 from /o/train/checkpoint_1"
    assert lines[2].startswith("epoch 2/10  8/8 steps")
    assert lines[3].startswith("epoch 3/10  4/8 steps") and "stopped after" in lines[3]
    assert lines[4] == "train: resumed after epoch 2 from s3://***@bucket/o/train/checkpoint_3"
    assert lines[5].startswith("epoch 3/10  8/8 steps") and "stopped" not in lines[5]
    # Live tracking gets each restore's history and each finished epoch, in order.
    assert rows == [[metrics(0)], [metrics(1)], [metrics(0), metrics(1)], [metrics(2)]]


def test_with_progress_off_a_restore_is_still_logged(caplog):
    caplog.set_level(logging.INFO)
    deliver(Resumed([], 4, "/o/train/checkpoint_5", ("/o/train/checkpoint_6: OSError: torn",)), None)
    messages = [r.getMessage() for r in caplog.records]
    assert "train: skipped unreadable checkpoint /o/train/checkpoint_6: OSError: torn" in messages
    assert "train: resumed after epoch 5 from /o/train/checkpoint_5" in messages
