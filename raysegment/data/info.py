"""`data-info`: a prepared data set's manifest as plain aligned text tables."""

from __future__ import annotations

from raysegment.data.classes import manifest_warnings
from raysegment.data.fingerprint import Fingerprint, format_fingerprint
from raysegment.data.manifest import Manifest, read_manifest
from raysegment.plan import read_fingerprint

MAX_SHARDS_LISTED = 30


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell; columns in `right` are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


SHOWN_SKIPPED = 20  # as prepare's own report of invalid pairs


def describe(data: str, endpoint_url: str | None = None) -> str:
    """`raysegment data-info DATA`: the data set's manifest with its fingerprint, computed from the shards (Ray
    tasks) for a data set prepared before fingerprints or before this version's fields (`read_fingerprint`)."""
    loc, manifest = read_manifest(data, endpoint_url)
    return format_manifest(loc.uri, manifest, read_fingerprint(loc, manifest))


def format_manifest(uri: str, manifest: Manifest, fingerprint: Fingerprint | None = None) -> str:
    """Summary, class table (colour, pixel frequency) and shard table of one data set, then `fingerprint`
    (None: no fingerprint section)."""
    shards = manifest.shards
    counts = manifest.counts.to_json()
    skipped = manifest.skipped
    created_by = "?" if manifest.created_by is None else manifest.created_by
    out = [
        f"data set      {uri}",
        f"layout        {manifest.layout} (format {manifest.format_version}, {created_by})",
        f"source        {'?' if manifest.source is None else manifest.source}",
        "images        " + ", ".join(f"{s} {n}" for s, n in counts.items()) + f" (total {sum(counts.values())})",
        f"splits from   {manifest.splits_from or '?'}",
        f"channels      {manifest.channels or 3}"
        + (f" (bands {','.join(map(str, manifest.bands))})" if manifest.bands else ""),
        f"skipped       {len(skipped)} invalid or unpaired inputs"
        + (" (all in manifest.json 'skipped')" if skipped else ""),
        *[f"  {s.key}: {s.problem}" for s in skipped[:SHOWN_SKIPPED]],
        *([f"  (and {len(skipped) - SHOWN_SKIPPED} more)"] if len(skipped) > SHOWN_SKIPPED else []),
        f"content hash  {manifest.content_hash}",
        "",
    ]
    freq = manifest.pixel_frequency or [0.0] * manifest.num_classes
    rows = [
        [str(i), name, "#{:02x}{:02x}{:02x}".format(*manifest.palette[i]), f"{100 * freq[i]:.2f}%"]
        for i, name in enumerate(manifest.class_names)
    ]
    ignored = manifest.ignored_pixels
    rows.append([str(manifest.ignore_index), "(ignore)", "", "" if ignored is None else f"{ignored} px"])
    out += _table(["id", "class", "colour", "pixels"], rows, right={0, 3})
    out += [f"warning: {w}" for w in manifest_warnings(manifest)]
    out.append("")
    listed = shards if len(shards) <= MAX_SHARDS_LISTED else shards[: MAX_SHARDS_LISTED // 2]
    rows = [[s.path, s.split, str(s.rows), _mib(s.bytes)] for s in listed]
    if len(listed) < len(shards):
        rows.append([f"... {len(shards) - len(listed)} more", "", "", ""])
    sizes = sorted(s.bytes for s in shards)
    rows.append([f"total ({len(shards)} shards)", "", str(sum(s.rows for s in shards)), _mib(sum(sizes))])
    out += _table(["shard", "split", "rows", "size"], rows, right={2, 3})
    if sizes:
        out.append(f"shard size: min {_mib(sizes[0])}, median {_mib(sizes[len(sizes) // 2])}, max {_mib(sizes[-1])}")
    if fingerprint is not None:
        out += ["", *format_fingerprint(fingerprint, list(manifest.class_names))]
    return "\n".join(out)
