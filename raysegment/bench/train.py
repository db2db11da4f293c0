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
from typing import TYPE_CHECKING, Any

import numpy as np

from raysegment.config import PrepareSpec, TrainSpec
from raysegment.data import synthetic

if TYPE_CHECKING:
    from raysegment.train.config import TrainConfig


def _load_encoded(data_dir: str) -> tuple[list[bytes], list[bytes]]:
    """The train split's encoded images and masks, as a plain script would read its files."""
    import pyarrow.parquet as pq

    images, masks = [], []
    for shard in sorted(os.listdir(os.path.join(data_dir, "shards"))):
        if shard.startswith("train-"):
            table = pq.read_table(os.path.join(data_dir, "shards", shard), columns=["image", "mask"])
            images += table.column("image").to_pylist()
            masks += table.column("mask").to_pylist()
    return images, masks


def plain_keras(data_dir: str, cfg: TrainConfig, epochs: int) -> float:
    """Steady-state images/s of a Keras-example loop in this process: tf.data decode + model.fit."""
    import keras
    import tensorflow as tf

    images, masks = _load_encoded(data_dir)
    size = cfg.image_size
    batch = cfg.global_batch
    n = (len(images) // batch) * batch

    def decode(img: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.image.resize(tf.cast(tf.io.decode_png(img, channels=3), tf.float32) / 255.0, (size, size))
        y = tf.image.resize(tf.io.decode_png(mask, channels=1), (size, size), method="nearest")[..., 0]
        return x, y

    ds = (
        tf.data.Dataset.from_tensor_slices((images[:n], masks[:n]))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    model = cfg.model.build()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(ds, epochs=1, verbose=0)  # tracing and warm-up
    t0 = time.perf_counter()
    model.fit(ds, epochs=epochs - 1, verbose=0)
    return n * (epochs - 1) / (time.perf_counter() - t0)


def ray_train(spec: TrainSpec) -> float:
    """Steady-state images/s of raysegment's Ray Train loop (epochs after the first).

    Each epoch's time includes Ray Data reading and decoding the shards afresh, as
    the baseline's tf.data pipeline does.
    """
    from raysegment.train.trainer import train

    train(spec)
    with open(os.path.join(spec.out, "history.csv")) as f:
        rows = list(csv.DictReader(f))[1:]
    return float(np.mean([float(r["images_per_second"]) for r in rows]))


def bench_train(
    images: int, image_size: int, depth: int, base_filters: int, global_batch: int, epochs: int, workers: int
) -> dict[str, Any]:
    """Plain Keras vs Ray Train with 1 worker on all cores (equal cores) vs `workers` workers."""
    from raysegment.data.prepare import prepare, read_manifest
    from raysegment.train.config import train_config

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as root:
        synthetic.write_pairs(os.path.join(root, "src"), images, size=image_size)
        data_dir = os.path.join(root, "data")
        prepare(PrepareSpec(source=os.path.join(root, "src"), dest=data_dir, val_fraction=0.1, shard_size_mb=1))

        def spec(name: str, count: int, cpus_per_worker: float) -> TrainSpec:
            return TrainSpec(
                data=data_dir,
                out=os.path.join(root, name),
                epochs=epochs,
                workers=count,
                cpus_per_worker=cpus_per_worker,
                batch_size=global_batch // count,
                image_size=image_size,
                depth=depth,
                base_filters=base_filters,
                augment=False,
                resume=False,
                schedule="constant",
                plan=False,  # the plain Keras baseline trains exactly these settings
            )

        one_spec, many_spec = spec("one", 1, float(cores)), spec("many", workers, max(1.0, cores / workers))
        # The baseline trains the model the 1-worker run trains, on the same global batch.
        cfg = train_config(one_spec, read_manifest(data_dir)[1], data_dir)
        # The baseline runs before and after the Ray runs and its better figure counts: on a
        # shared machine a slow spell must not flatter raysegment.
        plain_before = plain_keras(data_dir, cfg, epochs)
        one = ray_train(one_spec)
        many = ray_train(many_spec)
        plain_after = plain_keras(data_dir, cfg, epochs)
        plain = max(plain_before, plain_after)
    return {
        "images": images,
        "image_size": image_size,
        "model": {"depth": depth, "base_filters": base_filters},
        "global_batch": global_batch,
        "epochs_timed": epochs - 1,
        "cores": cores,
        "plain_keras_ips": round(plain, 2),
        "plain_keras_runs_ips": [round(plain_before, 2), round(plain_after, 2)],
        "ray_train_1_worker_ips": round(one, 2),
        f"ray_train_{workers}_workers_ips": round(many, 2),
        "ratio_1_worker_vs_plain": round(one / plain, 3),
        "overhead_equal_cores": round(1 - one / plain, 3),
        f"ratio_{workers}_workers_vs_plain": round(many / plain, 3),
    }
