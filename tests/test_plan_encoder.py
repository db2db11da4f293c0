"""The plan's encoder rule (#15 item 5): colour photographs get an ImageNet-pretrained encoder where its
weights are in the driver's Keras cache (this machine has no network for them), and training ships that
file to the workers, which load exactly it. The cache is a temporary KERAS_HOME holding a real
legacy-format weights file of a randomly initialised backbone, named as keras.applications names it."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import fingerprint, manifest

from raysegment import plan
from raysegment.config import TrainSpec, load_spec
from raysegment.models.pretrained import IMAGENET_NOTOP, cached_weights, local_copy

CPU = plan.Compute(workers=2)
GPU = plan.Compute(workers=1, gpus_per_worker=1)
PHOTOS = fingerprint(side=100)  # RGB, 8-bit: the plain U-Net's window is 112 px (a multiple of 16)
GREY = dataclasses.replace(PHOTOS, modes={"L": 100}, channels={"1": 100})
DEEP = dataclasses.replace(PHOTOS, modes={"uint16x3": 100}, dtypes={"uint16": 100})
FOUR_BANDS = dataclasses.replace(PHOTOS, modes={"uint8x4": 100}, channels={"4": 100})  # e.g. RGB + near infrared
# Photos with an alpha band (RGBA, transparent palette PNGs) beside plain RGB ones: the model sees RGB.
WITH_ALPHA = dataclasses.replace(PHOTOS, modes={"RGB": 60, "RGBA": 30, "P": 10}, channels={"3": 60, "4": 40})
MANIFEST = manifest(
    fingerprint=PHOTOS.to_json(),
    counts={"train": 80, "val": 20},
    num_classes=2,
    class_names=["background", "thing"],
    pixel_frequency=[0.7, 0.3],
    channels=3,
)


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """(KERAS_HOME, the source backbone's weights): mobilenetv3large's no-top ImageNet file in its cache,
    written in the legacy HDF5 format Keras' downloads come in, from a randomly initialised backbone."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    from raysegment.models.encoders import backbone

    home = tmp_path_factory.mktemp("keras-home")
    (home / "models").mkdir()
    source = backbone("mobilenetv3large", None)
    rng = np.random.default_rng(0)
    for w in source.weights:  # none left at a constant initial value (BN's ones and zeros): a load must be real
        w.assign(rng.normal(size=w.shape).astype(w.dtype))
    with h5py.File(home / "models" / IMAGENET_NOTOP["mobilenetv3large"], "w") as f:
        save_weights_to_hdf5_group(f, source)
    return home, [w.numpy() for w in source.weights]


@pytest.fixture
def cache(imagenet_file, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(imagenet_file[0]))
    return imagenet_file[0] / "models"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    return tmp_path / "models"


def planned(**values):
    """(plan, spec) `train` would train for these spec values on the crafted colour data set."""
    spec = load_spec(TrainSpec, None, {"data": "d", "out": "o", **values})
    p = plan.plan_for_spec(spec, None, MANIFEST)
    return p, plan.planned_spec(spec, p)


def test_colour_photos_get_the_first_cached_encoder_for_the_device(cache, tmp_path, monkeypatch):
    p = plan.make_plan(PHOTOS, 80, CPU)
    assert (p.encoder, p.architecture, p.normalization, p.pixel_stats) == (
        "mobilenetv3large",
        "unet",
        "raw_0_255",
        None,
    )
    assert (p.image_size, p.depth) == (128, 5)  # 112 px rounded up to the encoder's multiple of 32
    assert str(cache) in p.reasons["encoder"] and "raw 0..255" in p.reasons["normalization"]
    # `raysegment plan` prints the choice, and what train trains is what the plan says (the card's record).
    printed = "\n".join(plan.format_plan(p))
    assert "encoder        mobilenetv3large" in printed and "normalization  raw_0_255" in printed
    p, spec = planned()
    assert {k: getattr(spec, k) for k in plan.PLAN_FIELDS} == p.train_values()
    assert (spec.encoder, spec.encoder_weights, spec.normalization, spec.model_depth) == (
        "mobilenetv3large",
        "imagenet",
        "raw_0_255",
        5,
    )
    # On a GPU a stronger encoder, only where its weights are cached, in the order of preference. The rule
    # looks for the file only (training loads it): placeholders stand in for the big backbones here.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / IMAGENET_NOTOP["mobilenetv3large"]).write_bytes(b"placeholder")
    gpu = plan.make_plan(PHOTOS, 80, GPU)
    assert gpu.encoder is None and gpu.normalization == "zscore" and gpu.image_size == 112
    assert (
        "--encoder resnet50" in gpu.reasons["encoder"]
        and "not a gpu choice: mobilenetv3large" in gpu.reasons["encoder"]
    )
    (tmp_path / "models" / IMAGENET_NOTOP["efficientnetv2s"]).write_bytes(b"placeholder")
    assert plan.make_plan(PHOTOS, 80, GPU).encoder == "efficientnetv2s"
    (tmp_path / "models" / IMAGENET_NOTOP["resnet50"]).write_bytes(b"placeholder")
    assert plan.make_plan(PHOTOS, 80, GPU).encoder == "resnet50"


def test_photos_with_an_alpha_band_are_colour_photos(cache):
    assert plan.make_plan(WITH_ALPHA, 80, CPU).encoder == "mobilenetv3large"


def test_without_cached_weights_the_plain_unet_and_the_reason_names_the_fix(empty_cache):
    p = plan.make_plan(PHOTOS, 80, CPU)
    assert (p.encoder, p.architecture, p.normalization, p.image_size) == (None, "unet", "zscore", 112)
    reason = p.reasons["encoder"]
    assert str(empty_cache) in reason and "--encoder mobilenetv3large" in reason and "--encoder-weights PATH" in reason
    assert cached_weights("mobilenetv3large") is None


@pytest.mark.parametrize("fp", [GREY, DEEP, FOUR_BANDS], ids=["grey", "16-bit", "4-band"])
def test_microscopy_like_and_multi_band_data_never_get_an_encoder(cache, fp):
    p = plan.make_plan(fp, 80, CPU)
    assert p.encoder is None and p.normalization != "raw_0_255"
    assert "not 8-bit colour photographs" in p.reasons["encoder"]


def test_given_flags_override_the_encoder_rule(cache, tmp_path):
    # A given encoder is kept (its weights are downloaded by Keras where they are not cached), and fixes
    # the input as the plan's would.
    p, spec = planned(encoder="resnet50")
    assert (spec.encoder, spec.normalization, spec.image_size % 32, p.given) == (
        "resnet50",
        "raw_0_255",
        0,
        ("encoder",),
    )
    assert "each worker downloads them" in p.reasons["encoder"]
    assert "sent to the workers" in planned(encoder="mobilenetv3large")[0].reasons["encoder"]
    # Given choices an encoder cannot honour keep the plain U-Net.
    for values, why in [
        ({"architecture": "resunet"}, "residual U-Net given"),
        ({"normalization": "zscore"}, "normalisation given"),
        ({"depth": 4}, "depth given"),
        ({"image_size": 112}, "not a multiple of 32"),
        ({"encoder_weights": "none"}, "without --encoder"),
        ({"encoder_weights": str(tmp_path / "w.weights.h5")}, "add --encoder"),
    ]:
        p, spec = planned(**values)
        assert spec.encoder is None and why in p.reasons["encoder"], values
    assert planned(image_size=96)[1].encoder == "mobilenetv3large"
    assert planned(architecture="unet")[1].encoder == "mobilenetv3large"
    # --no-plan trains the spec as written: no encoder.
    assert load_spec(TrainSpec, None, {"data": "d", "out": "o", "plan": False}).encoder is None
    with pytest.raises(ValueError, match="raw_0_255 is an --encoder's input"):
        TrainSpec(data="d", out="o", normalization="raw_0_255")


def test_workers_load_exactly_the_shipped_cached_file(cache, imagenet_file, ray_cluster, tmp_path, monkeypatch):
    import ray

    from raysegment.train.config import train_config

    _, spec = planned(workers=2, batch_size=2)
    cfg = train_config(spec, MANIFEST, "d").model
    assert (cfg.encoder, cfg.encoder_weights, cfg.shipped_weights) == ("mobilenetv3large", "imagenet", None)
    cfg = cfg.ship_weights()
    shipped = cfg.shipped_weights
    source = cache / IMAGENET_NOTOP["mobilenetv3large"]
    assert (shipped.name, shipped.source) == (source.name, str(source))
    assert shipped.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()

    # Another process (a Ray worker) gets the bytes from the object store, not from the driver's cache.
    @ray.remote(num_cpus=0)
    def copy_on_worker(config, root):
        path = Path(local_copy(config.shipped_weights, root))
        return str(path), hashlib.sha256(path.read_bytes()).hexdigest()

    path, digest = ray.get(copy_on_worker.remote(cfg, str(tmp_path / "worker")))
    assert path.startswith(str(tmp_path / "worker")) and Path(path).name == source.name
    assert digest == shipped.sha256
    # The worker's build, with no cache on its node: the encoder holds exactly the file's weights.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    model = cfg.build()
    loaded = [w.numpy() for w in model.get_layer("mobilenetv3large_encoder").weights]
    expected = imagenet_file[1]
    assert len(loaded) == len(expected) > 100
    assert all(np.array_equal(a, b) for a, b in zip(loaded, expected))
    assert (tmp_path / "raysegment-weights" / shipped.sha256[:16] / source.name).is_file()
    # Without a cached file nothing is shipped: Keras downloads on each worker, as before.
    assert dataclasses.replace(cfg, encoder="resnet50", shipped_weights=None).ship_weights().shipped_weights is None
