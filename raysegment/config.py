"""Job specs: validated models loaded from YAML, with CLI flags layered on top.

Field names are the CLI's argument names (``--batch-size`` -> ``batch_size``), so a
spec file and a command line say the same thing. Unknown fields are errors:
a misspelt option must never silently fall back to a default.
"""

from __future__ import annotations

import calendar
import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from raysegment.data import limits, masks
from raysegment.data.classes import IGNORE_INDEX, distinct_names
from raysegment.data.imaging import IMAGE_EXTENSIONS
from raysegment.errors import ConfigError
from raysegment.specfile import clip, echo, read_yaml
from raysegment.storage import redact

# How MLflow's client authenticates to a tracking server (never a URI's user:password).
MLFLOW_AUTH = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"


def comma_list(v: Any) -> Any:
    """A flag's (or spec file's) comma-separated text as its items, stripped; blank text is no item.

    The one rule for every list given as text ('a, b' is ['a', 'b']); a YAML list passes unchanged. An empty
    item ('bg,,cell') is refused: dropping it would make three class names two, a typo a different data set.
    """
    if not isinstance(v, str):
        return v
    if not v.strip():
        return []
    items = [p.strip() for p in v.split(",")]
    if "" in items:
        raise ValueError(f"an empty item in {v!r}: separate the items by single commas")
    return items


def min_max(v: Any, usage: str) -> Any:
    """A flag's MIN or MIN:MAX text (or one int) as (MIN, MAX); `usage` is the error for other text."""
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, str):
        lo, _, hi = v.partition(":")
        if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
            raise ValueError(usage)
        return (int(lo), int(hi or lo))
    return v


def distinct_class_names(names: list[str]) -> None:
    """2 to 255 names, each non-empty and used once (`classes.distinct_names`)."""
    if not 2 <= len(names) <= 255 or not distinct_names(names):
        raise ValueError("give 2 to 255 distinct, non-empty class names, comma-separated")


class Spec(BaseModel):
    """Base of all job specs: unknown fields and wrong types are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    endpoint_url: str | None = Field(None, description="S3 endpoint; default from AWS_ENDPOINT_URL")

    @field_validator("*", mode="after")
    @classmethod
    def _no_credentials_in_uris(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str) and "://" in v and redact(v) != v:
            # MLflow's client reads its own credentials; the AWS ones are object storage's.
            fix = MLFLOW_AUTH if info.field_name == "mlflow_uri" else "use AWS_* env vars or a profile"
            raise ValueError(f"credentials in a URI are not allowed; {fix}")
        return v


# One storage deadline field, shared by every spec that touches object storage.
StorageRetryS = Annotated[
    float | None,
    Field(
        ge=0,
        le=86400,
        description="keep retrying unreachable object storage this long, then fail "
        "(default: RAYSEGMENT_STORAGE_RETRY_S or 120)",
    ),
]


class PrepareSpec(Spec):
    source: str
    dest: str
    layout: Literal["pairs", "voc", "cityscapes", "list"] = "pairs"
    images_dir: str | None = Field(None, description="pairs: images folder under SOURCE (default images)")
    masks_dir: str | None = Field(None, description="pairs: masks folder under SOURCE (default masks)")
    mask_suffix: str | None = Field(
        None, max_length=64, description="pairs: masks are named NAME + this suffix before the extension (a_mask.png)"
    )
    mask_values: dict[int, int] | None = Field(None, description="pairs: raw mask value -> class id, '0:0,255:1'")
    mask_threshold: int | None = Field(
        None, ge=1, le=65535, description="soft binary masks: value >= T -> 1, else 0 (16-bit masks: up to 65535)"
    )
    mask_colors: str | list[str] | None = Field(
        None, description="colour-coded masks: 'R,G,B:ID;R,G,B:ID' or a class_dict.csv of name,r,g,b"
    )
    unlisted_colors: Literal["invalid", "ignore"] = Field("invalid", description="colours not in mask_colors")
    mask_zero: Literal["class", "ignore"] = Field(
        "class", description="mask value 0: class 0, or ignore: unlabelled, and value v is class v-1 (ADE20K)"
    )
    mask_alpha: Literal["ignore", "keep"] = Field(
        "ignore", description="transparent mask pixels: ignore (unlabelled), or keep: their value is their class"
    )
    bands: list[int] | None = Field(
        None, description="image bands the model sees, 1-based: '1,2,3' (default: RGB, or every band past 4)"
    )
    num_classes: int | None = Field(None, ge=2, le=255)
    class_names: list[str] | None = None
    val_keys: list[str] | str | None = Field(None, description="keys of the val split: 'a,b,c' or a file of keys")
    val_fraction: float | None = Field(None, ge=0.0, lt=1.0, description="hash split; default 0.2")
    seed: int = 0
    shard_size_mb: float = Field(256.0, gt=0, le=8192)
    skip_invalid: bool = False
    overwrite: bool = False
    storage_retry_s: StorageRetryS = None

    @field_validator("mask_values", mode="before")
    @classmethod
    def _parse_mask_values(cls, v: Any) -> Any:
        if isinstance(v, str):
            out: dict[int, int] = {}
            for item in comma_list(v):
                raw, sep, cid = item.partition(":")
                if not sep or not raw.strip().isdigit() or not cid.strip().isdigit():
                    raise ValueError(f"bad entry '{item}'; write RAW:CLASS pairs, e.g. 0:0,255:1")
                out[int(raw)] = int(cid)
            return out
        return v

    @field_validator("bands", mode="before")
    @classmethod
    def _parse_bands(cls, v: Any) -> Any:
        if isinstance(v, int):
            return [v]
        if isinstance(v, str):
            items = comma_list(v)
            if not items or not all(p.isdigit() for p in items):
                raise ValueError(f"bad bands '{v}'; write 1-based band numbers separated by commas, e.g. 1,2,3")
            return [int(p) for p in items]
        return v

    @field_validator("bands", mode="after")
    @classmethod
    def _check_bands(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1 or len(set(v)) != len(v)):
            raise ValueError("bands are distinct 1-based band numbers, e.g. 1,2,3 (band 1 is the first)")
        return v

    @field_validator("val_keys", mode="before")
    @classmethod
    def _keys_as_strings(cls, v: Any) -> Any:
        # YAML reads `val_keys: [24, 25]` as ints; keys are always strings.
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return [str(k) for k in v]
        return v

    @field_validator("mask_values", mode="after")
    @classmethod
    def _check_mask_values(cls, v: dict[int, int] | None) -> dict[int, int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("empty mapping; write RAW:CLASS pairs, e.g. 0:0,255:1")
        for raw, cid in v.items():
            if not 0 <= raw <= 65535:
                raise ValueError(f"raw value {raw} is outside 0..65535; masks hold 8- or 16-bit values")
            if not 0 <= cid <= 255:
                raise ValueError(f"class id {cid} for raw value {raw} is outside 0..254 (255 = ignore)")
        return v

    @field_validator("class_names", mode="before")
    @classmethod
    def _split_class_names(cls, v: Any) -> Any:
        return comma_list(v)

    @field_validator("class_names", mode="after")
    @classmethod
    def _check_class_names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            distinct_class_names(v)
        return v

    @field_validator("mask_colors", mode="after")
    @classmethod
    def _check_mask_colors(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and not (isinstance(v, str) and masks.is_color_file(v)):
            masks.parse_color_pairs(v)  # a ValueError names the bad entry
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PrepareSpec:
        self._consistent_mask_encoding()
        fixed = self.layout in ("voc", "cityscapes")
        if self.layout == "list" and (self.images_dir is not None or self.masks_dir is not None):
            raise ValueError("--images-dir/--masks-dir do not apply to --layout list; the list names every file")
        if self.layout != "pairs" and self.mask_suffix:
            raise ValueError("--mask-suffix applies to --layout pairs only")
        if fixed:
            mask_flags = ("images_dir", "masks_dir", "mask_values", "mask_threshold", "mask_colors")
            set_flags = [f for f in mask_flags if getattr(self, f) is not None]
            set_flags += ["mask_zero"] if self.mask_zero == "ignore" else []
            if set_flags:
                flags = ", ".join("--" + f.replace("_", "-") for f in set_flags)
                raise ValueError(
                    f"{flags} only apply to --layout pairs; the {self.layout} layout fixes its folders and classes"
                )
        if self.val_keys is not None and self.val_fraction is not None:
            raise ValueError("give --val-keys or --val-fraction, not both")
        if self.num_classes and self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"--class-names gives {len(self.class_names)} names for --num-classes {self.num_classes}")
        if self.mask_values:
            ids = [c for c in self.mask_values.values() if c != IGNORE_INDEX]
            k = self.num_classes or (len(self.class_names) if self.class_names else None)
            if k is not None and ids and max(ids) >= k:
                raise ValueError(f"--mask-values maps to class id {max(ids)}, but there are only {k} classes")
        return self

    def _consistent_mask_encoding(self) -> None:
        given = [f for f in ("mask_values", "mask_threshold", "mask_colors") if getattr(self, f) is not None]
        given += ["mask_zero"] if self.mask_zero == "ignore" else []
        if len(given) > 1:
            flags = " and ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"{flags} are different ways to read masks; give one of them")
        k = self.num_classes or (len(self.class_names) if self.class_names else None)
        if self.mask_zero == "ignore" and (k or 0) >= IGNORE_INDEX:
            raise ValueError("--mask-zero ignore makes at most 254 classes: value 255 stays ignore")
        if self.mask_threshold is not None and k not in (None, 2):
            raise ValueError(f"--mask-threshold makes two classes (0 and 1), not {k}")


class TrainSpec(Spec):
    data: str
    out: str
    epochs: int = Field(10, ge=1, le=100_000)
    workers: int = Field(2, ge=1, le=4096)
    image_size: int = Field(128, ge=16, le=4096)
    batch_size: int = Field(8, ge=1, le=4096, description="per-worker batch")
    learning_rate: float = Field(1e-3, gt=0, le=1.0, description="for a global batch of 8; scaled linearly")
    base_filters: int = Field(16, ge=1, le=1024)
    depth: int = Field(4, ge=1, le=8)
    batch_norm: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    upsampling: Literal["transpose", "resize"] = "transpose"
    head: Literal["softmax", "sigmoid"] = Field("softmax", description="sigmoid: binary (2-class) data sets only")
    architecture: Literal["unet", "resunet", "deeplabv3plus"] = Field(
        "unet", description="unet; resunet: residual encoder blocks; deeplabv3plus: ASPP head (needs --encoder)"
    )
    encoder: Literal[
        None, "resnet50", "efficientnetv2b0", "efficientnetv2s", "mobilenetv3small", "mobilenetv3large", "convnext_tiny"
    ] = Field(None, description="a keras.applications backbone under the U-Net decoder or the DeepLabV3+ head")
    encoder_weights: str = Field(
        "imagenet",
        description="imagenet (Keras downloads them: needs network access), none, or a backbone weights file",
    )
    loss: Literal["ce", "dice", "ce+dice"] = "ce"
    class_weights: Literal["none", "inverse_frequency", "inverse_sqrt_frequency"] = Field(
        "none", description="cross-entropy weights by class: (1 / pixel share), or its square root; mean 1, at most 10"
    )
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum")
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0, le=1000)
    patience: int | None = Field(
        None, ge=1, le=100_000, description="early stop after this many epochs without val mIoU gain"
    )
    mixed_precision: Literal["auto", "off", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, off on CPU"
    )
    max_failures: int = Field(3, ge=0, le=1000, description="worker-group restarts from the last checkpoint")
    max_steps: int | None = Field(None, ge=1, description="cap on steps per epoch (tests, benchmarks)")
    augment: bool = Field(True, description="master switch: off = plain resize, none of the options below")
    crop: Literal["resize", "random", "native"] = Field(
        "resize",
        description="resize: whole image to the size; random: shorter side to the size, random square crop; "
        "native: random square window at the original scale, and inference at full resolution",
    )
    repeat: int = Field(
        1, ge=1, le=10_000, description="passes over the training split per epoch (each with fresh random crops)"
    )
    flip: Literal["auto", "none", "horizontal", "vertical", "both"] = Field(
        "auto",
        description="random flips on these axes (horizontal: left-right); auto (and true): the plan's axes, "
        "both with plan: false; false: none",
    )
    rotate90: bool = Field(True, description="random 90-degree turns")
    scale_jitter: float = Field(0.0, ge=0.0, lt=1.0, description="zoom by a factor in [1-j, 1+j], then crop/pad")
    brightness: float = Field(0.0, ge=0.0, le=1.0, description="add a shift in [-b, b] of the full range")
    contrast: float = Field(0.0, ge=0.0, lt=1.0, description="scale around the mean by a factor in [1-c, 1+c]")
    rotate: float = Field(0.0, ge=0.0, le=180.0, description="turn windows by up to this many degrees (180: any)")
    elastic: float = Field(0.0, ge=0.0, le=64.0, description="elastic deformation, displacement std in pixels")
    gamma: float = Field(0.0, ge=0.0, le=4.0, description="gamma exponent log-uniform in [1/(1+g), 1+g]")
    noise: float = Field(0.0, ge=0.0, le=1.0, description="Gaussian noise, std up to this share of the range")
    oversample: float = Field(
        0.0, ge=0.0, le=1.0, description="share of training windows centred on a pixel of a rare class"
    )
    normalization: Literal["scale_0_1", "zscore", "zscore_clipped", "raw_0_255"] = Field(
        "scale_0_1",
        description="scale_0_1: pixels / 255; zscore: per-channel mean/std from the data set's fingerprint; "
        "zscore_clipped: clipped to its 0.5-99.5 percentiles first; raw_0_255: an encoder's (the plan's with one)",
    )
    seed: int = 0
    cpus_per_worker: float = Field(1.0, gt=0, le=256)
    gpus_per_worker: float = Field(0.0, ge=0, le=16)
    name: str = Field("train", pattern=r"^[A-Za-z0-9_.-]+$", description="Ray Train run name under OUT")
    resume: bool = True
    tta_check: bool = Field(
        True,
        description="at the end, measure val mIoU with and without flip TTA; the card then advises infer "
        "(false: no measurement, the card advises no TTA)",
    )
    plan: bool = Field(
        True,
        description="fields not given (flag or spec field) come from `raysegment plan`'s rules for the data set; "
        "false: the fixed defaults above",
    )
    time_budget: float | None = Field(
        None,
        gt=0,
        le=30 * 86400,
        description="training time in seconds, or '40m', '2h': the plan sets the epochs from it, and training "
        "stops after the last epoch that ends inside it (default: the plan's, from the data set size)",
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://host:5000, or file:///dir with MLFLOW_ALLOW_FILE_STORE=true): log params, "
        "per-epoch metrics, the plan, the model card and the model there (extra: raysegment[mlflow])",
    )

    @model_validator(mode="after")
    def _check_architecture(self) -> TrainSpec:
        if self.architecture == "deeplabv3plus" and not self.encoder:
            raise ValueError("--architecture deeplabv3plus needs an --encoder (e.g. resnet50 or mobilenetv3large)")
        if self.architecture == "resunet" and self.encoder:
            raise ValueError("--architecture resunet is its own residual encoder; drop --encoder or use unet")
        if self.encoder and "normalization" in self.model_fields_set and self.normalization != "raw_0_255":
            raise ValueError("an --encoder takes raw 0..255 pixels (it rescales inside); drop --normalization")
        if self.normalization == "raw_0_255" and not self.encoder:
            raise ValueError("normalization raw_0_255 is an --encoder's input; the U-Net takes scale_0_1 or a z-score")
        return self

    @property
    def model_depth(self) -> int:
        """Downsamplings: --depth, or 5 for an encoder (every backbone is 32x)."""
        return 5 if self.encoder else self.depth

    @field_validator("flip", mode="before")
    @classmethod
    def _flip_axes(cls, v: Any) -> Any:
        # `flip: true` (and --flip) from before the axes were explicit: flip where the plan says it is right.
        return {True: "auto", False: "none"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("time_budget", mode="before")
    @classmethod
    def _parse_time_budget(cls, v: Any) -> Any:
        if isinstance(v, str):
            from raysegment.plan import parse_duration

            return parse_duration(v)
        return v


class CompactSpec(Spec):
    output: str
    summary_rows: int = Field(100_000, ge=2, le=10_000_000, description="target rows per merged summary file")
    include_unfinished: bool = Field(False, description="also merge files of runs without a run record")
    storage_retry_s: StorageRetryS = None


class EvaluateSpec(Spec):
    model: str
    data: str
    split: str = "val"
    batch_size: int = Field(8, ge=1, le=4096)
    out: str | None = Field(None, description="metrics JSON URI; default MODEL/eval-{split}.json")
    tta_flip: bool | None = Field(
        None, description="flip test-time augmentation, as `infer --tta-flip`; default: the model card's advice"
    )


def _dotted(ext: str) -> str:
    ext = ext.strip().lower()
    return ext if ext.startswith(".") else f".{ext}"


class InferOptions(Spec):
    """How to run inference: every option of `infer`, defined and checked once.

    `InferSpec` adds what to infer (MODEL, INPUT, OUTPUT); `NightlySpec` adds the
    night's own fields and hands these options on to its `infer` run unchanged.
    """

    source: Literal["auto", "files", "tar", "parquet", "list"] = "auto"
    extensions: list[str] = Field(
        default_factory=lambda: list(IMAGE_EXTENSIONS), description="image file extensions to list, any case"
    )
    image_column: str = Field("image", description="image bytes column of a Parquet source")
    key_column: str | None = Field(None, description="key column of a Parquet source (default: file/row)")
    batch_size: int = Field(16, ge=1, le=4096)
    actors: tuple[int, int] | Literal["auto"] = Field(
        "auto", description="MIN[:MAX] predictor actors; auto: fit the cluster (inference/actors.py)"
    )
    gpus_per_actor: Annotated[float, Field(ge=0, le=16)] | Literal["auto"] = Field(
        "auto", description="auto: 1 where the cluster has GPUs, else 0"
    )
    cpus_per_actor: float = Field(1.0, gt=0, le=256, description="CPUs (and TF threads) per predictor actor")
    mask_format: Literal["png", "npz", "packed"] = "png"
    tta_flip: bool | None = Field(
        None,
        description="average over mirrored passes, the flips the model trained with (2-4x the model cost); "
        "default: the model card's advice (on where it raised val mIoU at the end of training)",
    )
    report: bool = Field(True, description="write OUTPUT/report.html and overlays.png")
    overwrite: bool = False
    max_error_fraction: float = Field(1.0, ge=0.0, le=1.0)
    max_pixels: int = Field(100_000_000, ge=1, le=2_000_000_000)
    max_input_mb: int = Field(
        limits.MAX_INPUT_MB, ge=1, le=1 << 20, description="inputs of more encoded bytes are error rows, not read"
    )
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model compute dtype; auto: bfloat16 on GPU actors, float32 on CPU"
    )
    tile_size: int = Field(
        1024, ge=16, le=65536, description="native-scale models: images larger than this are predicted in tiles"
    )
    tile_overlap: int | None = Field(
        None, ge=0, le=4096, description="pixels shared by neighbouring tiles (default: half a tile)"
    )
    storage_retry_s: StorageRetryS = None
    decode: Literal["tasks", "actor"] = Field(
        "tasks", description="where images are decoded: in CPU tasks beside the actors, or inside the predictor actor"
    )
    summary_rows: int = Field(
        100_000, ge=1, le=10_000_000, description="rows per summary file (each file commits its rows)"
    )

    @field_validator("extensions", mode="before")
    @classmethod
    def _split_extensions(cls, v: Any) -> Any:
        return comma_list(v)  # an empty text is no extension: refused below, never the defaults

    @field_validator("extensions", mode="after")
    @classmethod
    def _check_extensions(cls, v: list[str]) -> list[str]:
        exts = [_dotted(e) for e in v if e.strip()]
        if not exts:
            raise ValueError("give at least one extension, e.g. .png,.jpg")
        return exts

    @field_validator("actors", mode="before")
    @classmethod
    def _parse_actors(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        return min_max(v, "write auto, MIN or MIN:MAX, e.g. 2 or 1:4")

    @field_validator("actors", mode="after")
    @classmethod
    def _check_actors(cls, v: tuple[int, int] | str) -> tuple[int, int] | str:
        if v != "auto" and not 1 <= v[0] <= v[1] <= 4096:
            raise ValueError("need 1 <= MIN <= MAX <= 4096")
        return v

    def infer_options(self) -> dict[str, Any]:
        """These options as field values, to build another spec from (nightly's infer run)."""
        return self.model_dump(include=set(InferOptions.model_fields))


class InferSpec(InferOptions):
    model: str
    input: str
    output: str
    fail_if_none_ok: bool = Field(
        True, description="fail when OUTPUT holds rows but not one segmented image (nightly reports such a night)"
    )
    retry_errors: bool = Field(
        False, description="resume, and redo the keys whose rows are errors (their error rows are dropped first)"
    )

    @model_validator(mode="after")
    def _retry_or_overwrite(self) -> InferSpec:
        if self.retry_errors and self.overwrite:
            raise ValueError("--retry-errors redoes the error rows, --overwrite every row: give one of them")
        return self


def _date_problem(v: str) -> str:
    """Why `v` is not a night's date: no such day (2026-02-30, 2026-13-01), else not written YYYY-MM-DD."""
    parts = v.split("-")
    if len(parts) != 3 or [len(p) for p in parts] != [4, 2, 2] or not all(p.isascii() and p.isdigit() for p in parts):
        return "write the date as YYYY-MM-DD, e.g. 2026-01-31"
    year, month = int(parts[0]), int(parts[1])
    if year < 1:
        return "no such day: years start at 0001"
    if not 1 <= month <= 12:
        return f"no such day: there is no month {parts[1]}"
    days = calendar.monthrange(year, month)[1]
    return f"no such day: {calendar.month_name[month]} {year} has days 01 to {days}"


class NightlySpec(InferOptions):
    """`nightly`: infer only on images under INPUT that are new or changed since the last night.

    Takes every `infer` option; the night's infer run reads a list of the new and
    changed files, so only sources of image files fit and resuming is by the ledger.
    """

    model: str
    input: str
    output: str
    date: str | None = Field(None, description="the night's date partition, YYYY-MM-DD (default: today, UTC)")
    drift_threshold: float = Field(
        0.05, gt=0.0, le=1.0, description="flag a class whose mean pixel fraction moved more than this"
    )
    lock_stale_after_s: int = Field(
        6 * 3600, ge=60, le=7 * 86400, description="a lock older than this is taken over (its run is presumed dead)"
    )
    allow_empty_input: bool = Field(
        False,
        description="a night whose INPUT lists no images while the ledger holds earlier ones succeeds "
        "(default: it fails, as an unmounted share or a wrong prefix would look like that)",
    )

    @field_validator("date", mode="before")
    @classmethod
    def _date_string(cls, v: Any) -> Any:
        # YAML reads an unquoted 2026-01-02 as a date.
        if isinstance(v, datetime.date):
            return v.isoformat()
        return v

    @field_validator("date", mode="after")
    @classmethod
    def _check_date(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                day = datetime.date.fromisoformat(v)
                if day.isoformat() != v:
                    raise ValueError
            except ValueError:
                raise ValueError(_date_problem(v)) from None
            # A night not yet begun would get a partition and ledger rows from the future, and the
            # drift check would compare real nights against it; one day of slack for zones ahead of UTC.
            tomorrow = datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)
            if day > tomorrow:
                raise ValueError(
                    f"{v} is after tomorrow ({tomorrow}, UTC); a night's date is at most tomorrow's in UTC (a day "
                    "of slack for time zones ahead of UTC); the default is today's"
                )
        return v

    @model_validator(mode="after")
    def _fits_a_night(self) -> NightlySpec:
        if self.source not in ("auto", "files"):
            raise ValueError(
                f"--source {self.source} does not apply to nightly: it lists the image files under INPUT "
                "(use infer for tar, parquet or list sources)"
            )
        if self.overwrite:
            raise ValueError(
                "--overwrite does not apply to nightly: the ledger decides what is redone "
                "(a new model hash redoes everything)"
            )
        return self


class ServeSpec(Spec):
    """`serve`: MODEL behind an HTTP endpoint on Ray Serve (raysegment/serve.py), until stopped."""

    model: str
    replicas: tuple[int, int] = Field((1, 1), description="MIN[:MAX] replicas; MIN < MAX autoscales on load")
    gpus_per_replica: float = Field(0.0, ge=0, le=16)
    cpus_per_replica: float = Field(1.0, gt=0, le=256, description="CPUs (and TF threads) per replica")
    host: str = Field("127.0.0.1", description="address the HTTP proxy binds; 0.0.0.0 exposes it to the network")
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(8, ge=1, le=1024, description="requests a replica predicts together")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10, description="how long a batch waits to fill")
    max_body_mb: float = Field(32.0, gt=0, le=4096, description="larger request bodies get 413")
    body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="a request body not received within this long gets 408"
    )
    max_pixels: int = Field(100_000_000, ge=1, le=2_000_000_000, description="larger images get 413")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tta_flip: bool | None = Field(None, description="flip TTA, as `infer --tta-flip`; default: the model card's advice")
    tile_size: int = Field(1024, ge=16, le=65536)
    tile_overlap: int | None = Field(None, ge=0, le=4096)
    ready_timeout_s: float = Field(600.0, gt=0, le=86400, description="wait this long for the model to load")
    drain_timeout_s: float = Field(
        20.0, ge=0, le=3600, description="on Ctrl-C/SIGTERM, how long requests in flight get to finish"
    )
    storage_retry_s: StorageRetryS = None

    @field_validator("replicas", mode="before")
    @classmethod
    def _parse_replicas(cls, v: Any) -> Any:
        return min_max(v, "write MIN or MIN:MAX, e.g. 1 or 1:4")

    @field_validator("replicas", mode="after")
    @classmethod
    def _check_replicas(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1] <= 1024:
            raise ValueError("need 1 <= MIN <= MAX <= 1024")
        return v


class ImportSpec(Spec):
    """`model import`: a Keras model (.keras) or a TensorFlow SavedModel folder made a model directory
    (raysegment/models/importer.py). `classes`, `input_size` and `palette` take the flags' text forms too."""

    model_file: str = Field(description=".keras file or SavedModel folder, local or s3://")
    dest: str = Field(description="the model directory to write, local or s3://")
    classes: list[str] = Field(description="class names in output-channel order: 'a,b,c' or a list")
    input_size: tuple[int, int] | Literal["native"] = Field(description="H,W the model takes, or native")
    normalize: Literal["scale_0_1", "scale_-1_1", "raw_0_255", "imagenet"] = "scale_0_1"
    output: Literal["auto", "logits", "probabilities"] = Field(
        "auto", description="auto: probabilities when the last layer is softmax/sigmoid (a SavedModel needs it given)"
    )
    palette: list[tuple[int, int, int]] | None = Field(None, description="'R,G,B;R,G,B;...', one colour per class")
    size_multiple: int = Field(32, ge=1, le=1024, description="native: pad H and W to a multiple (a power of two)")
    overwrite: bool = False
    storage_retry_s: StorageRetryS = None

    @field_validator("classes", mode="before")
    @classmethod
    def _parse_classes(cls, v: Any) -> Any:
        return comma_list(v)

    @field_validator("classes", mode="after")
    @classmethod
    def _check_classes(cls, v: list[str]) -> list[str]:
        distinct_class_names(v)
        return v

    @field_validator("input_size", mode="before")
    @classmethod
    def _parse_input_size(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() != "native":
            h, _, w = v.partition(",")
            if not (h.strip().isdigit() and w.strip().isdigit()):
                raise ValueError("give H,W (e.g. 512,512) or native")
            return (int(h), int(w))
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("input_size", mode="after")
    @classmethod
    def _check_input_size(cls, v: Any) -> Any:
        if v != "native" and not all(1 <= s <= 65536 for s in v):
            raise ValueError("height and width from 1 to 65536")
        return v

    @field_validator("palette", mode="before")
    @classmethod
    def _parse_palette(cls, v: Any) -> Any:
        if isinstance(v, str):
            parts = [p.split(",") for p in v.split(";")]
            if not all(len(p) == 3 and all(s.strip().isdigit() for s in p) for p in parts):
                raise ValueError("give R,G,B;R,G,B;... with one colour per class")
            return [tuple(int(s) for s in p) for p in parts]
        return v

    @field_validator("size_multiple", mode="after")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("a power of two from 1 to 1024")
        return v

    @model_validator(mode="after")
    def _palette_fits(self) -> ImportSpec:
        if self.palette is not None:
            if len(self.palette) != len(self.classes):
                raise ValueError(f"--palette: {len(self.palette)} colours for {len(self.classes)} classes")
            if not all(0 <= c <= 255 for colour in self.palette for c in colour):
                raise ValueError("--palette: colour values from 0 to 255")
        return self


class ExportSpec(Spec):
    """`export`: MODEL as one graph with infer's pre- and post-processing (raysegment/export.py)."""

    model: str
    dest: str = Field(description="folder for the export and its model.json, local or s3://")
    format: Literal["saved_model", "onnx", "tflite"]
    probabilities: bool = Field(False, description="also output per-class probabilities (HxWxK)")
    tta_flip: bool | None = Field(None, description="flip TTA in the graph, as infer (default: the card's advice)")
    overwrite: bool = False
    storage_retry_s: StorageRetryS = None


S = TypeVar("S", bound=Spec)


# Problems (and unknown field names) named in one error: a bad file gets a short message.
MAX_ITEMS = 8


def _format_errors(source: str, cls: type[Spec], exc: ValidationError) -> str:
    parts, unknown = [], []
    for err in exc.errors():
        field = clip(".".join(str(p) for p in err["loc"]))
        if not field:  # a check across fields: its message names the flags
            parts.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "extra_forbidden":
            unknown.append(f"'{field}'")
        elif err["type"] == "missing":
            parts.append(f"field '{field}' is required")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "literal_error":
                msg = f"must be one of {err['ctx']['expected']}"
            parts.append(f"field '{field}': {msg} (got {echo(err.get('input'))})")
    if unknown:
        names = ", ".join(unknown[:MAX_ITEMS]) + (", …" if len(unknown) > MAX_ITEMS else "")
        allowed = ", ".join(sorted(cls.model_fields))
        parts.append(f"unknown field{'s' if len(unknown) > 1 else ''} {names} (allowed: {allowed})")
    more = f"; and {len(parts) - MAX_ITEMS} more" if len(parts) > MAX_ITEMS else ""
    return f"{source}: " + "; ".join(parts[:MAX_ITEMS]) + more


def load_spec(cls: type[S], path: str | None = None, overrides: dict[str, Any] | None = None) -> S:
    """Build a spec from an optional YAML file plus flags; flags that are not None win."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(flags)
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        source = path if path else "command line"
        if path and any(e["loc"] and e["loc"][0] in flags for e in exc.errors()):
            source = f"{path} + command line"
        raise ConfigError(_format_errors(source, cls, exc)) from exc
