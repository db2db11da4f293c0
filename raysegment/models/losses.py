"""Segmentation losses with an ignore index, written for a custom distributed train step.

Every loss returns per-example values; the train step sums them and divides by
the global batch, so gradients summed over replicas equal a single large batch.
Logits are (N, H, W, K) for a softmax head or (N, H, W, 1) for a sigmoid head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

IGNORE_INDEX = 255


def _valid(labels: tf.Tensor, ignore_index: int) -> tuple[tf.Tensor, tf.Tensor]:
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_index)
    return tf.where(valid, labels, tf.zeros_like(labels)), tf.cast(valid, tf.float32)


def _mean_over_valid(values: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(values * valid, axis=[1, 2]) / tf.maximum(tf.reduce_sum(valid, axis=[1, 2]), 1.0)


def probabilities(logits: tf.Tensor) -> tf.Tensor:
    """Per-class probabilities (N, H, W, K) from either head."""
    logits = tf.cast(logits, tf.float32)
    if logits.shape[-1] == 1:
        fg = tf.sigmoid(logits)
        return tf.concat([1.0 - fg, fg], axis=-1)
    return tf.nn.softmax(logits)


def cross_entropy(
    labels: tf.Tensor, logits: tf.Tensor, class_weights: Sequence[float] | None = None, ignore_index: int = IGNORE_INDEX
) -> tf.Tensor:
    """Per-example mean (optionally class-weighted) cross-entropy over labelled pixels.

    A sigmoid head gets binary cross-entropy on its single foreground logit.
    """
    safe, valid = _valid(labels, ignore_index)
    logits = tf.cast(logits, tf.float32)
    if logits.shape[-1] == 1:
        ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(safe, tf.float32), logits=logits[..., 0])
    else:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
    if class_weights is not None:
        weights = tf.gather(tf.constant(class_weights, tf.float32), safe)
        return tf.reduce_sum(ce * weights * valid, axis=[1, 2]) / tf.maximum(
            tf.reduce_sum(weights * valid, axis=[1, 2]), 1e-6
        )
    return _mean_over_valid(ce, valid)


def dice(labels: tf.Tensor, logits: tf.Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1.0) -> tf.Tensor:
    """Per-example soft Dice loss (1 - mean Dice over classes) over labelled pixels."""
    safe, valid = _valid(labels, ignore_index)
    probs = probabilities(logits) * valid[..., None]
    onehot = tf.one_hot(safe, tf.shape(probs)[-1]) * valid[..., None]
    inter = tf.reduce_sum(probs * onehot, axis=[1, 2])
    total = tf.reduce_sum(probs + onehot, axis=[1, 2])
    return 1.0 - tf.reduce_mean((2.0 * inter + eps) / (total + eps), axis=-1)


LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def make_loss(name: str, class_weights: Sequence[float] | None = None) -> LossFn:
    """The per-example loss called `name`: ce, dice or ce+dice."""
    if name == "ce":
        return lambda y, p: cross_entropy(y, p, class_weights)
    if name == "dice":
        return dice
    if name == "ce+dice":
        return lambda y, p: cross_entropy(y, p, class_weights) + dice(y, p)
    raise ValueError(f"unknown loss '{name}'; use ce, dice or ce+dice")


def inverse_frequency_weights(pixel_frequency: Sequence[float], cap: float = 10.0) -> list[float]:
    """Class weights from the manifest's pixel frequencies, normalised to mean 1 and capped."""
    freq = [max(f, 1e-6) for f in pixel_frequency]
    raw = [1.0 / f for f in freq]
    mean = sum(raw) / len(raw)
    return [min(r / mean, cap) for r in raw]
