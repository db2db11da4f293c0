"""A prepared data set's manifest.json, typed: `Manifest`, and the one reader and writer of the file.

`prepare` writes it last (it is the commit); `data-info`, `plan`, `train`, `evaluate` and the benches read it
through `read_manifest`, which refuses a damaged or hand-edited one with one error naming the file. On disk it
is the same JSON as before it was typed (`Manifest.to_json`: the same keys, in the same order, with the same
values); a manifest written by an earlier version lacks some of the later keys and reads with the defaults
below (None where a reader shows '?' or skips a check). Keys this version does not know are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from raysegment import storage
from raysegment.config import distinct_class_names
from raysegment.data.fingerprint import Fingerprint, format_fingerprint
from raysegment.data.layouts import SPLITS
from raysegment.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
RE_PREPARE = "run `raysegment prepare` again into a new DEST"


@dataclass(frozen=True)
class Counts:
    """Images per split."""

    train: int
    val: int

    def of(self, split: str) -> int:
        """The count of one of SPLITS."""
        if split not in SPLITS:
            raise KeyError(split)
        return getattr(self, split)

    @property
    def total(self) -> int:
        return sum(self.to_json().values())

    def to_json(self) -> dict[str, int]:
        return {split: getattr(self, split) for split in SPLITS}


assert tuple(f.name for f in fields(Counts)) == SPLITS, "Counts has one field per split"


@dataclass(frozen=True)
class Shard:
    """One Parquet shard, as prepare wrote it (readers check its size and rows before trusting it)."""

    path: str  # relative to the data set: shards/{generation}/{split}-NNNNN.parquet (earlier: shards/{split}-...)
    split: str
    rows: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "split": self.split, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class Skipped:
    """An input prepare left out under --skip-invalid, and why."""

    key: str
    problem: str

    def to_json(self) -> dict[str, str]:
        return {"key": self.key, "problem": self.problem}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Every key of manifest.json, in the file's order (`to_json` writes them in field order)."""

    format_version: int = FORMAT_VERSION
    layout: str
    source: str | None = None  # the source URI, credentials redacted
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # per class id (at least num_classes)
    ignore_index: int
    mask_values: dict[str, int] | None = None  # --mask-values: mask value (a string: a JSON key) -> class id
    mask_threshold: int | None = None
    mask_alpha: str | None = None
    mask_zero: str | None = None
    mask_colors: dict[str, int] | None = None  # --mask-colors: "R,G,B" -> class id
    splits_from: str | None = None  # where the splits came from, in words
    no_val_fix: str | None = None  # the layout's advice for an empty val split (None: the flags' advice)
    no_train_fix: str | None = None  # ... and for an empty train split
    counts: Counts
    pixel_frequency: tuple[float, ...] | None = None  # per class, share of the labelled pixels
    ignored_pixels: int | None = None  # pixels of ignore_index (None: not counted)
    shards: tuple[Shard, ...]
    content_hash: str  # sha256 over the shards' sha256s
    skipped: tuple[Skipped, ...] = ()
    created_by: str | None = None  # "raysegment VERSION"
    bands: tuple[int, ...] | None = None  # --bands (1-based); None: each image's own
    channels: int | None = None  # the model's input channels (None, before multi-band images: 3)
    class_pixels: dict[str, tuple[int, ...]] | None = None  # split -> pixels per class (None: not kept)
    exif_turned: int = 0  # images an EXIF tag turned upright in place
    transparent_ignored_pixels: int = 0  # ignore pixels that were transparent (alpha 0) in the masks
    # The stored fingerprint as JSON: one of an earlier version (`Fingerprint.is_current` false) is recomputed
    # by its readers, so it is kept as written rather than read into a `Fingerprint` that would hide that.
    fingerprint: dict[str, Any] | None = None
    seconds: float | None = None  # prepare's wall time

    def split_shards(self, split: str) -> list[Shard]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> dict[str, Any]:
        """The manifest.json object: the same keys and values as prepare has always written."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Any, uri: str = MANIFEST) -> Manifest:
        """The manifest in `data` (manifest.json's object), or one DataError naming `uri` and what is wrong."""
        if not isinstance(data, dict):
            raise DataError(f"{uri}: not a manifest (a JSON object); {RE_PREPARE}")
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{uri}: unsupported format_version {data.get('format_version')}")
        if problem := _problem(data):
            raise DataError(f"{uri}: {problem}: it was changed after prepare; {RE_PREPARE}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        class_pixels = data.get("class_pixels")
        values.update(
            class_names=tuple(data["class_names"]),
            palette=tuple((r, g, b) for r, g, b in data["palette"]),
            counts=Counts(**{s: data["counts"][s] for s in SPLITS}),
            shards=tuple(Shard(**{f.name: s.get(f.name, "") for f in fields(Shard)}) for s in data["shards"]),
            skipped=tuple(Skipped(s.get("key", "?"), s.get("problem", "?")) for s in data.get("skipped") or []),
            pixel_frequency=_tuple(data.get("pixel_frequency")),
            bands=_tuple(data.get("bands")),
            class_pixels=None if class_pixels is None else {k: tuple(v) for k, v in class_pixels.items()},
            exif_turned=data.get("exif_turned") or 0,
            transparent_ignored_pixels=data.get("transparent_ignored_pixels") or 0,
        )
        return cls(**values)


def _plain(value: Any) -> Any:
    """A field's JSON: tuples as lists, the nested parts as their objects."""
    if isinstance(value, Counts | Shard | Skipped):
        return value.to_json()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _tuple(value: list[Any] | None) -> tuple[Any, ...] | None:
    return None if value is None else tuple(value)


def read_manifest(data_uri: str, endpoint_url: str | None = None) -> tuple[storage.Location, Manifest]:
    """The data set's location and manifest, or a clear error if it is not a prepared data set."""
    loc = storage.resolve(data_uri, endpoint_url)
    mloc = loc.child(MANIFEST)
    if not storage.exists(mloc):
        raise DataError(f"{loc.uri}: no {MANIFEST}; run `raysegment prepare` first (or the write did not finish)")
    return loc, Manifest.from_json(storage.read_json(mloc), mloc.uri)


def write_manifest(dest: storage.Location, manifest: Manifest) -> None:
    """Write DEST/manifest.json: the commit of a prepared data set (its shards are all written before)."""
    storage.write_json(dest.child(MANIFEST), manifest.to_json())


def _problem(data: dict[str, Any]) -> str | None:
    """What makes a manifest unusable (a field a reader relies on, missing or of the wrong kind), or None.

    Readers take these fields as they are; a hand-edited or damaged manifest was a KeyError or TypeError
    traceback in data-info, plan, train or evaluate, or a model of 0 classes."""
    k = data.get("num_classes")
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 255:
        return f"num_classes {k!r} is not a whole number of classes 2..255"
    names = data.get("class_names")
    if not isinstance(names, list) or len(names) != k or not all(isinstance(n, str) for n in names):
        return f"class_names {names!r} are not {k} names"
    try:
        distinct_class_names(names)
    except ValueError as exc:
        return str(exc)
    palette = data.get("palette")
    if not isinstance(palette, list) or len(palette) < k or not all(_colour(c) for c in palette):
        return f"palette is not {k} R,G,B colours"
    for key, what in (("layout", "a layout name"), ("content_hash", "a hash of the shards")):
        if not isinstance(data.get(key), str):
            return f"{key} {data.get(key)!r:.80} is not {what}"
    if not _count(data.get("ignore_index")) or data["ignore_index"] > 255:
        return f"ignore_index {data.get('ignore_index')!r:.80} is not a mask value 0..255"
    counts = data.get("counts")
    if not isinstance(counts, dict) or not all(_count(counts.get(s)) for s in SPLITS):
        return f"counts {counts!r} are not image counts per split ({', '.join(SPLITS)})"
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        return "it lists no shards"
    for shard in shards:
        if not isinstance(shard, dict) or not (
            isinstance(shard.get("path"), str)
            and shard["path"].startswith("shards/")
            and ".." not in shard["path"].split("/")
            and shard.get("split") in SPLITS
            and _count(shard.get("rows"))
            and _count(shard.get("bytes"))
            and isinstance(shard.get("sha256", ""), str)
        ):
            return f"shard entry {shard!r:.120} is not a path under shards/, a split, rows and bytes"
    for split in SPLITS:
        listed = sum(s["rows"] for s in shards if s["split"] == split)
        if listed != counts[split]:
            return f"its {split} shards hold {listed} rows, but counts says {counts[split]}"
    if problem := _optional_problem(data, k):
        return problem
    fingerprint = data.get("fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, dict):
        return "its fingerprint is not a JSON object"
    # One of this version's (an earlier one is computed afresh by its readers): formatting it reads every
    # field `data-info` and `plan` read, with the types they take.
    if fingerprint and Fingerprint.is_current(fingerprint):
        try:
            format_fingerprint(Fingerprint.from_json(fingerprint), names)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            return f"its fingerprint is damaged ({type(exc).__name__}: {str(exc)[:80]})"
    return None


def _optional_problem(data: dict[str, Any], k: int) -> str | None:
    """The keys an earlier manifest may lack: absent (or null) reads as unknown; present, of their kind."""

    def text(v: Any) -> bool:
        return isinstance(v, str)

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def ids(v: Any) -> bool:
        return isinstance(v, dict) and all(isinstance(i, int) and not isinstance(i, bool) for i in v.values())

    checks: dict[str, tuple[Any, str]] = {
        "source": (text, "a URI"),
        "mask_values": (ids, "values mapped to class ids"),
        "mask_threshold": (_count, "a mask value"),
        "mask_alpha": (text, "a --mask-alpha choice"),
        "mask_zero": (text, "a --mask-zero choice"),
        "mask_colors": (ids, "colours mapped to class ids"),
        "splits_from": (text, "where the splits came from"),
        "no_val_fix": (text, "a fix"),
        "no_train_fix": (text, "a fix"),
        "pixel_frequency": (lambda v: isinstance(v, list) and len(v) == k and all(map(number, v)), f"{k} shares"),
        "ignored_pixels": (_count, "a pixel count"),
        "skipped": (lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v), "a list of inputs"),
        "created_by": (text, "a version"),
        "bands": (lambda v: isinstance(v, list) and all(map(_count, v)), "band numbers"),
        "channels": (lambda v: _count(v) and v > 0, "a channel count"),
        "class_pixels": (
            lambda v: isinstance(v, dict) and all(isinstance(p, list) and all(map(_count, p)) for p in v.values()),
            "pixel counts per split",
        ),
        "exif_turned": (_count, "an image count"),
        "transparent_ignored_pixels": (_count, "a pixel count"),
        "seconds": (number, "a duration"),
    }
    for key, (ok, what) in checks.items():
        value = data.get(key)
        if value is not None and not ok(value):
            return f"{key} {value!r:.80} is not {what}"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _colour(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_count(v) and v <= 255 for v in value)
