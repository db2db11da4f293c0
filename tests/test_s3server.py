"""The weed-mini S3 fixture serves real S3 to s3fs and pyarrow, across restarts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import s3fs
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

from raysegment.bench.s3server import S3Server

pytestmark = pytest.mark.s3


def _s3fs(server: S3Server, **kwargs: Any) -> s3fs.S3FileSystem:
    # Credentials come from the env the s3_server fixture exported. A fresh
    # instance (no fsspec instance cache) so no pooled connection or listing
    # outlives a server restart.
    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": server.endpoint_url},
        skip_instance_cache=True,
        **kwargs,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_env_exported(s3_server: S3Server, s3_prefix: str) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    assert s3_prefix.startswith("s3://raysegment-test/")


def test_s3fs_roundtrip(s3_server: S3Server, s3_prefix: str) -> None:
    fs = _s3fs(s3_server)
    fs.pipe(f"{s3_prefix}/a/hello.txt", b"hello weed")
    with fs.open(f"{s3_prefix}/a/big.bin", "wb") as f:
        f.write(os.urandom(6 * 2**20))  # > 5 MiB part size: multipart upload

    assert fs.cat(f"{s3_prefix}/a/hello.txt") == b"hello weed"
    assert fs.size(f"{s3_prefix}/a/big.bin") == 6 * 2**20
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_prefix}/a", refresh=True)}
    assert names == {"hello.txt", "big.bin"}


def test_pyarrow_parquet_roundtrip(s3_server: S3Server, s3_prefix: str) -> None:
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(_s3fs(s3_server)))
    path = s3_prefix.removeprefix("s3://") + "/table.parquet"
    table = pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]})

    pq.write_table(table, path, filesystem=fs)

    assert fs.get_file_info(path).type == pafs.FileType.File
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_make_bucket(s3_server: S3Server) -> None:
    fs = _s3fs(s3_server)
    assert s3_server.make_bucket("raysegment-extra") == "raysegment-extra"
    s3_server.make_bucket("raysegment-extra")  # idempotent
    fs.pipe("raysegment-extra/x", b"x")
    assert fs.cat("raysegment-extra/x") == b"x"


def test_standalone_server_cleans_up(tmp_path: Path) -> None:
    # A second server beside the session one: ports must not clash.
    with S3Server("other-bucket", root=tmp_path) as server:
        pid = server.pid
        assert pid is not None and _pid_alive(pid)
        _s3fs(server).pipe("other-bucket/k", b"v")
    assert not _pid_alive(pid)
    assert server.pid is None
    assert (tmp_path / "weed.out").is_file()  # caller-owned root is kept
    assert not list(Path("/tmp").glob(f"seaweedfs-*-grpc-{server.ports['s3.port.grpc']}.sock"))


def test_stop_start_keeps_data(s3_server: S3Server, s3_prefix: str) -> None:
    key = f"{s3_prefix}/survives.txt"
    _s3fs(s3_server).pipe(key, b"still here")
    url, old_pid = s3_server.endpoint_url, s3_server.pid
    assert old_pid is not None

    s3_server.stop()
    try:
        assert s3_server.pid is None
        assert not _pid_alive(old_pid)
        # Fail fast while down: no botocore retries, no s3fs retry loop.
        fs = _s3fs(s3_server, config_kwargs={"retries": {"max_attempts": 1}})
        fs.retries = 1
        with pytest.raises(EndpointConnectionError):  # clients see the outage
            fs.cat(key)
    finally:
        s3_server.start()  # later tests need the session server back

    assert s3_server.endpoint_url == url
    assert s3_server.pid not in (None, old_pid)
    fs = _s3fs(s3_server)
    assert fs.cat(key) == b"still here"
    fs.pipe(f"{s3_prefix}/after.txt", b"writable")
    assert fs.cat(f"{s3_prefix}/after.txt") == b"writable"


def test_paused_server_hangs_requests_then_serves_them(s3_server: S3Server, s3_prefix: str) -> None:
    key = f"{s3_prefix}/paused.txt"
    fs = _s3fs(s3_server, config_kwargs={"read_timeout": 1, "retries": {"max_attempts": 1}})
    fs.retries = 1
    fs.pipe(key, b"kept")
    with s3_server.paused():
        with pytest.raises(ReadTimeoutError):  # accepted, never answered: not an outage that refuses
            fs.cat(key)
    assert fs.cat(key) == b"kept"
