"""The data set's fingerprint: what a training plan needs to know about the images and masks.

nnU-Net derives patch size, depth, normalisation and loss from such a fingerprint; this
is the raysegment version (issue #15, item 1). Every shard task of `prepare` fills one
`ShardFingerprint` from the pairs it writes (sizes and modes of all of them; pixel values
and object sizes from a bounded, key-seeded sample), returns it as plain lists, and the
driver merges them into `Fingerprint`, stored in the manifest under "fingerprint".
`fingerprint_shards` computes the same from the shards of a data set prepared earlier
(`raysegment data-info`).

Pixel values are sampled as the model sees them: the data set's bands (`--bands`, or every band
of a multi-band TIFF), at the files' own precision (16-bit and float values are not rescaled), so
a normalisation derived from these statistics applies to what `imaging.decode_pixels` gives.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from raysegment.data import imaging

if TYPE_CHECKING:
    from raysegment.data.manifest import Manifest

# Per shard task: pixel values from this many images (this many pixels each), object sizes
# from this many images. Enough for stable percentiles; the driver merges a few MB at most.
SAMPLED_IMAGES = 32
PIXELS_PER_IMAGE = 512
MAX_OBJECTS_PER_CLASS = 2000
PERCENTILES = (0.5, 50.0, 99.5)


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def object_areas(mask: np.ndarray, class_id: int) -> np.ndarray:
    """Pixel areas of the 4-connected components of one class in a class-id mask."""
    from scipy import ndimage

    labels, n = ndimage.label(mask == class_id)
    if not n:
        return np.zeros(0, np.int64)
    return np.bincount(labels.ravel())[1:]


@dataclass
class ShardFingerprint:
    """What one shard task saw; merged on the driver. Plain lists so it pickles small."""

    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)
    bands: dict[int, int] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)  # decoded pixel type -> images ("uint8", "uint16", ...)
    # Channels each image gives the model (3 for grey and RGB) -> images, and one key with that count.
    channels: dict[int, int] = field(default_factory=dict)
    channel_example: dict[int, str] = field(default_factory=dict)
    pixels: list[list[float]] = field(default_factory=list)  # sampled pixel values as the model sees them
    images_with_class: list[int] = field(default_factory=lambda: [0] * 256)
    # Per class: labelled pixels in the top and left halves, and in all: is the data oriented?
    top: list[int] = field(default_factory=lambda: [0] * 256)
    left: list[int] = field(default_factory=lambda: [0] * 256)
    total: list[int] = field(default_factory=lambda: [0] * 256)
    # Per class: images holding more of it in the top than the bottom half (and the reverse; left, right):
    # each image's vote, so a few images cannot make pooled pixels look oriented by chance.
    top_votes: list[int] = field(default_factory=lambda: [0] * 256)
    bottom_votes: list[int] = field(default_factory=lambda: [0] * 256)
    left_votes: list[int] = field(default_factory=lambda: [0] * 256)
    right_votes: list[int] = field(default_factory=lambda: [0] * 256)
    areas: dict[int, list[int]] = field(default_factory=dict)
    sampled: int = 0
    unit_range: int = 0  # float images whose finite values lie in 0..1, not all 0 (`Fingerprint.mixed_range`)

    def add(self, key: str, image: imaging.Decoded | bytes, mask: np.ndarray) -> None:
        """One pair: its decoded image (the shard task decodes each once), or its bytes (decoded here)."""
        if isinstance(image, bytes):
            image = imaging.decode_pixels(image, channels=imaging.OWN)
        h, w = mask.shape
        self.heights.append(h)
        self.widths.append(w)
        self.modes[image.mode] = self.modes.get(image.mode, 0) + 1
        self.bands[image.bands] = self.bands.get(image.bands, 0) + 1
        dtype, channels = image.pixels.dtype.name, image.pixels.shape[2]
        self.dtypes[dtype] = self.dtypes.get(dtype, 0) + 1
        if image.pixels.dtype.kind == "f":  # integers in 0..1 are blank or binary tiles, not a normalised image
            finite = image.pixels[np.isfinite(image.pixels)]
            self.unit_range += int(finite.size > 0 and finite.min() >= 0 and 0 < finite.max() <= 1)
        self.channels[channels] = self.channels.get(channels, 0) + 1
        self.channel_example.setdefault(channels, key)
        present = np.unique(mask)
        for c in present.tolist():
            self.images_with_class[c] += 1
        total = np.bincount(mask.ravel(), minlength=256)
        # The halves leave an odd side's middle row (column) out, so neither half is favoured by its size.
        top, bottom = (np.bincount(part.ravel(), minlength=256) for part in (mask[: h // 2], mask[h - h // 2 :]))
        left, right = (np.bincount(part.ravel(), minlength=256) for part in (mask[:, : w // 2], mask[:, w - w // 2 :]))
        for counts, add in (
            (self.total, total),
            (self.top, top),
            (self.left, left),
            (self.top_votes, top > bottom),
            (self.bottom_votes, bottom > top),
            (self.left_votes, left > right),
            (self.right_votes, right > left),
        ):
            for c in np.flatnonzero(add).tolist():
                counts[c] += int(add[c])
        if self.sampled >= SAMPLED_IMAGES:
            return
        self.sampled += 1
        rng = np.random.default_rng(_seed(key))
        pixels = image.pixels.reshape(-1, channels)
        take = rng.choice(len(pixels), size=min(PIXELS_PER_IMAGE, len(pixels)), replace=False)
        self.pixels.extend(pixels[take].tolist())
        for c in present.tolist():
            if c == imaging.IGNORE_INDEX:
                continue
            kept = self.areas.setdefault(c, [])
            if len(kept) < MAX_OBJECTS_PER_CLASS:
                kept.extend(object_areas(mask, c)[: MAX_OBJECTS_PER_CLASS - len(kept)].tolist())


@dataclass(frozen=True)
class Fingerprint:
    """The merged fingerprint, as stored in manifest.json under "fingerprint"."""

    images: int
    height: dict[str, float]  # min, median, max
    width: dict[str, float]
    modes: dict[str, int]  # PIL mode -> images ("L", "RGB", "I;16", ...; "uint16x6" for what tifffile read)
    channels: dict[str, int]  # bands in the file -> images
    # mean, std, p0.5, p50, p99.5 per channel the model sees, in the decoded pixels' units (0..255 for 8-bit)
    intensity: dict[str, list[float]]
    class_pixel_share: list[float]  # per class, over labelled pixels
    class_image_share: list[float]  # per class, share of images that contain it
    object_area_median: list[float | None]  # per class, median 4-connected component area (sampled)
    class_top_share: list[float | None]  # per class, share of its pixels in the images' top halves
    class_left_share: list[float | None]  # ... and in their left halves
    sampled_images: int
    dtypes: dict[str, int] = field(default_factory=dict)  # decoded pixel type -> images (absent before #19)
    unit_range: int = 0  # deeper images with values in 0..1 only (0 in fingerprints from before it was counted)
    # Per class: [images with more of it in the top half, ... in the bottom half] (and left, right). None in a
    # fingerprint stored before they were counted: `plan.oriented_side` then asks as many images as a
    # significant unanimous vote (not computed afresh: that read every shard on each plan and train).
    class_top_votes: list[list[int]] | None = None
    class_left_votes: list[list[int]] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def high_depth(self) -> bool:
        """True when images are 16-bit or float (or deeper): values beyond 0..255, normalised from these statistics."""
        if self.dtypes:
            return any(d not in ("uint8", "bool") for d in self.dtypes)
        return any(m.startswith("I") or m == "F" for m in self.modes)

    @property
    def mixed_depth(self) -> str | None:
        """A warning when 8-bit images sit among 16-bit or float ones: a model normalised for the deeper
        values (z-scores at their own units) gets the 8-bit ones as nearly constant inputs."""
        eight = sum(n for d, n in self.dtypes.items() if d in ("uint8", "bool"))
        if not eight or not self.high_depth:
            return None
        return (
            f"{eight} of {sum(self.dtypes.values())} images are 8-bit, the rest 16-bit or float: a model "
            "normalised for the deeper values sees the 8-bit ones as nearly constant; convert the images to "
            "one bit depth and prepare again"
        )

    @property
    def mixed_range(self) -> str | None:
        """A warning when some 16-bit or float images hold values in 0..1 only (floats normalised by their
        writer) and the others larger counts: a model normalised for the counts sees the 0..1 ones as one
        constant, and their masks come out as noise, marked ok."""
        deep = sum(n for d, n in self.dtypes.items() if d not in ("uint8", "bool"))
        if not self.unit_range or self.unit_range >= deep:
            return None
        return (
            f"{self.unit_range} of {deep} 16-bit or float images hold values in 0..1 only, the others larger "
            "counts: a model normalised for one range sees the other as nearly constant; scale the images to "
            "one range and prepare again"
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fingerprint:
        """The stored fingerprint; one from an earlier version gets no side shares (None: no orientation
        known) and keys this version does not know are left out."""
        known = {f.name for f in fields(cls)}
        shares = [None] * len(data.get("class_pixel_share", []))
        return cls(
            **{"class_top_share": shares, "class_left_share": shares} | {k: v for k, v in data.items() if k in known}
        )

    @classmethod
    def is_current(cls, data: dict[str, Any] | None) -> bool:
        """True when a stored fingerprint has every field this version computes: an earlier one (without the
        side shares, or without `dtypes`, whose intensities were then sampled as 8-bit) is computed afresh
        by `plan` and `train`."""
        return bool(data) and {f.name for f in fields(cls)} - OPTIONAL_FIELDS <= set(data)


# Fields a fingerprint may lack without being computed afresh: their defaults are a safe reading.
OPTIONAL_FIELDS = {"unit_range", "class_top_votes", "class_left_votes"}


def _spread(values: list[int]) -> dict[str, float]:
    arr = np.asarray(values)
    return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max())}


def merge(parts: list[ShardFingerprint], num_classes: int, class_pixel_share: list[float]) -> Fingerprint:
    """One Fingerprint from every shard task's part."""
    heights = [h for p in parts for h in p.heights]
    widths = [w for p in parts for w in p.widths]
    modes: dict[str, int] = {}
    bands: dict[str, int] = {}
    dtypes: Counter[str] = Counter()
    unit_range = 0
    with_class = np.zeros(256, np.int64)
    top, left, total = (np.zeros(256, np.int64) for _ in range(3))
    votes = {side: np.zeros(256, np.int64) for side in ("top", "bottom", "left", "right")}
    areas: dict[int, list[int]] = {}
    for p in parts:
        for m, n in p.modes.items():
            modes[m] = modes.get(m, 0) + n
        for b, n in p.bands.items():
            bands[str(b)] = bands.get(str(b), 0) + n
        dtypes.update(p.dtypes)
        unit_range += p.unit_range
        with_class += np.asarray(p.images_with_class, np.int64)
        top += np.asarray(p.top, np.int64)
        left += np.asarray(p.left, np.int64)
        total += np.asarray(p.total, np.int64)
        for side, counted in votes.items():
            counted += np.asarray(getattr(p, f"{side}_votes"), np.int64)
        for c, a in p.areas.items():
            areas.setdefault(int(c), []).extend(a)
    intensity = _intensity([px for p in parts for px in p.pixels])
    n = len(heights)
    return Fingerprint(
        images=n,
        height=_spread(heights),
        width=_spread(widths),
        modes=dict(sorted(modes.items())),
        channels=dict(sorted(bands.items())),
        intensity=intensity,
        class_pixel_share=[round(float(s), 6) for s in class_pixel_share],
        class_image_share=[round(float(with_class[c] / n), 6) if n else 0.0 for c in range(num_classes)],
        object_area_median=[float(np.median(areas[c])) if areas.get(c) else None for c in range(num_classes)],
        sampled_images=sum(p.sampled for p in parts),
        class_top_share=[round(float(top[c] / total[c]), 6) if total[c] else None for c in range(num_classes)],
        class_left_share=[round(float(left[c] / total[c]), 6) if total[c] else None for c in range(num_classes)],
        dtypes=dict(sorted(dtypes.items())),
        unit_range=unit_range,
        class_top_votes=[[int(votes["top"][c]), int(votes["bottom"][c])] for c in range(num_classes)],
        class_left_votes=[[int(votes["left"][c]), int(votes["right"][c])] for c in range(num_classes)],
    )


def _intensity(sampled: list[list[float]]) -> dict[str, list[float]]:
    """Per-channel statistics of the sampled pixels (NaNs and infinities of float images left out). Pixels
    of the most common channel count only: a data set whose images differ in channels fails `prepare` anyway."""
    if not sampled:
        return {}
    width = Counter(len(px) for px in sampled).most_common(1)[0][0]
    pixels = np.asarray([px for px in sampled if len(px) == width], np.float64)
    pixels[~np.isfinite(pixels)] = np.nan  # float images' +-inf, like their NaNs, carry no intensity
    if np.isnan(pixels).all(axis=0).any():
        return {}
    pct = np.nanpercentile(pixels, PERCENTILES, axis=0)
    return {
        "mean": np.nanmean(pixels, axis=0).round(3).tolist(),
        "std": np.nanstd(pixels, axis=0).round(3).tolist(),
        **{f"p{q:g}": pct[i].round(3).tolist() for i, q in enumerate(PERCENTILES)},
    }


def _stat(value: float) -> str:
    """An intensity statistic with four significant digits below 1000 (0.1234 for data in 0..1, 120.5 for 8-bit
    values), a whole number from 1000 up (8035 and 31873 for 16-bit counts, without an exponent)."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def format_fingerprint(fp: Fingerprint, class_names: list[str]) -> list[str]:
    """Lines for `raysegment data-info`."""
    h, w = fp.height, fp.width
    lines = [
        f"fingerprint ({fp.images} images; pixel values and objects from {fp.sampled_images} of them):",
        f"  size         height {h['min']}/{h['median']:g}/{h['max']}, width {w['min']}/{w['median']:g}/{w['max']}"
        " (min/median/max)",
        f"  files        {', '.join(f'{m}: {n}' for m, n in fp.modes.items())} (modes); "
        f"{', '.join(f'{b} band(s): {n}' for b, n in fp.channels.items())}",
    ]
    if fp.intensity:
        count = len(fp.intensity["mean"])
        names = list("RGB") if count == 3 else [str(i + 1) for i in range(count)]
        for i, ch in enumerate(names):
            stats = ", ".join(f"{name} {_stat(values[i])}" for name, values in fp.intensity.items())
            lines.append(f"  intensity {ch:<2} {stats}")
        if fp.dtypes:
            lines.append(f"  pixels       {', '.join(f'{d}: {n}' for d, n in fp.dtypes.items())} (decoded types)")
            for warning in (fp.mixed_depth, fp.mixed_range):
                if warning:
                    lines.append(f"  warning      {warning}")
    lines.append(f"  {'class':<20} {'pixels':>8} {'images':>8} {'median object px':>17}")
    for c, name in enumerate(class_names):
        area = fp.object_area_median[c]
        lines.append(
            f"  {name:<20} {fp.class_pixel_share[c]:>8.2%} {fp.class_image_share[c]:>8.1%} "
            f"{'-' if area is None else f'{area:g}':>17}"
        )
    return lines


def _shard_part(loc: Any, path: str, channels: imaging.Channels) -> ShardFingerprint:
    """One shard's fingerprint part, from its key, image and mask columns."""
    from raysegment import storage

    part = ShardFingerprint()
    table = storage.read_table(loc, path, columns=["key", "image", "mask"])
    for key, image, mask in zip(*(table.column(c).to_pylist() for c in ("key", "image", "mask"))):
        part.add(key, imaging.decode_pixels(image, channels=channels), imaging.decode_mask(mask))
    return part


def fingerprint_shards(loc: Any, manifest: Manifest) -> Fingerprint:
    """The fingerprint of a data set prepared before fingerprints existed: one Ray task per shard."""
    import ray

    task = ray.remote(_shard_part)
    channels = imaging.Channels.of(manifest.bands, manifest.channels)
    parts = ray.get([task.remote(loc, loc.child(s.path).path, channels) for s in manifest.shards])
    return merge(parts, manifest.num_classes, list(manifest.pixel_frequency or [0.0] * manifest.num_classes))
