"""Segmentation metrics from a confusion matrix (rows: truth, columns: prediction)."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(
    labels: np.ndarray, preds: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """K x K int64 counts; pixels labelled ignore_index (or out of range) are left out."""
    labels = labels.ravel().astype(np.int64)
    preds = preds.ravel().astype(np.int64)
    keep = (labels != ignore_index) & (labels < num_classes)
    idx = labels[keep] * num_classes + preds[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Pixel accuracy, per-class IoU and Dice, and their means over classes that occur."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    truth = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = truth + pred - tp
    present = truth + pred > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(truth + pred > 0, 2 * tp / (truth + pred), np.nan)
    names = class_names or [f"class_{i}" for i in range(len(cm))]
    total = cm.sum()
    return {
        "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
        "mean_iou": float(np.mean(iou[present])) if present.any() else 0.0,
        "mean_dice": float(np.mean(dice[present])) if present.any() else 0.0,
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
        "per_class_dice": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, dice)},
        "pixels": int(total),
    }
