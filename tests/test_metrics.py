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


def test_edge_errors_split_a_shifted_boundary_from_a_far_mistake():
    from raysegment.models.metrics import EDGE_BANDS, edge_distance, edge_error_counts, edge_error_table

    labels = np.zeros((20, 20), np.uint8)
    labels[5:15, 5:15] = 1
    dist = edge_distance(labels, 2)
    assert dist[5, 5] == 0 and dist[4, 7] == 0  # both sides of the boundary are edge pixels
    assert dist[3, 7] == 1 and dist[10, 10] == 4 and dist[0, 19] == 5
    shifted = np.roll(labels, 1, axis=1)  # the boundary drawn one pixel to the right
    counts = edge_error_counts(labels, shifted, 2)
    assert counts[:, 0].sum() == labels.size
    assert counts[0, 1] == 20 and counts[1:, 1].sum() == 0  # every error sits on an edge
    far = labels.copy()
    far[0, 19] = 1  # one mistake 5 px from the nearest edge, one 4 px
    far[10, 10] = 0
    counts = edge_error_counts(labels, far, 2)
    assert counts[:, 1].tolist() == [0, 0, 0, 1, 1]
    table = edge_error_table(counts)
    assert [row["band"] for row in table] == [name for _, _, name in EDGE_BANDS]
    assert table[3]["error_share"] == 0.5 and table[4]["errors"] == 1
    assert sum(row["pixel_share"] for row in table) == pytest.approx(1.0)


def test_edge_errors_leave_out_ignored_pixels_and_maps_without_edges():
    from raysegment.models.metrics import edge_distance, edge_error_counts

    labels = np.full((8, 8), 1, np.uint8)
    labels[:, :3] = 255  # void beside one class: not a class boundary
    assert (edge_distance(labels, 2)[labels != 255] > 100).all()
    preds = np.zeros((8, 8), np.uint8)
    counts = edge_error_counts(labels, preds, 2)
    assert counts[:-1].sum() == 0 and counts[-1].tolist() == [40, 40]  # 24 void pixels left out
    labels[0, 7] = 0
    counts = edge_error_counts(labels, labels, 2)
    assert counts[:, 1].sum() == 0 and counts[:, 0].sum() == 40


def test_a_void_band_between_two_classes_is_an_edge():
    """VOC voids every object's outline: with no two classes touching, 100% of pixels and errors were put
    5+ px from an edge. The band's middle is the edge now; void beside one class still is none."""
    from raysegment.models.metrics import edge_distance, edge_error_counts

    labels = np.zeros((24, 24), np.uint8)
    labels[6:18, 6:18] = 1
    ring = np.zeros_like(labels, bool)
    ring[4:20, 4:20] = True
    ring[8:16, 8:16] = False
    labels[ring] = 255  # a 4 px void band around the object
    dist = edge_distance(labels, 2)
    assert dist[3, 10] <= 2 and dist[8, 10] <= 2  # just outside and just inside the band
    assert dist[12, 12] >= 3 and dist[0, 0] >= 3
    grown = labels.copy()
    grown[labels == 255] = 0
    grown[3:21, 3:21] = 1  # the model's object a pixel past the band on every side
    counts = edge_error_counts(labels, grown, 2)
    assert counts[-1, 1] == 0 and counts[:-1, 1].sum() == 4 * 18 - 4


def test_evaluate_refuses_the_models_classes_in_another_order():
    """Scores are by class id: a data set naming the model's classes in another order would attribute
    each class's figures to another (it was accepted, as only the count was checked)."""
    import pytest

    from raysegment.errors import DataError
    from raysegment.evaluate import check_class_names

    check_class_names("d", ["bg", "cell"], ["bg", "cell"])
    check_class_names("d", ["class_0", "class_1"], ["bg", "cell"])  # a renaming: warned of, scored by id
    with pytest.raises(DataError, match=r"in another order.*--class-names"):
        check_class_names("d", ["cell", "bg"], ["bg", "cell"])
