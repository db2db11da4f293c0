"""The per-worker training loop: Keras 3 model, MultiWorkerMirroredStrategy, custom step.

Why a custom step and not ``model.fit``: Keras 3's fit under MultiWorkerMirroredStrategy
on a Ray dataset shard fails (Ray #47464, Keras #20585). The step below sums
per-example losses and divides by the *global* batch; the optimizer all-reduces
(sums) gradients over replicas, so N workers with batch B take exactly the step
one worker would take with batch N*B.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np

CHECKPOINT_WEIGHTS = "model.weights.h5"
CHECKPOINT_OPTIMIZER = "optimizer.npz"
CHECKPOINT_STATE = "state.json"


def _set_threads(cpus: float) -> None:
    import tensorflow as tf

    n = max(1, int(cpus))
    # Each worker owns `cpus` cores; TF's default of all cores per worker oversubscribes.
    tf.config.threading.set_intra_op_parallelism_threads(n)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, n)))


def build_model(cfg: dict[str, Any]):
    from raysegment.models.unet import build_unet

    return build_unet(cfg["num_classes"], depth=cfg["depth"], base_filters=cfg["base_filters"])


def scaled_learning_rate(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: base_lr is for a global batch of 8."""
    return base_lr * global_batch / 8.0


def save_checkpoint(directory: str, model, optimizer, state: dict[str, Any]) -> None:
    model.save_weights(os.path.join(directory, CHECKPOINT_WEIGHTS))
    np.savez(os.path.join(directory, CHECKPOINT_OPTIMIZER), *[np.asarray(v) for v in optimizer.variables])
    with open(os.path.join(directory, CHECKPOINT_STATE), "w") as f:
        json.dump(state, f)


def load_checkpoint(directory: str, model, optimizer) -> dict[str, Any]:
    model.load_weights(os.path.join(directory, CHECKPOINT_WEIGHTS))
    with np.load(os.path.join(directory, CHECKPOINT_OPTIMIZER)) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(optimizer.variables):
        raise ValueError(f"checkpoint has {len(values)} optimizer variables, model needs {len(optimizer.variables)}")
    for var, value in zip(optimizer.variables, values):
        var.assign(value)
    with open(os.path.join(directory, CHECKPOINT_STATE)) as f:
        return json.load(f)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; rank 0 writes checkpoints."""
    _set_threads(cfg["cpus_per_worker"])
    import keras  # Keras 3: never tf.keras, which Ray maps to tf_keras in workers
    import ray.train
    import tensorflow as tf

    from raysegment.models.losses import LOSSES
    from raysegment.models.metrics import metrics_from_confusion

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    keras.utils.set_random_seed(cfg["seed"])
    # Pack gradients into few large all-reduces: one collective per variable costs a
    # network round trip each, which dominates small models on CPU clusters.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=32 * 2**20)
    )
    batch = cfg["batch_size"]
    global_batch = batch * world
    steps = cfg["train_count"] // global_batch
    num_classes = cfg["num_classes"]
    loss_fn = LOSSES[cfg.get("loss", "ce")]

    with strategy.scope():
        model = build_model(cfg)
        optimizer = keras.optimizers.Adam(scaled_learning_rate(cfg["learning_rate"], global_batch))
        optimizer.build(model.trainable_variables)

    start_epoch, best = 0, -1.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, model, optimizer)
        start_epoch, best = state["epoch"] + 1, state["best_val_mean_iou"]

    @tf.function
    def train_step(images, masks):
        def step_fn(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_sum(loss_fn(y, logits)) / global_batch
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step_fn, args=(images, masks)), axis=None)

    @tf.function
    def predict(images):
        return tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)

    def all_reduce_sum(array: np.ndarray) -> np.ndarray:
        local = tf.constant(array, tf.float64)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(local)), axis=None).numpy()

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg["epochs"]):
        t0 = time.time()
        losses = []
        # Every worker runs exactly `steps` steps (collectives hang otherwise); rows past
        # that are drained, so each epoch still consumes the whole streaming split.
        for i, b in enumerate(train_shard.iter_batches(batch_size=batch, drop_last=True, batch_format="numpy")):
            if i < steps:
                losses.append(float(train_step(tf.constant(b["image"]), tf.constant(b["mask"]))))
        if len(losses) < steps:
            raise RuntimeError(f"rank {rank}: shard gave {len(losses)} batches, expected {steps}")
        train_seconds = time.time() - t0

        cm = np.zeros((num_classes, num_classes), np.float64)
        for b in val_shard.iter_batches(batch_size=batch, batch_format="numpy"):
            pred = predict(tf.constant(b["image"])).numpy()
            labels = b["mask"].astype(np.int64).ravel()
            keep = labels < num_classes
            cm += np.bincount(labels[keep] * num_classes + pred.ravel()[keep], minlength=num_classes**2).reshape(
                num_classes, num_classes
            )
        val = metrics_from_confusion(all_reduce_sum(cm), cfg["class_names"])
        metrics = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_pixel_accuracy": val["pixel_accuracy"],
            "val_mean_iou": val["mean_iou"],
            "val_mean_dice": val["mean_dice"],
            "images_per_second": steps * global_batch / max(train_seconds, 1e-9),
            "epoch_seconds": time.time() - t0,
        }
        best = max(best, val["mean_iou"])
        state = {"epoch": epoch, "best_val_mean_iou": best, "metrics": metrics}
        # Every rank reports (it is a barrier); only rank 0 uploads the checkpoint.
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(d, model, optimizer, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
