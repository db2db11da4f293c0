"""`raysegment model import`: a Keras 3 segmentation model from elsewhere, made a raysegment model directory.

The model is loaded as the predictor will load it (`keras.models.load_model`, safe mode), checked on
one blank image at the card's input size (one input of HxWx3, output HxWxK with K the number of
classes, or one foreground channel for two classes), saved as model.keras and described by a card
(`models/card.py`) with `imported` naming the source, so `infer`, `evaluate`, `show`, `nightly` and
`export` use it as they use a trained model. Models from keras_hub load where keras_hub is installed
(Keras imports it by name), so the cluster needs it too.

A TensorFlow SavedModel folder is refused: Keras 3 loads one only as a `TFSMLayer`, which keeps the
folder's path rather than its graph, so model.keras would not be self-contained.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

from raysegment import __version__, storage
from raysegment.data import imaging
from raysegment.errors import ConfigError, DataError
from raysegment.models.card import CARD_FILE, MODEL_FILE, ModelCard
from raysegment.train.checkpoint import file_sha256

OUTPUTS = ("auto", "logits", "probabilities")


def parse_input_size(text: str) -> tuple[int, int] | None:
    """'H,W' -> (H, W); 'native' -> None (predict at the image's own resolution)."""
    if text.strip().lower() == "native":
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--input-size {text!r}: give H,W (e.g. 512,512) or native") from None
    if h < 1 or w < 1:
        raise ConfigError(f"--input-size {text!r}: sizes must be positive")
    return h, w


def parse_palette(text: str | None, num_classes: int) -> list[list[int]]:
    """'R,G,B;R,G,B;...' (one colour per class) or None for the default palette."""
    if not text:
        return imaging.default_palette(num_classes)
    try:
        colours = [[int(v) for v in part.split(",")] for part in text.split(";")]
    except ValueError:
        raise ConfigError(f"--palette {text!r}: give R,G,B;R,G,B;... with one colour per class") from None
    if len(colours) != num_classes or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colours):
        raise ConfigError(f"--palette: {num_classes} colours R,G,B (0-255) separated by ';', one per class")
    return colours


def import_model(
    model_file: str,
    dest: str,
    classes: list[str],
    input_size: tuple[int, int] | None,
    normalize: str = "scale_0_1",
    output: str = "auto",
    palette: list[list[int]] | None = None,
    size_multiple: int = 32,
    endpoint_url: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Check MODEL_FILE against the card these options describe and write the model directory DEST."""
    if os.path.isdir(model_file):
        raise ConfigError(
            f"{model_file}: a SavedModel folder cannot be imported (Keras 3 keeps only its path); load the "
            "original Keras model and save it with model.save('model.keras'), then import that file"
        )
    if not os.path.isfile(model_file):
        raise ConfigError(f"{model_file}: no such file; give a .keras (or legacy .h5) model file")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError("--classes: at least two distinct class names, comma-separated")
    if output not in OUTPUTS:
        raise ConfigError(f"--output {output}: use {', '.join(OUTPUTS)}")
    depth = int(math.log2(size_multiple)) if size_multiple > 0 else -1
    if input_size is None and (depth < 0 or 2**depth != size_multiple or depth > 10):
        raise ConfigError(f"--size-multiple {size_multiple}: a power of two from 1 to 1024")
    out = storage.resolve(dest, endpoint_url)
    if storage.exists(out.child(CARD_FILE)) and not overwrite:
        raise ConfigError(f"{out.uri} already holds a model; pass --overwrite or choose another DEST")

    import keras

    try:
        model = keras.models.load_model(model_file, compile=False)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's file
        raise DataError(
            f"{model_file}: cannot be loaded by keras.models.load_model ({type(exc).__name__}: {exc}); "
            "save it with Keras 3 model.save(), without Lambda layers or unregistered custom objects"
        ) from None
    k = len(classes)
    probe = input_size or (2 * size_multiple, 3 * size_multiple)
    head = _check_output(model, model_file, probe, k)
    kind = _output_kind(model) if output == "auto" else output
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, MODEL_FILE)
        model.save(local)
        sha = file_sha256(local)
        storage.upload_file(local, out.child(MODEL_FILE))
    card = ModelCard.create(
        sha,
        architecture={"name": type(model).__name__.lower(), "depth": max(depth, 0), "head": head},
        num_classes=k,
        class_names=classes,
        palette=palette or imaging.default_palette(k),
        ignore_index=imaging.IGNORE_INDEX,
        input={
            "size": list(input_size or probe),
            "channels": 3,
            "normalization": normalize,
            "resize": "none" if input_size is None else "bilinear",
        },
        output=kind,
        imported={
            "source": os.path.abspath(model_file),
            "source_sha256": file_sha256(model_file),
            "keras_class": f"{type(model).__module__}.{type(model).__name__}",
        },
        versions={"raysegment": __version__, "keras": keras.__version__},
    )
    card.write(out)
    storage.mark_success(out, {"model_id": card.model_id})
    return {"model_id": card.model_id, "out": out.uri, "model_card": card.as_dict()}


def _check_output(model, model_file: str, size: tuple[int, int], k: int) -> str:
    """Run the model on one blank image; its output must be per-pixel class scores at the input size."""
    import numpy as np

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise DataError(f"{model_file}: {len(model.inputs)} inputs and {len(model.outputs)} outputs; need one of each")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] not in (3, None):
        raise DataError(f"{model_file}: input shape {shape}; need (batch, height, width, 3) RGB images")
    fixed = shape[1:3]
    if any(f is not None and f != s for f, s in zip(fixed, size)):
        raise DataError(
            f"{model_file}: takes {fixed[0]}x{fixed[1]} images but the card would give {size[0]}x{size[1]}; "
            f"pass --input-size {fixed[0]},{fixed[1]}"
        )
    try:
        y = model(np.zeros((1, *size, 3), np.float32), training=False)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{model_file}: fails on a {size[0]}x{size[1]} image ({type(exc).__name__}: {exc})") from None
    got = tuple(int(v) for v in y.shape)
    want = f"(1, {size[0]}, {size[1]}, {k})" + (" or one foreground channel" if k == 2 else "")
    if len(got) != 4 or got[1:3] != tuple(size):
        raise DataError(
            f"{model_file}: output {got} for a {size[0]}x{size[1]} input; a segmentation model must output "
            f"{want} (per-pixel class scores at the input size): add an upsampling layer to the input size, "
            "or give the --input-size it was built for"
        )
    if got[3] == k:
        return "softmax"
    if got[3] == 1 and k == 2:
        return "sigmoid"
    raise DataError(
        f"{model_file}: {got[3]} output channels but {k} classes in --classes; give one class name per "
        "output channel (in channel order)"
    )


def _output_kind(model) -> str:
    """'probabilities' when the last layer with an activation (past weightless ones such as upsampling)
    ends in softmax or sigmoid, else 'logits'."""
    for layer in reversed(model.layers):
        kind = type(layer).__name__.lower()
        if kind in ("softmax", "sigmoid"):
            return "probabilities"
        activation = getattr(layer, "activation", None)
        if activation is not None:
            return "probabilities" if getattr(activation, "__name__", "") in ("softmax", "sigmoid") else "logits"
        if layer.weights:
            break
    return "logits"
