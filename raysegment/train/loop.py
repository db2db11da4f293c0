"""The per-worker training loop: build, resume, then per epoch train, validate, report.

Keras 3 model, MultiWorkerMirroredStrategy (TF's default strategy when one worker with at most one
GPU is the whole group), custom step. Why a custom step and not
``model.fit``: Keras 3's fit under MultiWorkerMirroredStrategy on a Ray dataset shard
fails (Ray #47464, Keras #20585). The step below sums per-example losses and divides
by the *global* batch; the optimizer all-reduces (sums) gradients over replicas, so
N workers with batch B take exactly the step one worker would take with batch N*B.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from raysegment.train.checkpoint import TrainState, out_of_budget, restore, save_checkpoint
from raysegment.train.config import TrainConfig
from raysegment.train.events import Poster
from raysegment.train.optim import current_learning_rate, learning_rate_schedule, make_optimizer, refit


@dataclass(frozen=True)
class Worker:
    """What `build` makes on one Ray Train worker; the later steps use it."""

    cfg: TrainConfig
    rank: int
    strategy: Any  # tf.distribute.MultiWorkerMirroredStrategy; TF's default strategy for one worker, one device
    model: Any  # keras.Model
    optimizer: Any  # keras.optimizers.Optimizer
    schedule: Any  # the optimizer's learning-rate schedule (`optim.refit` changes its length), or a float
    train_step: Callable[[Any, Any], Any]  # (images, masks) -> summed loss, one optimizer step
    predict: Callable[[Any], Any]  # images -> class ids
    all_reduce_sum: Callable[[Any], Any]  # a float64 tensor -> its sum over every worker (compiled)
    all_reduce_mean2: Callable[[Any], Any]  # two float64s -> their mean over every worker (compiled)
    poster: Poster | None  # rank 0's channel to the driver (progress, live tracking), when the driver follows


def train_loop_per_worker(cfg: TrainConfig, inbox: Any = None) -> None:
    """Runs on every Ray Train worker; rank 0 writes checkpoints and posts progress to `inbox` (an actor)."""
    import ray.train

    worker = build(cfg, inbox)
    state = resume(worker)
    if state.fitted_epochs:
        refit(worker.schedule, cfg, state.fitted_epochs)  # a resumed run starts from the length last fitted
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    run_first_epoch = state.epoch + 1  # this process's first epoch (a resumed run's too) pays the one-time costs
    # An epoch's time runs from where the last one's was taken: its budget decisions, checkpoint and report
    # are part of what each epoch costs (on a small data set 1.4 s to an epoch's 0.6: a 1-minute budget
    # ran 3.2x over when only training and validation counted).
    t0 = time.time()
    while more_epochs(state, cfg):
        epoch = state.epoch + 1
        started = time.time()
        train_loss, first_step_s = train_epoch(worker, train_shard, epoch)
        train_seconds = time.time() - started
        confusion = validate(worker, val_shard)
        ended = time.time()
        metrics = epoch_metrics(worker, epoch, train_loss, confusion, train_seconds, ended - t0)
        t0 = ended
        state = state.after_epoch(metrics, confusion, cfg.patience)
        total = state.fitted_epochs or cfg.epochs
        steady, first_fit = None, bool(cfg.time_budget_s) and state.fitted_epochs is None
        if first_fit:
            # The first epoch's measured time, not the plan's estimate, sets how many fit (the schedule follows).
            steady = steady_epoch_seconds(metrics["epoch_seconds"], train_seconds, first_step_s, cfg.steps_per_epoch)
        elif cfg.time_budget_s and not state.stopped_early:
            # Then the epochs since measure it better: while the first step was traced, the input pipeline
            # ran ahead, so the first epoch's other steps never waited for it (ISBI, 2 cores: 28.9 s
            # estimated, 35 s an epoch after; the cosine fitted to 82 epochs was cut at 68).
            steady = measured_epoch_seconds(state.history, run_first_epoch)
        if steady is not None:
            state = fit_to_budget(worker, state, steady)
            total = state.fitted_epochs
            if not state.stopped_early and epoch + 1 == total < cfg.epochs and not cfg.epochs_from_budget:
                state = state.stopped_at_budget()  # the given epochs do not fit: the budget ends training
        # And stop when another epoch as long as the last would end past the budget (the first's has its
        # one-time costs: the fit alone decides then).
        if not first_fit and not state.stopped_early and epoch + 1 < total and budget_spent(worker, state):
            state = state.stopped_at_budget()
        epoch_s = steady if steady is not None else metrics["epoch_seconds"]
        state, shown = epoch_end(state, total, epoch_s, cfg.time_budget_s)
        report(worker, state, shown)


def more_epochs(state: TrainState, cfg: TrainConfig) -> bool:
    """Whether another epoch is trained: not after the last (fitted, or given), nor once the run stopped early
    (patience, or the budget): a resume from the epoch that stopped it trained one more, past the stop."""
    return not state.stopped_early and state.epoch + 1 < (state.fitted_epochs or cfg.epochs)


def spent_seconds(state: TrainState) -> float:
    """The epochs' own time so far, resumed runs' included (what a time budget counts)."""
    return sum(row["epoch_seconds"] for row in state.history)


def epoch_end(
    state: TrainState, total: int, epoch_s: float, budget_s: float | None
) -> tuple[TrainState, dict[str, Any]]:
    """(the state with its last history row given `epochs`, history.csv's column: the run's length as now known;
    what the epoch reports: that row plus `eta_s`, the progress line's ETA). New dicts: the ETA once set on the
    row the history held went into checkpoints and `train --json`'s rows."""
    row = {**state.history[-1], "epochs": total}
    state = dataclasses.replace(state, history=[*state.history[:-1], row])
    eta = eta_seconds(total - row["epoch"] - 1, epoch_s, budget_s, spent_seconds(state))
    return state, {**row, "eta_s": eta}


def eta_seconds(epochs_left: int, epoch_s: float, budget_s: float | None, spent_s: float) -> float:
    """The time `epochs_left` more epochs of `epoch_s` take; with a time budget, at most the budget's rest (the
    first epoch's time holds its one-time costs: 10 more at its 19 s showed ETA 3m07s for a 1-minute budget)."""
    eta = max(epochs_left, 0) * epoch_s
    return min(eta, max(budget_s - spent_s, 0.0)) if budget_s else eta


def steady_epoch_seconds(epoch_s: float, train_s: float, first_step_s: float | None, steps: int) -> float:
    """An epoch's time without the one-time costs in the first step of a run (tracing the step, starting
    the input pipeline): the first step counted as long as the mean of the others."""
    if first_step_s is None or steps < 2:
        return epoch_s
    other = (train_s - first_step_s) / (steps - 1)
    return max(epoch_s - first_step_s + other, 1e-3)


def measured_epoch_seconds(history: list[dict[str, Any]], run_first_epoch: int) -> float | None:
    """The mean time of this run's epochs after its first (the last five at most: a machine's speed can
    change), or None before there is one."""
    times = [row["epoch_seconds"] for row in history if row["epoch"] > run_first_epoch][-5:]
    return sum(times) / len(times) if times else None


def fitted_epochs(budget_s: float, spent_s: float, epoch_s: float, done: int, cap: int | None) -> int:
    """Epochs to train in all: those done, plus as many `epoch_s`-long ones as end inside the budget; at
    most `cap` (given epochs), at least those done."""
    more = max(0, math.floor((budget_s - spent_s) / max(epoch_s, 1e-3)))
    fitted = min(done + more, 100_000)
    return max(done, min(fitted, cap) if cap else fitted)


def fit_to_budget(worker: Worker, state: TrainState, steady_s: float) -> TrainState:
    """Set the epochs that fit the budget from an epoch time (`steady_s`: the first epoch's without its
    one-time costs, later the measured mean; averaged over workers, so every rank decides the same) and
    re-fit the LR schedule to them when they change."""
    import tensorflow as tf

    cfg = worker.cfg
    mean = worker.all_reduce_mean2(tf.constant([spent_seconds(state), steady_s], tf.float64)).numpy()
    cap = None if cfg.epochs_from_budget else cfg.epochs
    epochs = fitted_epochs(cfg.time_budget_s or 0.0, float(mean[0]), float(mean[1]), state.epoch + 1, cap)
    if epochs == state.fitted_epochs:
        return state
    refit(worker.schedule, cfg, epochs)
    if worker.rank == 0 and state.fitted_epochs is None:
        print(
            f"[raysegment] the first epoch took {mean[0]:.1f} s ({mean[1]:.1f} s without one-time costs): "
            f"{epochs} epochs fit the {cfg.time_budget_s:g} s budget (planned {cfg.epochs})",
            flush=True,
        )
    elif worker.rank == 0:
        print(
            f"[raysegment] epochs take {mean[1]:.1f} s: {epochs} fit the budget (was {state.fitted_epochs})", flush=True
        )
    first_epoch_s = state.first_epoch_s if state.first_epoch_s is not None else round(float(mean[1]), 3)
    return dataclasses.replace(state, fitted_epochs=epochs, first_epoch_s=first_epoch_s)


def budget_spent(worker: Worker, state: TrainState) -> bool:
    """The time budget's rule: stop when another epoch as long as the last would end past it. Time is
    the epochs' own (train + validate, summed over the history, so resumed runs count what came before),
    averaged over the workers so every rank takes the same decision (a split one hangs the collectives)."""
    import tensorflow as tf

    budget = worker.cfg.time_budget_s
    if not budget:
        return False
    spent = spent_seconds(state)
    mean = worker.all_reduce_mean2(tf.constant([spent, state.history[-1]["epoch_seconds"]], tf.float64)).numpy()
    return out_of_budget(float(mean[0]), float(mean[1]), budget)


def _set_threads(cpus: float) -> None:
    import tensorflow as tf

    n = max(1, int(cpus))
    # Each worker owns `cpus` cores; TF's default of all cores per worker oversubscribes.
    tf.config.threading.set_intra_op_parallelism_threads(n)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, n)))


def build(cfg: TrainConfig, inbox: Any = None) -> Worker:
    """Strategy, model and optimizer (in the strategy's scope), and the compiled steps."""
    _set_threads(cfg.cpus_per_worker)  # before TensorFlow starts its runtime
    import keras  # Keras 3: never tf.keras, which Ray maps to tf_keras in workers
    import ray.train
    import tensorflow as tf

    ctx = ray.train.get_context()
    if ctx.get_world_size() != cfg.workers:
        raise RuntimeError(f"{ctx.get_world_size()} workers, but the config's steps are for {cfg.workers}")
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(cfg.dtype_policy)
    if cfg.workers == 1 and len(tf.config.list_logical_devices("GPU")) <= 1:
        # One replica: TF's default strategy, the same step without MultiWorkerMirroredStrategy's collective
        # runtime around it (bench train, 2 cores: 1.04 and 1.06x its images/s, two A/B pairs in one run).
        strategy = tf.distribute.get_strategy()
    else:
        # Pack gradients into few large all-reduces: one collective per variable costs a
        # network round trip each, which dominates small models on CPU clusters.
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=32 * 2**20)
        )
    # Outside the strategy's scope: the schedule's length is a plain local variable that every rank sets alike.
    schedule = learning_rate_schedule(cfg)
    with strategy.scope():
        model = cfg.model.build()
        optimizer = make_optimizer(cfg, schedule)
        optimizer.build(model.trainable_variables)
    rank = ctx.get_world_rank()
    return Worker(
        cfg,
        rank,
        strategy,
        model,
        optimizer,
        schedule,
        train_step=make_train_step(cfg, strategy, model, optimizer),
        predict=make_predict(model),
        all_reduce_sum=make_all_reduce_sum(strategy, [cfg.model.num_classes] * 2),
        all_reduce_mean2=make_all_reduce_sum(strategy, [2], mean=True),
        poster=Poster(inbox) if inbox is not None and rank == 0 else None,
    )


def make_train_step(cfg: TrainConfig, strategy, model, optimizer) -> Callable[[Any, Any], Any]:
    """One synchronous optimizer step over all replicas; returns the loss summed over them."""
    import tensorflow as tf

    from raysegment.models.losses import make_loss

    loss_fn = make_loss(cfg.loss, cfg.class_weights)
    global_batch = cfg.global_batch

    def step_fn(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_sum(loss_fn(y, logits)) / global_batch
            scaled_loss = optimizer.scale_loss(loss)  # the loss itself unless loss scaling is on
        grads = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(images, masks):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step_fn, args=(images, masks)), axis=None)

    return train_step


def make_predict(model) -> Callable[[Any], Any]:
    """Class ids from either head, compiled once."""
    import tensorflow as tf

    from raysegment.models.losses import probabilities

    @tf.function
    def predict(images):
        return tf.argmax(probabilities(model(images, training=False)), axis=-1, output_type=tf.int32)

    return predict


def make_all_reduce_sum(strategy, shape: list[int], mean: bool = False) -> Callable[[Any], Any]:
    """A float64 tensor's sum (or mean) over workers, compiled once (the confusion matrices; the time spent):
    run eagerly, the collective is slow and TF warns about it every epoch."""
    import tensorflow as tf

    op = tf.distribute.ReduceOp.MEAN if mean else tf.distribute.ReduceOp.SUM

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float64)])
    def all_reduce(local):
        return strategy.reduce(op, strategy.run(tf.identity, args=(local,)), axis=None)

    return all_reduce


def resume(worker: Worker) -> TrainState:
    """The state of the latest readable checkpoint, loaded into the model and optimizer; else a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    state = restore(checkpoint, worker.model, worker.optimizer)
    if worker.poster is not None:
        # The driver notes the restore at once; live tracking logs the epochs it has not seen (a re-run).
        worker.poster.resumed(state.history, state.resumes[-1])
    return state


def train_epoch(worker: Worker, shard, epoch: int) -> tuple[float, float | None]:
    """Exactly `steps_per_epoch` steps on this worker's shard; (the mean loss, the seconds to the end of the
    first step when this is the run's first epoch with a budget to fit, else None)."""
    import tensorflow as tf

    steps = worker.cfg.steps_per_epoch
    t0 = time.time()
    first_step_s = None
    timed = worker.cfg.time_budget_s is not None
    losses = []
    # Every worker runs exactly `steps` steps (collectives hang otherwise); rows past
    # that are drained, so each epoch still consumes the whole streaming split.
    # Two batches in flight so decoding the next overlaps this step; losses stay tensors
    # until the epoch ends (no host sync per step).
    batches = shard.iter_batches(
        batch_size=worker.cfg.batch_size, drop_last=True, batch_format="numpy", prefetch_batches=2
    )
    if worker.poster is not None:
        worker.poster.step(epoch, 0, steps)
    for i, b in enumerate(batches):
        if i < steps:
            losses.append(worker.train_step(tf.constant(b["image"]), tf.constant(b["mask"])))
            if timed and i == 0 and first_step_s is None:
                float(losses[0])  # wait for it: the one host sync of the epoch, to time the one-time costs
                first_step_s = time.time() - t0
            if worker.poster is not None:
                worker.poster.step(epoch, i + 1, steps, losses[-1])
    if len(losses) < steps:
        raise RuntimeError(f"rank {worker.rank}: shard gave {len(losses)} batches, expected {steps}")
    return float(np.mean([float(x) for x in losses])), first_step_s


def validate(worker: Worker, shard) -> np.ndarray:
    """The confusion matrix over every worker's share of the val split."""
    import tensorflow as tf

    from raysegment.models.metrics import confusion_matrix

    n = worker.cfg.model.num_classes
    cm = np.zeros((n, n), np.float64)
    for b in shard.iter_batches(batch_size=worker.cfg.batch_size, batch_format="numpy"):
        cm += confusion_matrix(b["mask"], worker.predict(tf.constant(b["image"])).numpy(), n)
    return worker.all_reduce_sum(tf.constant(cm, tf.float64)).numpy()


def epoch_metrics(
    worker: Worker, epoch: int, train_loss: float, confusion: np.ndarray, train_seconds: float, epoch_seconds: float
) -> dict[str, Any]:
    """One row of the history: what Ray Train reports and history.csv holds."""
    from raysegment.models.metrics import metrics_from_confusion

    val = metrics_from_confusion(confusion, list(worker.cfg.class_names))
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_pixel_accuracy": val["pixel_accuracy"],
        "val_mean_iou": val["mean_iou"],
        "val_mean_dice": val["mean_dice"],
        "learning_rate": current_learning_rate(worker.optimizer),
        "images_per_second": worker.cfg.steps_per_epoch * worker.cfg.global_batch / max(train_seconds, 1e-9),
        "epoch_seconds": epoch_seconds,
    }


def report(worker: Worker, state: TrainState, metrics: dict[str, Any]) -> None:
    """Every rank reports the metrics (it is a barrier); rank 0 logs and uploads the checkpoint."""
    import ray.train

    if worker.rank != 0:
        ray.train.report(metrics)
        return
    log_epoch(worker.cfg, metrics)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, worker.model, worker.optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    if worker.poster is not None:
        worker.poster.epoch_end(metrics, state.stopped_by)
    if state.stopped_by == "patience":
        print(f"[raysegment] early stop: no val mIoU gain for {worker.cfg.patience} epochs", flush=True)
    elif state.stopped_by == "time_budget":
        print(f"[raysegment] stop: another epoch would end past the {worker.cfg.time_budget_s:g} s budget", flush=True)


def log_epoch(cfg: TrainConfig, metrics: dict[str, Any]) -> None:
    """One line per epoch in the worker's log (Ray's log files; on the console only with -v)."""
    epoch, epochs = metrics["epoch"], metrics.get("epochs", cfg.epochs)
    eta = metrics["eta_s"]
    print(
        f"[raysegment] epoch {epoch + 1}/{epochs}  loss {metrics['train_loss']:.4f}  "
        f"val mIoU {metrics['val_mean_iou']:.4f}  pixel acc {metrics['val_pixel_accuracy']:.4f}  "
        f"{metrics['images_per_second']:.1f} img/s  ETA {eta:.0f}s",
        flush=True,
    )
