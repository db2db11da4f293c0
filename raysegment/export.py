"""`raysegment export`: a model directory as one graph a server runs without raysegment.

The graph takes one uint8 HxWx3 image of any size and returns its class map at that size
(`class_map`, uint8 HxW) and, with `probabilities=True`, the per-class probabilities (HxWxK float32),
doing inside the graph what `infer` does around the model:

- resized models: the image is resized to the card's input size with Pillow's bilinear filter
  (`pil_resize`: its coefficients and 22-bit fixed-point rounding, so the resized pixels are the bytes
  `imaging.resize_image` makes; Pillow chooses which axis to resample first by a rule of its own, this
  graph always goes width first, and where Pillow went height first a pixel may differ by 1), normalised
  (`card.normalize`'s `pixel_clip` and `pixel_affine`), predicted, and the probabilities are
  upsampled bilinearly to the image size before the argmax (`upsample`: `stitch.upsample_argmax`'s
  positions and arithmetic, as infer does);
- native-scale models: the image is padded to the size multiple as the predictor pads
  (`predictor.reflect_padding`) and predicted whole (infer cuts images above its tile size, 1024 by
  default, into tiles; the export does not), then cropped.

Formats: a TensorFlow SavedModel (`serving_default` takes the image tensor, `segment_encoded` an encoded
PNG/JPEG/BMP/GIF string, decoded by TensorFlow as `infer` decodes it (`decode_as_infer`): JPEG pixels may
differ slightly from Pillow's, up to 1.6% of a photo's mask pixels measured, and EXIF rotation is not
applied), ONNX (tf2onnx, the `export` extra) and TFLite (tf.lite, builtin ops only: the resampling maths
runs in float32 there, see `segment_fn`). The SavedModel and TFLite graphs go through Keras' ExportArchive
(`_archive`: TF1's session loader, TensorFlow Serving's, runs the SavedModel; TFLite keeps its signature's
output names). The model card is written beside it as `model.json`, with `exports`: per format in DEST, the
TTA passes and outputs its graph holds (several formats of one model share a DEST).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import uuid
from typing import TYPE_CHECKING, Any

from raysegment import logs, storage
from raysegment.data.imaging import PNG_SIGNATURE
from raysegment.errors import ConfigError, DataError, JobError, StorageError, UserError
from raysegment.models.card import (
    CARD_FILE,
    EXPORT_FILES,
    MODEL_FILE,
    SAVED_MODEL_DIR,
    SAVED_MODEL_PB,
    ExportRecord,
    ModelCard,
)
from raysegment.models.loader import load_model, put_tree

if TYPE_CHECKING:
    from raysegment.config import ExportSpec

log = logging.getLogger(__name__)

FORMATS = ("saved_model", "onnx", "tflite")
FILE_NAMES = EXPORT_FILES
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


def bilinear_weights(src, dst, dtype="float64"):
    """`stitch.bilinear_weights` in graph ops (`dst` may be a tensor): the same double-precision
    positions, so the upsampled probabilities are infer's."""
    import tensorflow as tf

    pos = (tf.cast(tf.range(dst), dtype) + 0.5) * (tf.cast(src, dtype) / tf.cast(dst, dtype)) - 0.5
    low = tf.floor(pos)
    first = tf.cast(tf.clip_by_value(low, 0, src - 1), tf.int32)
    second = tf.cast(tf.clip_by_value(low + 1, 0, src - 1), tf.int32)
    return first, second, tf.cast(pos - low, tf.float32)


def upsample(probs, height, width, input_size, dtype="float64"):
    """`stitch.upsample_argmax`'s probabilities in graph ops: columns first, then rows."""
    import tensorflow as tf

    c0, c1, cw = bilinear_weights(input_size[1], width, dtype)
    left, right = tf.gather(probs, c0, axis=1), tf.gather(probs, c1, axis=1)
    cols = left + (right - left) * cw[None, :, None]
    r0, r1, rw = bilinear_weights(input_size[0], height, dtype)
    upper, lower = tf.gather(cols, r0, axis=0), tf.gather(cols, r1, axis=0)
    return upper + (lower - upper) * rw[:, None, None]


def _pad_indices(length, pad, reflect):
    """Indices that pad an axis of `length` by `pad` at its end: np.pad's reflect, or edge."""
    import tensorflow as tf

    idx = tf.range(length + pad)
    return tf.where(idx < length, idx, tf.where(reflect, 2 * (length - 1) - idx, length - 1))


def segment_fn(
    model, card: ModelCard, probabilities: bool = False, dtype: str = "float64", flips: tuple[str, ...] = ()
):
    """The exported computation: uint8 [H, W, 3] -> {"class_map": uint8 [H, W], "probabilities"?}.

    `dtype`: of the resampling coefficients and positions; float64 is Pillow's own, float32 is for TFLite
    (no float64 builtins), where a coefficient or an exact tie may round the other way. `flips`: the flip
    TTA passes averaged in, as `infer` runs them (`ModelCard.tta`)."""
    import tensorflow as tf

    from raysegment.inference.predictor import averaged_probabilities, reflect_padding

    multiple = card.size_multiple
    predict = averaged_probabilities(model, card.output, flips)

    def segment(image):
        scale, offset = (tf.constant(v, tf.float32) for v in card.pixel_affine)  # inside: graph constants
        clip = card.pixel_clip  # zscore_clipped: per-channel bounds before the affine, as `card.normalize`
        shape = tf.shape(image)
        h, w = shape[0], shape[1]
        if card.native_scale:
            ph, pw = (multiple - h % multiple) % multiple, (multiple - w % multiple) % multiple
            reflect = reflect_padding(h, w, ph, pw)
            x = tf.gather(tf.gather(image, _pad_indices(h, ph, reflect), axis=0), _pad_indices(w, pw, reflect), axis=1)
            x = tf.cast(x, tf.float32)
        else:
            x = pil_resize(image, card.input_size, dtype)
        missing = None if not image.dtype.is_floating else ~tf.math.is_finite(x)  # as `card.normalize`
        if clip is not None:
            x = tf.clip_by_value(x, tf.constant(clip[0], tf.float32), tf.constant(clip[1], tf.float32))
        x = x * scale + offset
        if missing is not None:
            x = tf.where(missing, tf.zeros_like(x), x)
        probs = predict(x[None])[0]
        if card.native_scale:
            probs = probs[:h, :w]
        else:
            probs = upsample(probs, h, w, card.input_size, dtype)
        out = {"class_map": tf.cast(tf.argmax(probs, axis=-1, output_type=tf.int32), tf.uint8)}
        if probabilities:
            out["probabilities"] = probs
        return out

    return segment


def export(spec: ExportSpec) -> dict[str, Any]:
    """Write MODEL as `spec.format` under DEST (local or s3://), with model.json; returns what was written."""
    model_dir = storage.resolve(spec.model, spec.endpoint_url, spec.storage_retry_s)
    card = ModelCard.read(spec.model, spec.endpoint_url, verify_model=True, retry_s=spec.storage_retry_s)
    if card.input.channels != 3 or card.input.bands:
        # The graph decodes PNG/JPEG to 8-bit RGB; a model of chosen or many bands needs TIFF decoding it lacks.
        raise ConfigError(
            f"{spec.model}: the model takes {card.input.channels} bands ({card.input.bands or 'all'}); "
            "export handles RGB models only: run it with `raysegment infer` or `serve`"
        )
    if card.input.pixel_type != "uint8":
        # Its normalisation was fitted to 16-bit or float pixels; the graph takes 8-bit images and would
        # apply those statistics to them, giving wrong masks without an error.
        raise ConfigError(
            f"{spec.model}: the model takes {card.input.pixel_type} pixels (16-bit or float images at their own "
            "values); export's graph takes 8-bit images only: run it with `raysegment infer` or `serve`"
        )
    dest = storage.resolve(spec.dest, spec.endpoint_url, spec.storage_retry_s)
    _refuse_model_folder(spec, dest, model_dir)
    target = dest.child(FILE_NAMES[spec.format])
    if storage.exists(target) and not spec.overwrite:
        raise ConfigError(f"{target.uri} exists; pass --overwrite or choose another DEST")
    if spec.format != "saved_model":  # one file: never a link (a dangling one would be written through)
        storage.check_replaceable(target)
    stale = _other_models_exports(dest, spec.format, card)
    if stale and not spec.overwrite:
        raise ConfigError(
            f"{spec.dest}: holds {', '.join(FILE_NAMES[f] for f in stale)} of another model, which the new "
            "model.json would describe wrongly; pass --overwrite (removes them) or choose another DEST"
        )
    import tensorflow as tf

    model = load_model(model_dir, card)
    # The flip TTA infer runs for this model (the card's advice, or --tta-flip/--no-tta-flip) is in the graph,
    # and the model.json beside it says whether: the exported masks are infer's.
    tta = card.tta(spec.tta_flip)
    dtype = "float32" if spec.format == "tflite" else "float64"
    segment = segment_fn(model, card, spec.probabilities, dtype, tta.flips)
    image = tf.TensorSpec([None, None, 3], tf.uint8, name="image")
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, FILE_NAMES[spec.format])
        note = _WRITERS[spec.format](model, segment, image, local, spec.model)
        logs.began()  # converted: from here DEST changes, and a user error keeps the log in DEST/logs
        _replace(local, target)
    for fmt in stale:
        storage.remove_tree(dest.child(FILE_NAMES[fmt]))
    card = _exported_card(card, dest, spec.format, ExportRecord(**tta.record(), probabilities=spec.probabilities))
    card.write(dest)
    return {
        "format": spec.format,
        "path": target.uri,
        "card": dest.child(CARD_FILE).uri,
        "note": note,
        "model_id": card.model_id,
    }


def _refuse_model_folder(spec: ExportSpec, dest: storage.Location, model_dir: storage.Location) -> None:
    """DEST may not be a trained model's folder, MODEL's own (by any spelling, a link included) or another's
    (a copy of MODEL too): export would replace the model.json the model is loaded by, and add files to it."""
    if dest.remote or model_dir.remote:
        same = dest.uri.rstrip("/") == model_dir.uri.rstrip("/")
    else:  # a link, `..` or a bind mount to the model's folder is the same folder
        same = os.path.isdir(dest.path) and os.path.samefile(dest.path, model_dir.path)
    if same:
        raise ConfigError(f"{spec.dest}: DEST is MODEL's own folder (its files would be replaced); choose another DEST")
    inside = _saved_model_folder(dest)
    if inside:  # an export's saved_model/ is replaced whole by the next saved_model export: this one would go too
        raise ConfigError(
            f"{spec.dest}: DEST is inside the SavedModel folder {inside} (an export's, or an imported model's); "
            "choose another DEST"
        )
    held = _trained_model_file(spec, dest)
    if held:
        raise ConfigError(
            f"{spec.dest}: DEST holds a trained model ({held}), whose {CARD_FILE} export would replace "
            "(even with --overwrite); choose another DEST"
        )


def _saved_model_folder(dest: storage.Location) -> str | None:
    """The SavedModel folder (one holding saved_model.pb) DEST is or lies below, else None."""
    if dest.remote:
        bucket, *parts = dest.path.rstrip("/").split("/")
        paths = ["/".join([bucket, *parts[:n]]) for n in range(len(parts), 0, -1)]
        folders = [(f"s3://{path}", path) for path in paths]
    else:  # a link into one is inside it too
        path, paths = os.path.realpath(dest.path), []
        while path not in paths:
            paths.append(path)
            path = os.path.dirname(path)
        folders = [(path, path) for path in paths]
    for uri, path in folders:  # DEST's client for each: a new S3 client per parent took a second each
        probe = storage.Location(uri, dest.fs, path, dest.endpoint_url, dest.retry_s).child(SAVED_MODEL_PB)
        try:
            if storage.exists(probe):
                return uri
        except StorageError as exc:
            # S3 answers 403 above the prefix a restricted role may read (`team/exports/*`): a parent
            # the user never named ends the walk, as one holding no SavedModel; DEST's own denial stands.
            if path == paths[0] or not isinstance(exc.__cause__, PermissionError):
                raise
            return None
    return None


def _trained_model_file(spec: ExportSpec, dest: storage.Location) -> str | None:
    """The trained model DEST holds: a model.keras (any), or an imported SavedModel its card was written for
    (an export's saved_model/ is a graph of another hash); None for an export folder or a new one."""
    if storage.exists(dest.child(MODEL_FILE)):
        return MODEL_FILE
    if not storage.exists(dest.child(SAVED_MODEL_DIR)):
        return None
    try:
        held = ModelCard.read(spec.dest, spec.endpoint_url, verify_model=True, retry_s=spec.storage_retry_s)
    except (DataError, StorageError):
        return None  # no card, another model's card, or not its SavedModel: an export's folder
    return held.model_name


def _exported_card(card: ModelCard, dest: storage.Location, fmt: str, record: ExportRecord) -> ModelCard:
    """MODEL's card with `exports`: per format in DEST, what its graph holds (the flip TTA passes, the
    probabilities output). The records of the other formats DEST holds of this model are kept."""
    exports = {fmt: record}
    held = dest.child(CARD_FILE)
    if storage.exists(held):
        try:
            old = ModelCard.parse(storage.read_json(held), held.uri)
            kept = (old.exports or {}) if old.model_sha256 == card.model_sha256 else {}
        except (DataError, StorageError):
            kept = {}  # unreadable: it describes nothing we can trust
        for other, rec in kept.items():
            if other in FORMATS and other != fmt and storage.exists(dest.child(FILE_NAMES[other])):
                exports[other] = rec
    fields = {k: v for k, v in card.as_dict().items() if k != "export_tta"}  # one record for a DEST, replaced
    return ModelCard.model_validate({**fields, "exports": dict(sorted(exports.items()))})


def _other_models_exports(dest: storage.Location, fmt: str, card: ModelCard) -> list[str]:
    """The other formats DEST holds when its model.json is another model's: one card describes a DEST."""
    held = dest.child(CARD_FILE)
    if not storage.exists(held):
        return []
    try:
        same = storage.read_json(held).get("model_sha256") == card.model_sha256
    except (StorageError, AttributeError):
        same = False  # unreadable: it describes nothing we can trust
    if same:
        return []
    return [f for f in FORMATS if f != fmt and storage.exists(dest.child(FILE_NAMES[f]))]


def _replace(local: str, target: storage.Location) -> None:
    """Put a new export where the old one was, so that no reader finds one part-written.

    A file is one atomic rename (local) or PUT (S3). A SavedModel folder is written beside the old
    one and swapped in by two renames locally; on S3, where a folder is many objects, its files are
    overwritten and those the new one lacks removed after, so a reader during the copy may see a mix.
    """
    if os.path.isfile(local):
        storage.upload_file(local, target)
        return
    if target.remote:
        before = set(storage.list_files(target)) if storage.exists(target) else set()
        written = {loc.path for loc in put_tree(local, target)}
        for path in sorted(before - written):
            storage.call(target, lambda p=path: target.fs.rm(p))
        return
    staged = storage.resolve(os.path.join(os.path.dirname(target.path), f".tmp-{uuid.uuid4().hex}"))
    aside = f"{staged.path}-old"
    try:
        put_tree(local, staged)
        with storage.storage_errors(target.uri):
            had = os.path.lexists(target.path)
            if had:
                os.rename(target.path, aside)
            os.rename(staged.path, target.path)
            if os.path.isdir(aside) and not os.path.islink(aside):
                shutil.rmtree(aside)
            elif had:
                os.remove(aside)  # a file or a link: never followed
    finally:
        storage.remove_tree(staged)


def decode_as_infer(image_bytes):
    """An encoded image string -> uint8 [H, W, 3], as `imaging.decode_image` decodes it (EXIF aside).

    TensorFlow brings a 16-bit PNG to 8 bits by dropping each sample's low byte; `infer` reads it at 16 bits
    and stretches it by the image's own maximum (a 12-bit camera's 0..4095 fills 0..255), its alpha left
    out, so 16-bit PNGs are decoded at 16 bits and stretched the same way here."""
    import tensorflow as tf

    header = tf.strings.substr(image_bytes, 0, 26)
    deep = tf.logical_and(
        tf.equal(tf.strings.substr(header, 0, 8), PNG_SIGNATURE),
        tf.equal(tf.strings.substr(header, 24, 1), b"\x10"),  # IHDR bit depth 16 (any colour type)
    )
    colour_type = tf.strings.substr(header, 25, 1)
    grey = tf.logical_or(tf.equal(colour_type, b"\x00"), tf.equal(colour_type, b"\x04"))  # grey, grey + alpha

    def stretched():
        pixels = tf.cast(tf.io.decode_png(image_bytes, channels=0, dtype=tf.uint16), tf.float64)
        kept = pixels[..., : tf.where(grey, 1, 3)]  # alpha left out, as `select_channels` leaves it
        top = tf.reduce_max(kept)
        scaled = tf.cast(kept * (255.0 / tf.where(top > 0, top, tf.constant(1.0, tf.float64))), tf.uint8)
        return tf.cond(grey, lambda: tf.tile(scaled, [1, 1, 3]), lambda: scaled)  # truncated, as numpy's astype

    def plain():
        return tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)

    return tf.cond(deep, stretched, plain)


def _archive(model, segment, spec, encoded: bool = False):
    """The graph as a Keras ExportArchive: `serving_default` on the image tensor, and with `encoded`
    `segment_encoded` on an encoded image string. The archive saves the model's variables under the names the
    graph reads them by, so TF1's session loader (TensorFlow Serving, `saved_model_cli run`) restores them as
    `tf.saved_model.load` does; a `tf.Module` holding the Keras model saved them under other names (it loaded
    in TF2 only: "Could not find variable ..."), and TFLite's converter given the model as trackable read NaN."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    serve = archive.add_endpoint("serving_default", segment, input_signature=[spec])
    if encoded:

        def segment_encoded(image_bytes):
            return serve(decode_as_infer(image_bytes))

        archive.add_endpoint("segment_encoded", segment_encoded, [tf.TensorSpec([], tf.string, name="image_bytes")])
    return archive


def _saved_model(model, segment, spec, target: str, source: str) -> str:
    _archive(model, segment, spec, encoded=True).write_out(target, verbose=False)
    return "signatures serving_default (uint8 image HxWx3) and segment_encoded (encoded image string)"


def _onnx(model, segment, spec, target: str, source: str) -> str:
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


def _tflite(model, segment, spec, target: str, source: str) -> str:
    import tensorflow as tf

    # From the SavedModel's signature, so that the file has one naming its outputs `class_map` and
    # `probabilities` (from a concrete function it had none, and outputs `Identity`, `Identity_1`).
    with tempfile.TemporaryDirectory() as d:
        _archive(model, segment, spec).write_out(d, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(d, signature_keys=["serving_default"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # any TFLite runtime, no Flex
        try:
            data = converter.convert()
        except Exception as exc:  # noqa: BLE001 - the converter's errors are pages of MLIR: one line instead
            log.info("TFLite's converter failed: %s", exc)  # the whole text, for the log file
            raise _converter_error(source, exc) from None
    with open(target, "wb") as f:
        f.write(data)
    return "TFLite builtins, signature serving_default (its runner takes an image of any size)"


def _converter_error(source: str, exc: Exception) -> UserError:
    """The user's error (exit 2) when TFLite's builtins lack an op the model needs (e.g. a convolution over
    a tensor of unknown channels): another format works. Any other failure (a crash, out of memory, a
    converter bug) is not the model's or the user's: the job failed (exit 3), with its first line."""
    missing = _missing_ops(str(exc))
    if missing:
        return ConfigError(
            f"{source}: TFLite's builtin ops cannot run this model ({missing}); "
            "export it with --format saved_model or --format onnx"
        )
    text = str(exc).strip()
    first = text.splitlines()[0][:160] if text else type(exc).__name__
    return JobError(f"{source}: TFLite's converter failed: {first} (the whole error is in the log file)")


def _missing_ops(text: str) -> str | None:
    """What TFLite's builtins lack, from its converter's error text; None when it names no missing op."""
    for label, what in (
        ("TF Select ops:", "it needs the TensorFlow (Flex) ops"),
        ("Custom ops:", "it needs the custom ops"),
    ):
        match = re.search(re.escape(label) + r"\s*([^\n]+)", text)
        if match:
            return f"{what} {match.group(1).strip()[:120]}"
    match = re.search(r"failed to legalize operation '([^']+)'", text)
    return f"it has no builtin for {match.group(1)}" if match else None


# Each writes (Keras model, `segment_fn`, input spec, local target, MODEL as given for its errors) -> a note.
_WRITERS = {"saved_model": _saved_model, "onnx": _onnx, "tflite": _tflite}
