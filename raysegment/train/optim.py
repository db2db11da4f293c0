"""How the learning rate is scaled and scheduled, and which optimizer applies it.

The cosine and step schedules keep their length in a variable the compiled train step reads, so
`refit` can change the number of epochs mid-run (the time budget's fitted epochs, `loop.fit_to_budget`)
without retracing, and a resumed run re-applies the fitted length from its checkpoint's state.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

    from raysegment.train.config import TrainConfig


def scaled_learning_rate(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: base_lr is for a global batch of 8."""
    return base_lr * global_batch / 8.0


def _steps(cfg: TrainConfig, epochs: int) -> tuple[int, int]:
    """(total, warm-up) optimizer steps for `epochs` epochs."""
    total = max(1, epochs * cfg.steps_per_epoch)
    return total, min(int(cfg.warmup_epochs * cfg.steps_per_epoch), total - 1)


def learning_rate_schedule(cfg: TrainConfig) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up to the peak rate, then cosine decay, step decay or constant, over `cfg.epochs`
    (`refit` changes the length later)."""
    peak = cfg.peak_learning_rate
    total, warmup = _steps(cfg, cfg.epochs)
    cosine, step = _schedule_classes()
    if cfg.schedule == "cosine":
        return cosine(
            initial_learning_rate=peak / 10 if warmup else peak,
            decay_steps=total - warmup,
            alpha=0.01,
            warmup_target=peak if warmup else None,
            warmup_steps=warmup,
        )
    if cfg.schedule == "step":
        return step(peak, total, warmup)
    return peak


@functools.cache
def _schedule_classes() -> tuple[type, type]:
    """The two refittable schedules, defined on first use (they import Keras and TensorFlow)."""
    import keras
    import tensorflow as tf

    class FittedCosineDecay(keras.optimizers.schedules.CosineDecay):
        """Keras' CosineDecay (which reads `decay_steps` on every call) with the steps in a variable."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.decay_steps = tf.Variable(float(kwargs["decay_steps"]), trainable=False, name="decay_steps")

        def refit(self, total_steps: int) -> None:
            self.decay_steps.assign(float(max(1, total_steps - self.warmup_steps)))

    class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
        """The peak rate, x0.1 after 60% and x0.01 after 85% of the total steps (a variable)."""

        def __init__(self, peak: float, total: int, warmup: int) -> None:
            self.peak, self.warmup = peak, warmup
            self.total = tf.Variable(float(total), trainable=False, name="total_steps")

        def __call__(self, step):
            step = tf.cast(step, tf.float32)
            first = tf.maximum(float(self.warmup + 1), tf.floor(self.total * 0.6))
            second = tf.maximum(float(self.warmup + 2), tf.floor(self.total * 0.85))
            return self.peak * tf.where(step > second, 0.01, tf.where(step > first, 0.1, 1.0))

        def refit(self, total_steps: int) -> None:
            self.total.assign(float(max(1, total_steps)))

        def get_config(self) -> dict[str, Any]:
            return {"peak": self.peak, "total": float(self.total.numpy()), "warmup": self.warmup}

    return FittedCosineDecay, StepDecay


def refit(schedule: Any, cfg: TrainConfig, epochs: int) -> None:
    """Stretch or shrink the schedule to end after `epochs` epochs (a constant rate has nothing to fit)."""
    if hasattr(schedule, "refit"):
        schedule.refit(_steps(cfg, epochs)[0])


def make_optimizer(cfg: TrainConfig, schedule: Any = None) -> keras.optimizers.Optimizer:
    """The spec's optimizer on the schedule (`learning_rate_schedule(cfg)` unless given); float16 adds
    dynamic loss scaling."""
    import keras

    lr = learning_rate_schedule(cfg) if schedule is None else schedule
    if cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(lr, momentum=cfg.momentum)
    else:
        opt = keras.optimizers.Adam(lr)
    if cfg.dtype_policy == "mixed_float16":
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The rate the optimizer applies at its current step (a schedule is evaluated)."""
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)
