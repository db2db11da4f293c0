"""Run reports: OUTPUT/report.html (self-contained) and OUTPUT/overlays.png for an inference run.

Everything is read back from the run's output (summaries, run record, masks, all
through inference/output.py) and the sources the summaries name, so a report can be (re)built for any run, local
or on S3, long after it finished. Summaries are streamed (report_scan.py): counts, histograms,
the first errors and a hash-chosen sample are all that is kept in memory. `infer`'s report starts
from the tally the last report left (report_tally.json) and reads only the files added since (`tally`).

Every storage call of a report retries for the job's deadline (`storage_retry_s`, passed in by
`infer`), and a store still down past it is not asked again (`DownStores`): a report over a dead
store ends after about one deadline, not one per sampled image.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import logging
import posixpath
import string
from typing import Any

import numpy as np
from PIL import Image

from raysegment import __version__, overlay, plots, storage
from raysegment.data import imaging, tiff
from raysegment.errors import DataError, StorageError, UserError
from raysegment.inference import output as layout
from raysegment.inference import rasters
from raysegment.inference.listing import ARCHIVE_EXTENSIONS
from raysegment.inference.output import RunRecord
from raysegment.models.card import ModelCard
from raysegment.report_scan import HIST_BINS as HIST_BINS  # re-exported: the histograms' bins
from raysegment.report_scan import STAGES, Scan, scan_summaries

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
OVERLAYS_FILE = "overlays.png"
TILE = 256  # px: overlay thumbnails, in the page and in overlays.png
COLUMNS = 4
# The status of a run without a run record (killed, or still running): a string like a record's
# "succeeded"/"failed", so a script reading --json compares strings.
UNFINISHED = "unfinished"
CONTAINERS = (*ARCHIVE_EXTENSIONS, ".parquet")


@dataclasses.dataclass
class DownStores:
    """Stores (S3 endpoints) found unreachable past the storage deadline while building a report.

    Every call retries for the job's deadline (`storage_retry_s`); a store still down past it is
    not asked again, so a dead store costs a report one deadline, not one per sampled image."""

    endpoints: set[str] = dataclasses.field(default_factory=set)

    def __contains__(self, loc: storage.Location) -> bool:
        return loc.remote and (loc.endpoint_url or "") in self.endpoints

    def note(self, loc: storage.Location, exc: StorageError) -> None:
        if exc.transient and loc.remote:
            self.endpoints.add(loc.endpoint_url or "")


UNREACHABLE = "not read: storage unreachable past the deadline"


def _in_container(uri: str) -> bool:
    """True for `archive.tar#member` and `table.parquet#key`: no single object holds the image."""
    at = uri.find("#")
    while at >= 0:
        if uri[:at].lower().endswith(CONTAINERS):
            return True
        at = uri.find("#", at + 1)
    return False


def read_source(
    uri: str,
    endpoint_url: str | None,
    output: storage.Location,
    down: DownStores,
    channels: imaging.Channels = imaging.OWN,
    raster: bool = False,
) -> tuple[np.ndarray | None, str]:
    """(RGB image or None, why not): plain files and S3 objects only; archives and tables are skipped.

    A stack's slice (`vol.tif#page=3`, as infer names it) is read from its file; a multi-band image is
    shown by the first three of the model's bands (`channels`), a 16-bit or float one contrast-stretched.
    A big raster's source (`raster`) is read as a view at most `rasters.VIEW_SIDE` pixels per side."""
    if not uri:
        return None, "no source"
    if _in_container(uri):
        return None, "mask only: source is inside an archive or table"
    loc = None
    file_uri, page = tiff.split_page_uri(uri)
    try:
        loc = storage.resolve(file_uri, endpoint_url, output.retry_s)
        if loc in down:
            return None, f"mask only: source {UNREACHABLE}"
        if loc.remote and output.remote and loc.endpoint_url == output.endpoint_url:
            loc = dataclasses.replace(loc, fs=output.fs)  # one S3 client for all samples, not one each
        if raster:  # a big raster (its mask is a GeoTIFF): a view from its overviews, never read whole
            return rasters.image_view(loc, rasters.VIEW_SIDE, channels), ""
        data = storage.read_bytes(loc)
        if page is not None:
            data = tiff.page_bytes(data, page)
        return imaging.decode_display(data, channels=channels), ""
    except StorageError as exc:
        if loc is not None:
            down.note(loc, exc)
        return None, f"mask only: source not readable ({str(exc)[:120]})"
    except (UserError, imaging.ImageDecodeError, tiff.TiffError) as exc:
        return None, f"mask only: source not readable ({str(exc)[:120]})"


def model_channels(record: RunRecord | None, endpoint_url: str | None, retry_s: float | None) -> imaging.Channels:
    """The bands the run's model takes (its card), to show multi-band sources by them; any image's own
    first three when the card cannot be read (a report must not fail for a picture)."""
    model = (record.config or {}).get("model") if record is not None else None
    if not model:
        return imaging.OWN
    try:
        card = ModelCard.read(model, endpoint_url, retry_s=retry_s)
    except Exception as exc:  # the report shows the images anyway
        log.info("report: model card not read (%s): images shown by their own first bands", exc)
        return imaging.OWN
    return imaging.Channels(tuple(card.input.bands) if card.input.bands else None, None)


def _palette(found: list[list[int]] | None, k: int) -> list[list[int]]:
    if found and len(found) >= k:
        return [list(c) for c in found[:k]]
    return imaging.default_palette(k)


def _load_mask(output: storage.Location, row: dict[str, Any], down: DownStores) -> tuple[Any, str]:
    """((class ids, palette) or None, why not) for a sampled row."""
    if output in down:
        return None, f"no mask: {UNREACHABLE}"
    try:
        return layout.read_mask(output, row), ""
    except StorageError as exc:
        down.note(output, exc)
        return None, f"no mask: not readable ({str(exc)[:120]})"
    except (UserError, imaging.ImageDecodeError, KeyError, ValueError, OSError) as exc:
        return None, f"no mask: not readable ({str(exc)[:120]})"


def build_overlays(
    output: storage.Location,
    rows: list[dict[str, Any]],
    k: int,
    endpoint_url: str | None,
    down: DownStores,
    channels: imaging.Channels = imaging.OWN,
) -> tuple[list[tuple[np.ndarray, str, str]], list[list[int]]]:
    """([(thumbnail, key, note)], palette) for the sampled rows, ordered by key."""
    loaded = []
    found: list[list[int]] | None = None
    for row in sorted(rows, key=lambda r: r["key"]):
        mask, note = _load_mask(output, row, down)
        if mask is not None:
            mask, palette = mask
            found = found or palette
        loaded.append((row, mask, note))
    palette = _palette(found, k)
    tiles = []
    for row, mask, note in loaded:
        if mask is None:
            tiles.append((np.full((TILE // 2, TILE // 2, 3), 128, np.uint8), row["key"], note))
            continue
        raster = layout.RasterMasks.holds(layout.MaskRef.of_row(row))
        image, note = read_source(row.get("source_uri") or "", endpoint_url, output, down, channels, raster)
        tiles.append((overlay.thumbnail(image, mask, palette, TILE), row["key"], note))
    return tiles, palette


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


_PAGE = string.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>raysegment run $run_id</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;color:#222;max-width:1120px;margin:1.5em auto;padding:0 1em}
table{border-collapse:collapse;margin:.4em 0 1em}th,td{border:1px solid #ddd;padding:3px 9px;text-align:left}
th{background:#f5f5f5;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.sheet{display:flex;flex-wrap:wrap;gap:10px}.sheet figure{margin:0;width:${tile}px}
.sheet img{display:block;width:${tile}px;height:${tile}px;object-fit:contain;image-rendering:pixelated;background:#282828}
figcaption{font-size:12px;word-break:break-all}.note{color:#777}.failed{color:#b00020}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:middle}
code{font-size:13px}img.plot{max-width:100%}
</style></head><body>
<h1>raysegment run <code>$run_id</code></h1>
$meta
<h2>Counts</h2>
<table id="counts"><tr><th></th><th>this run</th><th>whole output</th></tr>$counts</table>
<h2>Throughput</h2>
<table id="throughput">$throughput</table>
<h2>Classes</h2>
<p>Share of each class's pixels in the $ok ok images of the output.</p>
<table id="classes"><tr><th>id</th><th>class</th><th>mean share</th><th>images containing it</th></tr>$classes</table>
$histograms
<h2>Overlays</h2>
<p>$sample_text</p>
<div class="sheet" id="overlays">$overlays</div>
<h2>Errors</h2>
$errors
<p class="note">Images loaded: <span id="images-loaded">not checked (JavaScript is off)</span>.
Written by raysegment $version.</p>
<script>
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.getElementById("images-loaded").textContent = ok + "/" + imgs.length;
});
</script>
</body></html>
""")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if value is None or value == "":
        return "&ndash;"
    return f"{value:,}" if isinstance(value, int) else _e(value)


def _meta_html(output: storage.Location, record: RunRecord | None) -> str:
    status = record.status if record else f"{UNFINISHED}: no run record (killed or still running?)"
    rows = [
        ("output", storage.redact(output.uri)),
        ("input", record.input if record else ""),
        ("source", record.source if record else ""),
        ("model", record.model_id if record else ""),
        ("status", status),
    ]
    failed = ' class="failed"'
    meta = "".join(
        f"<tr><th>{_e(k)}</th><td{failed if k == 'status' and v != 'succeeded' else ''}>{_e(v)}</td></tr>"
        for k, v in rows
    )
    problems = "".join(f"<li>{_e(p)}</li>" for p in (record.problems if record else []))
    return f"<table>{meta}</table>\n" + (f'<ul class="failed">{problems}</ul>' if problems else "")


def _counts_html(record: RunRecord | None, scan: Scan) -> str:
    run = record.counts if record else None
    rows = [
        ("images", "processed", run and run.processed, "rows", scan.rows),
        ("ok", "ok", run and run.ok, "ok", scan.ok),
        ("errors", "error", run and run.error, "error", scan.error),
        ("skipped (done by earlier runs)", "skipped", run and run.skipped, None, None),
    ]
    return "".join(
        f'<tr><th>{label}</th><td class="n" id="run-{rid}">{_num(rv)}</td>'
        + (f'<td class="n" id="out-{oid}">{_num(ov)}</td></tr>' if oid else "<td></td></tr>")
        for label, rid, rv, oid, ov in rows
    )


def _throughput_html(record: RunRecord | None, scan: Scan) -> str:
    cfg = record.config if record else {}
    actors = (record.actors or {}).get("actors") if record else None  # what `--actors auto` resolved to
    per_image = {s: scan.stage_sum[s] / scan.run_rows if scan.run_rows else None for s in STAGES}
    rows = [
        ("images per second", record and record.images_per_second),
        ("seconds", record and record.seconds),
        ("actors, batch size", f"{actors or cfg.get('actors', '')}, {cfg.get('batch_size', '')}" if cfg else None),
        *((f"{s[:-3]} ms per image", None if v is None else round(v, 2)) for s, v in per_image.items()),
    ]
    return "".join(f'<tr><th>{_e(k)}</th><td class="n">{_num(v)}</td></tr>' for k, v in rows)


def _classes_html(scan: Scan, palette: list[list[int]]) -> str:
    return "".join(
        f'<tr><td class="n">{c}</td><td><span class="swatch" style="background:rgb({",".join(map(str, palette[c]))})">'
        f'</span> {_e(name)}</td><td class="n">{(scan.share_sum[c] / scan.ok if scan.ok else 0):.2%}</td>'
        f'<td class="n">{(scan.present[c] / scan.ok if scan.ok else 0):.1%}</td></tr>'
        for c, name in enumerate(scan.class_names)
    )


def _overlays_html(tiles: list[tuple[np.ndarray, str, str]], scan: Scan) -> tuple[str, str]:
    """(the figures, the sentence above them)."""
    figures = "".join(
        f'<figure><img alt="{_e(key)}" src="{_data_uri("image/jpeg", overlay.jpeg_bytes(thumb))}">'
        f"<figcaption>{_e(key)}{f' <span class=note>({_e(note)})</span>' if note else ''}</figcaption></figure>"
        for thumb, key, note in tiles
    )
    text = (
        f"{len(tiles)} of the {scan.ok:,} ok images, chosen by a hash of their key; the mask's palette "
        f"colours are blended into the image (also in {OVERLAYS_FILE})."
        if tiles
        else "No ok images to show."
    )
    return figures, text


def _errors_html(scan: Scan) -> str:
    if not scan.error:
        return "<p>None.</p>"
    rows = "".join(
        f"<tr><td>{_e(r['key'])}</td><td>{_e(r['error'])}</td><td>{_e(r['source_uri'])}</td>"
        f"<td>{_e(r['run_id'])}</td></tr>"
        for r in scan.errors
    )
    more = scan.error - len(scan.errors)
    return (
        f'<p>{scan.error:,} image{"s" if scan.error != 1 else ""} failed.</p><table id="errors"><tr><th>key</th><th>error</th>'
        f"<th>source</th><th>run</th></tr>{rows}</table>"
        + (f"<p>... and {more:,} more (the summaries' <code>error</code> column).</p>" if more > 0 else "")
    )


def render_html(
    output: storage.Location,
    run_id: str | None,
    record: RunRecord | None,
    scan: Scan,
    tiles: list[tuple[np.ndarray, str, str]],
    palette: list[list[int]],
    histograms_png: bytes | None,
) -> str:
    """The report page: one HTML string with every image inlined as a data: URI."""
    hist = (
        f'<img class="plot" alt="class share histograms" src="{_data_uri("image/png", histograms_png)}">'
        if histograms_png
        else ""
    )
    figures, sample_text = _overlays_html(tiles, scan)
    return _PAGE.substitute(
        run_id=_e(run_id or "unknown"),
        tile=TILE,
        meta=_meta_html(output, record),
        counts=_counts_html(record, scan),
        throughput=_throughput_html(record, scan),
        ok=f"{scan.ok:,}",
        classes=_classes_html(scan, palette),
        histograms=hist,
        sample_text=sample_text,
        overlays=figures,
        errors=_errors_html(scan),
        version=_e(__version__),
    )


def _scan(output: storage.Location, samples: int, run_id: str | None, tally: bool) -> Scan:
    """The summaries' scan (from the report tally: see report_scan); a nightly OUTPUT (no summaries of its own,
    date partitions) is refused with the partition to give instead."""
    try:
        return scan_summaries(output, samples, run_id, tally)
    except DataError:
        if storage.exists(output.child(layout.SUMMARIES)):
            raise
        from raysegment.nightly import partition_fix

        fix = partition_fix(output, "report")
        if fix is None:
            raise
        raise DataError(fix) from None


def write_run_report(
    output_uri: str,
    run_id: str | None = None,
    samples: int = 16,
    endpoint_url: str | None = None,
    retry_s: float | None = None,
    record: RunRecord | None = None,
    tally: bool = False,
) -> dict[str, Any]:
    """Write OUTPUT/report.html and OUTPUT/overlays.png for a run; returns where and what they show.

    Storage calls retry for `retry_s` (the job's `storage_retry_s`; default RAYSEGMENT_STORAGE_RETRY_S
    or 120), and a store down past it is not asked again. `record`: the run record `infer` holds in
    memory, so the report is built before the record is written (a killed report step leaves no
    record); without it the report reads runs/ (see find_run). `tally` (infer's report): the summaries' figures
    from the tally the last report left, and the files added since (report_scan); else from every file (and
    the tally is written again)."""
    output = storage.resolve(output_uri, endpoint_url, retry_s)
    asked = None
    if record is not None:
        run_id = record.run_id
    else:
        asked = run_id
        if asked is not None and ("/" in asked or ".." in asked or not asked.strip()):
            raise DataError(f"--run-id {asked!r}: a run id names a file under runs/; see OUTPUT/runs/")
        run_id, record = layout.find_run(output, run_id)
    scan = _scan(output, samples, run_id, tally)
    if record is None and asked is not None and not storage.exists(output.child(layout.SUMMARIES, f"run={asked}")):
        # Neither a record nor a summary of it (a killed run has the latter): a mistyped id, which replaced
        # report.html with one that said "no run record".
        runs = output.child(layout.RUNS)
        known = storage.list_files(runs, (".json",)) if storage.exists(runs) else []
        shown = ", ".join(posixpath.basename(p)[: -len(".json")] for p in known[-5:]) or "none"
        raise DataError(f"{output.uri}: no run {asked} (no run record and no summaries); runs here: {shown}")
    log.info("report: %d summary rows (%d ok, %d errors) in %s", scan.rows, scan.ok, scan.error, output.uri)
    k = len(scan.class_names)
    channels = model_channels(record, endpoint_url, output.retry_s)
    tiles, palette = build_overlays(
        output, [row for _, row in scan.samples[: max(samples, 0)]], k, endpoint_url, DownStores(), channels
    )
    histograms = plots.class_fraction_histograms(scan.hist, scan.class_names, palette) if scan.ok and k else None
    page = render_html(output, run_id, record, scan, tiles, palette, histograms)
    storage.write_bytes(output.child(REPORT_FILE), page.encode())
    # The PNG has no room for the reasons: just say which tiles lack the image or the mask.
    cells = [(thumb, f"{key} [{note.split(':')[0]}]" if note else key) for thumb, key, note in tiles]
    sheet = overlay.sheet(cells, COLUMNS, TILE) if cells else Image.new("RGB", (TILE, TILE), overlay.BACKGROUND)
    storage.write_bytes(output.child(OVERLAYS_FILE), overlay.png_bytes(sheet))
    return {
        "report": output.child(REPORT_FILE).uri,
        "overlays": output.child(OVERLAYS_FILE).uri,
        "run_id": run_id,
        "status": record.status if record else UNFINISHED,
        "rows": scan.rows,
        "ok": scan.ok,
        "error": scan.error,
        "samples": len(tiles),
        "mask_only": sum(1 for _, _, note in tiles if note),
        "unreachable": sum(1 for _, _, note in tiles if UNREACHABLE in note),
    }
