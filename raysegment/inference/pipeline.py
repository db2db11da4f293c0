"""`infer`: a streaming Ray Data job over INPUT.

list (parallel) -> drop keys already done -> read bytes -> decode + resize (CPU tasks)
-> predict (actor pool, model loaded once per actor) -> resize back, write masks and
one summary file per batch (CPU tasks). The driver only counts. ``runs/{run_id}.json``
then ``_SUCCESS`` are written last: an output without the marker is never complete.
A re-run over the same output skips keys that already have a summary row, so a
killed job resumes without duplicates.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np
import ray

from raysegment import __version__, storage
from raysegment.config import InferSpec
from raysegment.errors import DataError, JobError
from raysegment.inference.predictor import Predictor, load_model_card, preprocess, resolve_precision
from raysegment.inference.sinks import read_done, write_outputs
from raysegment.inference.sources import source_rows

log = logging.getLogger(__name__)


def _drop_done(batch: dict[str, np.ndarray], done: list[Any]) -> dict[str, np.ndarray]:
    keys = ray.get(done[0])
    keep = np.asarray([k not in keys for k in batch["key"]], bool)
    return {name: col[keep] for name, col in batch.items()}


def clear_output(output: storage.Location) -> None:
    """--overwrite: remove the marker first, then everything an earlier run wrote."""
    storage.remove_success(output)
    for part in ("summaries", "masks", "runs"):
        storage.remove_tree(output.child(part))


def infer(spec: InferSpec) -> dict[str, Any]:
    """Run batch inference; returns the run record written to runs/{run_id}.json."""
    t0 = time.time()
    card = load_model_card(spec.model, spec.endpoint_url)
    output = storage.resolve(spec.output, spec.endpoint_url, spec.storage_retry_s)
    storage.check_readable(storage.resolve(spec.input, spec.endpoint_url, spec.storage_retry_s))
    storage.check_writable(output)
    if spec.overwrite:
        clear_output(output)
    done, models = read_done(output)
    other = models - {card["model_sha256"]}
    if other:
        raise DataError(
            f"{output.uri}: holds results of another model ({sorted(other)[0][:12]}); "
            "pass --overwrite to replace them or choose another OUTPUT"
        )
    storage.remove_success(output)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    # Let a task's StorageError/DataError reach the driver as itself (Ray Data would wrap it in a
    # UserCodeException whose cause does not survive pickling), so the CLI prints its one line.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    done_ref = ray.put(frozenset(done))

    def keep(ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.map_batches(_drop_done, fn_kwargs={"done": [done_ref]}, batch_format="numpy") if done else ds

    kind, ds = source_rows(
        spec.input,
        spec.source,
        spec.extensions,
        keep,
        spec.endpoint_url,
        spec.image_column,
        spec.key_column,
        spec.storage_retry_s,
        spec.batch_size,
    )
    decode = {
        "size": tuple(card["input"]["size"]),
        "max_pixels": spec.max_pixels,
        "resize": card["input"].get("resize") != "none",
    }
    # Tasks by default: a GPU actor should only predict, and on CPU actors decoding in the
    # actor measured the same (`raysegment bench infer --decode actor|tasks`).
    in_actor = spec.decode == "actor"
    if not in_actor:
        # Decode tasks ask for half a CPU: short tasks pack two to a core, and resources that
        # differ from the actor's keep Ray Data from fusing decoding into the predictor actor,
        # so decoding overlaps with prediction instead of taking turns with it.
        ds = ds.map_batches(
            preprocess, fn_kwargs=decode, batch_size=spec.batch_size, batch_format="numpy", num_cpus=0.5
        )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uri": spec.model,
            "endpoint_url": spec.endpoint_url,
            "tta_flip": spec.tta_flip,
            "threads": max(1, int(spec.cpus_per_actor)),
            "precision": resolve_precision(spec.precision, spec.gpus_per_actor),
            "tile_size": spec.tile_size,
            "tile_overlap": spec.tile_overlap,
            "batch_size": spec.batch_size,
            "decode": decode if in_actor else None,
        },
        batch_size=spec.batch_size,
        batch_format="numpy",
        num_gpus=spec.gpus_per_actor,
        num_cpus=spec.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(min_size=spec.actors[0], max_size=spec.actors[1]),
    )
    ds = ds.map_batches(
        write_outputs,
        fn_kwargs={"output": output, "card": card, "run_id": run_id, "mask_format": spec.mask_format},
        batch_size=spec.batch_size,
        batch_format="numpy",
    )
    new = {"rows": 0, "ok": 0, "error": 0}
    first_batch = None  # start-up cost: when the first masks were written (actor start, model load)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for name in new:
            new[name] += int(batch[name].sum())
        if first_batch is None:
            first_batch = {"seconds": round(time.time() - t0, 2), "rows": new["rows"]}

    # Check what is on storage, not what the driver counted: one row per key.
    all_keys, _ = read_done(output)
    seconds = time.time() - t0
    record = {
        "run_id": run_id,
        "status": "succeeded",
        "model_id": card["model_id"],
        "model_sha256": card["model_sha256"],
        "input": storage.redact(spec.input),
        "source": kind,
        "decoded_in": "actor" if in_actor else "tasks",
        "output": storage.redact(spec.output),
        "counts": {
            "total": len(all_keys),
            "skipped": len(done),
            "processed": new["rows"],
            "ok": new["ok"],
            "error": new["error"],
        },
        "seconds": round(seconds, 2),
        "images_per_second": round(new["rows"] / seconds, 2),
        "first_batch": first_batch,
        "config": spec.model_dump(),
        "raysegment": __version__,
    }
    problems = []
    if len(all_keys) != len(done) + new["rows"]:
        problems.append(
            f"{len(done) + new['rows']} summary rows for {len(all_keys)} distinct keys: some inputs share a key "
            "(same path with different extensions?); rename them or split the input"
        )
    if new["rows"] and new["error"] / new["rows"] > spec.max_error_fraction:
        problems.append(
            f"{new['error']} of {new['rows']} images failed, over --max-error-fraction {spec.max_error_fraction}"
        )
    if problems:
        record["status"] = "failed"
        record["problems"] = problems
    storage.write_json(output.child("runs", f"{run_id}.json"), record)
    if spec.report:
        from raysegment.report import write_run_report

        try:
            write_run_report(output.uri, run_id, endpoint_url=spec.endpoint_url)
        except Exception as exc:  # pictures must never fail a finished run; `raysegment report` redoes them
            log.warning("run report not written (%s); run `raysegment report %s`", exc, storage.redact(output.uri))
    if problems:
        raise JobError(f"{output.uri}: run {run_id} failed: " + "; ".join(problems))
    storage.mark_success(output, {"run_id": run_id})
    return record
