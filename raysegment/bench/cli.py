"""`raysegment bench ...`: the benchmark commands and what each prints before its JSON.

The measurements are in `prepare.py`, `train.py` and `infer.py`; the lines that report
them are here, beside the flags, so a new figure and its line change together. The
main CLI (`raysegment/cli.py`) only adds this group.
"""

from __future__ import annotations

from typing import Any

import click

from raysegment.console import handle_errors, json_option, session


def prepare_lines(r: dict[str, Any]) -> list[str]:
    """`bench prepare`: throughput and the driver's peak RSS before and after prepare."""
    size = r["size"]
    return [
        f"bench prepare: {r['rows']} pairs of {size}x{size} ({r['source_mib']} MiB) -> {r['shards']} shards "
        f"in {r['prepare_s']} s on {r['cpus']} CPUs: {r['pairs_per_s']} pairs/s, {r['mib_per_s']} MiB/s",
        f"driver RSS: {r['rss_before_mib']} MiB before prepare (peak so far {r['peak_rss_before_mib']} MiB); "
        f"peak after prepare {r['peak_rss_after_mib']} MiB (ru_maxrss); {r['rss_after_mib']} MiB now",
    ]


def soak_lines(r: dict[str, Any]) -> list[str]:
    """`bench soak`: throughput under actor kills and the count check."""
    return [
        f"{r['images']} images in {r['seconds']} s ({r['images_per_second']} images/s) with {r['actor_kills']} "
        f"actor kills; {r['summary_rows']} summary rows, {r['distinct_keys']} distinct keys, {r['mask_files']} masks: "
        f"{r['count_check']}"
    ]


def infer_lines(r: dict[str, Any]) -> list[str]:
    """`bench infer`: model only (a), plain baseline (b) and the pipeline (c), with c/a and c/b."""
    size, source, model = r["image_size"], r["source_size"], r["model"]
    lines = [
        f"{r['images']} images {source}x{source} -> model input {size}x{size}, "
        f"U-Net depth {model['depth']} base {model['base_filters']}, {r['cores']} cores: "
        f"model {r['model_ms_per_image']} ms/image, decode {r['decode_ms_per_image']} ms/image",
        f"  (a) model only  {r['model_only_ips']:>8} images/s   (best of one process with TF on every core "
        f"{r['model_only_one_process_ips']}, one 1-thread process per core {r['model_only_per_core_ips']})",
        f"  (b) baseline    {r['baseline_ips']:>8} images/s   (one process: tf.data, predict, write)",
        f"  (c) pipeline    {r['pipeline_ips']:>8} images/s   c/a {r['ratio_vs_model_only']}   "
        f"c/b {r['ratio_vs_baseline']}   ({r['actors']} actors x {r['cpus_per_actor']:g} CPU, "
        f"decoded in {r['decoded_in']})",
        f"      first masks after {r['pipeline_first_batch_s']} s, then {r['pipeline_steady_ips']} images/s",
    ]
    if r["one_actor"]:
        one = r["one_actor"]
        lines.append(
            f"      one actor on every core: {one['ips']} images/s ({one['steady_ips']} after the first batch)"
        )
    lines.append(f"  peak RSS MB: {r['peak_rss_mb']}")
    return lines


def train_lines(r: dict[str, Any], workers: int) -> list[str]:
    """`bench train`: plain Keras vs Ray Train 1 worker at equal cores; N workers vs 1 worker at cores/N each."""
    cores, share, model, aug = r["cores"], r["cpus_per_worker"], r["model"], r["augmentation"]
    shown = ["none"]
    if aug:
        shown = [f"flip {aug['flip']}"] + ["rotate90"] * aug["rotate90"]
        jitter = ("scale_jitter", "rotate", "elastic", "brightness", "contrast", "gamma", "noise")
        shown += [f"{k} {aug[k]:g}" for k in jitter if aug[k]]
    met = {True: "met", False: "MISSED"}
    many, scaling = r[f"ray_train_{workers}_workers_ips"], r[f"scaling_{workers}_workers_vs_1"]
    pinned = f", Ray node pinned to {share} core(s) for the 1-worker run" if r["pinned"] else ""
    return [
        f"{r['images']} {r['data']} images {r['image_size']}x{r['image_size']}, U-Net depth {model['depth']} "
        f"base {model['base_filters']}, loss {r['loss']}, {r['normalization']}, global batch {r['global_batch']}, "
        f"{r['epochs_timed']} epochs timed, {cores} cores",
        f"  augmentation (the plan's, on both sides): {', '.join(shown)}",
        f"  equal cores ({cores}):",
        f"    plain Keras, tf.data, 1 process  {r['plain_keras_ips']:>8} images/s   "
        f"(best of {r['plain_keras_runs_ips']}, before and after; TF threads {r['plain_keras_threads']})",
        f"    Ray Train, 1 worker x {cores} CPUs    {r['ray_train_1_worker_ips']:>8} images/s   "
        f"ratio {r['ratio_1_worker_vs_plain']}, overhead {r['overhead_equal_cores']:.1%} "
        f"(target <= 5%: {met[r['overhead_target_met']]})",
        f"  scaling ({share} CPU and batch {r['per_worker_batch']} per worker{pinned}):",
        f"    Ray Train, 1 worker x {share} CPU     {r['ray_train_1_worker_share_ips']:>8} images/s",
        f"    Ray Train, {workers} workers x {share} CPU   {many:>8} images/s   "
        f"x{scaling} of 1 worker (target >= x{r['scaling_target']:g}: {met[r['scaling_target_met']]}), "
        f"ratio to plain Keras {r[f'ratio_{workers}_workers_vs_plain']}",
    ]


@click.group()
def bench() -> None:
    """Benchmarks: each prints its measurements, then them as JSON (--json: only the JSON object)."""


@bench.command("prepare")
@click.option("--pairs", type=int, default=20_000, show_default=True, help="synthetic pairs to generate")
@click.option("--size", type=int, default=32, show_default=True, help="image side in pixels")
@click.option("--shard-size-mb", type=float, default=4.0, show_default=True, help="small, so there are many shards")
@click.option("--workdir", default=None, help="keep source and data set here (default: a temp folder, removed)")
@json_option
@handle_errors
def bench_prepare(pairs: int, size: int, shard_size_mb: float, workdir: str | None, as_json: bool) -> None:
    """Generate PAIRS small pairs, prepare them, print the driver's peak RSS and the throughput."""
    from raysegment.bench.prepare import bench_prepare as run
    from raysegment.runtime import init_ray

    with session("bench-prepare", None, as_json) as s:
        init_ray()
        r = run(pairs, size, shard_size_mb, workdir)
        s.done(prepare_lines(r), r, json_too=True)


@bench.command("soak")
@click.option("--images", type=int, default=100_000, show_default=True)
@click.option("--kill-every", type=float, default=30.0, show_default=True, help="seconds between actor kills")
@click.option("--image-size", type=int, default=32, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--actors", type=int, default=1, show_default=True)
@click.option("--workdir", default=None, help="temp folder location (default: system temp)")
@json_option
@handle_errors
def bench_soak(
    images: int, kill_every: float, image_size: int, batch_size: int, actors: int, workdir: str | None, as_json: bool
) -> None:
    """Inference over generated images while a predictor actor is SIGKILLed every N seconds; then a count check."""
    from raysegment.bench.infer import bench_soak as run
    from raysegment.runtime import cores, init_ray

    with session("bench-soak", None, as_json) as s:
        init_ray(min_cpus=cores() + 1)  # as bench infer: the actors' cores plus a slot for the read and write tasks
        r = run(images, kill_every, image_size, batch_size, actors, workdir)
        s.done(soak_lines(r), r, 0 if r["count_check"] == "ok" else 3, json_too=True)
    if s.exit_code:
        raise SystemExit(s.exit_code)


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
    help="predictor actors sharing the cores (default: one per core)",
)
@click.option("--decode", type=click.Choice(["tasks", "actor"]), default="tasks", show_default=True)
@click.option("--compare-one-actor", is_flag=True, help="also run (c) with one actor on every core")
@click.option("--workdir", default=None, help="temp folder location (default: system temp)")
@json_option
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
    workdir: str | None,
    as_json: bool,
) -> None:
    """Model only (a) vs plain baseline (b) vs raysegment's pipeline (c), on the same images."""
    from raysegment.bench.infer import bench_infer as run
    from raysegment.runtime import cores, init_ray

    with session("bench-infer", None, as_json) as s:
        # The actors take every core (equal cores with the in-process measurements); one more
        # logical CPU lets the decode and write tasks run beside them.
        init_ray(min_cpus=cores() + 1)
        r = run(
            images,
            image_size,
            depth,
            base_filters,
            batch_size,
            actors or cores(),
            workdir,
            decode=decode,
            source_size=source_size,
            compare_one_actor=compare_one_actor,
        )
        s.done(infer_lines(r), r, json_too=True)


@bench.command("io")
@click.option("--objects", type=int, default=400, show_default=True)
@click.option("--size", type=int, default=2000, show_default=True, help="bytes per object")
@json_option
@handle_errors
def bench_io(objects: int, size: int, as_json: bool) -> None:
    """Small objects on a loopback S3 server: one request at a time, 16 in flight, and infer's list source."""
    from raysegment.bench.scale import bench_io as run
    from raysegment.bench.scale import io_lines

    with session("bench-io", None, as_json) as s:
        r = run(objects, size)
        s.done(io_lines(r), r, json_too=True)


@bench.command("scale")
@click.option("--images", type=int, default=1_000_000, show_default=True, help="the larger size (N/10 runs first)")
@click.option("--store", type=click.Choice(["s3", "local"]), default="s3", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workdir", default=None, help="temp folder location (default: system temp)")
@json_option
@handle_errors
def bench_scale(images: int, store: str, batch_size: int, workdir: str | None, as_json: bool) -> None:
    """Archive costs at N/10 and N tiny images: fresh run, no-op re-run, half-done run, memory, files."""
    from raysegment.bench.scale import bench_scale as run
    from raysegment.bench.scale import scale_lines

    with session("bench-scale", None, as_json) as s:
        r = run(images, store, batch_size, workdir)
        s.done(scale_lines(r), r, json_too=True)


@bench.command("train")
@click.option("--images", type=int, default=400, show_default=True)
@click.option(
    "--image-size",
    type=int,
    default=128,
    show_default=True,
    help="at 64 px a step is so short that per-step and per-epoch fixed costs dominate",
)
@click.option("--depth", type=int, default=3, show_default=True)
@click.option("--base-filters", type=int, default=16, show_default=True)
@click.option("--global-batch", type=int, default=16, show_default=True)
@click.option("--epochs", type=int, default=4, show_default=True, help="the first is warm-up, not timed")
@click.option("--workers", type=int, default=2, show_default=True, help="the scaling run's (cores/N CPUs each)")
@click.option(
    "--data",
    type=click.Choice(["grey", "rgb"]),
    default="grey",
    show_default=True,
    help="synthetic data: grey gets the plan's warps, gamma and noise; rgb flips, turns and jitter",
)
@json_option
@handle_errors
def bench_train(
    images: int,
    image_size: int,
    depth: int,
    base_filters: int,
    global_batch: int,
    epochs: int,
    workers: int,
    data: str,
    as_json: bool,
) -> None:
    """Ray Train vs a plain Keras loop (same model, data, plan's augmentation) at equal cores; N workers' scaling."""
    from raysegment.bench.train import bench_train as run
    from raysegment.runtime import cores, init_ray

    with session("bench-train", None, as_json) as s:
        init_ray(min_cpus=cores() + 1)  # the Ray Train runs use every core; one more slot for the data tasks
        r = run(images, image_size, depth, base_filters, global_batch, epochs, workers, data)
        s.done(train_lines(r, workers), r, json_too=True)


@bench.command("checksums")
@click.option("--rows", type=int, default=1000, show_default=True, help="images in the shard")
@click.option("--image-size", type=int, default=512, show_default=True, help="side of each grey PNG")
@click.option("--repeats", type=int, default=7, show_default=True, help="reads of each kind (median)")
@json_option
@handle_errors
def bench_checksums(rows: int, image_size: int, repeats: int, as_json: bool) -> None:
    """A shard read with and without its page CRCs checked, beside decoding its images (one core, no Ray)."""
    from raysegment.bench.checksums import bench_checksums as run
    from raysegment.bench.checksums import checksum_lines

    with session("bench-checksums", None, as_json) as s:
        r = run(rows, image_size, repeats)
        s.done(checksum_lines(r), r, json_too=True)


@bench.command("serve")
@click.option("--requests", type=int, default=400, show_default=True, help="timed POSTs, after one per client")
@click.option("--clients", type=int, default=8, show_default=True, help="client threads, one request in flight each")
@click.option("--images", type=int, default=256, show_default=True, help="distinct generated PNGs, sent in turn")
@click.option("--image-size", type=int, default=128, show_default=True, help="model input and image side")
@click.option("--depth", type=int, default=4, show_default=True)
@click.option("--base-filters", type=int, default=16, show_default=True)
@click.option("--max-batch-size", type=int, default=8, show_default=True, help="serve's batches and infer's")
@click.option("--replicas", type=int, default=1, show_default=True, help="sharing the cores (and infer's actors)")
@click.option("--workdir", default=None, help="temp folder location (default: system temp)")
@json_option
@handle_errors
def bench_serve(as_json: bool, **opts: Any) -> None:
    """`raysegment serve` under a bounded load on loopback (p50/p95/p99, images/s) next to `infer`'s images/s."""
    from raysegment.bench.serve import bench_serve as run
    from raysegment.bench.serve import serve_lines
    from raysegment.runtime import cores, init_ray

    with session("bench-serve", None, as_json) as s:
        init_ray(min_cpus=cores() + 1)  # as bench infer: the replicas' (then actors') cores plus one for tasks
        r = run(**opts)
        s.done(serve_lines(r), r, json_too=True)
