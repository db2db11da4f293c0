"""Connecting to Ray: an existing cluster (RAY_ADDRESS) or an embedded local one."""

from __future__ import annotations

import logging
import os

import ray


def cores() -> int:
    """CPU cores of this machine."""
    return os.cpu_count() or 1


def init_ray(min_cpus: int = 0) -> None:
    """Join RAY_ADDRESS if set, else start local Ray with at least `min_cpus` logical CPUs.

    On a small machine the train workers would hold every core and starve the Ray
    Data tasks that feed them, so the local cluster advertises enough logical CPUs
    for both; TF threads are capped per worker to match.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        return
    cpus = max(cores(), min_cpus)
    ray.init(num_cpus=cpus, logging_level=logging.WARNING)
