"""`train` makes the plan `raysegment plan` prints (#15 item 2): fields not given come from it, a given
one overrides exactly its part and is recorded as given, `--no-plan` keeps the fixed defaults, and the
time budget stops training."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fingerprint, manifest, write_source

from raysegment import jobs, plan
from raysegment.config import PrepareSpec, TrainSpec, load_spec
from raysegment.models.card import ModelCard
from raysegment.registry import load_job_spec

RAYSEGMENT = str(Path(sys.executable).parent / "raysegment")
LARGE = fingerprint(side=1024, shares=(0.95, 0.05), areas=(1e5, 40.0))
MANIFEST = manifest(fingerprint=LARGE.to_json(), counts={"train": 80, "val": 20})


def planned(**flags):
    """What `train` would train for these CLI flags (None = not given) on the crafted data set."""
    spec = load_spec(TrainSpec, None, {"data": "d", "out": "o", **flags})
    p = plan.plan_for_spec(spec, None, MANIFEST)
    return p, plan.planned_spec(spec, p)


# --- the rule, without training -------------------------------------------------------------------


def test_no_flags_train_the_plan_that_plan_prints():
    p, spec = planned(epochs=None, batch_size=None, crop=None)  # what click passes for flags not given
    printed = plan.make_plan(LARGE, 80, plan.Compute(2, 0.0, 1.0))
    assert p == printed and p.given == ()
    assert {k: getattr(spec, k) for k in plan.PLAN_FIELDS} == printed.train_values()
    assert (spec.crop, spec.image_size, spec.loss) == ("native", 256, "ce+dice")
    assert spec.time_budget == printed.time_budget_s  # the plan chose the epochs: its budget stops training


def test_a_given_flag_overrides_exactly_its_part_and_is_recorded_as_given():
    base, _ = planned()
    p, spec = planned(batch_size=2)
    assert p.given == ("batch_size",) and spec.batch_size == 2
    assert {k: v for k, v in p.train_values().items() if k != "batch_size"} == {
        k: v for k, v in base.train_values().items() if k != "batch_size"
    }
    assert "batch_size" not in p.auto
    # Given values are inputs to the rules that depend on them: the window sets the depth, epochs the warm-up.
    p, spec = planned(image_size=96, epochs=60)
    assert (spec.image_size, spec.depth, spec.epochs, spec.warmup_epochs) == (96, 3, 60, 2.0)
    assert spec.time_budget is None  # epochs given, no budget given: nothing stops training early
    assert "given" in p.reasons["epochs"]


def test_a_value_given_equal_to_its_default_is_still_given(tmp_path):
    (tmp_path / "spec.yaml").write_text("data: d\nout: o\nepochs: 10\nloss: ce\n")
    spec = load_spec(TrainSpec, str(tmp_path / "spec.yaml"))
    p = plan.plan_for_spec(spec, None, MANIFEST)
    assert p.given == ("loss", "epochs") and (p.loss, p.epochs) == ("ce", 10)
    # `raysegment submit` sends the spec inline: the given fields travel even where they equal a default,
    # and the submission id tells such a spec from one that leaves them to the plan.
    sent = shlex.split(jobs.entrypoint("train", spec))[5]
    assert load_job_spec("train", spec_json=sent).model_fields_set == spec.model_fields_set
    assert jobs.submission_id("train", spec) != jobs.submission_id("train", TrainSpec(data="d", out="o"))


def test_no_plan_keeps_the_fixed_defaults():
    from raysegment.train.trainer import apply_plan

    spec = load_spec(TrainSpec, None, {"data": "d", "out": "o", "plan": False})
    trained, record = apply_plan(spec, None, MANIFEST)
    assert record is None and trained is spec
    defaults = {k: TrainSpec.model_fields[k].default for k in plan.PLAN_FIELDS}
    assert {k: getattr(trained, k) for k in plan.PLAN_FIELDS} == defaults
    assert (defaults["image_size"], defaults["epochs"], defaults["crop"]) == (128, 10, "resize")


def test_the_plan_record_is_the_cards_typed_plan():
    """`apply_plan` recorded the plan as a dict, extended by spreads and read by key until the card was built;
    it is the card's `TrainingPlan`, with the budget training stops at, as the card writes it."""
    from raysegment.models.card import TrainingPlan
    from raysegment.train.trainer import apply_plan

    spec = load_spec(TrainSpec, None, {"data": "d", "out": "o", "batch_size": 4})
    trained, record = apply_plan(spec, None, MANIFEST)
    assert isinstance(record, TrainingPlan) and record.stop_at_s == trained.time_budget is not None
    assert record.given == ["batch_size"] and "epochs" in record.auto and record.values["batch_size"] == 4
    assert list(record.model_dump(mode="json", exclude_unset=True)) == [
        "values", "given", "auto", "reasons", "time_budget_s", "stop_at_s", "compute", "normalization",
        "oversample_rare",
    ]  # fmt: skip


def test_train_refuses_a_data_set_without_val_images_before_printing_a_plan(capsys):
    """`train` printed its plan, then refused a data set with no val split; `plan` refuses it without one."""
    from raysegment.errors import DataError
    from raysegment.train.trainer import apply_plan

    spec = load_spec(TrainSpec, None, {"data": "d", "out": "o"})
    with pytest.raises(DataError, match="no validation images"):
        apply_plan(spec, None, manifest(fingerprint=LARGE.to_json(), counts={"train": 80, "val": 0}))
    assert "plan for the data set" not in capsys.readouterr().err


def test_time_budget_parses_like_plan_and_old_cards_load():
    assert load_spec(TrainSpec, None, {"data": "d", "out": "o", "time_budget": "40m"}).time_budget == 2400
    with pytest.raises(Exception, match="not a duration"):
        load_spec(TrainSpec, None, {"data": "d", "out": "o", "time_budget": "soon"})
    old = {
        "model_id": "unet-0",
        "model_sha256": "0" * 64,
        "num_classes": 2,
        "class_names": ["a", "b"],
        "palette": [[0, 0, 0], [1, 1, 1]],
        "input": {"size": [32, 32]},
    }
    card = ModelCard.parse(old, "model.json")
    assert card.plan is None and "plan" not in card.as_dict()


# --- real training runs (tiny, through the CLI) ---------------------------------------------------


def run_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run([RAYSEGMENT, *argv], env=env, capture_output=True, text=True, timeout=600)
    print(f"$ raysegment {' '.join(argv)} -> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def tiny_data(ray_cluster, tmp_path_factory):
    from raysegment.data.prepare import prepare

    root = tmp_path_factory.mktemp("train-plan")
    src = write_source(str(root / "src"), count=40)
    prepare(PrepareSpec(source=src, dest=str(root / "data"), val_fraction=0.25))
    (root / "one-step.yaml").write_text("max_steps: 1\n")  # no flag for it: a spec file field (not a plan field)
    return root


# A budget shorter than any epoch: the plan makes one epoch of it (with or without max_steps).
# One worker: the rule is the same, and one TensorFlow worker starts faster than two.
BUDGET = "0.05s"


@pytest.mark.slow
def test_train_with_no_options_trains_the_plan_that_plan_prints(tiny_data, ray_cluster):
    root = tiny_data
    printed = run_cli(
        "plan", str(root / "data"), "--workers", "1", "--time-budget", BUDGET, "--out", str(root / "plan.json"),
        env=ray_cluster.env,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    expected = json.loads((root / "plan.json").read_text())
    r = run_cli(
        "train", str(root / "data"), str(root / "model"), "--workers", "1", "--time-budget", BUDGET, "--config", str(root / "one-step.yaml"), "--no-resume", "--no-tta-check",
        env=ray_cluster.env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((root / "model" / "model.json").read_text())
    recorded = card["plan"]
    assert recorded["given"] == [] and recorded["auto"] == list(plan.PLAN_FIELDS)
    assert recorded["values"] == {k: expected[k] for k in plan.PLAN_FIELDS}
    assert recorded["reasons"] == expected["reasons"] and recorded["time_budget_s"] == expected["time_budget_s"]
    assert {k: card["training"][k] for k in plan.PLAN_FIELDS} == recorded["values"]  # what was trained
    assert f"plan       {len(plan.PLAN_FIELDS)} choices from the data set, 0 given" in r.stdout
    metrics = json.loads((root / "model" / "metrics.json").read_text())
    assert metrics["plan"]["given"] == [] and metrics["epochs_run"] == expected["epochs"] == 1


@pytest.mark.slow
def test_given_flags_override_their_part_and_the_budget_stops_training(tiny_data, ray_cluster):
    root = tiny_data
    expected = plan.make_plan(
        plan.Fingerprint.from_json(json.loads((root / "data" / "manifest.json").read_text())["fingerprint"]),
        json.loads((root / "data" / "manifest.json").read_text())["counts"]["train"],
        plan.Compute(workers=1),
    )
    r = run_cli(
        "train", str(root / "data"), str(root / "model-given"), "--base-filters", "8", "--epochs", "3",
        "--workers", "1", "--time-budget", BUDGET, "--config", str(root / "one-step.yaml"), "--no-resume", "--no-tta-check", "--json",
        env=ray_cluster.env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    recorded = json.loads((root / "model-given" / "model.json").read_text())["plan"]
    assert recorded["given"] == ["base_filters", "epochs"]
    assert recorded["values"]["base_filters"] == 8 and recorded["values"]["epochs"] == 3
    dependent = {"base_filters", "epochs", "warmup_epochs", "repeat"}  # warm-up and passes follow the given epochs
    assert {k: v for k, v in recorded["values"].items() if k not in dependent} == {
        k: v for k, v in expected.train_values().items() if k not in dependent
    }
    # Explicit epochs, but a given budget still stops training: the first epoch outlasts it.
    result = json.loads(r.stdout)
    assert result["epochs_run"] == 1 and result["stopped_early"]
    metrics = json.loads((root / "model-given" / "metrics.json").read_text())
    assert metrics["stopped_by"] == "time_budget" and recorded["stop_at_s"] == 0.05
    assert "stopped at the time budget" in r.stderr
