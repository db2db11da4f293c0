"""Key collisions: two inputs whose keys are one (``a.png`` and ``a.jpg`` -> ``a``).

Masks and summary rows are named by key, so colliding inputs would overwrite each
other's mask. They are found before anything is read or written, where one unit of
work sees every input that can share a key: a listing unit (the files of one folder
are always listed together), one URI list (streamed by one task, two passes), one
tar archive (as it streams), or the key column of a Parquet table (read first, on
the driver). Each colliding input becomes an error row and no mask; the run then
fails its rows-vs-keys check until the inputs are renamed and the run is redone
with ``--overwrite``.

Keys that differ only in Unicode normalisation (NFC ``é`` and NFD ``e`` + accent)
are collisions too: they print the same, and some stores and file systems
normalise names, so their masks could land on one file.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Iterator

import numpy as np

MAX_NAMES = 4  # names quoted in one message
MAX_QUOTE = 120  # characters of one quoted name or key
FIX = "rename one, then re-run with --overwrite"


def fold(key: str) -> str:
    """What two keys must share to collide."""
    return unicodedata.normalize("NFC", key)


def _quote(text: str) -> str:
    return text if len(text) <= MAX_QUOTE else text[: MAX_QUOTE - 1] + "…"


def message(names: list[str], key: str, fix: str = FIX) -> str:
    """The error text of every input in one collision."""
    shown = [_quote(n) for n in names[:MAX_NAMES]]
    if len(names) > MAX_NAMES:
        shown.append(f"{len(names) - MAX_NAMES} more")
    listed = ", ".join(shown[:-1]) + " and " + shown[-1]
    forms = " (the same name in two Unicode forms, NFC and NFD)" if len(set(map(fold, names))) < len(set(names)) else ""
    return f"key collision: {listed} map to key '{_quote(key)}'{forms}; {fix}"


def within(keys: list[str], names: list[str], fix: str = FIX) -> list[str]:
    """Per input of one unit: '' or the message of the collision it is part of, ending with `fix`."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(fold(key), []).append(i)
    out = [""] * len(keys)
    for members in groups.values():
        if len(members) > 1:
            text = message([names[i] for i in members], keys[members[0]], fix)
            for i in members:
                out[i] = text
    return out


def nested(keys: list[str], names: list[str], claimed: Iterable[str] = ()) -> list[str]:
    """Per archive: '' or why its members' keys could collide with another archive's.

    Archive ``a.tar`` holding ``b/c.png`` and archive ``a/b.tar`` holding ``c.png`` both give
    ``a/b/c``. The inner archive (the one below another archive's key) is refused; ``claimed``
    are archive keys of other units (the driver's first level) that can hold it.
    """
    outer = {fold(k) for k in keys} | {fold(k) for k in claimed}
    out = []
    for key, name in zip(keys, names):
        parts = fold(key).split("/")
        above = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in outer), None)
        out.append(
            f"archive {_quote(name)} lies under the key of archive '{_quote(above)}', whose members could have "
            "the same keys: not read; move it out of that folder"
            if above is not None
            else ""
        )
    return out


Pairs = Callable[[], Iterator[tuple[list[str], list[str]]]]


def duplicated(pairs: Pairs) -> dict[str, list[str]]:
    """fold(key) -> the names of every input with that key, for keys that occur more than once.

    ``pairs`` streams (keys, names) blocks and is called twice: a first pass keeps only an
    8-byte hash per key, a second collects names for the few hashes seen twice, so a list
    of millions of URIs is checked in bounded memory.
    """
    hashes = [np.fromiter((hash(fold(k)) for k in keys), np.int64, len(keys)) for keys, _ in pairs()]
    values, counts = np.unique(np.concatenate(hashes) if hashes else np.empty(0, np.int64), return_counts=True)
    candidates = set(values[counts > 1].tolist())
    if not candidates:
        return {}
    groups: dict[str, list[str]] = {}
    for keys, names in pairs():
        for key, name in zip(keys, names):
            folded = fold(key)
            if hash(folded) in candidates:
                groups.setdefault(folded, []).append(name)
    return {k: names for k, names in groups.items() if len(names) > 1}


def repeated(name: str, first: str, key: str) -> str:
    """The error text of a tar member whose key an earlier member of the same archive has."""
    return (
        f"key collision: member {_quote(name)} repeats key '{_quote(key)}' of member {_quote(first)} "
        f"(that one is kept); {FIX}"
    )
