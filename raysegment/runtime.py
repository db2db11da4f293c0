"""Connecting to Ray: an existing cluster (RAY_ADDRESS) or an embedded local one, quietly (see logs.py)."""

from __future__ import annotations

import logging
import os

import ray

from raysegment import console, logs

log = logging.getLogger(__name__)


def cores() -> int:
    """CPU cores of this machine."""
    return os.cpu_count() or 1


def init_ray(min_cpus: int = 0) -> None:
    """Join RAY_ADDRESS if set, else start local Ray with at least `min_cpus` logical CPUs.

    On a small machine the train workers would hold every core and starve the Ray
    Data tasks that feed them, so the local cluster advertises enough logical CPUs
    for both; TF threads are capped per worker to match.

    Quiet unless verbose: the workers' output stays in Ray's log files (no log_to_driver), a
    local cluster inherits the quiet TensorFlow env from this process, a joined one gets it
    through the job's runtime env, and Ray's driver logs go to the command's log file.
    """
    if ray.is_initialized():
        return
    logs.apply_quiet_env()
    if logs.current is not None:
        logs.route_ray_logs(logs.current)
    quiet = dict(
        log_to_driver=logs.verbose(),
        # With a log file Ray's INFO lines are worth keeping there; its console handler is quiet anyway.
        logging_level=logging.INFO if logs.current is not None or logs.verbose() else logging.WARNING,
    )
    if os.environ.get("RAY_ADDRESS"):
        env_vars = logs.worker_env_vars()
        runtime_env = {"env_vars": env_vars} if env_vars else None
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, **quiet)
    else:
        ray.init(num_cpus=max(cores(), min_cpus), **quiet)
    console.rearm_sigterm()  # ray.init made SIGTERM sys.exit(15): a command ends it as it ends Ctrl-C
    log.info("Ray's own logs (workers, Ray Train, Ray Data): %s on the head node", _ray_logs_dir())
    if logs.current is not None:
        # Disconnect before the command's output is printed: Ray's driver thread prints cluster
        # messages to stdout at any time, and stdout must end with the summary (or the JSON).
        logs.current.closers.append(ray.shutdown)


def _ray_logs_dir() -> str:
    try:  # no public API for it; Ray Data's logging reads the same
        return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:
        return "/tmp/ray/session_latest/logs"
