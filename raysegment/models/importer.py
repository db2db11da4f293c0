"""`raysegment model import`: a segmentation model from elsewhere made a raysegment model directory.

Two sources, local or s3://: a Keras 3 model file (.keras, or legacy .h5), loaded as the predictor
loads it (`keras.models.load_model`, safe mode) and saved again as model.keras; or a TensorFlow
SavedModel folder (Keras' model.export, tf.saved_model.save), copied whole to saved_model/ and run
through a TFSMLayer (`models/loader.py`, the one loader every consumer uses). Either is checked on one
blank image at the card's input size (one input of HxWx3, output HxWxK with K the number of classes,
or one foreground channel for two classes) and described by a card (`models/card.py`) with `imported`
naming the source, so `infer`, `evaluate`, `show`, `nightly`, `serve` and `export` use it as they use
a trained model. Models from keras_hub load where keras_hub is installed (Keras imports it by name),
so the cluster needs it too. A SavedModel keeps no layers, so whether it outputs logits or
probabilities must be given (`output`).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import TYPE_CHECKING, Any

from raysegment import __version__, storage
from raysegment.data import imaging
from raysegment.errors import ConfigError, DataError
from raysegment.models.card import CARD_FILE, MODEL_FILE, SAVED_MODEL_DIR, ModelCard, tree_sha256
from raysegment.models.loader import download_tree, put_tree, saved_model_as_keras
from raysegment.train.checkpoint import file_sha256

if TYPE_CHECKING:
    from raysegment.config import ImportSpec

SAVED_MODEL_PB = "saved_model.pb"


def import_model(spec: ImportSpec) -> dict[str, Any]:
    """Check the spec's model against the card it describes and write the model directory DEST."""
    out = storage.resolve(spec.dest, spec.endpoint_url, spec.storage_retry_s)
    if storage.exists(out.child(CARD_FILE)) and not spec.overwrite:
        raise ConfigError(f"{out.uri} already holds a model; pass --overwrite or choose another DEST")
    input_size = None if spec.input_size == "native" else tuple(spec.input_size)
    k = len(spec.classes)
    probe = input_size or (2 * spec.size_multiple, 3 * spec.size_multiple)
    with tempfile.TemporaryDirectory() as tmp:
        source = _local_source(spec, tmp)
        saved = os.path.isdir(source)
        if saved and spec.output == "auto":
            raise ConfigError(
                f"{spec.model_file}: a SavedModel keeps no layers to tell whether it outputs logits or "
                "probabilities; pass --output logits or --output probabilities"
            )
        model, endpoint = _load(source, spec.model_file)
        head = _check_output(model, spec.model_file, probe, k)
        kind = _output_kind(model) if spec.output == "auto" else spec.output
        storage.remove_success(out)
        for stale in (MODEL_FILE, SAVED_MODEL_DIR):  # --overwrite of a model of the other format
            storage.remove_tree(out.child(stale))
        if saved:
            sha = source_sha = tree_sha256(storage.resolve(source))
            put_tree(source, out.child(SAVED_MODEL_DIR))
        else:
            local = os.path.join(tmp, MODEL_FILE)
            model.save(local)
            sha, source_sha = file_sha256(local), file_sha256(source)
            storage.upload_file(local, out.child(MODEL_FILE))
    card = _card(spec, model, sha, head, kind, probe, endpoint, source_sha)
    card.write(out)
    storage.mark_success(out, {"model_id": card.model_id})
    return {"model_id": card.model_id, "out": out.uri, "model_card": card.as_dict()}


def _local_source(spec: ImportSpec, tmp: str) -> str:
    """The model file or SavedModel folder as a local path (downloaded into tmp when on s3://)."""
    loc = storage.resolve(spec.model_file, spec.endpoint_url, spec.storage_retry_s)
    if not loc.remote:
        if os.path.isdir(loc.path) and not os.path.isfile(os.path.join(loc.path, SAVED_MODEL_PB)):
            raise ConfigError(
                f"{spec.model_file}: a folder without {SAVED_MODEL_PB}; give a .keras file or a SavedModel"
            )
        if not os.path.exists(loc.path):
            raise ConfigError(f"{spec.model_file}: no such file; give a .keras model file or a SavedModel folder")
        return loc.path
    if storage.exists(loc.child(SAVED_MODEL_PB)):
        return download_tree(loc, os.path.join(tmp, "source"))
    if not storage.exists(loc):
        raise ConfigError(f"{spec.model_file}: no such object; give a .keras model file or a SavedModel folder")
    local = os.path.join(tmp, os.path.basename(loc.path))
    storage.download_file(loc, local)
    return local


def _load(path: str, name: str) -> tuple[Any, str | None]:
    """(the Keras model, the SavedModel endpoint it runs or None for a Keras file)."""
    if os.path.isdir(path):
        model = saved_model_as_keras(path, name=name)
        return model, model.layers[-1].call_endpoint  # the TFSMLayer after the input
    import keras

    try:
        return keras.models.load_model(path, compile=False), None
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's file
        raise DataError(
            f"{name}: cannot be loaded by keras.models.load_model ({type(exc).__name__}: {exc}); "
            "save it with Keras 3 model.save(), without Lambda layers or unregistered custom objects"
        ) from None


def _card(
    spec: ImportSpec,
    model: Any,
    sha: str,
    head: str,
    kind: str,
    size: tuple[int, int],
    endpoint: str | None,
    source_sha: str,
) -> ModelCard:
    import keras

    saved = endpoint is not None
    layer = model.layers[-1] if saved else model
    source = storage.resolve(spec.model_file, spec.endpoint_url)
    k = len(spec.classes)
    return ModelCard.create(
        sha,
        architecture={
            "name": "savedmodel" if saved else type(model).__name__.lower(),
            "depth": int(math.log2(spec.size_multiple)),
            "head": head,
        },
        **({"model_format": "saved_model"} if saved else {}),
        num_classes=k,
        class_names=spec.classes,
        palette=spec.palette or imaging.default_palette(k),
        ignore_index=imaging.IGNORE_INDEX,
        input={
            "size": list(size),
            "channels": 3,
            "normalization": spec.normalize,
            "resize": "none" if spec.input_size == "native" else "bilinear",
        },
        output=kind,
        imported={
            "source": storage.redact(source.uri),
            "source_sha256": source_sha,
            "keras_class": f"{type(layer).__module__}.{type(layer).__name__}",
            **({"call_endpoint": endpoint} if saved else {}),
        },
        versions={"raysegment": __version__, "keras": keras.__version__},
    )


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
