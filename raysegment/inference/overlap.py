"""INPUT and OUTPUT kept apart: what a job writes is never read back as its input.

An OUTPUT inside INPUT would make every re-run list the last run's masks and reports
as new images (4, 9, 14 rows for `infer MODEL in in/out` run three times), so it is
refused before anything is written, as is an INPUT inside the folders a job writes
(``--overwrite`` would delete it). A URI list may name anything except those folders:
such entries become error rows. Local paths are compared with their symlinks resolved;
two locations on different stores never overlap.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from raysegment import storage
from raysegment.errors import ConfigError
from raysegment.inference.output import REPORT_TALLY, RUN_LOCK

# What `infer` writes directly under OUTPUT (inference/output.py, report.py).
INFER_PARTS = (
    *("masks", "summaries", "runs", "archives", "report.html", "overlays.png", REPORT_TALLY),
    *(storage.SUCCESS, RUN_LOCK),
)


def comparable(uri: str) -> str:
    """A URI as a string to compare prefixes with, without touching storage."""
    if storage.is_remote(uri):
        return "s3://" + uri.split("://", 1)[1].rstrip("/")
    return os.path.abspath(os.path.expanduser(storage.file_path(uri)))


def _forms(loc: storage.Location) -> set[str]:
    """Every spelling of a location to compare: on local disk also the one with symlinks resolved."""
    if loc.remote:
        return {comparable(loc.uri)}
    return {comparable(loc.path), os.path.realpath(loc.path)}


def below(path: str, folder: str) -> str | None:
    """path relative to folder if it is folder or lies under it, else None."""
    if path == folder:
        return ""
    head = folder.rstrip("/") + "/"
    return path[len(head) :] if path.startswith(head) else None


def check_apart(
    input_loc: storage.Location,
    output_loc: storage.Location,
    written: Callable[[str], bool] = INFER_PARTS.__contains__,
    job: str = "infer",
) -> None:
    """Refuse OUTPUT inside INPUT, and INPUT inside what the job writes under OUTPUT (``written``
    tells those top-level names). Called before the job writes anything."""
    inp, out = storage.redact(input_loc.uri), storage.redact(output_loc.uri)
    if within(output_loc, input_loc):
        raise ConfigError(
            f"{job}: OUTPUT {out} is inside INPUT {inp}: every run would read its masks and reports "
            "as new images; choose an OUTPUT outside INPUT"
        )
    for a in _forms(input_loc):
        for b in _forms(output_loc):
            rel = below(a, b)
            if rel and written(rel.split("/", 1)[0]):
                raise ConfigError(
                    f"{job}: INPUT {inp} is inside what the job writes under OUTPUT {out} "
                    f"({rel.split('/', 1)[0]}): outputs are never read as inputs; choose an INPUT outside it"
                )


def check_outside_model(model_loc: storage.Location, output_loc: storage.Location, job: str = "infer") -> None:
    """Refuse an OUTPUT that is MODEL's folder or lies in it: masks, summaries and runs would be mixed
    into the model's files, and copied with it wherever it is exported or deployed."""
    if within(output_loc, model_loc):
        raise ConfigError(
            f"{job}: OUTPUT {storage.redact(output_loc.uri)} is inside MODEL {storage.redact(model_loc.uri)}: "
            "the run's outputs would be mixed into the model's files; choose an OUTPUT outside MODEL"
        )


def within(loc: storage.Location, folder: storage.Location) -> bool:
    """Whether loc is folder (a file: the same file) or lies under it, in any spelling of either."""
    return any(below(b, a) is not None for a in _forms(folder) for b in _forms(loc))


@dataclasses.dataclass(frozen=True)
class OutputParts:
    """The folders and files `infer` writes under one OUTPUT, to refuse list entries that name them."""

    output: str
    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, output_loc: storage.Location) -> OutputParts:
        bases = _forms(output_loc)
        return cls(storage.redact(output_loc.uri), tuple(f"{b}/{part}" for b in sorted(bases) for part in INFER_PARTS))

    def problem(self, uri: str) -> str:
        """'' or why a listed URI is not read: it is one of this job's outputs."""
        path = comparable(uri)
        if any(below(path, p) is not None for p in self.prefixes):
            return f"an output of this job (under OUTPUT {self.output}), not read as an input"
        return ""
