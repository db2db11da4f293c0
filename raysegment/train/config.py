"""The training config the workers get: the spec's knobs resolved against the data set, frozen.

`TrainSpec` is what the user wrote; `TrainConfig` is what the workers run. It is
built in one place (`train_config`) and every field is set there, so no reader
can fall back to a default that disagrees with the spec. It crosses the process
boundary to the Ray Train workers by pickling, hence plain values only (and the
ObjectRef of a shipped weights file).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Literal

from raysegment.data.layouts import NO_TRAIN_FIX, NO_VAL_FIX
from raysegment.errors import ConfigError, DataError
from raysegment.train.optim import scaled_learning_rate

if TYPE_CHECKING:
    import keras

    from raysegment.config import TrainSpec
    from raysegment.data.fingerprint import Fingerprint
    from raysegment.data.manifest import Manifest
    from raysegment.models.card import InputSpec
    from raysegment.models.pretrained import ShippedWeights

DtypePolicy = Literal["float32", "mixed_bfloat16", "mixed_float16"]
DTYPE_POLICIES: dict[str, DtypePolicy] = {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


@dataclass(frozen=True)
class ModelConfig:
    """The network: `build_unet`'s arguments, or an encoder's (`models/encoders.py`)."""

    num_classes: int
    depth: int
    base_filters: int
    batch_norm: bool
    dropout: float
    upsampling: Literal["transpose", "resize"]
    head: Literal["softmax", "sigmoid"]
    input_channels: int  # the data set's (manifest `channels`: 3, or a multi-band image's bands)
    architecture: Literal["unet", "resunet", "deeplabv3plus"] = "unet"
    encoder: str | None = None
    encoder_weights: str | None = None  # None: random; "imagenet"; or a weights file
    # The driver's file of those weights (its Keras cache's ImageNet file, or the given file), sent through
    # Ray's object store (`ship_weights`): loaded from a local copy instead of downloaded or read from a
    # path the worker's node may not have.
    shipped_weights: ShippedWeights | None = None

    def ship_weights(self) -> ModelConfig:
        """This config with the encoder's weights file (the driver's cached ImageNet file, or a given file that
        is here) put into Ray's object store once, for workers whose nodes have no cache and no network
        (`models/pretrained.py`); unchanged without such a file (Keras downloads on each worker)."""
        from raysegment.models.pretrained import ship, weights_file

        path = weights_file(self.encoder, self.encoder_weights) if self.encoder else None
        return replace(self, shipped_weights=ship(path)) if path else self

    def check_weights(self) -> None:
        """ConfigError unless a given encoder weights file loads into the encoder: checked on the driver,
        before Ray Train starts and before OUT changes (`train`), as every worker would load it."""
        if not self.encoder or self.encoder_weights in (None, "imagenet"):
            return
        from raysegment.models.encoders import check_weights_file

        try:
            check_weights_file(self.encoder, self.encoder_weights)
        except ValueError as exc:
            raise ConfigError(f"--encoder-weights {self.encoder_weights}: {exc}") from None

    def build(self) -> keras.Model:
        """A freshly initialised model (workers train it; the driver loads the best weights into it)."""
        if self.encoder:
            from raysegment.models.encoders import build_encoder_model
            from raysegment.models.pretrained import local_copy

            return build_encoder_model(
                self.num_classes,
                self.encoder,
                local_copy(self.shipped_weights) if self.shipped_weights else self.encoder_weights,
                architecture="deeplabv3plus" if self.architecture == "deeplabv3plus" else "unet",
                base_filters=self.base_filters,
                head=self.head,
                input_channels=self.input_channels,
                dropout=self.dropout,
            )
        from raysegment.models.unet import build_unet

        args = asdict(self)
        for name in ("architecture", "encoder", "encoder_weights", "shipped_weights"):
            args.pop(name)
        return build_unet(**args, residual=self.architecture == "resunet")


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
    # With a budget, the first epoch's measured time sets the epochs that fit (`loop.fit_to_budget`): any
    # number when the plan chose `epochs` (its estimate), at most `epochs` when they were given. Training
    # also stops after the last epoch that ends inside it (`loop.budget_spent`).
    time_budget_s: float | None
    epochs_from_budget: bool
    # The model card's `input` (size, bands, normalisation with the fingerprint's statistics): the training
    # pipeline normalises with it and the card is written with it, so inference applies what training did.
    model_input: InputSpec

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers


def dtype_policy(mixed_precision: str, gpus_per_worker: float) -> DtypePolicy:
    """Keras dtype policy; `auto` means mixed precision only where GPUs make it pay."""
    if mixed_precision == "auto":
        mixed_precision = "bfloat16" if gpus_per_worker > 0 else "off"
    return DTYPE_POLICIES[mixed_precision]


def check_labelled(manifest: Manifest, data_uri: str) -> None:
    """DataError for a data set whose masks label no pixel (every one 255, ignore): nothing to learn."""
    shares = manifest.pixel_frequency
    if shares and not any(share > 0 for share in shares):
        ignored = manifest.ignored_pixels or 0
        raise DataError(
            f"{data_uri}: no mask labels a pixel ({ignored} pixels are 255, ignore): nothing to train on; "
            "prepare again with --mask-values mapping the masks' values to class ids"
        )


def check_fits(spec: TrainSpec, manifest: Manifest, data_uri: str) -> None:
    """DataError unless the data set and the spec can train together."""
    if spec.image_size % 2**spec.model_depth:
        what = "an encoder's 32x downsampling" if spec.encoder else "2**depth"
        raise DataError(f"--image-size {spec.image_size} must be a multiple of {what} = {2**spec.model_depth}")
    check_data(manifest, data_uri, spec.batch_size, spec.workers)


def check_data(manifest: Manifest, data_uri: str, batch_size: int = 1, workers: int = 1) -> None:
    """DataError unless the data set can train: labelled pixels, one global batch of training images and
    validation images (`plan.write_plan` checks it with a batch of 1)."""
    check_labelled(manifest, data_uri)
    check_train(manifest, data_uri, batch_size, workers)
    check_val(manifest, data_uri)


def check_train(manifest: Manifest, data_uri: str, batch_size: int = 1, workers: int = 1) -> None:
    """DataError unless the train split holds one global batch (`plan` checks it too, with a batch of 1)."""
    train_count = manifest.counts.train
    if not train_count:
        # No batch size helps: the pairs must go to train (the layout's own splits have their own way).
        raise DataError(
            f"{data_uri}: no training images ({manifest.counts.val} in val, none in train); "
            f"{manifest.no_train_fix or NO_TRAIN_FIX}"
        )
    if train_count < batch_size * workers:
        raise DataError(
            f"{data_uri}: {train_count} training images, fewer than one global batch "
            f"({batch_size} x {workers} workers); lower --batch-size or --workers"
        )


def check_val(manifest: Manifest, data_uri: str) -> None:
    """DataError without val images: training picks its best checkpoint by them (`plan` checks it too)."""
    if manifest.counts.val == 0:
        # A layout that gave its own splits (VOC's val.txt, a list's split column) refuses --val-keys: prepare
        # recorded the fix that works for it (data sets prepared before that get the flags' advice).
        raise DataError(f"{data_uri}: no validation images; {manifest.no_val_fix or NO_VAL_FIX}")


def train_config(
    spec: TrainSpec,
    manifest: Manifest,
    data_uri: str,
    epochs_from_budget: bool = False,
    fingerprint: Fingerprint | None = None,
) -> TrainConfig:
    """The workers' config from the spec and the data set's manifest (classes, counts, pixel frequencies).
    `epochs_from_budget`: the plan chose the epochs, so the budget may fit more or fewer; `fingerprint`: the
    data set's (`plan.read_fingerprint`), for a z-score normalisation."""
    from raysegment.models.losses import class_weights  # imports TensorFlow

    check_fits(spec, manifest, data_uri)
    global_batch = spec.batch_size * spec.workers
    # Fixed here from the manifest, not counted from the shards: Ray has been seen to
    # double step counts on pre-sharded data (Ray #61838).
    steps = manifest.counts.train * spec.repeat // global_batch
    weights = spec.encoder_weights
    if spec.encoder and weights not in ("imagenet", "none") and not os.path.isfile(weights):
        # The driver ships a given file to the workers (`ModelConfig.ship_weights`); one it does not have
        # failed on every worker after start-up, with h5py's traceback.
        raise ConfigError(
            f"--encoder-weights {weights}: no such file on this machine; give imagenet, none, "
            "or a backbone weights file here (it is sent to the workers)"
        )
    return TrainConfig(
        model=ModelConfig(
            num_classes=manifest.num_classes,
            depth=spec.model_depth,
            base_filters=spec.base_filters,
            batch_norm=spec.batch_norm,
            dropout=spec.dropout,
            upsampling=spec.upsampling,
            head=spec.head,
            input_channels=manifest.channels or 3,
            architecture=spec.architecture,
            encoder=spec.encoder,
            encoder_weights=None if spec.encoder_weights == "none" else spec.encoder_weights,
        ),
        class_names=manifest.class_names,
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
        class_weights=class_weights(spec.class_weights, manifest.pixel_frequency or ()),
        dtype_policy=dtype_policy(spec.mixed_precision, spec.gpus_per_worker),
        patience=spec.patience,
        seed=spec.seed,
        cpus_per_worker=spec.cpus_per_worker,
        time_budget_s=spec.time_budget,
        epochs_from_budget=bool(spec.time_budget) and epochs_from_budget,
        model_input=model_input(spec, manifest, fingerprint),
    )


def model_input(spec: TrainSpec, manifest: Manifest, fingerprint: Fingerprint | None) -> InputSpec:
    """The model card's `input` for this training: size, bands, resize or native scale, and the normalisation
    with the fingerprint's statistics (`TrainConfig.model_input`)."""
    from raysegment.models.card import InputSpec
    from raysegment.plan import pixel_stats

    # An encoder rescales inside itself (models/encoders.py): it is fed the decoded pixels as they are.
    normalization = "raw_0_255" if spec.encoder else spec.normalization
    try:
        stats = pixel_stats(fingerprint, normalization)
    except ValueError as exc:
        raise DataError(f"{spec.data}: {exc}; use --normalization scale_0_1 or prepare the data set again") from None
    pixels, eight_bit_seen = pixel_type(fingerprint, normalization)
    return InputSpec(
        size=(spec.image_size, spec.image_size),
        channels=manifest.channels or 3,  # RGB for manifests before #19
        bands=None if manifest.bands is None else list(manifest.bands),
        pixel_type=pixels,
        eight_bit_seen=eight_bit_seen,
        normalization=normalization,
        stats=stats,
        # "none": trained on windows at the original scale, so inference runs at full
        # resolution (padded to a multiple of 2**depth) instead of resizing to `size`.
        resize="none" if spec.crop == "native" else "bilinear",
    )


def pixel_type(fingerprint: Fingerprint | None, normalization: str) -> tuple[Literal["uint8", "float32"], bool]:
    """The card's `input.pixel_type` and `input.eight_bit_seen`: float32 pixels for a 16-bit or float data set
    under a z-score computed on them (uint8 otherwise, as before #19), and whether such a data set held 8-bit
    images too (the predictor then takes 8-bit inputs)."""
    if fingerprint is None or not fingerprint.high_depth or normalization not in ("zscore", "zscore_clipped"):
        return "uint8", False
    return "float32", bool(fingerprint.mixed_depth)


def rare_classes(manifest: Manifest) -> tuple[int, ...]:
    """Classes under the plan's rare share of labelled pixels (what `oversample` centres windows on)."""
    from raysegment.plan import RARE_CLASS, scarce_classes

    return tuple(scarce_classes(list(manifest.pixel_frequency or ()), RARE_CLASS))
