"""Cluster and schedule artifacts parse and validate, offline: launcher YAML, KubeRay manifests, cron, systemd."""

import configparser
import contextlib
import copy
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


# A node like the launcher's (m6i.2xlarge, g5.2xlarge): 8 vCPU / 32 GiB. Its allocatable is lower (kubelet and
# system reserve, about 0.1 CPU and 1 GiB there) and DaemonSets need room too: a pod may request 1 CPU / 4 GiB less.
NODE_CPU, NODE_GIB, HEADROOM_CPU, HEADROOM_GIB = 8, 32, 1, 4
AUTOSCALER_SIDECAR = (0.5, 0.5)  # KubeRay's autoscaler container on the head pod: 500m / 512Mi
SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}


def quantity(value) -> float:
    """A Kubernetes quantity ("7", '500m', "28Gi", 2) as a number (CPUs, bytes)."""
    text = str(value)
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * SUFFIXES[suffix]
    return float(text)


def aws_config() -> dict:
    return yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())


def policy(name: str) -> dict:
    return json.loads((CLUSTER / "aws" / name).read_text())


def allows(doc: dict, action: str, resource: str | None = None) -> bool:
    """Whether an Allow statement of the policy grants `action` (on `resource`, when given), by IAM's wildcards."""
    for st in doc["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if st["Effect"] == "Allow" and any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions):
            if resource is None or any(fnmatch.fnmatchcase(resource, r) for r in resources):
                return True
    return False


def test_aws_head_profile_lets_the_autoscaler_start_workers():
    config = aws_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    workers = {
        t["node_config"]["IamInstanceProfile"]["Name"] for n, t in types.items() if n != config["head_node_type"]
    }
    assert head not in workers  # Ray uses a named head profile as given: it must carry the autoscaler's rights
    header = (CLUSTER / "aws" / "cluster.yaml").read_text()
    for name in ("ec2-trust-policy.json", "s3-policy.json", "head-policy.json"):
        assert f"file://cluster/aws/{name}" in header  # the comment shows how to create the roles from them
    trust = policy("ec2-trust-policy.json")["Statement"][0]
    assert trust["Principal"] == {"Service": "ec2.amazonaws.com"} and trust["Action"] == "sts:AssumeRole"
    head_policy, s3 = policy("head-policy.json"), policy("s3-policy.json")
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances"):
        assert allows(head_policy, action), action
    for worker in workers:  # the role of each worker profile (same name), and nothing else
        assert allows(head_policy, "iam:PassRole", f"arn:aws:iam::123456789012:role/{worker}")
    assert not allows(head_policy, "iam:PassRole", f"arn:aws:iam::123456789012:role/{head}")
    # Terminating is limited to this cluster's instances, by the tag Ray puts on them.
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    terminate = next(st for st in head_policy["Statement"] if "ec2:TerminateInstances" in st["Action"])
    assert terminate["Condition"]["StringEquals"] == {f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": config["cluster_name"]}
    # S3 for the drivers and workers (nightly deletes its lock); nothing of EC2 or IAM for the workers.
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"):
        assert allows(s3, action), action
    assert not any(allows(s3, a) for a in ("ec2:RunInstances", "iam:PassRole"))


def test_aws_nodes_boot_a_cuda12_driver_ami():
    """Without ImageId Ray boots its built-in Ubuntu 18.04 DLAMI (CUDA 11.2), too old for TensorFlow's CUDA 12."""
    config = aws_config()
    ssm = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-"
    head_policy = policy("head-policy.json")
    for name, node_type in config["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        assert image.lower() not in ("", "latest_dlami"), f"{name}: Ray would pick its default AMI"
        assert image.startswith(ssm) or re.fullmatch(r"ami-[0-9a-f]{8,17}", image), image
        if image.startswith("resolve:ssm:"):  # EC2 resolves it at launch, as the caller: the head for the workers
            parameter = image.removeprefix("resolve:ssm:")
            arn = f"arn:aws:ssm:{config['provider']['region']}::parameter{parameter}"
            assert allows(head_policy, "ssm:GetParameters", arn)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"])
def test_kuberay_pods_fit_an_8_vcpu_32_gib_node(name):
    spec = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("jobTemplate", {}).get("rayClusterSpec") or spec
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for group, g in groups:
        pod = g["template"]["spec"]["containers"]
        cpu = sum(quantity(c["resources"]["requests"]["cpu"]) for c in pod)
        gib = sum(quantity(c["resources"]["requests"]["memory"]) for c in pod) / 2**30
        if group == "head" and cluster.get("enableInTreeAutoscaling"):
            cpu, gib = cpu + AUTOSCALER_SIDECAR[0], gib + AUTOSCALER_SIDECAR[1]
        assert cpu <= NODE_CPU - HEADROOM_CPU and gib <= NODE_GIB - HEADROOM_GIB, (
            f"{name} {group}: {cpu} CPU, {gib} GiB"
        )
        ray_cpus = g["rayStartParams"].get("num-cpus")
        if ray_cpus is not None:  # Ray's CPUs are the container's
            assert quantity(ray_cpus) == quantity(pod[0]["resources"]["requests"]["cpu"]), f"{name} {group}"


def test_aws_file_mounts_leave_the_venv_and_git_home(tmp_path):
    """The checkout synced to every node ("." in file_mounts) goes without .venv (GBs), .git and build output."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    config = aws_config()
    assert "." in config["file_mounts"].values()
    excludes = [p.strip("/") for p in config.get("rsync_exclude", [])]
    assert {".venv", ".git"} <= set(excludes)
    options = {"rsync_exclude": config.get("rsync_exclude"), "rsync_filter": config.get("rsync_filter")}
    args = SSHCommandRunner._create_rsync_filter_args(None, options)  # what Ray adds to its rsync command
    if shutil.which("rsync") is None:
        return
    src = tmp_path / "checkout"
    for rel in (".venv/lib/site.py", ".git/HEAD", "raysegment/__init__.py", "raysegment/__pycache__/a.pyc",
                "raysegment.egg-info/PKG-INFO", "build/lib/x.py", "jobs/infer.py"):  # fmt: skip
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    shutil.copy(REPO / ".gitignore", src / ".gitignore")
    listing = subprocess.run(
        ["rsync", "-an", "--out-format=%n", *args, f"{src}/", str(tmp_path / "node")],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    files = {f for f in listing if not f.endswith("/")}
    assert files == {".gitignore", "raysegment/__init__.py", "jobs/infer.py"}, listing


def test_docker_build_context_leaves_the_venv_and_git_home():
    """`docker build ... .` from the repo root: without .dockerignore, COPY . bakes the developer's .venv into the image."""
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert re.search(r"docker build -f cluster/kuberay/Dockerfile .* \.( |$)", dockerfile, re.M)  # context: repo root
    patterns = {
        ln.strip().removeprefix("./").strip("/")
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    assert {".venv", ".git"} <= patterns
    assert not any(p.startswith("!") for p in patterns)  # nothing re-included
    assert "COPY" in dockerfile and "[gpu" in dockerfile


def test_cronjob_pod_exits_with_the_nights_exit_code(tmp_path):
    """`ray job submit` exits 0 for a stopped job and 1 for every failure; `raysegment submit --wait` exits
    with the job's own code (143 when stopped). The pod runs it with no shell around it."""
    job = yaml.safe_load((CLUSTER / "kuberay" / "cronjob.yaml").read_text())["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"] + container.get("args", [])
    assert command[:3] == ["raysegment", "submit", "nightly"] and "--wait" in command
    assert "ray job submit" not in " ".join(command) and job["backoffLimit"] == 0
    spec_path = command[3]
    mount = next(m for m in container["volumeMounts"] if spec_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "raysegment-specs"
    # The same argv through the real CLI, the spec from the examples the ConfigMap is made of (secrets.md),
    # the address from the pod's variable: it parses, and an unreachable cluster is a user error (2).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", "TMPDIR": str(tmp_path)}
    argv = [
        sys.executable,
        "-m",
        "raysegment.cli",
        *command[1:3],
        str(REPO / "jobs/examples/nightly.yaml"),
        *command[4:],
    ]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach the Ray Jobs API" in r.stderr, r.stderr


def _stand_in(cmdline: str) -> subprocess.Popen:
    """A `sleep` in a process group of its own whose command line reads `cmdline`, as `ray start --block` under
    setsid; a thread reaps it, so it leaves no zombie in its group once killed."""
    proc = subprocess.Popen(["bash", "-c", 'exec -a "$0" sleep 60', cmdline], start_new_session=True)
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


def test_stop_sh_matches_the_cluster_folder_literally(tmp_path):
    cdir = tmp_path / "run[1] (a.b)*"  # regex characters and a space
    cdir.mkdir()
    node = _stand_in(f"ray start --block --temp-dir={cdir}/tmp-head")
    foreign = _stand_in("ray start --block --temp-dir=/elsewhere/tmp-head")  # its pid in our file: reused
    try:
        (cdir / "head.pid").write_text(f"{node.pid}\n")
        (cdir / "worker1.pid").write_text(f"{foreign.pid}\n")
        r = subprocess.run(
            [str(CLUSTER / "local" / "stop.sh"), str(cdir)],
            env=os.environ | {"RAYSEG_STOP_TIMEOUT": "10"}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert node.wait(timeout=10) == -signal.SIGTERM
        assert not (cdir / "head.pid").exists()
        # Not ours: not signalled, and its pid file kept while the group runs; the script says so and fails.
        assert foreign.poll() is None and (cdir / "worker1.pid").exists()
        assert r.returncode == 1 and "worker1.pid" in r.stderr and "stopped" not in r.stdout, r.stdout + r.stderr
    finally:
        for proc in (node, foreign):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def test_start_sh_refuses_more_workers_than_its_ports_allow(tmp_path):
    marker = tmp_path / "ray-was-run"
    fake_ray = tmp_path / "bin" / "ray"  # anything start.sh would launch runs this instead, and leaves a mark
    fake_ray.parent.mkdir()
    fake_ray.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    fake_ray.chmod(0o755)
    cdir = tmp_path / "cluster"
    env = os.environ | {"RAY": str(fake_ray), "RAYSEG_WORKERS": "9", "RAYSEG_START_TIMEOUT": "1"}
    r = subprocess.run(
        [str(CLUSTER / "local" / "start.sh"), str(cdir)], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "RAYSEG_WORKERS=9" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not marker.exists() and not cdir.exists()
    # The most it allows: every node's fixed ports distinct and outside every node's worker port range.
    script = (CLUSTER / "local" / "start.sh").read_text()
    most = int(re.search(r"^MAX_WORKERS=(\d+)$", script, re.M)[1])
    node_ports = re.search(r"^node_ports\(\) \{\n.*?^\}\n", script, re.M | re.S)[0]
    out = subprocess.run(
        ["bash", "-c", node_ports + f'BASE=26380; for i in $(seq 0 {most}); do node_ports "$i"; done'],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    fixed, ranges = [], []
    for line in out.splitlines():
        opts = dict(re.findall(r"--([a-z-]+)=(\d+)", line))
        ranges.append(range(int(opts.pop("min-worker-port")), int(opts.pop("max-worker-port")) + 1))
        fixed += [int(p) for p in opts.values()]
    assert len(fixed) == len(set(fixed)) and not any(p in r for p in fixed for r in ranges)


def test_start_sh_cluster_env_survives_a_folder_with_spaces(tmp_path):
    cdir = tmp_path / "my cluster's [1]"
    cdir.mkdir()
    script = (CLUSTER / "local" / "start.sh").read_text()
    match = re.search(r"^write_env\(\) \{\n.*?^\}\n", script, re.M | re.S)
    assert match, "start.sh writes cluster.env in write_env()"
    shell = match[0] + 'GCS_PORT=26380 DASHBOARD_PORT=26381; write_env; source "$DIR/cluster.env"; '
    shell += 'printf "%s\\n" "$RAY_AUTH_TOKEN_PATH" "$RAY_API_SERVER_ADDRESS" "$RAY_AUTH_MODE"'
    r = subprocess.run(["bash", "-c", shell], env=os.environ | {"DIR": str(cdir)}, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert r.stdout.splitlines() == [f"{cdir}/auth_token", "http://127.0.0.1:26381", "token"]


def test_embedded_ray_serves_its_dashboard_on_loopback(ray_cluster):
    """The local Ray a command starts (no RAY_ADDRESS) keeps its dashboard and job server on loopback."""
    import ray

    url = ray._private.worker._global_node.address_info["webui_url"]
    assert url.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"), url
