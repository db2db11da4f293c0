"""`raysegment export`: each format, loaded in a fresh process with only its runtime, gives `infer`'s masks.

Tolerances (changed pixels, against infer's mask files on 20 images from 5x7 to 80x80, model 32x32):
- SavedModel and ONNX: equal where Pillow resizes width first (every image whose height grows); where
  Pillow goes height first its resized pixels may differ by 1 and a mask pixel near a class boundary may
  flip: at most 2% of an image, 0.5% over all.
- TFLite: the resampling maths is float32 (no float64 builtins), so a coefficient or an exact nearest tie
  may round the other way as well: at most 10% of a (tiny) image, 3% over all (measured: 5%, 1.5%).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import summaries
from PIL import Image

from raysegment import storage
from raysegment.bench.infer import make_model_dir
from raysegment.cli import main
from raysegment.config import ExportSpec, InferSpec
from raysegment.export import FILE_NAMES
from raysegment.inference.pipeline import infer
from raysegment.models.card import ModelCard, PixelStats

SIZES = [(32, 32), (5, 7), (20, 61), (31, 33), (16, 16), (24, 80), (64, 64), (47, 33), (80, 80), (33, 47)]
SIZES += [(40, 40), (12, 30), (30, 12), (50, 70), (70, 50), (28, 28), (64, 48), (9, 100), (100, 9), (36, 20)]

RUNNER = r"""
import json, sys
import numpy as np
from PIL import Image
fmt, path, files, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
masks = {}
if fmt == "saved_model":
    import tensorflow as tf
    loaded = tf.saved_model.load(path)
    serve, encoded = loaded.signatures["serving_default"], loaded.signatures["segment_encoded"]
    for f, img in zip(files, images):
        masks[f] = serve(image=tf.constant(img))["class_map"].numpy()
        same = encoded(image_bytes=tf.constant(open(f, "rb").read()))["class_map"].numpy()
        assert (same == masks[f]).all(), f
elif fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for f, img in zip(files, images):
        masks[f] = session.run(["class_map"], {name: img})[0]
else:
    import tensorflow as tf
    runner = tf.lite.Interpreter(model_path=path).get_signature_runner("serving_default")
    for f, img in zip(files, images):
        masks[f] = runner(image=img)["class_map"]  # the runner resizes the input to the image
assert all(m.dtype == np.uint8 and m.shape == i.shape[:2] for m, i in zip(masks.values(), images))
np.savez(out, **{str(i): masks[f] for i, f in enumerate(files)})
"""


@pytest.fixture(scope="module")
def infer_masks(ray_cluster, tmp_path_factory):
    """(model dir, image files, infer's masks): a random 32x32 U-Net run by `infer` on 20 smooth images."""
    root = tmp_path_factory.mktemp("export")
    model = make_model_dir(str(root), image_size=32, depth=2, base_filters=4)
    rng = np.random.default_rng(0)
    files = []
    os.makedirs(root / "in")
    for i, (h, w) in enumerate(SIZES):
        coarse = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8))  # smooth: several classes
        files.append(str(root / "in" / f"img{i:02d}.png"))
        coarse.resize((w, h), Image.BICUBIC).save(files[-1])
    infer(InferSpec(model=model, input=str(root / "in"), output=str(root / "out")))
    masks = {}
    for row in summaries(root / "out"):
        data = storage.read_bytes(storage.resolve(row["mask_uri"]))
        if row["mask_offset"] is not None and row["mask_offset"] >= 0:
            data = data[row["mask_offset"] : row["mask_offset"] + row["mask_length"]]
        masks[row["key"]] = np.asarray(Image.open(__import__("io").BytesIO(data)))
    refs = [masks[os.path.splitext(os.path.basename(f))[0]] for f in files]
    assert sum(len(np.unique(m)) > 1 for m in refs) >= 10  # a one-class model would make the test vacuous
    return model, files, refs


def run_export(fmt, model, dest, tmp_path, files):
    result = CliRunner().invoke(main, ["export", model, str(dest), "--format", fmt])
    assert result.exit_code == 0, result.output
    path = str(dest / FILE_NAMES[fmt])
    assert f"as {fmt}: {path}" in result.output
    out = tmp_path / f"{fmt}.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, fmt, path, json.dumps(files), str(out)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    return [got[str(i)] for i in range(len(files))]


def changed(masks, refs):
    return [float((m != r).mean()) for m, r in zip(masks, refs)]


@pytest.mark.parametrize("fmt,per_image,overall", [("saved_model", 0.02, 0.005), ("onnx", 0.02, 0.005)])
def test_export_gives_infers_masks(infer_masks, tmp_path, fmt, per_image, overall):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx")
        pytest.importorskip("onnxruntime")
    model, files, refs = infer_masks
    diffs = changed(run_export(fmt, model, tmp_path / fmt, tmp_path, files), refs)
    assert max(diffs) <= per_image and np.mean(diffs) <= overall, diffs
    # Pillow resizes width first when the height grows: there the graph is Pillow, byte for byte.
    assert all(d == 0 for d, (h, _) in zip(diffs, SIZES) if h <= 32), diffs
    card = json.loads((tmp_path / fmt / "model.json").read_text())
    assert card["model_id"] == ModelCard.read(model).model_id  # the card travels with the export


def test_tflite_export_within_tolerance(infer_masks, tmp_path):
    model, files, refs = infer_masks
    diffs = changed(run_export("tflite", model, tmp_path / "tflite", tmp_path, files), refs)
    assert max(diffs) <= 0.10 and np.mean(diffs) <= 0.03, diffs


def test_native_scale_export_pads_as_the_predictor(tmp_path):
    """A native-scale model: padded to 2**depth (reflect, or edge for tiny images) and cropped, as infer."""
    import tensorflow as tf

    from raysegment.export import export
    from raysegment.inference.predictor import Predictor

    model = make_model_dir(str(tmp_path), image_size=32, depth=2, base_filters=4)
    card = ModelCard.read(model)
    card.model_copy(update={"input": card.input.model_copy(update={"resize": "none"})}).write(storage.resolve(model))
    path = export(ExportSpec(model=model, dest=str(tmp_path / "sm"), format="saved_model", probabilities=True))["path"]
    serve = tf.saved_model.load(path).signatures["serving_default"]
    rng = np.random.default_rng(2)
    images = np.empty(3, dtype=object)
    images[:] = [(rng.random(s) * 255).astype(np.uint8) for s in [(45, 50, 3), (3, 2, 3), (32, 32, 3)]]
    preds = Predictor(model)({"image": images, "error": np.asarray([""] * 3, object)})["pred"]
    for img, pred in zip(images, preds):
        out = serve(image=tf.constant(img))
        assert out["probabilities"].shape == (*img.shape[:2], 4)
        assert (out["class_map"].numpy() == pred).all()


def test_saved_model_runs_under_the_tf1_session_loader(tmp_path):
    """The SavedModel loaded under `tf.saved_model.load` only: TF1's session loader (TensorFlow Serving,
    `saved_model_cli run`) failed with "Could not find variable down0_bn1/moving_variance" (the variables were
    saved under other names than the graph reads them by). Both signatures now run in a graph-mode Session
    and give the TF2 loader's outputs."""
    import tensorflow as tf

    from raysegment.export import export

    model = make_model_dir(str(tmp_path), image_size=32, depth=2, base_filters=4)
    spec = ExportSpec(model=model, dest=str(tmp_path / "sm"), format="saved_model", probabilities=True, tta_flip=True)
    path = export(spec)["path"]
    image = (np.random.default_rng(4).random((45, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    feeds = {"serving_default": image, "segment_encoded": (tmp_path / "image.png").read_bytes()}
    signatures = tf.saved_model.load(path).signatures
    expected = {name: signatures[name](tf.constant(feed)) for name, feed in feeds.items()}
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        for name, feed in feeds.items():
            signature = graph.signature_def[name]
            assert sorted(signature.outputs) == ["class_map", "probabilities"], name
            (given,) = signature.inputs.values()
            got = session.run({key: out.name for key, out in signature.outputs.items()}, {given.name: feed})
            assert np.array_equal(got["class_map"], expected[name]["class_map"].numpy()), name
            assert np.allclose(got["probabilities"], expected[name]["probabilities"].numpy(), atol=1e-6), name


def test_export_runs_the_flip_tta_infer_runs(tmp_path):
    """The card advised flip TTA, infer ran it, and the exported graph did not, while the model.json beside
    it still said tta_flip: true (2.4-3.9% of the mask pixels differed). The graph now averages the same
    passes, and --no-tta-flip exports the plain pass with a model.json that says so (`exports`, per format);
    `inference` stays the trained model's advice."""
    import tensorflow as tf

    from raysegment.export import export
    from raysegment.inference.predictor import Predictor
    from raysegment.models.card import InferenceAdvice

    model = make_model_dir(str(tmp_path), image_size=32, depth=2, base_filters=4)
    card = ModelCard.read(model)
    advice = InferenceAdvice(tta_flip=True, val_mean_iou={"plain": 0.5, "tta": 0.6}, images=2, flips=["lr"])
    training = {**(card.training or {}), "flip": "horizontal", "augment": True}
    native = card.input.model_copy(update={"resize": "none"})  # whole images through the predictor, as infer
    card.model_copy(update={"inference": advice, "training": training, "input": native}).write(storage.resolve(model))
    assert ModelCard.read(model).tta().flips  # the card turns TTA on for infer
    rng = np.random.default_rng(3)
    images = np.empty(3, dtype=object)
    images[:] = [(rng.random(s) * 255).astype(np.uint8) for s in [(45, 50, 3), (32, 32, 3), (20, 60, 3)]]
    errors = np.asarray([""] * 3, object)
    with_tta = Predictor(model)({"image": images, "error": errors})["pred"]
    plain = Predictor(model, tta_flip=False)({"image": images, "error": errors})["pred"]
    assert any((a != b).any() for a, b in zip(with_tta, plain))  # else the test could not tell them apart
    for tta_flip, expected, dest in ((None, with_tta, "on"), (False, plain, "off")):
        spec = ExportSpec(model=model, dest=str(tmp_path / dest), format="saved_model", tta_flip=tta_flip)
        serve = tf.saved_model.load(export(spec)["path"]).signatures["serving_default"]
        for img, pred in zip(images, expected):
            assert (serve(image=tf.constant(img))["class_map"].numpy() == pred).all()
        exported = json.loads((tmp_path / dest / "model.json").read_text())
        assert exported["exports"]["saved_model"]["tta_flip"] is (tta_flip is None)
        assert exported["inference"]["tta_flip"] is True and "export_tta" not in exported
    from raysegment.errors import DataError

    with pytest.raises(DataError, match=r"an export \(saved_model\), not a trained model .*model import"):
        ModelCard.read(str(tmp_path / "on"))  # infer/serve given the export's folder: named as one


def test_export_refuses_what_it_cannot_write_faithfully(tmp_path):
    """Refused before any conversion: a model of 16-bit or float pixels (the graph takes 8-bit images and would
    apply statistics fitted to other values), DEST the model's own folder (a link to it too: it was written
    through, and the model's card lost its TTA advice) or another trained model's (a copy of MODEL too), and a
    link where the file goes."""
    from raysegment.errors import ConfigError, StorageError
    from raysegment.export import export

    model = make_model_dir(str(tmp_path / "m"), image_size=32, depth=2, base_filters=4)
    os.symlink(model, tmp_path / "link")
    own_card = (Path(model) / "model.json").read_bytes()
    for dest in (model, str(tmp_path / "link"), f"{model}/../model"):
        with pytest.raises(ConfigError, match="DEST is MODEL's own folder"):
            export(ExportSpec(model=model, dest=dest, format="tflite", overwrite=True))
    assert (Path(model) / "model.json").read_bytes() == own_card and not (Path(model) / "model.tflite").exists()
    other = make_model_dir(str(tmp_path / "other"), image_size=32, depth=2, base_filters=8)
    copy = shutil.copytree(model, tmp_path / "copy")
    for dest in (other, str(copy)):  # a trained model's folder: its model.json would be replaced
        card_before = (Path(dest) / "model.json").read_bytes()
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=r"holds a trained model \(model.keras\)"):
                export(ExportSpec(model=model, dest=dest, format="onnx", overwrite=overwrite))
        assert (Path(dest) / "model.json").read_bytes() == card_before and not (Path(dest) / "model.onnx").exists()
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "elsewhere.onnx", tmp_path / "d" / "model.onnx")  # dangling
    with pytest.raises(StorageError, match="model.onnx: is a link, not a file"):
        export(ExportSpec(model=model, dest=str(tmp_path / "d"), format="onnx"))
    assert not (tmp_path / "elsewhere.onnx").exists()
    card = ModelCard.read(model)
    deep = {
        "pixel_type": "float32",
        "normalization": "zscore",
        "stats": PixelStats(mean=(900.0,) * 3, std=(300.0,) * 3),
    }
    card.model_copy(update={"input": card.input.model_copy(update=deep)}).write(storage.resolve(model))
    with pytest.raises(ConfigError, match="takes float32 pixels .* 8-bit images only"):
        export(ExportSpec(model=model, dest=str(tmp_path / "e"), format="saved_model"))


def test_overwrite_swaps_the_export_whole_and_one_card_describes_dest(tmp_path):
    """--overwrite replaces a SavedModel by a swap (nothing of the old one stays, no staging left beside
    it); a DEST holding another model's export in another format is refused, then cleared with
    --overwrite; the same model in a second format sits beside the first."""
    import tensorflow as tf

    from raysegment.errors import ConfigError
    from raysegment.export import export

    a = make_model_dir(str(tmp_path / "a"), image_size=32, depth=2, base_filters=4)
    b = make_model_dir(str(tmp_path / "b"), image_size=32, depth=2, base_filters=8)
    assert ModelCard.read(a).model_sha256 != ModelCard.read(b).model_sha256
    dest = tmp_path / "dest"
    export(ExportSpec(model=a, dest=str(dest), format="saved_model"))
    (dest / "saved_model" / "stray.txt").write_text("left by the old export")
    export(ExportSpec(model=a, dest=str(dest), format="tflite"))  # the same model: beside it
    assert (dest / "saved_model").is_dir() and (dest / "model.tflite").is_file()

    with pytest.raises(ConfigError, match="holds saved_model, model.tflite of another model"):
        export(ExportSpec(model=b, dest=str(dest), format="onnx"))
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        export(ExportSpec(model=b, dest=str(dest), format="saved_model"))
    export(ExportSpec(model=b, dest=str(dest), format="saved_model", overwrite=True))
    assert sorted(p.name for p in dest.iterdir()) == ["model.json", "saved_model"]  # tflite of a: removed
    assert not (dest / "saved_model" / "stray.txt").exists()
    exported = json.loads((dest / "model.json").read_text())
    assert exported["model_sha256"] == ModelCard.read(b).model_sha256 and list(exported["exports"]) == ["saved_model"]
    assert "serving_default" in tf.saved_model.load(str(dest / "saved_model")).signatures


def test_one_dest_records_what_each_formats_graph_holds(tmp_path):
    """Formats exported into one DEST shared one model.json whose `export_tta` described the last export only
    (a TFLite file without TTA beside a card saying it had it), and `--probabilities` was not recorded: each
    format now has its record under `exports`. The TFLite file lost its output names (`Identity`, no
    signature): it has a `serving_default` signature naming `class_map` and `probabilities`."""
    import tensorflow as tf

    from raysegment.export import export

    model = make_model_dir(str(tmp_path), image_size=32, depth=2, base_filters=4)
    dest = tmp_path / "dest"
    export(ExportSpec(model=model, dest=str(dest), format="tflite", tta_flip=False, probabilities=True))
    export(ExportSpec(model=model, dest=str(dest), format="saved_model", tta_flip=True))
    exported = json.loads((dest / "model.json").read_text())
    assert exported["exports"] == {
        "saved_model": {"tta_flip": True, "tta_flips": ["horizontal"], "tta_from": "given", "probabilities": False},
        "tflite": {"tta_flip": False, "tta_flips": [], "tta_from": "given", "probabilities": True},
    }
    assert "export_tta" not in exported
    interpreter = tf.lite.Interpreter(model_path=str(dest / "model.tflite"))
    outputs = ["class_map", "probabilities"]
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["image"], "outputs": outputs}}
    image = (np.random.default_rng(5).random((20, 30, 3)) * 255).astype(np.uint8)
    out = interpreter.get_signature_runner("serving_default")(image=image)
    assert out["class_map"].shape == (20, 30) and out["class_map"].dtype == np.uint8
    assert np.allclose(out["probabilities"].sum(axis=-1), 1.0, atol=1e-4)  # the model's weights, not NaN
    assert (out["class_map"] == out["probabilities"].argmax(axis=-1)).all()


@pytest.mark.s3
def test_export_from_a_spec_through_the_job_entrypoint_to_s3(infer_masks, s3_prefix, tmp_path):
    """`python -m raysegment.entrypoints export --config SPEC` (what `raysegment submit export` runs) into s3://."""
    import tensorflow as tf

    from raysegment.entrypoints import main as entry_main
    from raysegment.models.loader import local_tree

    model, files, refs = infer_masks
    spec = tmp_path / "export.yaml"
    spec.write_text(f"model: {model}\ndest: {s3_prefix}/exp\nformat: saved_model\nprobabilities: true\n")
    assert entry_main("export", ["--config", str(spec)]) == 0
    dest = storage.resolve(f"{s3_prefix}/exp")
    assert storage.read_json(dest.child("model.json"))["model_id"] == ModelCard.read(model).model_id
    with pytest.raises(SystemExit) as again:
        entry_main("export", ["--config", str(spec)])  # the export exists and the spec does not overwrite
    assert again.value.code == 2
    serve = tf.saved_model.load(local_tree(dest.child("saved_model"))).signatures["serving_default"]
    for f, ref, (h, w) in list(zip(files, refs, SIZES))[:6]:
        out = serve(image=tf.constant(np.asarray(Image.open(f).convert("RGB"))))
        assert out["probabilities"].shape == (h, w, 4)
        if h <= 32:  # Pillow resizes width first: the graph's masks are infer's, byte for byte
            assert (out["class_map"].numpy() == ref).all()
    # --overwrite on S3: the SavedModel's objects are replaced and those the new one lacks removed.
    stray = dest.child("saved_model", "stray.txt")
    storage.write_bytes(stray, b"left by the old export")
    spec.write_text(spec.read_text() + "overwrite: true\n")
    assert entry_main("export", ["--config", str(spec)]) == 0
    assert not storage.exists(stray) and storage.exists(dest.child("saved_model", "saved_model.pb"))
    # A one-file format beside it (one PUT), through the CLI: the card records both, the file runs as the graph.
    import onnxruntime

    result = CliRunner().invoke(main, ["export", model, f"{s3_prefix}/exp", "--format", "onnx"])
    assert result.exit_code == 0 and f"as onnx: {s3_prefix}/exp/model.onnx" in result.output, result.output
    exports = storage.read_json(dest.child("model.json"))["exports"]
    assert sorted(exports) == ["onnx", "saved_model"] and exports["saved_model"]["probabilities"] is True, exports
    session = onnxruntime.InferenceSession(
        storage.read_bytes(dest.child("model.onnx")), providers=["CPUExecutionProvider"]
    )
    image = np.asarray(Image.open(files[0]).convert("RGB"))
    (class_map,) = session.run(["class_map"], {session.get_inputs()[0].name: image})
    assert (class_map == serve(image=tf.constant(image))["class_map"].numpy()).all()
    result = CliRunner().invoke(main, ["export", f"{s3_prefix}/nope", f"{s3_prefix}/exp2", "--format", "onnx"])
    assert result.exit_code == 2 and f"error: {s3_prefix}/nope: not found; check the path" in result.output


def test_encoded_signature_decodes_16_bit_pngs_as_infer(tmp_path):
    """`segment_encoded` brought a 16-bit PNG to 8 bits by its high bytes (a 12-bit camera's image became
    values 0..15) where infer stretches by the image's own maximum, alpha aside; it now decodes as infer."""
    import tensorflow as tf

    from raysegment.data.imaging import _encode_png16, decode_image
    from raysegment.export import decode_as_infer

    rng = np.random.default_rng(3)
    cases = {
        "grey12": (rng.random((20, 30)) * 4095).astype(np.uint16),
        "rgb12": (rng.random((8, 6, 3)) * 4095).astype(np.uint16),
        "rgba16": (rng.random((7, 9, 4)) * 65535).astype(np.uint16),
        "greyalpha16": (rng.random((5, 4, 2)) * 30000).astype(np.uint16),
        "black16": np.zeros((5, 7), np.uint16),
        "rgb8": (rng.random((9, 11, 3)) * 255).astype(np.uint8),
        "grey8": (rng.random((9, 11)) * 255).astype(np.uint8),
    }
    for name, pixels in cases.items():
        path = tmp_path / f"{name}.png"
        if pixels.dtype == np.uint16 and pixels.ndim == 3:  # Pillow writes no 16-bit colour PNG
            data = _encode_png16(pixels, alpha=int(pixels.shape[2] in (2, 4)))
        else:
            Image.fromarray(pixels).save(path)
            data = path.read_bytes()
        got = decode_as_infer(tf.constant(data)).numpy()
        assert got.shape == (*pixels.shape[:2], 3) and got.dtype == np.uint8, name
        assert (got == decode_image(data)).all(), name
    assert decode_image((tmp_path / "grey12.png").read_bytes()).max() == 255  # stretched, not the high byte


def native_model_dir(root: Path, net) -> str:
    """A native-scale model directory holding the Keras model `net` (the card of `make_model_dir`)."""
    from raysegment.train.checkpoint import file_sha256

    model = make_model_dir(str(root), image_size=32, depth=2, base_filters=4)
    path = os.path.join(model, "model.keras")
    net.save(path)
    card = ModelCard.read(model)
    native = card.input.model_copy(update={"resize": "none"})
    card.model_copy(update={"model_sha256": file_sha256(path), "input": native}).write(storage.resolve(model))
    return model


def test_a_native_scale_model_with_resize_upsampling_infers_and_exports(tmp_path):
    """`train --crop native --upsampling resize` builds bilinear UpSampling2D layers, whose Keras resize checks
    its size in Python: at an unknown image size (the predictor's second image size, export's HxW graph) it
    failed with OperatorNotAllowedInGraphError in infer and in every export format. The loaded model resizes
    with the same op at any size; its file stays Keras' own layer."""
    import keras
    import tensorflow as tf

    from raysegment.export import export
    from raysegment.inference.predictor import Predictor
    from raysegment.train.config import ModelConfig

    keras.utils.set_random_seed(0)
    config = ModelConfig(4, 2, 4, batch_norm=True, dropout=0.0, upsampling="resize", head="softmax", input_channels=3)
    model = native_model_dir(tmp_path, config.build())  # as train builds it
    rng = np.random.default_rng(6)
    predictor, errors = Predictor(model), np.asarray([""], object)
    images, preds = [], []
    for shape in [(45, 50, 3), (3, 2, 3), (32, 36, 3)]:  # one batch each: shapes the tf.function has not seen
        batch = np.empty(1, dtype=object)
        batch[0] = (rng.random(shape) * 255).astype(np.uint8)
        images.append(batch[0])
        preds.append(predictor({"image": batch, "error": errors})["pred"][0])
    assert any(len(np.unique(p)) > 1 for p in preds)
    serve = tf.saved_model.load(
        export(ExportSpec(model=model, dest=str(tmp_path / "sm"), format="saved_model"))["path"]
    )
    for img, pred in zip(images, preds):
        assert (serve.signatures["serving_default"](image=tf.constant(img))["class_map"].numpy() == pred).all()


def test_tflite_without_the_ops_a_model_needs_is_one_line_and_no_dest(tmp_path):
    """A native-scale model whose nearest UpSampling2D leaves its channels unknown needs TensorFlow's (Flex)
    Conv2D in TFLite: the converter's 165-line traceback (exit 1) is one line naming the model, the cause
    and the formats that work (exit 2), and DEST is not made."""
    import keras

    keras.utils.set_random_seed(1)
    x = inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.UpSampling2D()(x)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    model = native_model_dir(tmp_path, keras.Model(inp, x))
    result = CliRunner().invoke(main, ["export", model, str(tmp_path / "exp"), "--format", "tflite"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line == (
        f"error: {model}: TFLite's builtin ops cannot run this model (it needs the TensorFlow (Flex) ops Conv2D); "
        "export it with --format saved_model or --format onnx"
    )
    assert not (tmp_path / "exp").exists()


# TFLite's converter error for the model above (TF 2.x), its first line and the lines naming the ops.
FLEX_ERROR = (
    'Could not translate MLIR to FlatBuffer.<unknown>:0: error: loc(callsite(fused["Conv2D:", '
    '"functional_1/conv2d_1_2/convolution@__inference___call___302"])): '
    "'tf.Conv2D' op is neither a custom op nor a flex op\n"
    "<unknown>:0: error: failed while converting: 'main': \n"
    "Some ops are not supported by the native TFLite runtime, you can enable TF kernels fallback using TF "
    "Select. See instructions: https://www.tensorflow.org/lite/guide/ops_select \n"
    "TF Select ops: Conv2D\n"
    "Details:\n"
    "\ttf.Conv2D(tensor<?x?x?x?xf32>, tensor<3x3x4x4xf32>) -> (tensor<?x?x?x4xf32>)\n"
)


def test_a_tflite_converter_failure_is_the_users_only_when_it_names_missing_ops():
    """Every converter failure (out of memory, a crash, a shape-inference bug) was a ConfigError saying the
    builtins cannot run the model (exit 2). Only missing ops are the model's (another format works); any
    other failure is a failed job (exit 3) whose line says what the converter said, not why it guessed."""
    from raysegment.errors import ConfigError, JobError
    from raysegment.export import _converter_error

    for text, missing in (
        (FLEX_ERROR, "it needs the TensorFlow (Flex) ops Conv2D"),
        ("loc(...): error: Custom ops: MyOp\nDetails: ...", "it needs the custom ops MyOp"),
        (
            "error: failed to legalize operation 'tf.Erf' that was explicitly marked illegal",
            "it has no builtin for tf.Erf",
        ),
    ):
        err = _converter_error("m", Exception(text))
        assert type(err) is ConfigError and err.exit_code == 2
        assert str(err) == f"m: TFLite's builtin ops cannot run this model ({missing}); " + (
            "export it with --format saved_model or --format onnx"
        )
    for exc, first in (
        (MemoryError(), "MemoryError"),
        (RuntimeError("std::bad_alloc\n<unknown>:0: note: ..."), "std::bad_alloc"),
        (Exception("Could not translate MLIR to FlatBuffer.\n<unknown>:0: error: 'tfl.reshape' op ..."), None),
    ):
        err = _converter_error("m", exc)
        assert type(err) is JobError and err.exit_code == 3
        first = first or str(exc).splitlines()[0]
        assert str(err) == f"m: TFLite's converter failed: {first} (the whole error is in the log file)"


@pytest.mark.s3
def test_a_parent_prefix_the_role_may_not_read_ends_the_saved_model_walk(tmp_path, monkeypatch):
    """An export role limited to `team/exports/*` gets 403 (not 404) for `team/saved_model.pb`: the walk up
    from DEST for a SavedModel folder failed the export on a prefix the user never named. A denied parent
    ends the walk; a SavedModel within the readable prefix is still found, and DEST's own denial still fails.
    Its own server: the session's identities are fixed when it starts."""
    from raysegment.bench.s3server import S3Server
    from raysegment.errors import StorageError
    from raysegment.export import _saved_model_folder

    bucket, role = "export-walk", "raysegment-exports-only"
    allowed = f"{bucket}/team/exports/*"
    with S3Server(bucket, root=tmp_path / "s3", identities={role: [f"Read:{allowed}", f"List:{allowed}"]}) as s3:
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):  # a shell's would win
            monkeypatch.delenv(key, raising=False)
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        storage.write_bytes(storage.resolve(f"s3://{bucket}/team/exports/sm/saved_model.pb"), b"graph")
        for key, value in s3.env_for(role).items():
            monkeypatch.setenv(key, value)

        def walk(dest: str) -> str | None:
            return _saved_model_folder(storage.resolve(dest))

        assert walk(f"s3://{bucket}/team/exports/run1") is None
        assert walk(f"s3://{bucket}/team/exports/sm/new") == f"s3://{bucket}/team/exports/sm"
        with pytest.raises(StorageError, match="access denied"):
            walk(f"s3://{bucket}/team/elsewhere")


def test_a_model_path_that_does_not_exist_is_named_not_found(tmp_path):
    """`export ./nope DEST` said "./nope: not a trained model (needs model.keras and model.json); run `raysegment
    train`", as if the folder were there: the path is not found, and DEST is not made."""
    missing = tmp_path / "nope"
    result = CliRunner().invoke(main, ["export", str(missing), str(tmp_path / "exp"), "--format", "onnx"])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line == (
        f"error: {missing}: not found; check the path: MODEL is the folder `raysegment train` (--out) or "
        "`raysegment model import` (DEST) wrote"
    )
    assert not (tmp_path / "exp").exists()


def test_dest_inside_a_saved_model_folder_is_refused(tmp_path):
    """`export MODEL exp/saved_model --format onnx` wrote model.onnx and model.json into the SavedModel folder
    of an earlier export, and the next `--format saved_model --overwrite` to exp deleted them silently. A DEST
    that is a SavedModel folder, lies below one or links into one is refused before anything is written."""
    from raysegment.errors import ConfigError
    from raysegment.export import export

    model = make_model_dir(str(tmp_path / "m"), image_size=32, depth=2, base_filters=4)
    result = CliRunner().invoke(main, ["export", model, str(tmp_path / "exp"), "--format", "saved_model"])
    # Its log lies in DEST/logs, as every command's beside its local output (export's stayed in $TMPDIR).
    (log,) = (tmp_path / "exp" / "logs").glob("raysegment-export-*.log")
    assert result.exit_code == 0 and f"  log        {log}" in result.output, result.output
    saved = tmp_path / "exp" / "saved_model"
    before = sorted(p.relative_to(saved) for p in saved.rglob("*"))
    os.symlink(saved, tmp_path / "link")
    for dest in (saved, saved / "variables", saved / "new" / "deeper", tmp_path / "link"):
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=rf"^{dest}: DEST is inside the SavedModel folder {saved} "):
                export(ExportSpec(model=model, dest=str(dest), format="onnx", overwrite=overwrite))
    assert sorted(p.relative_to(saved) for p in saved.rglob("*")) == before
    result = CliRunner().invoke(main, ["export", model, str(saved), "--format", "tflite"])
    assert result.exit_code == 2 and result.output.count("DEST is inside the SavedModel folder") == 1
    assert sorted(p.relative_to(saved) for p in saved.rglob("*")) == before  # a refusal's log is not in DEST
