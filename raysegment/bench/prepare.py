"""`bench prepare`: generate many small pairs, prepare them, report the driver's memory and throughput.

The point is the driver's peak RSS: prepare must stay flat in the data set size
because only paths, sizes and per-shard statistics ever reach the driver.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Any

import ray

from raysegment.config import PrepareSpec
from raysegment.data import synthetic
from raysegment.data.prepare import prepare

GENERATE_CHUNK = 1000


@ray.remote
def _generate(root: str, start: int, count: int, size: int) -> int:
    synthetic.write_pairs(root, count, size=size, seed=11, start=start)
    return count


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (ru_maxrss), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def current_rss_mib() -> float:
    """This process's resident set size now, in MiB (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mib()


def _tree_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def bench_prepare(pairs: int, size: int, shard_size_mb: float, workdir: str | None = None) -> dict[str, Any]:
    """Generate `pairs` synthetic pairs with Ray tasks, prepare them, and measure the driver."""
    root = workdir or tempfile.mkdtemp(prefix="raysegment-bench-prepare-")
    src, dest = os.path.join(root, "source"), os.path.join(root, "data")
    try:
        t0 = time.perf_counter()
        starts = range(0, pairs, GENERATE_CHUNK)
        ray.get([_generate.remote(src, s, min(GENERATE_CHUNK, pairs - s), size) for s in starts])
        generate_s = time.perf_counter() - t0
        source_bytes = _tree_bytes(src)
        rss_before, peak_before = current_rss_mib(), peak_rss_mib()
        t0 = time.perf_counter()
        manifest = prepare(PrepareSpec(source=src, dest=dest, shard_size_mb=shard_size_mb, overwrite=True))
        seconds = time.perf_counter() - t0
        peak_after, rss_after = peak_rss_mib(), current_rss_mib()
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    rows = manifest.counts.total
    return {
        "pairs": pairs,
        "size": size,
        "rows": rows,
        "shards": len(manifest.shards),
        "shard_size_mb": shard_size_mb,
        "source_mib": round(source_bytes / 2**20, 1),
        "generate_s": round(generate_s, 1),
        "prepare_s": round(seconds, 2),
        "pairs_per_s": round(rows / seconds, 1),
        "mib_per_s": round(source_bytes / 2**20 / seconds, 2),
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_before_mib": round(peak_before, 1),
        "peak_rss_after_mib": round(peak_after, 1),
        "rss_after_mib": round(rss_after, 1),
        "cpus": int(ray.cluster_resources().get("CPU", 0)),
    }
