"""`prepare` on real Ray: shards and manifest, and a named report for bad pairs."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import write_source
from PIL import Image

from raysegment.config import PrepareSpec
from raysegment.data.prepare import prepare, read_manifest
from raysegment.errors import DataError


def test_prepare_writes_shards_and_manifest(ray_cluster, tmp_path):
    src = write_source(str(tmp_path / "src"), count=30)
    manifest = prepare(PrepareSpec(source=src, dest=str(tmp_path / "data"), shard_size_mb=0.01, val_fraction=0.25))
    assert manifest["num_classes"] == 4
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 30
    assert manifest["counts"]["val"] > 0
    assert len(manifest["shards"]) > 2  # the small target size forces several shards
    rows = 0
    for shard in manifest["shards"]:
        table = pq.read_table(tmp_path / "data" / shard["path"])
        assert table.column_names == ["key", "image", "mask", "height", "width", "split"]
        assert set(table.column("split").to_pylist()) == {shard["split"]}
        assert os.path.getsize(tmp_path / "data" / shard["path"]) == shard["bytes"]
        rows += table.num_rows
    assert rows == 30
    assert abs(sum(manifest["pixel_frequency"]) - 1) < 1e-6
    _, again = read_manifest(str(tmp_path / "data"))
    assert again["content_hash"] == manifest["content_hash"]
    with pytest.raises(DataError, match="already exists"):
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "data")))


def test_prepare_reports_bad_pairs_and_writes_nothing(ray_cluster, tmp_path):
    src = write_source(str(tmp_path / "src"), count=6)
    os.remove(tmp_path / "src" / "masks" / "00000.png")  # image without mask
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "src" / "masks" / "extra.png")  # mask without image
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "src" / "masks" / "00001.png")  # size mismatch
    (tmp_path / "src" / "images" / "00002.png").write_bytes(b"garbage")  # undecodable
    with pytest.raises(DataError) as err:
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "data"), num_classes=4))
    msg = str(err.value)
    for key, problem in [
        ("00000", "image without mask"),
        ("extra", "mask without image"),
        ("00001", "size mismatch"),
        ("00002", "undecodable"),
    ]:
        assert f"{key}: {problem}" in msg
    assert "4 invalid pairs" in msg
    assert not (tmp_path / "data" / "manifest.json").exists()
    assert not (tmp_path / "data" / "shards").exists() or not os.listdir(tmp_path / "data" / "shards")


def test_prepare_class_ids_out_of_range(ray_cluster, tmp_path):
    src = write_source(str(tmp_path / "src"), count=4)
    with pytest.raises(DataError, match="class ids out of range 0..1"):
        prepare(PrepareSpec(source=src, dest=str(tmp_path / "data"), num_classes=2))
