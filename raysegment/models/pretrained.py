"""ImageNet weights without the network (issue #15 item 5): the Keras cache's file for each encoder, and
the driver's weights file sent to the training workers.

`keras.applications` downloads an encoder's ImageNet weights into its cache on first use and loads them
from there afterwards. The plan picks a pretrained encoder only where that file is already on the driver
(`plan.encoder_for`), and training then sends the file's bytes through Ray's object store to every worker
(`ShippedWeights`), so worker nodes need neither the cache nor network access. The file is loaded as a
weights file (`models/encoders.backbone`): what `keras.applications` itself does with the cached file,
without its download step.

No Keras import here: `raysegment plan` looks the files up without starting TensorFlow.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The `include_top=False` ImageNet weights file of each encoder as `keras.applications` names it in its
# cache (the `file_name` its `get_file` call uses; Keras 3.x applications/*.py). MobileNetV3 here is the
# non-minimalistic alpha-1.0 variant `encoders.backbone` builds.
IMAGENET_NOTOP = {
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "efficientnetv2b0": "efficientnetv2-b0_notop.h5",
    "efficientnetv2s": "efficientnetv2-s_notop.h5",
    "mobilenetv3small": "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
    "mobilenetv3large": "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
    "convnext_tiny": "convnext_tiny_notop.h5",
}


def keras_cache_dir() -> Path:
    """Where `keras.utils.get_file` keeps downloaded weights (`cache_subdir="models"`), as Keras resolves it:
    $KERAS_HOME, else ~/.keras (/tmp/.keras when the home directory is not writable); /tmp/.keras when that
    directory exists but is not writable. (Keras creates it on import where it is missing.)"""
    home = os.environ.get("KERAS_HOME")
    if home is None:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    home = os.path.expanduser(home)
    if os.path.exists(home) and not os.access(home, os.W_OK):
        home = "/tmp/.keras"
    return Path(home) / "models"


def cached_weights(encoder: str) -> str | None:
    """The encoder's ImageNet (no top) weights file in this machine's Keras cache, or None."""
    name = IMAGENET_NOTOP.get(encoder)
    path = keras_cache_dir() / name if name else None
    return str(path) if path and path.is_file() and path.stat().st_size > 0 else None


def weights_file(encoder: str, weights: str | None) -> str | None:
    """The local file an encoder's weights come from on this machine: the cached ImageNet file for
    `imagenet`, the file itself for a path that exists here; else None (random weights, or a download)."""
    if weights == "imagenet":
        return cached_weights(encoder)
    if weights and weights != "none" and os.path.isfile(weights):
        return weights
    return None


@dataclass(frozen=True)
class ShippedWeights:
    """A weights file of the driver's in Ray's object store: each worker writes a local copy and loads it."""

    name: str  # the file's name: its extension picks Keras' reader (legacy .h5, or .weights.h5)
    sha256: str
    ref: Any  # ray.ObjectRef of the file's bytes
    source: str  # the driver's path (recorded for messages; workers never read it)


def ship(path: str) -> ShippedWeights:
    """Put the file's bytes into Ray's object store once (joining or starting Ray if needed)."""
    import ray

    from raysegment.runtime import init_ray

    init_ray()
    data = Path(path).read_bytes()
    return ShippedWeights(Path(path).name, hashlib.sha256(data).hexdigest(), ray.put(data), path)


def local_copy(shipped: ShippedWeights, root: str | None = None) -> str:
    """The shipped file on this node (under `root`, default the temporary directory), written once per node
    and content: workers on one node share it, and the write is atomic (a temporary name, then a rename),
    so none reads a half-written file."""
    import ray

    target = Path(root or tempfile.gettempdir()) / "raysegment-weights" / shipped.sha256[:16] / shipped.name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        data = ray.get(shipped.ref)
        if hashlib.sha256(data).hexdigest() != shipped.sha256:
            raise RuntimeError(f"weights shipped from {shipped.source} arrived corrupted")
        partial = target.parent / f".{os.getpid()}.partial"
        partial.write_bytes(data)
        os.replace(partial, target)
    return str(target)
