"""`bench train`'s plain Keras baseline feeds the model what the Ray Data tasks feed it (no Ray here)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from raysegment.bench.train import baseline_dataset
from raysegment.data import synthetic
from raysegment.data.examples import Augmentation, data_range, decode_for_training
from raysegment.models.card import InputSpec

SIZE = 32
STATS = {"mean": [110.0] * 3, "std": [30.0] * 3, "low": [60.0] * 3, "high": [200.0] * 3}
NORM = InputSpec(size=(SIZE, SIZE), normalization="zscore_clipped", stats=STATS)
# The plan's microscopy augmentation (grey data without orientation).
WARPED = Augmentation(
    flip="both", rotate90=True, scale_jitter=0.2, brightness=0.1, contrast=0.1, rotate=180, elastic=1.0, gamma=0.3
)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_baseline_pipeline_matches_ray_data_tasks():
    pairs = [synthetic.make_example(i, SIZE) for i in range(8)]
    images = [_png(np.asarray(Image.fromarray(img).convert("L"))) for img, _ in pairs]
    masks = [_png(mask) for _, mask in pairs]
    batch = {"image": np.array(images, object), "mask": np.array(masks, object)}

    # Without augmentation: the same decode and normalisation, value for value.
    x, y = next(iter(baseline_dataset(images, masks, SIZE, 8, None, NORM)))
    ray = decode_for_training(batch, SIZE, None, NORM)
    np.testing.assert_allclose(x.numpy(), ray["image"], atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), ray["mask"])

    # With the warp: turned windows leave ignore (255) corners, pixels stay in the clipped range, and the
    # windows differ from the plain ones.
    x, y = (t.numpy() for t in next(iter(baseline_dataset(images, masks, SIZE, 8, WARPED, NORM))))
    low, high, _ = data_range(NORM)
    assert x.shape == (8, SIZE, SIZE, 3) and y.shape == (8, SIZE, SIZE)
    assert set(np.unique(y)) <= {0, 1, 2, 3, 255} and (y == 255).any()
    assert x.min() >= low.min() - 1e-5 and x.max() <= high.max() + 1e-5
    assert (y != ray["mask"]).mean() > 0.05


def test_bench_checksums_reads_the_same_shard_both_ways_and_prints_the_share():
    from raysegment.bench.checksums import bench_checksums, checksum_lines

    r = bench_checksums(rows=12, size=32, repeats=2)
    assert r["rows"] == 12 and r["decode_s"] > 0 and r["read_s_with_crc"] > 0 and r["read_s_without_crc"] > 0
    lines = checksum_lines(r)
    assert "without page CRCs" in lines[1] and lines[2].startswith("the CRCs add ")
