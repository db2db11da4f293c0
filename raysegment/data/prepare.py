"""`prepare`: labelled images -> Parquet shards + manifest.json, built by Ray tasks.

Each shard is one Ray task (read, validate, write), so the work spreads over the
cluster and the driver holds only the pair list and per-shard statistics.
The manifest is written last and is the commit: readers open only the shards it
lists, and an old manifest is removed before anything is rewritten.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raysegment import __version__, storage
from raysegment.config import PrepareSpec
from raysegment.data import imaging
from raysegment.data.layouts import Pair, assign_split, pairs_layout
from raysegment.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("split", pa.string()),
    ]
)
MAX_REPORTED = 20


def _plan_shards(pairs: list[tuple[Pair, str]], target_bytes: int) -> list[tuple[str, list[Pair]]]:
    """Group pairs by split into shards of about target_bytes of image data."""
    shards: list[tuple[str, list[Pair]]] = []
    for split in ("train", "val"):
        current: list[Pair] = []
        size = 0
        for pair, s in pairs:
            if s != split:
                continue
            current.append(pair)
            size += pair.image_bytes * 2  # mask bytes are unknown before reading; count the image twice
            if size >= target_bytes:
                shards.append((split, current))
                current, size = [], 0
        if current:
            shards.append((split, current))
    return shards


@ray.remote
def _write_shard(
    dest: storage.Location, name: str, split: str, pairs: list[Pair], source: storage.Location, num_classes: int | None
) -> dict[str, Any]:
    """Read, validate and write one shard; return its statistics and the invalid pairs."""
    rows: dict[str, list[Any]] = {f: [] for f in SHARD_SCHEMA.names}
    hist = np.zeros(256, np.int64)
    invalid: list[dict[str, str]] = []
    for pair in pairs:
        problem = None
        if pair.image is None:
            problem = "mask without image"
        elif pair.mask is None:
            problem = "image without mask"
        else:
            img_bytes = source.fs.cat_file(pair.image)
            mask_bytes = source.fs.cat_file(pair.mask)
            try:
                h, w = imaging.decode_image(img_bytes).shape[:2]
                mask = imaging.decode_mask(mask_bytes)
            except imaging.ImageDecodeError as exc:
                problem = f"undecodable: {exc}"
            else:
                if mask.shape != (h, w):
                    problem = f"size mismatch: image {w}x{h}, mask {mask.shape[1]}x{mask.shape[0]}"
                else:
                    counts = np.bincount(mask.ravel(), minlength=256)
                    bad = [
                        v
                        for v in np.nonzero(counts)[0]
                        if v != imaging.IGNORE_INDEX and num_classes and v >= num_classes
                    ]
                    if bad:
                        problem = f"class ids out of range 0..{num_classes - 1}: {bad[:10]}"
        if problem:
            invalid.append({"key": pair.key, "problem": problem})
            continue
        hist += counts
        for field, value in zip(SHARD_SCHEMA.names, (pair.key, img_bytes, imaging.encode_mask(mask), h, w, split)):
            rows[field].append(value)
    n = len(rows["key"])
    out: dict[str, Any] = {"name": name, "split": split, "rows": n, "hist": hist.tolist(), "invalid": invalid}
    if n:
        buf = io.BytesIO()
        pq.write_table(pa.table(rows, schema=SHARD_SCHEMA), buf, compression="none")
        data = buf.getvalue()
        storage.write_bytes(dest.child("shards", name), data)
        out.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), path=f"shards/{name}")
    return out


def _invalid_report(dest_uri: str, invalid: list[dict[str, str]]) -> str:
    shown = "; ".join(f"{i['key']}: {i['problem']}" for i in invalid[:MAX_REPORTED])
    more = f" (and {len(invalid) - MAX_REPORTED} more)" if len(invalid) > MAX_REPORTED else ""
    return f"{dest_uri}: {len(invalid)} invalid pairs, nothing written: {shown}{more}"


def prepare(spec: PrepareSpec) -> dict[str, Any]:
    """Run the prepare job and return the manifest."""
    t0 = time.time()
    source = storage.resolve(spec.source, spec.endpoint_url)
    dest = storage.resolve(spec.dest, spec.endpoint_url)
    storage.check_readable(source)
    manifest_loc = dest.child(MANIFEST)
    if storage.exists(manifest_loc):
        if not spec.overwrite:
            raise DataError(f"{dest.uri}: a data set already exists here; pass --overwrite or choose another DEST")
        # The manifest goes first so no reader trusts a data set while it is being replaced.
        storage.remove_tree(manifest_loc)
    storage.remove_tree(dest.child("shards"))
    storage.check_writable(dest)

    pairs = pairs_layout(source, spec.images_dir, spec.masks_dir)
    split_pairs = [(p, assign_split(p.key, spec.val_fraction, spec.seed)) for p in pairs]
    plan = _plan_shards(split_pairs, int(spec.shard_size_mb * 2**20))
    counters: dict[str, int] = {}
    refs = []
    for split, group in plan:
        idx = counters.get(split, 0)
        counters[split] = idx + 1
        refs.append(_write_shard.remote(dest, f"{split}-{idx:05d}.parquet", split, group, source, spec.num_classes))
    results = ray.get(refs)

    invalid = [i for r in results for i in r["invalid"]]
    hist = np.sum([r["hist"] for r in results], axis=0)
    present = [int(v) for v in np.nonzero(hist)[0] if v != imaging.IGNORE_INDEX]
    if spec.num_classes is None and present and present != list(range(max(present) + 1)):
        invalid.append(
            {"key": "(all masks)", "problem": f"mask values {present} are not class ids 0..K-1; set --num-classes"}
        )
    if invalid:
        storage.remove_tree(dest.child("shards"))
        raise DataError(_invalid_report(dest.uri, invalid))

    num_classes = spec.num_classes or max(present + [1]) + 1
    names = spec.class_names or [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"--class-names gives {len(names)} names for {num_classes} classes")
    shards = [{k: r[k] for k in ("path", "split", "rows", "bytes", "sha256")} for r in results if r["rows"]]
    labelled = hist[:num_classes].sum()
    manifest = {
        "format_version": FORMAT_VERSION,
        "layout": spec.layout,
        "source": storage.redact(spec.source),
        "num_classes": num_classes,
        "class_names": names,
        "palette": imaging.default_palette(num_classes),
        "ignore_index": imaging.IGNORE_INDEX,
        "counts": {s: sum(r["rows"] for r in results if r["split"] == s) for s in ("train", "val")},
        "pixel_frequency": [float(hist[i] / labelled) if labelled else 0.0 for i in range(num_classes)],
        "shards": shards,
        "content_hash": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
        "created_by": f"raysegment {__version__}",
        "seconds": round(time.time() - t0, 2),
    }
    storage.write_json(manifest_loc, manifest)
    log.info("prepared %s: %s", dest.uri, manifest["counts"])
    return manifest


def read_manifest(data_uri: str, endpoint_url: str | None = None) -> tuple[storage.Location, dict[str, Any]]:
    """The data set's location and manifest, or a clear error if it is not a prepared data set."""
    loc = storage.resolve(data_uri, endpoint_url)
    mloc = loc.child(MANIFEST)
    if not storage.exists(mloc):
        raise DataError(f"{loc.uri}: no {MANIFEST}; run `raysegment prepare` first (or the write did not finish)")
    manifest = storage.read_json(mloc)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{mloc.uri}: unsupported format_version {manifest.get('format_version')}")
    return loc, manifest
