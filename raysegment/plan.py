"""A training plan derived from the data set's fingerprint and the compute (issue #15, item 2).

nnU-Net's idea on raysegment's options: every choice below is a rule on the
fingerprint (`data/fingerprint.py`), written down with its reason so `raysegment plan`
can show it. The plan's fields are `TrainSpec` field names (`PLAN_FIELDS`), so an
explicit flag overrides exactly its part: `train` calls `plan_for_spec`, which makes the
plan `raysegment plan` prints for the same data set and compute, with the fields the user
gave (`TrainSpec.model_fields_set`) taken as given. A given value is also an input to the
rules that depend on it (a given --image-size sets the depth and the epoch estimate, given
--epochs the warm-up) and is recorded as given in the model card.

Colour photographs get an ImageNet-pretrained encoder (issue #15 item 5) where its weights can be had
without the network, from the driver's Keras cache (`encoder_for`, `models/pretrained.py`); training sends
that file to the workers. The encoder then fixes the input: raw pixels, windows a multiple of 32.

The time budget becomes epochs by a cost model (PIXELS_PER_CORE_S): an estimate. The training
loop then measures its first epoch and sets the epochs that fit the budget (the LR schedule
re-fitted to them; `train/loop.py`), and still stops at the end of an epoch after which the next
one would end past the budget; the best checkpoint is kept.

Everything the plan chooses is applied: the normalisation is recorded in the model card's input
and applied by training and inference alike (`card.normalize`), rare-class oversampling and
the augmentation run in the Ray Data tasks (`data/pipeline.py`, `data/augment.py`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from raysegment.data.fingerprint import Fingerprint
from raysegment.models import pretrained
from raysegment.models.card import TrainingPlan

if TYPE_CHECKING:
    from raysegment.config import TrainSpec
    from raysegment.data.manifest import Manifest
    from raysegment.storage import Location

# An object resized below this many pixels of area is lost to a U-Net (about 3 x 3).
MIN_OBJECT_PX = 9.0
# Resizing squares the images: a median image more elongated than this (long side / short side) would be
# squashed along its long side, its objects with it, so it gets native windows instead (2:1 and wider).
MAX_SQUASH = 2.0
# The bottleneck keeps at least this many pixels per side.
MIN_BOTTLENECK = 8
MAX_DEPTH = 5
# Window side caps: what one CPU core or one GPU trains at a useful rate.
MAX_WINDOW = {"cpu": 256, "gpu": 512}
MIN_WINDOW = 32
# A class under this share of labelled pixels is rare: CE + Dice, oversampled windows.
RARE_CLASS = 0.10
# Three or more classes, one of them under this share of labelled pixels: the cross-entropy weighs classes by
# 1/sqrt(share). Unweighted, such a class can stay at IoU 0 on the training split itself for the steps a CPU
# budget allows (tests/test_street_scenes.py); two classes have the foreground's Dice term and oversampling.
WEIGHTED_CLASS = 0.01
# The data is oriented when a common class sits mostly in one half (sky at the top) ...
ORIENTED = 0.70
COMMON_CLASS = 0.01
# ... and the images agree: of those with more of it in one half than the other, so many favour that half
# that a fair coin per image would give as lopsided a vote with at most this chance (two-sided sign test).
# Pooled pixels alone called 34% of random 4-image and 13% of 8-image sets oriented; with the vote a
# unanimous one needs 8 images, and random sets of 8 or 16 are called oriented ~1.5% of the time.
ORIENTED_P = 0.01
# Share of training windows centred on a rare-class pixel (nnU-Net: a third of patches on foreground).
OVERSAMPLE = 1 / 3
# Grey (one-band) or 16-bit/float images: microscopy-like, whose textures have no "up" and whose intensities
# vary between acquisitions: any-angle turns, elastic deformation, gamma and noise; z-score after clipping.
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
MICROSCOPY_AUG = {"rotate": 180.0, "gamma": 0.3, "noise": 0.03}
ELASTIC_PER_WINDOW_PX = 1 / 64  # elastic displacement std: 4 px on a 256 px window
# Training throughput per CPU core (pixels/s through forward + backward) of the base-16 U-Net,
# measured on this project's 2-core machine (ISBI, 256 px windows, depth 4: 2.1 windows/s on
# 2 cores). An estimate until train measures its first epoch.
PIXELS_PER_CORE_S = 70_000
# A GPU counted as cores. An H200 trained the 1-GPU ISBI plan (base 32, 512 px, bfloat16; Keras on JAX, the
# machine had no TensorFlow) at 296 windows/s, ~3,800 cores' worth of the base-16 rate; smaller GPUs are
# several times slower. Counted low, a fast GPU's epochs last seconds (MIN_EPOCH_S); high, a slow one's long.
GPU_AS_CORES = 400
# Without --time-budget: 40 passes over the training pixels, between 5 minutes and 2 hours.
DEFAULT_PASSES = 40
DEFAULT_BUDGET_S = (300.0, 7200.0)
# An epoch of a small training split is several passes over it: at least this many windows, as nnU-Net's
# epochs are 250 iterations. Validation, a checkpoint and the input pipeline's start come once an epoch,
# and on 24 images of one pass each they took a fifth of the budget.
MIN_EPOCH_WINDOWS = 250
# ... and at least this long (estimated): a GPU passes 250 windows in about a second, and an epoch's
# validation and checkpoint (seconds) would then take most of the budget.
MIN_EPOCH_S = 60.0
# ... but never so long an epoch that fewer than this many fit the budget (the schedule and the best
# checkpoint need a few).
MIN_EPOCHS = 20
# Pretrained encoders for 8-bit colour photographs, in order of preference, where their ImageNet weights are
# in the driver's Keras cache (no network needed): a stronger one on a GPU, a light one on CPU cores.
ENCODER_CHOICES = {"gpu": ("resnet50", "efficientnetv2s"), "cpu": ("mobilenetv3large", "efficientnetv2b0")}
ENCODER_MULTIPLE = 32  # every encoder downsamples 32x: window sides a multiple of it, depth 5
# The TrainSpec fields a plan decides, in the order `raysegment plan` prints them.
PLAN_FIELDS = (
    "crop",
    "image_size",
    "architecture",
    "encoder",
    "depth",
    "base_filters",
    "batch_size",
    "normalization",
    "loss",
    "class_weights",
    "oversample",
    "flip",
    "rotate90",
    "rotate",
    "elastic",
    "scale_jitter",
    "brightness",
    "contrast",
    "gamma",
    "noise",
    "repeat",
    "epochs",
    "warmup_epochs",
    "schedule",
)


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
    """TrainSpec values with the reason for each; `pixel_stats` (the fingerprint's, for the z-score) goes to the
    model card with the normalisation."""

    crop: str
    image_size: int
    architecture: str
    encoder: str | None  # a pretrained keras.applications backbone (`models/encoders.py`), or the plain U-Net
    depth: int
    base_filters: int
    batch_size: int
    normalization: str
    loss: str
    class_weights: str
    oversample: float
    flip: str  # axes: none, horizontal, vertical, both (`TrainSpec.flip`)
    rotate90: bool
    rotate: float
    elastic: float
    scale_jitter: float
    brightness: float
    contrast: float
    gamma: float
    noise: float
    repeat: int
    epochs: int
    warmup_epochs: float
    schedule: str
    pixel_stats: dict[str, Any] | None
    time_budget_s: float
    reasons: dict[str, str] = field(default_factory=dict)
    # PLAN_FIELDS the user gave (their values above are the given ones); the rest are the rules'.
    given: tuple[str, ...] = ()

    def train_values(self) -> dict[str, Any]:
        """The TrainSpec fields this plan sets, given ones included (PLAN_FIELDS, in order)."""
        return {k: getattr(self, k) for k in PLAN_FIELDS}

    @property
    def oversample_rare(self) -> bool:
        return self.oversample > 0

    @property
    def auto(self) -> tuple[str, ...]:
        """PLAN_FIELDS chosen by the rules."""
        return tuple(k for k in PLAN_FIELDS if k not in self.given)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["given"] = list(self.given)
        return out


def window(fp: Fingerprint, compute: Compute, size: int | None = None) -> tuple[str, int, str]:
    """(crop, window side, reason). The window is the median image side (a multiple of 16, capped
    for the device), or `size` where the user gave one. Native windows when the median image is
    larger than that, or when resizing the largest images to it would shrink a class's median
    object below MIN_OBJECT_PX; else resize, which then changes the scale of few images by little."""
    side = min(fp.height["median"], fp.width["median"])
    if size is None:
        cap = MAX_WINDOW[compute.device]
        step = 32 if side > 256 else 16  # divisible by 2^depth (depth 5 from 256 px up)
        size = max(MIN_WINDOW, min(cap, step * math.ceil(side / step)))
    if side > size:
        return "native", size, f"median image side {side:g} px is larger than the {size} px window: train on windows"
    long = max(fp.height["median"], fp.width["median"])
    if long > size and long / side >= MAX_SQUASH:
        return (
            "native",
            size,
            f"median image {fp.width['median']:g}x{fp.height['median']:g} px (width x height): resizing it to a {size} px square "
            f"would squash it {long / side:.1f}x along its long side; train on windows",
        )
    largest = max(fp.height["max"], fp.width["max"])
    if largest <= size:
        # Images no larger than the (minimum) window: resizing enlarges them, which shrinks no object,
        # where native windows would be mostly padding.
        return (
            "resize",
            size,
            f"the largest images ({largest} px) fit the {size} px window: resized up, no object shrinks",
        )
    shrink = (size / largest) ** 2
    smallest = min((a for a in fp.object_area_median[1:] if a is not None), default=None)
    if smallest is not None and smallest * shrink < MIN_OBJECT_PX:
        return (
            "native",
            size,
            f"resizing the largest images ({largest} px) to {size} px would shrink the smallest median object "
            f"({smallest:g} px) below {MIN_OBJECT_PX:g} px",
        )
    # Larger images are shrunk into the window, not fitted to it: say what the rule checked.
    if smallest is None:
        return "resize", size, f"resizing the largest images ({largest} px) to {size} px: no object measured to shrink"
    return (
        "resize",
        size,
        f"resizing the largest images ({largest} px) to {size} px keeps the smallest median object "
        f"({smallest:g} px, about {smallest * shrink:.0f} px after) at least {MIN_OBJECT_PX:g} px",
    )


def depth_for(size: int) -> int:
    """Down-samplings that keep the bottleneck at >= MIN_BOTTLENECK pixels per side (and divide the
    window: a given --image-size need not be a power of two)."""
    depth = max(1, min(MAX_DEPTH, int(math.log2(max(size, 1) / MIN_BOTTLENECK))))
    while depth > 1 and size % 2**depth:
        depth -= 1
    return depth


def scarce_classes(shares: list[float], below: float) -> list[int]:
    """Classes with labelled pixels, fewer than `below` of them. A declared class the data never shows is
    absent, not rare: no loss term or weight can balance a class with no label (`absent_note`)."""
    return [i for i, s in enumerate(shares) if 0 < s < below]


def absent_note(shares: list[float]) -> str:
    absent = [i for i, s in enumerate(shares) if s <= 0]
    return f"; class(es) {absent} have no labelled pixel (absent, left out of this rule)" if absent else ""


def loss_for(fp: Fingerprint) -> tuple[str, str]:
    shares = fp.class_pixel_share
    rare = scarce_classes(shares, RARE_CLASS)
    if rare:
        return "ce+dice", f"class(es) {rare} hold under {RARE_CLASS:.0%} of labelled pixels{absent_note(shares)}"
    return "ce", f"every class holds at least {RARE_CLASS:.0%} of labelled pixels{absent_note(shares)}"


def class_weights_for(fp: Fingerprint) -> tuple[str, str]:
    """(--class-weights, reason): 1/sqrt(share) weights for three or more classes with one under WEIGHTED_CLASS."""
    shares = fp.class_pixel_share
    if sum(s > 0 for s in shares) < 3:
        return (
            "none",
            f"under three labelled classes: the foreground's Dice term and oversampling balance them{absent_note(shares)}",
        )
    scarce = scarce_classes(shares, WEIGHTED_CLASS)
    if not scarce:
        return "none", f"no class under {WEIGHTED_CLASS:.0%} of labelled pixels{absent_note(shares)}"
    return (
        "inverse_sqrt_frequency",
        f"class(es) {scarce} under {WEIGHTED_CLASS:.0%} of labelled pixels: cross-entropy weighted by 1/sqrt(share)"
        + absent_note(shares),
    )


def sign_test(agree: int, votes: int) -> float:
    """Two-sided sign test: the chance that fair coins give `votes` images at least `agree` on one side."""
    if votes <= 0:
        return 1.0
    if votes <= 1000:  # exact (scipy.stats took seconds to import on a loaded machine)
        tail = sum(math.comb(votes, i) for i in range(max(agree, 0), votes + 1)) / 2**votes
    else:  # the normal approximation, with continuity correction
        tail = 0.5 * math.erfc((agree - 0.5 - votes / 2) / math.sqrt(votes / 4) / math.sqrt(2))
    return min(1.0, 2 * tail)


def _side_votes(fp: Fingerprint, c: int, name: str, first_half: bool) -> tuple[int, int] | None:
    """(images favouring the class's pooled side, images with a side) for one class and axis; None for a
    fingerprint built without votes (a stored one without them is computed afresh: `Fingerprint.is_current`)."""
    votes = fp.class_top_votes if name == "top" else fp.class_left_votes
    if not votes or c >= len(votes):
        return None
    first, second = votes[c]
    return (first if first_half else second), first + second


def oriented_side(fp: Fingerprint, c: int, name: str) -> str | None:
    """Why class c prefers one half along the axis (`top`: top/bottom, `left`: left/right), or None: over
    ORIENTED of its pixels in that half and the images' votes for it significant (ORIENTED_P)."""
    half = (fp.class_top_share if name == "top" else fp.class_left_share)[c]
    if half is None or max(half, 1 - half) <= ORIENTED:
        return None
    side = name if half > 0.5 else {"top": "bottom", "left": "right"}[name]
    counted = _side_votes(fp, c, name, half > 0.5)
    if counted is None:
        # Votes not counted: as if each image that holds the class voted for its side, which needs as many
        # images as a significant unanimous vote.
        n = round(fp.class_image_share[c] * fp.images) if c < len(fp.class_image_share) else 0
        return f"class {c} {max(half, 1 - half):.0%} in the {side} half" if sign_test(n, n) <= ORIENTED_P else None
    agree, votes = counted
    if sign_test(agree, votes) > ORIENTED_P:
        return None
    return f"class {c} {max(half, 1 - half):.0%} in the {side} half, more of it there in {agree} of {votes} images"


def orientation(fp: Fingerprint) -> tuple[str, bool, str]:
    """(flip axes, rotate90, reason). A flip only along an axis no common class prefers a side of: street
    scenes (sky on top, road below) are mirrored left-right, never upside down; 90-degree turns only where
    no class prefers any side (cells, overhead scenes). A side counts only when the images agree on it
    (`oriented_side`): pooled pixels of a few images fall mostly in one half by chance."""
    sides: dict[str, list[str]] = {"top": [], "left": []}
    for c, share in enumerate(fp.class_pixel_share):
        if share < COMMON_CLASS:
            continue
        for name in sides:
            if found := oriented_side(fp, c, name):
                sides[name].append(found)
    up, left = bool(sides["top"]), bool(sides["left"])
    if not (up or left):
        return "both", True, "no class prefers a side: flips and 90-degree turns"
    flip = "none" if up and left else "vertical" if left else "horizontal"
    found = sides["top"] + sides["left"]
    seen = "; ".join(found[:3]) + (f"; {len(found) - 3} more" if len(found) > 3 else "")
    kept = {"none": "no flips", "vertical": "top-bottom flips only", "horizontal": "left-right flips only"}[flip]
    return flip, False, f"the data is oriented ({seen}): {kept}, no 90-degree turns"


def microscopy_like(fp: Fingerprint) -> bool:
    """Every image grey (one band), or 16-bit/float: electron and light microscopy, medical slices, overhead
    multi-band scenes; not 8-bit colour photographs."""
    # tifffile's modes are "dtype x bands" ("uint16x1": one band).
    grey = bool(fp.modes) and all(m in GREY_MODES or m.endswith("x1") for m in fp.modes)
    return grey or fp.high_depth


def normalization_for(fp: Fingerprint) -> tuple[str, str]:
    """(kind, reason): per-channel z-score from the fingerprint; clipped to its 0.5-99.5 percentiles first
    for 16-bit/float and grey (microscopy-like) images, whose rare extreme pixels (hot pixels, saturated
    or empty regions) would otherwise stretch the scale."""
    if not fp.intensity:
        return "scale_0_1", "no sampled intensities in the fingerprint: pixels / 255"
    if fp.high_depth:
        return "zscore_clipped", "16-bit or float images: clip to the 0.5-99.5 percentiles, then per-channel z-score"
    if microscopy_like(fp):
        return "zscore_clipped", "grey (microscopy-like) images: clip to the 0.5-99.5 percentiles, then z-score"
    return "zscore", "per-channel z-score from the sampled intensities"


def colour_photos(fp: Fingerprint) -> bool:
    """8-bit images of three colour bands (RGB photographs; RGBA or transparent palette ones, whose alpha
    the model never sees): what ImageNet encoders were trained on."""
    if not fp.channels:
        return set(fp.modes) <= {"RGB"} and not microscopy_like(fp)
    bands = {int(b) for b in fp.channels}  # bands in the file, alpha included
    photo = bands == {3} or (bands <= {3, 4} and set(fp.modes) <= {"RGB", "RGBA", "P"})
    return photo and not microscopy_like(fp)


def encoder_for(fp: Fingerprint, compute: Compute, given: dict[str, Any], weights: str) -> tuple[str | None, str]:
    """(encoder, reason): a pretrained encoder for 8-bit colour photographs where its ImageNet weights can be
    had without the network (in the driver's Keras cache; `models/pretrained.py`), the first of
    ENCODER_CHOICES for the device; else none, and the reason says how to get one. `weights`: the spec's
    --encoder-weights. A given encoder is kept; given choices an encoder cannot honour keep the plain U-Net."""
    if "encoder" in given:
        name = given["encoder"]
        if name is None or weights != "imagenet":
            return name, "given"
        cached = pretrained.cached_weights(name)
        if cached:
            return name, f"given; its ImageNet weights from the Keras cache ({cached}) are sent to the workers"
        return name, "given; its ImageNet weights are not in the Keras cache: each worker downloads them (network)"
    blocked = {
        "architecture": "the residual U-Net given: its own encoder",
        "normalization": "a normalisation given: an encoder takes raw 0..255 pixels",
        "depth": "a depth given: the plain U-Net of that depth",
    }
    for k, why in blocked.items():
        if k in given and (k != "architecture" or given[k] == "resunet"):
            return None, why
    if "image_size" in given and given["image_size"] % ENCODER_MULTIPLE:
        return None, f"the window given is not a multiple of {ENCODER_MULTIPLE}, which an encoder needs"
    if not colour_photos(fp):
        return None, "not 8-bit colour photographs: ImageNet encoders are trained on RGB photos"
    if weights != "imagenet":
        return None, f"--encoder-weights {weights} without --encoder: add --encoder, the backbone it is for"
    choices = ENCODER_CHOICES[compute.device]
    for name in choices:
        cached = pretrained.cached_weights(name)
        if cached:
            return name, f"colour photos, and its ImageNet weights are in the Keras cache ({cached})"
    others = [n for n in pretrained.IMAGENET_NOTOP if n not in choices and pretrained.cached_weights(n)]
    also = f"; cached, but not a {compute.device} choice: {', '.join(others)}" if others else ""
    return None, (
        f"no ImageNet weights of {' or '.join(choices)} in the Keras cache ({pretrained.keras_cache_dir()})"
        f"{also}: for a pretrained encoder give --encoder {choices[0]} with network access (Keras downloads "
        f"them), or --encoder {choices[0]} --encoder-weights PATH"
    )


def pixel_stats(fp: Fingerprint | None, kind: str) -> dict[str, Any] | None:
    """The fingerprint's per-channel statistics a z-score `kind` needs (`card.PixelStats`), else None."""
    if kind not in ("zscore", "zscore_clipped"):
        return None
    if fp is None or not fp.intensity:
        raise ValueError(f"normalization {kind} needs the data set's sampled intensities (its fingerprint)")
    # The percentiles are the clip bounds of zscore_clipped, and for both the range the photometric
    # augmentation measures its brightness and noise in.
    return {k: fp.intensity[f] for k, f in (("mean", "mean"), ("std", "std"), ("low", "p0.5"), ("high", "p99.5"))}


def oversample_for(fp: Fingerprint, crop: str) -> tuple[float, str]:
    rare = scarce_classes(fp.class_pixel_share, RARE_CLASS)
    if not rare:
        return 0.0, "no rare class: windows at random"
    if crop == "resize":
        return 0.0, f"class(es) {rare} rare, but every window is a whole image"
    return round(OVERSAMPLE, 4), f"class(es) {rare} rare: a third of the windows centred on one of their pixels"


def augmentation_for(fp: Fingerprint, size: int, oriented: bool) -> tuple[dict[str, float], str]:
    """Any-angle turns, elastic deformation, gamma and noise for microscopy-like data that has no orientation;
    none of them for other data (turning a street scene puts the sky aside; colour photos vary in light,
    which brightness and contrast cover)."""
    if oriented:
        return {"rotate": 0.0, "elastic": 0.0, "gamma": 0.0, "noise": 0.0}, "oriented data: no turns or warps"
    if not microscopy_like(fp):
        return (
            {"rotate": 0.0, "elastic": 0.0, "gamma": 0.0, "noise": 0.0},
            "colour images: flips and 90-degree turns only, no warps, gamma or noise",
        )
    elastic = max(1.0, round(size * ELASTIC_PER_WINDOW_PX, 1))
    return (
        {**MICROSCOPY_AUG, "elastic": elastic},
        f"grey images without orientation (microscopy-like): any-angle turns, elastic {elastic:g} px, "
        f"gamma {MICROSCOPY_AUG['gamma']:g}, noise {MICROSCOPY_AUG['noise']:g}",
    )


def repeat_for(
    train_images: int, size: int, compute: Compute, budget_s: float, given: dict[str, Any]
) -> tuple[int, str]:
    """(passes over the training split per epoch, reason): enough for MIN_EPOCH_WINDOWS windows and
    MIN_EPOCH_S seconds (estimated) an epoch while MIN_EPOCHS epochs still fit the budget; one where the
    user counts the epochs."""
    if "repeat" in given:
        return given["repeat"], "given"
    if "epochs" in given:
        return 1, "epochs given: each is one pass over the training split"
    _need_training_images(train_images)
    images = train_images
    windows_per_s = compute.pixels_per_s / (size * size)
    wanted = math.ceil(max(MIN_EPOCH_WINDOWS, MIN_EPOCH_S * windows_per_s) / images)
    pass_s = images * size * size / compute.pixels_per_s
    fits = int(budget_s / (MIN_EPOCHS * pass_s))
    repeat = max(1, min(wanted, fits))
    if repeat == 1:
        return 1, f"{images} training images: one pass an epoch"
    return repeat, (
        f"{images} training images: {repeat} passes an epoch ({repeat * images} windows; the rule asks "
        f"{MIN_EPOCH_WINDOWS} and a minute's work, as estimated, while {MIN_EPOCHS} epochs fit), so validation "
        "and checkpoints come once per epoch of useful length"
    )


def _need_training_images(train_images: int) -> None:
    # `plan` and `train` refuse such a data set first (`check_train`); a plan of "1 training images" hid it.
    if train_images < 1:
        raise ValueError("no training images: a plan needs pairs in the train split")


def default_budget_s(fp: Fingerprint, train_images: int, compute: Compute, size: int) -> float:
    seconds = DEFAULT_PASSES * train_images * size * size / compute.pixels_per_s
    return min(max(seconds, DEFAULT_BUDGET_S[0]), DEFAULT_BUDGET_S[1])


def make_plan(
    fp: Fingerprint,
    train_images: int,
    compute: Compute,
    time_budget_s: float | None = None,
    given: dict[str, Any] | None = None,
    max_steps: int | None = None,
    encoder_weights: str = "imagenet",
) -> Plan:
    """The plan for a data set (its fingerprint and training-split size) on `compute`.

    `given`: PLAN_FIELDS values the user chose; they are kept, and the rules that depend on them
    use them. `max_steps` (train's) changes what an epoch costs; `encoder_weights` (train's
    --encoder-weights) whether a pretrained encoder can be picked."""
    _need_training_images(train_images)
    given = dict(given or {})
    unknown = sorted(set(given) - set(PLAN_FIELDS))
    if unknown:
        raise ValueError(f"not plan fields: {unknown}")
    reasons: dict[str, str] = {}
    encoder, reasons["encoder"] = encoder_for(fp, compute, given, encoder_weights)
    architecture = given.get("architecture", "unet")
    reasons["architecture"] = "a U-Net decoder on the encoder's features" if encoder else "the plain U-Net"
    crop, size, reasons["crop"] = window(fp, compute, given.get("image_size"))
    if encoder and "image_size" not in given and size % ENCODER_MULTIPLE:
        crop, size, reasons["crop"] = window(fp, compute, ENCODER_MULTIPLE * math.ceil(size / ENCODER_MULTIPLE))
    crop = given.get("crop", crop)
    if "crop" in given:
        reasons["crop"] = f"{crop} given; the rule says: {reasons['crop']}"
    elif "image_size" in given:
        reasons["crop"] = f"{size} px window given: {reasons['crop']}"
    depth = given.get("depth", 5 if encoder else depth_for(size))
    reasons["depth"] = f"{size} px / 2^{depth} keeps a {size >> depth} px bottleneck" + (
        " (depth given)" if "depth" in given else " (the encoder's 32x)" if encoder else ""
    )
    base = given.get("base_filters", 32 if compute.device == "gpu" else 16)
    batch = 16 if compute.device == "gpu" else 4
    # One global batch must fit the training split (train refuses a smaller split).
    batch = given.get("batch_size", max(1, min(batch, train_images // max(compute.workers, 1))))
    reasons["width"] = f"{compute.device}: base {base} filters, {batch} windows per worker"
    loss, reasons["loss"] = loss_for(fp)
    loss = given.get("loss", loss)
    weights, reasons["class_weights"] = class_weights_for(fp)
    flip, rotate90, reasons["augment"] = orientation(fp)
    oriented = not rotate90
    flip, rotate90 = given.get("flip", flip), given.get("rotate90", rotate90)
    warps, reasons["warp"] = augmentation_for(fp, size, oriented)
    warps = {k: given.get(k, v) for k, v in warps.items()}
    reasons["jitter"] = "mild scale, brightness and contrast jitter for every data set"
    if encoder:
        norm, reasons["normalization"] = "raw_0_255", "the encoder takes raw 0..255 pixels (it rescales inside)"
    else:
        norm, reasons["normalization"] = normalization_for(fp)
    norm = given.get("normalization", norm)
    oversample, reasons["oversample"] = oversample_for(fp, crop)
    oversample = given.get("oversample", oversample)
    budget = time_budget_s or default_budget_s(fp, train_images, compute, size)
    reasons["budget"] = f"{budget / 60:.0f} min " + (
        "given" if time_budget_s else f"({DEFAULT_PASSES} passes, 5 min..2 h)"
    )
    repeat, reasons["repeat"] = repeat_for(train_images, size, compute, budget, given)
    # Native windows see a part of each image per step: count one window per image and epoch.
    windows = train_images * repeat
    if max_steps:
        windows = min(windows, max_steps * batch * compute.workers)
    epoch_s = windows * size * size / compute.pixels_per_s
    if "epochs" in given:
        epochs = given["epochs"]
        reasons["epochs"] = f"given (~{epoch_s:.0f} s an epoch, estimated)"
    else:
        epochs = max(1, int(budget / epoch_s))
        reasons["epochs"] = f"~{epoch_s:.0f} s an epoch (estimated) fits {epochs} in the budget"
    warmup = given.get("warmup_epochs", min(2.0, max(0.5, epochs / 20)))
    schedule = given.get("schedule", "cosine")
    reasons["schedule"] = f"{warmup:g} epochs of linear warm-up, then {schedule}"
    return Plan(
        crop=crop,
        image_size=size,
        architecture=architecture,
        encoder=encoder,
        depth=depth,
        base_filters=base,
        batch_size=batch,
        normalization=norm,
        loss=loss,
        class_weights=given.get("class_weights", weights),
        oversample=oversample,
        flip=flip,
        rotate90=rotate90,
        rotate=warps["rotate"],
        elastic=warps["elastic"],
        scale_jitter=given.get("scale_jitter", 0.2),
        brightness=given.get("brightness", 0.1),
        contrast=given.get("contrast", 0.1),
        gamma=warps["gamma"],
        noise=warps["noise"],
        repeat=repeat,
        epochs=epochs,
        warmup_epochs=warmup,
        schedule=schedule,
        pixel_stats=pixel_stats(fp, norm) if fp.intensity else None,
        time_budget_s=round(budget, 1),
        reasons=reasons,
        given=tuple(k for k in PLAN_FIELDS if k in given),
    )


def read_fingerprint(loc: Location, manifest: Manifest) -> Fingerprint:
    """The manifest's fingerprint; computed from the shards (Ray tasks) for a data set prepared before
    fingerprints existed, or before the fields this version reads (`Fingerprint.is_current`)."""
    if Fingerprint.is_current(manifest.fingerprint):
        return Fingerprint.from_json(manifest.fingerprint)
    from raysegment.data.fingerprint import fingerprint_shards
    from raysegment.runtime import init_ray

    init_ray()
    return fingerprint_shards(loc, manifest)


def compute_of(spec: TrainSpec) -> Compute:
    return Compute(spec.workers, spec.gpus_per_worker, spec.cpus_per_worker)


def plan_for_spec(spec: TrainSpec, loc: Location, manifest: Manifest) -> Plan:
    """The plan `raysegment plan` makes for the spec's data set and compute, with the PLAN_FIELDS the
    spec sets explicitly (`model_fields_set`: a flag, a spec-file field, a keyword) as given; train's own
    refusals first, before a plan is made of no training (or no validation) images, DATA named as given
    (train checks the rest, the labels and its batch, after: `check_fits`)."""
    from raysegment.train.config import check_train, check_val

    check_train(manifest, spec.data)
    check_val(manifest, spec.data)
    return _checked_plan(spec, loc, manifest)


def _checked_plan(spec: TrainSpec, loc: Location, manifest: Manifest) -> Plan:
    """`plan_for_spec` of a data set already checked (`write_plan`'s `check_data`: its checks run once)."""
    given = {k: getattr(spec, k) for k in PLAN_FIELDS if k in spec.model_fields_set}
    if given.get("flip") == "auto":
        del given["flip"]  # `flip: true` / --flip: flips on the axes the plan finds right
    return make_plan(
        read_fingerprint(loc, manifest),
        manifest.counts.train,
        compute_of(spec),
        spec.time_budget,
        given,
        max_steps=spec.max_steps,
        encoder_weights=spec.encoder_weights,
    )


def write_plan(spec: TrainSpec, endpoint_url: str | None = None) -> tuple[Plan, list[str]]:
    """`raysegment plan`: the plan for the spec's data set and compute, written to `spec.out` as
    {"data": URI, **plan}; returned with the data set's warnings (`manifest_warnings`)."""
    from raysegment import storage
    from raysegment.data.classes import manifest_warnings
    from raysegment.data.manifest import read_manifest
    from raysegment.train.config import check_data

    loc, manifest = read_manifest(spec.data, endpoint_url)
    # train refuses such data sets: no plan for them either (the plan's batch is at least 1 per worker). These
    # include `plan_for_spec`'s own checks, so the plan is made without them (the messages name DATA's URI).
    check_data(manifest, loc.uri, 1, spec.workers)
    plan = _checked_plan(spec, loc, manifest)
    storage.write_json(storage.resolve(spec.out, endpoint_url), {"data": loc.uri, **plan.to_json()})
    return plan, manifest_warnings(manifest)


def planned_spec(spec: TrainSpec, plan: Plan) -> TrainSpec:
    """The spec with the plan's values in (given ones are the spec's own), validated again. When the
    plan chose the epochs, its budget becomes the spec's `time_budget`: training stops inside it."""
    # An encoder (given or the plan's) fixed its input in the plan: raw pixels, sides a multiple of 32.
    planned = plan.train_values()
    values = {**spec.model_dump(exclude_unset=True), **planned}
    if "epochs" not in plan.given:
        values["time_budget"] = plan.time_budget_s
    return type(spec).model_validate(values)


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
        reason = "given" if name in plan.given else plan.reasons.get(_reason_of(name), "")
        lines.append(f"  {name:<14} {value!s:<14} {reason}".rstrip())
    lines.append(f"  budget         {plan.reasons['budget']}")
    return lines


def _reason_of(name: str) -> str:
    return {
        "crop": "crop",
        "architecture": "architecture",
        "encoder": "encoder",
        "depth": "depth",
        "base_filters": "width",
        "loss": "loss",
        "class_weights": "class_weights",
        "normalization": "normalization",
        "oversample": "oversample",
        "flip": "augment",
        "rotate": "warp",
        "scale_jitter": "jitter",
        "repeat": "repeat",
        "epochs": "epochs",
        "warmup_epochs": "schedule",
    }.get(name, "")


def card_record(plan: Plan, compute: Compute) -> TrainingPlan:
    """What the model card keeps of the plan: the values used, which were given and which chosen
    by the rules, the reasons, the budget and compute, and the normalisation's statistics."""
    return TrainingPlan(
        values=plan.train_values(),
        given=list(plan.given),
        auto=list(plan.auto),
        reasons=plan.reasons,
        time_budget_s=plan.time_budget_s,
        compute=asdict(compute),
        normalization={"kind": plan.normalization, **(plan.pixel_stats or {})},
        oversample_rare=plan.oversample_rare,
    )
