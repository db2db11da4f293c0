"""prepare -> train -> evaluate -> infer end to end on local Ray and the local filesystem."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import mask_size, write_infer_inputs

from raysegment.config import EvaluateSpec
from raysegment.evaluate import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_model):
    data, model = tiny_model
    root = Path(data).parent
    assert Path(model) == root / "model"
    return root, None


def test_train_writes_artifacts(trained):
    root, result = trained
    card = json.loads((root / "model" / "model.json").read_text())
    assert (root / "model" / "model.keras").stat().st_size > 0
    assert card["num_classes"] == 4 and card["input"]["size"] == [32, 32]
    assert card["model_id"].startswith("unet-") and len(card["model_sha256"]) == 64
    metrics = json.loads((root / "model" / "metrics.json").read_text())
    assert 0.0 <= metrics["best"]["val_mean_iou"] <= 1.0
    assert (root / "model" / "_SUCCESS").exists()


def test_evaluate_counts_every_val_pixel(trained):
    root, _ = trained
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    m = evaluate(EvaluateSpec(model=str(root / "model"), data=str(root / "data")))
    assert m["images"] == manifest["counts"]["val"]
    assert m["pixels"] == manifest["counts"]["val"] * 32 * 32
    assert 0 <= m["mean_iou"] <= 1 and 0 <= m["pixel_accuracy"] <= 1
    assert set(m["per_class_iou"]) == set(manifest["class_names"])
    # Every scored pixel is in one band of distance from a label edge, every error too.
    bands = m["errors_by_edge_distance"]
    assert sum(b["pixels"] for b in bands) == m["pixels"]
    cm = np.asarray(m["confusion_matrix"])
    assert sum(b["errors"] for b in bands) == cm.sum() - np.trace(cm)
    assert json.loads((root / "model" / "eval-val.json").read_text())["mean_iou"] == m["mean_iou"]
    tta = evaluate(EvaluateSpec(model=str(root / "model"), data=str(root / "data"), tta_flip=True, out=None))
    assert tta["tta_flip"] and tta["pixels"] == m["pixels"]  # same pixels, predicted twice and averaged


def test_every_val_image_reaches_a_worker_whatever_their_count(trained):
    """Ray Train splits val into equal shares and drops the remainder (one val image, two workers: no worker
    validated anything and every val metric read 0). Padded with ignore-only rows, the shares hold every
    labelled val pixel; unpadded, the same split loses some."""
    from concurrent.futures import ThreadPoolExecutor

    from raysegment import storage
    from raysegment.data.imaging import IGNORE_INDEX
    from raysegment.data.manifest import read_manifest
    from raysegment.data.pipeline import padded_for_workers, training_dataset

    root, _ = trained
    _, manifest = read_manifest(str(root / "data"))
    rows = manifest.counts.val
    workers = next(w for w in range(3, rows + 2) if rows % w)

    def labelled(ds) -> int:
        shares = ds.streaming_split(workers, equal=True)  # what DataConfig does; consumed together

        def count(it):
            return sum(int((b["mask"] != IGNORE_INDEX).sum()) for b in it.iter_batches(batch_format="numpy"))

        with ThreadPoolExecutor(workers) as pool:
            return sum(pool.map(count, shares))

    def val():
        return training_dataset(storage.resolve(str(root / "data")), manifest, "val", 32, augment=False)

    assert labelled(padded_for_workers(val(), rows, workers, 32, 3)) == rows * 32 * 32
    assert labelled(val()) < rows * 32 * 32


def test_a_shard_changed_after_prepare_is_refused(trained, tmp_path):
    """A train shard copied over the val one used to be scored as val (\"9/1 images\", under the original data
    set's hash); a shard's size and row count are the manifest's or the job stops naming it."""
    import shutil

    from raysegment.errors import DataError

    root, _ = trained
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    manifest = json.loads((data / "manifest.json").read_text())
    train, val = (next(s["path"] for s in manifest["shards"] if s["split"] == split) for split in ("train", "val"))
    shutil.copyfile(data / train, data / val)
    with pytest.raises(DataError, match=f"{val}: .* rows, but the manifest lists .*changed after prepare"):
        evaluate(EvaluateSpec(model=str(root / "model"), data=str(data), out=None))

    # Damaged in place (same size, bytes in the middle zeroed): PNG decoding did not notice (an image came
    # back with 8% of its pixels changed); the pages' checksums do.
    shutil.copyfile(root / "data" / val, data / val)
    whole = (data / val).read_bytes()
    middle = len(whole) // 2
    (data / val).write_bytes(whole[:middle] + bytes(64) + whole[middle + 64 :])
    with pytest.raises(DataError, match=f"{val}: damaged Parquet file .*CRC.*prepare"):
        evaluate(EvaluateSpec(model=str(root / "model"), data=str(data), out=None))


def test_a_hand_edited_or_damaged_manifest_is_one_error(trained, tmp_path):
    """Every reader goes through `read_manifest`; each of these was a KeyError or TypeError traceback in
    data-info, plan, train or evaluate (or a model of 0 classes, or a shard read from outside the data set)."""
    from raysegment.data.manifest import read_manifest
    from raysegment.errors import DataError

    root, _ = trained
    good = json.loads((root / "data" / "manifest.json").read_text())
    assert read_manifest(str(root / "data"))[1].to_json() == good
    train = next(i for i, s in enumerate(good["shards"]) if s["split"] == "train")

    def shard(**change):
        return [dict(s, **change) if i == train else s for i, s in enumerate(good["shards"])]

    for change, problem in [
        ({"num_classes": 0}, "num_classes 0 is not"),
        ({"num_classes": "4"}, "num_classes '4' is not"),
        ({"class_names": ["a", "b", "c"]}, "are not 4 names"),
        ({"class_names": ["a", "a", "b", "c"]}, "distinct, non-empty"),
        ({"palette": [[0, 0]] * 4}, "palette is not 4 R,G,B colours"),
        ({"counts": {"train": -5, "val": 1}}, "are not image counts"),
        ({"shards": None}, "lists no shards"),
        ({"shards": shard(path="../../elsewhere.parquet")}, "is not a path under shards/"),
        ({"shards": shard(rows=good["shards"][train]["rows"] + 1)}, "train shards hold"),
        ({"fingerprint": dict(good["fingerprint"], height="x")}, "its fingerprint is damaged"),
    ]:
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        (data / "manifest.json").write_text(json.dumps(dict(good, **change)))
        with pytest.raises(DataError, match=f"manifest.json: .*{problem}.*prepare` again"):
            read_manifest(str(data))
    (data / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not a manifest"):
        read_manifest(str(data))


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "raysegment.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_cli_infer_with_bad_files(trained, ray_cluster, tmp_path):
    root, _ = trained
    inputs = write_infer_inputs(str(tmp_path / "in"))
    out = tmp_path / "out"
    proc = cli("infer", str(root / "model"), str(tmp_path / "in"), str(out), "--batch-size", "2", env=ray_cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "inferred 6 images (3 ok, 3 errors; 0 already done)" in proc.stdout
    masks = sorted(
        os.path.relpath(p, out / "masks") for p in glob.glob(str(out / "masks" / "**" / "*.png"), recursive=True)
    )
    assert masks == ["a.png", "b.png", "nested/c.png"]
    for key, size in inputs["sizes"].items():
        assert mask_size(str(out / "masks" / f"{key}.png")) == size
    table = pq.read_table(str(out / "summaries")).to_pylist()
    assert sorted(r["key"] for r in table) == sorted(inputs["good"] + inputs["bad"])
    errors = {r["key"]: r["error"] for r in table if r["status"] == "error"}
    assert set(errors) == set(inputs["bad"]) and all(errors.values())
    assert "empty" in errors["empty"]
    for r in table:
        if r["status"] == "ok":
            assert abs(sum(r["class_fractions"]) - 1) < 1e-6 and 0 < r["mean_confidence"] <= 1
    assert (out / "_SUCCESS").exists()
    run = json.loads(next((out / "runs").iterdir()).read_text())
    assert run["counts"] == {"total": 6, "skipped": 0, "processed": 6, "ok": 3, "error": 3}


def test_cli_misspelled_config_field(tmp_path):
    spec = tmp_path / "train.yaml"
    spec.write_text("data: /nowhere\nout: /nowhere-out\nepoch: 3\n")
    proc = cli("train", "--config", str(spec))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown field 'epoch'" in lines[0] and str(spec) in lines[0]


def test_cli_missing_data_set_is_clear(tmp_path):
    (tmp_path / "model").mkdir()  # there, without a model in it (a path not there is "not found")
    proc = cli("evaluate", str(tmp_path / "model"), str(tmp_path / "data"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'model'}: not a trained model (needs model.keras and model.json); run `raysegment train`"
    ]


def test_evaluate_names_an_image_the_model_cannot_take(trained, tmp_path):
    """An RGB model on a data set of 5-band scenes (the wrong model for the data) ended in a Ray traceback,
    `height and width must be > 0`, exit 1: the error rows of images it could not decode were scored. The run
    now stops on the first one with its key and why."""
    import tifffile
    from PIL import Image

    from raysegment.config import PrepareSpec
    from raysegment.data.prepare import prepare
    from raysegment.errors import DataError

    root, _ = trained
    card = json.loads((root / "model" / "model.json").read_text())
    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (tmp_path / "src" / d).mkdir(parents=True)
    for i in range(4):
        scene = rng.integers(0, 255, (16, 16, 5), np.uint8)
        tifffile.imwrite(
            tmp_path / "src" / "images" / f"s{i}.tif", scene, photometric="minisblack", planarconfig="contig"
        )
        Image.fromarray(rng.integers(0, 4, (16, 16), np.uint8)).save(tmp_path / "src" / "masks" / f"s{i}.png")
    spec = PrepareSpec(
        source=str(tmp_path / "src"), dest=str(tmp_path / "data"), val_keys=["s0"], class_names=card["class_names"]
    )
    prepare(spec)
    with pytest.raises(DataError, match=r"the model cannot take its val image s0: .*prepared as its own was"):
        evaluate(EvaluateSpec(model=str(root / "model"), data=str(tmp_path / "data")))
