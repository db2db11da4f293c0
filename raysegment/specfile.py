"""Reading a job spec file: YAML with bounds, and values quoted in errors kept short.

A spec is a few dozen fields, but YAML aliases can turn a small file into billions of
values (the "billion laughs") once a value is converted or quoted in an error. The
loader refuses big files, deep nesting, many aliases and documents that expand past
MAX_SPEC_VALUES before anything is built, and `echo` quotes any value in bounded space.
"""

from __future__ import annotations

import os
import reprlib
from typing import Any

import yaml

from raysegment.errors import ConfigError
from raysegment.storage import redact

MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 32
MAX_SPEC_ALIASES = 64
MAX_SPEC_VALUES = 100_000
MAX_ECHO_CHARS = 80
_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxstring, _ECHO.maxother = 2, MAX_ECHO_CHARS, MAX_ECHO_CHARS
_ECHO.maxtuple = _ECHO.maxlist = _ECHO.maxdict = _ECHO.maxset = 4


def clip(text: str) -> str:
    """Text cut to MAX_ECHO_CHARS, with an ellipsis where it was cut."""
    return text if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 1] + "…"


def echo(value: Any) -> str:
    """A value as an error message quotes it: repr, credentials redacted, at most about MAX_ECHO_CHARS."""
    if isinstance(value, str):
        value = redact(value)
    return clip(_ECHO.repr(value))  # reprlib never builds the full repr of a huge value


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting and too many aliases while composing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_SPEC_ALIASES:
                raise ConfigError(f"more than {MAX_SPEC_ALIASES} YAML aliases (*name)")
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > MAX_SPEC_DEPTH:
                raise ConfigError(f"nested more than {MAX_SPEC_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values the node becomes once every alias is expanded (shared nodes counted each time)."""
    if id(node) not in memo:
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        memo[id(node)] = 1 + sum(_expanded_size(c, memo) for c in children)
    return memo[id(node)]


def _parse_yaml(text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_SPEC_VALUES:
            raise ConfigError(f"expands to more than {MAX_SPEC_VALUES} values (YAML aliases)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str) -> dict[str, Any]:
    """A spec file's mapping, or a ConfigError naming the file."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found")
    if os.path.getsize(path) > MAX_SPEC_BYTES:
        raise ConfigError(f"{path}: over {MAX_SPEC_BYTES >> 10} KiB; a job spec is a short mapping of field: value")
    try:
        with open(path) as f:
            data = _parse_yaml(f.read(MAX_SPEC_BYTES + 1))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}; a job spec is a short mapping of field: value") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({clip(str(exc).splitlines()[0])})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job spec must be a mapping of field: value")
    return data
