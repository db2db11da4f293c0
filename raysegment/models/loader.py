"""The one way a model directory's model becomes a Keras model: the predictor (so `infer`, `evaluate`,
`show`, `nightly` and `serve`), `export` and `model import` all call `load_model` or `saved_model_as_keras`.

model.keras (trained, or an imported Keras model) loads with `keras.models.load_model` (safe mode), its
bilinear `UpSampling2D` layers swapped for `unet.ResizeUpSampling2D` (`as_dynamic`), which traces at unknown
image sizes.
An imported TensorFlow SavedModel is kept whole under saved_model/ and loads as a `TFSMLayer` inside a
one-input functional model. Why the folder and not a model.keras holding that layer: Keras 3 cannot turn
a SavedModel's graph back into layers, and a saved TFSMLayer keeps only the folder's path, so model.keras
would not be self-contained. A SavedModel runs at the precision it was saved with: a mixed-precision
clone would rebuild the layer from that path, and its graph's dtypes are fixed anyway.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import zipfile
from typing import Any

from raysegment import storage
from raysegment.errors import DataError
from raysegment.models.card import MODEL_FILE, ModelCard

# Keras' model.export names its function `serve`; tf.saved_model.save and TF 2 Keras name a signature.
ENDPOINTS = ("serve", "serving_default")


def load_model(model_dir: storage.Location, card: ModelCard, precision: str = "float32") -> Any:
    """The directory's model as a Keras model; `precision` other than float32 clones a Keras model with
    that mixed dtype policy (weights copied, kept in float32)."""
    if card.model_format == "saved_model":
        endpoint = card.imported.call_endpoint if card.imported else None
        return saved_model_as_keras(local_tree(card.model_location(model_dir)), endpoint)
    import keras

    from raysegment.models.unet import as_dynamic

    if card.architecture.encoder:
        import raysegment.models.encoders  # noqa: F401  registers the encoders' layers (CaffePreprocess)

    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, MODEL_FILE)
        storage.download_file(card.model_location(model_dir), local)
        if not zipfile.is_zipfile(local):  # Keras itself says "File not found" for a file that is there
            raise DataError(
                f"{card.model_location(model_dir).uri}: not a readable Keras archive (damaged, or not a .keras "
                "file: Keras 3 saves a zip archive); train or import the model again"
            )
        try:
            model = keras.models.load_model(local, compile=False)
        except Exception as exc:  # a damaged or foreign file (its hash can be rewritten with it): one line
            raise DataError(
                f"{card.model_location(model_dir).uri}: not a Keras model Keras can load "
                f"({type(exc).__name__}: {str(exc)[:120]}); train or import the model again"
            ) from exc
    model = as_dynamic(model)  # bilinear UpSampling2D traced at unknown sizes (native scale, export)
    return model if precision == "float32" else _with_policy(model, f"mixed_{precision}")


def local_tree(loc: storage.Location) -> str:
    """A local folder holding loc's files: loc itself when local, else a download that is removed when
    the process exits (a SavedModel's assets are read from it while the model lives)."""
    if not loc.remote:
        return loc.path
    d = tempfile.mkdtemp(prefix="raysegment-model-")
    atexit.register(shutil.rmtree, d, True)
    return download_tree(loc, d)


def download_tree(loc: storage.Location, local: str) -> str:
    """Copy every file under loc into the local folder `local` (made as needed); returns `local`."""
    root = loc.path.rstrip("/") + "/"
    for path in storage.list_files(loc):
        rel = path[len(root) :]
        target = os.path.join(local, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        storage.download_file(loc.child(rel), target)
    return local


def put_tree(local: str, loc: storage.Location) -> list[storage.Location]:
    """Copy a local file, or a folder's files, to loc (local or s3://), file by file, streamed; returns
    where each went."""
    if os.path.isfile(local):
        files = {local: loc}
    else:
        files = {
            os.path.join(root, name): loc.child(*os.path.relpath(os.path.join(root, name), local).split(os.sep))
            for root, _, names in os.walk(local)
            for name in names
        }
    for path, target in files.items():
        if target.remote:
            storage.upload_file(path, target)
        else:
            storage.check_replaceable(target)  # a link there would have been written through, out of loc
            with storage.storage_errors(target.uri):
                os.makedirs(os.path.dirname(target.path), exist_ok=True)
                shutil.copyfile(path, target.path)
    return list(files.values())


def saved_model_as_keras(path: str, endpoint: str | None = None, name: str | None = None) -> Any:
    """A local SavedModel folder as a functional Keras model of one image input and one output; the endpoint
    is `endpoint`, else the first of ENDPOINTS the SavedModel has. DataError (naming `name`, else the
    path) for what does not fit."""
    import keras
    import tensorflow as tf

    name = name or path
    try:
        if endpoint is None:  # at import: the first endpoint it has (the card keeps it)
            loaded = tf.saved_model.load(path)
            found = [n for n in ENDPOINTS if hasattr(loaded, n) or n in loaded.signatures]
            if not found:
                raise DataError(
                    f"{name}: a SavedModel without a `serve` function or a `serving_default` signature "
                    f"(it has {sorted(loaded.signatures) or 'none'}); export it with Keras' model.export()"
                )
            endpoint = found[0]
        layer = keras.layers.TFSMLayer(path, call_endpoint=endpoint)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's folder
        raise DataError(f"{name}: not a loadable TensorFlow SavedModel ({type(exc).__name__}: {exc})") from None
    fn = layer.call_endpoint_fn  # a signature (concrete function) or a restored tf.function (one trace or more)
    args, kwargs = getattr(fn, "concrete_functions", [fn])[0].structured_input_signature
    specs = [s for s in tf.nest.flatten((args, kwargs)) if isinstance(s, tf.TensorSpec)]
    if len(specs) != 1 or specs[0].dtype != tf.float32 or specs[0].shape.rank != 4:
        raise DataError(
            f"{name}: endpoint {endpoint} takes {specs}; need one float32 image batch (batch, height, width, 3)"
        )
    inputs = keras.Input(tuple(specs[0].shape[1:]), dtype="float32")
    outputs = layer(inputs)
    if isinstance(outputs, dict):  # a signature answers with a dict of named outputs
        if len(outputs) != 1:
            raise DataError(f"{name}: endpoint {endpoint} has outputs {sorted(outputs)}; need one")
        outputs = next(iter(outputs.values()))
    return keras.Model(inputs, outputs, name="saved_model")


def _with_policy(model: Any, policy: str) -> Any:
    """The same model with a mixed-precision dtype policy (weights copied, kept in float32)."""
    import keras

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = policy
        return layer.__class__.from_config(config)

    mixed = keras.models.clone_model(model, clone_function=clone)
    mixed.set_weights(model.get_weights())
    return mixed
