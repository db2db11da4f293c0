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

import fnmatch
import math
import os
import posixpath
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any

from raysegment import __version__, logs, storage
from raysegment.config import ImportSpec, TrainSpec
from raysegment.data import imaging
from raysegment.errors import ConfigError, DataError, StorageError
from raysegment.models.card import (
    CARD_FILE,
    EVALUATION_FILES,
    MODEL_FILE,
    SAVED_MODEL_DIR,
    SAVED_MODEL_PB,
    TENSORBOARD_DIR,
    TRAINED_FILES,
    ModelCard,
    tree_sha256,
)
from raysegment.models.loader import download_tree, put_tree, saved_model_as_keras
from raysegment.train.checkpoint import file_sha256

# A head whose activation (layer, or a layer's `activation`) is one of these outputs probabilities.
PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid", "hard_sigmoid")
MAX_HEAD_STEPS = 1000


@dataclass(frozen=True)
class ImportResult:
    """What `import_model` returns: DEST and the card written there (the JSON result is
    `registry._import_payload`'s)."""

    out: str
    card: ModelCard


def import_model(spec: ImportSpec) -> ImportResult:
    """Check the spec's model against the card it describes and write the model directory DEST."""
    out = storage.resolve(spec.dest, spec.endpoint_url, spec.storage_retry_s)
    _check_dest(out, spec.overwrite)
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
        kind = _output_kind(model, spec.model_file) if spec.output == "auto" else spec.output
        logs.began()  # checked: from here DEST changes, and its logs/ keeps this command's log
        storage.remove_success(out)
        for stale in (MODEL_FILE, SAVED_MODEL_DIR, *_evaluations(out)):  # --overwrite: the old model's files
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
    return ImportResult(out.uri, card)


def _check_dest(out: storage.Location, overwrite: bool) -> None:
    """DEST takes an import when empty, or holding an imported model and --overwrite is given; never when it
    is a trained model's folder (export refuses one too): its metrics, history, plots and checkpoints would
    stay beside the import, describing another model."""
    trained = _trained_outputs(out)
    if trained:
        raise ConfigError(
            f"{out.uri}: DEST is a trained model's folder (it holds {', '.join(trained)}, which would stay beside "
            "the import describing another model), refused even with --overwrite; choose another DEST"
        )
    if storage.exists(out.child(CARD_FILE)) and not overwrite:
        raise ConfigError(f"{out.uri} already holds a model; pass --overwrite or choose another DEST")


def _trained_outputs(out: storage.Location) -> list[str]:
    """What `train` wrote in DEST: its files, and its checkpoint folder where DEST's card names a training run
    (`--name`; a folder `train` alone may be anything)."""
    names = [*TRAINED_FILES, TENSORBOARD_DIR]
    card = out.child(CARD_FILE)
    try:
        training = storage.read_json(card).get("training") if storage.exists(card) else None
    except (StorageError, AttributeError):
        training = None  # not a card that train wrote
    if isinstance(training, dict):
        run = training.get("name") or TrainSpec.model_fields["name"].default
        if isinstance(run, str) and "/" not in run:
            names.append(run)
    return [name for name in names if storage.exists(out.child(name))]


def _evaluations(out: storage.Location) -> list[str]:
    """The `evaluate` results (eval-SPLIT.json) DEST holds: of the model an --overwrite replaces."""
    if not storage.exists(out.child(CARD_FILE)):
        return []
    folder = out.path.rstrip("/")
    found = storage.list_files(out, (".json",))
    return [
        posixpath.basename(p)
        for p in found
        if posixpath.dirname(p) == folder and fnmatch.fnmatch(posixpath.basename(p), EVALUATION_FILES)
    ]


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

    problem = _not_a_model_file(path, name)
    if problem:
        raise DataError(problem)
    try:
        return keras.models.load_model(path, compile=False), None
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's file
        raise DataError(
            f"{name}: cannot be loaded by keras.models.load_model ({type(exc).__name__}: {exc}); "
            "save it with Keras 3 model.save(), without Lambda layers or unregistered custom objects"
        ) from None


def _not_a_model_file(path: str, name: str) -> str | None:
    """Why the file cannot be a Keras model, from its name (as Keras reads it: `.keras`, `.h5`/`.hdf5`) and
    its first bytes; Keras itself says "File not found" for a .keras file that is there but no zip archive."""
    if path.endswith(".keras"):
        if zipfile.is_zipfile(path):
            return None
        return (
            f"{name}: not a readable Keras archive (damaged, or not a .keras file: Keras 3 saves a zip archive); "
            "save the model again with model.save('model.keras')"
        )
    if path.endswith((".h5", ".hdf5")):
        import h5py

        if h5py.is_hdf5(path):
            return None
        return f"{name}: not a readable HDF5 file (damaged, or not a legacy .h5 Keras model); save the model again"
    return (
        f"{name}: not a .keras or .h5 file; give a Keras 3 model saved with model.save('model.keras') "
        "(legacy .h5 loads too) or a TensorFlow SavedModel folder"
    )


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


def _output_kind(model, model_file: str) -> str:
    """'probabilities' or 'logits', read from the layer that produces the model's output: followed back
    through weightless one-input layers (upsampling, resizing, dropout: a resized softmax is still one) and
    into nested models (a Functional or Sequential model used as a layer: a wrapped head is common). A head
    that does not say (a layer with weights and no activation, a merge, a subclassed model) is refused,
    naming --output: read as logits, a sigmoid head would mark every pixel foreground."""
    activation, why = _head_activation(model)
    if activation is None:
        raise ConfigError(
            f"{model_file}: cannot tell whether the model outputs logits or probabilities ({why}); "
            "pass --output logits or --output probabilities"
        )
    return "probabilities" if activation in PROBABILITY_ACTIVATIONS else "logits"


def _head_activation(model) -> tuple[str | None, str]:
    """(the activation that makes the model's output, or None and why it cannot be told), found by following
    the output tensor back to the layer that decides it."""
    outputs = _graph_outputs(model)
    if outputs is None:
        return None, f"{type(model).__name__} is a subclassed model, without layers to follow"
    op, node, index = outputs[0]._keras_history
    for _ in range(MAX_HEAD_STEPS):
        inner = _graph_outputs(op)
        if inner is not None:  # a nested model: the layer that makes its own output
            op, node, index = inner[index]._keras_history
            continue
        layer = f"the {type(op).__name__} layer {op.name!r}"
        if type(op).__name__.lower() in PROBABILITY_ACTIVATIONS:  # the Softmax and Sigmoid layers
            return type(op).__name__.lower(), ""
        activation = getattr(op, "activation", None)
        name = getattr(activation, "__name__", None)
        if activation is not None and name is None:
            return None, f"its output comes from {layer}, whose activation is not one of Keras'"
        if name is not None and (op.weights or name != "linear"):  # Activation("linear") passes values on
            return name, ""
        if op.weights:
            return None, f"its output comes from {layer}, which has weights and no activation"
        inputs = op._inbound_nodes[node].input_tensors if op._inbound_nodes else []
        if not inputs:
            return None, f"its output is the input {layer}"
        if len(inputs) != 1:
            return None, f"its output comes from {layer}, which merges {len(inputs)} inputs"
        op, node, index = inputs[0]._keras_history
    return None, f"no activation within {MAX_HEAD_STEPS} layers of the output"


def _graph_outputs(layer) -> list[Any] | None:
    """A Functional or Sequential model's output tensors; None for a plain layer or a subclassed model."""
    import keras

    if not isinstance(layer, keras.Model):
        return None
    try:
        outputs = layer.outputs
    except (AttributeError, ValueError):
        return None
    return outputs or None
