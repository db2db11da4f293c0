"""manifest.json as the typed `Manifest`: the same JSON out as in, earlier manifests read with their readers'
defaults, and a damaged one refused with one error naming the file (no Ray: crafted manifests)."""

from __future__ import annotations

import json

import pytest
from helpers import fingerprint
from helpers import manifest as crafted

from raysegment.data.fingerprint import Fingerprint
from raysegment.data.manifest import MANIFEST, Counts, Manifest, Shard, Skipped, read_manifest
from raysegment.errors import DataError

# The keys of the first manifests prepare wrote (format_version 1 from the start).
FIRST_KEYS = (
    "format_version",
    "layout",
    "source",
    "num_classes",
    "class_names",
    "palette",
    "ignore_index",
    "counts",
    "pixel_frequency",
    "shards",
    "content_hash",
    "created_by",
    "seconds",
)


def whole() -> dict:
    """Every key prepare writes, in its order, as json.loads gives them back."""
    return crafted(
        source="/data/src",
        mask_values={"0": 0, "255": 1},
        mask_threshold=None,
        mask_alpha="ignore",
        mask_zero="class",
        mask_colors=None,
        splits_from="--val-fraction 0.2 (key hash, seed 0)",
        no_val_fix="prepare again with --val-keys",
        no_train_fix="put pairs in train",
        pixel_frequency=[0.75, 0.25],
        ignored_pixels=12,
        skipped=[{"key": "a", "problem": "size mismatch"}],
        created_by="raysegment 0.1.0",
        bands=[1, 2, 3],
        channels=3,
        class_pixels={"train": [30, 10], "val": [3, 1]},
        exif_turned=1,
        transparent_ignored_pixels=4,
        fingerprint=fingerprint(shares=(0.75, 0.25)).to_json(),
        seconds=1.25,
    ).to_json()


def test_the_json_out_is_the_json_in_key_for_key_and_in_order():
    data = json.loads(json.dumps(whole()))
    m = Manifest.from_json(data)
    assert m.to_json() == data and list(m.to_json()) == list(data) == [f for f in Manifest.__dataclass_fields__]
    assert json.dumps(m.to_json(), indent=2) == json.dumps(data, indent=2)
    assert m.counts == Counts(train=50, val=5) and m.counts.total == 55 and m.counts.of("val") == 5
    assert m.shards[0] == Shard("shards/train-00000.parquet", "train", 50, 1, "0" * 64)
    assert m.skipped == (Skipped("a", "size mismatch"),) and m.palette[1] == (128, 0, 0)
    assert m.class_pixels == {"train": (30, 10), "val": (3, 1)} and m.bands == (1, 2, 3)
    assert Fingerprint.from_json(m.fingerprint) == fingerprint(shares=(0.75, 0.25))


def test_an_earlier_manifest_reads_with_the_readers_defaults(tmp_path):
    from raysegment.config import TrainSpec
    from raysegment.data.classes import manifest_warnings
    from raysegment.data.info import format_manifest
    from raysegment.train.config import check_labelled, model_input

    first = {k: v for k, v in whole().items() if k in FIRST_KEYS}
    (tmp_path / MANIFEST).write_text(json.dumps(first))
    _, m = read_manifest(str(tmp_path))
    assert (m.skipped, m.bands, m.channels, m.class_pixels, m.fingerprint) == ((), None, None, None, None)
    assert (m.exif_turned, m.transparent_ignored_pixels, m.ignored_pixels, m.no_val_fix) == (0, 0, None, None)
    card_input = model_input(TrainSpec(data="d", out="o"), m, None)
    assert manifest_warnings(m) == [] and card_input.channels == 3 and card_input.bands is None
    check_labelled(m, "d")
    shown = format_manifest("d", m)
    assert "channels      3\n" in shown and "splits from   ?" in shown and "skipped       0 invalid" in shown
    bare = {k: v for k, v in first.items() if k not in ("source", "created_by", "seconds", "pixel_frequency")}
    shown = format_manifest("d", Manifest.from_json(bare))
    assert "(format 1, ?)" in shown and "source        ?" in shown and "0.00%" in shown


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"layout": None}, "layout None is not a layout name"),
        ({"content_hash": 5}, "content_hash 5 is not a hash of the shards"),
        ({"ignore_index": 300}, "ignore_index 300 is not a mask value"),
        ({"pixel_frequency": [1.0]}, "pixel_frequency \\[1.0\\] is not 2 shares"),
        ({"skipped": ["a"]}, "skipped \\['a'\\] is not a list of inputs"),
        ({"class_pixels": {"train": "x"}}, "class_pixels .* is not pixel counts per split"),
        ({"channels": 0}, "channels 0 is not a channel count"),
        ({"counts": {"train": 50}}, "counts {.train.: 50} are not image counts per split"),
    ],
)
def test_a_damaged_manifest_is_one_error_naming_the_file(tmp_path, change, problem):
    (tmp_path / MANIFEST).write_text(json.dumps({**whole(), **change}))
    with pytest.raises(DataError, match=f"^{tmp_path}/manifest.json: {problem}.*: it was changed after prepare; run"):
        read_manifest(str(tmp_path))


def test_what_is_not_a_manifest_of_this_format_is_refused():
    with pytest.raises(DataError, match="^d/manifest.json: not a manifest \\(a JSON object\\)"):
        Manifest.from_json([1, 2], "d/manifest.json")
    with pytest.raises(DataError, match="^manifest.json: unsupported format_version 2$"):
        Manifest.from_json({**whole(), "format_version": 2})
    later = Manifest.from_json({**whole(), "a_later_key": 1})  # a key this version does not know is left out
    assert "a_later_key" not in later.to_json()
