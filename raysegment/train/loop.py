"""The per-worker training loop: Keras 3 model, MultiWorkerMirroredStrategy, custom step.

Why a custom step and not ``model.fit``: Keras 3's fit under MultiWorkerMirroredStrategy
on a Ray dataset shard fails (Ray #47464, Keras #20585). The step below sums
per-example losses and divides by the *global* batch; the optimizer all-reduces
(sums) gradients over replicas, so N workers with batch B take exactly the step
one worker would take with batch N*B.
"""

from __future__ import annotations

import hashlib
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
    """The U-Net a training config describes (also used by the driver to export it)."""
    from raysegment.models.unet import build_unet

    return build_unet(
        cfg["num_classes"],
        depth=cfg["depth"],
        base_filters=cfg["base_filters"],
        batch_norm=cfg.get("batch_norm", True),
        dropout=cfg.get("dropout", 0.0),
        upsampling=cfg.get("upsampling", "transpose"),
        head=cfg.get("head", "softmax"),
    )


def scaled_learning_rate(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: base_lr is for a global batch of 8."""
    return base_lr * global_batch / 8.0


def learning_rate_schedule(cfg: dict[str, Any], peak: float, steps_per_epoch: int):
    """Linear warm-up to `peak`, then cosine decay, step decay or constant."""
    import keras

    total = max(1, cfg["epochs"] * steps_per_epoch)
    warmup = min(int(cfg.get("warmup_epochs", 0) * steps_per_epoch), total - 1)
    schedule = cfg.get("schedule", "constant")
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=peak / 10 if warmup else peak,
            decay_steps=total - warmup,
            alpha=0.01,
            warmup_target=peak if warmup else None,
            warmup_steps=warmup,
        )
    if schedule == "step":
        # x0.1 at 60% and 85% of training.
        bounds = [max(warmup + 1, int(total * 0.6)), max(warmup + 2, int(total * 0.85))]
        return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, [peak, peak * 0.1, peak * 0.01])
    return peak


def make_optimizer(cfg: dict[str, Any], learning_rate):
    import keras

    if cfg.get("optimizer", "adam") == "sgd":
        opt = keras.optimizers.SGD(learning_rate, momentum=cfg.get("momentum", 0.0))
    else:
        opt = keras.optimizers.Adam(learning_rate)
    if cfg.get("precision") == "float16":
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def precision_policy(cfg: dict[str, Any]) -> str:
    """Keras dtype policy: mixed precision only where GPUs make it pay."""
    mode = cfg.get("mixed_precision", "auto")
    if mode == "auto":
        mode = "bfloat16" if cfg.get("gpus_per_worker", 0) > 0 else "off"
    return {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[mode]


def file_sha256(path: str) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(directory: str, model, optimizer, state: dict[str, Any]) -> None:
    model.save_weights(os.path.join(directory, CHECKPOINT_WEIGHTS))
    np.savez(os.path.join(directory, CHECKPOINT_OPTIMIZER), *[np.asarray(v) for v in optimizer.variables])
    # state.json last, with the other files' hashes: a checkpoint is complete and intact
    # exactly when its state file exists and the hashes match.
    digests = {n: file_sha256(os.path.join(directory, n)) for n in (CHECKPOINT_WEIGHTS, CHECKPOINT_OPTIMIZER)}
    with open(os.path.join(directory, CHECKPOINT_STATE), "w") as f:
        json.dump({**state, "sha256": digests}, f)


def load_checkpoint(directory: str, model, optimizer) -> dict[str, Any]:
    """Restore weights and optimizer state; raises ValueError for an incomplete checkpoint."""
    missing = [
        n
        for n in (CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, CHECKPOINT_OPTIMIZER)
        if not os.path.exists(os.path.join(directory, n))
    ]
    if missing:
        raise ValueError(f"checkpoint {directory} is incomplete: missing {missing}")
    with open(os.path.join(directory, CHECKPOINT_STATE)) as f:
        state = json.load(f)
    for name, digest in state.pop("sha256", {}).items():
        if file_sha256(os.path.join(directory, name)) != digest:
            raise ValueError(f"checkpoint {directory}: {name} does not match its recorded sha256 (corrupt or partial)")
    model.load_weights(os.path.join(directory, CHECKPOINT_WEIGHTS))
    with np.load(os.path.join(directory, CHECKPOINT_OPTIMIZER)) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(optimizer.variables):
        raise ValueError(f"checkpoint has {len(values)} optimizer variables, model needs {len(optimizer.variables)}")
    for var, value in zip(optimizer.variables, values):
        var.assign(value)
    return state


def restore(checkpoint, model, optimizer, rank: int) -> dict[str, Any]:
    """Load the latest checkpoint; if it is corrupt or partial, the newest older one that loads.

    Ray Train hands over only the latest checkpoint; its siblings (``num_to_keep``) sit
    next to it in the run's storage. Every rank walks the same list, so all agree.
    """
    import pyarrow.fs as pafs
    import ray.train

    fs, latest = checkpoint.filesystem, checkpoint.path
    parent = os.path.dirname(latest.rstrip("/"))
    siblings = [
        info.path
        for info in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        if info.type == pafs.FileType.Directory
        and os.path.basename(info.path).startswith("checkpoint_")
        and info.path.rstrip("/") != latest.rstrip("/")
    ]
    problems = []
    for path in [latest, *sorted(siblings, reverse=True)]:
        try:
            with ray.train.Checkpoint(path, filesystem=fs).as_directory() as d:
                state = load_checkpoint(d, model, optimizer)
        except Exception as exc:  # h5py, zipfile and json each raise their own kind
            problems.append(f"{path}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if rank == 0:
            for problem in problems:
                print(f"[raysegment] skipped unreadable checkpoint {problem}", flush=True)
            print(f"[raysegment] resumed from epoch {state['epoch']} ({path})", flush=True)
        return state
    raise RuntimeError("no readable checkpoint to resume from: " + "; ".join(problems))


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; rank 0 writes checkpoints."""
    _set_threads(cfg["cpus_per_worker"])
    import keras  # Keras 3: never tf.keras, which Ray maps to tf_keras in workers
    import ray.train
    import tensorflow as tf

    from raysegment.models.losses import make_loss, probabilities
    from raysegment.models.metrics import confusion_matrix, metrics_from_confusion

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    keras.utils.set_random_seed(cfg["seed"])
    keras.mixed_precision.set_global_policy(precision_policy(cfg))
    # Pack gradients into few large all-reduces: one collective per variable costs a
    # network round trip each, which dominates small models on CPU clusters.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=32 * 2**20)
    )
    batch = cfg["batch_size"]
    global_batch = batch * world
    steps = cfg["train_count"] // global_batch
    if cfg.get("max_steps"):
        steps = min(steps, cfg["max_steps"])
    num_classes = cfg["num_classes"]
    loss_fn = make_loss(cfg.get("loss", "ce"), cfg.get("class_weights"))

    with strategy.scope():
        model = build_model(cfg)
        peak = scaled_learning_rate(cfg["learning_rate"], global_batch)
        optimizer = make_optimizer(cfg, learning_rate_schedule(cfg, peak, steps))
        optimizer.build(model.trainable_variables)

    state: dict[str, Any] = {"epoch": -1, "best_val_mean_iou": -1.0, "best_epoch": -1, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = restore(checkpoint, model, optimizer, rank)

    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    @tf.function
    def train_step(images, masks):
        def step_fn(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_sum(loss_fn(y, logits)) / global_batch
                scaled_loss = optimizer.scale_loss(loss) if scaled else loss
            grads = tape.gradient(scaled_loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step_fn, args=(images, masks)), axis=None)

    @tf.function
    def predict(images):
        return tf.argmax(probabilities(model(images, training=False)), axis=-1, output_type=tf.int32)

    def all_reduce_sum(array: np.ndarray) -> np.ndarray:
        local = tf.constant(array, tf.float64)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(local)), axis=None).numpy()

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(state["epoch"] + 1, cfg["epochs"]):
        t0 = time.time()
        losses = []
        # Every worker runs exactly `steps` steps (collectives hang otherwise); rows past
        # that are drained, so each epoch still consumes the whole streaming split.
        # Two batches in flight so decoding the next overlaps this step; losses stay tensors
        # until the epoch ends (no host sync per step).
        batches = train_shard.iter_batches(batch_size=batch, drop_last=True, batch_format="numpy", prefetch_batches=2)
        for i, b in enumerate(batches):
            if i < steps:
                losses.append(train_step(tf.constant(b["image"]), tf.constant(b["mask"])))
        if len(losses) < steps:
            raise RuntimeError(f"rank {rank}: shard gave {len(losses)} batches, expected {steps}")
        train_seconds = time.time() - t0

        cm = np.zeros((num_classes, num_classes), np.float64)
        for b in val_shard.iter_batches(batch_size=batch, batch_format="numpy"):
            cm += confusion_matrix(b["mask"], predict(tf.constant(b["image"])).numpy(), num_classes)
        cm = all_reduce_sum(cm)
        val = metrics_from_confusion(cm, cfg["class_names"])
        improved = val["mean_iou"] > state["best_val_mean_iou"]
        if improved:
            state["best_val_mean_iou"], state["best_epoch"] = val["mean_iou"], epoch
        lr = optimizer.learning_rate
        metrics = {
            "epoch": epoch,
            "train_loss": float(np.mean([float(x) for x in losses])),
            "val_pixel_accuracy": val["pixel_accuracy"],
            "val_mean_iou": val["mean_iou"],
            "val_mean_dice": val["mean_dice"],
            "learning_rate": float(lr.numpy() if hasattr(lr, "numpy") else lr),
            "images_per_second": steps * global_batch / max(train_seconds, 1e-9),
            "epoch_seconds": time.time() - t0,
        }
        state["epoch"] = epoch
        state["history"] = state["history"] + [metrics]
        state["confusion_matrix"] = cm.astype(np.int64).tolist()
        stop = cfg.get("patience") and epoch - state["best_epoch"] >= cfg["patience"]
        state["stopped_early"] = bool(stop)
        if rank == 0:
            eta = (cfg["epochs"] - epoch - 1) * metrics["epoch_seconds"]
            print(
                f"[raysegment] epoch {epoch + 1}/{cfg['epochs']}  loss {metrics['train_loss']:.4f}  "
                f"val mIoU {val['mean_iou']:.4f}  pixel acc {val['pixel_accuracy']:.4f}  "
                f"{metrics['images_per_second']:.1f} img/s  ETA {eta:.0f}s",
                flush=True,
            )
        # Every rank reports (it is a barrier); only rank 0 uploads the checkpoint.
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(d, model, optimizer, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        if stop:
            if rank == 0:
                print(f"[raysegment] early stop: no val mIoU gain for {cfg['patience']} epochs", flush=True)
            break
