"""`evaluate`: a trained model on a data set split, metrics from one accumulated confusion matrix.

Predictions are made at the model's input size and resized (nearest) to each
image's original size, so the metrics are those a user of `infer` would see.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from raysegment import progress, storage
from raysegment.config import EvaluateSpec
from raysegment.data import imaging
from raysegment.data.manifest import Manifest, read_manifest
from raysegment.data.pipeline import read_split
from raysegment.errors import DataError
from raysegment.inference.predictor import Predictor, preprocess
from raysegment.models.card import InferenceAdvice, ModelCard, evaluation_file
from raysegment.models.metrics import (
    EDGE_BANDS,
    confusion_matrix,
    edge_error_counts,
    edge_error_table,
    metrics_from_confusion,
)

log = logging.getLogger(__name__)


def _rename(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch["bytes"] = batch.pop("image")
    return batch


def _confusion(batch: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """One batch's confusion and edge counts; `unread`: the first image the model could not take (a data set of
    other bands or channels than the model's), as `KEY: why`, which fails the run (no score leaves it out)."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    edges = np.zeros((len(EDGE_BANDS), 2), np.int64)
    errors = batch.get("error", [""] * len(batch["pred"]))
    unread = next((f"{key}: {error}" for key, error in zip(batch["key"], errors) if error), "")
    for pred, mask_bytes, h, w, error in zip(batch["pred"], batch["mask"], batch["height"], batch["width"], errors):
        if error:
            continue
        truth = imaging.decode_mask(mask_bytes)
        pred = imaging.resize_mask(pred, (int(h), int(w)))
        cm += confusion_matrix(truth, pred, num_classes)
        edges += edge_error_counts(truth, pred, num_classes)
    return {
        "cm": cm.reshape(1, -1),
        "edges": edges.reshape(1, -1),
        "rows": np.asarray([len(batch["pred"])]),
        "unread": np.asarray([unread], dtype=object),
    }


# `train` turns flip TTA on in the card where it raises val mIoU by at least this much (`measure_tta`): below it
# the gain is noise on a few dozen images, and TTA costs 2-4 model passes.
TTA_MIN_GAIN = 0.002
TTA_IMAGES = 64  # val images `measure_tta` scores (the first ones): a bounded cost at the end of training


def measure_tta(
    model_uri: str, data_loc: storage.Location, manifest: Manifest, endpoint_url: str | None = None
) -> InferenceAdvice:
    """The model's val mIoU without and with flip TTA, and the card's advice: on when TTA gains TTA_MIN_GAIN.

    Scored as `evaluate` scores (the same preprocess, Predictor and confusion steps, here in this process)
    on the first TTA_IMAGES val images, so the numbers are those a user of `infer` would see."""
    card = ModelCard.read(model_uri, endpoint_url)
    columns = ["key", "image", "mask", "height", "width"]
    rows = read_split(data_loc, manifest, "val", columns=columns).take_batch(TTA_IMAGES, batch_format="numpy")
    n, k = len(rows["key"]), card.num_classes
    step = EvaluateSpec.model_fields["batch_size"].default  # evaluate's batches
    scores = {}
    for name, flag in (("plain", False), ("tta", True)):
        predictor, cm = Predictor(model_uri, endpoint_url, tta_flip=flag), np.zeros((k, k), np.int64)
        for start in range(0, n, step):
            batch = _rename({c: rows[c][start : start + step] for c in columns})
            batch = predictor(preprocess(batch, card, imaging.MAX_PIXELS))
            scored = _confusion(batch, k)
            if scored["unread"][0]:
                raise DataError(f"{data_loc.uri}: val image {scored['unread'][0]}")
            cm += scored["cm"].reshape(k, k)
        scores[name] = float(metrics_from_confusion(cm, card.class_names)["mean_iou"])
    return InferenceAdvice(
        tta_flip=scores["tta"] - scores["plain"] >= TTA_MIN_GAIN,
        val_mean_iou=scores,
        images=n,
        flips=list(card.tta(True).flips),
        min_gain=TTA_MIN_GAIN,
    )


def check_class_names(data_uri: str, data_names: list[str], model_names: list[str]) -> None:
    """The data set's class ids must mean the model's: the same names in another order would score each
    class against another one (refused); other names may be a renaming, which is only warned of."""
    if data_names == model_names:
        return
    if sorted(data_names) == sorted(model_names):
        raise DataError(
            f"{data_uri}: its classes {data_names} are the model's {model_names} in another order; its ids would be "
            "scored against the wrong classes: prepare it with the model's order (--class-names)"
        )
    log.warning("evaluate: the data set's classes %s are not named as the model's %s", data_names, model_names)
    progress.note(
        f"evaluate: warning: the data set's classes {data_names} are not named as the model's {model_names}; "
        "scores are by id, under the model's names"
    )


def evaluate(spec: EvaluateSpec) -> dict[str, Any]:
    """Compute and write metrics; returns them."""
    card = ModelCard.read(spec.model, spec.endpoint_url, verify_model=True)
    data_loc, manifest = read_manifest(spec.data, spec.endpoint_url)
    k = card.num_classes
    if manifest.num_classes != k:
        raise DataError(f"{data_loc.uri}: {manifest.num_classes} classes, but the model predicts {k}")
    check_class_names(data_loc.uri, list(manifest.class_names), list(card.class_names))
    ds = read_split(data_loc, manifest, spec.split, columns=["key", "image", "mask", "height", "width"])
    ds = ds.map_batches(_rename, batch_format="numpy")
    ds = ds.map_batches(
        preprocess,
        fn_kwargs={"card": card, "max_pixels": imaging.MAX_PIXELS},
        batch_size=spec.batch_size,
        batch_format="numpy",
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_uri": spec.model, "endpoint_url": spec.endpoint_url, "tta_flip": spec.tta_flip},
        batch_size=spec.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    ds = ds.map_batches(_confusion, fn_kwargs={"num_classes": k}, batch_size=spec.batch_size, batch_format="numpy")
    cm = np.zeros((k, k), np.int64)
    edges = np.zeros(len(EDGE_BANDS) * 2, np.int64)
    images = 0
    with progress.stage("evaluate", manifest.counts.of(spec.split)) as shown:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if unread := next((str(u) for u in batch["unread"] if u), None):
                raise DataError(
                    f"{data_loc.uri}: the model cannot take its {spec.split} image {unread}; a score without it "
                    "would pass for the split's: evaluate a data set the model can read (prepared as its own was)"
                )
            cm += batch["cm"].sum(axis=0).reshape(k, k)
            edges += batch["edges"].sum(axis=0)
            images += int(batch["rows"].sum())
            shown.update(int(batch["rows"].sum()))
    result = {
        **metrics_from_confusion(cm, card.class_names),
        "split": spec.split,
        **card.tta(spec.tta_flip).record(),  # the Predictor's same decision
        "images": images,
        "model_id": card.model_id,
        "data_content_hash": manifest.content_hash,
        "confusion_matrix": cm.tolist(),
        # Where the errors are: on a label edge, an annotator's own pixel-level choice, or away from one.
        "errors_by_edge_distance": edge_error_table(edges),
    }
    out = (
        storage.resolve(spec.out, spec.endpoint_url)
        if spec.out
        else storage.resolve(spec.model, spec.endpoint_url).child(evaluation_file(spec.split))
    )
    storage.write_json(out, result)
    result["written_to"] = out.uri
    return result
