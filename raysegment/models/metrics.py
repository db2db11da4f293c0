"""Segmentation metrics from a confusion matrix (rows: truth, columns: prediction), and errors by their
distance from a label edge (where an annotation is least certain)."""

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


# Bands of distance (px, chessboard) from the nearest label edge that `evaluate` splits the errors into:
# (lowest, highest or None for no bound, name).
EDGE_BANDS = ((0, 0, "on an edge"), (1, 1, "1 px"), (2, 2, "2 px"), (3, 4, "3-4 px"), (5, None, "5+ px"))


def edge_distance(labels: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Per pixel of an (H, W) label map, the chessboard distance in px to the nearest edge pixel: a pixel with
    a 4-neighbour of another class (both sides of a boundary are edge pixels). Ignored pixels first take the
    class of the nearest labelled one, so a void band between two classes (VOC's object outlines) is an edge
    along its middle, and void beside one class is none. A map with no edge gets a distance past every band."""
    from scipy import ndimage

    labelled = (labels != ignore_index) & (labels < num_classes)
    if not labelled.any():
        return np.full(labels.shape, np.iinfo(np.int32).max, np.int32)
    if not labelled.all():
        # Without this, VOC-style masks (every boundary voided) had no edge at all: 100% of pixels and errors
        # fell in the 5+ px band, the errors a model is said to own.
        nearest = ndimage.distance_transform_cdt(
            ~labelled, metric="chessboard", return_distances=False, return_indices=True
        )
        labels = labels[tuple(nearest)]
    edge = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        ahead = [slice(None)] * 2
        behind = [slice(None)] * 2
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        ahead_t, behind_t = tuple(ahead), tuple(behind)
        differ = labels[ahead_t] != labels[behind_t]
        edge[ahead_t] |= differ
        edge[behind_t] |= differ
    if not edge.any():
        return np.full(labels.shape, np.iinfo(np.int32).max, np.int32)
    return ndimage.distance_transform_cdt(~edge, metric="chessboard").astype(np.int32)


def edge_error_counts(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(len(EDGE_BANDS), 2) int64: labelled pixels and wrong ones in each band of distance from a label edge."""
    labelled = (labels != IGNORE_INDEX) & (labels < num_classes)
    dist = edge_distance(labels, num_classes)[labelled]
    wrong = (labels != preds)[labelled]
    counts = np.zeros((len(EDGE_BANDS), 2), np.int64)
    for i, (low, high, _) in enumerate(EDGE_BANDS):
        band = (dist >= low) if high is None else (dist >= low) & (dist <= high)
        counts[i] = band.sum(), (band & wrong).sum()
    return counts


def edge_error_table(counts: np.ndarray) -> list[dict]:
    """Each band's pixels, errors, share of the pixels, error rate and share of all errors."""
    counts = np.asarray(counts, np.int64).reshape(len(EDGE_BANDS), 2)
    pixels, errors = counts.sum(axis=0)
    return [
        {
            "band": name,
            "pixels": int(n),
            "errors": int(e),
            "pixel_share": float(n / pixels) if pixels else 0.0,
            "error_rate": float(e / n) if n else 0.0,
            "error_share": float(e / errors) if errors else 0.0,
        }
        for (n, e), (_, _, name) in zip(counts, EDGE_BANDS)
    ]
