"""Segmentation losses with an ignore index, written for a custom distributed train step.

Every loss returns per-example values; the train step sums them and divides by
the global batch, so gradients averaged over replicas equal a single large batch.
"""

from __future__ import annotations

import tensorflow as tf

IGNORE_INDEX = 255


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor, ignore_index: int = IGNORE_INDEX) -> tf.Tensor:
    """Per-example mean softmax cross-entropy over labelled pixels; labels (N,H,W), logits (N,H,W,K)."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.cast(tf.not_equal(labels, ignore_index), tf.float32)
    safe = tf.where(labels == ignore_index, tf.zeros_like(labels), labels)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=tf.cast(logits, tf.float32))
    return tf.reduce_sum(ce * valid, axis=[1, 2]) / tf.maximum(tf.reduce_sum(valid, axis=[1, 2]), 1.0)


def dice(labels: tf.Tensor, logits: tf.Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1.0) -> tf.Tensor:
    """Per-example soft Dice loss (1 - mean Dice over classes) over labelled pixels."""
    labels = tf.cast(labels, tf.int32)
    k = tf.shape(logits)[-1]
    valid = tf.cast(tf.not_equal(labels, ignore_index), tf.float32)[..., None]
    probs = tf.nn.softmax(tf.cast(logits, tf.float32)) * valid
    onehot = tf.one_hot(tf.where(labels == ignore_index, tf.zeros_like(labels), labels), k) * valid
    inter = tf.reduce_sum(probs * onehot, axis=[1, 2])
    total = tf.reduce_sum(probs + onehot, axis=[1, 2])
    return 1.0 - tf.reduce_mean((2.0 * inter + eps) / (total + eps), axis=-1)


LOSSES = {
    "ce": cross_entropy,
    "dice": dice,
    "ce+dice": lambda y, p: cross_entropy(y, p) + dice(y, p),
}
