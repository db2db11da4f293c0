"""Job submission without a cluster: ids, runtime_env, secrets kept out, entrypoint specs, CLI errors."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from raysegment import jobs, logs
from raysegment.cli import main
from raysegment.config import (
    CompactSpec,
    EvaluateSpec,
    ExportSpec,
    ImportSpec,
    InferSpec,
    NightlySpec,
    ServeSpec,
    TrainSpec,
    load_spec,
)
from raysegment.entrypoints import main as entry_main
from raysegment.errors import ConfigError
from raysegment.registry import CLUSTER_KINDS, JOBS, load_job_spec

REPO = Path(__file__).resolve().parents[1]
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-1",
    "AWS_SESSION_TOKEN": "s3cr3t-value-2",
    "AWS_ACCESS_KEY_ID": "s3cr3t-value-3",
    "RAY_AUTH_TOKEN": "s3cr3t-value-4",
}


def infer_spec(**kw) -> InferSpec:
    return InferSpec(model="s3://b/model", input="s3://b/in/", output="s3://b/out", **kw)


def test_submission_id_is_derived_from_the_spec():
    a = jobs.submission_id("infer", infer_spec())
    assert a == jobs.submission_id("infer", infer_spec(batch_size=16))  # explicit default: same job
    assert a != jobs.submission_id("infer", infer_spec(batch_size=8))
    assert a.startswith("raysegment-infer-") and len(a) == len("raysegment-infer-") + 12
    night = NightlySpec(model="m", input="s3://b/in", output="s3://b/n", date="2026-01-02")
    nid = jobs.submission_id("nightly", night)
    assert nid.endswith("-2026-01-02")
    assert jobs.submission_id("nightly", night.model_copy(update={"date": "2026-01-03"}))[:-10] == nid[:-10]


def test_runtime_env_metadata_and_entrypoint_carry_no_secret(monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    spec = infer_spec()
    env = jobs.runtime_env(str(REPO), None, jobs.job_env({"TF_CPP_MIN_LOG_LEVEL": "2"}))
    assert env["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_REGION": "eu-west-1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    assert env["working_dir"] == str(REPO) and ".git/" in env["excludes"]
    sent = json.dumps([env, jobs.metadata("infer", spec), jobs.entrypoint("infer", spec)])
    assert not any(value in sent for value in SECRETS.values())


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "MY_API_KEY", "DB_PASSWORD"])
def test_secret_env_names_are_refused(name):
    with pytest.raises(ConfigError, match="secret"):
        jobs.job_env({name: "x"})


def test_entrypoint_spec_round_trips_and_pins_the_nightly_date():
    spec = infer_spec(actors="1:3", batch_size=4)
    command = shlex.split(jobs.entrypoint("infer", spec))
    assert command[:4] == ["python", "-m", "raysegment.entrypoints", "infer"] and command[4] == "--spec"
    assert load_job_spec("infer", spec_json=command[5]) == spec
    night = NightlySpec(model="m", input="s3://b/in", output="s3://b/n", date="2026-01-02")
    assert json.loads(shlex.split(jobs.entrypoint("nightly", night))[5])["date"] == "2026-01-02"
    # Inline JSON has a spec file's bounds: deep nesting was a RecursionError traceback.
    with pytest.raises(ConfigError, match="--spec: nested too deep"):
        load_job_spec("infer", spec_json="[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="--spec: over 1024 KiB"):
        load_job_spec("infer", spec_json=json.dumps({"model": "m" * (2 << 20)}))


def test_find_checkout(tmp_path):
    assert jobs.find_checkout(REPO / "raysegment" / "inference") == REPO
    assert jobs.find_checkout(tmp_path) is None


@pytest.mark.parametrize("kind", CLUSTER_KINDS)
def test_example_specs_are_valid(kind):
    spec = load_spec(JOBS[kind].spec, str(REPO / "jobs" / "examples" / f"{kind}.yaml"))
    expected = {
        "train": TrainSpec,
        "evaluate": EvaluateSpec,
        "infer": InferSpec,
        "compact": CompactSpec,
        "serve": ServeSpec,
        "import": ImportSpec,
        "export": ExportSpec,
    }
    assert isinstance(spec, expected.get(kind, NightlySpec))
    assert (REPO / "jobs" / f"{kind}.py").read_text().count(f'main("{kind}")') == 1


def test_submit_takes_the_registry_kinds_and_entrypoints_do_not_import_the_cli():
    submit_kinds = next(p for p in main.commands["submit"].params if p.name == "kind").type.choices
    kinds = ["train", "evaluate", "infer", "nightly", "compact", "serve", "import", "export"]
    assert list(submit_kinds) == list(CLUSTER_KINDS) == kinds
    # The entrypoints must not pull in the CLI (once a cycle: each imported the other), nor TF or Ray.
    probe = (
        "import sys, raysegment.entrypoints; print(sorted({'raysegment.cli', 'tensorflow', 'ray'} & {*sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_job_functions_are_named_in_the_table_and_imported_only_to_run():
    """Each job's function is "module:function" (`registry._Lazy`): a function its module defines, read here
    from the source without importing it; loading the table imports neither TensorFlow nor Ray."""
    import ast
    import importlib.util

    from raysegment.registry import _Lazy

    named = [f.target for job in JOBS.values() for f in (job.run, job.exit_code) if isinstance(f, _Lazy)]
    assert len(named) == len(JOBS) + 1  # every job's function, and nightly's exit code
    for target in named:
        module, name = target.split(":")
        source = Path(importlib.util.find_spec(module).origin).read_text()
        assert name in {f.name for f in ast.parse(source).body if isinstance(f, ast.FunctionDef)}, target
    probe = "import sys, raysegment.registry; print(sorted({'tensorflow', 'ray'} & {*sys.modules}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_entrypoint_user_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        entry_main("infer", ["--spec", '{"model": "m"}'])
    assert exc.value.code == 2
    assert "field 'input' is required" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ninput: i\noutput: o\nbatch_sise: 3\n")
    with pytest.raises(SystemExit) as exc:
        entry_main("infer", ["--config", str(bad)])
    assert exc.value.code == 2


def test_submit_needs_an_address_and_refuses_secret_env(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    spec = tmp_path / "infer.yaml"
    spec.write_text("model: s3://b/m\ninput: s3://b/in\noutput: s3://b/out\n")
    runner = CliRunner()
    r = runner.invoke(main, ["submit", "infer", str(spec), "--working-dir", str(REPO)])
    assert r.exit_code == 2 and "no cluster address" in r.output
    r = runner.invoke(
        main, ["submit", "infer", str(spec), "--address", "http://127.0.0.1:1", "--env", "AWS_SECRET_ACCESS_KEY=x"]
    )
    assert r.exit_code == 2 and "looks like a secret" in r.output
    r = runner.invoke(main, ["submit", "infer", str(spec), "--address", "http://127.0.0.1:1"])
    assert r.exit_code == 2 and "cannot reach the Ray Jobs API" in r.output
    r = runner.invoke(main, ["submit", "infer", str(spec), "--date", "2026-01-01", "--address", "http://127.0.0.1:1"])
    assert r.exit_code == 2 and "--date only applies to nightly" in r.output


def test_exit_status_is_the_jobs_own():
    from types import SimpleNamespace as Info

    assert jobs.exit_status(Info(driver_exit_code=4, status="FAILED")) == 4
    assert jobs.exit_status(Info(driver_exit_code=None, status="SUCCEEDED")) == 0
    assert jobs.exit_status(Info(driver_exit_code=None, status="FAILED")) == 3  # runtime_env setup failed
    assert jobs.exit_code(Info(driver_exit_code=None, status="RUNNING")) is None


def test_a_stopped_job_exits_143_not_failed():
    # Ray records no driver exit code for a job it stopped (`ray job stop` SIGTERMs the driver).
    from types import SimpleNamespace as Info

    assert jobs.exit_status(Info(driver_exit_code=None, status="STOPPED")) == 143


def test_a_failed_or_stopped_job_runs_again_under_the_next_attempts_id():
    base = "raysegment-infer-0123456789ab"
    assert jobs.next_attempt(base, {}.get) == jobs.Attempt(base)
    for done in (("PENDING", None), ("RUNNING", None), ("SUCCEEDED", 0)):  # the same command does not rerun it
        assert jobs.next_attempt(base, {base: done}.get) == jobs.Attempt(base, done[0], None, done[1])
    statuses = {base: ("STOPPED", 143), f"{base}-r2": ("FAILED", 3)}
    assert jobs.next_attempt(base, statuses.get) == jobs.Attempt(f"{base}-r3", None, (f"{base}-r2", "FAILED"))
    statuses[f"{base}-r3"] = ("RUNNING", None)  # the rerun is running: a retried tick follows it
    found = jobs.Attempt(f"{base}-r3", "RUNNING", (f"{base}-r2", "FAILED"))
    assert jobs.next_attempt(base, statuses.get) == found
    again = jobs.submitted_text(jobs.next_attempt(base, {base: ("STOPPED", 143)}.get), "http://h:8265")
    assert again == f"submitted to http://h:8265 (runs {base} again: STOPPED)"


def test_a_nightly_that_flagged_drift_is_not_run_again():
    """A nightly that exits 4 (drift flagged) is FAILED to Ray, but the night completed: the same submit (a
    retried tick) reran it as ID-r2, which changes nothing. It is reported as already submitted, with its
    exit code; another FAILED exit code still reruns. The hint names --submission-id, another if given."""
    base = "raysegment-nightly-0123456789ab-2024-05-01"
    drift = jobs.next_attempt(base, {base: ("FAILED", 4)}.get)
    assert drift == jobs.Attempt(base, "FAILED", None, 4)
    assert jobs.submitted_text(drift, "http://h:8265") == (
        "already submitted (FAILED, exit code 4); pass --submission-id to run it again"
    )
    assert jobs.submitted_text(drift, "http://h:8265", id_given=True) == (
        "already submitted (FAILED, exit code 4); pass another --submission-id to run it again"
    )
    after_stop = {base: ("STOPPED", 143), f"{base}-r2": ("FAILED", 4)}
    assert jobs.next_attempt(base, after_stop.get) == jobs.Attempt(f"{base}-r2", "FAILED", (base, "STOPPED"), 4)
    for code in (2, 3, 5):
        assert jobs.next_attempt(base, {base: ("FAILED", code)}.get) == jobs.Attempt(
            f"{base}-r2", None, (base, "FAILED")
        )
    done = jobs.Attempt(base, "SUCCEEDED", None, 0)
    assert jobs.submitted_text(done, "h", id_given=True) == (
        "already submitted (SUCCEEDED); pass another --submission-id to run it again"
    )


def test_submit_routes_rays_client_lines_without_importing_ray_data(tmp_path):
    """`submit` imported Ray Data (seconds) only to turn its progress bars off. In a fresh process: the job
    client's packaging lines still go to the log file, not stderr, and ray.data is never imported."""
    code = (
        "import logging, sys\n"
        "from raysegment import jobs, logs\n"
        "with jobs.ray_lines_to_log():\n"
        "    from ray.job_submission import JobSubmissionClient  # as connect() does, after routing\n"
        "    logging.getLogger('ray._private.runtime_env.packaging').info('Uploading package probe-2')\n"
        "    print(logs.current.path)\n"
        "print('ray.data' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != logs.LEVEL_ENV} | {"TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    path, imported = r.stdout.split()
    assert imported == "False" and "probe-2" not in r.stderr
    assert "probe-2" in Path(path).read_text()


def test_rays_job_client_lines_go_to_the_log_file_unless_verbose(capfd, monkeypatch):
    import logging

    import ray  # noqa: F401  (configures the `ray` logger and its console handler)

    packaging = logging.getLogger("ray._private.runtime_env.packaging")
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    with jobs.ray_lines_to_log():
        assert logs.current is not None, "no log file takes Ray's lines"
        path = logs.current.path
        # A warning: a ray.init earlier in this process (another test) leaves the `ray` logger at WARNING.
        packaging.warning("Ignoring upload to cluster for these files: [probe-1]")
    assert "probe-1" not in capfd.readouterr().err
    assert "probe-1" in Path(path).read_text()
    monkeypatch.setenv(logs.LEVEL_ENV, "DEBUG")
    with jobs.ray_lines_to_log():
        assert logs.current is None  # -v: Ray's own console handler shows them, as before
