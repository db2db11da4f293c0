"""`raysegment` command line: parse flags, load the job spec, call the job. Nothing else."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

# Quiet TF's C++ start-up chatter in this process and the local Ray workers it starts.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from raysegment import __version__
from raysegment.config import EvaluateSpec, InferSpec, PrepareSpec, TrainSpec, load_spec
from raysegment.errors import UserError


def _user_error(exc: BaseException) -> UserError | None:
    """The UserError behind an exception, also when Ray wrapped it in a task or train error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # Ray re-raises a task's error as a subclass of both RayTaskError and the error: its text
        # is the remote traceback, so keep walking to the original (its .cause).
        wrapped = any(c.__module__.startswith("ray.") for c in type(exc).__mro__)
        if isinstance(exc, UserError) and not wrapped:
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print user-fixable errors as one line (exit 2; 3 for a failed job), without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            err = _user_error(exc)
            if err is None:
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)

    return wrapper


def _print(result: dict[str, Any]) -> None:
    click.echo(json.dumps(result, indent=2, default=str))


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), help="job spec YAML; flags override it"
)
endpoint_option = click.option("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")


@click.group()
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """raysegment: prepare, train, evaluate and run image segmentation jobs on Ray."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("source", required=False)
@click.argument("dest", required=False)
@click.option("--layout", type=click.Choice(["pairs", "voc", "cityscapes"]), default=None, help="default: pairs")
@click.option("--images-dir", default=None, help="pairs: images folder under SOURCE (default: images)")
@click.option("--masks-dir", default=None, help="pairs: masks folder under SOURCE (default: masks)")
@click.option("--mask-values", default=None, help="pairs: raw mask value -> class id, e.g. 0:0,255:1")
@click.option("--num-classes", type=int, default=None, help="class count (default: from the masks)")
@click.option("--class-names", default=None, help="comma-separated class names")
@click.option("--val-keys", default=None, help="keys of the val split: comma list or a file with one key per line")
@click.option("--val-fraction", type=float, default=None, help="hash split by key (default: 0.2)")
@click.option("--seed", type=int, default=None)
@click.option("--shard-size-mb", type=float, default=None, help="target shard size (default: 256)")
@click.option("--skip-invalid", is_flag=True, default=None, help="write the valid pairs, record the bad ones")
@click.option("--overwrite", is_flag=True, default=None)
@endpoint_option
@config_option
@handle_errors
def prepare(config: str | None, class_names: str | None, **flags: Any) -> None:
    """Turn labelled images under SOURCE into Parquet shards + manifest.json under DEST."""
    flags["class_names"] = class_names.split(",") if class_names else None
    spec = load_spec(PrepareSpec, config, flags)
    from raysegment.data.prepare import prepare as run
    from raysegment.runtime import init_ray

    init_ray()
    manifest = run(spec)
    skipped = f", {len(manifest['skipped'])} invalid pairs skipped" if manifest["skipped"] else ""
    click.echo(
        f"prepared {spec.dest}: {manifest['counts']} images, {len(manifest['shards'])} shards, "
        f"classes {manifest['class_names']}{skipped}"
    )


@main.command("data-info")
@click.argument("data")
@endpoint_option
@handle_errors
def data_info(data: str, endpoint_url: str | None) -> None:
    """Print a prepared data set's manifest: classes, counts, pixel frequencies, shards."""
    from raysegment.data.info import format_manifest
    from raysegment.data.prepare import read_manifest

    loc, manifest = read_manifest(data, endpoint_url)
    click.echo(format_manifest(loc.uri, manifest))


@main.command()
@click.argument("data", required=False)
@click.argument("out", required=False)
@click.option("--epochs", type=int, default=None)
@click.option("--workers", type=int, default=None)
@click.option("--image-size", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="per-worker batch")
@click.option("--learning-rate", type=float, default=None)
@click.option("--depth", type=int, default=None)
@click.option("--base-filters", type=int, default=None)
@click.option("--augment/--no-augment", default=None, help="master switch for augmentation (default: on)")
@click.option(
    "--crop",
    type=click.Choice(["resize", "random", "native"]),
    default=None,
    help="resize (default), random crop, or native: windows at the original scale, full-resolution inference",
)
@click.option("--repeat", type=int, default=None, help="passes over the training split per epoch (default: 1)")
@click.option("--flip/--no-flip", default=None, help="random flips (default: on)")
@click.option("--rotate90/--no-rotate90", default=None, help="random 90-degree turns (default: on)")
@click.option("--scale-jitter", type=float, default=None, help="zoom factor in [1-J, 1+J] (default: 0)")
@click.option("--brightness", type=float, default=None, help="brightness shift in [-B, B] (default: 0)")
@click.option("--contrast", type=float, default=None, help="contrast factor in [1-C, 1+C] (default: 0)")
@click.option("--batch-norm/--no-batch-norm", default=None, help="batch normalisation (default: on)")
@click.option("--dropout", type=float, default=None, help="dropout at the bottleneck (default: 0)")
@click.option("--upsampling", type=click.Choice(["transpose", "resize"]), default=None)
@click.option("--head", type=click.Choice(["softmax", "sigmoid"]), default=None, help="sigmoid: binary data sets")
@click.option("--loss", type=click.Choice(["ce", "dice", "ce+dice"]), default=None)
@click.option("--class-weights", type=click.Choice(["none", "inverse_frequency"]), default=None)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None)
@click.option("--schedule", type=click.Choice(["constant", "cosine", "step"]), default=None, help="(default: cosine)")
@click.option("--warmup-epochs", type=float, default=None)
@click.option("--patience", type=int, default=None, help="early stop after N epochs without val mIoU gain")
@click.option("--mixed-precision", type=click.Choice(["auto", "off", "bfloat16", "float16"]), default=None)
@click.option("--max-failures", type=int, default=None, help="worker-group restarts from the last checkpoint")
@click.option("--cpus-per-worker", type=float, default=None)
@click.option("--gpus-per-worker", type=float, default=None)
@click.option("--resume/--no-resume", default=None, help="continue from the last checkpoint in OUT (default: on)")
@endpoint_option
@config_option
@handle_errors
def train(config: str | None, **flags: Any) -> None:
    """Train a U-Net on the data set DATA with Ray Train; write the model to OUT."""
    spec = load_spec(TrainSpec, config, flags)
    from raysegment.runtime import init_ray
    from raysegment.train.trainer import train as run

    init_ray(min_cpus=int(spec.workers * spec.cpus_per_worker) + 1)
    result = run(spec)
    best = result["metrics"]["best"]
    click.echo(
        f"trained {result['out']}: best epoch {best['epoch']}, val mean_iou {best['val_mean_iou']:.4f}, "
        f"pixel_accuracy {best['val_pixel_accuracy']:.4f}"
    )


@main.command()
@click.argument("model", required=False)
@click.argument("data", required=False)
@click.option("--split", default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--out", default=None, help="metrics JSON URI (default: MODEL/eval-SPLIT.json)")
@click.option("--tta-flip", is_flag=True, default=None, help="average with a flipped pass, as infer --tta-flip")
@endpoint_option
@config_option
@handle_errors
def evaluate(config: str | None, **flags: Any) -> None:
    """Evaluate MODEL on a split of the data set DATA (pixel accuracy, mIoU, Dice)."""
    spec = load_spec(EvaluateSpec, config, flags)
    from raysegment.evaluate import evaluate as run
    from raysegment.runtime import init_ray

    init_ray()
    result = run(spec)
    click.echo(f"{'class':<20} {'IoU':>8}")
    for name, iou in result["per_class_iou"].items():
        click.echo(f"{name:<20} {'-' if iou is None else f'{iou:.4f}':>8}")
    click.echo(
        f"pixel_accuracy {result['pixel_accuracy']:.4f}  mean_iou {result['mean_iou']:.4f}  "
        f"mean_dice {result['mean_dice']:.4f}  ({result['images']} images, written to {result['written_to']})"
    )


@main.command()
@click.argument("model", required=False)
@click.argument("input", required=False)
@click.argument("output", required=False)
@click.option(
    "--source",
    type=click.Choice(["auto", "files", "tar", "parquet", "list"]),
    default=None,
    help="input kind (default: auto)",
)
@click.option("--extensions", default=None, help="comma-separated image extensions to list")
@click.option("--image-column", default=None, help="image bytes column of a Parquet source")
@click.option("--key-column", default=None, help="key column of a Parquet source")
@click.option("--batch-size", type=int, default=None)
@click.option("--actors", default=None, help="predictor actors, MIN or MIN:MAX")
@click.option("--gpus-per-actor", type=float, default=None)
@click.option("--cpus-per-actor", type=float, default=None, help="CPUs and TF threads per actor (default: 1)")
@click.option("--mask-format", type=click.Choice(["png", "npz", "packed"]), default=None)
@click.option("--tta-flip", is_flag=True, default=None, help="flip test-time augmentation (2x model cost)")
@click.option("--report/--no-report", default=None, help="write report.html and overlays.png (default: on)")
@click.option("--overwrite", is_flag=True, default=None, help="redo every key instead of resuming")
@click.option("--max-error-fraction", type=float, default=None, help="fail the job above this share of bad inputs")
@click.option("--max-pixels", type=int, default=None, help="refuse larger images (decompression bombs)")
@click.option(
    "--precision",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default=None,
    help="model compute dtype (default auto: bfloat16 on GPU, float32 on CPU)",
)
@click.option("--tile-size", type=int, default=None, help="native-scale models: tile images larger than this (1024)")
@click.option("--tile-overlap", type=int, default=None, help="pixels shared by neighbouring tiles (64)")
@click.option(
    "--decode",
    type=click.Choice(["tasks", "actor"]),
    default=None,
    help="decode images in CPU tasks beside the actors (default) or inside the predictor actor",
)
@click.option(
    "--storage-retry-s",
    type=float,
    default=None,
    help="retry unreachable object storage this long, then fail (default: RAYSEGMENT_STORAGE_RETRY_S or 120)",
)
@endpoint_option
@config_option
@handle_errors
def infer(config: str | None, extensions: str | None, **flags: Any) -> None:
    """Segment every image under INPUT with MODEL; write masks and summaries to OUTPUT."""
    flags["extensions"] = extensions.split(",") if extensions else None
    spec = load_spec(InferSpec, config, flags)
    from raysegment.inference.pipeline import infer as run
    from raysegment.runtime import init_ray

    init_ray()
    record = run(spec)
    c = record["counts"]
    click.echo(
        f"inferred {c['processed']} images ({c['ok']} ok, {c['error']} errors; {c['skipped']} already done) "
        f"at {record['images_per_second']} images/s; run {record['run_id']} in {spec.output}"
    )


@main.command()
@click.option("--out", default="raysegment-demo", show_default=True, help="local folder for everything the demo writes")
@click.option("--epochs", type=int, default=6, show_default=True)
@handle_errors
def demo(out: str, epochs: int) -> None:
    """Synthetic data -> prepare -> train (2 workers) -> evaluate -> infer, on local Ray."""
    from raysegment.demo import run_demo
    from raysegment.runtime import init_ray

    init_ray(min_cpus=3)
    result = run_demo(out, epochs=epochs)
    m = result["metrics"]
    click.echo(f"\nraysegment demo finished in {result['seconds']:.0f} s")
    for name, path in result["paths"].items():
        click.echo(f"  {name:<10} {path}")
    click.echo(
        f"  validation: mean_iou {m['mean_iou']:.4f}  pixel_accuracy {m['pixel_accuracy']:.4f}  mean_dice {m['mean_dice']:.4f}"
    )
    c = result["infer"]["counts"]
    click.echo(f"  inference: {c['ok']} masks written, {c['error']} errors")


@main.group()
def bench() -> None:
    """Benchmarks: each prints its measurements."""


@bench.command("prepare")
@click.option("--pairs", type=int, default=20_000, show_default=True, help="synthetic pairs to generate")
@click.option("--size", type=int, default=32, show_default=True, help="image side in pixels")
@click.option("--shard-size-mb", type=float, default=4.0, show_default=True, help="small, so there are many shards")
@click.option("--workdir", default=None, help="keep source and data set here (default: a temp folder, removed)")
@handle_errors
def bench_prepare(pairs: int, size: int, shard_size_mb: float, workdir: str | None) -> None:
    """Generate PAIRS small pairs, prepare them, print the driver's peak RSS and the throughput."""
    from raysegment.bench.prepare import bench_prepare as run
    from raysegment.runtime import init_ray

    init_ray()
    r = run(pairs, size, shard_size_mb, workdir)
    click.echo(
        f"bench prepare: {r['rows']} pairs of {size}x{size} ({r['source_mib']} MiB) -> {r['shards']} shards "
        f"in {r['prepare_s']} s on {r['cpus']} CPUs: {r['pairs_per_s']} pairs/s, {r['mib_per_s']} MiB/s"
    )
    click.echo(
        f"driver RSS: {r['rss_before_mib']} MiB before prepare (peak so far {r['peak_rss_before_mib']} MiB); "
        f"peak after prepare {r['peak_rss_after_mib']} MiB (ru_maxrss); {r['rss_after_mib']} MiB now"
    )
    _print(r)


@bench.command("soak")
@click.option("--images", type=int, default=100_000, show_default=True)
@click.option("--kill-every", type=float, default=30.0, show_default=True, help="seconds between actor kills")
@click.option("--image-size", type=int, default=32, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--actors", type=int, default=1, show_default=True)
@click.option("--workdir", default=None, help="temp folder location (default: system temp)")
@handle_errors
def bench_soak(
    images: int, kill_every: float, image_size: int, batch_size: int, actors: int, workdir: str | None
) -> None:
    """Inference over generated images while a predictor actor is SIGKILLed every N seconds; then a count check."""
    from raysegment.bench.infer import bench_soak as run
    from raysegment.runtime import init_ray

    init_ray(min_cpus=(os.cpu_count() or 1) + 1)
    r = run(images, kill_every, image_size, batch_size, actors, workdir)
    click.echo(
        f"{r['images']} images in {r['seconds']} s ({r['images_per_second']} images/s) with {r['actor_kills']} actor kills; "
        f"{r['summary_rows']} summary rows, {r['distinct_keys']} distinct keys, {r['mask_files']} masks: {r['count_check']}"
    )
    _print(r)
    if r["count_check"] != "ok":
        raise SystemExit(3)


@bench.command("infer")
@click.option("--images", type=int, default=8000, show_default=True)
@click.option("--image-size", type=int, default=128, show_default=True, help="model input")
@click.option("--source-size", type=int, default=None, help="size of the generated images (default: --image-size)")
@click.option("--depth", type=int, default=4, show_default=True)
@click.option("--base-filters", type=int, default=16, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option(
    "--actors",
    type=int,
    default=None,
    help="predictor actors sharing the cores (default: one per core; --scale default: 1)",
)
@click.option("--decode", type=click.Choice(["tasks", "actor"]), default="tasks", show_default=True)
@click.option("--compare-one-actor", is_flag=True, help="also run (c) with one actor on every core")
@click.option("--scale", type=int, default=None, help="instead: run the pipeline over N/10 then N tiny images")
@click.option("--workdir", default=None, help="temp folder location (default: system temp)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object only")
@handle_errors
def bench_infer(
    images: int,
    image_size: int,
    source_size: int | None,
    depth: int,
    base_filters: int,
    batch_size: int,
    actors: int | None,
    decode: str,
    compare_one_actor: bool,
    scale: int | None,
    workdir: str | None,
    as_json: bool,
) -> None:
    """Model only (a) vs plain baseline (b) vs raysegment's pipeline (c), on the same images."""
    from raysegment.bench.infer import bench_infer as run
    from raysegment.bench.infer import bench_scale
    from raysegment.runtime import init_ray

    # The actors take every core (equal cores with the in-process measurements); one more
    # logical CPU lets the decode and write tasks run beside them.
    cores = os.cpu_count() or 1
    init_ray(min_cpus=cores + 1)
    if scale:
        r = bench_scale(scale, 32, batch_size, actors or 1, workdir)
        if not as_json:
            for p in r["points"]:
                click.echo(
                    f"{p['images']:>8} images: {p['images_per_second']} images/s, driver peak {p['driver_peak_rss_mb']} MB, "
                    f"workers peak {p['workers_peak_total_mb']} MB (largest {p['worker_peak_max_mb']} MB)"
                )
            click.echo(
                f"growth {r['points'][0]['images']} -> {r['points'][1]['images']}: workers x{r['workers_peak_growth']}, driver x{r['driver_peak_growth']}"
            )
        _print(r)
        return
    r = run(
        images,
        image_size,
        depth,
        base_filters,
        batch_size,
        actors or cores,
        workdir,
        decode=decode,
        source_size=source_size,
        compare_one_actor=compare_one_actor,
    )
    if not as_json:
        click.echo(
            f"{images} images {r['source_size']}x{r['source_size']} -> model input {image_size}x{image_size}, "
            f"U-Net depth {depth} base {base_filters}, {r['cores']} cores: "
            f"model {r['model_ms_per_image']} ms/image, decode {r['decode_ms_per_image']} ms/image"
        )
        click.echo(f"  (a) model only  {r['model_only_ips']:>8} images/s   (one process, TF on every core)")
        click.echo(f"  (b) baseline    {r['baseline_ips']:>8} images/s   (one process: tf.data, predict, write)")
        click.echo(
            f"  (c) pipeline    {r['pipeline_ips']:>8} images/s   c/a {r['ratio_vs_model_only']}   c/b {r['ratio_vs_baseline']}"
            f"   ({r['actors']} actors x {r['cpus_per_actor']:g} CPU, decoded in {r['decoded_in']})"
        )
        click.echo(f"      first masks after {r['pipeline_first_batch_s']} s, then {r['pipeline_steady_ips']} images/s")
        if r["one_actor"]:
            one = r["one_actor"]
            click.echo(
                f"      one actor on every core: {one['ips']} images/s ({one['steady_ips']} after the first batch)"
            )
        click.echo(f"  peak RSS MB: {r['peak_rss_mb']}")
    _print(r)


@bench.command("train")
@click.option("--images", type=int, default=320, show_default=True)
@click.option("--image-size", type=int, default=64, show_default=True)
@click.option("--depth", type=int, default=3, show_default=True)
@click.option("--base-filters", type=int, default=16, show_default=True)
@click.option("--global-batch", type=int, default=16, show_default=True)
@click.option("--epochs", type=int, default=4, show_default=True, help="the first is warm-up, not timed")
@click.option("--workers", type=int, default=2, show_default=True)
@handle_errors
def bench_train(
    images: int, image_size: int, depth: int, base_filters: int, global_batch: int, epochs: int, workers: int
) -> None:
    """Ray Train loop vs a plain single-process Keras loop, same model and data, one run."""
    from raysegment.runtime import init_ray
    from raysegment.bench.train import bench_train as run

    init_ray(min_cpus=(os.cpu_count() or 1) + 1)
    r = run(images, image_size, depth, base_filters, global_batch, epochs, workers)
    click.echo(
        f"  plain Keras (1 process, {r['cores']} cores)   {r['plain_keras_ips']:>8} images/s   (best of {r['plain_keras_runs_ips']}, before and after)"
    )
    click.echo(
        f"  Ray Train, 1 worker x {r['cores']} cores     {r['ray_train_1_worker_ips']:>8} images/s   overhead {r['overhead_equal_cores']:.1%}"
    )
    click.echo(
        f"  Ray Train, {workers} workers               {r[f'ray_train_{workers}_workers_ips']:>8} images/s   ratio {r[f'ratio_{workers}_workers_vs_plain']}"
    )
    _print(r)


@main.command()
@click.argument("run_uri")
@click.option("--run-id", default=None, help="run record to show (default: the one _SUCCESS names, else the newest)")
@click.option("--samples", type=int, default=16, show_default=True, help="overlays in the contact sheet")
@endpoint_option
@handle_errors
def report(run_uri: str, run_id: str | None, samples: int, endpoint_url: str | None) -> None:
    """(Re)write RUN_URI/report.html and overlays.png from an inference output's summaries and masks."""
    from raysegment.report import write_run_report

    r = write_run_report(run_uri, run_id, samples, endpoint_url)
    click.echo(
        f"report for run {r['run_id']}: {r['rows']} rows ({r['ok']} ok, {r['error']} errors), "
        f"{r['samples']} overlays\n  {r['report']}\n  {r['overlays']}"
    )


@main.command()
@click.argument("image_uri")
@click.option("--model", "model_uri", required=True, help="trained model directory (model.keras + model.json)")
@click.option("--out", default=None, help="overlay PNG to write (default: IMAGE name + .overlay.png, here)")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True, help="mask colour share")
@click.option("--tta-flip", is_flag=True, help="flip test-time augmentation, as infer --tta-flip")
@endpoint_option
@handle_errors
def show(
    image_uri: str, model_uri: str, out: str | None, alpha: float, tta_flip: bool, endpoint_url: str | None
) -> None:
    """Segment one image with MODEL and write it with the mask blended in palette colours."""
    from raysegment.show import show_overlay

    r = show_overlay(image_uri, model_uri, out, alpha, endpoint_url, tta_flip)
    shares = ", ".join(f"{name} {share:.1%}" for name, share in r["class_fractions"].items() if share > 0)
    click.echo(f"wrote {r['out']} ({r['width']}x{r['height']}): {shares}")


address_option = click.option(
    "--address", default=None, help="Ray Jobs API, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)"
)


@main.command()
@click.argument("spec_file", metavar="[SPEC]", required=False)
@click.option("--model", default=None, help="trained model directory")
@click.option("--input", "input", default=None, help="prefix of images, listed every night")
@click.option("--output", default=None, help="date partitions, ledger and reports go here")
@click.option("--date", default=None, help="the night, YYYY-MM-DD (default: today, UTC)")
@click.option("--batch-size", type=int, default=None)
@click.option("--actors", default=None, help="predictor actors, MIN or MIN:MAX")
@click.option("--gpus-per-actor", type=float, default=None)
@click.option("--drift-threshold", type=float, default=None, help="flag a class mean fraction shift above this")
@endpoint_option
@handle_errors
def nightly(spec_file: str | None, **flags: Any) -> None:
    """Infer only new or changed images under INPUT into OUTPUT/date=D; ledger + report.

    Exit codes: 0 ok (also nothing new), 2 user error, 3 the job failed, 4 drift flagged,
    5 another nightly run holds the lock.
    """
    from raysegment.config import NightlySpec
    from raysegment.entrypoints import nightly_line
    from raysegment.nightly import exit_code, run_nightly
    from raysegment.runtime import init_ray

    spec = load_spec(NightlySpec, spec_file, flags)
    init_ray()
    report = run_nightly(spec)
    click.echo(nightly_line(report))
    sys.exit(exit_code(report))


@main.command()
@click.argument("kind", type=click.Choice(["train", "evaluate", "infer", "nightly"]))
@click.argument("spec_file", metavar="SPEC")
@address_option
@click.option("--working-dir", default=None, help="folder shipped to the cluster (default: this repo checkout)")
@click.option("--no-working-dir", is_flag=True, help="ship nothing; the cluster has raysegment installed")
@click.option("--pip", "pip", multiple=True, help="pip requirement installed for the job, e.g. raysegment==0.1.0")
@click.option("--env", "env", multiple=True, help="KEY=VALUE set in the job; never secrets")
@click.option("--num-cpus", type=float, default=None, help="CPUs reserved for the job's driver")
@click.option("--num-gpus", type=float, default=None, help="GPUs reserved for the job's driver")
@click.option("--date", default=None, help="nightly: the night to run (default: today, UTC)")
@click.option("--submission-id", default=None, help="instead of the id derived from the spec, e.g. to re-run")
@click.option("--wait", is_flag=True, help="stream the job's logs; exit with the job's exit code")
@handle_errors
def submit(
    kind: str,
    spec_file: str,
    address: str | None,
    working_dir: str | None,
    no_working_dir: bool,
    pip: tuple[str, ...],
    env: tuple[str, ...],
    num_cpus: float | None,
    num_gpus: float | None,
    date: str | None,
    submission_id: str | None,
    wait: bool,
) -> None:
    """Submit a job spec to a Ray cluster (Ray Jobs API); a spec already submitted is not run twice.

    Exit codes: 0 submitted or already submitted; with --wait, the job's own exit code
    (0 ok, 2 user error, 3 failed, 4 nightly drift, 5 nightly locked).
    """
    import datetime

    from raysegment import jobs
    from raysegment.entrypoints import load_job_spec
    from raysegment.errors import ConfigError

    spec = load_job_spec(kind, spec_file)
    if kind == "nightly":
        spec.date = date or spec.date or datetime.datetime.now(datetime.UTC).date().isoformat()
    elif date:
        raise ConfigError("--date only applies to nightly")
    if no_working_dir:
        working_dir = None
    elif working_dir is None:
        checkout = jobs.find_checkout()
        working_dir = str(checkout) if checkout else None
    if working_dir is None and not pip and not no_working_dir:
        raise ConfigError(
            "nothing ships raysegment to the cluster: run from the repo checkout, or pass --working-dir DIR, "
            "--pip REQUIREMENT, or --no-working-dir if the cluster has it installed"
        )
    extra_env = jobs.parse_env(env)
    jobs.job_env(extra_env)  # refuse secrets before talking to the cluster
    client = jobs.connect(address)
    job_id, existed = jobs.submit(
        client,
        kind,
        spec,
        working_dir=working_dir,
        pip=list(pip),
        env=extra_env,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        job_id=submission_id,
    )
    if existed:
        info = jobs.job_info(client, job_id)
        click.echo(f"{job_id}: already submitted ({jobs.status_of(info)}); pass --submission-id to run it again")
    else:
        click.echo(f"{job_id}: submitted to {client.get_address()}")
    if wait:
        info = jobs.wait(client, job_id, lambda chunk: click.echo(chunk, nl=False))
        code = jobs.exit_status(info)
        click.echo(f"{job_id}: {jobs.status_of(info)} (exit code {code})")
        sys.exit(code)


@main.group("jobs")
def jobs_group() -> None:
    """List, inspect, follow and stop jobs on a Ray cluster."""


@jobs_group.command("list")
@address_option
@handle_errors
def jobs_list(address: str | None) -> None:
    """Every job on the cluster, oldest first."""
    from raysegment import jobs

    rows = jobs.job_rows(jobs.connect(address))
    click.echo(f"{'submission id':<48} {'status':<10} {'kind':<9} {'started (UTC)':<20} {'exit':>4}")
    for r in rows:
        click.echo(f"{r['id']:<48} {r['status']:<10} {r['kind']:<9} {r['start_utc']:<20} {r['exit_code']!s:>4}")


@jobs_group.command("status")
@click.argument("job_id")
@address_option
@handle_errors
def jobs_status(job_id: str, address: str | None) -> None:
    """One job's status, message and exit code."""
    from raysegment import jobs

    info = jobs.job_info(jobs.connect(address), job_id)
    exit_code = "-" if info.driver_exit_code is None else info.driver_exit_code
    click.echo(f"{job_id}: {jobs.status_of(info)} (exit code {exit_code}) {info.message or ''}".rstrip())


@jobs_group.command("logs")
@click.argument("job_id")
@address_option
@click.option("--follow", "-f", is_flag=True, help="stream until the job ends")
@handle_errors
def jobs_logs(job_id: str, address: str | None, follow: bool) -> None:
    """A job's driver logs."""
    from raysegment import jobs

    client = jobs.connect(address)
    if follow:
        jobs.job_info(client, job_id)
        jobs.wait(client, job_id, lambda chunk: click.echo(chunk, nl=False))
    else:
        click.echo(jobs.job_logs(client, job_id), nl=False)


@jobs_group.command("stop")
@click.argument("job_id")
@address_option
@handle_errors
def jobs_stop(job_id: str, address: str | None) -> None:
    """Ask a running job to stop."""
    from raysegment import jobs

    stopped = jobs.stop_job(jobs.connect(address), job_id)
    click.echo(f"{job_id}: {'stop requested' if stopped else 'not running'}")


if __name__ == "__main__":
    main()
