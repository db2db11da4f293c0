"""Cluster and schedule artifacts parse and validate, offline: launcher YAML, KubeRay manifests, cron, systemd."""

import configparser
import copy
import re
import shutil
import subprocess
import zoneinfo
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SCHEMA = yaml.safe_load((Path(__file__).parent / "kuberay_crd_subset.yaml").read_text())
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def cron_ok(expr: str) -> bool:
    """A 5-field cron schedule with numbers, *, ranges, lists and steps in range."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi) in zip(fields, CRON_RANGES):
        for part in field.split(","):
            base, _, step = part.partition("/")
            if step and not step.isdigit():
                return False
            if base == "*":
                continue
            a, _, b = base.partition("-")
            if not a.isdigit() or (b and not b.isdigit()):
                return False
            if not all(lo <= int(x) <= hi for x in (a, b or a)):
                return False
    return True


def validate(doc: dict) -> None:
    schema = {"$defs": SCHEMA["$defs"], **SCHEMA["kinds"][doc["kind"]]}
    jsonschema.validate(doc, schema)


def containers(doc: dict) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            found.extend(node.get("containers", []))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc["spec"])
    return found


def env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def test_aws_launcher_config_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for n, t in types.items() if n != config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # CPU head
    assert any(
        w["node_config"]["InstanceType"].startswith(("g", "p")) and w["max_workers"] > w["min_workers"] for w in workers
    )
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]
    broken = copy.deepcopy(config)
    broken["available_node_types"]["worker_gpu"]["min_worker"] = 1  # a typo the validator must catch
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml"])
def test_kuberay_manifests_match_the_crd_fields(name):
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    assert docs
    for doc in docs:
        validate(doc)
        for c in containers(doc):
            for e in c.get("env", []):
                if re.search(r"SECRET|TOKEN|PASSW|ACCESS_KEY", e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{name}: {e['name']} must come from a Secret"


def test_every_ray_cluster_manifest_has_token_auth():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())["spec"]
    for c in containers({"spec": cluster}):
        assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env_names(c)
        assert any(e.get("secretRef", {}).get("name") == "raysegment-s3" for e in c["envFrom"])
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= {e["name"] for e in cluster["autoscalerOptions"]["env"]}
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())["spec"]
    cron = yaml.safe_load((CLUSTER / "kuberay" / "raycronjob.yaml").read_text())["spec"]
    for spec in (job, cron["jobTemplate"]):
        assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
        assert "python -m raysegment.entrypoints" in spec["entrypoint"]
        assert any(
            w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for w in spec["rayClusterSpec"]["workerGroupSpecs"]
        )
    submitter = yaml.safe_load((CLUSTER / "kuberay" / "cronjob.yaml").read_text())
    pod = submitter["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS"} <= env_names(pod)
    assert "ray job submit" in " ".join(pod["args"]) and "--submission-id" in " ".join(pod["args"])


@pytest.mark.parametrize("name", ["raycronjob.yaml", "cronjob.yaml"])
def test_schedules_and_time_zones(name):
    spec = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())["spec"]
    assert cron_ok(spec["schedule"])
    zoneinfo.ZoneInfo(spec["timeZone"])


def test_cron_line():
    lines = [
        ln
        for ln in (CLUSTER / "schedule" / "raysegment-nightly.cron").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    env = [ln for ln in lines if re.match(r"^[A-Z_]+=", ln)]
    jobs = [ln for ln in lines if ln not in env]
    assert env == ["CRON_TZ=UTC"] and len(jobs) == 1
    fields = jobs[0].split(None, 5)
    assert cron_ok(" ".join(fields[:5]))
    assert "raysegment submit nightly" in fields[5] and "--wait" in fields[5]


def test_systemd_timer_and_service():
    def unit(name):
        parser = configparser.ConfigParser(strict=True, interpolation=None)
        parser.optionxform = str
        parser.read_string((CLUSTER / "schedule" / name).read_text())
        return parser

    service, timer = unit("raysegment-nightly.service"), unit("raysegment-nightly.timer")
    assert service["Service"]["Type"] == "oneshot"
    assert "raysegment submit nightly" in service["Service"]["ExecStart"]
    assert service["Service"]["ExecStart"].startswith("/")  # systemd wants an absolute path
    assert timer["Timer"]["Unit"] == "raysegment-nightly.service" and timer["Install"]["WantedBy"] == "timers.target"
    calendar = timer["Timer"]["OnCalendar"]
    if shutil.which("systemd-analyze"):
        subprocess.run(["systemd-analyze", "calendar", calendar], check=True, capture_output=True)
    else:
        assert re.fullmatch(r"\*-\*-\* \d\d:\d\d:\d\d UTC", calendar)
    env = dict(
        ln.split("=", 1)
        for ln in (CLUSTER / "schedule" / "raysegment.env.example").read_text().splitlines()
        if ln and not ln.startswith("#")
    )
    assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env


def test_local_cluster_scripts():
    for name in ("start.sh", "stop.sh"):
        script = CLUSTER / "local" / name
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert script.stat().st_mode & 0o111
    start = (CLUSTER / "local" / "start.sh").read_text()
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start and "worker_node" in start
    assert "ray stop" not in (CLUSTER / "local" / "stop.sh").read_text().replace("Never `ray stop`", "")


def test_embedded_ray_serves_its_dashboard_on_loopback(ray_cluster):
    """The local Ray a command starts (no RAY_ADDRESS) keeps its dashboard and job server on loopback."""
    import ray

    url = ray._private.worker._global_node.address_info["webui_url"]
    assert url.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"), url
