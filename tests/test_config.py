"""Job specs: YAML + flags, and one clear message for every wrong field."""

import tracemalloc

import pytest

from raysegment.config import InferOptions, InferSpec, NightlySpec, PrepareSpec, TrainSpec, load_spec
from raysegment.data.imaging import IMAGE_EXTENSIONS
from raysegment.errors import ConfigError
from raysegment.specfile import MAX_SPEC_ALIASES, MAX_SPEC_BYTES


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


def test_infer_and_nightly_share_every_inference_option():
    from raysegment.cli import main

    options = set(InferOptions.model_fields)
    # infer's own: nightly sets fail_if_none_ok for its runs (a night of bad images is reported), and its
    # ledger, not the summaries, says what is done, so --retry-errors is not nightly's.
    assert set(InferSpec.model_fields) == options | {"model", "input", "output", "fail_if_none_ok", "retry_errors"}
    assert options < set(NightlySpec.model_fields)
    for command in ("infer", "nightly"):  # and both commands take them as flags
        flags = {p.name for p in main.commands[command].params}
        assert options - {"endpoint_url"} <= flags, command


def test_extensions_one_list_normalised():
    base = {"model": "m", "input": "i", "output": "o"}
    assert load_spec(InferSpec, None, base).extensions == list(IMAGE_EXTENSIONS)
    assert load_spec(NightlySpec, None, base).extensions == list(IMAGE_EXTENSIONS)
    assert load_spec(InferSpec, None, {**base, "extensions": "PNG, .Jpg"}).extensions == [".png", ".jpg"]
    with pytest.raises(ConfigError, match="field 'extensions': give at least one"):
        load_spec(InferSpec, None, {**base, "extensions": []})


def test_comma_list_flags_and_spec_fields_read_alike():
    # One rule for every comma list, flag or spec file: items stripped, an empty one refused.
    from click.testing import CliRunner

    from raysegment.cli import main

    base = {"source": "s", "dest": "d"}
    assert load_spec(PrepareSpec, None, {**base, "class_names": "a, b"}).class_names == ["a", "b"]
    assert load_spec(PrepareSpec, None, {**base, "class_names": ["a", "b"]}).class_names == ["a", "b"]
    with pytest.raises(ConfigError, match=r"an empty item in 'bg,,cell': separate the items by single commas"):
        load_spec(PrepareSpec, None, {**base, "class_names": "bg,,cell"})  # a typo, not the two classes bg, cell
    runner = CliRunner()
    # "a, a" is one name twice, not the classes "a" and " a"; both refused before anything runs.
    r = runner.invoke(main, ["prepare", "s", "d", "--class-names", "a, a"])
    assert r.exit_code == 2 and "field 'class_names': give 2 to 255 distinct" in r.output, r.output
    r = runner.invoke(main, ["infer", "m", "i", "o", "--extensions", ""])  # as nightly: not silently the defaults
    assert r.exit_code == 2 and "field 'extensions': give at least one extension" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.parametrize("field,value", [("source", "tar"), ("source", "list"), ("overwrite", True)])
def test_nightly_refuses_options_a_night_cannot_honour(field, value):
    with pytest.raises(ConfigError, match=f"--{field}.*does not apply to nightly"):
        load_spec(NightlySpec, None, {"model": "m", "input": "i", "output": "o", field: value})


BILLION_LAUGHS = "\n".join(
    [
        'lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]" for i in range(1, 9)),
        "model: *lol8",
        "input: i",
        "output: o",
    ]
)


def test_yaml_bomb_is_refused_in_a_short_message(tmp_path):
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="YAML aliases") as err:
            load_spec(InferSpec, write(tmp_path, BILLION_LAUGHS))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(str(err.value)) < 300 and peak < 20 << 20


def test_small_alias_expansion_is_quoted_short(tmp_path):
    # Under every bound, but the value is still a nested list: the error quotes a bounded repr.
    text = "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nmodel: [*b, *b, *b]\ninput: i\noutput: o\n"
    with pytest.raises(ConfigError, match=r"field 'model'.*got \[\[\[") as err:
        load_spec(InferSpec, write(tmp_path, text))
    assert len(str(err.value)) < 600


@pytest.mark.parametrize(
    "text,problem",
    [
        ("model: " + "[" * 100 + "]" * 100 + "\n", "nested more than"),
        ("a: &a x\nb: [" + ", ".join(["*a"] * (MAX_SPEC_ALIASES + 1)) + "]\n", "aliases"),
        ("model: m\n" + "#" * (MAX_SPEC_BYTES + 1) + "\n", "KiB"),
        # Few aliases, each doubling the one before: 2**30 values once expanded.
        ("d0: &d0 [x, x]\n" + "".join(f"d{i}: &d{i} [*d{i - 1}, *d{i - 1}]\n" for i in range(1, 31)), "expands to"),
    ],
)
def test_spec_file_bounds(tmp_path, text, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        load_spec(InferSpec, write(tmp_path, text))
    assert len(str(err.value)) < 300


def test_long_values_and_many_unknown_fields_are_cut_short():
    base = {"model": "m", "input": "i", "output": "o"}
    with pytest.raises(ConfigError, match="field 'batch_size'") as err:
        load_spec(InferSpec, None, {**base, "batch_size": "9" * 100_000})
    assert len(str(err.value)) < 300 and "9...9" in str(err.value)
    with pytest.raises(ConfigError, match="unknown fields 'x0', 'x1'") as err:
        load_spec(InferSpec, None, {**base, **{f"x{i}": 1 for i in range(1000)}})
    assert len(str(err.value)) < 800
