"""Class definitions of the public layouts: PASCAL VOC 2012 and Cityscapes (fine, 19 train ids)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from raysegment.data.manifest import Manifest

IGNORE_INDEX = 255


def distinct_names(names: list[str]) -> bool:
    """Each name non-empty and used once: per-class IoU, class fractions and overlays are keyed by name,
    so a repeated one hid one class's figures behind the other's."""
    return len(set(names)) == len(names) and all(n.strip() for n in names)


def manifest_warnings(manifest: Manifest) -> list[str]:
    """`split_warnings` for a prepared data set's manifest (prepare, data-info, plan and train print them).
    A manifest from before `transparent_ignored_pixels` was kept reads as no transparent pixel."""
    return split_warnings(
        list(manifest.class_names),
        manifest.class_pixels,
        manifest.ignored_pixels or 0,
        manifest.transparent_ignored_pixels,
    )


def split_warnings(
    names: list[str], class_pixels: dict[str, Sequence[int]] | None, ignored: int = 0, transparent: int = 0
) -> list[str]:
    """Classes no mask labels, or that the split leaves unlearnable (pixels in val only) or unscored
    (none in val). `ignored`: the data set's ignore pixels; `transparent`: those that are ignore because
    their alpha was 0, named with --mask-alpha keep when they could be the missing class's (255 from a
    value mapping, or any pixel under --mask-alpha keep, is not: the flag would change nothing)."""
    if not class_pixels or "train" not in class_pixels or "val" not in class_pixels:
        return []  # a data set prepared before per-split counts were kept
    train, val = class_pixels["train"], class_pixels["val"]
    nowhere = [n for n, t, v in zip(names, train, val) if not t and not v]
    only_val = [n for n, t, v in zip(names, train, val) if v and not t]
    not_val = [n for n, t, v in zip(names, train, val) if t and not v]
    out = []
    if nowhere:
        total = sum(train) + sum(val) + ignored
        text = f"{_classes_have(nowhere)} no labelled pixel in any mask: the model cannot learn {_them(nowhere)}"
        if transparent and transparent >= 0.05 * total:
            # A label layer saved over a transparent background: its background read as unlabelled.
            text += (
                f"; {transparent / total:.0%} of the mask pixels are transparent (alpha 0), read as ignore: "
                "if transparent means that class, prepare again with --mask-alpha keep"
            )
        out.append(text)
    if only_val:
        its = "its" if len(only_val) == 1 else "their"
        out.append(
            f"{_classes_have(only_val)} pixels in val but none in train: the model cannot learn {_them(only_val)}; "
            f"put some of {its} images in train (--val-keys, --val-fraction or --seed) and prepare again"
        )
    if not_val:
        out.append(f"{_classes_have(not_val)} no pixels in val: val mIoU does not score {_them(not_val)}")
    return out


def _classes_have(names: list[str]) -> str:
    return f"class {names[0]} has" if len(names) == 1 else f"classes {', '.join(names)} have"


def _them(names: list[str]) -> str:
    return "it" if len(names) == 1 else "them"


VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

# The VOC devkit colour map (bit-interleaved class index); index 255 ("void", object borders) is drawn cream.
VOC_PALETTE = [
    [0, 0, 0],
    [128, 0, 0],
    [0, 128, 0],
    [128, 128, 0],
    [0, 0, 128],
    [128, 0, 128],
    [0, 128, 128],
    [128, 128, 128],
    [64, 0, 0],
    [192, 0, 0],
    [64, 128, 0],
    [192, 128, 0],
    [64, 0, 128],
    [192, 0, 128],
    [64, 128, 128],
    [192, 128, 128],
    [0, 64, 0],
    [128, 64, 0],
    [0, 192, 0],
    [128, 192, 0],
    [0, 64, 128],
]
VOC_VOID_COLOUR = [224, 224, 192]


class CityscapesLabel(NamedTuple):
    name: str
    id: int  # the value in *_gtFine_labelIds.png
    train_id: int  # 255 = not trained on (ignored)
    color: tuple[int, int, int]


# cityscapesScripts helpers/labels.py; 'license plate' (id -1) never appears in labelId images.
CITYSCAPES_LABELS = [
    CityscapesLabel("unlabeled", 0, 255, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, (119, 11, 32)),
]

_TRAINED = sorted((lab for lab in CITYSCAPES_LABELS if lab.train_id != IGNORE_INDEX), key=lambda lab: lab.train_id)
CITYSCAPES_CLASSES = [lab.name for lab in _TRAINED]
CITYSCAPES_PALETTE = [list(lab.color) for lab in _TRAINED]


def cityscapes_lut() -> list[int]:
    """labelId -> trainId for all 256 byte values; ids without a train id (and unknown ids) -> 255."""
    lut = [IGNORE_INDEX] * 256
    for lab in CITYSCAPES_LABELS:
        lut[lab.id] = lab.train_id
    return lut


def zero_ignore_lut(num_classes: int | None) -> list[int]:
    """Value 0 = unlabelled (ignore), value v = class v-1, 255 stays ignore: ADE20K's SceneParsing masks
    (mmsegmentation's reduce_zero_label). Without a class count every value up to 254 is allowed."""
    top = num_classes if num_classes else IGNORE_INDEX - 1
    lut = [-1] * 256
    lut[0] = lut[IGNORE_INDEX] = IGNORE_INDEX
    for v in range(1, top + 1):
        lut[v] = v - 1
    return lut


def identity_lut(num_classes: int) -> list[int]:
    """0..K-1 and 255 map to themselves; every other value is unmapped (-1)."""
    lut = [-1] * 256
    for i in range(num_classes):
        lut[i] = i
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut
