"""Errors a user can cause and fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A problem with the input, config or environment that the user can fix."""

    exit_code = 2


class ConfigError(UserError):
    """A job spec or flag is invalid."""


class StorageError(UserError):
    """A URI cannot be read or written (missing bucket, credentials, endpoint).

    ``transient`` is True when the store stayed unreachable past the retry deadline:
    the input may be fine, so it must fail the job rather than become an error row.
    """

    transient = False


class DataError(UserError):
    """A data set or image is invalid."""


class JobError(UserError):
    """A job ran but its result is not acceptable (too many bad inputs, key collisions)."""

    exit_code = 3


class RunFailed(JobError):
    """An `infer` run that ran to its end and failed its checks; `record` is its run record (as written)."""

    def __init__(self, message: str, record: dict) -> None:
        super().__init__(message)
        self.record = record

    def __reduce__(self) -> tuple:  # pickled (a Ray task's error) with its record
        return (RunFailed, (str(self), self.record))
