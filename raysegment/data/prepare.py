"""`prepare`: labelled images -> Parquet shards + manifest.json, built by Ray tasks.

The driver lists the source (paths and sizes only), plans shards of about the
target size and runs one Ray task per shard (read, validate, encode, write),
keeping a bounded number in flight with ray.wait. Tasks return only small
statistics (row counts, a 256-bin class histogram, the invalid pairs), so the
driver never holds image data, whatever the data set's size.

Plain Ray tasks rather than Ray Data: a shard is a unit we name
(`{split}-NNNNN.parquet`), size by bytes and hash, and whose validation report
and histogram must come back to the driver; Ray Data's writers name files by
uuid and have no side channel for per-file statistics.

The manifest is written last and is the commit: readers open only the shards it
lists. Each run writes its shards into a folder of its own, `shards/<generation>/`,
so a data set being rewritten (--overwrite) stays whole and readable until the new
manifest replaces the old one; only then is the rest of `shards/` (the previous
generation, shards an earlier release wrote directly under `shards/`, strays of a
killed run) removed. A run that fails before the commit removes only its own folder; one
whose manifest write fails leaves it (an S3 upload that timed out may have committed) for
the next run's commit to remove. Each shard
appears whole (rename locally, one upload on S3); nothing is copied or renamed after.

A run holds DEST's lock (`_prepare.lock`, lock.RunLock) from its destination check to its
cleanup: a second prepare into the same DEST (a retried CronJob while the first still runs)
would otherwise remove the first's shards as "another generation" after its own commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raysegment import __version__, logs, progress, storage
from raysegment.config import PrepareSpec
from raysegment.data import classes, imaging, masks, tiff
from raysegment.data.fingerprint import ShardFingerprint, merge
from raysegment.data.layouts import (
    SPLITS,
    Listing,
    Pair,
    assign_splits,
    list_source,
    no_train_fix,
    no_val_fix,
    read_val_keys,
)
from raysegment.data.manifest import FORMAT_VERSION, MANIFEST, Counts, Manifest, Shard, Skipped, write_manifest
from raysegment.errors import DataError
from raysegment.lock import RunLock

log = logging.getLogger(__name__)

SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("split", pa.string()),
    ]
)
MAX_REPORTED = 20
# A row group is the unit Ray Data and Parquet readers stream; it also bounds a shard task's buffer.
ROW_GROUP_BYTES = 32 * 2**20
PREPARE_LOCK = "_prepare.lock"
# A live run rewrites its lock every quarter of this (RunLock's heartbeat); one on this machine whose pid
# died is taken over at once.
PREPARE_LOCK_STALE_S = 1800


def _plan_shards(pairs: list[Pair], target_bytes: int) -> list[tuple[str, list[Pair]]]:
    """Group valid pairs by split, in key order, into shards of about target_bytes of encoded data."""
    shards: list[tuple[str, list[Pair]]] = []
    for split in SPLITS:
        current: list[Pair] = []
        size = 0
        for pair in pairs:
            if pair.split != split:
                continue
            current.append(pair)
            size += pair.image_bytes + pair.mask_bytes
            if size >= target_bytes:
                shards.append((split, current))
                current, size = [], 0
        if current:
            shards.append((split, current))
    return shards


@dataclasses.dataclass(frozen=True)
class Row:
    """One valid pair as a shard stores it, with its decoded image for the fingerprint."""

    key: str
    image: bytes  # the file's own bytes, an upright PNG (EXIF rotation), or one slice of a stack
    mask: np.ndarray  # class ids
    pixels: imaging.Decoded

    @property
    def size(self) -> tuple[int, int]:
        return self.mask.shape[0], self.mask.shape[1]


JPEG_MAGIC = b"\xff\xd8\xff"
LOSSY_MASK = (
    "mask is a JPEG, whose lossy compression changes class ids along every edge; "
    "save masks losslessly (PNG), or for binary 0/255 masks pass --mask-threshold 128"
)
EXIF_TURN = (
    "the image's EXIF orientation tag turns it upright to that size and the mask is stored unturned: "
    "turn the mask the same way, or remove the image's tag (exiftool -Orientation= FILE)"
)


def exif_warning(keys: list[str]) -> str:
    """Images an EXIF tag turned upright without changing their size (180 degrees, a mirror, or a square
    image), beside masks without a tag: nothing shows whether the masks were drawn upright."""
    shown = ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")
    return (
        f"{len(keys)} images were turned upright by their EXIF orientation tag and their masks carry none: {shown}; "
        "the masks are taken as drawn on the upright images (as annotation tools show them). If they were "
        "drawn on the stored pixels, remove the images' tags (exiftool -Orientation= FILE) and prepare again"
    )


def _turned_in_place(stored: bytes, mask_bytes: bytes, shape: tuple[int, ...]) -> bool:
    """An image its EXIF tag turned without changing its size (so the sizes cannot show whether the
    untagged mask was drawn on the upright or the stored pixels; a 90-degree turn shows it)."""
    if masks.oriented(mask_bytes):
        return False
    return imaging.open_image(stored, imaging.MAX_PIXELS).size == (shape[1], shape[0])


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why a pair is invalid: the text the report and the manifest show, and what a fix is proposed from
    over every such mask at once: an unmapped colour mask's colours (`_colour_fix`), a 16-bit mask's values
    over 255 (`_deep_fix`; all of them unless `deep_cut`)."""

    text: str
    colours: tuple[tuple[int, int, int], ...] = ()
    deep: tuple[int, ...] = ()
    deep_cut: bool = False


@dataclasses.dataclass(frozen=True)
class Invalid:
    """An invalid pair (or a file that paired with nothing) and its problem."""

    key: str
    problem: Problem

    def as_manifest(self) -> Skipped:
        return Skipped(self.key, self.problem.text)


def _check_pair(
    img_bytes: bytes,
    mask_bytes: bytes,
    lut: np.ndarray | None,
    unmapped: str,
    encoding: masks.MaskEncoding,
    channels: imaging.Channels,
) -> tuple[Problem | None, np.ndarray | None, bytes, imaging.Decoded | None, int]:
    """(problem, class-id mask, image bytes, decoded image, transparent pixels the mask made ignore) for one
    pair; the problem is None when it is valid.

    The image bytes are the file's own, or an upright PNG when the file carries an EXIF rotation."""
    stored = img_bytes
    try:
        img_bytes, decoded = imaging.decode_upright(img_bytes, channels=channels)
    except imaging.ImageDecodeError as exc:
        return Problem(f"undecodable image: {exc}"), None, img_bytes, None, 0
    h, w = decoded.pixels.shape[:2]
    if mask_bytes.startswith(JPEG_MAGIC) and encoding.threshold is None:
        return Problem(LOSSY_MASK), None, img_bytes, decoded, 0
    try:
        read = masks.read_mask(mask_bytes, encoding, lut, unmapped)
    except imaging.ImageDecodeError as exc:
        if encoding.colors is None and encoding.threshold is None and (codes := _colour_codes(mask_bytes)):
            return codes, None, img_bytes, decoded, 0
        return Problem(f"undecodable mask: {exc}"), None, img_bytes, decoded, 0
    except masks.MaskValueError as exc:
        return Problem(str(exc), deep=exc.deep, deep_cut=exc.deep_cut), None, img_bytes, decoded, 0
    ids = read.ids
    if ids.shape != (h, w):
        problem = f"size mismatch: image {w}x{h}, mask {ids.shape[1]}x{ids.shape[0]} (width x height)"
        if img_bytes is not stored and ids.shape == (w, h):  # decode_upright turned the image by its EXIF tag
            problem += f"; {EXIF_TURN}"
        elif (scale := _scale_between(ids.shape, (h, w))) is not None:
            problem += (
                f"; the mask is exactly {scale:g}x the image: resize it to the image's size with nearest-neighbour "
                "sampling (never bilinear, which would invent class ids), or use the images it was drawn on"
            )
        return Problem(problem), None, img_bytes, decoded, 0
    return None, ids, img_bytes, decoded, read.transparent


UNMAPPED_COLOURS = "mask colours not mapped"
# More colours than this in a mask is no colour code (a photo, or anti-aliased edges): no --mask-colors proposed.
MAX_COLOUR_CODES = 32


def _colour_codes(mask_bytes: bytes) -> Problem | None:
    """The problem of a colour-coded (RGB/RGBA) mask given without --mask-colors, naming its colours
    (`_colour_fix` proposes the mapping for all such masks at once); None for any other mask."""
    try:
        img = imaging.open_image(mask_bytes, imaging.MAX_PIXELS)
        if img.mode not in ("RGB", "RGBA"):
            return None
        rgb = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(np.int32)
    except Exception:  # the decoder's own error is the problem then
        return None
    codes = np.unique(rgb @ np.array([1 << 16, 1 << 8, 1], np.int32))
    if len(codes) > MAX_COLOUR_CODES:
        return Problem(
            f"{UNMAPPED_COLOURS}: {img.mode} mask with {len(codes)} colours, more than a colour code has (a "
            "photo, or anti-aliased edges?): map the class colours with --mask-colors and the rest with "
            "--unlisted-colors ignore"
        )
    colours = tuple((c >> 16, (c >> 8) & 255, c & 255) for c in codes.tolist())
    shown = "; ".join(",".join(map(str, c)) for c in colours)
    return Problem(f"{UNMAPPED_COLOURS}: {img.mode} mask with colours {shown}{masks._planar_hint(img)}", colours)


def _colour_fix(invalid: list[Invalid]) -> str:
    """A concrete --mask-colors for the colours every unmapped colour mask holds (ids in colour order,
    black first), or "" when no such mask is among the invalid pairs."""
    found = {colour for item in invalid for colour in item.problem.colours}
    if not found:
        return ""
    if len(found) > MAX_COLOUR_CODES:
        return (
            f"; the masks hold {len(found)} colours in all: map the class colours with --mask-colors "
            "(R,G,B:ID pairs, or a class_dict.csv of name,r,g,b) and --unlisted-colors ignore for the rest"
        )
    pairs = ";".join(f"{','.join(map(str, c))}:{i}" for i, c in enumerate(sorted(found)))
    return (
        f"; map the mask colours to class ids with --mask-colors '{pairs}' (the {len(found)} colours found, "
        "ids in colour order: give each colour its class's id, or a class_dict.csv of name,r,g,b)"
    )


def _deep_fix(invalid: list[Invalid], raw_values: list[int] | None, mapped: set[int] | None = None) -> str:
    """One --mask-values for the values of every 16-bit mask with values over 255 (and of the valid masks,
    `raw_values`), as the 8-bit masks get one (`_check_class_values`); "" when no such mask is invalid.
    `mapped`: the raw values a table in force maps (a layout's, or --mask-values): a whole new mapping would
    drop its pairs, so the values it lacks are named, to add to it."""
    found = {value for item in invalid for value in item.problem.deep}
    named_all = not any(item.problem.deep_cut for item in invalid)
    if not found:
        return ""
    if mapped is not None:
        lacking = sorted(found - mapped)
        more = " ..." if not named_all or len(lacking) > masks.MAX_DEEP_SHOWN else ""
        shown = ", ".join(map(str, lacking[: masks.MAX_DEEP_SHOWN]))
        return f"; add the values {shown}{more} to --mask-values as RAW:ID pairs" if lacking else ""
    values = sorted(found | set(raw_values or []))
    if not named_all or len(values) > masks.MAX_DEEP_SHOWN:
        return "; map each mask value to a class id with --mask-values RAW:ID,... (one pair a value)"
    fix = (
        f"; the masks hold the values {', '.join(map(str, values))} in all: map them with --mask-values "
        f"{_mapping(values)}"
    )
    if len(values) == 2:
        fix += f", or --mask-threshold {(values[0] + values[1]) // 2 + 1} for a binary mask"
    return fix


def _scale_between(mask: tuple[int, ...], image: tuple[int, int]) -> float | None:
    """The factor a mask is of its image when both sides agree on one (2, 0.5, 4, ...), else None."""
    (mh, mw), (h, w) = mask[:2], image
    for factor in (2.0, 4.0, 8.0, 0.5, 0.25, 0.125):
        if mh == round(h * factor) and mw == round(w * factor):
            return factor
    return None


def _missing(pair: Pair) -> str:
    """Why a listed pair's file could not be opened: a dangling link, or gone since the listing."""
    for path in (pair.image, pair.mask):
        if path and os.path.islink(path) and not os.path.exists(path):
            return f"dangling symlink {path} -> {os.readlink(path)}: its target does not exist"
    return "file disappeared while preparing"


def _read(source: storage.Location, path: str) -> bytes:
    """One file of the source, retried for the driver's storage deadline (the Location carries it)."""
    return source.call(lambda: source.fs.cat_file(path))


class _StackReader:
    """Reads a pair's files; the slices of a stack come one after another (pairs in key order), so the
    stack's bytes are kept for its next slice instead of read again for each."""

    def __init__(self, source: storage.Location) -> None:
        self.source = source
        self.kept: dict[str, bytes] = {}

    def _file(self, path: str, keep: bool) -> bytes:
        if path in self.kept:
            return self.kept[path]
        data = _read(self.source, path)
        if keep:
            self.kept = {p: d for p, d in self.kept.items() if p != path}
            self.kept[path] = data
            while len(self.kept) > 2:  # the image and the mask stack
                self.kept.pop(next(iter(self.kept)))
        return data

    def pair(self, pair: Pair) -> tuple[bytes, bytes]:
        """(image bytes, mask bytes): the files, or the pair's slice of each as a file of its own."""
        stack = pair.page is not None
        img, msk = self._file(pair.image, stack), self._file(pair.mask, stack)
        if not stack:
            return img, msk
        return tiff.page_bytes(img, pair.page), tiff.page_bytes(msk, pair.page)


class _NoRows(Exception):
    """A shard whose pairs were all invalid: nothing to commit."""


def _valid_rows(
    source: storage.Location,
    pairs: list[Pair],
    lut: list[int] | None,
    unmapped: str,
    invalid: list[Invalid],
    hist: np.ndarray,
    encoding: masks.MaskEncoding,
    channels: imaging.Channels,
    turned: list[str],
    transparent: list[int],
) -> Iterator[Row]:
    """Each valid pair as a Row; invalid ones go to `invalid`, the keys of images an EXIF tag turned (and
    whose masks carry none) to `turned`, each valid mask's transparent pixels read as ignore to `transparent`."""
    table = np.asarray(lut, np.int16) if lut is not None else None
    reader = _StackReader(source)
    for pair in pairs:
        try:
            img_bytes, mask_bytes = reader.pair(pair)
        except storage.StorageError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
            invalid.append(Invalid(pair.key, Problem(_missing(pair))))
            continue
        except tiff.TiffError as exc:
            invalid.append(Invalid(pair.key, Problem(f"undecodable stack: {exc}")))
            continue
        stored = img_bytes
        problem, mask, img_bytes, decoded, alpha = _check_pair(
            img_bytes, mask_bytes, table, unmapped, encoding, channels
        )
        if problem:
            invalid.append(Invalid(pair.key, problem))
            continue
        assert mask is not None and decoded is not None
        if img_bytes is not stored and _turned_in_place(stored, mask_bytes, mask.shape):
            turned.append(pair.key)  # said once, at the end
        hist += np.bincount(mask.ravel(), minlength=256)
        transparent.append(alpha)
        yield Row(pair.key, img_bytes, mask, decoded)


def _write_parquet(path: str, rows: Iterator[Row], split: str) -> int:
    """Stream rows into a Parquet file in row groups of about ROW_GROUP_BYTES; returns the row count."""
    n = 0
    with pq.ParquetWriter(path, SHARD_SCHEMA, compression="none", **storage.PAGE_CHECKSUMS) as writer:
        cols: dict[str, list[Any]] = {f: [] for f in SHARD_SCHEMA.names}
        buffered = 0
        for row in rows:
            mask_png = imaging.encode_mask(row.mask)
            for field, value in zip(SHARD_SCHEMA.names, (row.key, row.image, mask_png, *row.size, split)):
                cols[field].append(value)
            n += 1
            buffered += len(row.image) + len(mask_png)
            if buffered >= ROW_GROUP_BYTES:
                writer.write_table(pa.table(cols, schema=SHARD_SCHEMA))
                cols, buffered = {f: [] for f in SHARD_SCHEMA.names}, 0
        if cols["key"]:
            writer.write_table(pa.table(cols, schema=SHARD_SCHEMA))
    return n


def _file_digest(path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fingerprinted(rows: Iterator[Row], fingerprint: ShardFingerprint) -> Iterator[Row]:
    for row in rows:
        fingerprint.add(row.key, row.pixels, row.mask)
        yield row


@ray.remote
def _build_shard(
    source: storage.Location,
    dest: storage.Location,
    name: str,
    split: str,
    pairs: list[Pair],
    lut: list[int] | None,
    unmapped: str,
    write: bool,
    encoding: masks.MaskEncoding = masks.PLAIN,
    channels: imaging.Channels = imaging.OWN,
) -> dict[str, Any]:
    """Read, validate, encode and (when `write`) write one shard; return its statistics and invalid pairs."""
    hist = np.zeros(256, np.int64)
    invalid: list[Invalid] = []
    fingerprint = ShardFingerprint()
    turned: list[str] = []
    transparent: list[int] = []
    rows = _valid_rows(source, pairs, lut, unmapped, invalid, hist, encoding, channels, turned, transparent)
    rows = _fingerprinted(rows, fingerprint)
    out: dict[str, Any] = {"name": name, "split": split, "invalid": invalid}
    if not write:
        out["rows"] = sum(1 for _ in rows)
    else:
        try:
            with storage.staged_file(dest.child("shards", name)) as local:
                out["rows"] = _write_parquet(local, rows, split)
                if not out["rows"]:
                    raise _NoRows
                sha, size = _file_digest(local)
            out.update(bytes=size, sha256=sha, path=f"shards/{name}")  # committed: the shard is whole
        except _NoRows:
            pass
    out["hist"] = hist.tolist()
    out["fingerprint"] = fingerprint
    out["turned"] = turned
    out["transparent"] = sum(transparent)
    return out


def _generation() -> str:
    """A new run's shard folder name below `shards/`: UTC time (sorts by age) + random hex (unique)."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def _remove_generation(dest: storage.Location, generation: str) -> None:
    """Remove one run's shards (a failed run's: the data set its manifest lists is untouched)."""
    shards = dest.child("shards")
    storage.remove_tree(shards.child(generation))
    if not shards.remote:  # no empty shards/ left in a DEST that held no data set (S3 has no empty folders)
        with contextlib.suppress(OSError):
            os.rmdir(shards.path)


def _remove_other_generations(dest: storage.Location, generation: str) -> None:
    """After the commit: everything under `shards/` but this run's generation (the previous data set's
    shards, flat ones of an earlier release, strays of killed runs). A failure leaves strays no manifest
    lists, which the next --overwrite removes: a warning, not a failed prepare."""
    shards = dest.child("shards")
    try:
        storage.remove_children(shards, keep=generation)
    except storage.StorageError as exc:
        progress.warn(
            log,
            "prepare",
            f"the data set is written, but the previous shards under {shards.uri} (not listed by the new "
            f"manifest; all but {generation}/) could not be removed: {exc}; remove them, or the next "
            "--overwrite does",
        )


# Keys named for a problem many pairs share.
KEYS_PER_PROBLEM = 5


def _unpaired(problem: str) -> str:
    """What an invalid item is: a file that paired with nothing ("images", "masks"), else "pairs"."""
    if problem.startswith("image without mask"):
        return "images"
    return "masks" if problem.startswith("mask without image") else "pairs"


# The report's count of each: an image and a mask that paired with nothing are two files, not two pairs.
INVALID_NOUNS: dict[str, Callable[[int], str]] = {
    "pairs": lambda n: "invalid pair" if n == 1 else "invalid pairs",
    "images": lambda n: "image without a mask" if n == 1 else "images without a mask",
    "masks": lambda n: "mask without an image" if n == 1 else "masks without an image",
}


def _invalid_report(
    uri: str,
    invalid: list[Invalid],
    raw_values: list[int] | None = None,
    valid: bool = True,
    mapped: set[int] | None = None,
) -> str:
    """One line: each distinct problem once (in key order), with the keys that have it; a problem shared by
    many pairs (every JPEG mask) was repeated for each, up to 20 times. `raw_values`: the values the valid
    masks hold when no table mapped them, which a proposed --mask-values must map too; `valid`: whether any
    pair is, for --skip-invalid to write."""
    by_problem: dict[str, list[str]] = {}
    for item in invalid:
        by_problem.setdefault(item.problem.text, []).append(item.key)
    counts: dict[str, int] = {}
    for item in invalid:
        counts[_unpaired(item.problem.text)] = counts.get(_unpaired(item.problem.text), 0) + 1
    header = ", ".join(f"{counts[what]} {noun(counts[what])}" for what, noun in INVALID_NOUNS.items() if what in counts)
    parts = []
    for problem, keys in list(by_problem.items())[:MAX_REPORTED]:
        if len(keys) == 1:
            parts.append(f"{keys[0]}: {problem}")
            continue
        named = ", ".join(keys[:KEYS_PER_PROBLEM]) + (
            f" and {len(keys) - KEYS_PER_PROBLEM} more" if len(keys) > KEYS_PER_PROBLEM else ""
        )
        parts.append(f"{len(keys)} {_unpaired(problem)} ({named}): {problem}")
    left = len(by_problem) - MAX_REPORTED
    more = f" (and {left} more problems)" if left > 0 else ""
    return (
        f"{uri}: {header}, nothing written: {'; '.join(parts)}{more}{_colour_fix(invalid)}"
        f"{_deep_fix(invalid, raw_values, mapped)}; fix them"
        + (", or pass --skip-invalid to write the valid pairs and record these in the manifest" if valid else "")
    )


def _mapping(values: list[int]) -> str:
    """A --mask-values example mapping raw values to ids in order. Beside two or more other values, 255 maps
    to itself, ignore (as the messages say: VOC's void border; a value left out of --mask-values makes its
    pair invalid), with how to make it a class instead."""
    others = [v for v in values if v != classes.IGNORE_INDEX]
    if classes.IGNORE_INDEX in values and len(others) >= 2:
        example = ",".join(f"{v}:{i}" for i, v in enumerate(others))
        return f"{example},255:255, which keeps 255 as ignore (255:{len(others)} if 255 is a class)"
    return ",".join(f"{v}:{i}" for i, v in enumerate(values))


@dataclasses.dataclass(frozen=True)
class AlphaSample:
    """Grey + alpha masks of a few pairs: the share of transparent pixels, and the values under them and
    under the rest (what --mask-alpha keep would read)."""

    transparent: float
    opaque: list[int]  # the values of pixels not transparent
    values: list[int]  # every value, transparent pixels' included


def _alpha_sample(root: storage.Location, pairs: list[Pair], count: int = 8) -> AlphaSample | None:
    """The first `count` valid pairs' masks read on the driver, when they have an alpha channel with
    transparent pixels; None otherwise (or unreadable: only a hint depends on it)."""
    transparent = total = 0
    values: set[int] = set()
    opaque: set[int] = set()
    for pair in [p for p in pairs if not p.problem and p.mask and p.page is None][:count]:
        try:
            img = imaging.open_image(_read(root, pair.mask), imaging.MAX_PIXELS)
            if img.mode not in ("LA", "PA", "RGBA"):
                continue
            grey, alpha = np.asarray(img.getchannel(0)), np.asarray(img.getchannel("A"))
        except Exception:  # a hint is not worth failing the message it belongs to
            continue
        transparent += int((alpha == 0).sum())
        total += alpha.size
        values |= set(np.unique(grey).tolist())
        opaque |= set(np.unique(grey[alpha > 0]).tolist())
    return AlphaSample(transparent / total, sorted(opaque), sorted(values)) if transparent else None


def _alpha_hint(sample: AlphaSample | None) -> str:
    """How --mask-alpha keep reads the masks, when transparency is what left them one class, else "" (also
    where the opaque pixels hold two values: EM membrane masks saved with transparency map those)."""
    if sample is None or len(sample.opaque) > 1 or len(sample.values) < 2:
        return ""
    fix = "--mask-alpha keep"
    if sample.values != list(range(len(sample.values))):
        fix += f" --mask-values {_mapping(sample.values)}"
    return (
        f"; {sample.transparent:.0%} of the mask pixels sampled are transparent (alpha 0), read as ignore: if "
        f"transparent is the background (a label layer saved over a transparent background), prepare with {fix}"
    )


class MaskValuesError(DataError):
    """The values the masks hold, all together, are no class ids 0..K-1 (and no mapping was given): every
    pair is refused, not one of them."""


def _check_class_values(uri: str, hist: np.ndarray, alpha: Callable[[], AlphaSample | None] = lambda: None) -> int:
    """The class count when masks hold raw values that are already 0..K-1; else a DataError listing them.
    `alpha`: the masks' transparency (`_alpha_sample`), read only for a hint when they give one class."""
    present = [int(v) for v in np.nonzero(hist)[0] if v != classes.IGNORE_INDEX]
    if len(present) >= 2 and present == list(range(len(present))):
        return len(present)
    found = [int(v) for v in np.nonzero(hist)[0]]
    if len(present) <= 1 and (hint := _alpha_hint(alpha())):
        # Grey + alpha masks whose background is transparent: read as ignore, it left one value (or none).
        held = f"only the value {present[0]} and 255 (ignore)" if present else "only 255 (ignore)"
        raise MaskValuesError(f"{uri}: masks hold {held}: one class, and segmentation needs at least two{hint}")
    if masks.looks_soft_binary(hist):
        # A few values in between may be classes (0/85/170/255); a fade of many is no class table.
        example = ",".join(f"{v}:{i}" for i, v in enumerate(found))
        classes_too = f"; or, if the values in between are classes, --mask-values {example}" if len(found) <= 8 else ""
        raise MaskValuesError(
            f"{uri}: masks hold the values {found[:50]}{' ...' if len(found) > 50 else ''}; {masks.SOFT_HINT}"
            f"{classes_too}"
        )
    if len(found) <= 1:
        # One value (all background, one colour, or all ignore): no mapping makes two classes of it.
        held = f"only the value {present[0]}" if present else "only 255 (ignore)"
        raise MaskValuesError(
            f"{uri}: masks hold {held}: one class, and "
            "segmentation needs at least two; check that the masks are the right files, or, if the other "
            "classes are merely absent here, set --num-classes (or --class-names)"
        )
    raise MaskValuesError(
        f"{uri}: masks hold the values {found[:50]}{' ...' if len(found) > 50 else ''}, which are not class ids 0..K-1 "
        f"(255 = ignore) for K >= 2; map them with --mask-values, e.g. --mask-values {_mapping(found)}; "
        "or, if they are class ids and some classes are absent, set --num-classes"
    )


def _run_shard_tasks(
    source: storage.Location,
    dest: storage.Location,
    plan: list[tuple[str, list[Pair]]],
    listing: Listing,
    encoding: masks.MaskEncoding,
    skip_invalid: bool,
    invalid: list[Invalid],
    fingerprints: list[ShardFingerprint],
    channels: imaging.Channels = imaging.OWN,
    turned: list[str] | None = None,
    transparent: list[int] | None = None,
    *,
    generation: str,
    shown: progress.Stage,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Run the shard tasks, at most a few per CPU in flight; returns shard entries and each split's class
    histogram. The shards go to `DEST/shards/<generation>/`; on a failure the caller removes that folder.

    Invalid pairs, each task's fingerprint part, the keys EXIF turned and each task's count of transparent
    pixels read as ignore are appended to the lists passed in. `shown`: the caller's progress stage, left
    open on success (the caller's checks may still refuse the pairs), closed as stopped on a failure."""
    max_in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    counters: dict[str, int] = {}
    pending: list[ray.ObjectRef] = []
    shards: list[dict[str, Any]] = []
    hists = {split: np.zeros(256, np.int64) for split in SPLITS}
    done_pairs, last_log = 0, time.time()

    def collect(refs: list[ray.ObjectRef]) -> None:
        nonlocal done_pairs
        for result in ray.get(refs):
            found = result.pop("invalid")
            invalid.extend(found)
            hists[result["split"]] += np.asarray(result.pop("hist"), np.int64)
            fingerprints.append(result.pop("fingerprint"))
            (turned if turned is not None else []).extend(result.pop("turned"))
            (transparent if transparent is not None else []).append(result.pop("transparent"))
            done_pairs += result["rows"]
            shown.update(result["rows"] + len(found), invalid=len(invalid))
            if result.get("path"):
                shards.append(result)

    try:
        for split, group in plan:
            if len(pending) >= max_in_flight:
                ready, pending = ray.wait(pending, num_returns=1)
                collect(ready)
                if time.time() - last_log > 10:
                    log.info("prepare: %d valid pairs written, %d invalid so far", done_pairs, len(invalid))
                    last_log = time.time()
            idx = counters.get(split, 0)
            counters[split] = idx + 1
            # Once the job is bound to fail, the remaining tasks only validate, for the report.
            write = skip_invalid or not invalid
            pending.append(
                _build_shard.remote(
                    listing.root or source,
                    dest,
                    f"{generation}/{split}-{idx:05d}.parquet",
                    split,
                    group,
                    listing.lut,
                    listing.unmapped,
                    write,
                    encoding=encoding,
                    channels=channels,
                )
            )
        collect(pending)
    except BaseException:
        shown.close(stopped=True)  # its line says so, and its heartbeat stops before the caller's cleanup
        for ref in pending:
            ray.cancel(ref)
        raise
    return sorted(shards, key=lambda s: s["path"]), hists


def _mask_encoding(spec: PrepareSpec, source: storage.Location, listing: Listing) -> tuple[Listing, masks.MaskEncoding]:
    """The encoding the shard tasks apply, and the listing with the classes a colour table or threshold fixes."""
    if spec.mask_colors is not None:
        table = masks.load_color_table(spec.mask_colors, spec.endpoint_url, source.retry_s)
        k = max(table.num_classes, spec.num_classes or 0, 0 if table.names else len(spec.class_names or []))
        listing = replace(listing, lut=classes.identity_lut(k), class_names=table.names, palette=table.palette(k))
        encoding = masks.MaskEncoding(colors=table.colors, unlisted=spec.unlisted_colors, alpha=spec.mask_alpha)
        return listing, encoding
    if spec.mask_threshold is not None:
        encoding = masks.MaskEncoding(threshold=spec.mask_threshold, alpha=spec.mask_alpha)
        return replace(listing, lut=classes.identity_lut(2)), encoding
    if spec.mask_zero == "ignore":
        k = _given_class_count(spec)
        unmapped = f"mask values over {k} (--mask-zero ignore: value v is class v-1 of {k})" if k else ""
        listing = replace(listing, lut=classes.zero_ignore_lut(k), unmapped=unmapped or "mask values")
    return listing, masks.MaskEncoding(alpha=spec.mask_alpha)


def _given_class_count(spec: PrepareSpec) -> int | None:
    return spec.num_classes or (len(spec.class_names) if spec.class_names else None)


def _list_pairs(spec: PrepareSpec, source: storage.Location) -> tuple[Listing, masks.MaskEncoding, list[Pair], str]:
    """The source's pairs with their splits and the mask encoding, checked against the class options."""
    listing = list_source(
        source,
        spec.layout,
        spec.images_dir,
        spec.masks_dir,
        spec.mask_values,
        spec.num_classes or (len(spec.class_names) if spec.class_names else None),
        spec.mask_suffix or "",
    )
    listing, encoding = _mask_encoding(spec, source, listing)
    val_keys = read_val_keys(spec.val_keys, spec.endpoint_url, source.retry_s) if spec.val_keys is not None else None
    pairs, split_source = assign_splits(listing, spec.layout, val_keys, spec.val_fraction, spec.seed)
    # No file paired at all (masks named NAME_mask without --mask-suffix): the invalid report says why and
    # prepare fails; a split's fix (--val-keys, --val-fraction) would be beside the point.
    paired = any(not p.problem for p in pairs)
    if paired and not any(p.split == "val" and not p.problem for p in pairs):
        # train and plan refuse such a data set (the best epoch is picked on val): said now, not after the shards.
        progress.warn(log, "prepare", f"no pair is in the val split ({split_source}); {no_val_fix(listing)}")
    if paired and not any(p.split == "train" and not p.problem for p in pairs):
        # ... and one with nothing to train on (a single pair lands in val): no batch size helps.
        progress.warn(log, "prepare", f"no pair is in the train split ({split_source}); {no_train_fix(listing)}")
    if listing.class_names:
        fixed_by = f"--mask-colors {spec.mask_colors}" if spec.mask_colors else f"the {spec.layout} layout"
        if spec.num_classes and spec.num_classes != len(listing.class_names):
            raise DataError(f"{fixed_by} has {len(listing.class_names)} classes, not --num-classes {spec.num_classes}")
        if spec.class_names and len(spec.class_names) != len(listing.class_names):
            raise DataError(
                f"{fixed_by} has {len(listing.class_names)} classes; --class-names gives {len(spec.class_names)}"
            )
    return listing, encoding, pairs, split_source


def _check_destination(spec: PrepareSpec, dest: storage.Location) -> None:
    """Refuse a DEST that holds a data set unless --overwrite; nothing is removed here: the data set stays
    whole and readable until the new manifest replaces it (`_remove_other_generations` follows the commit)."""
    if storage.exists(dest.child(MANIFEST)) and not spec.overwrite:
        raise DataError(f"{dest.uri}: a data set already exists here; pass --overwrite or choose another DEST")


def _classes(
    spec: PrepareSpec, source: storage.Location, listing: Listing, hist: np.ndarray, pairs: list[Pair] | None = None
) -> tuple[int, list[str]]:
    """(class count, class names) from the layout, the mask mapping or the mask values themselves. `pairs`:
    for a hint on transparent masks when they leave one class (a few masks read again, on the driver)."""

    def alpha() -> AlphaSample | None:
        if spec.mask_alpha != "ignore" or not pairs or spec.mask_colors or spec.mask_threshold is not None:
            return None
        return _alpha_sample(listing.root or source, pairs)

    if listing.class_names:
        num_classes = len(listing.class_names)
    elif spec.mask_zero == "ignore" and not _given_class_count(spec):
        # Values 1..254 are all allowed: the classes are the ids found (ADE20K's 150 from values 1..150).
        present = [int(v) for v in np.nonzero(hist[: classes.IGNORE_INDEX])[0]]
        num_classes = max(present, default=0) + 1
    elif listing.lut is not None:
        num_classes = _given_class_count(spec) or 0
        num_classes = max(num_classes, max((c for c in listing.lut if 0 <= c < classes.IGNORE_INDEX), default=0) + 1)
    else:
        num_classes = _check_class_values(source.uri, hist, alpha)
    if num_classes < 2:
        raise DataError(
            f"{source.uri}: --mask-values gives only {num_classes} class; a segmentation needs at least 2"
            f"{_alpha_hint(alpha()) if spec.mask_values else ''}"
        )
    names = spec.class_names or listing.class_names or [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"--class-names gives {len(names)} names for {num_classes} classes")
    return num_classes, names


def _input_channels(uri: str, spec: PrepareSpec, parts: list[ShardFingerprint]) -> int:
    """The model's input channels: --bands' count, else what every image gives (3 for grey and RGB, all
    bands for other images); images that differ are one DataError naming the counts and the fix."""
    if spec.bands:
        return len(spec.bands)
    seen: dict[int, int] = {}
    example: dict[int, str] = {}
    for part in parts:
        for count, n in part.channels.items():
            seen[count] = seen.get(count, 0) + n
            example.setdefault(count, part.channel_example[count])
    if len(seen) <= 1:
        return next(iter(seen), 3)
    found = "; ".join(f"{c} channels: {n} images (e.g. {example[c]})" for c, n in sorted(seen.items()))
    raise DataError(
        f"{uri}: the images do not give the model the same channels ({found}); grey and RGB images give 3, "
        "others all their bands: pick the same bands from every image with --bands, e.g. --bands 1,2,3"
    )


def _masks_palette(root: storage.Location, pairs: list[Pair], num_classes: int) -> list[list[int]] | None:
    """The palette of the first valid pair's mask when it is a palette PNG whose indices are the class ids
    (no mapping given): the annotation tool's colours for `show` and `report`. One header read."""
    first = next((p.mask for p in pairs if not p.problem and p.mask), None)
    if first is None:
        return None
    try:
        return masks.own_palette(_read(root, first), num_classes)
    except storage.StorageError:
        return None  # the default colours then: a palette is for people, not worth failing prepare


def _manifest(
    spec: PrepareSpec,
    listing: Listing,
    split_source: str,
    shards: list[dict[str, Any]],
    hists: dict[str, np.ndarray],
    invalid: list[Invalid],
    num_classes: int,
    names: list[str],
    encoding: masks.MaskEncoding,
    channels: int,
    turned: int,
    transparent: int,
) -> Manifest:
    """The manifest, but for its fingerprint and prepare's time (`prepare` adds them last)."""
    hist = sum(hists.values())
    labelled = hist[:num_classes].sum()
    return Manifest(
        format_version=FORMAT_VERSION,
        layout=spec.layout,
        source=storage.redact(spec.source),
        num_classes=num_classes,
        class_names=tuple(names),
        palette=tuple(tuple(c) for c in listing.palette or imaging.default_palette(num_classes)),
        ignore_index=classes.IGNORE_INDEX,
        mask_values={str(k): v for k, v in sorted(spec.mask_values.items())} if spec.mask_values else None,
        mask_threshold=spec.mask_threshold,
        mask_alpha=spec.mask_alpha,
        mask_zero=spec.mask_zero,
        mask_colors={",".join(map(str, c)): i for c, i in encoding.colors.items()} if encoding.colors else None,
        splits_from=split_source,
        no_val_fix=no_val_fix(listing),  # plan and train say it when val is empty: the layout knows the way
        no_train_fix=no_train_fix(listing),  # ... and when train is
        counts=Counts(**{s: sum(sh["rows"] for sh in shards if sh["split"] == s) for s in SPLITS}),
        pixel_frequency=tuple(float(hist[i] / labelled) if labelled else 0.0 for i in range(num_classes)),
        ignored_pixels=int(hist[classes.IGNORE_INDEX]),
        shards=tuple(Shard(**{k: s[k] for k in ("path", "split", "rows", "bytes", "sha256")}) for s in shards),
        content_hash=hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
        skipped=tuple(item.as_manifest() for item in invalid),
        created_by=f"raysegment {__version__}",
        bands=tuple(spec.bands) if spec.bands is not None else None,
        channels=channels,
        class_pixels={split: tuple(int(h[i]) for i in range(num_classes)) for split, h in hists.items()},
        exif_turned=turned,
        # Ignore pixels that were transparent, not 255: only they make --mask-alpha keep worth naming.
        transparent_ignored_pixels=transparent,
    )


def _checked_manifest(
    spec: PrepareSpec,
    source: storage.Location,
    listing: Listing,
    encoding: masks.MaskEncoding,
    pairs: list[Pair],
    split_source: str,
    shards: list[dict[str, Any]],
    hists: dict[str, np.ndarray],
    invalid: list[Invalid],
    fingerprints: list[ShardFingerprint],
    turned: list[str],
    transparent: list[int],
    shown: progress.Stage,
) -> Manifest:
    """After the shard tasks: the checks of the whole set (a DataError refuses it), then its manifest, but for
    prepare's time, with its warnings said. Closes `shown` once the checks pass, or with every pair counted
    invalid when the mask values refuse them all: its last line must not say "invalid 0" of refused pairs."""
    hist = sum(hists.values())
    invalid.sort(key=lambda i: i.key)
    if invalid and not spec.skip_invalid:
        raw = [int(v) for v in np.nonzero(hist)[0]] if listing.lut is None else None
        mapped = None if listing.lut is None else {v for v, c in enumerate(listing.lut) if c >= 0}
        raise DataError(_invalid_report(source.uri, invalid, raw, len(invalid) < len(pairs), mapped))
    if not shards:
        raise DataError(f"{source.uri}: no valid pairs to write ({len(invalid)} invalid)")
    channels = _input_channels(source.uri, spec, fingerprints)
    try:
        num_classes, names = _classes(spec, source, listing, hist, pairs)
    except MaskValuesError:
        # The values of every mask together are no class ids: each pair is refused, as the line counts.
        shown.close(invalid=len(invalid) + sum(s["rows"] for s in shards))
        raise
    shown.close()
    if listing.palette is None and not (encoding.colors or encoding.threshold is not None or spec.mask_values):
        listing = replace(listing, palette=_masks_palette(listing.root or source, pairs, num_classes))
    manifest = _manifest(
        spec,
        listing,
        split_source,
        shards,
        hists,
        invalid,
        num_classes,
        names,
        encoding,
        channels,
        len(turned),
        sum(transparent),
    )
    warnings = classes.manifest_warnings(manifest)
    for split, fix in (("val", no_val_fix), ("train", no_train_fix)):
        if not manifest.counts.of(split) and any(p.split == split and not p.problem for p in pairs):
            # Not said while listing: the split's pairs were all invalid, and --skip-invalid dropped them.
            n = sum(p.split == split for p in pairs)
            what = "its one pair was" if n == 1 else f"its {n} pairs were all"
            warnings.append(
                f"no pair is in the {split} split: {what} invalid and skipped ({split_source}); {fix(listing)}"
            )
    if turned:
        warnings.append(exif_warning(sorted(turned)))
    for warning in warnings:
        progress.warn(log, "prepare", warning)
    fingerprint = merge(fingerprints, num_classes, list(manifest.pixel_frequency or ()))
    for warning in (fingerprint.mixed_depth, fingerprint.mixed_range):
        if warning:
            progress.warn(log, "prepare", warning)
    return replace(manifest, fingerprint=fingerprint.to_json())


def prepare(spec: PrepareSpec) -> Manifest:
    """Run the prepare job and return the manifest (written last: it is the commit)."""
    t0 = time.time()
    # The deadline is fixed here, on the driver; the shard tasks get it with the Locations.
    source = storage.resolve(spec.source, spec.endpoint_url, spec.storage_retry_s)
    dest = storage.resolve(spec.dest, spec.endpoint_url, spec.storage_retry_s)
    storage.check_readable(source)
    listing, encoding, pairs, split_source = _list_pairs(spec, source)
    storage.check_writable(dest)
    # After SOURCE's refusals, which write nothing; DEST is checked under the lock (a prepare that committed
    # there while this one listed is refused without --overwrite).
    with RunLock(dest.child(PREPARE_LOCK), PREPARE_LOCK_STALE_S, purpose="prepare into this DEST"):
        _check_destination(spec, dest)
        logs.began()
        return _prepare_locked(spec, source, dest, listing, encoding, pairs, split_source, t0)


def _prepare_locked(
    spec: PrepareSpec,
    source: storage.Location,
    dest: storage.Location,
    listing: Listing,
    encoding: masks.MaskEncoding,
    pairs: list[Pair],
    split_source: str,
    t0: float,
) -> Manifest:
    invalid = [Invalid(p.key, Problem(p.problem)) for p in pairs if p.problem]
    plan = _plan_shards([p for p in pairs if not p.problem], int(spec.shard_size_mb * 2**20))
    log.info("prepare: %d pairs in %d shards (%d invalid while listing)", len(pairs), len(plan), len(invalid))
    fingerprints: list[ShardFingerprint] = []
    picked = imaging.Channels(tuple(spec.bands), None) if spec.bands else imaging.OWN
    turned: list[str] = []
    transparent: list[int] = []
    # This run's shards go to a folder of their own: an old data set at DEST stays whole until the commit.
    generation = _generation()
    # Closed by _checked_manifest, after the checks of the whole set.
    shown = progress.stage("prepare", sum(len(group) for _, group in plan), unit="pairs")
    try:
        shards, hists = _run_shard_tasks(
            source,
            dest,
            plan,
            listing,
            encoding,
            spec.skip_invalid,
            invalid,
            fingerprints,
            picked,
            turned,
            transparent,
            generation=generation,
            shown=shown,
        )
        manifest = _checked_manifest(
            spec,
            source,
            listing,
            encoding,
            pairs,
            split_source,
            shards,
            hists,
            invalid,
            fingerprints,
            turned,
            transparent,
            shown,
        )
    except DataError:
        shown.close()  # the pairs were all read; the error says why none is written
        _remove_generation(dest, generation)  # the data set DEST held, if any, is untouched
        raise
    except BaseException:
        shown.close(stopped=True)
        _remove_generation(dest, generation)
        raise
    manifest = replace(manifest, seconds=round(time.time() - t0, 2))
    # The commit: the new data set replaces the old one whole. Outside the try: a failed write leaves this
    # run's shards, which the manifest may list after all (an S3 put that timed out); the next run removes them.
    write_manifest(dest, manifest)
    _remove_other_generations(dest, generation)
    log.info("prepared %s: %s, %d skipped", dest.uri, manifest.counts.to_json(), len(invalid))
    return manifest
