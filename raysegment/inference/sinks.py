"""Inference outputs: masks (PNG per image, or packed per batch) and summary Parquet files.

Each batch writes its masks first and its summary file last, under a name derived
from the batch's keys. A key counts as done only once its summary row exists, so
a job killed at any point leaves at worst masks that the re-run rewrites under
the same names (or, for packed formats, an orphan pack no summary points to).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysegment import storage
from raysegment.data import imaging

MASK_FORMATS = ("png", "npz", "packed")


def summary_schema(class_names: list[str]) -> pa.Schema:
    """The summaries' columns; class names travel in the file metadata."""
    return pa.schema(
        [
            ("key", pa.string()),
            ("source_uri", pa.string()),
            ("mask_uri", pa.string()),
            ("mask_offset", pa.int64()),
            ("mask_length", pa.int64()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("class_fractions", pa.list_(pa.float32())),
            ("mean_confidence", pa.float32()),
            ("model_id", pa.string()),
            ("model_sha256", pa.string()),
            ("run_id", pa.string()),
            ("decode_ms", pa.float32()),
            ("predict_ms", pa.float32()),
            ("write_ms", pa.float32()),
        ],
        metadata={"raysegment.class_names": json.dumps(class_names)},
    )


def batch_name(keys: np.ndarray) -> str:
    """A stable file name for a batch, from its keys."""
    h = hashlib.sha256()
    for k in keys:
        h.update(str(k).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def write_outputs(
    batch: dict[str, np.ndarray], output: storage.Location, card: dict[str, Any], run_id: str, mask_format: str
) -> dict[str, np.ndarray]:
    """Resize predictions to the original size, write masks then the batch's summary file."""
    n = len(batch["key"])
    k = card["num_classes"]
    name = batch_name(batch["key"])
    cols: dict[str, list[Any]] = {
        f: [] for f in ("mask_uri", "mask_offset", "mask_length", "status", "class_fractions", "write_ms")
    }
    pack = io.BytesIO()
    arrays: dict[str, np.ndarray] = {}
    pack_loc = output.child("masks", f"part-{name}.{'npz' if mask_format == 'npz' else 'bin'}")
    for i in range(n):
        t0 = time.perf_counter()
        uri, offset, length = "", -1, -1
        if batch["error"][i]:
            cols["status"].append("error")
            cols["class_fractions"].append([0.0] * k)
        else:
            mask = imaging.resize_mask(batch["pred"][i], (int(batch["height"][i]), int(batch["width"][i])))
            key = str(batch["key"][i])
            if mask_format == "png":
                target = output.child("masks", f"{key}.png")
                storage.write_bytes(target, imaging.encode_mask(mask, card["palette"]))
                uri = target.uri
            elif mask_format == "npz":
                arrays[key] = mask
                uri = f"{pack_loc.uri}#{key}"
            else:
                png = imaging.encode_mask(mask, card["palette"])
                offset, length = pack.tell(), len(png)
                pack.write(png)
                uri = pack_loc.uri
            counts = np.bincount(mask.ravel(), minlength=k)[:k]
            cols["status"].append("ok")
            cols["class_fractions"].append((counts / max(mask.size, 1)).tolist())
        cols["mask_uri"].append(uri)
        cols["mask_offset"].append(offset)
        cols["mask_length"].append(length)
        cols["write_ms"].append((time.perf_counter() - t0) * 1000)
    if mask_format == "npz" and arrays:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        storage.write_bytes(pack_loc, buf.getvalue())
    elif mask_format == "packed" and pack.tell():
        storage.write_bytes(pack_loc, pack.getvalue())

    schema = summary_schema(card["class_names"])
    table = pa.table(
        {
            "key": batch["key"].astype(str),
            "source_uri": batch["source_uri"].astype(str),
            "mask_uri": cols["mask_uri"],
            "mask_offset": cols["mask_offset"],
            "mask_length": cols["mask_length"],
            "height": batch["height"].astype(np.int32),
            "width": batch["width"].astype(np.int32),
            "status": cols["status"],
            "error": batch["error"].astype(str),
            "class_fractions": cols["class_fractions"],
            "mean_confidence": batch["mean_confidence"].astype(np.float32),
            "model_id": [card["model_id"]] * n,
            "model_sha256": [card["model_sha256"]] * n,
            "run_id": [run_id] * n,
            "decode_ms": batch["decode_ms"].astype(np.float32),
            "predict_ms": batch["predict_ms"].astype(np.float32),
            "write_ms": np.asarray(cols["write_ms"], np.float32),
        },
        schema=schema,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    # The summary is the batch's commit: written last, atomically, under a stable name.
    storage.write_bytes(output.child("summaries", f"run={run_id}", f"part-{name}.parquet"), buf.getvalue())
    ok = int(sum(s == "ok" for s in cols["status"]))
    return {"rows": np.asarray([n]), "ok": np.asarray([ok]), "error": np.asarray([n - ok])}


def summary_files(output: storage.Location) -> list[str]:
    """Paths of every summary file of every run under OUTPUT."""
    return storage.parquet_files(output.child("summaries"))


def read_done(output: storage.Location) -> tuple[set[str], set[str]]:
    """(keys with a summary row, model hashes that wrote them) from all earlier runs."""
    keys: set[str] = set()
    models: set[str] = set()
    for path in summary_files(output):
        table = storage.read_table(output, path, columns=["key", "model_sha256"])
        keys.update(table.column("key").to_pylist())
        models.update(table.column("model_sha256").unique().to_pylist())
    return keys, models
