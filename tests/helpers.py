"""Shared test helpers: tiny synthetic data sets and bad inputs."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from raysegment.data import synthetic

TINY = {"epochs": 1, "workers": 2, "image_size": 32, "batch_size": 4, "depth": 2, "base_filters": 4, "resume": False}


def write_source(root: str, count: int = 40, size: int = 32) -> str:
    synthetic.write_pairs(root, count, size=size, seed=7)
    return root


def write_infer_inputs(root: str) -> dict[str, list[str]]:
    """Three good images of odd sizes (one nested) and three bad files."""
    os.makedirs(os.path.join(root, "nested"), exist_ok=True)
    good = {"a": (40, 52), "b": (33, 33), "nested/c": (64, 20)}
    for key, (h, w) in good.items():
        img, _ = synthetic.make_example(hash(key) % 1000, size=64)
        Image.fromarray(img).resize((w, h)).save(os.path.join(root, f"{key}.png"))
    data = open(os.path.join(root, "a.png"), "rb").read()
    with open(os.path.join(root, "corrupt.png"), "wb") as f:
        f.write(data[: len(data) // 3])
    open(os.path.join(root, "empty.png"), "wb").close()
    with open(os.path.join(root, "notes.jpg"), "w") as f:
        f.write("this is a text file, not a JPEG\n")
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("not an image extension: never listed\n")
    return {"good": list(good), "bad": ["corrupt", "empty", "notes"], "sizes": good}


def mask_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.mode == "P"
        arr = np.asarray(img)
    return arr.shape
