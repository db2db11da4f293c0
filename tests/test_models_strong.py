"""Stronger models: keras.applications encoders under a U-Net decoder or a DeepLabV3+ head, weights
from a local file (ImageNet downloads are not reachable here), and the residual-encoder U-Net."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from raysegment.config import TrainSpec
from raysegment.models import encoders
from raysegment.models.unet import build_unet


@pytest.mark.parametrize(
    "encoder,architecture,channels",
    [
        ("mobilenetv3small", "unet", 1),  # grey data: repeated to RGB inside the model
        ("convnext_tiny", "unet", 3),  # no stride-2 feature: the decoder goes on without that skip
        ("resnet50", "deeplabv3plus", 3),  # caffe preprocessing layer in front
    ],
)
def test_encoder_models_give_logits_at_the_input_size(encoder, architecture, channels):
    model = encoders.build_encoder_model(3, encoder, None, architecture, base_filters=4, input_channels=channels)
    out = model(np.zeros((1, 64, 96, channels), np.float32))
    assert tuple(out.shape) == (1, 64, 96, 3)
    found = encoders.skip_layers(model.get_layer(f"{encoder}_encoder"))
    assert {4, 8, 16, 32} <= set(found)
    assert (2 in found) == (encoder != "convnext_tiny")


def test_encoder_weights_from_a_local_file_are_loaded(tmp_path):
    """The offline way to start from ImageNet: a backbone's weights file, saved where Keras could download."""
    source = encoders.backbone("mobilenetv3small", None)
    for w in source.weights:
        w.assign(np.random.default_rng(0).normal(size=w.shape).astype(w.dtype))
    path = str(tmp_path / "mobilenetv3small.weights.h5")
    source.save_weights(path)
    model = encoders.build_encoder_model(2, "mobilenetv3small", path, base_filters=4)
    loaded = model.get_layer("mobilenetv3small_encoder").weights
    assert len(loaded) == len(source.weights) > 50
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(source.weights, loaded))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        encoders.build_encoder_model(2, "mobilenetv3small", None, input_channels=5)


def test_residual_unet_adds_shortcuts():
    plain, residual = build_unet(2, depth=2, base_filters=4), build_unet(2, depth=2, base_filters=4, residual=True)
    adds = [layer for layer in residual.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == 3 and not [layer for layer in plain.layers if isinstance(layer, keras.layers.Add)]
    assert tuple(residual(np.zeros((1, 32, 32, 3), np.float32)).shape) == (1, 32, 32, 2)


def test_architecture_options_are_checked():
    with pytest.raises(ValueError, match="needs an --encoder"):
        TrainSpec(data="d", out="o", architecture="deeplabv3plus")
    with pytest.raises(ValueError, match="its own residual encoder"):
        TrainSpec(data="d", out="o", architecture="resunet", encoder="resnet50")
    with pytest.raises(ValueError, match="drop --normalization"):
        TrainSpec(data="d", out="o", encoder="resnet50", normalization="zscore")
    assert TrainSpec(data="d", out="o", encoder="resnet50").model_depth == 5


def test_an_encoder_model_saved_as_model_keras_loads_with_the_one_loader(tmp_path):
    """ResNet50's caffe preprocessing is a layer of ours: model.keras must load where infer loads it."""
    from raysegment import storage
    from raysegment.models.card import MODEL_FILE, ModelCard
    from raysegment.models.loader import load_model

    model = encoders.build_encoder_model(2, "resnet50", None, "unet", base_filters=4)
    model.save(tmp_path / MODEL_FILE)
    card = ModelCard.create(
        "0" * 64,
        architecture={"name": "unet-resnet50", "depth": 5, "encoder": "resnet50"},
        num_classes=2,
        class_names=["background", "thing"],
        palette=[[0, 0, 0], [255, 0, 0]],
        input={"size": [64, 64], "channels": 3, "normalization": "raw_0_255"},
    )
    loaded = load_model(storage.resolve(str(tmp_path)), card)
    x = np.random.default_rng(2).random((1, 64, 64, 3)).astype(np.float32) * 255
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-4)


@pytest.mark.slow
def test_train_and_infer_with_a_deeplab_encoder_model(tiny_model, ray_cluster, tmp_path):
    """A DeepLabV3+ on MobileNetV3 (random weights) trains one short epoch on Ray Train, its card says
    what it is and that it takes raw pixels, and `infer` loads it and writes masks."""
    from helpers import write_images

    from raysegment.config import InferSpec
    from raysegment.inference.pipeline import infer
    from raysegment.train.trainer import train

    data, _ = tiny_model
    out = tmp_path / "model"
    spec = dict(data=data, out=str(out), epochs=1, workers=1, batch_size=4, image_size=32, max_steps=2, tta_check=False)
    encoder = dict(architecture="deeplabv3plus", encoder="mobilenetv3small", encoder_weights="none", base_filters=4)
    train(TrainSpec(**spec, **encoder))
    card = json.loads((out / "model.json").read_text())
    assert card["architecture"]["name"] == "deeplabv3plus-mobilenetv3small" and card["architecture"]["depth"] == 5
    assert card["input"]["normalization"] == "raw_0_255"
    write_images(tmp_path / "in", 3)
    record = infer(InferSpec(model=str(out), input=str(tmp_path / "in"), output=str(tmp_path / "out"), report=False))
    assert record["counts"]["ok"] == 3
    assert len(list(Path(tmp_path / "out" / "masks").glob("*.png"))) == 3


def test_a_saved_resize_unet_loads_as_one_that_runs_at_any_size(tmp_path):
    """model.keras keeps Keras' own bilinear UpSampling2D (a file plain Keras loads, as those trained before);
    the loader swaps in `ResizeUpSampling2D`, inside a nested model too, with the same outputs, and it runs in
    a tf.function of unknown height and width, where Keras' layer raised OperatorNotAllowedInGraphError."""
    import tensorflow as tf

    from raysegment import storage
    from raysegment.models.card import MODEL_FILE, ModelCard
    from raysegment.models.loader import load_model
    from raysegment.models.unet import ResizeUpSampling2D

    unet = build_unet(3, depth=2, base_filters=4, upsampling="resize")
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, keras.layers.UpSampling2D(interpolation="bilinear")(unet(inp)))  # nested and outer
    model.save(tmp_path / MODEL_FILE)
    assert "ResizeUpSampling2D" not in keras.saving.load_model(tmp_path / MODEL_FILE).to_json()
    card = ModelCard.create(
        "0" * 64,
        architecture={"name": "unet", "depth": 2},
        num_classes=3,
        class_names=["a", "b", "c"],
        palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]],
        input={"size": [32, 32], "channels": 3, "normalization": "scale_0_1", "resize": "none"},
    )
    loaded = load_model(storage.resolve(str(tmp_path)), card)
    swapped = [layer for layer in loaded.layers[-1:] + loaded.layers[1].layers if type(layer) is ResizeUpSampling2D]
    assert len(swapped) == 3
    run = tf.function(lambda x: loaded(x, training=False), input_signature=[tf.TensorSpec([1, None, None, 3])])
    for shape in [(1, 32, 32, 3), (1, 12, 20, 3)]:
        x = np.random.default_rng(3).random(shape).astype(np.float32)
        np.testing.assert_allclose(run(x), model(x), atol=1e-6)
        assert run(x).shape == (1, shape[1] * 2, shape[2] * 2, 3)
    # A GPU's default precision clones the nested model from its config: the swapped layer must be found.
    half = load_model(storage.resolve(str(tmp_path)), card, precision="bfloat16")
    x = np.random.default_rng(4).random((1, 12, 20, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(half(x), np.float32), model(x), atol=0.05)
