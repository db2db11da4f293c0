"""A deterministic synthetic segmentation data set: coloured shapes on textured backgrounds."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ["background", "disc", "square", "triangle"]
# A base colour per shape class; each instance is jittered around it so colour alone is
# a strong but imperfect cue and the model must also use shape.
_BASE_COLOURS = {1: (200, 60, 60), 2: (60, 180, 70), 3: (70, 90, 210)}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(70, 150, size=(size // 8 + 1, size // 8 + 1, 1))
    bg = np.asarray(Image.fromarray(coarse[..., 0].astype(np.uint8)).resize((size, size), Image.BILINEAR), np.float32)
    bg = bg[..., None] + rng.normal(0, 12, size=(size, size, 3))
    return bg


def make_example(seed: int, size: int = 64, max_shapes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB image, class-id mask) pair, fully determined by the seed."""
    rng = np.random.default_rng(seed)
    img = _background(rng, size)
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cls = int(rng.integers(1, 4))
        r = float(rng.uniform(size * 0.08, size * 0.2))
        cx, cy = rng.uniform(r, size - r, size=2)
        if cls == 1:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=cls)
        elif cls == 2:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=cls)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=cls)
    mask = np.asarray(mask_img, dtype=np.uint8)
    for cls, base in _BASE_COLOURS.items():
        colour = np.asarray(base, np.float32) + rng.normal(0, 20, size=3)
        sel = mask == cls
        img[sel] = colour + rng.normal(0, 10, size=(int(sel.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_pairs(
    root: str,
    count: int,
    size: int = 64,
    seed: int = 0,
    images_dir: str = "images",
    masks_dir: str = "masks",
    start: int = 0,
) -> None:
    """Write `count` pairs as root/images/NNNNN.png and root/masks/NNNNN.png, numbered from `start`."""
    os.makedirs(os.path.join(root, images_dir), exist_ok=True)
    os.makedirs(os.path.join(root, masks_dir), exist_ok=True)
    for i in range(start, start + count):
        img, mask = make_example(seed * 1_000_003 + i, size)
        Image.fromarray(img).save(os.path.join(root, images_dir, f"{i:05d}.png"))
        Image.fromarray(mask).save(os.path.join(root, masks_dir, f"{i:05d}.png"))


def write_images(root: str, count: int, size: int = 64, seed: int = 1, start: int = 0) -> None:
    """Write unlabelled images (for inference) as root/img-NNNNN.png."""
    os.makedirs(root, exist_ok=True)
    for i in range(start, start + count):
        img, _ = make_example(seed * 1_000_003 + i, size)
        Image.fromarray(img).save(os.path.join(root, f"img-{i:05d}.png"))
