"""Run locks in storage: an object created only if absent, so two runs never overlap.

Creation is the atomic step: ``O_CREAT | O_EXCL`` locally, a conditional PUT
(``If-None-Match: *``) on S3. S3 has no rename and no lock service; the
conditional PUT is its only compare-and-set, and a store that ignores the
header would let two runs in (AWS S3 and SeaweedFS honour it). A lock older
than ``stale_after_s`` belongs to a run presumed dead and is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from types import TracebackType
from typing import Any

from raysegment import storage
from raysegment.errors import UserError

log = logging.getLogger(__name__)


class LockedError(UserError):
    """Another run holds the lock: nothing was done."""

    exit_code = 5


def create_exclusive(loc: storage.Location, data: bytes) -> bool:
    """Write data at loc only if nothing is there; False if something already is."""
    with storage.storage_errors(loc.uri):
        if loc.remote:
            try:
                loc.fs.pipe_file(loc.path, data, mode="create")
            except FileExistsError:
                return False
            except OSError:
                # s3fs maps some stores' 412 to a plain OSError: tell "exists" from real failures.
                if loc.fs.exists(loc.path):
                    return False
                raise
            return True
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        try:
            fd = os.open(loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True


class RunLock:
    """A lock object at `loc`, held for the duration of a `with` block."""

    def __init__(self, loc: storage.Location, stale_after_s: float, purpose: str = "run") -> None:
        self.loc = loc
        self.stale_after_s = stale_after_s
        self.purpose = purpose
        self.owner = uuid.uuid4().hex
        self.held = False

    def _body(self) -> bytes:
        info = {
            "owner": self.owner,
            "purpose": self.purpose,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "created_ts": time.time(),
        }
        return json.dumps(info).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.loc))
        except (storage.StorageError, ValueError):
            return None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; LockedError if a live run holds it."""
        for _ in range(2):
            if create_exclusive(self.loc, self._body()):
                self.held = True
                return
            other = self._read()
            if other is None:
                continue  # released (or unreadable) between our attempt and the read: try once more
            age = time.time() - float(other.get("created_ts", 0))
            if age <= self.stale_after_s:
                raise LockedError(
                    f"{self.loc.uri}: another {self.purpose} holds the lock since {other.get('created')} "
                    f"(host {other.get('host')}, pid {other.get('pid')}); wait for it to finish, or delete the "
                    f"lock if that run is dead (it is taken over after {int(self.stale_after_s)} s)"
                )
            log.warning("taking over a stale lock %s (%.0f s old, host %s)", self.loc.uri, age, other.get("host"))
            self._remove_if_owned_by(other.get("owner"))
        raise LockedError(f"{self.loc.uri}: could not take the lock; another {self.purpose} is starting, try again")

    def _remove_if_owned_by(self, owner: str | None) -> None:
        current = self._read()
        if current is not None and current.get("owner") == owner:
            with storage.storage_errors(self.loc.uri):
                self.loc.fs.rm_file(self.loc.path)

    def release(self) -> None:
        """Remove the lock if it is still ours (a taker-over may have replaced it)."""
        if self.held:
            self.held = False
            try:
                self._remove_if_owned_by(self.owner)
            except storage.StorageError as exc:
                log.warning("could not remove the lock %s: %s", self.loc.uri, exc)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
