"""Job specs: YAML + flags, and one clear message for every wrong field."""

import pytest

from raysegment.config import InferSpec, TrainSpec, load_spec
from raysegment.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_and_flags_flags_win(tmp_path):
    path = write(tmp_path, "data: /d\nout: /o\nepochs: 3\nbatch_size: 4\n")
    spec = load_spec(TrainSpec, path, {"epochs": 7, "workers": None})
    assert (spec.data, spec.epochs, spec.batch_size, spec.workers) == ("/d", 7, 4, 2)


def test_misspelt_field_names_file_field_and_allowed(tmp_path):
    path = write(tmp_path, "data: /d\nout: /o\nepoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_spec(TrainSpec, path)
    msg = str(err.value)
    assert path in msg and "unknown field 'epoch'" in msg and "epochs" in msg
    assert "\n" not in msg


def test_wrong_type_and_range(tmp_path):
    path = write(tmp_path, "data: /d\nout: /o\nepochs: ten\n")
    with pytest.raises(ConfigError, match="field 'epochs'.*integer"):
        load_spec(TrainSpec, path)
    with pytest.raises(ConfigError, match="field 'workers'"):
        load_spec(TrainSpec, None, {"data": "/d", "out": "/o", "workers": -1})


def test_missing_required_field():
    with pytest.raises(ConfigError, match="field 'output' is required"):
        load_spec(InferSpec, None, {"model": "m", "input": "i"})


def test_credentials_in_uri_rejected():
    with pytest.raises(ConfigError, match="credentials in a URI") as err:
        load_spec(InferSpec, None, {"model": "s3://AKIA:secret@bucket/m", "input": "i", "output": "o"})
    assert "secret" not in str(err.value).replace("credentials in a URI", "")


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_spec(TrainSpec, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(TrainSpec, write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_spec(TrainSpec, str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "spec,field,value",
    [
        (InferSpec, "batch_size", 0),
        (InferSpec, "batch_size", 10**9),
        (InferSpec, "max_error_fraction", -0.1),
        (InferSpec, "max_pixels", 10**12),
        (InferSpec, "storage_retry_s", -1),
        (InferSpec, "tile_size", 0),
        (InferSpec, "actors", "4:2"),
        (InferSpec, "precision", "int4"),
        (TrainSpec, "epochs", 10**9),
        (TrainSpec, "learning_rate", -1e-3),
        (TrainSpec, "repeat", 0),
        (TrainSpec, "name", "../escape"),
    ],
)
def test_out_of_range_values_name_the_field(spec, field, value):
    base = {"model": "m", "input": "i", "output": "o"} if spec is InferSpec else {"data": "d", "out": "o"}
    with pytest.raises(ConfigError, match=f"field '{field}'") as err:
        load_spec(spec, None, {**base, field: value})
    assert "\n" not in str(err.value)
