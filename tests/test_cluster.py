"""The real path: a multi-node Ray cluster from cluster/local/start.sh, jobs submitted with `ray job
submit` and `raysegment submit --wait`, results in the S3 server, then nightly runs that only process
new images. The session's in-process Ray (ray_cluster fixture) is a different cluster: every command
here gets this cluster's address explicitly and its own token file.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import PipeBarrier, assert_one_row_and_mask_per_key_on_s3

from raysegment import jobs, storage
from raysegment.config import InferSpec
from raysegment.data import synthetic
from raysegment.inference.actors import resolve as resolve_actors
from raysegment.inference.output import find_run
from raysegment.inference.sources import LIST_ROWS_PER_READ_TASK
from raysegment.registry import load_job_spec

pytestmark = [pytest.mark.slow, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPAN = 100 + 200 * 3  # ports start.sh uses for a head and one worker, see its header


@dataclass
class LocalCluster:
    dir: str
    address: str  # the Jobs API (dashboard), what every submitter is given
    env: dict[str, str]  # for CLI subprocesses: this cluster's token, no other Ray address


def free_port_block(span: int) -> int:
    """A base port with base..base+span free on 127.0.0.1 (and on all interfaces)."""
    for base in range(21000, 40000, 997):
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + span):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("", port))
            except OSError:
                continue
            return base
    raise RuntimeError("no free block of ports")


def without_ray_env(env: dict[str, str]) -> dict[str, str]:
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")
    return {k: v for k, v in env.items() if k not in drop}


@pytest.fixture(scope="module")
def local_cluster(s3_server):
    # Short path: Ray's Unix sockets live under it (107-byte limit). s3_server has exported AWS_*,
    # so the nodes (and the jobs they run) find the S3 credentials in their environment.
    cdir = tempfile.mkdtemp(prefix="rsc-", dir="/tmp")
    base = free_port_block(SPAN)
    # The venv is not on PATH, only named by RAY (as a script calling its binaries by path does): start.sh
    # must give the nodes, and so every job's `python`, that venv.
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p or ".").resolve() != BIN)
    env = without_ray_env(os.environ) | {
        "PATH": path,
        "RAY": str(BIN / "ray"),
        "RAYSEG_PORT_BASE": str(base),
        "RAYSEG_WORKERS": "1",
        # Two on the head: after the worker node is removed, the head alone runs actor and tasks.
        "RAYSEG_HEAD_CPUS": "2",
        "RAYSEG_WORKER_CPUS": "2",
    }
    try:
        subprocess.run([str(REPO / "cluster/local/start.sh"), cdir], env=env, check=True, timeout=420)
        client_env = without_ray_env(os.environ) | {
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": f"{cdir}/auth_token",
        }
        yield LocalCluster(cdir, f"http://127.0.0.1:{base + 1}", client_env)
    finally:
        subprocess.run([str(REPO / "cluster/local/stop.sh"), cdir], env=env, timeout=180)
        shutil.rmtree(cdir, ignore_errors=True)


def run(cluster: LocalCluster, *argv: str, timeout: int = 400) -> subprocess.CompletedProcess:
    t0 = time.time()
    r = subprocess.run(
        list(argv), cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout, check=False
    )
    print(f"$ {' '.join(argv)}  -> {r.returncode} in {time.time() - t0:.0f} s\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def put_images(uri: str, names: list[str], seed: int) -> None:
    loc = storage.resolve(uri)
    for i, name in enumerate(names):
        img, _ = synthetic.make_example(seed + i, size=32)
        storage.write_bytes(loc.child(f"{name}.png"), synthetic.png_bytes(img))


def keys_under(uri: str, suffix: str) -> list[str]:
    loc = storage.resolve(uri)
    if not loc.fs.exists(loc.path):
        return []
    prefix = loc.path.rstrip("/") + "/"
    return sorted(p[len(prefix) : -len(suffix)] for p in loc.fs.find(loc.path) if p.endswith(suffix))


def spec_file(tmp_path: Path, name: str, **values: object) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_jobs_and_nightly_on_a_local_multi_node_cluster(local_cluster, tiny_model, s3_prefix, tmp_path):
    t0 = time.time()
    _, model_dir = tiny_model
    model = f"{s3_prefix}/model"
    for name in ("model.keras", "model.json"):
        storage.upload_file(os.path.join(model_dir, name), storage.resolve(model).child(name))
    incoming = f"{s3_prefix}/incoming"
    first = ["a", "b", "sub/c", "sub/deeper/d"]
    put_images(incoming, first, seed=0)
    nodes = run(
        local_cluster, str(BIN / "ray"), "list", "nodes", "--address", local_cluster.address, "--format", "json"
    )
    assert nodes.returncode == 0 and len(json.loads(nodes.stdout)) == 2  # a head and a worker node

    # Nightly with `raysegment submit --wait` (the CronJob's command): the checkout as working_dir, the
    # job's exit code as ours, the first night processes everything. Ray's own `ray job submit` with a job
    # script is the node-loss test's below, `submit infer --wait` the stopped-job test's; nights that find
    # only new images, or nothing new, are test_nightly's (in-process, the same code): each job here costs
    # ~30-40 s of a driver starting on the cluster.
    night_out = f"{s3_prefix}/nightly"
    spec_n = spec_file(tmp_path, "nightly", model=model, input=incoming, output=night_out, batch_size=4)
    rs, addr = str(BIN / "raysegment"), ["--address", local_cluster.address]
    r = run(local_cluster, rs, "submit", "nightly", spec_n, "--date", "2026-01-01", *addr, "--wait")
    assert r.returncode == 0 and "SUCCEEDED (exit code 0)" in r.stdout, r.stdout + r.stderr
    job = r.stdout.split(":", 1)[0]
    assert job.startswith("raysegment-nightly-") and job.endswith("-2026-01-01")
    report = storage.read_json(storage.resolve(night_out).child("reports", "2026-01-01.json"))
    assert report["counts"]["processed"] == 4
    assert keys_under(f"{night_out}/date=2026-01-01/masks", ".png") == first
    assert not storage.exists(storage.resolve(night_out).child("_nightly.lock"))
    again = run(local_cluster, rs, "submit", "nightly", spec_n, "--date", "2026-01-01", *addr)
    assert again.returncode == 0 and f"{job}: already submitted (SUCCEEDED)" in again.stdout
    status = run(local_cluster, rs, "jobs", "status", job, *addr)
    assert status.returncode == 0 and f"{job}: SUCCEEDED (exit code 0)" in status.stdout
    logs = run(local_cluster, rs, "jobs", "logs", job, *addr)
    assert logs.returncode == 0 and "nightly 2026-01-01: ok; 4 listed, 4 new" in logs.stdout
    info = run(
        local_cluster, str(BIN / "python"), "-c",
        "import json,sys; from ray.job_submission import JobSubmissionClient as C; "
        "i=C(sys.argv[1]).get_job_info(sys.argv[2]); print(json.dumps([i.metadata, i.runtime_env, i.entrypoint]))",
        local_cluster.address, job,
    )  # fmt: skip
    sent = info.stdout
    assert info.returncode == 0 and "raysegment_spec_sha256" in sent and "AWS_ENDPOINT_URL" in sent
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in sent and "AWS_SECRET_ACCESS_KEY" not in sent
    listed = run(local_cluster, rs, "jobs", "list", *addr)
    assert listed.returncode == 0 and listed.stdout.count("raysegment-nightly-") == 1
    print(f"cluster test body: {time.time() - t0:.0f} s")


def test_a_stopped_job_exits_143_and_the_same_submit_runs_a_stopped_or_failed_job_again(local_cluster, tmp_path):
    """`jobs stop` ends a followed job with 143 (Ray records no exit code for a stopped job); the same
    `submit` then runs it again as ID-r2, and after that one failed as ID-r3, while a pending or running one
    is only followed. The rerun reaches the entrypoint's own error (exit 2: no model), not a
    ModuleNotFoundError (exit 1) from a `python` outside the venv (`ray job submit ... python jobs/infer.py`
    above needs that same venv python). Ray's packaging lines stay off stderr."""
    rs, addr = str(BIN / "raysegment"), ["--address", local_cluster.address]
    spec = spec_file(
        tmp_path, "infer-again", model=str(tmp_path / "no-model"), input=str(tmp_path), output=str(tmp_path / "out")
    )
    job = jobs.submission_id("infer", load_job_spec("infer", spec))
    # A job under the spec's id that runs until stopped (the id is all that `submit` looks at).
    placeholder = run(local_cluster, str(BIN / "ray"), "job", "submit", *addr, "--submission-id", job, "--no-wait",
                      "--", "sleep", "600")  # fmt: skip
    assert placeholder.returncode == 0
    follower = subprocess.Popen(
        [rs, "submit", "infer", spec, *addr, "--wait"], cwd=REPO, env=local_cluster.env | {"PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = follower.stdout.readline()  # it follows the job before the job is stopped
    assert re.fullmatch(rf"{job}: already submitted \((PENDING|RUNNING)\)\n", first), first
    assert run(local_cluster, rs, "jobs", "stop", job, *addr).returncode == 0
    stdout, stderr = follower.communicate(timeout=120)
    print(first + stdout, stderr)
    assert follower.returncode == 143 and f"{job}: STOPPED (exit code 143)" in stdout
    listed = run(local_cluster, rs, "jobs", "list", *addr)
    assert re.search(rf"^{job} +STOPPED .* 143$", listed.stdout, re.M), listed.stdout

    again = run(local_cluster, rs, "submit", "infer", spec, *addr, "--wait")
    assert again.returncode == 2, again.stdout + again.stderr
    assert again.stdout.startswith(f"{job}-r2: submitted to {local_cluster.address} (runs {job} again: STOPPED)")
    assert "no-model" in again.stdout and "ModuleNotFoundError" not in again.stdout
    assert f"{job}-r2: FAILED (exit code 2)" in again.stdout
    assert not re.search(r"packaging\.py|working_dir\.py|Uploading package", again.stderr), again.stderr
    third = run(local_cluster, rs, "submit", "infer", spec, *addr)
    assert third.returncode == 0 and third.stdout.startswith(f"{job}-r3: submitted to "), third.stdout
    assert f"(runs {job}-r2 again: FAILED)" in third.stdout
    assert run(local_cluster, rs, "jobs", "stop", f"{job}-r3", *addr).returncode == 0


def node_busy(pgid: int) -> bool:
    """A process of that node's group runs a task or actor of the job (idle workers are ray::IDLE)."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(p.info["cmdline"] or [])
            if os.getpgid(p.pid) == pgid and title.startswith("ray::") and "IDLE" not in title:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def test_job_finishes_after_a_worker_node_is_removed(local_cluster, tiny_model, s3_prefix, tmp_path):
    """Stop the worker node (its `ray start --block` gets SIGTERM, as `ray stop` there would do)
    while it runs part of an infer job submitted with `ray job submit ... python jobs/infer.py`: the job
    finishes on the head, one row and one mask per key.
    A named pipe listed last among the inputs holds the job open until the node is gone, so a fast
    machine cannot finish the job first. Runs last in this module: the cluster has one node afterwards."""
    _, model_dir = tiny_model
    model = f"{s3_prefix}/model"
    for name in ("model.keras", "model.json"):
        storage.upload_file(os.path.join(model_dir, name), storage.resolve(model).child(name))
    incoming = f"{s3_prefix}/many"
    # More images than one list read task takes, so the task that meets the pipe is not the only one.
    names = [f"img{i:04d}" for i in range(LIST_ROWS_PER_READ_TASK + 44)]
    put_images(incoming, names, seed=100)
    hold = tmp_path / "hold" / "hold.png"
    listing = tmp_path / "list.parquet"
    uris = [f"{incoming}/{name}.png" for name in names]
    pq.write_table(pa.table({"uri": [*uris, str(hold)], "key": [*names, "hold"]}), listing)
    out = f"{s3_prefix}/out-node-loss"
    spec = spec_file(tmp_path, "infer-node-loss", model=model, input=str(listing), output=out, batch_size=4)
    nodes = run(
        local_cluster, str(BIN / "ray"), "list", "nodes", "--address", local_cluster.address, "--format", "json"
    )
    cpus = sum(n["resources_total"].get("CPU", 0) for n in json.loads(nodes.stdout))
    # Ray's own CLI with the job script, as an operator would type it (`raysegment submit` sends
    # `python -m raysegment.entrypoints`): it follows the job and exits 0 once it succeeded, 1 if it failed.
    argv = [str(BIN / "ray"), "job", "submit", "--address", local_cluster.address, "--working-dir", ".", "--",
            "python", "jobs/infer.py", "--config", spec]  # fmt: skip
    worker = int(Path(local_cluster.dir, "worker1.pid").read_text())
    with PipeBarrier(hold) as barrier:
        job = subprocess.Popen(argv, cwd=REPO, env=local_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (len(keys_under(f"{out}/masks", ".png")) >= 8 and node_busy(worker)):
            assert job.poll() is None, "the job ended before the worker node could be removed"
            assert time.time() < deadline, "the worker node never ran part of the job"
            time.sleep(0.5)
        done_before = len(keys_under(f"{out}/masks", ".png"))
        assert job.poll() is None, "the job was over before the node went"
        os.kill(worker, signal.SIGTERM)
        psutil.Process(worker).wait(timeout=60)
        barrier.release(None)  # a read lost with the node is re-run on the head and opens the pipe again
        stdout, _ = job.communicate(timeout=400)
    text = stdout.decode(errors="replace")
    print(f"worker node removed after {done_before} of {len(names)} masks\n{text[-3000:]}")
    assert job.returncode == 0 and "succeeded" in text and f"inferred {len(names) + 1} images" in text, text[-3000:]
    assert_one_row_and_mask_per_key_on_s3(out, names, unreadable=("hold",))  # the emptied pipe: its error row
    # --actors auto (the default) sized the pool from both nodes' CPUs, as they were when the job began.
    _, record = find_run(storage.resolve(out))
    expected = resolve_actors(InferSpec(model=model, input=str(listing), output=out), {"CPU": cpus})
    assert record.actors == expected.as_dict(), (record.actors, cpus)
    nodes = run(
        local_cluster, str(BIN / "ray"), "list", "nodes", "--address", local_cluster.address, "--format", "json"
    )
    states = sorted(n["state"] for n in json.loads(nodes.stdout))
    assert states == ["ALIVE", "DEAD"]
