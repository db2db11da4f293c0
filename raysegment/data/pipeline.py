"""Ray Data pipelines over a prepared data set: read shards, decode, resize or crop, augment, normalise.

All of it runs in Ray Data map tasks on CPU workers, which stream batches to
the Ray Train workers; the train loop only sees ready (N, S, S, 3) float32
images and (N, S, S) uint8 class-id masks. Normalisation is inference's own
(`card.normalize` with the `InputSpec` the model card is written with), so
a model sees the same numbers in training and in `infer`, `evaluate`, `show`,
`serve` and exports. What happens to each example is in `data/examples.py` (no Ray there); the
augmentation maths is in `data/augment.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raysegment import storage
from raysegment.data import imaging
from raysegment.data.examples import Augmentation, decode_for_training
from raysegment.data.manifest import RE_PREPARE, Manifest
from raysegment.errors import DataError
from raysegment.models.card import InputSpec

READ_ROWS = 32


def _read_shards(batch: dict[str, np.ndarray], loc: storage.Location, columns: list[str] | None) -> Iterator[pa.Table]:
    """Stream the rows of each listed shard, READ_ROWS at a time (bounded memory whatever the shard size).

    A shard whose size or row count is not the manifest's was changed after `prepare` (replaced, cut short,
    another split's copied over it): an error, before its rows are scored as the data set's."""
    for path, rows, size in zip(batch["path"], batch["rows"], batch["bytes"]):
        shard = loc.child(str(path))
        with storage.storage_errors(shard.uri), shard.fs.open(shard.path, "rb") as f:
            try:
                parquet = pq.ParquetFile(f, **storage.VERIFY_PAGES)
            except pa.ArrowException as exc:
                raise storage.damaged_parquet(shard, shard.path, exc, RE_PREPARE) from exc
            found = (f.size, parquet.metadata.num_rows)
            if found != (int(size), int(rows)):
                raise DataError(
                    f"{shard.uri}: {found[0]} bytes and {found[1]} rows, but the manifest lists {size} bytes and "
                    f"{rows} rows: the shard was changed after prepare; {RE_PREPARE}"
                )
            batches = parquet.iter_batches(batch_size=READ_ROWS, columns=columns)
            while True:
                try:
                    record_batch = next(batches, None)
                except (pa.ArrowException, OSError) as exc:
                    if isinstance(exc, OSError) and not storage.failed_checksum(exc):
                        raise  # a read that failed (storage_errors names it), not a damaged page
                    raise storage.damaged_parquet(shard, shard.path, exc, RE_PREPARE) from exc
                if record_batch is None:
                    break
                yield pa.Table.from_batches([record_batch])


def read_split(
    loc: storage.Location, manifest: Manifest, split: str, columns: list[str] | None = None, repeat: int = 1
) -> ray.data.Dataset:
    """The shards of one split as a Ray dataset (only shards the manifest lists).

    One task per shard reads it with pyarrow. Not `ray.data.read_parquet`: its file
    listing and metadata stages cost 3-8 s per execution here, and a training epoch
    executes the dataset anew (measured: 30 images, 7 s to the first batch with
    read_parquet, 0.07 s this way).
    """
    shards = manifest.split_shards(split)
    if not shards:
        raise DataError(f"{loc.uri}: split '{split}' has no shards (counts: {manifest.counts.to_json()})")
    items = [{"path": s.path, "rows": s.rows, "bytes": s.bytes} for s in shards] * repeat
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # A quarter CPU, unlike the decoding map after it: ops with equal resources are fused, and the fused
    # task then took the decoder's 32 rows of input, i.e. 32 shards: one task read, decoded and augmented
    # a whole small split while training waited for its first batch (1.4 s of a 9.5 s epoch, measured).
    # Apart, each shard is read on its own and decoding streams in 32-row batches.
    return ds.map_batches(
        _read_shards, fn_kwargs={"loc": loc, "columns": columns}, batch_size=1, batch_format="numpy", num_cpus=0.25
    )


def training_dataset(
    loc: storage.Location,
    manifest: Manifest,
    split: str,
    size: int,
    augment: bool | Augmentation | None,
    repeat: int = 1,
    norm: InputSpec | None = None,
) -> ray.data.Dataset:
    """Decoded, resized or cropped (for training, augmented) batches ready for the train loop.

    `augment` is an Augmentation (see `Augmentation.from_spec`), True for the default one,
    or False/None for a plain resize, as validation and inference see the images
    (`examples.native_validation`: the windows a `crop: native` model is validated on). `repeat` reads the split that many times per
    epoch (small data sets with random crops: more steps per epoch, fewer epoch ends).
    `norm`: the model card's input (its normalisation); default scale_0_1.
    """
    aug = Augmentation() if augment is True else (augment or None)
    ds = read_split(loc, manifest, split, columns=["image", "mask"], repeat=repeat)
    # Validation windows are a grid of up to 16 per image: a block holds about 32 windows either way.
    per_image = aug.grid[0] * aug.grid[1] if aug is not None and aug.crop == "center" else 1
    return ds.map_batches(
        decode_for_training,
        fn_kwargs={"size": size, "augment": aug, "norm": norm},
        batch_size=max(1, 32 // per_image),
        batch_format="numpy",
    )


def padded_for_workers(ds: ray.data.Dataset, rows: int, workers: int, size: int, channels: int) -> ray.data.Dataset:
    """`ds` (`rows` examples of `size` px) with rows added so that `workers` equal shares hold all of it.

    Ray Train hands each worker an equal share of a split (`streaming_split(equal=True)`) and drops the
    rest: one val image and two workers validated nothing, and every val metric read 0. The added rows'
    masks are all ignore, so they add no pixel to any count."""
    short = -rows % workers
    if not short:
        return ds
    blank = {
        "image": np.zeros((size, size, channels), np.float32),
        "mask": np.full((size, size), imaging.IGNORE_INDEX, np.uint8),
    }
    return ds.union(ray.data.from_items([blank] * short))
