"""Metrics from confusion matrices and losses with an ignore index."""

import numpy as np
import pytest

from raysegment.models.metrics import confusion_matrix, metrics_from_confusion


def test_confusion_ignores_255():
    labels = np.array([[0, 0, 1, 255]])
    preds = np.array([[0, 1, 1, 0]])
    cm = confusion_matrix(labels, preds, 2)
    np.testing.assert_array_equal(cm, [[1, 1], [0, 1]])


def test_metrics_known_values():
    cm = np.array([[3, 1], [0, 4]])
    m = metrics_from_confusion(cm, ["bg", "fg"])
    assert m["pixel_accuracy"] == pytest.approx(7 / 8)
    assert m["per_class_iou"] == {"bg": pytest.approx(3 / 4), "fg": pytest.approx(4 / 5)}
    assert m["mean_iou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert m["mean_dice"] == pytest.approx((6 / 7 + 8 / 9) / 2)


def test_absent_class_excluded_from_mean():
    cm = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    m = metrics_from_confusion(cm)
    assert m["mean_iou"] == 1.0 and m["per_class_iou"]["class_2"] is None


def test_losses_ignore_index():
    tf = pytest.importorskip("tensorflow")
    from raysegment.models.losses import cross_entropy, dice

    logits = tf.constant(np.random.default_rng(0).normal(size=(1, 2, 2, 3)), tf.float32)
    labels = tf.constant([[[0, 1], [2, 255]]])
    other = tf.constant([[[0, 1], [2, 255]]])
    flipped = tf.tensor_scatter_nd_update(logits, [[0, 1, 1]], [[9.0, -9.0, 0.0]])
    # Changing the logits of an ignored pixel changes neither loss.
    for fn in (cross_entropy, dice):
        assert float(fn(labels, logits)[0]) == pytest.approx(float(fn(other, flipped)[0]), rel=1e-6)
    perfect = tf.one_hot([[[0, 1], [2, 0]]], 3) * 50.0
    assert float(cross_entropy(labels, perfect)[0]) < 1e-6
    assert float(dice(labels, perfect)[0]) < 1e-3
