"""`ModelCard.read`, the one way every command opens MODEL: a path that is not there is named not found."""

import contextlib

import pytest

from raysegment.config import EvaluateSpec, InferSpec
from raysegment.errors import DataError

NOT_FOUND = "not found; check the path: MODEL is the folder `raysegment train` (--out) or `raysegment model import`"


def test_a_mistyped_model_path_is_not_found_in_every_command_and_an_empty_folder_is_no_model(tmp_path):
    """Only `export` said "not found" for a MODEL that is not there; `infer`, `evaluate`, `serve` and `show` said
    "not a trained model (needs model.keras and model.json); run `raysegment train`", as if the folder were there.
    A folder without model.json is still "not a trained model"."""
    from raysegment.evaluate import evaluate
    from raysegment.inference.pipeline import plan

    empty = tmp_path / "empty"
    empty.mkdir()
    runs = {
        "infer": lambda model: plan(
            InferSpec(model=model, input=str(tmp_path / "in"), output=str(tmp_path / "out")), contextlib.ExitStack()
        ),
        "evaluate": lambda model: evaluate(EvaluateSpec(model=model, data=str(tmp_path / "data"))),
    }
    for command, run in runs.items():
        with pytest.raises(DataError) as missing:
            run(str(tmp_path / "nope"))
        assert str(missing.value) == f"{tmp_path / 'nope'}: {NOT_FOUND} (DEST) wrote", command
        with pytest.raises(DataError) as no_card:
            run(str(empty))
        assert str(no_card.value) == (
            f"{empty}: not a trained model (needs model.keras and model.json); run `raysegment train`"
        ), command
    assert not (tmp_path / "out").exists()
