"""A configurable U-Net (Ronneberger et al., 2015) in Keras 3."""

from __future__ import annotations

from typing import Literal

import keras
from keras import layers


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
