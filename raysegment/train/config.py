"""The training config the workers get: the spec's knobs resolved against the data set, frozen.

`TrainSpec` is what the user wrote; `TrainConfig` is what the workers run. It is
built in one place (`train_config`) and every field is set there, so no reader
can fall back to a default that disagrees with the spec. It crosses the process
boundary to the Ray Train workers by pickling, hence plain values only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from raysegment.errors import DataError
from raysegment.train.optim import scaled_learning_rate

if TYPE_CHECKING:
    import keras

    from raysegment.config import TrainSpec

DtypePolicy = Literal["float32", "mixed_bfloat16", "mixed_float16"]
DTYPE_POLICIES: dict[str, DtypePolicy] = {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net's architecture: exactly `build_unet`'s arguments."""

    num_classes: int
    depth: int
    base_filters: int
    batch_norm: bool
    dropout: float
    upsampling: Literal["transpose", "resize"]
    head: Literal["softmax", "sigmoid"]

    def build(self) -> keras.Model:
        """A freshly initialised model (workers train it; the driver loads the best weights into it)."""
        from raysegment.models.unet import build_unet

        return build_unet(**asdict(self))


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training worker needs; see `train_config`."""

    model: ModelConfig
    class_names: tuple[str, ...]
    image_size: int
    epochs: int
    workers: int
    batch_size: int  # per worker
    steps_per_epoch: int  # the same on every worker: collectives hang otherwise
    peak_learning_rate: float  # the spec's rate scaled to the global batch
    schedule: Literal["constant", "cosine", "step"]
    warmup_epochs: float
    optimizer: Literal["adam", "sgd"]
    momentum: float
    loss: Literal["ce", "dice", "ce+dice"]
    class_weights: tuple[float, ...] | None
    dtype_policy: DtypePolicy
    patience: int | None
    seed: int
    cpus_per_worker: float
    time_budget_s: float | None  # stop after the last epoch that ends inside it (`loop.budget_spent`)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers


def dtype_policy(mixed_precision: str, gpus_per_worker: float) -> DtypePolicy:
    """Keras dtype policy; `auto` means mixed precision only where GPUs make it pay."""
    if mixed_precision == "auto":
        mixed_precision = "bfloat16" if gpus_per_worker > 0 else "off"
    return DTYPE_POLICIES[mixed_precision]


def check_fits(spec: TrainSpec, manifest: dict[str, Any], data_uri: str) -> None:
    """DataError unless the data set and the spec can train together."""
    if spec.image_size % 2**spec.depth:
        raise DataError(f"--image-size {spec.image_size} must be a multiple of 2**depth = {2**spec.depth}")
    train_count = manifest["counts"].get("train", 0)
    if train_count < spec.batch_size * spec.workers:
        raise DataError(
            f"{data_uri}: {train_count} training images, fewer than one global batch "
            f"({spec.batch_size} x {spec.workers} workers); lower --batch-size or --workers"
        )
    if manifest["counts"].get("val", 0) == 0:
        raise DataError(f"{data_uri}: no validation images; prepare with --val-fraction > 0")


def train_config(spec: TrainSpec, manifest: dict[str, Any], data_uri: str) -> TrainConfig:
    """The workers' config from the spec and the data set's manifest (classes, counts, pixel frequencies)."""
    from raysegment.models.losses import inverse_frequency_weights  # imports TensorFlow

    check_fits(spec, manifest, data_uri)
    global_batch = spec.batch_size * spec.workers
    # Fixed here from the manifest, not counted from the shards: Ray has been seen to
    # double step counts on pre-sharded data (Ray #61838).
    steps = manifest["counts"]["train"] * spec.repeat // global_batch
    return TrainConfig(
        model=ModelConfig(
            num_classes=manifest["num_classes"],
            depth=spec.depth,
            base_filters=spec.base_filters,
            batch_norm=spec.batch_norm,
            dropout=spec.dropout,
            upsampling=spec.upsampling,
            head=spec.head,
        ),
        class_names=tuple(manifest["class_names"]),
        image_size=spec.image_size,
        epochs=spec.epochs,
        workers=spec.workers,
        batch_size=spec.batch_size,
        steps_per_epoch=min(steps, spec.max_steps) if spec.max_steps else steps,
        peak_learning_rate=scaled_learning_rate(spec.learning_rate, global_batch),
        schedule=spec.schedule,
        warmup_epochs=spec.warmup_epochs,
        optimizer=spec.optimizer,
        momentum=spec.momentum,
        loss=spec.loss,
        class_weights=(
            tuple(inverse_frequency_weights(manifest["pixel_frequency"]))
            if spec.class_weights == "inverse_frequency"
            else None
        ),
        dtype_policy=dtype_policy(spec.mixed_precision, spec.gpus_per_worker),
        patience=spec.patience,
        seed=spec.seed,
        cpus_per_worker=spec.cpus_per_worker,
        time_budget_s=spec.time_budget,
    )
