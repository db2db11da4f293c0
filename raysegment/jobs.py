"""Submitting and following raysegment jobs on a Ray cluster through the Ray Jobs API.

A submission carries the validated spec inline (``python -m raysegment.entrypoints
KIND --spec JSON``), the package (the repo checkout as ``working_dir``, or pip
requirements), storage endpoint variables, and entrypoint resources. Its id is
derived from the spec, so submitting the same job twice is refused by Ray and
reported as "already submitted", unless that job FAILED (other than a nightly's
exit 4: the night completed, drift flagged) or was STOPPED: then the same
command runs it again as ID-r2, ID-r3... (infer, nightly and train resume what
the earlier attempt finished), as the stopped job's own last line advises.

Authentication: Ray 2.60's ``JobSubmissionClient`` adds ``Authorization: Bearer
<token>`` by itself when ``RAY_AUTH_MODE=token`` is set, reading the token from
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
(``ray.dashboard.modules.dashboard_sdk.SubmissionClient.__init__`` ->
``get_auth_headers_if_auth_enabled``). Nothing here reads or forwards the token;
a 401/403 becomes one line naming those variables. Secrets never enter the
runtime_env or job metadata: every node finds its own credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import re
import shlex
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysegment import __version__, console, logs
from raysegment.config import NightlySpec, Spec, TrainSpec
from raysegment.errors import ConfigError, UserError
from raysegment.registry import load_job_spec

log = logging.getLogger(__name__)

# Where storage is, not who may use it: safe to put in a job's runtime_env.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|ACCESS_KEY|SESSION|API_KEY|AUTH", re.I)
WORKING_DIR_EXCLUDES = [
    ".git/",
    "**/__pycache__/",
    ".venv/",
    "venv/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    "raysegment-demo/",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# A job that ended without finishing: submitting it again runs it again (the others are deduplicated).
RERUN = ("FAILED", "STOPPED")
# A FAILED job that did finish: a nightly that flagged drift (exit 4, nightly.EXIT_DRIFT, not imported to
# keep `submit` light). Its rerun would change nothing: the same command reports it, as a SUCCEEDED one.
FINISHED_EXIT_CODES = (4,)


def spec_digest(spec: Spec, exclude: set[str] | None = None) -> str:
    """sha256 of the spec's canonical JSON (all fields, defaults included). A train spec also names the
    fields given equal to their default: the plan fills only the others, so those specs differ."""
    values = spec.model_dump(mode="json", exclude=exclude)
    if isinstance(spec, TrainSpec):
        fields = TrainSpec.model_fields
        given = sorted(
            k for k in spec.model_fields_set if getattr(spec, k) == fields[k].get_default(call_default_factory=True)
        )
        if given:  # only then: the ids of specs without such fields stay what they were
            values["given_defaults"] = given
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def submission_id(kind: str, spec: Spec) -> str:
    """raysegment-{kind}-{sha256[:12]}; nightly adds its date, so each night is one submission."""
    if isinstance(spec, NightlySpec):
        return f"raysegment-{kind}-{spec_digest(spec, {'date'})[:12]}-{spec.date}"
    return f"raysegment-{kind}-{spec_digest(spec)[:12]}"


def find_checkout(start: str | Path | None = None) -> Path | None:
    """The raysegment repo checkout containing `start` (default: cwd), if any."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        pyproject = d / "pyproject.toml"
        if (d / "raysegment" / "__init__.py").is_file() and pyproject.is_file():
            if re.search(r'^name\s*=\s*"raysegment"', pyproject.read_text(), re.M):
                return d
    return None


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Env vars for the job: storage endpoints from this shell plus `extra`; secret names refused."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    for key, value in (extra or {}).items():
        if _SECRET_NAME.search(key):
            raise ConfigError(
                f"--env {key}: looks like a secret; secrets never go into a job's runtime_env or metadata. "
                "Give the cluster nodes their own credentials (instance role, Kubernetes Secret, env on each node)"
            )
        env[key] = value
    return env


def parse_env(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """KEY=VALUE pairs from --env."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env {item!r}: write KEY=VALUE")
        out[key.strip()] = value
    return out


def runtime_env(working_dir: str | None, pip: list[str] | None, env_vars: dict[str, str]) -> dict[str, Any]:
    """The job's runtime_env: the package (working_dir or pip) and non-secret env vars."""
    env: dict[str, Any] = {"env_vars": env_vars}
    if working_dir:
        path = Path(working_dir).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"--working-dir {working_dir}: not a folder")
        env.update(working_dir=str(path), excludes=WORKING_DIR_EXCLUDES)
    if pip:
        env["pip"] = list(pip)
    return env


def entrypoint(kind: str, spec: Spec) -> str:
    """The job's shell command: the spec travels inline, so it need not exist on the cluster. The fields
    the user set travel, defaults stay out: a train spec's plan fills what was not given (`plan.py`), so a
    value given equal to its default must still travel as given."""
    values = spec.model_dump(mode="json", exclude_unset=True)
    if isinstance(spec, NightlySpec):
        values["date"] = spec.date  # pinned at submission: a queued job still runs the night it was meant for
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return f"python -m raysegment.entrypoints {kind} --spec {shlex.quote(text)}"


def metadata(kind: str, spec: Spec) -> dict[str, str]:
    """Job metadata (strings only): what ran, never credentials."""
    out = {"raysegment_kind": kind, "raysegment_spec_sha256": spec_digest(spec), "raysegment_version": __version__}
    if isinstance(spec, NightlySpec) and spec.date:
        out["raysegment_date"] = spec.date
    return out


def _normalise_address(address: str) -> str:
    return address if "://" in address else f"http://{address}"


def _warn_clear_token(address: str) -> None:
    url = urllib.parse.urlparse(address)
    if url.scheme != "http" or os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return
    host = url.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning("the Ray auth token travels in clear over http to %s; use an SSH tunnel or an https proxy", host)


@contextlib.contextmanager
def _address_env_hidden() -> Iterator[None]:
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; an explicit --address must win.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _describe(address: str, exc: BaseException) -> UserError | None:
    """A one-line UserError for connection and authentication failures, else None."""
    from ray.exceptions import AuthenticationError

    if isinstance(exc, AuthenticationError) or "Authentication required" in str(exc):
        forbidden = "invalid or incorrect" in str(exc) or "Forbidden" in str(exc)
        what = "rejected the auth token" if forbidden else "requires an auth token"
        return UserError(
            f"{address}: the Ray cluster {what}; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or "
            "RAY_AUTH_TOKEN) to the cluster's token (`ray get-auth-token` on the head node)"
        )
    # JobSubmissionClient raises the builtin ConnectionError; later calls let requests' own escape.
    unreachable = type(exc).__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout")
    if isinstance(exc, ConnectionError) or unreachable or "Failed to connect" in str(exc):
        return UserError(
            f"{address}: cannot reach the Ray Jobs API; check --address (http://HEAD:8265), that the cluster "
            "is up, and the tunnel if it is remote"
        )
    return None


@contextlib.contextmanager
def cluster_errors(address: str) -> Iterator[None]:
    """Re-raise connection and authentication failures as one-line UserErrors."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        err = _describe(address, exc)
        if err is None:
            raise
        raise err from exc


def connect(address: str | None) -> Any:
    """A JobSubmissionClient for --address (else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, as Ray does)."""
    from ray.job_submission import JobSubmissionClient

    if address:
        address = _normalise_address(address)
        _warn_clear_token(address)
        with cluster_errors(address), _address_env_hidden():
            return JobSubmissionClient(address)
    env_address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not env_address:
        raise ConfigError("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    with cluster_errors(env_address):
        return JobSubmissionClient()


# A job under an id: its status and exit code (None while it runs, see `exit_code`).
Found = tuple[str, int | None]


@dataclass(frozen=True)
class Attempt:
    """Where a submission goes: `id`, and `existing`, the status of the job already under it (None: submit
    there now) with its `exit_code`; `previous` is the FAILED or STOPPED attempt it runs again, if any."""

    id: str
    existing: str | None = None
    previous: tuple[str, str] | None = None
    exit_code: int | None = None


def reruns(found: Found | None) -> bool:
    """Whether submitting again runs this job again: it was stopped, or failed short of its end."""
    return found is not None and found[0] in RERUN and found[1] not in FINISHED_EXIT_CODES


def attempt_id(base: str, n: int) -> str:
    """The n-th attempt's submission id: `base`, then `base-r2`, `base-r3`..."""
    return base if n == 1 else f"{base}-r{n}"


def next_attempt(base: str, status: Callable[[str], Found | None]) -> Attempt:
    """The first attempt of `base` that is free or holds a job not to run again (PENDING, RUNNING,
    SUCCEEDED, a nightly FAILED with drift flagged); `status(id)` is the job under an id, None if none."""
    n, previous = 1, None
    while reruns(found := status(attempt_id(base, n))):
        previous = (attempt_id(base, n), found[0])
        n += 1
    existing, code = found or (None, None)
    return Attempt(attempt_id(base, n), existing, previous, code)


def _status_or_none(client: Any, job_id: str) -> Found | None:
    info = _info_or_none(client, job_id)
    return None if info is None else (status_of(info), exit_code(info))


def submit(
    client: Any,
    kind: str,
    spec: Spec,
    *,
    working_dir: str | None = None,
    pip: list[str] | None = None,
    env: dict[str, str] | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    job_id: str | None = None,
) -> Attempt:
    """Submit one job under its id (`job_id`, else derived from the spec), or its next attempt's when the job
    under that id was STOPPED or FAILED (see `reruns`); one pending, running or done is not rerun."""
    attempt = next_attempt(job_id or submission_id(kind, spec), lambda j: _status_or_none(client, j))
    if attempt.existing is not None:
        return attempt
    with cluster_errors(client.get_address()):
        try:
            client.submit_job(
                entrypoint=entrypoint(kind, spec),
                submission_id=attempt.id,
                runtime_env=runtime_env(working_dir, pip, job_env(env)),
                metadata=metadata(kind, spec),
                entrypoint_num_cpus=num_cpus,
                entrypoint_num_gpus=num_gpus,
            )
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise
            # Submitted by someone else since we looked (two retried ticks at once): theirs runs.
            info = job_info(client, attempt.id)
            return Attempt(attempt.id, status_of(info), attempt.previous, exit_code(info))
    return attempt


@dataclass(frozen=True)
class Submission:
    """What `raysegment submit` was asked: the spec, the cluster, how the package ships, the job's env."""

    kind: str
    spec_file: str
    address: str | None = None
    working_dir: str | None = None
    no_working_dir: bool = False
    pip: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    num_cpus: float | None = None
    num_gpus: float | None = None
    date: str | None = None
    submission_id: str | None = None
    wait: bool = False


def spec_to_submit(kind: str, spec_file: str, date: str | None) -> Spec:
    """The validated spec; nightly's date pinned to --date, else the spec's, else today (UTC)."""
    spec = load_job_spec(kind, spec_file)
    if isinstance(spec, NightlySpec):
        spec.date = date or spec.date or datetime.datetime.now(datetime.UTC).date().isoformat()
    elif date:
        raise ConfigError("--date only applies to nightly")
    return spec


def shipped_dir(working_dir: str | None, no_working_dir: bool, pip: tuple[str, ...]) -> str | None:
    """The folder shipped as working_dir: --working-dir, else this repo checkout; refuses to ship nothing."""
    if no_working_dir:
        return None
    if working_dir is None:
        checkout = find_checkout()
        working_dir = str(checkout) if checkout else None
    if working_dir is None and not pip:
        raise ConfigError(
            "nothing ships raysegment to the cluster: run from the repo checkout, or pass --working-dir DIR, "
            "--pip REQUIREMENT, or --no-working-dir if the cluster has it installed"
        )
    return working_dir


@contextlib.contextmanager
def ray_lines_to_log() -> Iterator[None]:
    """Ray's job client logs its packaging (working_dir excludes, "Uploading package") on its own console
    handler: into a log file, as every command's Ray lines go, unless -v (without Ray Data's import)."""
    if logs.verbose():
        yield
        return
    log = logs.start("submit", None)
    try:
        logs.route_ray_logs(log, logs.JOB_CLIENT_LOGGERS)
        yield
    finally:
        log.finish()


def submit_and_follow(req: Submission, write: Callable[[str], None]) -> int:
    """Submit (once per spec while its job is pending, running or done; again after it was stopped or
    failed, see `reruns`), report it through `write`; with `wait`, stream logs: the job's exit code."""
    with ray_lines_to_log():
        return _submit_and_follow(req, write)


def _submit_and_follow(req: Submission, write: Callable[[str], None]) -> int:
    spec = spec_to_submit(req.kind, req.spec_file, req.date)
    working_dir = shipped_dir(req.working_dir, req.no_working_dir, req.pip)
    extra_env = parse_env(req.env)
    job_env(extra_env)  # refuse secrets before talking to the cluster
    client = connect(req.address)
    attempt = submit(
        client,
        req.kind,
        spec,
        working_dir=working_dir,
        pip=list(req.pip),
        env=extra_env,
        num_cpus=req.num_cpus,
        num_gpus=req.num_gpus,
        job_id=req.submission_id,
    )
    job_id = attempt.id
    write(f"{job_id}: {submitted_text(attempt, client.get_address(), req.submission_id is not None)}\n")
    if not req.wait:
        return 0
    try:
        info = wait(client, job_id, write)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM stops the following, not the job
        write(f"{job_id}: {still_running(job_id)}\n")
        setattr(exc, console.FOLLOWING, True)
        raise
    code = exit_status(info)
    write(f"{job_id}: {status_of(info)} (exit code {code})\n")
    return code


def submitted_text(attempt: Attempt, address: str, id_given: bool = False) -> str:
    """What `submit` says about its attempt (after the id); `id_given`: the user passed --submission-id."""
    hint = f"; pass {'another ' if id_given else ''}--submission-id to run it again"
    if attempt.existing == "SUCCEEDED":
        return f"already submitted (SUCCEEDED){hint}"
    if attempt.existing is not None and attempt.exit_code is not None:  # ended, not to rerun: a nightly's drift
        return f"already submitted ({attempt.existing}, exit code {attempt.exit_code}){hint}"
    if attempt.existing is not None:
        return f"already submitted ({attempt.existing})"
    if attempt.previous is not None:
        previous, status = attempt.previous
        return f"submitted to {address} (runs {previous} again: {status})"
    return f"submitted to {address}"


def still_running(job_id: str) -> str:
    """What a stopped `submit --wait` or `jobs logs --follow` leaves: the job itself goes on."""
    return (
        f"the job goes on running on the cluster; follow it with `raysegment jobs logs {job_id} --follow`, "
        f"stop it with `raysegment jobs stop {job_id}`"
    )


def status_of(info: Any) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return getattr(info.status, "value", str(info.status))


def exit_code(info: Any) -> int | None:
    """The job's exit code: its driver's when Ray has it; a STOPPED job (Ray records none: it SIGTERMs the
    driver, `ray job stop`) 143, as every command stopped by SIGTERM; None while the job runs."""
    if info.driver_exit_code is not None:
        return int(info.driver_exit_code)
    status = status_of(info)
    if status == "STOPPED":
        return console.TERMINATED
    if status in TERMINAL:
        return 0 if status == "SUCCEEDED" else 3  # a FAILED job whose driver never ran (runtime_env setup)
    return None


def exit_status(info: Any) -> int:
    """The exit code of a job that ended (see exit_code)."""
    code = exit_code(info)
    return 3 if code is None else code


def wait(client: Any, job_id: str, out: Callable[[str], None], poll_s: float = 1.0) -> Any:
    """Stream a job's logs until it ends; returns its final JobDetails."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out(chunk)

    with cluster_errors(client.get_address()):
        try:
            asyncio.run(tail())
        except RuntimeError as exc:  # the log socket closed early: fall back to polling the status
            log.warning("log stream for %s ended early (%s); polling its status", job_id, exc)
        info = client.get_job_info(job_id)
        while status_of(info) not in TERMINAL:
            time.sleep(poll_s)
            info = client.get_job_info(job_id)
    return info


def job_rows(client: Any) -> list[dict[str, Any]]:
    """Every job on the cluster, oldest first, as plain rows."""
    with cluster_errors(client.get_address()):
        jobs = client.list_jobs()
    rows = []
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(j.start_time / 1000)) if j.start_time else "-"
        rows.append(
            {
                "id": j.submission_id or j.job_id,
                "status": status_of(j),
                "kind": (j.metadata or {}).get("raysegment_kind", "-"),
                "start_utc": start,
                "exit_code": "-" if (code := exit_code(j)) is None else code,
                "entrypoint": j.entrypoint,
            }
        )
    return rows


def _info_or_none(client: Any, job_id: str) -> Any:
    """JobDetails of one job, None if the cluster has none under that id."""
    with cluster_errors(client.get_address()):
        try:
            return client.get_job_info(job_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return None
            raise


def job_info(client: Any, job_id: str) -> Any:
    """JobDetails of one job, or a UserError naming the id."""
    info = _info_or_none(client, job_id)
    if info is None:
        raise UserError(f"{job_id}: no such job on {client.get_address()}; see `raysegment jobs list`")
    return info


def job_logs(client: Any, job_id: str) -> str:
    """A job's driver logs so far."""
    job_info(client, job_id)
    with cluster_errors(client.get_address()):
        return client.get_job_logs(job_id)


def stop_job(client: Any, job_id: str) -> bool:
    """Ask a job to stop; False if it was not running."""
    job_info(client, job_id)
    with cluster_errors(client.get_address()):
        return client.stop_job(job_id)
