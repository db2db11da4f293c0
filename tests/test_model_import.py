"""`raysegment model import`: Keras models from elsewhere (a functional model, keras_hub's SegFormer with
random weights) and TensorFlow SavedModels run by `infer` and the predictor like trained ones; misfits are
one clear error."""

import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import summaries, write_images
from PIL import Image

from raysegment import registry
from raysegment.cli import main
from raysegment.config import ImportSpec, InferSpec
from raysegment.entrypoints import main as entry_main
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


def saved_both_ways(root):
    """One functional model as model.keras and as a SavedModel folder (Keras' model.export; its bilinear
    UpSampling2D does not trace at unknown sizes, so this one upsamples with a transposed convolution)."""
    root.mkdir(exist_ok=True)
    keras.utils.set_random_seed(1)
    x = inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same")(x)
    model = keras.Model(inp, x)
    model.save(root / "net.keras")
    model.export(str(root / "saved"), verbose=False)
    return str(root / "net.keras"), str(root / "saved")


def masks(out):
    """key -> the mask infer wrote, for a local output of PNG masks."""
    return {row["key"]: np.asarray(Image.open(row["mask_uri"])) for row in summaries(out)}


def test_keras_file_and_saved_model_import_alike_and_infer_the_same_masks(ray_cluster, s3_prefix, tmp_path):
    """The .keras file from the CLI into a local DEST, the SavedModel from a spec through the job entrypoint
    into s3://: one model, so infer's masks (and the SavedModel import's export) must be equal."""
    keras_file, saved = saved_both_ways(tmp_path)
    options = ["--classes", "bg,road,car", "--input-size", "32,32", "--normalize", "imagenet"]
    result = CliRunner().invoke(
        main,
        ["model", "import", keras_file, str(tmp_path / "m"), *options, "--palette", "0,0,0;128,64,128;0,0,142"]
        + ["--json"],
    )
    assert result.exit_code == 0, result.output
    card = ModelCard.read(str(tmp_path / "m"), verify_model=True)
    assert card.output == "logits" and card.head == "softmax" and card.input.normalization == "imagenet"
    assert card.imported.source == keras_file and card.palette[2] == (0, 0, 142) and card.model_format == "keras"

    spec = tmp_path / "import.yaml"
    spec.write_text(
        f"model_file: {saved}\ndest: {s3_prefix}/m\nclasses: [bg, road, car]\ninput_size: 32,32\n"
        "normalize: imagenet\noutput: logits\npalette: '0,0,0;128,64,128;0,0,142'\n"
    )
    assert entry_main("import", ["--config", str(spec)]) == 0
    imported = ModelCard.read(f"{s3_prefix}/m", verify_model=True)  # the folder's tree hash, on S3
    assert imported.model_format == "saved_model" and imported.imported.call_endpoint == "serve"
    assert imported.model_id.startswith("savedmodel-") and imported.head == "softmax"

    keys = write_images(tmp_path / "in", 4)
    for model, out in ((str(tmp_path / "m"), "out-keras"), (f"{s3_prefix}/m", "out-saved")):
        r = infer(InferSpec(model=model, input=str(tmp_path / "in"), output=str(tmp_path / out)))
        assert r["counts"]["ok"] == 4
    from_keras, from_saved = masks(tmp_path / "out-keras"), masks(tmp_path / "out-saved")
    assert sorted(from_keras) == keys and sum(len(np.unique(m)) > 1 for m in from_keras.values()) >= 2
    assert all((from_saved[k] == from_keras[k]).all() for k in keys)

    # Export loads the SavedModel import through the same loader; its graph re-saves the imported one.
    import tensorflow as tf

    result = CliRunner().invoke(main, ["export", f"{s3_prefix}/m", str(tmp_path / "exp"), "--format", "saved_model"])
    assert result.exit_code == 0, result.output
    serve = tf.saved_model.load(str(tmp_path / "exp" / "saved_model")).signatures["serving_default"]
    for name in os.listdir(tmp_path / "in"):
        image = np.asarray(Image.open(tmp_path / "in" / name).convert("RGB"))
        assert (serve(image=tf.constant(image))["class_map"].numpy() == from_keras[name[:-4]]).all()


def test_softmax_output_is_recorded_as_probabilities_and_used_as_such(tmp_path):
    src = functional(tmp_path / "p.keras", classes=2, activation="softmax", upsample=False)
    with pytest.raises(DataError, match=r"output \(1, 16, 16, 2\) for a 32x32 input.*upsampling"):
        import_model(ImportSpec(model_file=src, dest=str(tmp_path / "bad"), classes=["a", "b"], input_size=(32, 32)))
    src = functional(tmp_path / "p.keras", classes=1, activation="sigmoid")
    r = import_model(
        ImportSpec(model_file=src, dest=str(tmp_path / "m"), classes=["bg", "fg"], input_size="native", size_multiple=4)
    )
    card = ModelCard.read(r.out)
    assert card.output == "probabilities" and card.head == "sigmoid" and card.native_scale
    # --json: the card as written (import returns the typed card; the payload keeps README's keys).
    assert registry._import_payload(None, r) == {"model_id": card.model_id, "out": r.out, "model_card": card.as_dict()}
    img = (np.random.default_rng(0).random((21, 30, 3)) * 255).astype(np.uint8)
    images = np.empty(1, dtype=object)
    images[:] = [img]
    pred = Predictor(r.out)({"image": images, "error": np.asarray([""], object)})["pred"][0]
    model = keras.models.load_model(src)
    padded = np.pad(img, [(0, 3), (0, 2), (0, 0)], mode="reflect").astype(np.float32) / 255.0
    want = (model(padded[None]).numpy()[0, :21, :30, 0] > 0.5).astype(np.uint8)
    assert pred.shape == (21, 30) and (pred == want).mean() > 0.999


def wrapped(path, head):
    """A functional model whose head is a nested model (`head` takes 8 channels), then upsampled: the
    output's activation lies inside the sub-model."""
    keras.utils.set_random_seed(0)
    x = inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.UpSampling2D(2, interpolation="bilinear")(head(x))
    keras.Model(inp, x).save(path)
    return str(path)


def test_a_nested_sigmoid_or_softmax_head_is_read_as_probabilities(tmp_path):
    """`--output auto` read only the outer model's layers: a nested head was logits, so a sigmoid marked
    every pixel foreground (and a softmax's confidence and TTA averaging were wrong)."""
    inner = keras.Input((None, None, 8))
    sigmoid = keras.Model(inner, keras.layers.Conv2D(1, 1, activation="sigmoid")(inner), name="head")
    softmax = keras.Sequential([keras.layers.Conv2D(3, 1), keras.layers.Softmax()], name="head")
    for name, head, classes in (("sigmoid", sigmoid, "bg,fg"), ("softmax", softmax, "a,b,c")):
        src = wrapped(tmp_path / f"{name}.keras", head)
        r = import_model(ImportSpec(model_file=src, dest=str(tmp_path / name), classes=classes, input_size=(16, 16)))
        card = ModelCard.read(r.out)
        assert (card.output, card.head) == ("probabilities", name), name


def test_a_head_that_does_not_say_is_refused_naming_output(tmp_path):
    """A head whose last layer has weights and no activation may hold probabilities or not: no guess."""
    inner = keras.Input((None, None, 8))
    head = keras.Model(inner, keras.layers.BatchNormalization(name="norm")(keras.layers.Conv2D(2, 1)(inner)))
    src = wrapped(tmp_path / "bn.keras", head)
    spec = ImportSpec(model_file=src, dest=str(tmp_path / "m"), classes="bg,fg", input_size=(16, 16))
    with pytest.raises(ConfigError, match="cannot tell whether the model outputs logits or probabilities") as err:
        import_model(spec)
    assert "BatchNormalization layer 'norm'" in str(err.value)
    assert str(err.value).endswith("pass --output logits or --output probabilities")
    assert not (tmp_path / "m").exists()
    card = ModelCard.read(import_model(spec.model_copy(update={"output": "logits"})).out)
    assert card.output == "logits"


def test_overwrite_refuses_a_trained_models_folder_and_drops_an_imported_ones_evaluations(tmp_path):
    """A trained model's metrics, history, plots and checkpoints would stay beside the import (export refuses
    such a DEST too); an imported model's eval-*.json describe the model --overwrite replaces."""
    import json

    src = functional(tmp_path / "net.keras", classes=2)
    spec = ImportSpec(model_file=src, dest=str(tmp_path / "m"), classes="a,b", input_size=(16, 16), overwrite=True)
    import_model(spec)
    (tmp_path / "m" / "eval-val.json").write_text("{}")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    import_model(spec)
    assert sorted(os.listdir(tmp_path / "m")) == ["_SUCCESS", "model.json", "model.keras", "notes.txt"]

    card = json.loads((tmp_path / "m" / "model.json").read_text())
    card["training"] = {"name": "run1", "epochs": 2}  # as train writes it; its checkpoints under run1/
    (tmp_path / "m" / "model.json").write_text(json.dumps(card))
    for name in ("metrics.json", "history.csv"):
        (tmp_path / "m" / name).write_text("x")
    (tmp_path / "m" / "run1").mkdir()
    before = (tmp_path / "m" / "model.keras").read_bytes()
    with pytest.raises(
        ConfigError, match=r"m: DEST is a trained model's folder \(it holds metrics.json, history.csv, run1,"
    ):
        import_model(spec)
    assert (tmp_path / "m" / "model.keras").read_bytes() == before


def test_a_file_that_is_not_a_keras_model_says_so(tmp_path):
    """Keras says "File not found" for a .keras file that is there but no zip archive."""
    for name, said in (
        ("damaged.keras", "not a readable Keras archive (damaged, or not a .keras file"),
        ("old.h5", "not a readable HDF5 file (damaged, or not a legacy .h5 Keras model)"),
        ("model.bin", "not a .keras or .h5 file"),
    ):
        (tmp_path / name).write_bytes(b"PK\x03\x04 cut short")
        spec = ImportSpec(model_file=str(tmp_path / name), dest=str(tmp_path / "m"), classes="a,b", input_size=(8, 8))
        with pytest.raises(DataError) as err:
            import_model(spec)
        assert str(err.value).startswith(f"{tmp_path / name}: {said}") and "File not found" not in str(err.value)


def test_a_saved_model_with_only_a_signature_imports_and_predicts(tmp_path):
    """tf.saved_model.save with a `serving_default` signature (named input, dict output), not Keras' export."""
    import tensorflow as tf

    keras.utils.set_random_seed(2)
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, keras.layers.Conv2D(2, 3, padding="same", activation="softmax")(inp))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels")])
    def serving(pixels):
        return {"scores": model(pixels)}

    module = tf.Module()
    module.model = model
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": serving})
    spec = ImportSpec(
        model_file=str(tmp_path / "sm"), dest=str(tmp_path / "m"), classes="bg,fg", input_size="native",
        size_multiple=1, output="probabilities",
    )  # fmt: skip
    card = ModelCard.read(import_model(spec).out, verify_model=True)
    assert card.imported.call_endpoint == "serving_default" and card.output == "probabilities"
    img = (np.random.default_rng(3).random((9, 13, 3)) * 255).astype(np.uint8)
    images = np.empty(1, dtype=object)
    images[:] = [img]
    pred = Predictor(str(tmp_path / "m"))({"image": images, "error": np.asarray([""], object)})["pred"][0]
    want = np.argmax(model(img[None].astype(np.float32) / 255.0).numpy()[0], axis=-1)
    assert pred.shape == (9, 13) and (pred == want).all()


def hub_spec(root, dest, size):
    return ImportSpec(model_file=str(root / "segformer.keras"), dest=str(root / dest), classes="a,b,c", input_size=size)


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
        import_model(hub_spec(tmp_path, "bad", (32, 32)))
    r = import_model(hub_spec(tmp_path, "m", (64, 64)))
    card = ModelCard.read(r.out, verify_model=True)
    assert card.architecture.name == "segformerimagesegmenter" and "keras_hub" in card.imported.keras_class
    images = (np.random.default_rng(1).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    batch = {"image": images, "error": np.asarray(["", ""], object), "height": [64] * 2, "width": [64] * 2}
    preds = np.stack(list(Predictor(r.out)(batch)["pred"]))
    assert preds.shape == (2, 64, 64) and preds.max() < 3


def test_misfits_are_one_clear_error(tmp_path):
    src = functional(tmp_path / "net.keras", classes=4)
    with pytest.raises(DataError, match=r"4 output channels but 3 classes in --classes"):
        import_model(ImportSpec(model_file=src, dest=str(tmp_path / "m"), classes="a,b,c", input_size=(32, 32)))
    os.makedirs(tmp_path / "folder")
    with pytest.raises(ConfigError, match="a folder without saved_model.pb; give a .keras file or a SavedModel"):
        import_model(
            ImportSpec(
                model_file=str(tmp_path / "folder"), dest=str(tmp_path / "m"), classes="a,b", input_size=(32, 32)
            )
        )
    _, saved = saved_both_ways(tmp_path / "other")  # three output channels
    with pytest.raises(ConfigError, match="a SavedModel keeps no layers.*--output logits or --output probabilities"):
        import_model(ImportSpec(model_file=saved, dest=str(tmp_path / "m"), classes="a,b,c", input_size=(32, 32)))
    spec = ImportSpec(model_file=saved, dest=str(tmp_path / "m"), classes="a,b", input_size=(32, 32), output="logits")
    with pytest.raises(DataError, match=r"3 output channels but 2 classes"):  # a SavedModel is checked alike
        import_model(spec)
    result = CliRunner().invoke(
        main, ["model", "import", src, str(tmp_path / "m"), "--classes", "a,b", "--input-size", "x"]
    )
    assert result.exit_code == 2 and "field 'input_size': give H,W (e.g. 512,512) or native (got 'x')" in result.output


def test_a_damaged_model_file_whose_hash_was_rewritten_is_one_error(tmp_path):
    """The card's hash guards against a swapped file, not one rewritten together with its hash: Keras'
    own error was then a traceback in every command that loads the model."""
    import hashlib

    from raysegment import storage
    from raysegment.bench.infer import make_model_dir
    from raysegment.models.loader import load_model

    model = make_model_dir(str(tmp_path), image_size=32, depth=2, base_filters=4)
    garbage = os.urandom(3000)
    path = os.path.join(model, "model.keras")
    with open(path, "wb") as f:
        f.write(garbage)
    card = ModelCard.read(model)
    card = card.model_copy(update={"model_sha256": hashlib.sha256(garbage).hexdigest()})
    card.write(storage.resolve(model))
    with pytest.raises(DataError, match="model.keras: not a readable Keras archive .*train or import the model again"):
        load_model(storage.resolve(model), ModelCard.read(model, verify_model=True))


def test_import_keeps_its_log_in_dest_logs_and_a_refusal_leaves_dest_as_it_was(tmp_path):
    """`model import` kept its log in $TMPDIR (its log folder was None), where every other command with a
    local output folder keeps it in OUT/logs once it began writing there; a refusal's stays in the temp folder."""
    src = functional(tmp_path / "net.keras", classes=2)
    dest = tmp_path / "m"
    args = ["model", "import", src, str(dest), "--classes", "a,b", "--input-size", "16,16"]
    result = CliRunner().invoke(main, args)
    (log,) = (dest / "logs").glob("raysegment-import-*.log")
    assert result.exit_code == 0 and f"  log        {log}" in result.output, result.output
    assert ModelCard.read(str(dest)).num_classes == 2  # logs/ beside the model changes nothing for it
    result = CliRunner().invoke(main, [*args, "--overwrite"])  # DEST/logs is no refusal's reason
    assert result.exit_code == 0 and f"  log        {dest / 'logs'}/raysegment-import-" in result.output
    refused = tmp_path / "empty"
    refused.mkdir()
    inner = keras.Input((None, None, 8))
    head = keras.Model(inner, keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 1)(inner)))
    bad = wrapped(tmp_path / "bn.keras", head)  # refused after loading: no --output given
    result = CliRunner().invoke(
        main, ["model", "import", bad, str(refused), "--classes", "a,b", "--input-size", "16,16"]
    )
    assert result.exit_code == 2 and "pass --output logits" in result.output, result.output
    assert list(refused.iterdir()) == []
