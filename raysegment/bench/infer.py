"""`raysegment bench infer`: the pipeline against its ceiling and a plain baseline, in one run.

(a) model only: pre-decoded tensors through the model, the faster of one process with TF on
    every core and one single-threaded process per core (the ceiling);
(b) baseline: one process in the style of a Keras example (tf.data decode, predict,
    write each mask); (c) raysegment's Ray Data pipeline end to end. Same images,
    same model, same machine, measured back to back.
"""

from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from typing import Any

import numpy as np

from raysegment import storage
from raysegment.data import imaging, synthetic
from raysegment.models.card import MODEL_FILE, ModelCard


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples memory on a thread while a block runs; subclasses say what `sample` reads."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class WorkerMemory(RssSampler):
    """The RSS of every Ray worker process: the peak total and the largest one."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.peak_total_mb = 0.0
        self.peak_single_mb = 0.0

    def sample(self) -> None:
        import psutil

        total = 0.0
        for p in psutil.process_iter(["cmdline", "memory_info"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("ray::") and p.info["memory_info"]:
                mb = p.info["memory_info"].rss / 2**20
                total += mb
                self.peak_single_mb = max(self.peak_single_mb, mb)
        self.peak_total_mb = max(self.peak_total_mb, total)


def make_model_dir(root: str, image_size: int, depth: int, base_filters: int, num_classes: int = 4) -> str:
    """A U-Net artifact (randomly initialised: throughput does not depend on the weights)."""
    import keras

    from raysegment.models.unet import build_unet
    from raysegment.train.checkpoint import file_sha256

    model_dir = os.path.join(root, "model")
    os.makedirs(model_dir, exist_ok=True)
    keras.utils.set_random_seed(0)
    model = build_unet(num_classes, depth=depth, base_filters=base_filters)
    path = os.path.join(model_dir, MODEL_FILE)
    model.save(path)
    card = ModelCard.create(
        file_sha256(path),
        architecture={"name": "unet", "depth": depth, "base_filters": base_filters},
        num_classes=num_classes,
        class_names=synthetic.CLASS_NAMES[:num_classes],
        palette=imaging.default_palette(num_classes),
        ignore_index=imaging.IGNORE_INDEX,
        input={"size": [image_size, image_size], "channels": 3, "normalization": "scale_0_1", "resize": "bilinear"},
    )
    card.write(storage.resolve(model_dir))
    return model_dir


def _predict_all(predictor: Any, images: np.ndarray, batch_size: int) -> float:
    """Seconds to predict `images` in batches, after one warm-up batch."""
    predictor({"image": images[:batch_size], "error": np.asarray([""] * min(batch_size, len(images)), dtype=object)})
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        predictor({"image": chunk, "error": np.asarray([""] * len(chunk), dtype=object)})
    return time.perf_counter() - t0


def model_only(model_dir: str, images: np.ndarray, batch_size: int) -> float:
    """(a) in one process, TF on every core: images/s of the model alone on pre-decoded tensors."""
    from raysegment.inference.predictor import Predictor

    return len(images) / _predict_all(Predictor(model_dir), images, batch_size)


def _one_core_worker(model_dir: str, npy: str, part: slice, batch_size: int, start: Any, out: Any) -> None:
    from raysegment.inference.predictor import Predictor

    predictor = Predictor(model_dir, threads=1)
    images = np.load(npy, mmap_mode="r")[part]
    images = np.ascontiguousarray(images)
    predictor({"image": images[:batch_size], "error": np.asarray([""] * min(batch_size, len(images)), dtype=object)})
    start.wait()  # every process loaded and warm: the clock covers prediction only
    out.put(_predict_all(predictor, images, batch_size))


def model_only_per_core(model_dir: str, images: np.ndarray, batch_size: int, processes: int) -> float:
    """(a) as one single-threaded process per core, each on its share: the layout raysegment's CPU
    actors use, and on CPU faster than one process's intra-op threads (DESIGN.md, Predictor)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fresh interpreters: TF in this process is already initialised
    with tempfile.TemporaryDirectory() as d:
        npy = os.path.join(d, "images.npy")
        np.save(npy, images)
        start, out = ctx.Barrier(processes + 1), ctx.Queue()
        share = -(-len(images) // processes)
        procs = [
            ctx.Process(
                target=_one_core_worker,
                args=(model_dir, npy, slice(i * share, (i + 1) * share), batch_size, start, out),
            )
            for i in range(processes)
        ]
        for p in procs:
            p.start()
        start.wait()
        t0 = time.perf_counter()
        [out.get() for _ in procs]
        seconds = time.perf_counter() - t0
        for p in procs:
            p.join()
    return len(images) / seconds


def baseline(model_dir: str, input_dir: str, output_dir: str, batch_size: int, size: int) -> float:
    """(b) images/s of a plain single-process job: tf.data decode, model.predict, write each mask.

    Its model load and first batch are inside the clock, as (c)'s are (TF is already
    imported in this process; (c)'s actors import it on the clock)."""
    import keras
    import tensorflow as tf
    from PIL import Image

    t0 = time.perf_counter()
    model = keras.models.load_model(os.path.join(model_dir, MODEL_FILE), compile=False)
    files = sorted(os.path.join(input_dir, f) for f in os.listdir(input_dir))
    os.makedirs(output_dir, exist_ok=True)

    def load(path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return tf.image.resize(tf.cast(img, tf.float32) / 255.0, (size, size)), tf.shape(img)[:2]

    ds = tf.data.Dataset.from_tensor_slices(files).map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    i = 0
    for images, shapes in ds:
        pred = np.argmax(model.predict_on_batch(images), axis=-1).astype(np.uint8)
        for p, (h, w) in zip(pred, shapes.numpy()):
            mask = Image.fromarray(p).resize((int(w), int(h)), Image.NEAREST)
            mask.save(os.path.join(output_dir, os.path.basename(files[i])))
            i += 1
    return len(files) / (time.perf_counter() - t0)


def pipeline(
    model_dir: str,
    input_dir: str,
    output_dir: str,
    batch_size: int,
    actors: int,
    cpus_per_actor: float | None = None,
    decode: str = "tasks",
) -> tuple[float, dict[str, Any]]:
    """(c) images/s of raysegment's pipeline end to end (listing to _SUCCESS, actor start-up included).

    The actors share the machine's cores (``cpus_per_actor`` defaults to cores / actors),
    so (c) runs on the same cores as (a) and (b); its decode and write tasks compete for them.
    """
    from raysegment.config import InferSpec
    from raysegment.inference.pipeline import infer

    cores = os.cpu_count() or 1
    spec = InferSpec(
        model=model_dir,
        input=input_dir,
        output=output_dir,
        batch_size=batch_size,
        actors=actors,
        overwrite=True,
        report=False,
        cpus_per_actor=cpus_per_actor or float(max(1, cores // actors)),
        decode=decode,
    )
    t0 = time.perf_counter()
    record = infer(spec)
    return record["counts"]["processed"] / (time.perf_counter() - t0), record


def steady_ips(record: dict[str, Any]) -> float | None:
    """images/s after the first batch was written: the pipeline without its start-up
    (None when everything came in the first batch)."""
    first = record["first_batch"]
    rows = record["counts"]["processed"] - first["rows"]
    return round(rows / max(record["seconds"] - first["seconds"], 1e-9), 2) if rows else None


def write_inputs(root: str, count: int, size: int) -> None:
    """Distinct synthetic PNGs, written in a few seconds even for 100,000."""
    os.makedirs(root, exist_ok=True)
    base = [synthetic.make_example(i, size=size)[0] for i in range(64)]
    for i in range(count):
        img = np.roll(base[i % 64], i // 64, axis=1)
        synthetic.Image.fromarray(img).save(os.path.join(root, f"img-{i:06d}.png"), compress_level=1)


def warm_ray_data() -> None:
    """Run one tiny Ray Data job so that Ray Data's detached per-cluster actors (stats,
    autoscaling coordinator, actor location tracker) exist, as they do on a cluster that
    has run any Ray Data job before. The job's own actors, TF import and model load stay
    inside (c)'s clock."""
    import ray

    ray.data.range(8).map_batches(lambda batch: batch).materialize()


def bench_infer(
    images: int,
    image_size: int,
    depth: int,
    base_filters: int,
    batch_size: int,
    actors: int,
    workdir: str | None,
    decode: str = "tasks",
    source_size: int | None = None,
    compare_one_actor: bool = False,
    cpus_per_actor: float | None = None,
) -> dict[str, Any]:
    """Measure (a), (b), (c) on the same images and model; ratios come from this one run.

    The images are ``source_size`` square (default: the model input) and are resized to
    the model input and back, as archive images are. (c) runs ``actors`` predictor actors
    sharing the cores; with ``compare_one_actor`` the same pipeline with one actor on
    every core (the layout (a) and (b) use) is measured too.
    """
    cores = os.cpu_count() or 1
    source_size = source_size or image_size
    with tempfile.TemporaryDirectory(dir=workdir) as root:
        model_dir = make_model_dir(root, image_size, depth, base_filters)
        input_dir = os.path.join(root, "in")
        write_inputs(input_dir, images, source_size)
        decoded = np.stack(
            [
                imaging.resize_image(
                    imaging.decode_image(open(os.path.join(input_dir, f), "rb").read()), (image_size, image_size)
                )
                for f in sorted(os.listdir(input_dir))
            ]
        )
        t0 = time.perf_counter()
        for f in sorted(os.listdir(input_dir))[:200]:
            imaging.decode_image(open(os.path.join(input_dir, f), "rb").read())
        decode_ms = (time.perf_counter() - t0) * 1000 / min(images, 200)
        # The ceiling is the faster of the two model-only layouts on this machine (#16 item 6).
        a_one = model_only(model_dir, decoded, batch_size)
        a_per_core = model_only_per_core(model_dir, decoded, batch_size, cores) if cores > 1 else a_one
        a = max(a_one, a_per_core)
        b = baseline(model_dir, input_dir, os.path.join(root, "baseline"), batch_size, image_size)
        warm_ray_data()
        with WorkerMemory() as mem:
            c, record = pipeline(
                model_dir, input_dir, os.path.join(root, "pipeline"), batch_size, actors, cpus_per_actor, decode
            )
        one = None
        if compare_one_actor:
            ips, one_record = pipeline(
                model_dir, input_dir, os.path.join(root, "one-actor"), batch_size, 1, float(cores), decode
            )
            one = {"ips": round(ips, 2), "steady_ips": steady_ips(one_record)}
    return {
        "images": images,
        "image_size": image_size,
        "source_size": source_size,
        "model": {"depth": depth, "base_filters": base_filters},
        "batch_size": batch_size,
        "cores": cores,
        "actors": actors,
        "cpus_per_actor": record["config"]["cpus_per_actor"],
        "decoded_in": record["decoded_in"],
        "model_ms_per_image": round(1000 / a, 3),
        "decode_ms_per_image": round(decode_ms, 3),
        "model_only_ips": round(a, 2),
        "model_only_one_process_ips": round(a_one, 2),
        "model_only_per_core_ips": round(a_per_core, 2),
        "model_only_layout": "per_core" if a_per_core > a_one else "one_process",
        "baseline_ips": round(b, 2),
        "pipeline_ips": round(c, 2),
        "ratio_vs_model_only": round(c / a, 3),
        "ratio_vs_baseline": round(c / b, 3),
        "pipeline_first_batch_s": record["first_batch"]["seconds"],
        "pipeline_steady_ips": steady_ips(record),
        "one_actor": one,
        "peak_rss_mb": {
            "driver": round(_rss_mb(), 1),
            "workers_total": round(mem.peak_total_mb, 1),
            "worker_max": round(mem.peak_single_mb, 1),
        },
        "pipeline_rows": record["counts"]["total"],
        "pipeline_errors": record["counts"]["error"],
    }


class ActorKiller:
    """Every `every` seconds, SIGKILLs one live predictor actor on this node (a soak's fault)."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.kills = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import signal

        import ray
        from ray.util.state import list_actors

        address = ray.get_runtime_context().gcs_address
        while not self._stop.wait(self.every):
            alive = [
                a
                for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
                if "Predictor" in a.class_name and a.pid
            ]
            self.pids.update(a.pid for a in alive)
            if alive:
                try:
                    os.kill(alive[0].pid, signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def __enter__(self) -> ActorKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bench_soak(
    images: int, kill_every: float, image_size: int, batch_size: int, actors: int, workdir: str | None
) -> dict[str, Any]:
    """Inference over `images` generated images while an actor is killed every `kill_every` seconds."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(dir=workdir) as root:
        model_dir = make_model_dir(root, image_size, depth=2, base_filters=4)
        input_dir, output_dir = os.path.join(root, "in"), os.path.join(root, "out")
        write_inputs(input_dir, images, image_size)
        t0 = time.perf_counter()
        with WorkerMemory() as mem, ActorKiller(kill_every) as killer:
            _, record = pipeline(model_dir, input_dir, output_dir, batch_size, actors)
        seconds = time.perf_counter() - t0
        keys = pq.read_table(os.path.join(output_dir, "summaries"), columns=["key"]).column("key").to_pylist()
        masks = sum(len(files) for _, _, files in os.walk(os.path.join(output_dir, "masks")))
    return {
        "images": images,
        "kill_every_s": kill_every,
        "actor_kills": killer.kills,
        "predictor_pids_seen": len(killer.pids),
        "seconds": round(seconds, 1),
        "images_per_second": round(images / seconds, 1),
        "summary_rows": len(keys),
        "distinct_keys": len(set(keys)),
        "mask_files": masks,
        "count_check": "ok" if len(keys) == len(set(keys)) == masks == images else "FAILED",
        "peak_rss_mb": {
            "driver": round(_rss_mb(), 1),
            "workers_total": round(mem.peak_total_mb, 1),
            "worker_max": round(mem.peak_single_mb, 1),
        },
    }
