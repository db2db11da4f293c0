"""Source layouts: find (key, image path, mask path) pairs in a labelled data set."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from raysegment import storage
from raysegment.data.imaging import IMAGE_EXTENSIONS
from raysegment.errors import DataError


@dataclass(frozen=True)
class Pair:
    key: str
    image: str | None  # filesystem path, None when missing
    mask: str | None
    image_bytes: int = 0


def _by_stem(loc: storage.Location) -> dict[str, tuple[str, int]]:
    """Relative path without extension -> (path, size) for every image file below loc."""
    with storage.storage_errors(loc.uri):
        if not loc.fs.isdir(loc.path):
            raise DataError(f"{loc.uri}: folder not found; check SOURCE and --images-dir/--masks-dir")
        found = loc.fs.find(loc.path, detail=True)
    out: dict[str, tuple[str, int]] = {}
    root = loc.path.rstrip("/") + "/"
    for path, info in found.items():
        stem, ext = posixpath.splitext(path[len(root) :] if path.startswith(root) else path)
        if ext.lower() in IMAGE_EXTENSIONS:
            out[stem] = (path, int(info.get("size") or 0))
    return out


def pairs_layout(source: storage.Location, images_dir: str, masks_dir: str) -> list[Pair]:
    """Match images and masks by relative path and stem (extensions may differ)."""
    images = _by_stem(source.child(images_dir))
    masks = _by_stem(source.child(masks_dir))
    if not images:
        raise DataError(f"{source.child(images_dir).uri}: no image files found ({', '.join(IMAGE_EXTENSIONS)})")
    keys = sorted(set(images) | set(masks))
    return [Pair(k, images.get(k, (None, 0))[0], masks.get(k, (None, 0))[0], images.get(k, (None, 0))[1]) for k in keys]


def assign_split(key: str, val_fraction: float, seed: int) -> str:
    """Seeded key-hash split: stable for a key when other images are added or removed."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"
