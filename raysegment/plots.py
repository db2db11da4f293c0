"""PNG plots people open instead of reading numbers (matplotlib, headless)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_curves(history: list[dict[str, Any]]) -> bytes:
    """Loss and validation metrics per epoch, as PNG bytes."""
    epochs = [h["epoch"] + 1 for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    for key, label in (
        ("val_mean_iou", "val mIoU"),
        ("val_mean_dice", "val Dice"),
        ("val_pixel_accuracy", "val pixel acc"),
    ):
        right.plot(epochs, [h[key] for h in history], marker="o", label=label)
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend()
    fig.suptitle("raysegment training")
    return _png(fig)
