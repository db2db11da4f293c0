"""`infer`: a streaming Ray Data job, read -> decode (CPU) -> predict (actor pool) -> write (CPU).

Masks are written inside a UDF under keys derived from the input (Ray Data's own
file sinks name files by uuid). Summaries go under a prefix of this run, and
``runs/{run_id}.json`` then ``_SUCCESS`` are written last: an output without
the marker is never complete.
"""

from __future__ import annotations

import logging
import posixpath
import time
import uuid
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from raysegment import __version__, storage
from raysegment.config import InferSpec
from raysegment.data import imaging
from raysegment.errors import DataError
from raysegment.inference.predictor import Predictor, load_model_card, preprocess

log = logging.getLogger(__name__)


def key_for(path: str, root: str) -> str:
    """Output key of an input file: its path below the input root, without extension."""
    rel = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
    return posixpath.splitext(rel)[0]


def read_files(batch: dict[str, np.ndarray], input_loc: storage.Location) -> dict[str, np.ndarray]:
    """Read each file's bytes; a failed read becomes an error row, not a failed task."""
    paths = batch["path"]
    data, errors = [], []
    for p in paths:
        try:
            data.append(input_loc.fs.cat_file(p))
            errors.append("")
        except OSError as exc:
            data.append(b"")
            errors.append(f"cannot read: {exc}")
    return {
        "key": batch["key"],
        "source_uri": np.asarray([f"s3://{p}" if input_loc.remote else p for p in paths], dtype=object),
        "bytes": np.asarray(data, dtype=object),
        "error": np.asarray(errors, dtype=object),
    }


def write_masks(
    batch: dict[str, np.ndarray], output_loc: storage.Location, card: dict[str, Any], run_id: str
) -> dict[str, np.ndarray]:
    """Resize predictions to the original size, write masks, and emit one summary row each."""
    n = len(batch["key"])
    num_classes = card["num_classes"]
    fractions, mask_uris, status, write_ms = [], [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        if batch["error"][i]:
            fractions.append([0.0] * num_classes)
            mask_uris.append("")
            status.append("error")
        else:
            mask = imaging.resize_mask(batch["pred"][i], (int(batch["height"][i]), int(batch["width"][i])))
            target = output_loc.child("masks", f"{batch['key'][i]}.png")
            storage.write_bytes(target, imaging.encode_mask(mask, card["palette"]))
            counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
            fractions.append((counts / max(mask.size, 1)).astype(np.float64).tolist())
            mask_uris.append(target.uri)
            status.append("ok")
        write_ms.append((time.perf_counter() - t0) * 1000)
    return {
        "key": batch["key"],
        "source_uri": batch["source_uri"],
        "mask_uri": np.asarray(mask_uris, dtype=object),
        "height": batch["height"],
        "width": batch["width"],
        "status": np.asarray(status, dtype=object),
        "error": batch["error"],
        "class_fractions": np.asarray(fractions, dtype=np.float64).reshape(n, num_classes),
        "mean_confidence": batch["mean_confidence"],
        "model_id": np.asarray([card["model_id"]] * n, dtype=object),
        "run_id": np.asarray([run_id] * n, dtype=object),
        "decode_ms": batch["decode_ms"],
        "predict_ms": batch["predict_ms"],
        "write_ms": np.asarray(write_ms, np.float32),
    }


def list_inputs(input_loc: storage.Location, extensions: list[str]) -> list[dict[str, str]]:
    """Every file under INPUT with an image extension (case-insensitive), as (key, path) rows."""
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    paths = storage.list_files(input_loc, exts)
    root = input_loc.path.rstrip("/")
    return [{"key": key_for(p, root), "path": p} for p in paths]


def infer(spec: InferSpec) -> dict[str, Any]:
    """Run batch inference; returns the run record written to runs/{run_id}.json."""
    t0 = time.time()
    card = load_model_card(spec.model, spec.endpoint_url)
    input_loc = storage.resolve(spec.input, spec.endpoint_url)
    output_loc = storage.resolve(spec.output, spec.endpoint_url)
    storage.check_readable(input_loc)
    storage.check_writable(output_loc)
    storage.remove_success(output_loc)
    rows = list_inputs(input_loc, spec.extensions)
    if not rows:
        raise DataError(f"{input_loc.uri}: no image files found (extensions: {', '.join(spec.extensions)})")
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    size = tuple(card["input"]["size"])

    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // spec.batch_size, 1000)))
    ds = ds.map_batches(
        read_files, fn_kwargs={"input_loc": input_loc}, batch_size=spec.batch_size, batch_format="numpy"
    )
    ds = ds.map_batches(
        preprocess,
        fn_kwargs={"size": size, "max_pixels": spec.max_pixels},
        batch_size=spec.batch_size,
        batch_format="numpy",
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_uri": spec.model, "endpoint_url": spec.endpoint_url},
        batch_size=spec.batch_size,
        batch_format="numpy",
        num_gpus=spec.gpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=spec.actors),
    )
    ds = ds.map_batches(
        write_masks,
        fn_kwargs={"output_loc": output_loc, "card": card, "run_id": run_id},
        batch_size=spec.batch_size,
        batch_format="numpy",
    )
    summaries = output_loc.child("summaries", f"run={run_id}")
    ds.write_parquet(summaries.path, filesystem=output_loc.arrow_fs())

    status = _read_status(summaries)
    counts = {
        "total": len(status),
        "ok": int(sum(s == "ok" for s in status)),
        "error": int(sum(s == "error" for s in status)),
    }
    if counts["total"] != len(rows):
        raise RuntimeError(
            f"{output_loc.uri}: wrote {counts['total']} summary rows for {len(rows)} inputs; run incomplete"
        )
    seconds = time.time() - t0
    record = {
        "run_id": run_id,
        "model_id": card["model_id"],
        "model_sha256": card.get("model_sha256"),
        "input": storage.redact(spec.input),
        "output": storage.redact(spec.output),
        "counts": counts,
        "seconds": round(seconds, 2),
        "images_per_second": round(len(rows) / seconds, 2),
        "config": spec.model_dump(),
        "raysegment": __version__,
    }
    storage.write_json(output_loc.child("runs", f"{run_id}.json"), record)
    storage.mark_success(output_loc, {"run_id": run_id})
    return record


def _read_status(summaries: storage.Location) -> list[str]:
    files = [p for p in summaries.fs.find(summaries.path) if p.endswith(".parquet")]
    out: list[str] = []
    for p in files:
        with summaries.fs.open(p, "rb") as f:
            out.extend(pq.read_table(f, columns=["status"]).column("status").to_pylist())
    return out
