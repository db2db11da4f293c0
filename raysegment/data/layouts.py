"""Source layouts: find (key, image, mask) pairs, their classes and splits in a labelled data set.

Each layout returns a Listing: the pairs (with problems found while listing,
such as a missing mask), the classes when the layout fixes them, and the table
that maps raw mask values to class ids. Nothing here reads pixels: that is the
shard tasks' work, on the cluster. Only TIFF headers are read, to split stacks
(multi-page image + mask files) into one pair per slice (`expand_stacks`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import unicodedata
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from raysegment import storage
from raysegment.data import classes, tiff
from raysegment.data.imaging import IMAGE_EXTENSIONS
from raysegment.errors import ConfigError, DataError

SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.2

# What to do when no pair landed in val (a hash split of a few pairs can give none).
NO_VAL_FIX = "prepare again with --val-keys naming some pairs, a larger --val-fraction, or more pairs"
# ... and when none landed in train (one pair, or --val-keys naming every key).
NO_TRAIN_FIX = "put pairs in train: prepare again with fewer --val-keys, a smaller --val-fraction, or more pairs"


@dataclass(frozen=True)
class Pair:
    key: str
    image: str | None  # filesystem path, None when missing
    mask: str | None
    image_bytes: int = 0
    mask_bytes: int = 0
    split: str | None = None  # set by the layout's split files, else assigned later
    problem: str | None = None  # found while listing: missing file, duplicate key, ...
    page: int | None = None  # a slice of a multi-page TIFF stack (image and mask files both stacks)


@dataclass(frozen=True)
class Listing:
    pairs: list[Pair]
    class_names: list[str] | None = None  # None: from the spec or the masks
    palette: list[list[int]] | None = None
    # Raw mask value -> class id for all 256 byte values, -1 = not allowed; None = values are class ids as found.
    lut: list[int] | None = None
    unmapped: str = "class ids out of range"  # the problem text for values the table does not map
    split_source: str | None = None  # where the layout's own splits came from, None when it has none
    splits_off: str | None = None  # how to turn the layout's own splits off (for --val-keys), if one can
    root: storage.Location | None = None  # the store the pairs' paths are in, when not SOURCE (list layout)


def _files_by_key(
    loc: storage.Location, suffix: str = "", leave_out: storage.Location | None = None
) -> dict[str, list[tuple[str, int]]]:
    """Relative path without extension (and without `suffix`) -> [(path, size)] for image files below loc,
    through links to folders (local sources), leaving out the folder `leave_out` (a masks folder inside
    the images folder)."""
    found = _find(loc)
    suffix = unicodedata.normalize("NFC", suffix)
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    root = loc.path.rstrip("/") + "/"
    skip = posixpath.normpath(leave_out.path) if leave_out else None
    for path, size in found.items():
        rel = path[len(root) :] if path.startswith(root) else path
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files: .DS_Store, macOS ._resource forks, editor droppings
        if skip and storage.within(posixpath.normpath(path), skip):
            continue
        # NFC: macOS writes names decomposed (NFD), so an image and its mask named alike by two tools
        # may differ only in Unicode form, and must still pair (and a typed suffix must still match).
        stem, ext = posixpath.splitext(unicodedata.normalize("NFC", rel))
        if ext.lower() not in IMAGE_EXTENSIONS or not stem.endswith(suffix):
            continue
        key = stem[: len(stem) - len(suffix)] if suffix else stem
        out[key].append((path, size))
    return out


def _find(loc: storage.Location, chain: tuple[str, ...] = ()) -> dict[str, int]:
    """Path -> size of every file below loc. A local link to a folder is followed like a link to a file
    (data sets are often assembled from links into shared storage, and SOURCE is the user's own data),
    its files listed under the link's path, unless it leads back to a folder it is in (a cycle)."""
    found = loc.call(lambda: loc.fs.find(loc.path, detail=True))
    files = {path: int(info.get("size") or 0) for path, info in found.items()}
    if loc.remote:
        return files
    chain = (*chain, os.path.realpath(loc.path))
    for path, info in found.items():
        if not (info.get("islink") and os.path.isdir(path)):
            continue
        del files[path]
        target = os.path.realpath(path)
        if any(storage.within(real, target) for real in (*chain, os.path.realpath(posixpath.dirname(path)))):
            continue  # a link to a folder it is in: following it would never end
        files.update(_find(storage.Location(path, loc.fs, path, retry_s=loc.retry_s), chain))
    return files


def _is_below(inner: storage.Location, outer: storage.Location) -> bool:
    """Whether `inner` is a folder inside `outer` (local paths, or keys in one store)."""
    a, b = posixpath.normpath(inner.path), posixpath.normpath(outer.path)
    return inner.fs is outer.fs and a != b and storage.within(a, b)


def _require_dir(loc: storage.Location, fix: str) -> None:
    if not loc.call(lambda: loc.fs.isdir(loc.path)):
        raise DataError(f"{loc.uri}: folder not found; {fix}")


def _pair(
    key: str,
    images: dict[str, list[tuple[str, int]]],
    masks: dict[str, list[tuple[str, int]]],
    split: str | None = None,
) -> Pair:
    """One pair from the two listings, with the listing problem if it is incomplete or ambiguous."""
    img, msk = images.get(key, []), masks.get(key, [])
    problem = None
    if not img:
        problem = "mask without image"
    elif not msk:
        problem = "image without mask"
    elif len(img) > 1 or len(msk) > 1:
        many = img if len(img) > 1 else msk
        problem = "several files for one key: " + ", ".join(posixpath.basename(p) for p, _ in many)
    image, mask = img[0][0] if img else None, msk[0][0] if msk else None
    (key, ok_key), (image, ok_image), (mask, ok_mask) = (
        storage.utf8_name(p) if p else (p, True) for p in (key, image, mask)
    )
    if not (ok_key and ok_image and ok_mask):
        problem = storage.NOT_UTF8
    return Pair(key, image, mask, img[0][1] if img else 0, msk[0][1] if msk else 0, split, problem)


def pairs_layout(
    source: storage.Location,
    images_dir: str = "images",
    masks_dir: str = "masks",
    mask_values: dict[int, int] | None = None,
    num_classes: int | None = None,
    mask_suffix: str = "",
) -> Listing:
    """Match images and masks by relative path and stem (extensions may differ); a mask's stem may carry
    `mask_suffix` (a_mask.png for a.png), which its key drops."""
    fix = "check SOURCE and --images-dir/--masks-dir"
    images_loc, masks_loc = source.child(images_dir), source.child(masks_dir)
    _require_dir(images_loc, fix)
    _require_dir(masks_loc, fix)
    # A masks folder inside the images folder (`--images-dir . --masks-dir masks`) holds no images; and
    # the other way round.
    images = _files_by_key(images_loc, leave_out=masks_loc if _is_below(masks_loc, images_loc) else None)
    masks = _files_by_key(masks_loc, mask_suffix, images_loc if _is_below(images_loc, masks_loc) else None)
    if not images:
        raise DataError(f"{source.child(images_dir).uri}: no image files found ({', '.join(IMAGE_EXTENSIONS)})")
    pairs = [_pair(k, images, masks) for k in sorted(set(images) | set(masks))]
    if hint := _suffix_hint([k for k in masks if k not in images], images):
        pairs = [replace(p, problem=f"{p.problem} ({hint})") if p.problem == "mask without image" else p for p in pairs]
    return _with_value_table(Listing(_case_hints(pairs)), mask_values, num_classes)


def _case_hints(pairs: list[Pair]) -> list[Pair]:
    """A lone image and a lone mask whose keys differ only in case (`Case.png` + `case.png`: one file on
    Windows and macOS, two here) are each named with the other."""
    lone = defaultdict(list)
    for p in pairs:
        if p.problem in ("mask without image", "image without mask"):
            lone[p.key.casefold()].append(p)
    named = {}
    for group in lone.values():
        if {p.problem for p in group} == {"mask without image", "image without mask"}:
            for p in group:
                others = ", ".join(repr(o.key) for o in group if o is not p)
                named[p.key] = f"{p.problem} (its name differs only in case from {others}: rename one to match)"
    return [replace(p, problem=named[p.key]) if p.key in named else p for p in pairs]


def _suffix_hint(lone_masks: list[str], images: dict[str, Any]) -> str | None:
    """'masks look named NAME_mask: pass --mask-suffix _mask' when most masks without an image would pair
    once a common suffix (after the last _, - or .) is dropped."""
    found: dict[str, int] = defaultdict(int)
    for key in lone_masks:
        cut = max(key.rfind(sep) for sep in "_-.")
        if cut > key.rfind("/") + 1 and key[:cut] in images:
            found[key[cut:]] += 1
    if not found:
        return None
    suffix, count = max(found.items(), key=lambda kv: kv[1])
    if count * 2 < len(lone_masks):
        return None
    return f"masks look named NAME{suffix}: pass --mask-suffix {suffix}"


def _with_value_table(listing: Listing, mask_values: dict[int, int] | None, num_classes: int | None) -> Listing:
    """The listing with the raw value -> class id table of --mask-values or --num-classes, if given."""
    if mask_values:
        lut = [-1] * (256 if max(mask_values) <= 255 else 65536)  # a 16-bit mask's values need the long table
        for raw, cid in mask_values.items():
            lut[raw] = cid
        return replace(listing, lut=lut, unmapped="mask values not in --mask-values")
    if num_classes:
        return replace(
            listing, lut=classes.identity_lut(num_classes), unmapped=f"class ids out of range 0..{num_classes - 1}"
        )
    return listing


def _read_keys(loc: storage.Location) -> list[str]:
    text = storage.read_bytes(loc).decode("utf-8-sig", errors="replace")  # Notepad and Excel write a BOM
    return [line.strip() for line in text.splitlines() if line.strip()]


VOC_SETS = "ImageSets/Segmentation"


def _voc_split_files(sets: storage.Location) -> dict[str, list[str]]:
    """The keys of each of ImageSets/Segmentation/{train,val,trainval}.txt that exists."""
    files = {name: sets.child(f"{name}.txt") for name in (*SPLITS, "trainval")}
    return {name: _read_keys(loc) for name, loc in files.items() if storage.exists(loc)}


def _voc_split_pairs(files: dict[str, list[str]], images: dict, masks: dict) -> list[Pair]:
    """The pairs of split files that include val.txt, each in its split (train.txt, else trainval.txt
    less val.txt, is train)."""
    val = files["val"]
    if "train" in files:
        train = files["train"]
    else:
        held_out = set(val)  # once: a set built per key made 100k keys take minutes
        train = [k for k in files.get("trainval", []) if k not in held_out]
    listed: dict[str, list[str]] = {}
    for split, keys in (("train", train), ("val", val)):
        for key in dict.fromkeys(keys):  # a key twice in one file is listed once
            listed.setdefault(key, []).append(split)
    pairs = []
    for key in sorted(listed):
        pair = _pair(key, images, masks, listed[key][-1])
        if len(listed[key]) > 1:
            pair = replace(pair, problem="listed in both train.txt and val.txt")
        pairs.append(pair)
    return pairs


def voc_layout(source: storage.Location) -> Listing:
    """PASCAL VOC 2012: JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/{train,val}.txt.

    val.txt makes the split files the splits. Without it (custom exports often write only train.txt or
    trainval.txt) the files only name the pairs, and --val-keys/--val-fraction split them; without any
    split file, every SegmentationClass mask is a pair."""
    fix = "point SOURCE at the VOC2012 folder (the one holding JPEGImages/, SegmentationClass/, ImageSets/)"
    _require_dir(source.child("JPEGImages"), fix)
    _require_dir(source.child("SegmentationClass"), fix)
    images = _files_by_key(source.child("JPEGImages"))
    masks = _files_by_key(source.child("SegmentationClass"))
    sets = source.child(*VOC_SETS.split("/"))
    files = _voc_split_files(sets)
    split_source = None
    if "val" in files:
        pairs = _voc_split_pairs(files, images, masks)
        split_source = f"{VOC_SETS}/{{{'train' if 'train' in files else 'trainval'},val}}.txt"
    elif files:
        pairs = [_pair(k, images, masks) for k in sorted({k for keys in files.values() for k in keys})]
    else:
        # Without split files every segmentation mask is a pair; most JPEGs have none, which is normal in VOC.
        pairs = [_pair(k, images, masks) for k in sorted(masks)]
    if not pairs:
        raise DataError(f"{source.uri}: no segmentation masks in SegmentationClass/ nor keys in {sets.uri}")
    return Listing(
        pairs,
        class_names=list(classes.VOC_CLASSES),
        palette=[list(c) for c in classes.VOC_PALETTE],
        lut=classes.identity_lut(len(classes.VOC_CLASSES)),
        unmapped=f"class ids out of range 0..{len(classes.VOC_CLASSES) - 1}",
        split_source=split_source,
        splits_off=f"move {VOC_SETS}/val.txt away" if split_source else None,
    )


def cityscapes_layout(source: storage.Location) -> Listing:
    """Cityscapes: leftImg8bit/{split}/{city}/*_leftImg8bit.png with gtFine/{split}/{city}/*_gtFine_labelIds.png."""
    fix = "point SOURCE at the Cityscapes root (the one holding leftImg8bit/ and gtFine/)"
    _require_dir(source.child("leftImg8bit"), fix)
    _require_dir(source.child("gtFine"), fix)
    pairs: list[Pair] = []
    # The public test split has no fine labels, so only train and val are data.
    for split in SPLITS:
        img_loc, gt_loc = source.child("leftImg8bit", split), source.child("gtFine", split)
        if not (storage.exists(img_loc) or storage.exists(gt_loc)):
            continue
        images = _files_by_key(img_loc, "_leftImg8bit") if storage.exists(img_loc) else {}
        masks = _files_by_key(gt_loc, "_gtFine_labelIds") if storage.exists(gt_loc) else {}
        pairs += [_pair(k, images, masks, split) for k in sorted(set(images) | set(masks))]
    if not pairs:
        raise DataError(f"{source.uri}: no leftImg8bit/{{train,val}}/*/*_leftImg8bit.png files; {fix}")
    return Listing(
        pairs,
        class_names=list(classes.CITYSCAPES_CLASSES),
        palette=[list(c) for c in classes.CITYSCAPES_PALETTE],
        lut=classes.cityscapes_lut(),
        split_source="leftImg8bit/{train,val}",
    )


def list_source(
    source: storage.Location,
    layout: str,
    images_dir: str | None = None,
    masks_dir: str | None = None,
    mask_values: dict[int, int] | None = None,
    num_classes: int | None = None,
    mask_suffix: str = "",
) -> Listing:
    """The pairs, classes and splits of a source in the given layout (TIFF stacks: one pair per slice)."""
    if layout == "voc":
        listing = voc_layout(source)
    elif layout == "cityscapes":
        listing = cityscapes_layout(source)
    elif layout == "list":
        from raysegment.data.pairlist import list_layout  # it builds this module's Pairs

        listing = _with_value_table(list_layout(source), mask_values, num_classes)
    else:
        listing = pairs_layout(
            source,
            "images" if images_dir is None else images_dir,  # "" or ".": SOURCE itself
            "masks" if masks_dir is None else masks_dir,
            mask_values,
            num_classes,
            mask_suffix,
        )
    return expand_stacks(listing, listing.root or source)


# TIFF headers read at once while listing: on S3 each is a round trip, not bandwidth.
HEADERS_IN_FLIGHT = 16
# Reads of a TIFF's page headers (a few hundred bytes each, spread through the file): small blocks, so
# counting a stack's pages on S3 does not fetch its pixels (s3fs reads 50 MB blocks by default).
HEADER_BLOCK = 64 * 1024


def _slices(root: storage.Location, path: str) -> int | str:
    """A TIFF's slice count, or why it cannot be read (the pair's problem)."""

    def opened():
        return root.fs.open(path, "rb", block_size=HEADER_BLOCK, cache_type="readahead")

    try:
        return root.call(lambda: tiff.count_pages(opened))
    except tiff.TiffError as exc:
        return f"{posixpath.basename(path)}: {exc}"


def expand_stacks(listing: Listing, root: storage.Location) -> Listing:
    """Each pair whose image and mask are multi-page TIFFs with one page per slice becomes one pair per
    slice (`{key}/{page:04d}`, sizes shared out for shard planning); page counts that differ make the
    pair invalid, naming both files. Only TIFF headers are read (a few requests each)."""
    files = sorted({p for pair in listing.pairs if not pair.problem for p in (pair.image, pair.mask) if p})
    files = [p for p in files if tiff.is_tiff_name(p)]
    if not files:
        return listing
    with ThreadPoolExecutor(min(HEADERS_IN_FLIGHT, len(files))) as pool:
        slices = dict(zip(files, pool.map(lambda p: _slices(root, p), files)))
    pairs: list[Pair] = []
    for pair in listing.pairs:
        if pair.problem or not pair.image or not pair.mask:
            pairs.append(pair)
            continue
        n_img, n_mask = slices.get(pair.image, 1), slices.get(pair.mask, 1)
        if isinstance(n_img, str) or isinstance(n_mask, str):
            pairs.append(replace(pair, problem=n_img if isinstance(n_img, str) else str(n_mask)))
        elif n_img != n_mask:
            pairs.append(replace(pair, problem=_page_mismatch(pair, n_img, n_mask)))
        elif n_img == 1:
            pairs.append(pair)
        else:
            share = (pair.image_bytes // n_img, pair.mask_bytes // n_img)
            pairs += [
                replace(pair, key=tiff.page_key(pair.key, i, n_img), image_bytes=share[0], mask_bytes=share[1], page=i)
                for i in range(n_img)
            ]
    return replace(listing, pairs=_mark_repeated_keys(pairs))


def _page_mismatch(pair: Pair, images: int, masks: int) -> str:
    assert pair.image and pair.mask
    return (
        f"image {posixpath.basename(pair.image)} has {images} page{'s' * (images != 1)} but mask "
        f"{posixpath.basename(pair.mask)} has {masks}: a TIFF stack needs one mask page per image page"
        + (
            "; or, if the image is one picture of several bands, it was saved as pages (tifffile writes an "
            "(H, W, bands) array so without photometric='minisblack', planarconfig='contig')"
            if masks == 1
            else ""
        )
    )


def _mark_repeated_keys(pairs: list[Pair]) -> list[Pair]:
    """A slice key that another file already has (`vol.tif` page 3 beside `vol/0003.png`) is a problem for both."""
    seen: dict[str, int] = defaultdict(int)
    for pair in pairs:
        seen[pair.key] += 1
    if all(n == 1 for n in seen.values()):
        return pairs
    problem = "two inputs have this key: a stack's slice and a file in a folder named like the stack"
    return [replace(p, problem=p.problem or problem) if seen[p.key] > 1 else p for p in pairs]


def no_val_fix(listing: Listing) -> str:
    """What to do when no pair is in val: a flag where the splits are ours, else the layout's own way."""
    if not listing.split_source:
        return NO_VAL_FIX
    off = f", or {listing.splits_off} to split them by --val-keys or --val-fraction" if listing.splits_off else ""
    return f"put some pairs in val in {listing.split_source}{off}"


def no_train_fix(listing: Listing) -> str:
    """What to do when no pair is in train: the flags where the splits are ours, else the layout's own way."""
    if not listing.split_source:
        return NO_TRAIN_FIX
    off = f", or {listing.splits_off} to split them by --val-keys or --val-fraction" if listing.splits_off else ""
    return f"put some pairs in train in {listing.split_source}{off}"


def assign_split(key: str, val_fraction: float, seed: int) -> str:
    """Seeded key-hash split: stable for a key when other images are added or removed."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def read_val_keys(value: str | list[str], endpoint_url: str | None = None, retry_s: float | None = None) -> list[str]:
    """--val-keys: a list, a comma-separated string, or a file (path or URI) of keys, one per line."""
    if isinstance(value, list):
        return [k.strip() for k in value if k.strip()]
    if "://" in value:
        loc = storage.resolve(value, endpoint_url, retry_s)
        if not storage.exists(loc):
            raise ConfigError(f"--val-keys {value}: file not found; give an existing file of keys or a comma list")
        return _read_keys(loc)
    if "," not in value and os.path.isfile(os.path.expanduser(value)):
        return _read_keys(storage.resolve(value))
    return [k.strip() for k in value.split(",") if k.strip()]


def assign_splits(
    listing: Listing,
    layout: str,
    val_keys: list[str] | None,
    val_fraction: float | None,
    seed: int,
) -> tuple[list[Pair], str]:
    """Every pair with its split, and a line saying where the splits came from."""
    if listing.split_source:
        if val_keys is not None or val_fraction is not None:
            off = f", or {listing.splits_off} to split by them" if listing.splits_off else ""
            raise ConfigError(
                f"the {layout} source has its own splits ({listing.split_source}); drop --val-keys/--val-fraction{off}"
            )
        return listing.pairs, listing.split_source
    if val_keys is not None:
        # Compared in NFC on both sides: a key typed on one system names a file written by another.
        wanted = {unicodedata.normalize("NFC", k) for k in val_keys}
        keys = [unicodedata.normalize("NFC", p.key) for p in listing.pairs]
        # A multi-page stack's name puts every page in val (its keys are NAME/0000 ...): neighbouring slices
        # on both sides of the split would let val score what training saw.
        pages = {k: k.rsplit("/", 1)[0] for k, p in zip(keys, listing.pairs) if p.page is not None}
        named_stacks = wanted & set(pages.values())
        wanted |= {k for k, stack in pages.items() if stack in named_stacks}
        # An entry ending in / names a folder: data sets shipped as train/ and validation/ folders split by them.
        folders = {k for k in wanted if k.endswith("/")}
        if folders:
            under = {k for k in keys if any(k.startswith(f) for f in folders)}
            folders -= {f for f in folders if any(k.startswith(f) for k in under)}  # the empty ones stay missing
            wanted = (wanted - {k for k in wanted if k.endswith("/")}) | under | folders
        missing = sorted(wanted - named_stacks - set(keys))
        if missing:
            shown = ", ".join(missing[:20]) + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else "")
            raise ConfigError(
                f"--val-keys names {len(missing)} keys not in the source: {shown}; keys are paths without extension "
                "(a folder of keys ends in /)"
            )
        pairs = [replace(p, split="val" if k in wanted else "train") for k, p in zip(keys, listing.pairs)]
        return pairs, f"--val-keys ({len(wanted - named_stacks)} keys)"
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    pairs = [replace(p, split=assign_split(p.key, fraction, seed)) for p in listing.pairs]
    return pairs, f"key hash, val_fraction {fraction}, seed {seed}"
