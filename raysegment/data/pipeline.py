"""Ray Data pipelines over a prepared data set: read shards, decode, resize, augment."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from raysegment import storage
from raysegment.data import imaging


def read_split(
    loc: storage.Location, manifest: dict[str, Any], split: str, columns: list[str] | None = None
) -> ray.data.Dataset:
    """The shards of one split as a Ray dataset (only shards the manifest lists)."""
    paths = [loc.child(s["path"]).path for s in manifest["shards"] if s["split"] == split]
    if not paths:
        from raysegment.errors import DataError

        raise DataError(f"{loc.uri}: split '{split}' has no shards (counts: {manifest['counts']})")
    ds = ray.data.read_parquet(paths, filesystem=loc.arrow_fs())
    return ds.select_columns(columns) if columns else ds


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [0, 1]; recorded in the model card as 'scale_0_1'."""
    return images.astype(np.float32) * (1.0 / 255.0)


def decode_for_training(batch: dict[str, np.ndarray], size: int, augment: bool) -> dict[str, np.ndarray]:
    """Decode, resize to the training size and augment (flips, 90-degree turns)."""
    rng = np.random.default_rng()
    n = len(batch["image"])
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):
        img = imaging.resize_image(imaging.decode_image(batch["image"][i]), (size, size))
        mask = imaging.resize_mask(imaging.decode_mask(batch["mask"][i]), (size, size))
        if augment:
            img, mask = _augment(rng, img, mask)
        images[i], masks[i] = img, mask
    return {"image": normalise(images), "mask": masks}


def _augment(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        img, mask = img[::-1], mask[::-1]
    k = int(rng.integers(4))
    return np.rot90(img, k), np.rot90(mask, k)


def training_dataset(
    loc: storage.Location, manifest: dict[str, Any], split: str, size: int, augment: bool
) -> ray.data.Dataset:
    """Decoded, resized (and for training, augmented) batches ready for the train loop."""
    ds = read_split(loc, manifest, split, columns=["image", "mask"])
    return ds.map_batches(
        decode_for_training, fn_kwargs={"size": size, "augment": augment}, batch_size=32, batch_format="numpy"
    )
