"""`raysegment export`: a model directory as one graph a server runs without raysegment.

The graph takes one uint8 HxWx3 image of any size and returns its class map at that size
(`class_map`, uint8 HxW) and, with `probabilities=True`, the per-class probabilities (HxWxK float32),
doing inside the graph what `infer` does around the model:

- resized models: the image is resized to the card's input size with Pillow's bilinear filter
  (`pil_resize`: its coefficients and 22-bit fixed-point rounding, so the resized pixels are the bytes
  `imaging.resize_image` makes; Pillow chooses which axis to resample first by a rule of its own, this
  graph always goes width first, and where Pillow went height first a pixel may differ by 1), normalised
  (`predictor.normalize`'s `pixel_affine`), predicted, and the class map is brought back to the image
  size with Pillow's nearest-neighbour sampling (`nearest_indices`, its double-precision steps), as
  `imaging.resize_mask` does for infer's mask files;
- native-scale models: the image is padded to the size multiple as the predictor pads
  (`predictor.reflect_padding`) and predicted whole (infer cuts images above its tile size, 1024 by
  default, into tiles; the export does not), then cropped.

Formats: a TensorFlow SavedModel (`serving_default` takes the image tensor, `segment_encoded` an encoded
PNG/JPEG/BMP/GIF string, decoded by TensorFlow: JPEG pixels may differ slightly from Pillow's and EXIF
rotation is not applied), ONNX (tf2onnx, the `export` extra) and TFLite (tf.lite, builtin ops only: the
resampling maths runs in float32 there, see `segment_fn`). The model card is written beside it as `model.json`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from raysegment import storage
from raysegment.errors import ConfigError
from raysegment.models.card import CARD_FILE, MODEL_FILE, ModelCard, model_file

FORMATS = ("saved_model", "onnx", "tflite")
FILE_NAMES = {"saved_model": "saved_model", "onnx": "model.onnx", "tflite": "model.tflite"}
ONNX_OPSET = 17
FIXED_POINT_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images


def pil_resize_weights(src, dst, dtype="float64"):
    """Pillow's bilinear coefficients from `src` to `dst` pixels, [dst, src] int32 in 22-bit fixed point
    (libImaging/Resample.c: triangle filter widened by the downscale factor, rows normalised to 1)."""
    import tensorflow as tf

    src_f, dst_f = tf.cast(src, dtype), tf.cast(dst, dtype)
    scale = src_f / dst_f
    support = tf.maximum(scale, 1.0)
    centers = (tf.range(dst_f, dtype=dtype) + 0.5) * scale
    taps = tf.range(src_f, dtype=dtype)
    w = tf.maximum(1.0 - tf.abs((taps[None, :] - centers[:, None] + 0.5) / support), 0.0)
    w = w / tf.reduce_sum(w, axis=1, keepdims=True)
    return tf.cast(tf.floor(0.5 + w * (1 << FIXED_POINT_BITS)), tf.int32)


def _resample_rows(x, weights):
    """One Pillow pass along the last axis of x ([C, R, S] float32 of 0..255) -> [C, R, D], rounded and
    clipped to 0..255 as Pillow does. The 22-bit coefficients are split into 7+8+8-bit limbs so every
    float32 product and sum is an exact integer; the limbs are recombined in int32."""
    import tensorflow as tf

    total = tf.constant(1 << (FIXED_POINT_BITS - 1), tf.int32)
    for shift in (16, 8, 0):
        limb = tf.math.floordiv(weights, 1 << shift) if shift == 16 else tf.math.floordiv(weights, 1 << shift) % 256
        part = tf.cast(tf.matmul(x, tf.cast(limb, tf.float32), transpose_b=True), tf.int32)
        total = total + part * (1 << shift)
    return tf.cast(tf.clip_by_value(tf.math.floordiv(total, 1 << FIXED_POINT_BITS), 0, 255), tf.float32)


def pil_resize(image, size: tuple[int, int], dtype: str = "float64"):
    """uint8 [H, W, 3] -> uint8-valued float32 [h, w, 3] at `size`: `imaging.resize_image` in graph ops."""
    import tensorflow as tf

    shape = tf.shape(image)
    x = tf.transpose(tf.cast(image, tf.float32), [2, 0, 1])  # C, H, W
    x = _resample_rows(x, pil_resize_weights(shape[1], size[1], dtype))  # C, H, w
    x = _resample_rows(tf.transpose(x, [0, 2, 1]), pil_resize_weights(shape[0], size[0], dtype))  # C, w, h
    return tf.transpose(x, [2, 1, 0])


def nearest_indices(src, dst, dtype="float64"):
    """Source index of each of `dst` pixels for Pillow's NEAREST resize (Geometry.c ImagingScaleAffine:
    start at half a step and add the step in double precision; its rounding at exact ties is kept)."""
    import tensorflow as tf

    step = tf.cast(src, dtype) / tf.cast(dst, dtype)
    steps = tf.concat([tf.reshape(step * 0.5, [1]), tf.fill([dst - 1], step)], axis=0)
    return tf.minimum(tf.cast(tf.math.cumsum(steps), tf.int32), src - 1)


def _pad_indices(length, pad, reflect):
    """Indices that pad an axis of `length` by `pad` at its end: np.pad's reflect, or edge."""
    import tensorflow as tf

    idx = tf.range(length + pad)
    return tf.where(idx < length, idx, tf.where(reflect, 2 * (length - 1) - idx, length - 1))


def segment_fn(model, card: ModelCard, probabilities: bool = False, dtype: str = "float64"):
    """The exported computation: uint8 [H, W, 3] -> {"class_map": uint8 [H, W], "probabilities"?}.

    `dtype`: of the resampling coefficients and positions; float64 is Pillow's own, float32 is for TFLite
    (no float64 builtins), where a coefficient or an exact tie may round the other way."""
    import tensorflow as tf

    from raysegment.inference.predictor import class_probabilities, reflect_padding

    multiple = card.size_multiple

    def segment(image):
        scale, offset = (tf.constant(v, tf.float32) for v in card.pixel_affine)  # inside: graph constants
        shape = tf.shape(image)
        h, w = shape[0], shape[1]
        if card.native_scale:
            ph, pw = (multiple - h % multiple) % multiple, (multiple - w % multiple) % multiple
            reflect = reflect_padding(h, w, ph, pw)
            x = tf.gather(tf.gather(image, _pad_indices(h, ph, reflect), axis=0), _pad_indices(w, pw, reflect), axis=1)
            x = tf.cast(x, tf.float32)
        else:
            x = pil_resize(image, card.input_size, dtype)
        probs = class_probabilities(model(x[None] * scale + offset, training=False), card.output)[0]
        if card.native_scale:
            probs = probs[:h, :w]
        else:
            rows, cols = nearest_indices(card.input_size[0], h, dtype), nearest_indices(card.input_size[1], w, dtype)
            probs = tf.gather(tf.gather(probs, rows, axis=0), cols, axis=1)
        out = {"class_map": tf.cast(tf.argmax(probs, axis=-1, output_type=tf.int32), tf.uint8)}
        if probabilities:
            out["probabilities"] = probs
        return out

    return segment


def export(
    model_uri: str,
    dest: str,
    fmt: str,
    probabilities: bool = False,
    endpoint_url: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write MODEL as `fmt` under the local folder DEST (with model.json); returns what was written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    card = ModelCard.read(model_uri, endpoint_url, verify_model=True)
    target = os.path.join(dest, FILE_NAMES[fmt])
    if os.path.exists(target) and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite or choose another DEST")
    import keras
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, MODEL_FILE)
        storage.download_file(model_file(storage.resolve(model_uri, endpoint_url)), local)
        model = keras.models.load_model(local, compile=False)
    segment = segment_fn(model, card, probabilities, "float32" if fmt == "tflite" else "float64")
    spec = tf.TensorSpec([None, None, 3], tf.uint8, name="image")
    os.makedirs(dest, exist_ok=True)
    if os.path.isdir(target):
        shutil.rmtree(target)
    note = _WRITERS[fmt](model, segment, spec, target)
    card.write(storage.resolve(dest))
    return {
        "format": fmt,
        "path": target,
        "card": os.path.join(dest, CARD_FILE),
        "note": note,
        "model_id": card.model_id,
    }


def _saved_model(model, segment, spec, target: str) -> str:
    import tensorflow as tf

    module = tf.Module()
    module.model = model  # tracked: its variables are saved with the graph
    module.segment = tf.function(segment, input_signature=[spec])

    @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="image_bytes")])
    def segment_encoded(image_bytes):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
        return module.segment(image)

    module.segment_encoded = segment_encoded
    signatures = {"serving_default": module.segment, "segment_encoded": segment_encoded}
    tf.saved_model.save(module, target, signatures=signatures)
    return "signatures serving_default (uint8 image HxWx3) and segment_encoded (encoded image string)"


def _onnx(model, segment, spec, target: str) -> str:
    import tensorflow as tf

    try:
        import tf2onnx
    except ImportError:
        raise ConfigError("--format onnx needs tf2onnx: pip install 'raysegment[export]'") from None
    fn = tf.function(segment, input_signature=[spec])
    tf2onnx.convert.from_function(fn, input_signature=[spec], opset=ONNX_OPSET, output_path=target)
    import onnx

    onnx.checker.check_model(target)  # tf2onnx logs an op it cannot convert and writes the file anyway
    return f"ONNX opset {ONNX_OPSET}, input 'image' uint8 HxWx3 of any size"


def _tflite(model, segment, spec, target: str) -> str:
    import tensorflow as tf

    fn = tf.function(segment, input_signature=[spec])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # any TFLite runtime, no Flex
    with open(target, "wb") as f:
        f.write(converter.convert())
    return "TFLite builtins; resize the input tensor to the image's HxW before allocate_tensors"


_WRITERS = {"saved_model": _saved_model, "onnx": _onnx, "tflite": _tflite}
