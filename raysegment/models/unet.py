"""A configurable U-Net (Ronneberger et al., 2015) in Keras 3."""

from __future__ import annotations

from typing import Literal

import keras
from keras import layers, ops


def _conv_block(
    x: keras.KerasTensor, filters: int, batch_norm: bool, name: str, residual: bool = False
) -> keras.KerasTensor:
    shortcut = x
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm, name=f"{name}_conv{i}")(x)
        if batch_norm:
            # Momentum 0.9, not Keras' 0.99: with a few hundred steps the 0.99 moving
            # statistics still lean on their initial values and wreck validation.
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        if residual and i == 2:
            # He et al. 2016: the block learns a residual; a 1x1 projection where the width changes.
            if shortcut.shape[-1] != filters:
                shortcut = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_proj")(shortcut)
            x = layers.Add(name=f"{name}_add")([x, shortcut])
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


# Registered: `loader._with_policy` clones a nested model from its config, which names this class (bf16/fp16).
@keras.saving.register_keras_serializable(package="raysegment")
class ResizeUpSampling2D(layers.UpSampling2D):
    """`UpSampling2D` whose bilinear (any smooth) resize traces at unknown heights and widths.

    Keras' own checks `size > 0` in Python on the doubled shape, which inside a tf.function of unknown
    spatial size (the predictor's relaxed retraces, export's HxW graph) is a symbolic tensor: native-scale
    models with resize upsampling failed in infer and export. The resize is the same `tf.image.resize`
    Keras' TensorFlow backend runs, so outputs are unchanged. `as_dynamic` swaps it in at load; files keep
    Keras' own layer (loadable without raysegment).
    """

    def call(self, inputs):
        if self.interpolation == "nearest":  # a repeat: no shape check, traces at any size
            return super().call(inputs)
        import tensorflow as tf

        first = self.data_format == "channels_first"
        x = ops.transpose(inputs, [0, 2, 3, 1]) if first else inputs
        shape = ops.shape(x)  # Python ints where known, tensors where not
        x = tf.image.resize(x, (shape[1] * self.size[0], shape[2] * self.size[1]), method=self.interpolation)
        return ops.transpose(x, [0, 3, 1, 2]) if first else x


def _plain_resize(layer: keras.layers.Layer) -> bool:
    return type(layer) is layers.UpSampling2D and layer.interpolation != "nearest"


def _all_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    found = []
    for layer in getattr(model, "layers", []):
        found += [layer, *_all_layers(layer)]
    return found


def as_dynamic(model: keras.Model) -> keras.Model:
    """The model with each bilinear `UpSampling2D` (nested ones too) as `ResizeUpSampling2D`, other layers
    shared, so it runs at any image size in a tf.function; the model itself when it has none, or when it is
    not functional or sequential (Keras cannot clone it)."""
    if not any(_plain_resize(layer) for layer in _all_layers(model)):
        return model

    def swap(layer: keras.layers.Layer) -> keras.layers.Layer:
        return ResizeUpSampling2D.from_config(layer.get_config()) if _plain_resize(layer) else layer

    try:
        return keras.models.clone_model(model, clone_function=swap, recursive=True)
    except ValueError:  # a subclassed model: Keras clones functional and sequential ones only
        return model


def _upsample(x: keras.KerasTensor, filters: int, mode: str, name: str) -> keras.KerasTensor:
    if mode == "transpose":
        return layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_tconv")(x)
    # Resize-convolution avoids the checkerboard artefacts of strided transpose convs.
    x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_resize")(x)
    return layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv")(x)


def build_unet(
    num_classes: int,
    depth: int = 4,
    base_filters: int = 16,
    batch_norm: bool = True,
    dropout: float = 0.0,
    upsampling: Literal["transpose", "resize"] = "transpose",
    head: Literal["softmax", "sigmoid"] = "softmax",
    input_channels: int = 3,
    residual: bool = False,
) -> keras.Model:
    """U-Net returning per-pixel logits, (N, H, W, K) for softmax or (N, H, W, 1) for a sigmoid head.

    H and W must be multiples of 2**depth. The sigmoid head is for two classes
    (background / foreground); its logit is the foreground's. `residual`: residual encoder blocks
    (the residual-encoder U-Net nnU-Net's newer presets use).
    """
    if head == "sigmoid" and num_classes != 2:
        raise ValueError(f"a sigmoid head needs exactly 2 classes, got {num_classes}")
    inputs = keras.Input(shape=(None, None, input_channels), name="image")
    x = inputs
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, batch_norm, f"down{level}", residual)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _conv_block(x, base_filters * 2**depth, batch_norm, "bottom", residual)
    if dropout:
        x = layers.Dropout(dropout, name="bottom_dropout")(x)
    for level in reversed(range(depth)):
        x = _upsample(x, base_filters * 2**level, upsampling, f"up{level}")
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _conv_block(x, base_filters * 2**level, batch_norm, f"up{level}")
    # Logits in float32 whatever the mixed-precision policy: the loss needs the range.
    logits = layers.Conv2D(1 if head == "sigmoid" else num_classes, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="resunet" if residual else "unet")
