"""`raysegment` command line: parse flags, load the job spec, call the job. Nothing else.

The job kinds, what they print and the CPUs they need are in `registry.py`; error printing in
`console.py`; submission in `jobs.py`; the `bench` commands in `bench/cli.py`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from raysegment import __version__, logs, registry
from raysegment.bench.cli import bench
from raysegment.cli_options import infer_options
from raysegment.config import (
    CompactSpec,
    EvaluateSpec,
    ExportSpec,
    ImportSpec,
    InferSpec,
    NightlySpec,
    PrepareSpec,
    ServeSpec,
    Spec,
    TrainSpec,
    load_spec,
)
from raysegment.console import FOLLOWING, handle_errors, json_option, session


def _run(spec: Spec, as_json: bool) -> None:
    """Run the job on local Ray (or RAY_ADDRESS) and exit with its exit code when that is not 0."""
    code = registry.run(spec, as_json)
    if code:
        sys.exit(code)


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), help="job spec YAML; flags override it"
)
endpoint_option = click.option("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")


class FiniteRange(click.FloatRange):
    """click's FloatRange lets `nan` through (every comparison with it is false)."""

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number in the range {self._describe_range()}", param, ctx)
        return number


@click.group()
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="full logs on the console (as RAYSEGMENT_LOG_LEVEL=DEBUG)")
def main(verbose: bool) -> None:
    """raysegment: prepare, train, evaluate and run image segmentation jobs on Ray.

    Progress goes to stderr, the closing summary to stdout, the detail to a log file next to the
    outputs (OUT/logs/; printed at the end); --json prints one JSON object instead of the summary.
    """
    if verbose:
        os.environ[logs.LEVEL_ENV] = "DEBUG"
    logs.apply_quiet_env()  # before any command imports TensorFlow


@main.command()
@click.argument("source", required=False)
@click.argument("dest", required=False)
@click.option(
    "--layout",
    type=click.Choice(["pairs", "voc", "cityscapes", "list"]),
    default=None,
    help="default: pairs; list: SOURCE is a CSV/Parquet of image,mask[,split]",
)
@click.option("--images-dir", default=None, help="pairs: images folder under SOURCE (default: images)")
@click.option("--masks-dir", default=None, help="pairs: masks folder under SOURCE (default: masks)")
@click.option("--mask-suffix", default=None, help="pairs: masks are named NAME + this (e.g. _mask for a_mask.png)")
@click.option("--mask-values", default=None, help="pairs: raw mask value -> class id, e.g. 0:0,255:1")
@click.option("--mask-threshold", type=int, default=None, help="soft binary masks: value >= T -> 1, else 0")
@click.option(
    "--mask-colors", default=None, help="colour-coded masks: 'R,G,B:ID;R,G,B:ID' or a class_dict.csv (name,r,g,b)"
)
@click.option(
    "--unlisted-colors", type=click.Choice(["invalid", "ignore"]), default=None, help="colours not in --mask-colors"
)
@click.option(
    "--mask-zero",
    type=click.Choice(["class", "ignore"]),
    default=None,
    help="mask value 0: class 0 (default), or ignore: unlabelled, and value v is class v-1 (ADE20K)",
)
@click.option(
    "--mask-alpha",
    type=click.Choice(["ignore", "keep"]),
    default=None,
    help="transparent mask pixels: ignore (default: unlabelled) or keep (their value is their class)",
)
@click.option(
    "--bands", default=None, help="image bands the model sees, 1-based, e.g. 1,2,3 (default: RGB, or all past 4)"
)
@click.option("--num-classes", type=int, default=None, help="class count (default: from the masks)")
@click.option("--class-names", default=None, help="comma-separated class names")
@click.option("--val-keys", default=None, help="keys of the val split: comma list or a file with one key per line")
@click.option("--val-fraction", type=float, default=None, help="hash split by key (default: 0.2)")
@click.option("--seed", type=int, default=None)
@click.option("--shard-size-mb", type=float, default=None, help="target shard size (default: 256)")
@click.option("--skip-invalid", is_flag=True, default=None, help="write the valid pairs, record the bad ones")
@click.option("--overwrite", is_flag=True, default=None)
@click.option(
    "--storage-retry-s",
    type=float,
    default=None,
    help="retry unreachable object storage this long, then fail (default: RAYSEGMENT_STORAGE_RETRY_S or 120)",
)
@endpoint_option
@config_option
@json_option
@handle_errors
def prepare(config: str | None, as_json: bool, **flags: Any) -> None:
    """Turn labelled images under SOURCE into Parquet shards + manifest.json under DEST."""
    _run(load_spec(PrepareSpec, config, flags), as_json)


@main.command("data-info")
@click.argument("data")
@endpoint_option
@handle_errors
def data_info(data: str, endpoint_url: str | None) -> None:
    """Print a prepared data set's manifest: classes, counts, shards and its fingerprint.

    A data set prepared before fingerprints existed (or before this version's fields) gets one computed
    from its shards (Ray tasks)."""
    from raysegment.data.info import describe

    click.echo(describe(data, endpoint_url))


@main.command("plan")
@click.argument("data")
@click.option("--time-budget", default=None, help="training time, e.g. 40m or 2h (default: from the data set size)")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True)
@click.option("--cpus-per-worker", type=float, default=1.0, show_default=True)
@click.option("--out", default="plan.json", show_default=True, help="where to write the plan (path or URI)")
@endpoint_option
@handle_errors
def plan(
    data: str,
    time_budget: str | None,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float,
    out: str,
    endpoint_url: str | None,
) -> None:
    """Derive a training plan for DATA from its fingerprint and the compute; print it, write plan.json."""
    from raysegment.plan import format_plan, write_plan

    # The compute and budget checked as `train` checks them (TrainSpec's bounds): a plan is only printed for
    # values train would accept.
    compute = {"workers": workers, "gpus_per_worker": gpus_per_worker, "cpus_per_worker": cpus_per_worker}
    spec = load_spec(TrainSpec, None, {"data": data, "out": out, "time_budget": time_budget, **compute})
    result, warnings = write_plan(spec, endpoint_url)
    click.echo("\n".join([*format_plan(result), f"written to {out}"]))
    for warning in warnings:
        click.echo(f"plan: warning: {warning}", err=True)


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
@click.option(
    "--repeat",
    type=int,
    default=None,
    help="passes over the training split per epoch (default: the plan's; 1 with --no-plan)",
)
@click.option(
    "--flip",
    type=click.Choice(["auto", "none", "horizontal", "vertical", "both"]),
    is_flag=False,
    flag_value="auto",
    default=None,
    help="random flips on these axes; --flip alone: auto, the plan's (left-right only for data with a top)",
)
@click.option("--no-flip", "no_flip", is_flag=True, default=None, help="no flips (--flip none)")
@click.option("--rotate90/--no-rotate90", default=None, help="random 90-degree turns (default: on)")
@click.option("--scale-jitter", type=float, default=None, help="zoom factor in [1-J, 1+J] (default: 0)")
@click.option("--brightness", type=float, default=None, help="brightness shift in [-B, B] (default: 0)")
@click.option("--contrast", type=float, default=None, help="contrast factor in [1-C, 1+C] (default: 0)")
@click.option("--rotate", type=float, default=None, help="turn windows by up to DEG degrees, 180: any (default: 0)")
@click.option("--elastic", type=float, default=None, help="elastic deformation, displacement std PX (default: 0)")
@click.option("--gamma", type=float, default=None, help="gamma exponent in [1/(1+G), 1+G] (default: 0)")
@click.option("--noise", type=float, default=None, help="Gaussian noise std up to N of the range (default: 0)")
@click.option(
    "--oversample", type=float, default=None, help="share of windows centred on a rare-class pixel (default: 0)"
)
@click.option(
    "--normalization",
    type=click.Choice(["scale_0_1", "zscore", "zscore_clipped"]),
    default=None,
    help="pixels / 255, or per-channel z-score from the data set's fingerprint (clipped: 0.5-99.5 percentiles first)",
)
@click.option("--batch-norm/--no-batch-norm", default=None, help="batch normalisation (default: on)")
@click.option("--dropout", type=float, default=None, help="dropout at the bottleneck (default: 0)")
@click.option("--upsampling", type=click.Choice(["transpose", "resize"]), default=None)
@click.option("--head", type=click.Choice(["softmax", "sigmoid"]), default=None, help="sigmoid: binary data sets")
@click.option(
    "--architecture",
    type=click.Choice(["unet", "resunet", "deeplabv3plus"]),
    default=None,
    help="unet (default); resunet: residual encoder; deeplabv3plus: ASPP head on an --encoder",
)
@click.option(
    "--encoder",
    type=click.Choice(
        ["resnet50", "efficientnetv2b0", "efficientnetv2s", "mobilenetv3small", "mobilenetv3large", "convnext_tiny"]
    ),
    default=None,
    help="a keras.applications backbone (input: raw pixels; size a multiple of 32)",
)
@click.option(
    "--encoder-weights",
    default=None,
    help="imagenet (default; downloaded by Keras: needs network access), none, or a backbone weights file",
)
@click.option("--loss", type=click.Choice(["ce", "dice", "ce+dice"]), default=None)
@click.option(
    "--class-weights",
    type=click.Choice(["none", "inverse_frequency", "inverse_sqrt_frequency"]),
    default=None,
    help="cross-entropy weights by class from the pixel shares (default: the plan's)",
)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None)
@click.option("--schedule", type=click.Choice(["constant", "cosine", "step"]), default=None, help="(default: cosine)")
@click.option("--warmup-epochs", type=float, default=None)
@click.option("--patience", type=int, default=None, help="early stop after N epochs without val mIoU gain")
@click.option("--mixed-precision", type=click.Choice(["auto", "off", "bfloat16", "float16"]), default=None)
@click.option("--max-failures", type=int, default=None, help="worker-group restarts from the last checkpoint")
@click.option("--cpus-per-worker", type=float, default=None)
@click.option("--gpus-per-worker", type=float, default=None)
@click.option("--resume/--no-resume", default=None, help="continue from the last checkpoint in OUT (default: on)")
@click.option(
    "--tta-check/--no-tta-check",
    default=None,
    help="measure whether flip TTA pays on the val split; the card advises infer (default: on)",
)
@click.option(
    "--time-budget",
    default=None,
    help="training time, e.g. 40m or 2h: the plan's epochs fit it and training stops inside it "
    "(default: the plan's, from the data set size)",
)
@click.option(
    "--plan/--no-plan",
    default=None,
    help="options you do not give come from `raysegment plan` for DATA (default: on); --no-plan: fixed defaults",
)
@click.option(
    "--mlflow-uri",
    default=None,
    help="MLflow tracking URI: log params, per-epoch metrics, the plan, card and model (extra: raysegment[mlflow])",
)
@endpoint_option
@config_option
@json_option
@handle_errors
def train(config: str | None, as_json: bool, **flags: Any) -> None:
    """Train a U-Net on the data set DATA with Ray Train; write the model to OUT.

    Options you do not give (on the command line or in --config) are the ones `raysegment plan DATA`
    prints for the same --workers, --gpus-per-worker, --cpus-per-worker and --time-budget."""
    if flags.pop("no_flip"):
        flags["flip"] = "none"
    _run(load_spec(TrainSpec, config, flags), as_json)


@main.command()
@click.argument("model", required=False)
@click.argument("data", required=False)
@click.option("--split", default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--out", default=None, help="metrics JSON URI (default: MODEL/eval-SPLIT.json)")
@click.option("--tta-flip/--no-tta-flip", default=None, help="flip TTA, as infer (default: the card's advice)")
@endpoint_option
@config_option
@json_option
@handle_errors
def evaluate(config: str | None, as_json: bool, **flags: Any) -> None:
    """Evaluate MODEL on a split of the data set DATA (pixel accuracy, mIoU, Dice)."""
    _run(load_spec(EvaluateSpec, config, flags), as_json)


@main.command()
@click.argument("output", required=False)
@click.option("--summary-rows", type=int, default=None, help="target rows per merged file (default 100000)")
@click.option("--include-unfinished", is_flag=True, default=None, help="also merge runs without a run record")
@click.option("--storage-retry-s", type=float, default=None, help="retry unreachable object storage this long")
@endpoint_option
@config_option
@json_option
@handle_errors
def compact(config: str | None, as_json: bool, **flags: Any) -> None:
    """Merge the small summary files of finished runs under OUTPUT into large ones (readers stay safe)."""
    _run(load_spec(CompactSpec, config, flags), as_json)


@main.command()
@click.argument("model", required=False)
@click.argument("input", required=False)
@click.argument("output", required=False)
@infer_options
@click.option(
    "--retry-errors", is_flag=True, default=None, help="resume, and redo the keys whose rows are errors (not ok ones)"
)
@endpoint_option
@config_option
@json_option
@handle_errors
def infer(config: str | None, as_json: bool, **flags: Any) -> None:
    """Segment every image under INPUT with MODEL; write masks and summaries to OUTPUT."""
    _run(load_spec(InferSpec, config, flags), as_json)


@main.command()
@click.argument("model", required=False)
@click.option("--replicas", default=None, help="MIN[:MAX] replicas (default 1); MIN < MAX autoscales on load")
@click.option("--gpus-per-replica", type=float, default=None, help="default 0")
@click.option("--cpus-per-replica", type=float, default=None, help="CPUs and TF threads per replica (default 1)")
@click.option("--host", default=None, help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
@click.option("--port", type=int, default=None, help="HTTP port (default 8000)")
@click.option("--max-batch-size", type=int, default=None, help="requests predicted together (default 8)")
@click.option("--batch-wait-timeout-s", type=float, default=None, help="how long a batch waits to fill (default 0.01)")
@click.option("--max-body-mb", type=float, default=None, help="larger bodies get 413 (default 32)")
@click.option(
    "--body-timeout-s", type=float, default=None, help="a body not received within this long gets 408 (default 60)"
)
@click.option("--max-pixels", type=int, default=None, help="larger images get 413 (default 100000000)")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None)
@click.option("--tta-flip/--no-tta-flip", default=None, help="flip TTA, as infer (default: the card's advice)")
@click.option("--ready-timeout-s", type=float, default=None, help="wait this long for the model to load (600)")
@click.option(
    "--drain-timeout-s", type=float, default=None, help="on Ctrl-C/SIGTERM, requests in flight get this long (20)"
)
@click.option("--storage-retry-s", type=float, default=None, help="retry unreachable object storage this long")
@endpoint_option
@config_option
@json_option
@handle_errors
def serve(config: str | None, as_json: bool, **flags: Any) -> None:
    """Serve MODEL over HTTP (Ray Serve) until Ctrl-C: POST an image to /segment, get its mask (PNG or JSON)."""
    _run(load_spec(ServeSpec, config, flags), as_json)


@main.command()
@click.option("--out", default="raysegment-demo", show_default=True, help="local folder for everything the demo writes")
# Checked before the demo prepares anything: a bad value fails in a second, not after the data set is written.
@click.option("--epochs", type=click.IntRange(1, 100_000), default=6, show_default=True)
@handle_errors
def demo(out: str, epochs: int) -> None:
    """Synthetic data -> prepare -> train (2 workers) -> evaluate -> infer, on local Ray."""
    with session("demo", out) as s:
        from raysegment.demo import demo_lines, run_demo  # loads TensorFlow: inside, so its notices go to the log
        from raysegment.runtime import init_ray

        init_ray(min_cpus=3)
        s.done(demo_lines(run_demo(out, epochs=epochs)), None)


main.add_command(bench)


@main.command()
@click.argument("run_uri")
@click.option("--run-id", default=None, help="run record to show (default: the one _SUCCESS names, else the newest)")
@click.option(
    "--samples", type=click.IntRange(0, 1000), default=16, show_default=True, help="overlays in the contact sheet"
)
@click.option(
    "--storage-retry-s",
    type=FiniteRange(0, 86400),
    default=None,
    help="retry unreachable object storage this long, then fail (default: RAYSEGMENT_STORAGE_RETRY_S or 120)",
)
@endpoint_option
@json_option
@handle_errors
def report(
    run_uri: str,
    run_id: str | None,
    samples: int,
    storage_retry_s: float | None,
    endpoint_url: str | None,
    as_json: bool,
) -> None:
    """(Re)write RUN_URI/report.html and overlays.png from an inference output's summaries and masks."""
    from raysegment.report import write_run_report

    with session("report", run_uri, as_json) as s:
        r = write_run_report(run_uri, run_id, samples, endpoint_url, storage_retry_s)
        which = f"run {r['run_id']}" if r["run_id"] else "an output without a run record (killed or running)"
        lines = [
            f"report for {which}: {r['rows']} rows ({r['ok']} ok, {r['error']} errors), {r['samples']} overlays",
            f"  {r['report']}",
            f"  {r['overlays']}",
        ]
        s.done(lines, r)


@main.command()
@click.argument("image_uri")
@click.option("--model", "model_uri", required=True, help="trained model directory (model.keras + model.json)")
@click.option("--out", default=None, help="overlay PNG to write (default: IMAGE name + .overlay.png, here)")
@click.option(
    "--alpha",
    type=FiniteRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="mask colour share",
)
@click.option("--tta-flip/--no-tta-flip", default=None, help="flip TTA, as infer (default: the card's advice)")
@endpoint_option
@handle_errors
def show(
    image_uri: str, model_uri: str, out: str | None, alpha: float, tta_flip: bool | None, endpoint_url: str | None
) -> None:
    """Segment one image with MODEL and write it with the mask blended in palette colours."""
    with session("show") as s:
        from raysegment.show import show_overlay  # TensorFlow loads here: its start-up notices go to the log

        r = show_overlay(image_uri, model_uri, out, alpha, endpoint_url, tta_flip)
        shares = ", ".join(f"{name} {share:.1%}" for name, share in r["class_fractions"].items() if share > 0)
        view = f", a {r['view'][1]}x{r['view'][0]} view" if "view" in r else ""  # a big raster's overlay
        s.done([f"wrote {r['out']} ({r['width']}x{r['height']}{view}, width x height): {shares}"], None)


@main.group("model")
def model_group() -> None:
    """Bring a model from elsewhere into raysegment."""


@model_group.command("import")
@click.argument("model_file", required=False)
@click.argument("dest", required=False)
@click.option("--classes", default=None, help="class names in output-channel order, comma-separated")
@click.option("--input-size", default=None, help="H,W the model takes (images are resized to it), or native")
@click.option(
    "--normalize",
    type=click.Choice(["scale_0_1", "scale_-1_1", "raw_0_255", "imagenet"]),
    default=None,
    help="what the model expects: uint8 RGB scaled to [0,1] (default), [-1,1], kept 0-255, or ImageNet mean/std",
)
@click.option(
    "--output",
    type=click.Choice(["auto", "logits", "probabilities"]),
    default=None,
    help="what the model outputs per pixel; auto (default): probabilities when its last layer is softmax/sigmoid",
)
@click.option("--palette", default=None, help="mask colours 'R,G,B;R,G,B;...', one per class (default: VOC's)")
@click.option("--size-multiple", type=int, default=None, help="native: pad H and W to a multiple (default 32)")
@click.option("--overwrite", is_flag=True, default=None)
@click.option("--storage-retry-s", type=float, default=None, help="retry unreachable object storage this long")
@endpoint_option
@config_option
@json_option
@handle_errors
def model_import(config: str | None, as_json: bool, **flags: Any) -> None:
    """Wrap the segmentation model MODEL_FILE (.keras, or a SavedModel folder) with a model card in DEST."""
    _run(load_spec(ImportSpec, config, flags), as_json)


@main.command("export")
@click.argument("model", required=False)
@click.argument("dest", required=False)
@click.option("--format", "format", type=click.Choice(["saved_model", "onnx", "tflite"]), default=None)
@click.option("--probabilities", is_flag=True, default=None, help="also output per-class probabilities (HxWxK)")
@click.option(
    "--tta-flip/--no-tta-flip", default=None, help="flip TTA in the graph, as infer (default: the card's advice)"
)
@click.option("--overwrite", is_flag=True, default=None)
@click.option("--storage-retry-s", type=float, default=None, help="retry unreachable object storage this long")
@endpoint_option
@config_option
@json_option
@handle_errors
def export_model(config: str | None, as_json: bool, **flags: Any) -> None:
    """Export MODEL to DEST (a folder, local or s3://) as one graph: uint8 image in, class map at its size out."""
    _run(load_spec(ExportSpec, config, flags), as_json)


address_option = click.option(
    "--address", default=None, help="Ray Jobs API, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)"
)


@main.command()
@click.argument("spec_file", metavar="[SPEC]", required=False)
@click.option("--model", default=None, help="trained model directory")
@click.option("--input", "input", default=None, help="prefix of images, listed every night")
@click.option("--output", default=None, help="date partitions, ledger and reports go here")
@click.option("--date", default=None, help="the night, YYYY-MM-DD (default: today, UTC)")
@click.option("--drift-threshold", type=float, default=None, help="flag a class mean fraction shift above this")
@click.option(
    "--allow-empty-input", is_flag=True, default=None, help="an INPUT with no images is not an error (see README)"
)
@infer_options
@endpoint_option
@json_option
@handle_errors
def nightly(spec_file: str | None, as_json: bool, **flags: Any) -> None:
    """Infer only new or changed images under INPUT into OUTPUT/date=D; ledger + report.

    Exit codes: 0 ok (also nothing new), 2 user error, 3 the job failed, 4 drift flagged,
    5 another nightly run holds the lock.
    """
    _run(load_spec(NightlySpec, spec_file, flags), as_json)


@main.command()
@click.argument("kind", type=click.Choice(registry.CLUSTER_KINDS))
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
def submit(**request: Any) -> None:
    """Submit a job spec to a Ray cluster (Ray Jobs API); a spec whose job is pending, running or done
    (succeeded, or a nightly that flagged drift) is not run twice; one stopped or failed runs again as ID-r2...

    Exit codes: 0 submitted, run again, or already submitted; with --wait, the job's own exit code
    (0 ok, 2 user error, 3 failed, 4 nightly drift, 5 nightly locked).
    """
    from raysegment import jobs

    code = jobs.submit_and_follow(jobs.Submission(**request), lambda text: click.echo(text, nl=False))
    if code:
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
    exit_code = "-" if (code := jobs.exit_code(info)) is None else code
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
        try:
            jobs.wait(client, job_id, lambda chunk: click.echo(chunk, nl=False))
        except KeyboardInterrupt as exc:
            click.echo(f"{job_id}: {jobs.still_running(job_id)}", err=True)
            setattr(exc, FOLLOWING, True)
            raise
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
