"""The S3 filesystem raysegment uses: s3fs with a time bound on every attempt.

A PUT to a store that accepts the connection and never answers hangs without end despite
botocore's read_timeout (seen with a SIGSTOPped SeaweedFS and with a silent socket), which
would hold a task past the job's storage deadline. fsspec's sync wrappers take a `timeout`;
this class passes one to each method raysegment calls, so a hung attempt raises
FSTimeoutError, which `storage.call` retries until the deadline. The bound is a constructor
argument, so it survives pickling into Ray tasks (fsspec rebuilds instances from them).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import s3fs
from fsspec.asyn import mirror_sync_methods

_METHODS = ("cat_file", "pipe_file", "info", "ls", "find", "exists", "rm", "rm_file", "cat", "mkdir", "call_s3")
# Whole-file transfers (shards, model files) may take long for good reasons.
_TRANSFERS = ("put_file", "get_file")
TRANSFER_TIMEOUT_S = 1800.0


class BoundedS3FileSystem(s3fs.S3FileSystem):
    def __init__(self, *args: Any, attempt_timeout_s: float = 120.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # fsspec makes the sync wrappers after __init__; make them now to bound them (the later
        # pass leaves methods that are no longer the defaults alone).
        mirror_sync_methods(self)
        for names, seconds in ((_METHODS, attempt_timeout_s), (_TRANSFERS, max(attempt_timeout_s, TRANSFER_TIMEOUT_S))):
            for name in names:
                method = getattr(self, name, None)
                # Only fsspec's generated sync wrappers (around the coroutine `_name`) take `timeout`.
                if method is not None and inspect.iscoroutinefunction(getattr(method, "__wrapped__", None)):
                    setattr(self, name, functools.partial(method, timeout=seconds))
