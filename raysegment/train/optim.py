"""How the learning rate is scaled and scheduled, and which optimizer applies it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

    from raysegment.train.config import TrainConfig


def scaled_learning_rate(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: base_lr is for a global batch of 8."""
    return base_lr * global_batch / 8.0


def learning_rate_schedule(cfg: TrainConfig) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up to the peak rate, then cosine decay, step decay or constant."""
    import keras

    peak = cfg.peak_learning_rate
    total = max(1, cfg.epochs * cfg.steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * cfg.steps_per_epoch), total - 1)
    if cfg.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=peak / 10 if warmup else peak,
            decay_steps=total - warmup,
            alpha=0.01,
            warmup_target=peak if warmup else None,
            warmup_steps=warmup,
        )
    if cfg.schedule == "step":
        # x0.1 at 60% and 85% of training.
        bounds = [max(warmup + 1, int(total * 0.6)), max(warmup + 2, int(total * 0.85))]
        return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, [peak, peak * 0.1, peak * 0.01])
    return peak


def make_optimizer(cfg: TrainConfig) -> keras.optimizers.Optimizer:
    """The spec's optimizer on the schedule; float16 adds dynamic loss scaling."""
    import keras

    lr = learning_rate_schedule(cfg)
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
