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


# `--class-weights`: the exponent of 1 / pixel share. The square root is the gentler one the plan picks: on
# street scenes it weighs a 0.5% class 8x a 32% one, where plain inverse frequency weighs it 64x.
CLASS_WEIGHT_POWERS = {"inverse_frequency": 1.0, "inverse_sqrt_frequency": 0.5}


def frequency_weights(pixel_frequency: Sequence[float], power: float = 1.0, cap: float = 10.0) -> list[float]:
    """Per-class weights (1 / share) ** power from the manifest's pixel frequencies (index = class id), at most
    `cap` times the most common class's, then normalised to mean 1 over the classes that occur. A class that
    never occurs has no label to weigh: it gets 1 and stays out of the rest (its 1 / 0 would shrink every
    other weight towards 0)."""
    raw = [f**-power if f > 0 else None for f in pixel_frequency]
    occurring = [r for r in raw if r is not None]
    if not occurring:
        return [1.0] * len(raw)
    least = min(occurring)
    capped = [None if r is None else min(r / least, cap) for r in raw]
    mean = sum(c for c in capped if c is not None) / len(occurring)
    return [1.0 if c is None else c / mean for c in capped]


def class_weights(kind: str, pixel_frequency: Sequence[float]) -> tuple[float, ...] | None:
    """The weights `--class-weights KIND` gives, by class id (None for none)."""
    if kind == "none":
        return None
    if kind not in CLASS_WEIGHT_POWERS:
        raise ValueError(f"unknown class weights '{kind}'; use none, {', '.join(CLASS_WEIGHT_POWERS)}")
    return tuple(frequency_weights(pixel_frequency, CLASS_WEIGHT_POWERS[kind]))
