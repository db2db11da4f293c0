"""The ISBI 2012 EM membrane set (30 slices, 512x512, labels 0 = membrane / 255 = cell) through `prepare`.

It lives outside the repo (<repo>/../shared/datasets/isbi2012-membrane); without it these tests skip.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysegment.config import PrepareSpec
from raysegment.data import imaging
from raysegment.data.examples import Augmentation, decode_for_training
from raysegment.data.prepare import prepare
from raysegment.errors import DataError

ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "isbi2012-membrane"
VAL = [str(k) for k in range(24, 30)]


@pytest.fixture(scope="module")
def isbi() -> Path:
    if not (ISBI / "image").is_dir() or not (ISBI / "label").is_dir():
        pytest.skip(f"ISBI 2012 membrane set not found at {ISBI}")
    return ISBI


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysegment.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_isbi_prepare_cli_and_data_info(ray_cluster, isbi, tmp_path):
    data = tmp_path / "isbi-data"
    proc = cli(
        "prepare", str(isbi), str(data), "--layout", "pairs", "--images-dir", "image", "--masks-dir", "label",
        "--mask-values", "0:0,255:1", "--val-keys", ",".join(VAL), "--class-names", "membrane,cell",
        env=ray_cluster.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 24, "val": 6}
    assert manifest["class_names"] == ["membrane", "cell"] and manifest["num_classes"] == 2
    assert manifest["mask_values"] == {"0": 0, "255": 1} and manifest["skipped"] == []
    membrane, cell = manifest["pixel_frequency"]
    assert 0.1 < membrane < 0.4 and membrane + cell == pytest.approx(1.0)  # membranes are the thin minority

    tables = {s["path"]: pq.read_table(data / s["path"]) for s in manifest["shards"]}
    rows = {r["key"]: r for t in tables.values() for r in t.to_pylist()}
    assert sorted(k for k, r in rows.items() if r["split"] == "val") == VAL
    assert set(rows) == {str(k) for k in range(30)}
    for key in ("0", "24"):
        row = rows[key]
        assert row["image"] == (isbi / "image" / f"{key}.png").read_bytes()  # original bytes kept
        assert (row["height"], row["width"]) == (512, 512)
        label = imaging.decode_mask((isbi / "label" / f"{key}.png").read_bytes())
        assert (imaging.decode_mask(row["mask"]) == (label == 255)).all()

    # What the train loop gets: 128 px random crops with jitter, masks still only 0/1 (+255 padding).
    table = tables[next(p for p in tables if "train" in p)].slice(0, 4)
    batch = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in ("image", "mask")}
    out = decode_for_training(batch, 128, Augmentation(crop="random", scale_jitter=0.2, brightness=0.1))
    assert out["image"].shape == (4, 128, 128, 3) and set(np.unique(out["mask"])) <= {0, 1, 255}

    proc = cli("data-info", str(data), env=ray_cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train 24, val 6 (total 30)" in proc.stdout and "--val-keys (6 keys)" in proc.stdout
    assert "membrane" in proc.stdout and f"{100 * membrane:.2f}%" in proc.stdout


def test_isbi_without_mask_values_names_the_values_and_the_fix(ray_cluster, isbi, tmp_path):
    with pytest.raises(DataError, match=r"values \[0, 255\].*--mask-values 0:0,255:1") as err:
        prepare(PrepareSpec(source=str(isbi), dest=str(tmp_path / "d"), images_dir="image", masks_dir="label"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "d" / "manifest.json").exists()
