"""`raysegment bench serve`: online latency and throughput of `raysegment serve` on loopback, beside `infer`'s
images/s for the same model and images.

A bounded load loop: REQUESTS POSTs of the generated PNGs from CLIENTS threads (each sends its next
request when the previous answer arrived), after one untimed round per client; latency per request
(p50/p95/p99) and images/s over the loop. Then `infer` runs over the same images with the same
cores (`bench.infer.pipeline`), so the two numbers compare serving one image per request with the
batch job.
"""

from __future__ import annotations

import http.client
import os
import socket
import tempfile
import threading
import time
from typing import Any

import numpy as np

from raysegment.bench.infer import make_model_dir, pipeline, steady_ips, write_inputs
from raysegment.config import ServeSpec
from raysegment.runtime import cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes) -> float:
    """Seconds for one POST /segment (a new connection each time, as an independent client would)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/segment", body=body, headers={"Content-Type": "image/png"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"bench serve: HTTP {r.status} from /segment")
    finally:
        conn.close()
    return time.perf_counter() - t0


def load_loop(port: int, bodies: list[bytes], requests: int, clients: int) -> tuple[list[float], float]:
    """(latencies in s, wall seconds) of `requests` POSTs from `clients` threads, request i sending bodies[i % n]."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None or errors:
                return
            try:
                seconds = _post(port, bodies[i % len(bodies)])
            except BaseException as exc:  # surfaced after the loop
                errors.append(exc)
                return
            with lock:
                latencies.append(seconds)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return latencies, wall


def bench_serve(
    requests: int,
    clients: int,
    images: int,
    image_size: int,
    depth: int,
    base_filters: int,
    max_batch_size: int,
    replicas: int,
    workdir: str | None = None,
) -> dict[str, Any]:
    from ray import serve

    from raysegment.serve import deploy, undeploy

    n_cores = cores()
    cpus = max(1.0, float(n_cores // replicas))
    with tempfile.TemporaryDirectory(dir=workdir) as root:
        model_dir = make_model_dir(root, image_size, depth, base_filters)
        input_dir = os.path.join(root, "in")
        write_inputs(input_dir, images, image_size)
        bodies = [open(os.path.join(input_dir, f), "rb").read() for f in sorted(os.listdir(input_dir))]
        spec = ServeSpec(
            model=model_dir,
            port=_free_port(),
            replicas=(replicas, replicas),
            cpus_per_replica=cpus,
            max_batch_size=max_batch_size,
        )
        t0 = time.perf_counter()
        deploy(spec)
        ready_s = time.perf_counter() - t0
        try:
            load_loop(spec.port, bodies, clients, clients)  # untimed: every client's first request
            latencies, wall = load_loop(spec.port, bodies, requests, clients)
        finally:
            undeploy()
            serve.shutdown()  # the replicas' CPUs back for infer
        infer_ips, record = pipeline(model_dir, input_dir, os.path.join(root, "out"), max_batch_size, replicas, cpus)
    ms = np.asarray(latencies) * 1000
    return {
        "requests": requests,
        "clients": clients,
        "images": images,
        "image_size": image_size,
        "model": {"depth": depth, "base_filters": base_filters},
        "cores": n_cores,
        "replicas": replicas,
        "cpus_per_replica": cpus,
        "max_batch_size": max_batch_size,
        "ready_s": round(ready_s, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "serve_ips": round(requests / wall, 1),
        "infer_ips": round(infer_ips, 1),
        "infer_steady_ips": steady_ips(record),
    }


def serve_lines(r: dict[str, Any]) -> list[str]:
    model = r["model"]
    return [
        f"bench serve: {r['requests']} requests from {r['clients']} clients over {r['images']} PNGs "
        f"{r['image_size']}x{r['image_size']}, U-Net depth {model['depth']} base {model['base_filters']}, "
        f"{r['replicas']} replica(s) x {r['cpus_per_replica']:g} CPU, batches up to {r['max_batch_size']}, "
        f"{r['cores']} cores (ready after {r['ready_s']} s)",
        f"  serve   latency p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms; "
        f"{r['serve_ips']} images/s",
        f"  infer   {r['infer_ips']} images/s end to end, {r['infer_steady_ips']} after the first batch "
        "(same model, images and cores)",
    ]
