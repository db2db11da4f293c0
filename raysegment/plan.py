"""A training plan derived from the data set's fingerprint and the compute (issue #15, item 2).

nnU-Net's idea on raysegment's options: every choice below is a rule on the
fingerprint (`data/fingerprint.py`), written down with its reason so `raysegment plan`
can show it. The plan's fields are `TrainSpec` field names, so an explicit flag
overrides exactly its part (`Plan.train_values`).

Not yet done (the rest of #15): `train` does not make this plan by itself, the time
budget is turned into epochs by a cost model instead of the first epoch's measured
throughput, and z-score normalisation is recorded here but inference still scales to
[0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from raysegment.data.fingerprint import Fingerprint

# An object resized below this many pixels of area is lost to a U-Net (about 3 x 3).
MIN_OBJECT_PX = 9.0
# The bottleneck keeps at least this many pixels per side.
MIN_BOTTLENECK = 8
MAX_DEPTH = 5
# Window side caps: what one CPU core or one GPU trains at a useful rate.
MAX_WINDOW = {"cpu": 256, "gpu": 512}
MIN_WINDOW = 32
# A class under this share of labelled pixels is rare: CE + Dice, oversampled windows.
RARE_CLASS = 0.10
# The data is oriented when a common class sits mostly in one half (sky at the top).
ORIENTED = 0.70
COMMON_CLASS = 0.01
# Training throughput per CPU core (pixels/s through forward + backward) of the base-16 U-Net,
# measured on this project's 2-core machine (ISBI, 256 px windows, depth 4: 2.1 windows/s on
# 2 cores); a GPU is counted as 40 cores. An estimate until train measures its first epoch.
PIXELS_PER_CORE_S = 70_000
GPU_AS_CORES = 40
# Without --time-budget: 40 passes over the training pixels, between 5 minutes and 2 hours.
DEFAULT_PASSES = 40
DEFAULT_BUDGET_S = (300.0, 7200.0)


@dataclass(frozen=True)
class Compute:
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    @property
    def device(self) -> str:
        return "gpu" if self.gpus_per_worker > 0 else "cpu"

    @property
    def pixels_per_s(self) -> float:
        per_worker = GPU_AS_CORES * self.gpus_per_worker if self.gpus_per_worker else self.cpus_per_worker
        return PIXELS_PER_CORE_S * per_worker * self.workers


@dataclass(frozen=True)
class Plan:
    """TrainSpec values with the reason for each; `normalization` is recorded for the card."""

    crop: str
    image_size: int
    depth: int
    base_filters: int
    batch_size: int
    loss: str
    class_weights: str
    flip: bool
    rotate90: bool
    scale_jitter: float
    brightness: float
    contrast: float
    epochs: int
    warmup_epochs: float
    schedule: str
    normalization: dict[str, Any]
    oversample_rare: bool
    time_budget_s: float
    reasons: dict[str, str] = field(default_factory=dict)

    def train_values(self) -> dict[str, Any]:
        """The TrainSpec fields this plan sets (flags given by the user win over these)."""
        skip = {"normalization", "oversample_rare", "time_budget_s", "reasons"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def window(fp: Fingerprint, compute: Compute) -> tuple[str, int, str]:
    """(crop, window side, reason). The window is the median image side (a multiple of 16, capped
    for the device). Native windows when the median image is larger than that, or when resizing the
    largest images to it would shrink a class's median object below MIN_OBJECT_PX; else resize,
    which then changes the scale of few images by little."""
    side = min(fp.height["median"], fp.width["median"])
    cap = MAX_WINDOW[compute.device]
    step = 32 if side > 256 else 16  # divisible by 2^depth (depth 5 from 256 px up)
    size = max(MIN_WINDOW, min(cap, step * math.ceil(side / step)))
    if side > size:
        return "native", size, f"median image side {side:g} px is larger than the {size} px window: train on windows"
    largest = max(fp.height["max"], fp.width["max"])
    shrink = (size / largest) ** 2
    smallest = min((a for a in fp.object_area_median[1:] if a is not None), default=None)
    if smallest is not None and smallest * shrink < MIN_OBJECT_PX:
        return (
            "native",
            size,
            f"resizing the largest images ({largest} px) to {size} px would shrink the smallest median object "
            f"({smallest:g} px) below {MIN_OBJECT_PX:g} px",
        )
    return "resize", size, f"images fit the {size} px window; resizing loses no object"


def depth_for(size: int) -> int:
    """Down-samplings that keep the bottleneck at >= MIN_BOTTLENECK pixels per side."""
    return max(1, min(MAX_DEPTH, int(math.log2(size / MIN_BOTTLENECK))))


def loss_for(fp: Fingerprint) -> tuple[str, str]:
    rare = [i for i, s in enumerate(fp.class_pixel_share) if s < RARE_CLASS]
    if rare:
        return "ce+dice", f"class(es) {rare} hold under {RARE_CLASS:.0%} of labelled pixels"
    return "ce", f"every class holds at least {RARE_CLASS:.0%} of labelled pixels"


def orientation(fp: Fingerprint) -> tuple[bool, bool, str]:
    """(flip, rotate90, reason): turns and flips only where no common class sits mostly in one half."""
    oriented = []
    for c, share in enumerate(fp.class_pixel_share):
        if share < COMMON_CLASS:
            continue
        for name, half in (("top", fp.class_top_share[c]), ("left", fp.class_left_share[c])):
            if half is not None and max(half, 1 - half) > ORIENTED:
                oriented.append(f"class {c} {half:.0%} in the {name} half")
    if oriented:
        return False, False, "the data is oriented (" + "; ".join(oriented) + "): no flips or 90-degree turns"
    return True, True, "no class prefers a side: flips and 90-degree turns"


def normalization_for(fp: Fingerprint) -> tuple[dict[str, Any], str]:
    deep = any(m.startswith("I") or m == "F" for m in fp.modes)
    stats = fp.intensity
    norm = {"kind": "zscore", "mean": stats.get("mean"), "std": stats.get("std")}
    if deep:
        norm.update(kind="zscore_clipped", low=stats.get("p0.5"), high=stats.get("p99.5"))
        return norm, "16-bit or float images: clip to the 0.5-99.5 percentiles, then per-channel z-score"
    return norm, "per-channel z-score from the sampled intensities"


def default_budget_s(fp: Fingerprint, train_images: int, compute: Compute, size: int) -> float:
    seconds = DEFAULT_PASSES * train_images * size * size / compute.pixels_per_s
    return min(max(seconds, DEFAULT_BUDGET_S[0]), DEFAULT_BUDGET_S[1])


def make_plan(fp: Fingerprint, train_images: int, compute: Compute, time_budget_s: float | None = None) -> Plan:
    """The plan for a data set (its fingerprint and training-split size) on `compute`."""
    reasons: dict[str, str] = {}
    crop, size, reasons["crop"] = window(fp, compute)
    depth = depth_for(size)
    reasons["depth"] = f"{size} px / 2^{depth} keeps a {size >> depth} px bottleneck"
    base = 32 if compute.device == "gpu" else 16
    batch = 16 if compute.device == "gpu" else 4
    reasons["width"] = f"{compute.device}: base {base} filters, {batch} windows per worker"
    loss, reasons["loss"] = loss_for(fp)
    flip, rotate90, reasons["augment"] = orientation(fp)
    norm, reasons["normalization"] = normalization_for(fp)
    budget = time_budget_s or default_budget_s(fp, train_images, compute, size)
    reasons["budget"] = f"{budget / 60:.0f} min " + (
        "given" if time_budget_s else f"({DEFAULT_PASSES} passes, 5 min..2 h)"
    )
    # Native windows see a part of each image per step: count one window per image and epoch.
    epoch_s = max(train_images, 1) * size * size / compute.pixels_per_s
    epochs = max(1, int(budget / epoch_s))
    reasons["epochs"] = f"~{epoch_s:.0f} s an epoch (estimated) fits {epochs} in the budget"
    rare = loss == "ce+dice"
    return Plan(
        crop=crop,
        image_size=size,
        depth=depth,
        base_filters=base,
        batch_size=batch,
        loss=loss,
        class_weights="none",
        flip=flip,
        rotate90=rotate90,
        scale_jitter=0.2,
        brightness=0.1,
        contrast=0.1,
        epochs=epochs,
        warmup_epochs=min(2.0, max(0.5, epochs / 20)),
        schedule="cosine",
        normalization=norm,
        oversample_rare=rare,
        time_budget_s=round(budget, 1),
        reasons=reasons,
    )


def parse_duration(text: str) -> float:
    """'40m', '2h', '90s' or plain seconds -> seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a duration; write e.g. 40m, 2h or 900s") from None


def format_plan(plan: Plan) -> list[str]:
    values = plan.train_values()
    lines = ["training plan (flags you give override their part):"]
    for name, value in values.items():
        lines.append(f"  {name:<14} {value!s:<10} {plan.reasons.get(_reason_of(name), '')}".rstrip())
    lines.append(f"  normalization  {plan.normalization['kind']:<10} {plan.reasons['normalization']}")
    lines.append(f"  budget         {plan.reasons['budget']}")
    return lines


def _reason_of(name: str) -> str:
    return {
        "crop": "crop",
        "depth": "depth",
        "base_filters": "width",
        "loss": "loss",
        "flip": "augment",
        "epochs": "epochs",
    }.get(name, "")
