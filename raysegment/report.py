"""Run reports: OUTPUT/report.html (self-contained) and OUTPUT/overlays.png for an inference run.

Everything is read back from the run's output (summaries, run record, masks, all
through inference/output.py) and the sources the summaries name, so a report can be (re)built for any run, local
or on S3, long after it finished. Summaries are streamed: counts, histograms,
the first errors and a hash-chosen sample are all that is kept in memory.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import logging
import string
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from raysegment import __version__, overlay, plots, storage
from raysegment.data import imaging
from raysegment.errors import UserError
from raysegment.inference import output as layout
from raysegment.inference.output import RunRecord

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
OVERLAYS_FILE = "overlays.png"
TILE = 256  # px: overlay thumbnails, in the page and in overlays.png
COLUMNS = 4
HIST_BINS = 20
MAX_ERRORS = 200  # error rows listed in the page; the count covers all of them
CONTAINERS = (".tar", ".tar.gz", ".tgz", ".parquet")
SAMPLE_FIELDS = ("key", "source_uri", "mask_uri", "mask_offset", "mask_length", "run_id")
STAGES = ("decode_ms", "predict_ms", "write_ms")


@dataclasses.dataclass
class Scan:
    """What the report keeps from a pass over every summary row."""

    class_names: list[str]
    rows: int = 0
    ok: int = 0
    error: int = 0
    hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, HIST_BINS), np.int64))
    share_sum: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    present: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    samples: list[tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=list)
    run_rows: int = 0
    stage_sum: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


def _key_hash(key: str) -> int:
    # A hash, not a random draw: the same output always gives the same sample.
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _shares(column: pa.ChunkedArray | pa.Array, n: int, k: int) -> np.ndarray:
    """class_fractions (list<float>) -> n x k float array; short or missing lists count as zeros."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if flat.size == n * k and (pc.min(pc.list_value_length(arr)).as_py() or 0) == k:
        return flat.reshape(n, k).astype(np.float64)
    out = np.zeros((n, k))
    for i, row in enumerate(arr.to_pylist()):
        vals = (row or [])[:k]
        out[i, : len(vals)] = vals
    return out


def scan_summaries(output: storage.Location, samples: int, run_id: str | None) -> Scan:
    """Stream every summary row under OUTPUT into counts, histograms, errors and a sample of ok rows."""
    summaries = layout.Summaries(output)
    scan = Scan(summaries.class_names)
    for batch in summaries.batches():
        _add_batch(scan, batch, samples, run_id)
    scan.errors.sort(key=lambda e: e["key"])
    return scan


def _add_batch(scan: Scan, batch: pa.RecordBatch, samples: int, run_id: str | None) -> None:
    n = batch.num_rows
    if not n:
        return
    ok = pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False)
    k = len(scan.class_names)
    if not k:  # no names in the metadata: number the classes
        k = max((len(v) for v in batch.column("class_fractions").to_pylist() if v), default=0)
        scan.class_names = [f"class {i}" for i in range(k)]
    if scan.hist.shape[0] != k:
        scan.hist = np.zeros((k, HIST_BINS), np.int64)
        scan.share_sum = np.zeros(k)
        scan.present = np.zeros(k, np.int64)
    scan.rows += n
    scan.ok += int(ok.sum())
    scan.error += int(n - ok.sum())

    shares = _shares(batch.column("class_fractions"), n, k)[ok]
    if shares.size:
        bins = np.clip((shares * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
        for c in range(k):
            scan.hist[c] += np.bincount(bins[:, c], minlength=HIST_BINS)
        scan.share_sum += shares.sum(axis=0)
        scan.present += (shares > 0).sum(axis=0)

    if run_id is not None:
        mine = pc.equal(batch.column("run_id"), run_id).to_numpy(zero_copy_only=False)
        scan.run_rows += int(mine.sum())
        for stage in STAGES:
            if stage in batch.schema.names:
                values = batch.column(stage).to_numpy(zero_copy_only=False)
                scan.stage_sum[stage] += float(np.nansum(values[mine]))

    bad = np.flatnonzero(~ok)
    room = MAX_ERRORS - len(scan.errors)
    if room > 0 and bad.size:
        taken = batch.take(pa.array(bad[:room])).select(["key", "source_uri", "error", "run_id"])
        scan.errors += taken.to_pylist()

    good = np.flatnonzero(ok)
    if samples <= 0 or not good.size:
        return
    keys = batch.column("key").take(pa.array(good)).to_pylist()
    hashes = np.fromiter((_key_hash(key) for key in keys), np.uint64, len(keys))
    limit = scan.samples[-1][0] if len(scan.samples) >= samples else None
    chosen = np.argsort(hashes)[:samples]
    if limit is not None:
        chosen = chosen[hashes[chosen] < limit]
    if not chosen.size:
        return
    fields = [f for f in SAMPLE_FIELDS if f in batch.schema.names]
    rows = batch.take(pa.array(good[chosen])).select(fields).to_pylist()
    scan.samples = sorted(scan.samples + list(zip((int(h) for h in hashes[chosen]), rows)), key=lambda s: s[0])[
        :samples
    ]


def _in_container(uri: str) -> bool:
    """True for `archive.tar#member` and `table.parquet#key`: no single object holds the image."""
    at = uri.find("#")
    while at >= 0:
        if uri[:at].lower().endswith(CONTAINERS):
            return True
        at = uri.find("#", at + 1)
    return False


def read_source(
    uri: str, endpoint_url: str | None, output: storage.Location | None = None
) -> tuple[np.ndarray | None, str]:
    """(RGB image or None, why not): plain files and S3 objects only; archives and tables are skipped."""
    if not uri:
        return None, "no source"
    if _in_container(uri):
        return None, "mask only: source is inside an archive or table"
    try:
        loc = storage.resolve(uri, endpoint_url)
        if output is not None and loc.remote and output.remote and loc.endpoint_url == output.endpoint_url:
            loc = dataclasses.replace(loc, fs=output.fs)  # one S3 client for all samples, not one each
        return imaging.decode_image(storage.read_bytes(loc)), ""
    except (UserError, imaging.ImageDecodeError) as exc:
        return None, f"mask only: source not readable ({str(exc)[:120]})"


def _palette(found: list[list[int]] | None, k: int) -> list[list[int]]:
    if found and len(found) >= k:
        return [list(c) for c in found[:k]]
    return imaging.default_palette(k)


def build_overlays(
    output: storage.Location, rows: list[dict[str, Any]], k: int, endpoint_url: str | None
) -> tuple[list[tuple[np.ndarray, str, str]], list[list[int]]]:
    """([(thumbnail, key, note)], palette) for the sampled rows, ordered by key."""
    loaded = []
    found: list[list[int]] | None = None
    for row in sorted(rows, key=lambda r: r["key"]):
        try:
            mask, palette = layout.read_mask(output, row)
            found = found or palette
        except (UserError, imaging.ImageDecodeError, KeyError, ValueError, OSError) as exc:
            loaded.append((row, None, f"no mask: not readable ({str(exc)[:120]})"))
            continue
        loaded.append((row, mask, ""))
    palette = _palette(found, k)
    tiles = []
    for row, mask, note in loaded:
        if mask is None:
            tiles.append((np.full((TILE // 2, TILE // 2, 3), 128, np.uint8), row["key"], note))
            continue
        image, note = read_source(row.get("source_uri") or "", endpoint_url, output)
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
    status = record.status if record else "no run record (killed or still running?)"
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
    per_image = {s: scan.stage_sum[s] / scan.run_rows if scan.run_rows else None for s in STAGES}
    rows = [
        ("images per second", record and record.images_per_second),
        ("seconds", record and record.seconds),
        ("actors, batch size", f"{cfg.get('actors', '')}, {cfg.get('batch_size', '')}" if cfg else None),
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


def write_run_report(
    output_uri: str, run_id: str | None = None, samples: int = 16, endpoint_url: str | None = None
) -> dict[str, Any]:
    """Write OUTPUT/report.html and OUTPUT/overlays.png for a run; returns where and what they show."""
    output = storage.resolve(output_uri, endpoint_url)
    run_id, record = layout.find_run(output, run_id)
    scan = scan_summaries(output, samples, run_id)
    log.info("report: %d summary rows (%d ok, %d errors) in %s", scan.rows, scan.ok, scan.error, output.uri)
    k = len(scan.class_names)
    tiles, palette = build_overlays(output, [row for _, row in scan.samples], k, endpoint_url)
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
        "status": record.status if record else None,
        "rows": scan.rows,
        "ok": scan.ok,
        "error": scan.error,
        "samples": len(tiles),
        "mask_only": sum(1 for _, _, note in tiles if note),
    }
