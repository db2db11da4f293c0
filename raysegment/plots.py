"""PNG plots people open instead of reading numbers (matplotlib, headless)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


def _labels(names: list[str]) -> list[str]:
    """Class names as plain text: matplotlib reads `$...$` as maths (a name like `$x^$` fails the plot)."""
    return [str(n).replace("$", r"\$") for n in names]


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


def confusion_matrix_png(cm: Any, names: list[str]) -> bytes:
    """Heat-map of a confusion matrix (rows: truth, columns: prediction), row-normalised, as PNG bytes."""
    counts = np.asarray(cm, dtype=np.float64)
    k = counts.shape[0]
    if counts.shape != (k, k) or len(names) != k:
        raise ValueError(f"confusion matrix {counts.shape} does not match {len(names)} class names")
    totals = counts.sum(axis=1, keepdims=True)
    # Row shares (per-class recall): raw counts would hide every class but the largest.
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    side = max(4.0, 0.45 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's pixels")
    ax.set_xticks(range(k), _labels(names), rotation=45, ha="right")
    ax.set_yticks(range(k), _labels(names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if k <= 12:  # beyond that the numbers no longer fit their cells
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{shares[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black",
                )
    ax.set_title(f"confusion matrix ({int(counts.sum()):,} pixels)")
    return _png(fig)


def _colour(rgb: list[int] | None) -> tuple[float, float, float]:
    if not rgb or not any(rgb):
        return (0.45, 0.45, 0.45)  # black classes (background) drawn grey, so bars stay visible
    return (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255)


def class_fraction_histograms(
    counts: Any, names: list[str], palette: list[list[int]] | None = None, columns: int = 4
) -> bytes:
    """One histogram per class of its pixel share per image (pre-binned counts, K x bins), as PNG bytes."""
    hist = np.asarray(counts, dtype=np.float64)
    k, bins = hist.shape
    cols = max(1, min(columns, k))
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows), squeeze=False, sharex=True)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Most images hold none of most classes: on a linear axis that one bar flattens the rest.
    log = hist.max() > 100
    for c, ax in enumerate(axes.flat):
        if c >= k:
            ax.axis("off")
            continue
        ax.bar(edges[:-1], hist[c], width=1.0 / bins, align="edge", color=_colour(palette[c] if palette else None))
        ax.set_title(_labels(names)[c], fontsize=9)
        ax.set_xlim(0, 1)
        if log:
            ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("share of the image", fontsize=8)
    fig.suptitle("class pixel share per image (ok rows)" + (", log scale" if log else ""))
    fig.tight_layout()
    return _png(fig)


def drift_png(previous: dict[str, float], current: dict[str, float]) -> bytes:
    """Per-class pixel share before and now, and the change in percentage points, as PNG bytes."""
    names = list(current) + [n for n in previous if n not in current]
    if not names:
        raise ValueError("drift_png needs at least one class")
    before = np.asarray([previous.get(n, 0.0) for n in names]) * 100
    now = np.asarray([current.get(n, 0.0) for n in names]) * 100
    delta = now - before
    y = np.arange(len(names))
    height = max(2.5, 0.35 * len(names) + 1.2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, height), sharey=True)
    left.barh(y - 0.2, before, height=0.4, label="previous", color="#9e9e9e")
    left.barh(y + 0.2, now, height=0.4, label="current", color="#1f77b4")
    left.set_yticks(y, _labels(names))
    left.invert_yaxis()
    left.set_xlabel("share of pixels (%)")
    left.legend(loc="lower right", fontsize=8)
    right.barh(y, delta, color=["#d62728" if d < 0 else "#2ca02c" for d in delta])
    right.axvline(0, color="black", linewidth=0.8)
    span = max(float(np.abs(delta).max()), 0.5)
    right.set_xlim(-span * 1.3, span * 1.3)
    right.set_xlabel("change (percentage points)")
    for yi, d in zip(y, delta):
        right.text(d, yi, f" {d:+.2f} ", va="center", ha="left" if d >= 0 else "right", fontsize=8)
    fig.suptitle("class share drift")
    return _png(fig)
