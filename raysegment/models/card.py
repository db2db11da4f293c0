"""The model card: OUT/model.json beside OUT/model.keras, the one description of a trained model.

`train` writes it; `infer`, `evaluate`, `show`, `nightly` and the predictor actor read it.
This module owns the model folder's file names (the card's, the model's, what `train` and
`evaluate` write beside them), reading and writing (local or s3:// through
`storage`), validation (a card that is not raysegment's, or too old to use, is one
clear error naming the file and the fix) and the facts callers derive from it:
input size, native scale, normalisation, classes, palette, head, and flip TTA (`ModelCard.tta`).

The JSON on disk keeps the keys of the first release, so every model trained so
far still loads; keys this module does not know are kept when a card is rewritten.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raysegment.data.classes import distinct_names
from raysegment.errors import DataError

if TYPE_CHECKING:
    # Imported where a card is read or written: the schema and `normalize` need numpy and pydantic only, so
    # `data/examples.py` runs where fsspec and pyarrow are not installed (jobs/gpu_check.py's GPU machine).
    from raysegment import storage

MODEL_FILE = "model.keras"
# An imported TensorFlow SavedModel, kept whole in place of model.keras (`models/loader.py` loads either).
SAVED_MODEL_DIR = "saved_model"
# The file that makes a folder a SavedModel (`model import` takes one; `export` refuses a DEST holding one).
SAVED_MODEL_PB = "saved_model.pb"
CARD_FILE = "model.json"
# What `raysegment export` writes beside a card, by format: a DEST given as MODEL is named as one.
EXPORT_FILES = {"saved_model": "saved_model", "onnx": "model.onnx", "tflite": "model.tflite"}
# What `train` writes beside the model and its card (MLflow keeps these files; `model import` refuses
# a DEST holding any of them, or the TensorBoard folder). Its checkpoints go under OUT/{--name}.
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrix.png"
EXAMPLES_FILE = "examples.png"
TRAINED_FILES = (METRICS_FILE, HISTORY_FILE, CURVES_FILE, CONFUSION_FILE, EXAMPLES_FILE)
TENSORBOARD_DIR = "tensorboard"
# `evaluate`'s default --out in the model's folder, one per split.
EVALUATION_FILES = "eval-*.json"


def evaluation_file(split: str) -> str:
    """The name of `evaluate`'s results for `split` in the model's folder (matches EVALUATION_FILES)."""
    return EVALUATION_FILES.replace("*", split)


class _Part(BaseModel):
    # Unknown keys are kept (a newer raysegment or a person may add some); known ones are checked.
    model_config = ConfigDict(frozen=True, extra="allow")


class Architecture(_Part):
    name: str = "unet"
    depth: int = Field(0, ge=0, le=10)
    base_filters: int | None = None
    batch_norm: bool | None = None
    upsampling: str | None = None
    head: Literal["softmax", "sigmoid"] = "softmax"
    encoder: str | None = None  # a keras.applications backbone (models/encoders.py); depth is then 5
    encoder_weights: str | None = None  # what it started from: imagenet, none, or a weights file


# Model input = decoded pixels (uint8, or 16-bit/float at their own precision) as float32, clipped per channel
# to `InputSpec.pixel_clip` where the card has bounds, then x per-channel scale + per-channel offset
# (`InputSpec.pixel_affine`); `normalize` below is the one implementation (training's too).
# The presets below are defined on 0..255 pixels: scale_0_1 is what `train --no-plan` does, the others are for
# imported models; "zscore" and "zscore_clipped" come from the data set's fingerprint (`PixelStats`).
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "scale_0_1": ((1.0 / 255.0,) * 3, (0.0,) * 3),
    "scale_-1_1": ((2.0 / 255.0,) * 3, (-1.0,) * 3),
    "raw_0_255": ((1.0,) * 3, (0.0,) * 3),
    "imagenet": (
        tuple(1.0 / (255.0 * s) for s in _IMAGENET_STD),
        tuple(-m / s for m, s in zip(_IMAGENET_MEAN, _IMAGENET_STD)),
    ),
}


ZSCORE = ("zscore", "zscore_clipped")
Normalization = Literal["scale_0_1", "scale_-1_1", "raw_0_255", "imagenet", "zscore", "zscore_clipped"]


class PixelStats(_Part):
    """Per-channel statistics of the training pixels (the data set's fingerprint), in the decoded pixels'
    units: z-score `mean` and `std`, and for zscore_clipped the clip bounds (its 0.5 and 99.5 percentiles)."""

    # One value per input channel (3 for RGB; a multi-band data set's own count, `InputSpec.channels`).
    mean: tuple[float, ...]
    std: tuple[float, ...]
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None


class InputSpec(_Part):
    size: tuple[int, int]
    # The channels the model takes, and which bands of an image they are (1-based, `prepare --bands`; None:
    # grey and RGB images as RGB, multi-band images all their bands): the data set's manifest's, so every
    # reader decodes what training saw (`imaging.Channels.of(bands, channels)`).
    channels: int = Field(3, ge=1, le=256)
    bands: list[int] | None = None
    # How decoded pixels reach the normalisation: uint8 (8-bit data; deeper images scaled to 8 bits by their
    # maximum, as before #19), or float32: 16-bit and float data sets at their own values (float32 holds 16-bit
    # values exactly), for a z-score computed on them.
    pixel_type: Literal["uint8", "float32"] = "uint8"
    # float32 only: the training images held 8-bit ones among the deeper ones, so an 8-bit input is one it
    # knows (the predictor refuses 8-bit images to a model that never saw any).
    eight_bit_seen: bool = False
    # What the predictor does to pixels (NORMALIZATIONS, or a z-score from `stats`); cards written before
    # z-scores have scale_0_1 (uint8 RGB scaled to [0, 1]).
    normalization: Normalization = "scale_0_1"
    stats: PixelStats | None = None
    # "none": trained on windows at the original scale; inference runs at full resolution.
    resize: Literal["bilinear", "none"] = "bilinear"

    @model_validator(mode="after")
    def _zscore_has_stats(self) -> InputSpec:
        if not all(1 <= s <= 65536 for s in self.size):  # as `model import` asks; 0 or 10^5 was a traceback
            raise ValueError(f"input size {self.size}: height and width from 1 to 65536")
        if self.normalization in ZSCORE and self.stats is None:
            raise ValueError(f"normalization {self.normalization} needs stats (per-channel mean and std)")
        if self.normalization == "zscore_clipped" and self.stats is not None and self.stats.low is None:
            raise ValueError("normalization zscore_clipped needs stats.low and stats.high (clip bounds)")
        if self.bands is not None and len(self.bands) != self.channels:
            raise ValueError(f"{len(self.bands)} bands for {self.channels} channels")
        if self.stats is not None and len(self.stats.mean) != self.channels:
            raise ValueError(f"stats have {len(self.stats.mean)} channels, the input {self.channels}")
        if self.normalization == "imagenet" and self.channels != 3:
            raise ValueError("normalization imagenet is for 3 (RGB) channels")
        if self.pixel_type != "uint8" and self.normalization not in ZSCORE:
            raise ValueError(f"pixel_type {self.pixel_type} needs a z-score normalization (the presets are on 0..255)")
        return self

    @property
    def native_pixels(self) -> bool:
        """True when 16-bit and float pixels reach the normalisation at their own values (`pixel_type`)."""
        return self.pixel_type == "float32"

    @property
    def pixel_affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (scale, offset) from the (clipped) pixels to the model's input."""
        if self.normalization not in ZSCORE:
            scale, offset = NORMALIZATIONS[self.normalization]
            # The presets other than imagenet are the same on every channel: as many as the input has.
            if self.channels == 3:
                return scale, offset
            return (scale[0],) * self.channels, (offset[0],) * self.channels
        assert self.stats is not None
        # A constant channel (std 0) is only shifted: a scale of 1 / 0 would make it inf.
        std = tuple(s if s > 0 else 1.0 for s in self.stats.std)
        return tuple(1.0 / s for s in std), tuple(-m / s for m, s in zip(self.stats.mean, std))

    @property
    def pixel_clip(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Per-channel (low, high) the pixels are clipped to before the affine, or None (no clipping)."""
        if self.normalization != "zscore_clipped":
            return None
        assert self.stats is not None and self.stats.low is not None and self.stats.high is not None
        return self.stats.low, self.stats.high


class TrainingPlan(_Part):
    """How the training values were chosen (`plan.card_record`): the values used, which were given
    (flag or spec field) and which the plan's rules chose, and the rules' reasons. Absent in cards
    of models trained before the plan existed or with `plan: false`."""

    values: dict[str, Any]
    given: list[str] = Field(default_factory=list)
    auto: list[str] = Field(default_factory=list)
    reasons: dict[str, str] = Field(default_factory=dict)
    time_budget_s: float | None = None
    # Training stops after the last epoch that ends inside this (given, or the plan's when it chose the epochs).
    stop_at_s: float | None = None
    compute: dict[str, Any] | None = None
    # The normalisation's kind and statistics (also under `input`, which inference reads).
    normalization: dict[str, Any] | None = None
    oversample_rare: bool | None = None
    # Cards of the first plan release list what they recorded without applying it.
    recorded_only: list[str] = Field(default_factory=list)
    # With a time budget: the epochs that the first epoch's measured time fitted in it (`values.epochs` is
    # the plan's estimate), and that first epoch's seconds (one-time costs taken out). None without a budget.
    fitted_epochs: int | None = None
    first_epoch_s: float | None = None


class Imported(_Part):
    """Where a model brought by `raysegment model import` came from (absent for trained models)."""

    source: str
    source_sha256: str
    keras_class: str
    # A SavedModel's function the model runs (`serve` from Keras' model.export, else `serving_default`).
    call_endpoint: str | None = None


# Flip test-time augmentation: the extra passes averaged with the plain one, each named by what it does to the
# image: "transpose" swaps rows and columns (first), then the named flips reverse image axes (0: rows, a vertical
# flip; 1: columns, a horizontal flip). With the transposes the passes are the 8 symmetries of the square.
TTA_FLIPS: dict[str, tuple[bool, tuple[int, ...]]] = {
    "horizontal": (False, (1,)),
    "vertical": (False, (0,)),
    "horizontal+vertical": (False, (0, 1)),
    "transpose": (True, ()),
    "transpose+horizontal": (True, (1,)),
    "transpose+vertical": (True, (0,)),
    "transpose+horizontal+vertical": (True, (0, 1)),
}
# The passes by the flips training used (`TrainSpec.flip`): the mirror images the model learned. One trained
# without flips, or without a training record (imported), gets the single horizontal pass TTA always had.
_TTA_OF_FLIPS = {
    "none": ("horizontal",),
    "horizontal": ("horizontal",),
    "vertical": ("vertical",),
    "both": ("horizontal", "vertical", "horizontal+vertical"),
}
# With 90-degree turns (`TrainSpec.rotate90`): the three turns (a transpose then a flip is a quarter turn), and
# with any flip as well every symmetry of the square (a turn and a mirror generate them all).
_TTA_TURNS = ("horizontal+vertical", "transpose+horizontal", "transpose+vertical")


class InferenceAdvice(_Part):
    """What `train` measured at its end (`evaluate.measure_tta`): the best model's val mIoU without and with
    flip TTA, on `images` val images, and whether jobs turn TTA on for this model when not told."""

    tta_flip: bool
    val_mean_iou: dict[str, float]  # "plain", "tta"
    images: int
    flips: list[str] = Field(default_factory=list)  # the mirrored passes measured (TTA_FLIPS)
    min_gain: float | None = None  # the mIoU gain that turns TTA on


@dataclass(frozen=True)
class TTA:
    """The flip TTA of one job (`ModelCard.tta`): the mirrored passes (none: off) and who chose: the job's
    flag or spec field ("given"), or the card's recommendation ("card")."""

    flips: tuple[str, ...]
    source: Literal["given", "card"]

    @property
    def on(self) -> bool:
        return bool(self.flips)

    def record(self) -> dict[str, Any]:
        """What a run record and evaluate's metrics say about it."""
        return {"tta_flip": self.on, "tta_flips": list(self.flips), "tta_from": self.source}


class ExportRecord(_Part):
    """What one `export` format's graph in the card's folder holds (`ModelCard.exports`)."""

    tta_flip: bool
    tta_flips: list[str]
    tta_from: Literal["given", "card"]
    probabilities: bool


class ModelCard(_Part):
    """model.json, typed. Build one with `ModelCard.create`, load one with `ModelCard.read`."""

    model_id: str
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # keras: model.keras; saved_model: an imported SavedModel folder, hashed by `tree_sha256`.
    model_format: Literal["keras", "saved_model"] = "keras"
    architecture: Architecture = Field(default_factory=Architecture)
    num_classes: int = Field(ge=1, le=255)
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int = 255
    input: InputSpec
    # What the model outputs per pixel: logits, or class probabilities (imported models; see `imported`).
    output: Literal["logits", "probabilities"] = "logits"
    training: dict[str, Any] | None = None
    plan: TrainingPlan | None = None
    data: dict[str, Any] | None = None
    metrics: dict[str, float] | None = None
    best_epoch: int | None = None
    versions: dict[str, str] | None = None
    imported: Imported | None = None
    # Absent in cards written before flip TTA was measured at the end of training, and in imported models'.
    inference: InferenceAdvice | None = None
    # An export folder's card (export.py): per format there, what its graph holds. Any format name: a newer
    # raysegment's card still loads.
    exports: dict[str, ExportRecord] | None = None

    @model_validator(mode="after")
    def _names_match_classes(self) -> ModelCard:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes {self.num_classes}")
        if not distinct_names(self.class_names):
            raise ValueError(f"class_names {self.class_names} repeat a name or hold an empty one")
        return self

    @classmethod
    def create(cls, model_sha256: str, architecture: dict[str, Any], **fields: Any) -> ModelCard:
        """A new card; the model id is the architecture's name and the start of the model file's hash."""
        arch = Architecture(**architecture)
        return cls(model_id=f"{arch.name}-{model_sha256[:12]}", model_sha256=model_sha256, architecture=arch, **fields)

    @classmethod
    def read(
        cls, model_uri: str, endpoint_url: str | None = None, verify_model: bool = False, retry_s: float | None = None
    ) -> ModelCard:
        """The card of a trained model directory (local or s3://), or one clear DataError.

        `verify_model`: also hash model.keras and compare with the card's model_sha256 (see
        `check_model_file`); the jobs do this once, on the driver."""
        from raysegment import storage
        from raysegment.errors import StorageError

        loc = storage.resolve(model_uri, endpoint_url, retry_s)
        card_loc = loc.child(CARD_FILE)
        card = cls.parse(storage.read_json(card_loc), card_loc.uri) if storage.exists(card_loc) else None
        if card is None or not storage.exists(card.model_location(loc)):
            name = card.model_name if card else MODEL_FILE
            exported = [f for f in EXPORT_FILES.values() if card is not None and storage.exists(loc.child(f))]
            if exported:  # `raysegment export`'s DEST: the graph runs without raysegment, not under it
                raise DataError(
                    f"{loc.uri}: an export ({', '.join(exported)}), not a trained model (needs {name}); give the "
                    "folder it was exported from, or bring a SavedModel in with `raysegment model import`"
                )
            try:  # only here, model.json missing: a model that is there costs no listing
                missing = card is None and not storage.exists(loc)
            except StorageError as exc:  # a role that may read files but not list the folder (S3 GetObject only)
                if exc.transient:
                    raise
                missing = False
            if missing:  # it said "not a trained model ... run `raysegment train`", as if the folder were there
                raise DataError(
                    f"{loc.uri}: not found; check the path: MODEL is the folder `raysegment train` (--out) or "
                    "`raysegment model import` (DEST) wrote"
                )
            raise DataError(f"{loc.uri}: not a trained model (needs {name} and {CARD_FILE}); run `raysegment train`")
        if verify_model:
            card.check_model_file(loc)
        return card

    def check_model_file(self, model_dir: storage.Location) -> None:
        """model.keras must be the file this card was written for: another model's file copied into
        the folder would predict under this card's classes and stamp every row with the wrong hash."""
        loc = self.model_location(model_dir)
        found = loc.call(lambda: tree_sha256(loc) if self.model_format == "saved_model" else location_sha256(loc))
        if found != self.model_sha256:
            raise DataError(
                f"{loc.uri}: sha256 {found[:12]}... does not match {CARD_FILE}'s model_sha256 "
                f"{self.model_sha256[:12]}...: the model file was replaced or damaged; copy {self.model_name} and "
                f"{CARD_FILE} together from one `raysegment train` output, or train again"
            )

    @classmethod
    def parse(cls, obj: Any, source: str) -> ModelCard:
        """Validate a card's JSON; `source` names the file in the error."""
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "card"
            raise DataError(
                f"{source}: not a raysegment model card or too old to use ({where}: {first['msg']}); "
                "train the model again with `raysegment train`"
            ) from None

    def write(self, model_dir: storage.Location) -> None:
        """Write model.json under the model directory."""
        from raysegment import storage

        storage.write_json(model_dir.child(CARD_FILE), self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        """The card's JSON: the keys that were set (or read), nothing filled in by defaults."""
        return self.model_dump(mode="json", exclude_unset=True)

    @property
    def model_name(self) -> str:
        """The model's file (or SavedModel folder) in its directory."""
        return SAVED_MODEL_DIR if self.model_format == "saved_model" else MODEL_FILE

    def model_location(self, model_dir: storage.Location) -> storage.Location:
        """Where the model of this card's directory lives."""
        return model_dir.child(self.model_name)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at; images are resized to it unless native scale."""
        return self.input.size

    @property
    def native_scale(self) -> bool:
        """True when the model predicts at the image's own resolution (trained with crop: native)."""
        return self.input.resize == "none"

    @property
    def size_multiple(self) -> int:
        """Height and width a full-resolution input must be a multiple of (2**depth for a U-Net)."""
        return 2**self.architecture.depth

    @property
    def pixel_affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (scale, offset) from the (clipped) pixels to the model's input (`InputSpec.pixel_affine`)."""
        return self.input.pixel_affine

    @property
    def pixel_clip(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Per-channel (low, high) clip bounds applied before the affine, or None (`InputSpec.pixel_clip`)."""
        return self.input.pixel_clip

    @property
    def head(self) -> str:
        return self.architecture.head

    @property
    def tta_flips(self) -> tuple[str, ...]:
        """The mirrored passes flip TTA averages with the plain one: those of the flips training used."""
        training = self.training or {}
        flip = training.get("flip", "none") if training.get("augment", True) else "none"
        # "auto" is left only by `--no-plan`, which trains both axes; true and false from before the axes.
        flip = {"auto": "both", True: "both", False: "none"}.get(flip, flip)
        if training.get("rotate90") and training.get("augment", True):
            return tuple(TTA_FLIPS) if flip in _TTA_OF_FLIPS and flip != "none" else _TTA_TURNS
        return _TTA_OF_FLIPS.get(flip, _TTA_OF_FLIPS["none"])

    def tta(self, given: bool | None = None) -> TTA:
        """The flip TTA a job runs: `given` (flag or spec field) when set, else the card's recommendation
        (`inference`; off for cards without one). infer, evaluate, serve and show all decide here."""
        if given is None:
            on, source = self.inference is not None and self.inference.tta_flip, "card"
        else:
            on, source = given, "given"
        return TTA(self.tta_flips if on else (), source)


def location_sha256(loc: storage.Location) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks (a model may not fit in memory twice)."""
    digest = hashlib.sha256()
    with loc.fs.open(loc.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(loc: storage.Location) -> str:
    """One hex sha256 for a folder (a SavedModel): over each file's relative path and sha256, in path order.
    Plain filesystem calls, like `location_sha256`: the caller retries the whole (`Location.call`)."""
    digest = hashlib.sha256()
    root = loc.path.rstrip("/") + "/"
    for path in sorted(loc.fs.find(loc.path)):
        rel = path[len(root) :]
        digest.update(f"{rel}\0{location_sha256(loc.child(rel))}\n".encode())
    return digest.hexdigest()


def normalize(images: np.ndarray, card: ModelCard | InputSpec) -> np.ndarray:
    """Decoded pixels (uint8, uint16 or float, ..., H, W, 3) -> the model's float32 input, per the card's
    normalisation: clipped to `pixel_clip` where it has bounds, then `pixel_affine`. The one implementation:
    training (`data.examples`, with the `InputSpec` the card is then written with) calls it too, and
    `raysegment export`'s graph does the same clip and affine in the same float32 arithmetic.

    A float image's NaN and +-inf pixels (no data: a GeoTIFF's nodata, `tiff.mark_nodata`) become 0, the data
    set's mean under a z-score: one NaN would otherwise spread through every convolution over it, and in
    training turn the loss and then every weight into NaN."""
    spec = card.input if isinstance(card, ModelCard) else card
    scale, offset = (np.asarray(v, np.float32) for v in spec.pixel_affine)
    x = images.astype(np.float32)
    missing = ~np.isfinite(x) if images.dtype.kind == "f" else None
    clip = spec.pixel_clip
    if clip is not None:
        np.clip(x, np.asarray(clip[0], np.float32), np.asarray(clip[1], np.float32), out=x)
    # In place on the copy astype made: the same float32 operations in the same order, half the memory.
    x *= scale
    x += offset
    if missing is not None and missing.any():
        x[missing] = 0.0
    return x
