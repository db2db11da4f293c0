"""Job specs: validated models loaded from YAML, with CLI flags layered on top.

Field names are the CLI's argument names (``--batch-size`` -> ``batch_size``), so a
spec file and a command line say the same thing. Unknown fields are errors:
a misspelt option must never silently fall back to a default.
"""

from __future__ import annotations

import os
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raysegment.errors import ConfigError
from raysegment.storage import redact


class Spec(BaseModel):
    """Base of all job specs: unknown fields and wrong types are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    endpoint_url: str | None = Field(None, description="S3 endpoint; default from AWS_ENDPOINT_URL")

    @field_validator("*", mode="after")
    @classmethod
    def _no_credentials_in_uris(cls, v: Any) -> Any:
        if isinstance(v, str) and "://" in v and redact(v) != v:
            raise ValueError("credentials in a URI are not allowed; use AWS_* env vars or a profile")
        return v


class PrepareSpec(Spec):
    source: str
    dest: str
    layout: Literal["pairs"] = "pairs"
    images_dir: str = "images"
    masks_dir: str = "masks"
    num_classes: int | None = Field(None, ge=2, le=255)
    class_names: list[str] | None = None
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    shard_size_mb: float = Field(256.0, gt=0, le=8192)
    overwrite: bool = False


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
    augment: bool = True
    seed: int = 0
    cpus_per_worker: float = Field(1.0, gt=0, le=256)
    gpus_per_worker: float = Field(0.0, ge=0, le=16)
    name: str = Field("train", pattern=r"^[A-Za-z0-9_.-]+$", description="Ray Train run name under OUT")
    resume: bool = True


class EvaluateSpec(Spec):
    model: str
    data: str
    split: str = "val"
    batch_size: int = Field(8, ge=1, le=4096)
    out: str | None = Field(None, description="metrics JSON URI; default MODEL/eval-{split}.json")


class InferSpec(Spec):
    model: str
    input: str
    output: str
    batch_size: int = Field(16, ge=1, le=4096)
    actors: int = Field(1, ge=1, le=4096)
    gpus_per_actor: float = Field(0.0, ge=0, le=16)
    extensions: list[str] = Field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"])
    max_pixels: int = Field(100_000_000, ge=1)


S = TypeVar("S", bound=Spec)


def _format_errors(source: str, cls: type[Spec], exc: ValidationError) -> str:
    allowed = ", ".join(sorted(cls.model_fields))
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(spec)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{field}' (allowed: {allowed})")
        elif err["type"] == "missing":
            parts.append(f"field '{field}' is required")
        else:
            got = err.get("input")
            if isinstance(got, str):
                got = redact(got)
            msg = err["msg"]
            if err["type"] == "literal_error":
                msg = f"must be one of {err['ctx']['expected']}"
            parts.append(f"field '{field}': {msg} (got {got!r})")
    return f"{source}: " + "; ".join(parts)


def read_yaml(path: str) -> dict[str, Any]:
    """A spec file's mapping, or a ConfigError naming the file."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job spec must be a mapping of field: value")
    return data


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
