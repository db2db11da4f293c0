"""`raysegment bench train`: the Ray Train loop against a plain single-process Keras loop, and its scaling.

Same model, loss, optimizer, global batch, image size, normalisation and augmentation on both
sides, same machine, back to back in one run. The settings are the training plan's
(`raysegment plan`) for the bench's synthetic data set: grey shapes by default, whose plan is the
microscopy one (flips, 90-degree turns, scale jitter, any-angle turns and elastic warps, brightness,
contrast, gamma, noise, clipped z-score); `--data rgb` gives the colour plan (flips, turns, scale
jitter, brightness, contrast). Ray Data's CPU tasks do that work for Ray Train (`data/pipeline.py`);
the baseline does the same in tf.data (`baseline_dataset`).

Throughput is steady state: the first epoch (graph tracing, worker start-up) is left out of every
run. Scaling compares N workers with cores/N CPUs each against one worker given cores/N: for that
run the local Ray node (every thread of every process) is pinned to cores/N cores, so the one
worker's data feed cannot borrow the idle cores; each of the N workers and its feed share the
same per-worker batch.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from raysegment.config import PrepareSpec, TrainSpec
from raysegment.data import synthetic

if TYPE_CHECKING:
    import tensorflow as tf

    from raysegment.data.examples import Augmentation
    from raysegment.plan import Plan
    from raysegment.train.config import TrainConfig

# grey: the plan's microscopy augmentation (warps, gamma, noise); rgb: the colour photographs' one.
DATA_KINDS = ("grey", "rgb")
SCALING_TARGET = 0.9  # N workers should reach this share of N times one worker's images/s
OVERHEAD_TARGET = 0.05  # Ray Train with one worker within this of plain Keras at equal cores


def write_source(root: str, count: int, size: int, kind: str) -> None:
    """The synthetic pairs as root/images/NNNNN.png and root/masks/NNNNN.png; grey images for `grey`."""
    if kind == "rgb":
        synthetic.write_pairs(root, count, size=size)
        return
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    for i in range(count):
        img, mask = synthetic.make_example(i, size)
        Image.fromarray(img).convert("L").save(os.path.join(root, "images", f"{i:05d}.png"))
        Image.fromarray(mask).save(os.path.join(root, "masks", f"{i:05d}.png"))


def bench_plan(data_dir: str, image_size: int, depth: int, base_filters: int, global_batch: int, epochs: int) -> Plan:
    """The plan `raysegment plan` makes for the data set on one worker, with the bench's model and batch given."""
    from raysegment import plan as planning
    from raysegment.data.manifest import read_manifest

    loc, manifest = read_manifest(data_dir)
    spec = TrainSpec(
        data=data_dir,
        out=data_dir,  # not written: the plan only reads the data set
        workers=1,
        image_size=image_size,
        depth=depth,
        base_filters=base_filters,
        batch_size=global_batch,
        epochs=epochs,
    )
    return planning.plan_for_spec(spec, loc, manifest)


# --- the plain Keras baseline: tf.data does what the Ray Data tasks do -------------------------------


def _geometry(size: int, aug: Augmentation | None):
    """(encoded image, encoded mask) -> (float32 image SxSxC, uint8 mask SxS): decode, window, flips, turns."""
    import tensorflow as tf

    from raysegment.data import augment as ops
    from raysegment.data.examples import FLIP_AXES
    from raysegment.data.imaging import IGNORE_INDEX

    def warp(img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The Ray Data task's own numpy function (`examples.fit_example` -> `augment.warp`).
        rng = np.random.default_rng()
        scale = float(rng.uniform(1.0 - aug.scale_jitter, 1.0 + aug.scale_jitter)) if aug.scale_jitter else 1.0
        return ops.warp(img, mask, size, rng, scale, aug.rotate, aug.elastic)

    def resize(img: tf.Tensor, mask: tf.Tensor, side: Any) -> tuple[tf.Tensor, tf.Tensor]:
        # `imaging.resize_image` / `resize_mask`: bilinear to uint8 and nearest, only where the size differs.
        def resized() -> tuple[tf.Tensor, tf.Tensor]:
            pixels = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(img, (side, side))), 0, 255), tf.uint8)
            return pixels, tf.image.resize(mask, (side, side), method="nearest")

        same = tf.logical_and(tf.shape(img)[0] == side, tf.shape(img)[1] == side)
        return tf.cond(same, lambda: (img, mask), resized)

    def crop_or_pad(img: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # `examples._crop_or_pad`: a random SxS window where larger, random padding (mask: ignore) where smaller.
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        top = tf.random.uniform([], 0, tf.maximum(h - size, 0) + 1, tf.int32)
        left = tf.random.uniform([], 0, tf.maximum(w - size, 0) + 1, tf.int32)
        img = img[top : top + tf.minimum(h, size), left : left + tf.minimum(w, size)]
        mask = mask[top : top + tf.minimum(h, size), left : left + tf.minimum(w, size)]
        ph, pw = tf.maximum(size - h, 0), tf.maximum(size - w, 0)
        before_h = tf.random.uniform([], 0, ph + 1, tf.int32)
        before_w = tf.random.uniform([], 0, pw + 1, tf.int32)
        pads = [[before_h, ph - before_h], [before_w, pw - before_w], [0, 0]]
        return tf.pad(img, pads), tf.pad(mask, pads, constant_values=IGNORE_INDEX)

    def geometry(encoded_img: tf.Tensor, encoded_mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        img = tf.io.decode_png(encoded_img, channels=3)  # grey repeated to 3 channels, as `imaging.decode_image`
        mask = tf.io.decode_png(encoded_mask, channels=1)
        if aug is None:
            img, mask = resize(img, mask, size)
        elif aug.warps:
            img, mask = resize(img, mask, size)
            img, mask = tf.numpy_function(warp, [img, mask[..., 0]], [tf.float32, tf.uint8], stateful=True)
            img.set_shape([size, size, 3])
            mask = tf.ensure_shape(mask, [size, size])[..., None]
        else:
            scale = tf.random.uniform([], 1.0 - aug.scale_jitter, 1.0 + aug.scale_jitter)
            side = tf.maximum(1, tf.cast(tf.round(size * scale), tf.int32))
            img, mask = crop_or_pad(*resize(img, mask, side))
        if aug is not None:
            for axis in FLIP_AXES[aug.flip]:
                flip = tf.random.uniform([]) < 0.5
                img = tf.cond(flip, lambda i=img, a=axis: tf.reverse(i, [a]), lambda i=img: i)
                mask = tf.cond(flip, lambda m=mask, a=axis: tf.reverse(m, [a]), lambda m=mask: m)
            if aug.rotate90:
                k = tf.random.uniform([], 0, 4, tf.int32)
                img, mask = tf.image.rot90(img, k), tf.image.rot90(mask, k)
        return tf.ensure_shape(tf.cast(img, tf.float32), [size, size, 3]), tf.ensure_shape(mask[..., 0], [size, size])

    return geometry


def _photometric(norm: Any, aug: Augmentation | None):
    """A batch of float32 pixels -> the model's input: `card.normalize` (clip, affine), then
    `augment.intensity` (contrast, brightness, gamma, noise, per-image factors; clipped to the data range)."""
    import tensorflow as tf

    from raysegment.data.examples import data_range

    scale, offset = (tf.constant(v, tf.float32) for v in norm.pixel_affine)
    bounds = None if norm.pixel_clip is None else [tf.constant(v, tf.float32) for v in norm.pixel_clip]
    low, high, clip = data_range(norm)
    span = tf.constant(high - low, tf.float32)

    def photometric(x: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if bounds is not None:
            x = tf.clip_by_value(x, bounds[0], bounds[1])
        x = x * scale + offset
        if aug is None or not (aug.contrast or aug.brightness or aug.gamma or aug.noise):
            return x, mask
        per_image = tf.stack([tf.shape(x)[0], 1, 1, 1])
        if aug.contrast:
            mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
            x = (x - mean) * tf.random.uniform(per_image, 1.0 - aug.contrast, 1.0 + aug.contrast) + mean
        if aug.brightness:
            x = x + tf.random.uniform(per_image, -aug.brightness, aug.brightness) * span
        if aug.gamma:
            lo = tf.reduce_min(x, axis=[1, 2, 3], keepdims=True)
            width = tf.maximum(tf.reduce_max(x, axis=[1, 2, 3], keepdims=True) - lo, 1e-6)
            g = float(np.log1p(aug.gamma))
            x = lo + width * tf.pow(tf.maximum((x - lo) / width, 0.0), tf.exp(tf.random.uniform(per_image, -g, g)))
        if aug.noise:
            x = x + tf.random.normal(tf.shape(x)) * tf.random.uniform(per_image, 0.0, aug.noise) * span
        if clip:
            x = tf.clip_by_value(x, low, high)
        return x, mask

    return photometric


def baseline_dataset(
    images: list[bytes], masks: list[bytes], size: int, batch: int, aug: Augmentation | None, norm: Any, repeat: int = 1
) -> tf.data.Dataset:
    """The Keras-example input pipeline with raysegment's augmentation: decode, window, flips and turns per
    image, then normalise and intensity jitter per batch, `num_parallel_calls=AUTOTUNE` throughout.

    Ops with a TensorFlow equivalent are TF ops (decode_png, resize, crop/pad, reverse, rot90, the
    normalisation and intensity arithmetic); the warp (any-angle turn, scale and elastic field sampled with
    scipy's map_coordinates) calls the very numpy function the Ray Data task calls (`augment.warp`) through
    `tf.numpy_function`: the same arithmetic at the same cost.
    """
    import tensorflow as tf

    if aug is not None and (aug.crop != "resize" or aug.oversample):
        raise ValueError(f"the baseline does crop=resize without oversampling; the plan has {aug}")
    return (
        tf.data.Dataset.from_tensor_slices((images, masks))
        .repeat(repeat)  # `--repeat`: passes over the split per epoch, as `pipeline.read_split`
        .map(_geometry(size, aug), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch, drop_remainder=True)
        .map(_photometric(norm, aug), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def _load_encoded(data_dir: str) -> tuple[list[bytes], list[bytes]]:
    """The train split's encoded images and masks, as a plain script would read its files: the shards the
    manifest lists (`shards/` may hold others: a previous generation's, while an --overwrite runs)."""
    import pyarrow.parquet as pq

    from raysegment.data.manifest import read_manifest

    _, manifest = read_manifest(data_dir)
    images, masks = [], []
    for shard in manifest.split_shards("train"):
        table = pq.read_table(os.path.join(data_dir, shard.path), columns=["image", "mask"])
        images += table.column("image").to_pylist()
        masks += table.column("mask").to_pylist()
    return images, masks


def set_tf_threads(cpus: int) -> dict[str, int]:
    """This process's TF thread pools as a Ray Train worker with `cpus` CPUs sets its own (`train.loop`);
    only possible before TF's runtime starts, so the pools in use are returned either way."""
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(max(1, cpus))
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cpus)))
    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def plain_keras(data_dir: str, cfg: TrainConfig, aug: Augmentation | None, epochs: int, repeat: int = 1) -> float:
    """Steady-state images/s of a Keras-example loop in this process: tf.data (`baseline_dataset`) + model.fit,
    with the workers' model, loss (summed per example over the global batch, as Keras' mean is), optimizer
    and learning-rate schedule."""
    import keras

    from raysegment.models.losses import make_loss
    from raysegment.train.optim import make_optimizer

    images, masks = _load_encoded(data_dir)
    ds = baseline_dataset(images, masks, cfg.image_size, cfg.global_batch, aug, cfg.model_input, repeat)
    n = (len(images) * repeat // cfg.global_batch) * cfg.global_batch
    keras.mixed_precision.set_global_policy(cfg.dtype_policy)
    model = cfg.model.build()
    # No XLA: the workers' step is a plain tf.function (Keras' "auto" is off on CPU too).
    model.compile(optimizer=make_optimizer(cfg), loss=make_loss(cfg.loss, cfg.class_weights), jit_compile=False)
    model.fit(ds, epochs=1, verbose=0)  # tracing and warm-up
    t0 = time.perf_counter()
    model.fit(ds, epochs=epochs - 1, verbose=0)
    return n * (epochs - 1) / (time.perf_counter() - t0)


# --- Ray Train ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Iterator[bool]:
    """Every thread of this process and of its descendants (a local Ray node: GCS, raylet, workers, and
    the processes it starts meanwhile, which inherit it) on `cpus`; all cores again afterwards. Yields
    False, pinning nothing, when Ray is a joined cluster (RAY_ADDRESS): its processes are not ours."""
    import psutil

    def pin(cores: set[int]) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error, OSError):
                for thread in proc.threads():
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(thread.id, cores)

    if os.environ.get("RAY_ADDRESS"):
        yield False
        return
    everything = os.sched_getaffinity(0)
    pin(cpus)
    try:
        yield True
    finally:
        pin(everything)


def ray_train(spec: TrainSpec, epochs_ips: dict[str, list[float]]) -> float:
    """Steady-state images/s of raysegment's Ray Train loop (epochs after the first); every epoch's
    figure, the first included, goes to `epochs_ips` under the run's name (its out folder's).

    Each epoch's time includes Ray Data reading, decoding and augmenting the shards afresh, as
    the baseline's tf.data pipeline does.
    """
    from raysegment.train.trainer import train

    train(spec)
    with open(os.path.join(spec.out, "history.csv")) as f:
        ips = [float(r["images_per_second"]) for r in csv.DictReader(f)]
    epochs_ips[os.path.basename(spec.out)] = [round(x, 2) for x in ips]
    return float(np.mean(ips[1:]))


def bench_train(
    images: int,
    image_size: int,
    depth: int,
    base_filters: int,
    global_batch: int,
    epochs: int,
    workers: int,
    data: str = "grey",
) -> dict[str, Any]:
    """Plain Keras vs Ray Train with 1 worker on all cores (equal cores); N workers with cores/N CPUs each
    vs one worker given cores/N (scaling)."""
    from raysegment import plan as planning
    from raysegment.data.examples import Augmentation
    from raysegment.data.manifest import read_manifest
    from raysegment.data.prepare import prepare
    from raysegment.train.config import rare_classes, train_config

    if global_batch % workers:
        raise ValueError(f"--global-batch {global_batch} is not a multiple of --workers {workers}")
    cores = os.cpu_count() or 1
    share = max(1, cores // workers)
    threads = set_tf_threads(cores)  # before anything here starts TF's runtime
    with tempfile.TemporaryDirectory() as root:
        write_source(os.path.join(root, "src"), images, image_size, data)
        data_dir = os.path.join(root, "data")
        prepare(PrepareSpec(source=os.path.join(root, "src"), dest=data_dir, val_fraction=0.1, shard_size_mb=1))
        plan = bench_plan(data_dir, image_size, depth, base_filters, global_batch, epochs)
        # The plan's values, trained as written (plan: false) with these workers, CPUs and per-worker batch.
        planned = plan.train_values()

        def spec(name: str, count: int, cpus: float, batch: int) -> TrainSpec:
            values = {**planned, "workers": count, "cpus_per_worker": cpus, "batch_size": batch}
            return TrainSpec(data=data_dir, out=os.path.join(root, name), resume=False, plan=False, **values)

        one_spec = spec("one", 1, float(cores), global_batch)
        loc, manifest = read_manifest(data_dir)
        fingerprint = planning.read_fingerprint(loc, manifest)
        # The baseline trains the model, loss, optimizer and schedule of the 1-worker run, on the same global batch.
        cfg = train_config(one_spec, manifest, data_dir, fingerprint=fingerprint)
        aug = Augmentation.from_spec(one_spec, rare_classes(manifest))
        # The baseline runs before and after the Ray runs and its better figure counts: on a
        # shared machine a slow spell must not flatter raysegment.
        plain_before = plain_keras(data_dir, cfg, aug, epochs, one_spec.repeat)
        epochs_ips: dict[str, list[float]] = {}
        one = ray_train(one_spec, epochs_ips)
        with pinned(set(sorted(os.sched_getaffinity(0))[:share])) as was_pinned:
            one_share = ray_train(spec("one_share", 1, float(share), global_batch // workers), epochs_ips)
        many = ray_train(spec("many", workers, float(share), global_batch // workers), epochs_ips)
        plain_after = plain_keras(data_dir, cfg, aug, epochs, one_spec.repeat)
    plain = max(plain_before, plain_after)
    scaling = many / one_share
    return {
        "images": images,
        "image_size": image_size,
        "data": data,
        "model": {"depth": depth, "base_filters": base_filters},
        "loss": cfg.loss,
        "normalization": cfg.model_input.normalization,
        "augmentation": None if aug is None else dataclasses.asdict(aug),
        "plan_reasons": {k: plan.reasons[k] for k in ("augment", "warp", "jitter") if k in plan.reasons},
        "global_batch": global_batch,
        "epochs_timed": epochs - 1,
        "cores": cores,
        "plain_keras_threads": threads,
        "plain_keras_ips": round(plain, 2),
        "plain_keras_runs_ips": [round(plain_before, 2), round(plain_after, 2)],
        "ray_train_1_worker_ips": round(one, 2),
        "ratio_1_worker_vs_plain": round(one / plain, 3),
        "overhead_equal_cores": round(1 - one / plain, 3),
        "overhead_target_met": one >= (1 - OVERHEAD_TARGET) * plain,
        "workers": workers,
        "cpus_per_worker": share,
        "per_worker_batch": global_batch // workers,
        "pinned": was_pinned,
        "ray_train_1_worker_share_ips": round(one_share, 2),
        f"ray_train_{workers}_workers_ips": round(many, 2),
        f"ratio_{workers}_workers_vs_plain": round(many / plain, 3),
        f"scaling_{workers}_workers_vs_1": round(scaling, 3),
        "scaling_target": round(SCALING_TARGET * workers, 2),
        "scaling_target_met": scaling >= SCALING_TARGET * workers,
        "ray_train_epochs_ips": epochs_ips,  # per run, the untimed first epoch included
    }
