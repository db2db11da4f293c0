"""How many predictor actors, on what: `--actors auto` and `--gpus-per-actor auto` resolved against the cluster.

GPUs: one actor per GPU (or per `gpus_per_actor` share), the pool between half of them and all.
CPUs only: single-threaded actors, one per core, less what the read, decode and write tasks need
(RESERVED_SHARE of the cluster's CPUs, at least RESERVED_MIN: actors holding every CPU starve the
tasks that feed them, and one slow read then stalls the whole job): on CPU, independent single-threaded
actors beat one actor with TensorFlow on every core (`bench infer --compare-one-actor`: 1.27x
on 2 cores). Explicit values are kept as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raysegment.config import InferOptions

RESERVED_SHARE = 0.125
RESERVED_MIN = 2.0


def min_cpus(options: InferOptions) -> int:
    """Logical CPUs for inference on a local Ray: with `--actors auto`, one per core for the actors plus two for
    the read, decode and write tasks beside them (RESERVED_MIN)."""
    if options.actors != "auto":
        return 0
    from raysegment.runtime import cores  # runtime imports Ray, which this module does not

    return cores() + int(RESERVED_MIN)


@dataclass(frozen=True)
class Actors:
    min: int
    max: int
    gpus: float
    cpus: float

    def as_dict(self) -> dict[str, float | list[int]]:
        return {"actors": [self.min, self.max], "gpus_per_actor": self.gpus, "cpus_per_actor": self.cpus}


def resolve(options: InferOptions, cluster: dict[str, float]) -> Actors:
    """The actor pool for these options on a cluster with `cluster` resources (ray.cluster_resources())."""
    cluster_gpus = float(cluster.get("GPU", 0.0))
    gpus = options.gpus_per_actor
    if gpus == "auto":
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
    cpus = options.cpus_per_actor
    if options.actors != "auto":
        return Actors(options.actors[0], options.actors[1], gpus, cpus)
    if gpus > 0:
        n = max(1, int(cluster_gpus // gpus))
        return Actors(max(1, n // 2), n, gpus, cpus)
    total = float(cluster.get("CPU", 1.0))
    free = total - max(RESERVED_MIN, total * RESERVED_SHARE)
    n = max(1, math.floor(free / cpus))
    return Actors(max(1, n // 2), n, gpus, cpus)
