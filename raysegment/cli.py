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
        if isinstance(exc, UserError):
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
@click.option("--crop", type=click.Choice(["resize", "random"]), default=None, help="fit to the size (default: resize)")
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
@click.option("--mask-format", type=click.Choice(["png", "npz", "packed"]), default=None)
@click.option("--overwrite", is_flag=True, default=None, help="redo every key instead of resuming")
@click.option("--max-error-fraction", type=float, default=None, help="fail the job above this share of bad inputs")
@click.option("--max-pixels", type=int, default=None, help="refuse larger images (decompression bombs)")
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
    from raysegment.data.bench import bench_prepare as run
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


@bench.command("infer")
@click.option("--images", type=int, default=2000, show_default=True)
@click.option("--image-size", type=int, default=128, show_default=True)
@click.option("--depth", type=int, default=4, show_default=True)
@click.option("--base-filters", type=int, default=16, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--actors", type=int, default=1, show_default=True)
@click.option("--scale", type=int, default=None, help="instead: run the pipeline over N/10 then N tiny images")
@click.option("--workdir", default=None, help="temp folder location (default: system temp)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object only")
@handle_errors
def bench_infer(
    images: int,
    image_size: int,
    depth: int,
    base_filters: int,
    batch_size: int,
    actors: int,
    scale: int | None,
    workdir: str | None,
    as_json: bool,
) -> None:
    """Model only (a) vs plain baseline (b) vs raysegment's pipeline (c), on the same images."""
    from raysegment.inference.bench import bench_infer as run
    from raysegment.inference.bench import bench_scale
    from raysegment.runtime import init_ray

    init_ray()
    if scale:
        r = bench_scale(scale, 32, batch_size, actors, workdir)
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
    r = run(images, image_size, depth, base_filters, batch_size, actors, workdir)
    if not as_json:
        click.echo(
            f"{images} images {image_size}x{image_size}, U-Net depth {depth} base {base_filters}: "
            f"model {r['model_ms_per_image']} ms/image, decode {r['decode_ms_per_image']} ms/image"
        )
        click.echo(f"  (a) model only  {r['model_only_ips']:>8} images/s")
        click.echo(f"  (b) baseline    {r['baseline_ips']:>8} images/s")
        click.echo(
            f"  (c) pipeline    {r['pipeline_ips']:>8} images/s   c/a {r['ratio_vs_model_only']}   c/b {r['ratio_vs_baseline']}"
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
    from raysegment.train.bench import bench_train as run

    init_ray(min_cpus=(os.cpu_count() or 1) + 1)
    r = run(images, image_size, depth, base_filters, global_batch, epochs, workers)
    click.echo(f"  plain Keras (1 process, {r['cores']} cores)   {r['plain_keras_ips']:>8} images/s")
    click.echo(
        f"  Ray Train, 1 worker x {r['cores']} cores     {r['ray_train_1_worker_ips']:>8} images/s   overhead {r['overhead_equal_cores']:.1%}"
    )
    click.echo(
        f"  Ray Train, {workers} workers               {r[f'ray_train_{workers}_workers_ips']:>8} images/s   ratio {r[f'ratio_{workers}_workers_vs_plain']}"
    )
    _print(r)


if __name__ == "__main__":
    main()
