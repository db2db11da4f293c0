"""Run locks in storage: an object created only if absent, so two runs never overlap.

Creation is the atomic step: ``O_CREAT | O_EXCL`` locally, a conditional PUT
(``If-None-Match: *``) on S3. S3 has no rename and no lock service; the
conditional PUT is its only compare-and-set, and a store that ignores the
header would let two runs in (AWS S3 and SeaweedFS honour it). A lock older
than ``stale_after_s`` belongs to a run presumed dead and is taken over; so, at once, is one whose process
is known dead: written on this machine (the same boot and PID namespace) by a PID that no longer runs, as a
SIGKILLed or OOM-killed driver leaves it (its re-run resumes instead of waiting out the stale age).

A lock's age is measured from the store's modification time (S3 LastModified,
local mtime), not from the clock of the host that wrote it: a writer whose clock
runs ahead can't make its lock look fresh for ever, and one whose clock lags
can't make a live lock look stale. Every create, read and remove goes through
``storage.call``, under the job's storage deadline (``storage_retry_s``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
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

    def create() -> bool:
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

    return loc.call(create)


def _modified(info: dict[str, Any]) -> float | None:
    """The store's modification time of an object, as a Unix time."""
    stamp = info.get("LastModified") or info.get("mtime")
    if isinstance(stamp, datetime.datetime):
        return stamp.timestamp()
    return float(stamp) if stamp else None


@dataclasses.dataclass(frozen=True)
class Holder:
    """What a lock says about the run that holds it, and how old the lock is by the store's clock."""

    info: dict[str, Any]  # the lock's JSON; {} when unreadable (a create caught before its write)
    age_s: float


def machine_id() -> str | None:
    """This machine and PID namespace (boot id and the namespace's inode): PIDs are comparable only within it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None  # not Linux: no lock is known dead, they age out


# The owners of the locks this process holds now (acquired, not released): one of this process's whose owner is
# not among them was left by a run that has ended (its release failed: the store was down), not a live one.
_HELD_HERE: set[str] = set()


def written_here(info: dict[str, Any]) -> bool:
    """Whether a lock was written on this machine (the same boot and PID namespace) by a process with a PID:
    its holder's liveness is then known, and the lock is taken over as soon as that process is gone."""
    pid, here = info.get("pid"), machine_id()
    return here is not None and info.get("machine") == here and isinstance(pid, int) and pid > 0


def holder_dead(info: dict[str, Any]) -> bool:
    """Whether a lock's writer is known to be gone: its process on this machine no longer runs, or it is
    this process and no longer holds it."""
    if not written_here(info):
        return False
    pid = info["pid"]
    if pid == os.getpid():
        return info.get("owner") not in _HELD_HERE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it runs, as another user
    return False


class RunLock:
    """A lock object at `loc`, held for the duration of a `with` block. ``now`` is the clock ages are
    measured with (tests move it)."""

    def __init__(
        self,
        loc: storage.Location,
        stale_after_s: float,
        purpose: str = "run",
        now: Callable[[], float] = time.time,
        heartbeat_s: float | None = None,
    ) -> None:
        self.loc = loc
        self.stale_after_s = stale_after_s
        self.purpose = purpose
        self.now = now
        self.owner = uuid.uuid4().hex
        self.held = False
        self.created = time.time()
        # While held (a `with` block), the lock is rewritten every quarter of the stale age: a run that
        # outlives that age is alive, not dead, and must not be taken over.
        self.heartbeat_s = max(1.0, stale_after_s / 4) if heartbeat_s is None else heartbeat_s
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def _body(self) -> bytes:
        info = {
            "owner": self.owner,
            "purpose": self.purpose,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "created_ts": self.created,
            "machine": machine_id(),
        }
        return json.dumps(info).encode()

    def refresh(self) -> None:
        """Rewrite the lock while it is still ours: its age (the store's modification time) starts again."""
        holder = self._holder()
        if self.held and holder is not None and holder.info.get("owner") == self.owner:
            self.loc.call(lambda: self.loc.fs.pipe_file(self.loc.path, self._body()))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except Exception as exc:  # a store down for a while: the next beat tries again
                log.warning("could not refresh the lock %s: %s", self.loc.uri, exc)

    def _holder(self) -> Holder | None:
        """The current lock, or None if there is none; a store that stays down past the deadline raises."""

        def read() -> tuple[bytes, dict[str, Any]] | None:
            self.loc.fs.invalidate_cache(self.loc.path)  # the modification time of the lock there now
            try:
                return self.loc.fs.cat_file(self.loc.path), self.loc.fs.info(self.loc.path)
            except FileNotFoundError:
                return None

        found = self.loc.call(read)
        if found is None:
            return None
        data, info = found
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        modified = _modified(info) or float(body.get("created_ts") or 0)
        return Holder(body, self.now() - modified)

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; LockedError if a live run holds it."""
        for _ in range(2):
            if create_exclusive(self.loc, self._body()):
                self._hold()
                return
            holder = self._holder()
            if holder is None:
                continue  # released between our attempt and the read: try once more
            if holder.info.get("owner") == self.owner:
                self._hold()  # our own create, retried after its reply was lost
                return
            dead = holder_dead(holder.info)
            if holder.age_s <= self.stale_after_s and not dead:
                raise LockedError(self._held_message(holder))
            log.warning(
                "taking over a %s lock %s (%.0f s old, host %s, pid %s)",
                "dead process's" if dead else "stale",
                self.loc.uri,
                holder.age_s,
                holder.info.get("host"),
                holder.info.get("pid"),
            )
            self._remove_if_owned_by(holder.info.get("owner"))
        raise LockedError(f"{self.loc.uri}: could not take the lock; another {self.purpose} is starting, try again")

    def _held_message(self, holder: Holder) -> str:
        info = holder.info
        if written_here(info):
            # Its process runs (else the lock was taken over); a lock it leaves behind is taken over at once, one
            # it stops refreshing (hung, or the store's clock jumped) after the stale age.
            pid = info["pid"]
            after = (
                f"wait for it to finish (it runs on this machine: if pid {pid} dies, its lock is taken over at "
                f"once, or after {int(self.stale_after_s)} s without a refresh; or stop pid {pid})"
            )
        else:
            after = (
                "wait for it to finish, or delete the lock if that run is dead (it is taken over "
                f"after {int(self.stale_after_s)} s)"
            )
        return (
            f"{self.loc.uri}: another {self.purpose} holds the lock since {info.get('created', '?')} "
            f"(host {info.get('host', '?')}, pid {info.get('pid', '?')}, {max(holder.age_s, 0):.0f} s old by the "
            f"store's clock); {after}"
        )

    def _remove_if_owned_by(self, owner: str | None) -> None:
        current = self._holder()
        if current is not None and current.info.get("owner") == owner:
            self.loc.call(lambda: self.loc.fs.rm_file(self.loc.path))

    def still_held(self) -> bool:
        """Whether the lock is still this one's: a store down past the stale age, or a clock far ahead on
        another host, can let a second run take it over while this one runs on."""
        holder = self._holder()
        return self.held and holder is not None and holder.info.get("owner") == self.owner

    def _hold(self) -> None:
        self.held = True
        _HELD_HERE.add(self.owner)

    def release(self) -> None:
        """Remove the lock if it is still ours (a taker-over may have replaced it)."""
        if self.held:
            self.held = False
            _HELD_HERE.discard(self.owner)  # from here a lock left behind (the remove failed) is a dead one
            try:
                self._remove_if_owned_by(self.owner)
            except storage.StorageError as exc:
                log.warning("could not remove the lock %s: %s", self.loc.uri, exc)

    def __enter__(self) -> RunLock:
        self.acquire()
        self._stop.clear()
        self._beating = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
        self._beating.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
            self._beating = None
        self.release()
