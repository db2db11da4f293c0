"""The `list` layout (#19 item 3): a CSV or Parquet of image,mask[,split] URIs, local or on S3."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysegment import storage
from raysegment.config import PrepareSpec, load_spec
from raysegment.data import imaging
from raysegment.data.layouts import list_source
from raysegment.data.manifest import Manifest
from raysegment.data.prepare import prepare
from raysegment.errors import ConfigError, DataError

H, W = 16, 16


def _pair_files(root, rel_image: str, rel_mask: str, seed: int) -> np.ndarray:
    """An image and a class-id mask (0..2) at the given paths below root; returns the ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 3, (H, W)).astype(np.uint8)
    for rel, arr in ((rel_image, rng.integers(0, 255, (H, W, 3), dtype=np.uint8)), (rel_mask, ids)):
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        Image.fromarray(arr).save(os.path.join(root, rel))
    return ids


def _catalogue(root) -> dict[str, np.ndarray]:
    """Images in two folders below imgs/, masks elsewhere with other names: key -> ids."""
    return {
        "cams/a/0001": _pair_files(root, "imgs/cams/a/0001.png", "labels/0001_a.png", 1),
        "cams/a/0002": _pair_files(root, "imgs/cams/a/0002.jpg", "labels/0002_a.png", 2),
        "cams/b/0001": _pair_files(root, "imgs/cams/b/0001.png", "labels/b/0001.png", 3),
        "scans/x": _pair_files(root, "imgs/scans/x.png", "labels/x.png", 4),
    }


ROWS = [
    ("imgs/cams/a/0001.png", "labels/0001_a.png", "train"),
    ("imgs/cams/a/0002.jpg", "labels/0002_a.png", "train"),
    ("imgs/cams/b/0001.png", "labels/b/0001.png", "val"),
    ("imgs/scans/x.png", "labels/x.png", "train"),
]


def _csv(rows, header: str = "image,mask,split") -> str:
    return header + "\n" + "".join(",".join(r) + "\n" for r in rows)


def test_keys_paths_and_splits_from_a_local_csv(tmp_path):
    _catalogue(tmp_path)
    (tmp_path / "pairs.csv").write_text(_csv(ROWS))
    listing = list_source(storage.resolve(str(tmp_path / "pairs.csv")), "list")
    assert [(p.key, p.split, p.problem) for p in listing.pairs] == [
        ("cams/a/0001", "train", None),
        ("cams/a/0002", "train", None),
        ("cams/b/0001", "val", None),
        ("scans/x", "train", None),
    ]
    assert listing.pairs[1].image == str(tmp_path / "imgs/cams/a/0002.jpg")
    assert listing.pairs[1].image_bytes == os.path.getsize(tmp_path / "imgs/cams/a/0002.jpg")
    assert listing.split_source == "the list's split column"


def test_list_errors_name_the_rows(tmp_path):
    _catalogue(tmp_path)
    lst = tmp_path / "pairs.csv"

    def listing(text: str):
        lst.write_text(text)
        return list_source(storage.resolve(str(lst)), "list")

    # The same key twice (x.png and x.jpg in one folder): one error naming both lines.
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "imgs/scans/x.jpg")
    with pytest.raises(
        DataError, match=r"line 5 \(imgs/scans/x.png\) and line 6 \(imgs/scans/x.jpg\) .*same key 'scans/x'"
    ):
        listing(_csv([*ROWS, ("imgs/scans/x.jpg", "labels/x.png", "val")]))
    with pytest.raises(DataError, match="line 3 has split 'test'; the split column holds train or val"):
        listing(_csv([ROWS[0], (ROWS[1][0], ROWS[1][1], "test")]))
    with pytest.raises(DataError, match=r"columns image,mask\[,split\].*missing \['mask'\]"):
        listing("image,label\na.png,b.png\n")
    with pytest.raises(DataError, match="mixes stores"):
        listing(_csv([ROWS[0], ("s3://bucket/i.png", "s3://bucket/m.png", "train")]))
    # A missing file is a bad pair (reported with the others), not a listing failure.
    pairs = listing(_csv([ROWS[0], ("imgs/nope.png", "labels/x.png", "train")], header="image,mask,split")).pairs
    assert [p.problem for p in pairs] == [None, "image not found: imgs/nope.png"]
    # A list saved by Excel on Windows: split values in any case and padded are read; a backslash path is
    # named as such (here it is part of a file name).
    excel = [(ROWS[0][0], ROWS[0][1], " Train"), ("imgs\\scans\\x.png", ROWS[1][1], "VAL")]
    pairs = listing(_csv(excel)).pairs
    assert [p.split for p in pairs] == ["train", "val"]
    assert (
        pairs[1].problem
        == "image not found: imgs\\scans\\x.png; write paths with / (\\ is not a folder separator here)"
    )
    with pytest.raises(ConfigError, match="--images-dir/--masks-dir do not apply to --layout list"):
        load_spec(PrepareSpec, None, {"source": "l.csv", "dest": "d", "layout": "list", "images_dir": "x"})


def _upload_tree(local, remote: storage.Location) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.upload_file(str(path), remote.child(str(path.relative_to(local))))


def _read_back(loc: storage.Location, manifest: Manifest) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for shard in manifest.shards:
        table = pq.read_table(io.BytesIO(storage.read_bytes(loc.child(shard.path))))
        for row in table.to_pylist():
            out[row["key"]] = (row["split"], imaging.decode_mask(row["mask"]))
    return out


@pytest.mark.s3
def test_list_layout_on_s3(ray_cluster, s3_prefix, tmp_path):
    """A CSV list on S3 with relative paths and splits, and a local Parquet list of absolute s3:// URIs:
    both prepare, keys and splits as listed, class ids exact."""
    local = tmp_path / "catalogue"
    expected = _catalogue(local)
    (local / "lists").mkdir()
    (local / "lists" / "pairs.csv").write_text(_csv([(f"../{i}", f"../{m}", s) for i, m, s in ROWS]))
    remote = storage.resolve(f"{s3_prefix}/catalogue")
    _upload_tree(local, remote)

    dest = storage.resolve(f"{s3_prefix}/data")
    manifest = prepare(PrepareSpec(source=f"{remote.uri}/lists/pairs.csv", dest=dest.uri, layout="list"))
    assert manifest.layout == "list" and manifest.counts.to_json() == {"train": 3, "val": 1}
    assert manifest.splits_from == "the list's split column"
    got = _read_back(dest, manifest)
    assert {k: s for k, (s, _) in got.items()} == {k: s for k, (_, _, s) in zip(expected, ROWS)}
    for key, ids in expected.items():
        np.testing.assert_array_equal(got[key][1], ids, err_msg=key)

    # Parquet, no split column (hash split), URIs absolute: the list's own place does not matter.
    table = pa.table(
        {"image": [f"{remote.uri}/{i}" for i, _, _ in ROWS], "mask": [f"{remote.uri}/{m}" for _, m, _ in ROWS]}
    )
    pq.write_table(table, tmp_path / "pairs.parquet")
    dest2 = storage.resolve(f"{s3_prefix}/data2")
    manifest = prepare(
        PrepareSpec(source=str(tmp_path / "pairs.parquet"), dest=dest2.uri, layout="list", val_keys="scans/x")
    )
    assert manifest.counts.to_json() == {"train": 3, "val": 1}
    got = _read_back(dest2, manifest)
    assert got["scans/x"][0] == "val" and set(got) == set(expected)
    for key, ids in expected.items():
        np.testing.assert_array_equal(got[key][1], ids, err_msg=key)
