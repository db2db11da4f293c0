"""`raysegment model import`: Keras models from elsewhere (a functional model, keras_hub's SegFormer with
random weights) run by `infer` and the predictor like trained ones; misfits are one clear error."""

import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import summaries, write_images

from raysegment.cli import main
from raysegment.config import InferSpec
from raysegment.errors import ConfigError, DataError
from raysegment.inference.pipeline import infer
from raysegment.inference.predictor import Predictor
from raysegment.models.card import ModelCard
from raysegment.models.importer import import_model


def functional(path, classes=3, size=(None, None), activation=None, upsample=True):
    """A small conv net, saved as .keras: per-pixel class scores at the input size."""
    keras.utils.set_random_seed(0)
    x = inp = keras.Input((*size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(classes, 3, padding="same", activation=activation)(x)
    if upsample:
        x = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
    keras.Model(inp, x).save(path)
    return str(path)


def test_functional_model_imports_from_the_cli_and_infers(ray_cluster, tmp_path):
    src = functional(tmp_path / "net.keras")
    result = CliRunner().invoke(
        main,
        ["model", "import", src, str(tmp_path / "m"), "--classes", "bg,road,car", "--input-size", "32,32"]
        + ["--normalize", "imagenet", "--palette", "0,0,0;128,64,128;0,0,142", "--json"],
    )
    assert result.exit_code == 0, result.output
    card = ModelCard.read(str(tmp_path / "m"), verify_model=True)
    assert card.output == "logits" and card.head == "softmax" and card.input.normalization == "imagenet"
    assert card.imported.source == os.path.abspath(src) and card.palette[2] == (0, 0, 142)
    keys = write_images(tmp_path / "in", 4)
    r = infer(InferSpec(model=str(tmp_path / "m"), input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    assert r["counts"]["ok"] == 4 and len(summaries(tmp_path / "out")) == len(keys)


def test_softmax_output_is_recorded_as_probabilities_and_used_as_such(tmp_path):
    src = functional(tmp_path / "p.keras", classes=2, activation="softmax", upsample=False)
    with pytest.raises(DataError, match=r"output \(1, 16, 16, 2\) for a 32x32 input.*upsampling"):
        import_model(src, str(tmp_path / "bad"), ["a", "b"], (32, 32))
    src = functional(tmp_path / "p.keras", classes=1, activation="sigmoid")
    r = import_model(src, str(tmp_path / "m"), ["bg", "fg"], None, size_multiple=4)
    card = ModelCard.read(r["out"])
    assert card.output == "probabilities" and card.head == "sigmoid" and card.native_scale
    img = (np.random.default_rng(0).random((21, 30, 3)) * 255).astype(np.uint8)
    images = np.empty(1, dtype=object)
    images[:] = [img]
    pred = Predictor(r["out"])({"image": images, "error": np.asarray([""], object)})["pred"][0]
    model = keras.models.load_model(src)
    padded = np.pad(img, [(0, 3), (0, 2), (0, 0)], mode="reflect").astype(np.float32) / 255.0
    want = (model(padded[None]).numpy()[0, :21, :30, 0] > 0.5).astype(np.uint8)
    assert pred.shape == (21, 30) and (pred == want).mean() > 0.999


def test_keras_hub_segformer_with_random_weights(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.MiTBackbone(
        layerwise_depths=[1, 1],
        num_layers=2,
        layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[8, 4],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2],
        hidden_dims=[8, 16],
        image_shape=(64, 64, 3),
    )
    keras_hub.models.SegFormerImageSegmenter(backbone=backbone, num_classes=3, projection_filters=16).save(
        tmp_path / "segformer.keras"
    )
    with pytest.raises(DataError, match="takes 64x64 images.*--input-size 64,64"):
        import_model(str(tmp_path / "segformer.keras"), str(tmp_path / "bad"), ["a", "b", "c"], (32, 32))
    r = import_model(str(tmp_path / "segformer.keras"), str(tmp_path / "m"), ["a", "b", "c"], (64, 64))
    card = ModelCard.read(r["out"], verify_model=True)
    assert card.architecture.name == "segformerimagesegmenter" and "keras_hub" in card.imported.keras_class
    images = (np.random.default_rng(1).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    out = Predictor(r["out"])({"image": images, "error": np.asarray(["", ""], object)})
    assert out["pred"].shape == (2, 64, 64) and out["pred"].max() < 3


def test_misfits_are_one_clear_error(tmp_path):
    src = functional(tmp_path / "net.keras", classes=4)
    with pytest.raises(DataError, match=r"4 output channels but 3 classes in --classes"):
        import_model(src, str(tmp_path / "m"), ["a", "b", "c"], (32, 32))
    os.makedirs(tmp_path / "saved")
    with pytest.raises(ConfigError, match="SavedModel folder cannot be imported.*model.save"):
        import_model(str(tmp_path / "saved"), str(tmp_path / "m"), ["a", "b"], (32, 32))
    result = CliRunner().invoke(
        main, ["model", "import", src, str(tmp_path / "m"), "--classes", "a,b", "--input-size", "x"]
    )
    assert result.exit_code == 2 and "--input-size 'x': give H,W" in result.output
