"""What every command and job entrypoint prints: user errors as one line with their exit code, results, JSON.

Shared by the CLI (`cli.py`) and the `ray job submit` entrypoints (`entrypoints.py`), so neither
imports the other.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from raysegment.errors import UserError


def user_error(exc: BaseException | None) -> UserError | None:
    """The UserError behind an exception, also when Ray wrapped it in a task or train error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # Ray re-raises a task's error as a subclass of both RayTaskError and the error: its text
        # is the remote traceback, so keep walking to the original (its .cause).
        wrapped = any(c.__module__.startswith("ray.") for c in type(exc).__mro__)
        if isinstance(exc, UserError) and not wrapped:
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print user-fixable errors as one line (exit 2; 3 for a failed job), without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            err = user_error(exc)
            if err is None:
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)

    return wrapper


def echo_lines(lines: Iterable[str]) -> None:
    """Print each line to stdout."""
    for line in lines:
        click.echo(line)


def print_json(result: dict[str, Any]) -> None:
    """Print a result as indented JSON (benchmarks end with it, for scripts)."""
    click.echo(json.dumps(result, indent=2, default=str))
