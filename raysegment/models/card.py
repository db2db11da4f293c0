"""The model card: OUT/model.json beside OUT/model.keras, the one description of a trained model.

`train` writes it; `infer`, `evaluate`, `show`, `nightly` and the predictor actor read it.
This module owns both file names, reading and writing (local or s3:// through
`storage`), validation (a card that is not raysegment's, or too old to use, is one
clear error naming the file and the fix) and the facts callers derive from it:
input size, native scale, normalisation, classes, palette, head.

The JSON on disk keeps the keys of the first release, so every model trained so
far still loads; keys this module does not know are kept when a card is rewritten.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raysegment import storage
from raysegment.errors import DataError

MODEL_FILE = "model.keras"
CARD_FILE = "model.json"


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


# Model input = uint8 RGB x per-channel scale + per-channel offset (`ModelCard.pixel_affine`).
# scale_0_1 is what `train` does (data.pipeline.normalize); the others are for imported models.
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


class InputSpec(_Part):
    size: tuple[int, int]
    channels: Literal[3] = 3
    # What the predictor does to pixels (NORMALIZATIONS): uint8 RGB scaled to [0, 1] for trained models.
    normalization: Literal["scale_0_1", "scale_-1_1", "raw_0_255", "imagenet"] = "scale_0_1"
    # "none": trained on windows at the original scale; inference runs at full resolution.
    resize: Literal["bilinear", "none"] = "bilinear"


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
    # Recorded for the data set, not yet applied by training or inference (see `recorded_only`).
    normalization: dict[str, Any] | None = None
    oversample_rare: bool | None = None
    recorded_only: list[str] = Field(default_factory=list)


class Imported(_Part):
    """Where a model brought by `raysegment model import` came from (absent for trained models)."""

    source: str
    source_sha256: str
    keras_class: str


class ModelCard(_Part):
    """model.json, typed. Build one with `ModelCard.create`, load one with `ModelCard.read`."""

    model_id: str
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
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

    @model_validator(mode="after")
    def _names_match_classes(self) -> ModelCard:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes {self.num_classes}")
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
        loc = storage.resolve(model_uri, endpoint_url, retry_s)
        card_loc = loc.child(CARD_FILE)
        if not storage.exists(card_loc) or not storage.exists(loc.child(MODEL_FILE)):
            raise DataError(
                f"{loc.uri}: not a trained model (needs {MODEL_FILE} and {CARD_FILE}); run `raysegment train`"
            )
        card = cls.parse(storage.read_json(card_loc), card_loc.uri)
        if verify_model:
            card.check_model_file(loc)
        return card

    def check_model_file(self, model_dir: storage.Location) -> None:
        """model.keras must be the file this card was written for: another model's file copied into
        the folder would predict under this card's classes and stamp every row with the wrong hash."""
        loc = model_file(model_dir)
        found = loc.call(lambda: _sha256(loc))
        if found != self.model_sha256:
            raise DataError(
                f"{loc.uri}: sha256 {found[:12]}... does not match {CARD_FILE}'s model_sha256 "
                f"{self.model_sha256[:12]}...: the model file was replaced or damaged; copy {MODEL_FILE} and "
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
        storage.write_json(model_dir.child(CARD_FILE), self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        """The card's JSON: the keys that were set (or read), nothing filled in by defaults."""
        return self.model_dump(mode="json", exclude_unset=True)

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
    def pixel_scale(self) -> float:
        """Factor from uint8 pixels to the model's input range (normalisation scale_0_1)."""
        return 1.0 / 255.0

    @property
    def pixel_affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (scale, offset) from uint8 pixels to the model's input (see NORMALIZATIONS)."""
        return NORMALIZATIONS[self.input.normalization]

    @property
    def head(self) -> str:
        return self.architecture.head


def model_file(model_dir: storage.Location) -> storage.Location:
    """Where the Keras model of a model directory lives."""
    return model_dir.child(MODEL_FILE)


def _sha256(loc: storage.Location) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks (a model may not fit in memory twice)."""
    digest = hashlib.sha256()
    with loc.fs.open(loc.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
