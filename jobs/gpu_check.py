"""Not a Ray job: issue #15's GPU check, for a GPU machine with Keras 3 on JAX (or torch) but no TensorFlow or Ray
(the one lent to this project had neither, nor a network to fetch them). It runs raysegment's own U-Net
(`models/unet.py`) and per-example training input (`data/examples.py`: window, augmentation, normalisation) without
raysegment's Ray Train loop. Besides Keras it needs numpy, scipy, Pillow and pydantic (carry them as wheels):

A: per-GPU training images/s of the 1-GPU ISBI plan's model (`raysegment plan DATA --workers 1 --gpus-per-worker 1`:
   depth 5, base 32, 16 whole 512 px slices a batch), float32 and mixed_bfloat16.
B: ISBI with that plan (flips, turns, any-angle turns, elastic 8 px, scale 0.2, brightness and contrast 0.1, gamma
   0.3, noise 0.03, clipped z-score, CE, Adam 2e-3 = 1e-3 x 16/8 with warm-up and cosine, bfloat16) for TRAIN_S
   seconds; val = slices 24..29, pixel accuracy of the argmax (as `evaluate`), checked every 30 s.

    KERAS_BACKEND=jax ISBI=../shared/datasets/isbi2012-membrane TRAIN_S=230 PYTHONPATH=. python jobs/gpu_check.py

Prints one `RESULT {json}` line and writes it to $OUT/gpucheck.json.
"""

import json
import math
import multiprocessing as mp
import os
import sys
import time

import numpy as np
from PIL import Image

from raysegment.data.examples import Augmentation, fit_example, photometric
from raysegment.models.card import InputSpec, PixelStats, normalize

ROOT = os.environ.get("ISBI", "../shared/datasets/isbi2012-membrane")
SIZE = int(os.environ.get("SIZE", 512))
BATCH = int(os.environ.get("BATCH", 16))
BASE = int(os.environ.get("BASE", 32))
DEPTH = int(os.environ.get("DEPTH", 5))
TRAIN_S = float(os.environ.get("TRAIN_S", 300))
BENCH_STEPS = int(os.environ.get("BENCH_STEPS", 30))
OUT = os.environ.get("OUT", "/tmp")
IGNORE = 255


def load(keys):
    imgs = [np.asarray(Image.open(f"{ROOT}/image/{k}.png"), np.float32) for k in keys]
    masks = [(np.asarray(Image.open(f"{ROOT}/label/{k}.png")) > 127).astype(np.uint8) for k in keys]
    return np.stack(imgs), np.stack(masks)


TRAIN_X, TRAIN_Y = load(range(24))
VAL_X, VAL_Y = load(range(24, 30))
LOW, HIGH = np.percentile(TRAIN_X, (0.5, 99.5))
MEAN, STD = float(TRAIN_X.mean()), float(TRAIN_X.std())
# The plan's input (clipped z-score from the training slices' statistics) and augmentation, as `train` builds them.
SPEC = InputSpec(
    size=(SIZE, SIZE),
    channels=1,
    normalization="zscore_clipped",
    stats=PixelStats(mean=(MEAN,), std=(STD,), low=(float(LOW),), high=(float(HIGH),)),
)
AUG = Augmentation(
    crop="resize",  # at 512 px the whole slice: no resize, one warp
    flip="both",
    rotate90=True,
    scale_jitter=0.2,
    brightness=0.1,
    contrast=0.1,
    rotate=180.0,
    elastic=8.0 * SIZE / 512,
    gamma=0.3,
    noise=0.03,
)


def batch(seed):
    """One augmented batch through raysegment's own per-example code (`data/examples.py`: `fit_example`, then
    `normalize` and `photometric`, as `decode_for_training` does after decoding)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(BATCH):
        i = int(rng.integers(len(TRAIN_X)))
        img, mask = fit_example(TRAIN_X[i][..., None], TRAIN_Y[i], SIZE, AUG, rng)
        xs.append(img)
        ys.append(mask)
    x = photometric(normalize(np.stack(xs), SPEC), AUG, rng, SPEC)
    return x.astype(np.float32), np.stack(ys).astype(np.int32)


def main():
    pool = mp.get_context("fork").Pool(max(1, (os.cpu_count() or 2) - 2))  # before JAX starts its threads
    import keras

    from raysegment.models.unet import build_unet

    print(f"keras {keras.__version__} backend {keras.backend.backend()}", flush=True)
    if keras.backend.backend() == "jax":
        import jax

        print("devices", jax.devices(), flush=True)
    results = {"backend": keras.backend.backend(), "size": SIZE, "batch": BATCH, "base": BASE, "depth": DEPTH}

    def make(policy, lr=2e-3):
        keras.mixed_precision.set_global_policy(policy)
        model = build_unet(2, depth=DEPTH, base_filters=BASE, input_channels=1)
        opt = keras.optimizers.Adam(lr)
        if policy == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=IGNORE))
        return model

    # A: steady-state images/s on one fixed batch, after warm-up steps (compilation).
    x, y = batch(0)
    for policy in ("float32", "mixed_bfloat16"):
        model = make(policy)
        for _ in range(3):
            loss = model.train_on_batch(x, y)
        float(loss)
        t0 = time.perf_counter()
        for _ in range(BENCH_STEPS):
            loss = model.train_on_batch(x, y)
        float(loss)
        dt = time.perf_counter() - t0
        rate = BENCH_STEPS * BATCH / dt
        results[f"images_per_s_{policy}"] = round(rate, 1)
        print(
            f"A {policy}: {rate:.1f} images/s ({SIZE} px, batch {BATCH}), {dt / BENCH_STEPS * 1000:.1f} ms a step",
            flush=True,
        )
    results["bf16_speedup"] = round(results["images_per_s_mixed_bfloat16"] / results["images_per_s_float32"], 3)

    # B: ISBI with the 1-GPU plan for TRAIN_S seconds.
    model = make("mixed_bfloat16")
    peak = 2e-3
    feed = pool.imap(batch, range(1, 10**9), chunksize=1)
    t0 = time.perf_counter()
    # Steps 10..40 (after compilation), at the warm-up's first rate, measure the pace; the schedule then fits TRAIN_S.
    step, total, warmup, at_10 = 0, None, None, 0.0
    history, best = [], (0.0, 0)
    val_x = normalize(VAL_X[..., None], SPEC)
    train_eval_x = normalize(TRAIN_X[..., None], SPEC)
    next_eval = 30.0
    wait = 0.0
    while True:
        tw = time.perf_counter()
        xb, yb = next(feed)
        wait += time.perf_counter() - tw
        if total is None:
            lr = peak / 10
        elif step < warmup:
            lr = peak / 10 + (peak - peak / 10) * step / warmup
        else:
            lr = 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        model.optimizer.learning_rate.assign(lr)
        loss = float(model.train_on_batch(xb, yb))
        step += 1
        elapsed = time.perf_counter() - t0
        if step == 40 and total is None:
            pace = (elapsed - at_10) / 30
            total = int(TRAIN_S / pace)
            warmup = max(50, total // 25)
            print(f"B pace {pace * 1000:.1f} ms a step: {total} steps in {TRAIN_S:.0f} s, warm-up {warmup}", flush=True)
        if step == 10:
            at_10 = elapsed
        if (total and step >= total) or (elapsed >= next_eval):
            pred = np.argmax(model.predict(val_x, batch_size=6, verbose=0), -1)
            acc = float((pred == VAL_Y).mean())
            history.append(
                {"step": step, "s": round(elapsed, 1), "loss": round(loss, 4), "val_acc": round(acc, 4), "lr": lr}
            )
            if acc > best[0]:
                best = (acc, step)
                model.save_weights("/tmp/best.weights.h5")
            print(
                f"B step {step} {elapsed:.0f}s loss {loss:.4f} val pixel accuracy {acc:.4f} (feed wait {wait:.0f}s)",
                flush=True,
            )
            next_eval = elapsed + 30.0
            if total and step >= total:
                break
    model.load_weights("/tmp/best.weights.h5")
    pred = np.argmax(model.predict(val_x, batch_size=6, verbose=0), -1)
    train_pred = np.argmax(model.predict(train_eval_x, batch_size=6, verbose=0), -1)
    # Flip TTA over the 8 symmetries of the square (the card's option), on the best weights.
    probs = 0
    for k in range(4):
        for flip in (False, True):
            v = np.rot90(val_x, k, axes=(1, 2))
            v = v[:, :, ::-1] if flip else v
            p = keras.ops.convert_to_numpy(keras.ops.softmax(model.predict(v, batch_size=6, verbose=0)))
            p = p[:, :, ::-1] if flip else p
            probs = probs + np.rot90(p, -k, axes=(1, 2))
    tta = float((np.argmax(probs, -1) == VAL_Y).mean())
    results.update(
        steps=step,
        windows=step * BATCH,
        train_s=round(time.perf_counter() - t0, 1),
        best_step=best[1],
        val_pixel_accuracy=round(float((pred == VAL_Y).mean()), 4),
        val_pixel_accuracy_tta8=round(tta, 4),
        train_slices_pixel_accuracy=round(float((train_pred == TRAIN_Y).mean()), 4),
        feed_wait_s=round(wait, 1),
        history=history,
    )
    print("RESULT " + json.dumps(results), flush=True)
    with open(f"{OUT}/gpucheck.json", "w") as f:
        json.dump(results, f, indent=1)
    pool.terminate()


if __name__ == "__main__":
    sys.exit(main())
