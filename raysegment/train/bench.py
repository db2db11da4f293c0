"""`raysegment bench train`: the Ray Train loop against a plain single-process Keras loop.

Same model, same data, same machine, back to back in one run. Throughput is
steady state: the first epoch (graph tracing, worker start-up) is left out of
both sides.
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from typing import Any

import numpy as np

from raysegment.config import PrepareSpec, TrainSpec
from raysegment.data import imaging, synthetic
from raysegment.data.pipeline import normalise


def _load_arrays(data_dir: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The train split decoded into memory, as the plain loop would hold it."""
    import pyarrow.parquet as pq

    images, masks = [], []
    for shard in sorted(os.listdir(os.path.join(data_dir, "shards"))):
        if not shard.startswith("train-"):
            continue
        for row in pq.read_table(os.path.join(data_dir, "shards", shard), columns=["image", "mask"]).to_pylist():
            images.append(imaging.resize_image(imaging.decode_image(row["image"]), (size, size)))
            masks.append(imaging.resize_mask(imaging.decode_mask(row["mask"]), (size, size)))
    return normalise(np.stack(images)), np.stack(masks)


def plain_keras(data_dir: str, cfg: dict[str, Any], epochs: int) -> float:
    """Steady-state images/s of model.fit in this process (all cores), the baseline."""
    import keras

    from raysegment.train.loop import build_model

    x, y = _load_arrays(data_dir, cfg["image_size"])
    batch = cfg["global_batch"]
    n = (len(x) // batch) * batch
    x, y = x[:n], y[:n]
    model = build_model(cfg)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # tracing and warm-up
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs - 1, verbose=0, shuffle=True)
    return n * (epochs - 1) / (time.perf_counter() - t0)


def ray_train(data_dir: str, out: str, cfg: dict[str, Any], workers: int, cpus_per_worker: float, epochs: int) -> float:
    """Steady-state images/s of raysegment's Ray Train loop (epochs after the first)."""
    from raysegment.train.trainer import train

    train(
        TrainSpec(
            data=data_dir,
            out=out,
            epochs=epochs,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            batch_size=cfg["global_batch"] // workers,
            image_size=cfg["image_size"],
            depth=cfg["depth"],
            base_filters=cfg["base_filters"],
            augment=False,
            resume=False,
            schedule="constant",
        )
    )
    local = os.path.join(out, "history.csv")
    with open(local) as f:
        rows = list(csv.DictReader(f))[1:]
    return float(np.mean([float(r["images_per_second"]) for r in rows]))


def bench_train(
    images: int, image_size: int, depth: int, base_filters: int, global_batch: int, epochs: int, workers: int
) -> dict[str, Any]:
    """Plain Keras vs Ray Train with 1 worker on all cores (equal cores) vs `workers` workers."""
    from raysegment.data.prepare import prepare

    cores = os.cpu_count() or 1
    cfg = {
        "num_classes": 4,
        "image_size": image_size,
        "depth": depth,
        "base_filters": base_filters,
        "global_batch": global_batch,
    }
    with tempfile.TemporaryDirectory() as root:
        synthetic.write_pairs(os.path.join(root, "src"), images, size=image_size)
        data_dir = os.path.join(root, "data")
        prepare(PrepareSpec(source=os.path.join(root, "src"), dest=data_dir, val_fraction=0.1, shard_size_mb=1))
        plain = plain_keras(data_dir, cfg, epochs)
        one = ray_train(data_dir, os.path.join(root, "one"), cfg, 1, float(cores), epochs)
        many = ray_train(data_dir, os.path.join(root, "many"), cfg, workers, max(1.0, cores / workers), epochs)
    return {
        "images": images,
        "image_size": image_size,
        "model": {"depth": depth, "base_filters": base_filters},
        "global_batch": global_batch,
        "epochs_timed": epochs - 1,
        "cores": cores,
        "plain_keras_ips": round(plain, 2),
        "ray_train_1_worker_ips": round(one, 2),
        f"ray_train_{workers}_workers_ips": round(many, 2),
        "ratio_1_worker_vs_plain": round(one / plain, 3),
        "overhead_equal_cores": round(1 - one / plain, 3),
        f"ratio_{workers}_workers_vs_plain": round(many / plain, 3),
    }
