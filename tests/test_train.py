"""Training on Ray Train: gradients really averaged, a killed worker resumes, artifacts written."""

import csv
import os
import signal

import keras
import numpy as np
import pytest
import ray
from helpers import in_background, training_held_after_first_checkpoint, write_source

from raysegment.config import PrepareSpec, TrainSpec
from raysegment.data.prepare import prepare
from raysegment.train.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eight_train_images(ray_cluster, tmp_path_factory):
    """A data set whose train split is exactly one global batch (8 images)."""
    root = tmp_path_factory.mktemp("grad")
    src = write_source(str(root / "src"), count=12)
    keys = sorted(os.path.splitext(f)[0] for f in os.listdir(root / "src" / "images"))
    prepare(PrepareSpec(source=src, dest=str(root / "data"), val_keys=",".join(keys[8:])))
    return root


def one_step(root, name: str, workers: int, batch: int) -> list[np.ndarray]:
    out = root / name
    train(
        TrainSpec(
            data=str(root / "data"),
            out=str(out),
            epochs=1,
            workers=workers,
            batch_size=batch,
            image_size=32,
            depth=2,
            base_filters=4,
            batch_norm=False,
            augment=False,
            optimizer="sgd",
            learning_rate=0.05,
            schedule="constant",
            resume=False,
            tta_check=False,
            max_steps=1,
        )
    )
    return keras.models.load_model(out / "model.keras", compile=False).get_weights()


def test_two_workers_batch_b_equal_one_worker_batch_2b(eight_train_images):
    """The all-reduce averages gradients: 2 x B takes the same SGD step as 1 x 2B.

    Without batch norm (its batch statistics differ by design between B and 2B) and
    without augmentation, the only difference left is where the gradients are summed.
    """
    root = eight_train_images
    one = one_step(root, "one", workers=1, batch=8)
    two = one_step(root, "two", workers=2, batch=4)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


def test_killed_worker_resumes_from_checkpoint(tiny_model, ray_cluster, tmp_path):
    """SIGKILL a training worker after the first checkpoint: the group restarts from it and every
    epoch runs once. Ray Train's controller holds the run after that checkpoint until the kill is
    done, so the run cannot finish first however fast or slow the machine."""
    data, _ = tiny_model
    out = tmp_path / "model"
    spec = TrainSpec(
        data=data,
        out=str(out),
        epochs=4,
        workers=2,
        image_size=32,
        batch_size=4,
        depth=2,
        base_filters=4,
        resume=False,
        tta_check=False,
    )
    with training_held_after_first_checkpoint(tmp_path / "hold") as hold:
        job = in_background(lambda: train(spec))
        hold.wait_reported(job)
        alive = ray.util.state.list_actors(address=ray_cluster.address, filters=[("state", "=", "ALIVE")])
        workers = [a for a in alive if a.class_name == "RayTrainWorker"]
        assert len(workers) == 2, workers
        os.kill(workers[-1].pid, signal.SIGKILL)
        hold.release()
        result = job.result(timeout=900)
    with open(out / "history.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs == [0, 1, 2, 3]  # every epoch once in the history
    assert hold.reported_epochs() == [0, 1, 2, 3]  # resumed after epoch 0: not restarted, nothing repeated
    assert result.metrics["epochs_run"] == 4
    assert (out / "training_curves.png").stat().st_size > 1000


def test_native_scale_model_predicts_at_full_resolution(ray_cluster, tmp_path):
    """crop=native: trained on windows at the original scale, evaluated and inferred unresized."""
    from PIL import Image

    from raysegment.config import EvaluateSpec, InferSpec
    from raysegment.data import synthetic
    from raysegment.evaluate import evaluate
    from raysegment.inference.pipeline import infer

    synthetic.write_pairs(str(tmp_path / "src"), 16, size=48, seed=3)
    prepare(PrepareSpec(source=str(tmp_path / "src"), dest=str(tmp_path / "data"), val_fraction=0.25))
    trained = train(
        TrainSpec(
            data=str(tmp_path / "data"),
            out=str(tmp_path / "model"),
            epochs=1,
            workers=1,
            image_size=32,
            batch_size=4,
            depth=2,
            base_filters=4,
            crop="native",
            resume=False,
            tta_check=False,
        )
    )
    card = __import__("json").loads((tmp_path / "model" / "model.json").read_text())
    assert card["input"]["resize"] == "none"
    m = evaluate(EvaluateSpec(model=str(tmp_path / "model"), data=str(tmp_path / "data")))
    assert m["pixels"] == m["images"] * 48 * 48
    # Training's val metrics scored every val pixel, as evaluate does (a central 32 px window scored 44%).
    assert trained.metrics["val_pixels"] == m["pixels"]
    os.makedirs(tmp_path / "in")
    img, _ = synthetic.make_example(5, size=64)
    Image.fromarray(img).resize((50, 37)).save(tmp_path / "in" / "odd.png")  # not a multiple of 4: padded
    run = infer(InferSpec(model=str(tmp_path / "model"), input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    assert run["counts"]["ok"] == 1
    with Image.open(tmp_path / "out" / "masks" / "odd.png") as mask:
        assert mask.size == (50, 37)


def test_checkpoints_of_another_data_set_or_network_are_not_resumed(tiny_model, eight_train_images, tmp_path):
    """Ray Train resumed whatever OUT held: another data set's checkpoint was taken up at its last epoch and
    written out as a model of the new data (exit 0), another network's failed with a traceback. Both are now
    refused before OUT is touched; --no-resume starts over."""
    import shutil

    from helpers import TINY

    from raysegment.errors import ConfigError

    data, model = tiny_model
    out = tmp_path / "out"
    shutil.copytree(model, out)
    before = sorted(os.listdir(out))
    spec = {**TINY, "workers": 1, "resume": True}
    with pytest.raises(ConfigError, match="holds a training run on another data set.*--no-resume"):
        train(TrainSpec(data=str(eight_train_images / "data"), out=str(out), **spec))
    with pytest.raises(ConfigError, match="holds a training run on another network"):
        train(TrainSpec(data=data, out=str(out), **{**spec, "base_filters": 8}))
    assert sorted(os.listdir(out)) == before and (out / "_SUCCESS").exists()


def test_a_checkpoint_of_another_network_is_one_line_naming_the_run(tmp_path):
    """restore's refusal quoted each checkpoint's loader error as is: Keras' text for a weights file of
    another shape spans lines, and the console's one line became several."""
    import keras
    import ray.train

    from raysegment.errors import ConfigError
    from raysegment.train.checkpoint import TrainState, restore, save_checkpoint

    def network(width: int) -> tuple[keras.Model, keras.optimizers.Optimizer]:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(width), keras.layers.Dense(2)])
        optimizer = keras.optimizers.Adam()
        optimizer.build(model.trainable_variables)
        return model, optimizer

    run = tmp_path / "out" / "train"
    for epoch in (0, 1):
        folder = run / f"checkpoint_00000{epoch}"
        folder.mkdir(parents=True)
        save_checkpoint(str(folder), *network(3), TrainState(epoch=epoch))
    latest = ray.train.Checkpoint.from_directory(str(run / "checkpoint_000001"))
    with pytest.raises(ConfigError) as refused:
        restore(latest, *network(5))
    text = str(refused.value)
    assert "\n" not in text and f"no checkpoint in {tmp_path / 'out'} loads" in text and "--no-resume" in text
    assert text.count("checkpoint_00000") == 2  # each tried, newest first
    # On S3 Ray Train's paths are bucket/prefix under raysegment's s3fs-wrapped filesystem: named as s3://.
    from raysegment import storage
    from raysegment.train.checkpoint import _uri

    s3 = storage.resolve("s3://bucket/out", "http://127.0.0.1:1").arrow_fs()
    assert _uri(s3, "bucket/out/train") == "s3://bucket/out/train" and _uri(latest.filesystem, "/x") == "/x"
