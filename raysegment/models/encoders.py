"""Stronger models: `keras.applications` encoders under a U-Net decoder or a DeepLabV3+ head.

An encoder is a classification backbone without its top. Its skip features are found by running
it once on a probe image: for each stride (2, 4, ... 32) the last layer whose output has exactly
that resolution (the richest feature before the next downsampling), so no per-backbone table of
layer names is kept. Every backbone here takes raw 0..255 RGB: EfficientNetV2, MobileNetV3 and
ConvNeXt rescale inside themselves, and ResNet50 (caffe weights) gets `CaffePreprocess` in front;
the model card says `raw_0_255`, so infer, export and serve feed what the weights expect. A grey
data set is repeated to three channels inside the model; more than three channels is refused with
an encoder (ImageNet filters are RGB).

Weights: `imagenet` (Keras downloads them on first use: needs network access from every training
worker, or a warm ~/.keras cache), `none` (random), or a path to a weights file of the backbone
(`backbone.save_weights(...)`, `.weights.h5`, or Keras' own legacy `.h5` download), which is how an
offline cluster uses ImageNet weights. Training passes the file a worker got from the driver
(`models/pretrained.py`: the driver's cached ImageNet file, shipped) as such a path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import keras
import numpy as np
from keras import layers

ENCODERS: dict[str, Callable[..., keras.Model]] = {
    "resnet50": keras.applications.ResNet50,
    "efficientnetv2b0": keras.applications.EfficientNetV2B0,
    "efficientnetv2s": keras.applications.EfficientNetV2S,
    "mobilenetv3small": keras.applications.MobileNetV3Small,
    "mobilenetv3large": keras.applications.MobileNetV3Large,
    "convnext_tiny": keras.applications.ConvNeXtTiny,
}
STRIDES = (2, 4, 8, 16, 32)
SIZE_MULTIPLE = 32  # every backbone downsamples 32x
_PROBE = 128


@keras.saving.register_keras_serializable(package="raysegment")
class CaffePreprocess(layers.Layer):
    """RGB 0..255 -> BGR minus the ImageNet means: what ResNet50's caffe weights were trained on."""

    def call(self, x):
        mean = keras.ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=x.dtype)
        return keras.ops.flip(x, axis=-1) - mean


def backbone(name: str, weights: str | None) -> keras.Model:
    """The encoder without its top on (None, None, 3) inputs; `weights`: imagenet, None or a file."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder '{name}'; one of {', '.join(ENCODERS)}")
    kwargs: dict[str, Any] = {} if name == "resnet50" else {"include_preprocessing": True}
    if name.startswith("mobilenetv3"):
        kwargs["minimalistic"] = False
    from_file = weights not in (None, "imagenet")
    model = ENCODERS[name](
        include_top=False, weights=None if from_file else weights, input_shape=(None, None, 3), **kwargs
    )
    if from_file:
        model.load_weights(weights)
    return model


def check_weights_file(name: str, path: str) -> None:
    """ValueError (one line) unless the file at `path` loads into the backbone `name`, as every training
    worker loads it: a file that is not HDF5 (a failed download) or of another backbone failed there, after
    start-up, with h5py's or Keras' traceback."""
    try:
        backbone(name, path)
    except Exception as exc:  # h5py, Keras and the file system each raise their own kind
        reason = " ".join(str(exc).split())[:200]
        raise ValueError(
            f"not a Keras weights file for {name} ({type(exc).__name__}: {reason}); give imagenet, none, "
            f"or a file saved from the {name} backbone (`save_weights`, .weights.h5 or Keras' legacy .h5)"
        ) from None
    finally:
        keras.backend.clear_session()  # the probe model's graph and memory are not the run's


def skip_layers(model: keras.Model) -> dict[int, str]:
    """Stride -> the name of the last layer with exactly that resolution (probed on a 128x128 image)."""
    inner = [layer for layer in model.layers if not isinstance(layer, layers.InputLayer)]
    probe = keras.Model(model.input, [layer.output for layer in inner])
    outputs = probe(np.zeros((1, _PROBE, _PROBE, 3), np.float32))
    found: dict[int, str] = {}
    for layer, out in zip(inner, outputs):
        shape = tuple(out.shape)
        if len(shape) == 4 and shape[1] == shape[2] and _PROBE % shape[1] == 0 and _PROBE // shape[1] in STRIDES:
            found[_PROBE // shape[1]] = layer.name
    if 32 not in found:
        raise ValueError(f"{model.name}: no stride-32 feature found")
    return found


def _conv_bn(x: keras.KerasTensor, filters: int, name: str, kernel: int = 3, dilation: int = 1) -> keras.KerasTensor:
    x = layers.Conv2D(filters, kernel, padding="same", dilation_rate=dilation, use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _rgb(inputs: keras.KerasTensor, channels: int, encoder: str) -> keras.KerasTensor:
    if channels == 1:
        x = layers.Concatenate(name="grey_to_rgb")([inputs, inputs, inputs])
    elif channels == 3:
        x = inputs
    else:
        raise ValueError(
            f"an ImageNet encoder takes 1 or 3 channels, the data set has {channels}; train without --encoder"
        )
    return CaffePreprocess(name="caffe_preprocess")(x) if encoder == "resnet50" else x


def build_encoder_model(
    num_classes: int,
    encoder: str,
    encoder_weights: str | None = None,
    architecture: Literal["unet", "deeplabv3plus"] = "unet",
    base_filters: int = 16,
    head: Literal["softmax", "sigmoid"] = "softmax",
    input_channels: int = 3,
    dropout: float = 0.0,
) -> keras.Model:
    """Per-pixel logits at the input's resolution (H, W multiples of 32) from a pretrained-able encoder."""
    if head == "sigmoid" and num_classes != 2:
        raise ValueError(f"a sigmoid head needs exactly 2 classes, got {num_classes}")
    base = backbone(encoder, encoder_weights)
    found = skip_layers(base)
    features = keras.Model(
        base.input, [base.get_layer(found[s]).output for s in sorted(found)], name=f"{encoder}_encoder"
    )
    inputs = keras.Input(shape=(None, None, input_channels), name="image")
    by_stride = dict(zip(sorted(found), features(_rgb(inputs, input_channels, encoder))))
    if architecture == "deeplabv3plus":
        x = _deeplab_head(by_stride, base_filters, dropout)
    else:
        x = _unet_decoder(by_stride, base_filters, dropout)
    logits = layers.Conv2D(1 if head == "sigmoid" else num_classes, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=f"{architecture}_{encoder}")


def _unet_decoder(by_stride: dict[int, keras.KerasTensor], base_filters: int, dropout: float) -> keras.KerasTensor:
    """From stride 32 up: x2 bilinear, concatenate the encoder's feature at that stride (when it has
    one), two 3x3 conv-BN-ReLU; widths base_filters x (16, 8, 4, 2, 1) from stride 16 to full size."""
    x = by_stride[32]
    if dropout:
        x = layers.Dropout(dropout, name="bottom_dropout")(x)
    for stride in (16, 8, 4, 2, 1):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{stride}_up")(x)
        if stride in by_stride:
            x = layers.Concatenate(name=f"dec{stride}_concat")([x, by_stride[stride]])
        filters = base_filters * stride if stride > 1 else base_filters
        x = _conv_bn(x, filters, f"dec{stride}_a")
        x = _conv_bn(x, filters, f"dec{stride}_b")
    return x


def _deeplab_head(by_stride: dict[int, keras.KerasTensor], base_filters: int, dropout: float) -> keras.KerasTensor:
    """DeepLabV3+ (Chen et al., 2018): atrous spatial pyramid pooling on the stride-16 feature, x4 to
    stride 4, fused with the projected stride-4 feature, x4 to full size. The image-pooling branch is
    left out: its resize to a dynamic size is not a standard layer, and windows of a few hundred pixels
    see the whole context through the dilated branches."""
    width = base_filters * 16
    high = by_stride[16]
    branches = [_conv_bn(high, width, "aspp_1x1", kernel=1)]
    branches += [_conv_bn(high, width, f"aspp_d{d}", dilation=d) for d in (6, 12, 18)]
    x = _conv_bn(layers.Concatenate(name="aspp_concat")(branches), width, "aspp_project", kernel=1)
    if dropout:
        x = layers.Dropout(dropout, name="aspp_dropout")(x)
    x = layers.UpSampling2D(4, interpolation="bilinear", name="aspp_up")(x)
    low = _conv_bn(by_stride[4], max(base_filters * 3, 16), "low_project", kernel=1)
    x = layers.Concatenate(name="decoder_concat")([x, low])
    x = _conv_bn(x, width, "decoder_a")
    x = _conv_bn(x, width, "decoder_b")
    return layers.UpSampling2D(4, interpolation="bilinear", name="decoder_up")(x)
