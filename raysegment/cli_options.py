"""The command-line flags of `config.InferOptions`, defined once for `infer` and `nightly`.

Defaults are None so a flag that is not given leaves the spec file's value (or the
spec's default) in place; the spec checks every value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])

INFER_OPTIONS = [
    click.option(
        "--source",
        type=click.Choice(["auto", "files", "tar", "parquet", "list"]),
        default=None,
        help="input kind (default: auto)",
    ),
    click.option("--extensions", default=None, help="comma-separated image extensions to list"),
    click.option("--image-column", default=None, help="image bytes column of a Parquet source"),
    click.option("--key-column", default=None, help="key column of a Parquet source"),
    click.option("--batch-size", type=int, default=None),
    click.option("--actors", default=None, help="predictor actors: auto (default: fit the cluster), MIN or MIN:MAX"),
    click.option("--gpus-per-actor", default=None, help="GPUs per actor (default auto: 1 where the cluster has GPUs)"),
    click.option("--cpus-per-actor", type=float, default=None, help="CPUs and TF threads per actor (default: 1)"),
    click.option("--mask-format", type=click.Choice(["png", "npz", "packed"]), default=None),
    click.option(
        "--tta-flip/--no-tta-flip",
        default=None,
        help="flip test-time augmentation over the model's training flips (2-4x model cost; default: the card's advice)",
    ),
    click.option("--report/--no-report", default=None, help="write report.html and overlays.png (default: on)"),
    click.option("--overwrite", is_flag=True, default=None, help="redo every key instead of resuming"),
    click.option("--max-error-fraction", type=float, default=None, help="fail the job above this share of bad inputs"),
    click.option("--max-pixels", type=int, default=None, help="refuse larger images (decompression bombs)"),
    click.option("--max-input-mb", type=int, default=None, help="refuse inputs of more encoded bytes, unread (512)"),
    click.option(
        "--precision",
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        default=None,
        help="model compute dtype (default auto: bfloat16 on GPU, float32 on CPU)",
    ),
    click.option(
        "--tile-size", type=int, default=None, help="native-scale models: tile images larger than this (1024)"
    ),
    click.option("--tile-overlap", type=int, default=None, help="pixels shared by neighbouring tiles (half a tile)"),
    click.option(
        "--decode",
        type=click.Choice(["tasks", "actor"]),
        default=None,
        help="decode images in CPU tasks beside the actors (default) or inside the predictor actor",
    ),
    click.option(
        "--summary-rows",
        type=int,
        default=None,
        help="rows per summary file; each file commits its rows (default 100000)",
    ),
    click.option(
        "--storage-retry-s",
        type=float,
        default=None,
        help="retry unreachable object storage this long, then fail (default: RAYSEGMENT_STORAGE_RETRY_S or 120)",
    ),
]


def infer_options(fn: F) -> F:
    """Add every inference flag to a click command, in the order `--help` lists them."""
    for option in reversed(INFER_OPTIONS):
        fn = option(fn)
    return fn
