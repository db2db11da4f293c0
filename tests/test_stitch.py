"""From probabilities to class maps: bilinear upsampling of probabilities (not nearest class ids),
Gaussian-weighted sliding windows kept a band at a time, and `evaluate` scoring infer's own masks."""

import numpy as np
import pytest

from raysegment.inference import stitch


def test_upsampled_probabilities_are_tf_resize_bilinear_then_argmax():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    probs = rng.random((8, 12, 3)).astype(np.float32)
    for size in [(8, 12), (31, 17), (64, 96), (5, 7)]:
        classes, top = stitch.upsample_argmax(probs, size)
        resized = tf.image.resize(probs, size, method="bilinear").numpy()
        assert classes.shape == size
        assert (classes == resized.argmax(-1)).mean() > 0.999  # float rounding only
        assert abs(top - resized.max(-1).mean()) < 1e-5
    same, _ = stitch.upsample_argmax(probs, (8, 12))
    assert (same == probs.argmax(-1)).all()


def test_a_diagonal_boundary_follows_the_probabilities_not_a_staircase():
    """An 8x8 prediction of a diagonal edge, brought to 64x64: upsampled probabilities put the
    boundary within a pixel of the true line; resampling the class ids (nearest) leaves steps of
    4 pixels or more. The rule matters, not only its code."""
    yy, xx = np.mgrid[0:8, 0:8].astype(np.float32)
    centres = lambda v, n: (v + 0.5) * 64 / n - 0.5  # noqa: E731  model pixel centre in image pixels
    signed = centres(xx, 8) - centres(yy, 8) * 0.6 - 10  # the edge x = 0.6 y + 10 in image pixels
    fg = 1 / (1 + np.exp(-signed / 8))
    probs = np.stack([1 - fg, fg], -1).astype(np.float32)
    upsampled, _ = stitch.upsample_argmax(probs, (64, 64))
    nearest = probs.argmax(-1).repeat(8, 0).repeat(8, 1)
    Y, X = np.mgrid[0:64, 0:64]
    truth = X - 0.6 * Y - 10 > 0

    def worst_offset(classes):  # rows 4..59: within half a model pixel of the border, bilinear clamps
        return max(abs(np.argmax(classes[y] > 0) - (0.6 * y + 10)) for y in range(4, 60))

    assert worst_offset(upsampled) <= 1.0 < 4.0 <= worst_offset(nearest)
    assert (upsampled == truth).mean() > (nearest == truth).mean()


def brute_force_blend(h, w, tile, starts_r, starts_c, window_probs):
    acc = np.zeros((h, w, window_probs[0].shape[-1]))
    weights = stitch.gaussian_window(*tile)
    for (r, c), p in zip([(r, c) for r in starts_r for c in starts_c], window_probs):
        acc[r : r + tile[0], c : c + tile[1]] += p * weights[..., None]
    return acc.argmax(-1)


@pytest.mark.parametrize(
    "shape,tile,overlap", [((100, 70), (32, 32), 16), ((64, 64), (64, 64), 32), ((90, 33), (40, 33), 20)]
)
def test_the_band_blender_equals_blending_the_whole_image(shape, tile, overlap):
    h, w = shape
    rng = np.random.default_rng(1)
    rows, cols = stitch.tile_starts(h, tile[0], overlap), stitch.tile_starts(w, tile[1], overlap)
    probs = [rng.random((*tile, 4)).astype(np.float32) for _ in range(len(rows) * len(cols))]
    blender = stitch.WindowBlender(h, w, tile, 4)
    out = np.full((h, w), 255, np.uint8)
    band_rows = []
    for (r, c), p in zip([(r, c) for r in rows for c in cols], probs):
        for start, classes, top in blender.finish_rows(r):
            out[start : start + len(classes)] = classes
            assert (top > 0).all() and (top <= 1 + 1e-6).all()
        blender.add(r, c, p)
        band_rows.append(blender.band.shape[0])
    for start, classes, _ in blender.finish_rows(h):
        out[start : start + len(classes)] = classes
    assert set(band_rows) == {tile[0]}  # memory: one window-high band, whatever the image height
    assert (out == brute_force_blend(h, w, tile, rows, cols, probs)).all()


def test_gaussian_weights_favour_the_window_centre():
    g = stitch.gaussian_window(64, 64)
    assert g.max() == pytest.approx(1.0) and g.min() == pytest.approx(stitch.MIN_WEIGHT)
    assert g[32, 32] > g[32, 48] > g[32, 63]


@pytest.mark.slow
def test_evaluate_scores_exactly_the_masks_infer_writes(tiny_model, ray_cluster, tmp_path):
    """Images of other sizes than the model's 32x32: evaluate's confusion matrix on the val split
    equals the one computed from infer's mask files for the same images."""
    import os

    from PIL import Image

    from raysegment.config import EvaluateSpec, InferSpec, PrepareSpec
    from raysegment.data import synthetic
    from raysegment.data.prepare import prepare
    from raysegment.evaluate import evaluate
    from raysegment.inference.pipeline import infer
    from raysegment.models.metrics import confusion_matrix

    _, model = tiny_model
    src = tmp_path / "src"
    for i, (h, w) in enumerate([(45, 61), (29, 40), (64, 50), (37, 37), (80, 33), (21, 70)] * 2):
        img, mask = synthetic.make_example(500 + i, size=max(h, w))
        os.makedirs(src / "images", exist_ok=True)
        os.makedirs(src / "masks", exist_ok=True)
        Image.fromarray(img[:h, :w]).save(src / "images" / f"{i:03d}.png")
        Image.fromarray(mask[:h, :w]).save(src / "masks" / f"{i:03d}.png")
    keys = [f"{i:03d}" for i in range(0, 12, 2)]
    prepare(PrepareSpec(source=str(src), dest=str(tmp_path / "data"), val_keys=",".join(keys)))
    scored = evaluate(EvaluateSpec(model=model, data=str(tmp_path / "data"), out=str(tmp_path / "eval.json")))

    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in keys:
        os.link(src / "images" / f"{k}.png", inputs / f"{k}.png")
    infer(InferSpec(model=model, input=str(inputs), output=str(tmp_path / "out"), report=False))
    k = len(scored["per_class_iou"])
    cm = np.zeros((k, k), np.int64)
    for key in keys:
        truth = np.asarray(Image.open(src / "masks" / f"{key}.png"))
        written = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{key}.png"))
        assert written.shape == truth.shape
        cm += confusion_matrix(truth, written, k)
    assert scored["images"] == len(keys)
    assert cm.tolist() == scored["confusion_matrix"]
