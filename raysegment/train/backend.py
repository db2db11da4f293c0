"""Ray Train's TensorFlow cluster set-up, without importing TensorFlow where it is not used.

`ray.train.tensorflow.TensorflowConfig` lives in a package whose `__init__` imports
TensorFlow, so Ray Train's controller (which unpickles the backend config) spent ~4 s of
every `train()` importing a framework it never runs. This backend does the one thing the
workers need from it, set `TF_CONFIG` for `MultiWorkerMirroredStrategy`, from a module that
imports nothing heavy. Unlike Ray's, it does not set `TF_USE_LEGACY_KERAS` (we use Keras 3).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ray
from ray._common.network_utils import build_address
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework


@dataclass
class TFClusterConfig(BackendConfig):
    """Pass as `backend_config` to a `DataParallelTrainer` whose workers use MultiWorkerMirroredStrategy."""

    @property
    def backend_cls(self):
        return _TFClusterBackend

    @property
    def framework(self):
        return TrainingFramework.TENSORFLOW  # how Ray's dashboard labels the run


def _worker_address() -> str:
    address, port = get_address_and_port()
    return build_address(address, port)


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": worker_addresses}, "task": {"type": "worker", "index": index}}
    )


class _TFClusterBackend(Backend):
    def on_start(self, worker_group, backend_config: TFClusterConfig) -> None:
        addresses = worker_group.execute(_worker_address)
        ray.get(
            [
                worker_group.execute_single_async(i, _set_tf_config, worker_addresses=addresses, index=i)
                for i in range(len(worker_group))
            ]
        )
