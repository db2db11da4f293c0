"""Reports and pictures: overlays, plots, report.html/overlays.png, `raysegment report` and `show`.

The unit tests build an inference output without Ray or a model: helpers.write_outputs
writes masks and summaries exactly as the pipeline's last stage does. The slow tests
run the real pipeline on the tiny model and open the page in headless Chromium.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_outputs
from PIL import Image

from raysegment import overlay, plots, report, storage
from raysegment.cli import main
from raysegment.config import InferSpec
from raysegment.data import imaging, synthetic
from raysegment.errors import DataError
from raysegment.models.card import ModelCard

CHROMIUM = "/usr/bin/chromium"
NAMES = ["background", "disc", "square", "triangle"]
PALETTE = imaging.default_palette(4)
RUN_ID = "20260101T000000Z-0000abcd"


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img


def make_output(out: storage.Location, sources: storage.Location, mask_format: str = "png") -> dict[str, list[str]]:
    """A finished run's output: 6 ok images (one of them from a tar archive) and 2 error rows."""
    card = ModelCard(
        model_id="unet-test",
        model_sha256="a" * 64,
        num_classes=4,
        class_names=NAMES,
        palette=PALETTE,
        input={"size": (64, 64)},
    )
    keys, uris, sizes, preds, errors = [], [], [], [], []
    for i, (h, w) in enumerate([(48, 48), (40, 56), (64, 24), (33, 33), (48, 48)]):
        img, mask = synthetic.make_example(i, size=64)
        img = np.asarray(Image.fromarray(img).resize((w, h)))
        loc = sources.child(f"img{i}.png")
        storage.write_bytes(loc, synthetic.png_bytes(img))
        keys.append(f"img{i}")
        uris.append(loc.uri)
        sizes.append((h, w))
        preds.append(mask)
    keys.append("shard-0/member")  # no single object holds a tar member: shown as mask only
    uris.append(sources.child("shard-0.tar").uri + "#member.png")
    sizes.append((64, 64))
    preds.append(preds[0])
    for key, error in [("bad<script>alert(1)</script>", "cannot decode image: <b>truncated</b>"), ("empty", "empty")]:
        keys.append(key)
        uris.append(sources.child(f"{key}.png").uri)
        sizes.append((0, 0))
        preds.append(np.zeros((64, 64), np.uint8))
        errors.append(error)
    n = len(keys)
    batch = {
        "key": np.asarray(keys, object),
        "source_uri": np.asarray(uris, object),
        "height": np.asarray([h for h, _ in sizes]),
        "width": np.asarray([w for _, w in sizes]),
        "pred": np.stack(preds).astype(np.uint8),
        "error": np.asarray([""] * (n - len(errors)) + errors, object),
        "mean_confidence": np.full(n, 0.9, np.float32),
        "decode_ms": np.full(n, 1.0, np.float32),
        "predict_ms": np.full(n, 2.0, np.float32),
    }
    write_outputs(batch, out, card, RUN_ID, mask_format)
    record = {
        "run_id": RUN_ID,
        "status": "succeeded",
        "model_id": "unet-test",
        "input": sources.uri,
        "source": "files",
        "output": out.uri,
        "counts": {"total": n, "skipped": 0, "processed": n, "ok": n - 2, "error": 2},
        "seconds": 1.5,
        "images_per_second": 5.33,
        "config": {"actors": [1, 1], "batch_size": 16},
    }
    storage.write_json(out.child("runs", f"{RUN_ID}.json"), record)
    storage.mark_success(out, {"run_id": RUN_ID})
    return {"ok": keys[:6], "error": keys[6:]}


def page_images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def dump_dom(path: str, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran, from headless Chromium; skips when Chromium is absent."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"headless Chromium not installed ({CHROMIUM}); apt-get install -y chromium")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        Path(path).as_uri(),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: Chromium and its helpers
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-2000:]
    return out


def dom_text(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no #{element_id} in the page"
    return match.group(1).strip()


# -- pictures ---------------------------------------------------------------------------------------


def test_blend_tints_classes_and_keeps_black_background():
    image = np.full((4, 6, 3), 100, np.uint8)
    mask = np.zeros((4, 6), np.uint8)
    mask[:, 3:] = 1
    mask[0, 0] = 255
    out = overlay.blend(image, mask, PALETTE, alpha=0.5)
    assert out.shape == (4, 6, 3)
    assert (out[1, 0] == 100).all()  # class 0 is black in the VOC palette: left as it was
    assert tuple(out[1, 4]) == (114, 50, 50)  # half (128, 0, 0), half grey 100
    assert tuple(out[0, 0]) == (162, 162, 146)  # 255 = ignore, in the mask PNGs' ignore colour


def test_blend_resizes_the_image_to_the_mask():
    out = overlay.blend(np.zeros((10, 20, 3), np.uint8), np.ones((5, 7), np.uint8), PALETTE)
    assert out.shape == (5, 7, 3)


def test_example_grid_png_has_one_row_per_example():
    rows = []
    for i in range(3):
        img, mask = synthetic.make_example(i, size=32)
        rows.append((img.astype(np.float32) / 255, mask, np.roll(mask, 3, axis=0)))
    png = overlay.example_grid(rows, PALETTE)
    img = decode_png(png)
    assert img.size == overlay.sheet_size(9, 3)
    assert img.mode == "RGB"
    with pytest.raises(ValueError):
        overlay.example_grid([], PALETTE)


def test_confusion_matrix_png():
    cm = [[90, 5, 3, 2], [1, 8, 1, 0], [0, 0, 6, 0], [0, 1, 1, 3]]
    small = decode_png(plots.confusion_matrix_png(cm, NAMES))
    names = [f"class {i}" for i in range(21)]
    large = decode_png(plots.confusion_matrix_png(np.eye(21, dtype=np.int64) * 7, names))
    assert small.width > 300 and small.height > 300
    assert large.width > small.width and large.height > small.height  # grows with the class count
    with pytest.raises(ValueError, match="class names"):
        plots.confusion_matrix_png(cm, NAMES[:3])


def test_drift_png():
    before = {"background": 0.8, "disc": 0.1, "square": 0.1}
    after = {"background": 0.7, "disc": 0.15, "square": 0.1, "triangle": 0.05}
    img = decode_png(plots.drift_png(before, after))
    assert img.width > 500 and img.height > 150
    with pytest.raises(ValueError):
        plots.drift_png({}, {})


def test_class_fraction_histograms_png():
    hist = np.zeros((4, report.HIST_BINS), np.int64)
    hist[:, 0] = 1000  # most images hold none of most classes: a log axis
    hist[1, 5] = 3
    img = decode_png(plots.class_fraction_histograms(hist, NAMES, PALETTE))
    assert img.width > 600


def test_class_names_with_dollar_signs_plot_as_text():
    """Matplotlib reads `$...$` as maths: a class named `$\\foo$` or `cost $5` failed every plot naming it
    (and with the confusion matrix, the end of training)."""
    names = ["$\\foo$", "cost $5", "a$b$c", "plain"]
    assert decode_png(plots.confusion_matrix_png(np.eye(4, dtype=np.int64) * 5, names)).width > 300
    assert decode_png(plots.class_fraction_histograms(np.ones((4, report.HIST_BINS), np.int64), names, PALETTE))
    assert decode_png(plots.drift_png(dict(zip(names, [0.25] * 4)), dict(zip(names, [0.1, 0.2, 0.3, 0.4]))))


# -- run reports --------------------------------------------------------------------------------------


def test_container_sources_are_recognised():
    assert report._in_container("/data/shard-0.tar#a/b.png")
    assert report._in_container("s3://b/x.TAR.GZ#m.jpg")
    assert report._in_container("/t/part-0.parquet#row3")
    assert not report._in_container("/data/a#b.png")  # a file name may hold '#'
    assert not report._in_container("s3://b/in/img.png")


@pytest.mark.parametrize("mask_format", ["png", "npz", "packed"])
def test_report_from_output(tmp_path, mask_format):
    out = storage.resolve(str(tmp_path / "out"))
    keys = make_output(out, storage.resolve(str(tmp_path / "in")), mask_format)
    result = report.write_run_report(out.uri, samples=16)
    assert result["run_id"] == RUN_ID
    assert (result["rows"], result["ok"], result["error"]) == (8, 6, 2)
    assert result["samples"] == 6 and result["mask_only"] == 1  # the tar member
    page = (tmp_path / "out" / "report.html").read_text()
    images = page_images(page)
    assert len(images) == 6 + 1  # overlays + histograms
    assert all(src.startswith("data:image/") for src in images)  # self-contained
    assert "http://" not in page and "https://" not in page
    for key in keys["ok"]:
        assert f"<figcaption>{key}" in page
    # Keys and error texts are escaped, never markup.
    assert "<script>alert" not in page and "<b>truncated" not in page
    assert "bad&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;truncated" in page
    assert re.search(r'id="run-ok">6<', page) and re.search(r'id="out-error">2<', page)
    sheet = Image.open(tmp_path / "out" / "overlays.png")
    assert sheet.format == "PNG" and sheet.size == overlay.sheet_size(6, report.COLUMNS, report.TILE)


def test_report_sample_is_stable_and_bounded(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    make_output(out, storage.resolve(str(tmp_path / "in")))
    first = report.write_run_report(out.uri, samples=3)
    page = (tmp_path / "out" / "report.html").read_text()
    report.write_run_report(out.uri, samples=3)
    assert first["samples"] == 3
    assert (tmp_path / "out" / "report.html").read_text() == page  # same keys, same page
    assert Image.open(tmp_path / "out" / "overlays.png").size == overlay.sheet_size(3, report.COLUMNS, report.TILE)


def test_report_without_source_images_or_run_record(tmp_path):
    """Sources deleted and no run record (a killed run): the report still shows what the output holds."""
    out = storage.resolve(str(tmp_path / "out"))
    make_output(out, storage.resolve(str(tmp_path / "in")))
    storage.remove_tree(storage.resolve(str(tmp_path / "in")))
    storage.remove_tree(out.child("runs"))
    storage.remove_success(out)
    result = report.write_run_report(out.uri)
    assert result["run_id"] is None and result["samples"] == 6 and result["mask_only"] == 6
    page = (tmp_path / "out" / "report.html").read_text()
    assert "no run record" in page and "source not readable" in page
    # A killed run's id (its summaries, no record) is reported as above; an id of no run at all is an error,
    # and report.html is left as it was (a mistyped id replaced it with an empty report).
    assert report.write_run_report(out.uri, run_id=RUN_ID)["run_id"] == RUN_ID
    page = (tmp_path / "out" / "report.html").read_text()
    for wrong in ("20990101T000000Z-deadbeef", "../../etc/passwd"):
        with pytest.raises(DataError, match="no run 2099|names a file under runs/"):
            report.write_run_report(out.uri, run_id=wrong)
    assert (tmp_path / "out" / "report.html").read_text() == page


def test_report_of_an_empty_output_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no inference summaries"):
        report.write_run_report(str(tmp_path))


def test_a_run_without_a_record_has_status_unfinished(tmp_path):
    """A killed run's output (no run record) gave `"status": null` under --json, where every other report's
    status is a string: a script comparing strings failed on it."""
    out = storage.resolve(str(tmp_path / "out"))
    make_output(out, storage.resolve(str(tmp_path / "in")))
    storage.remove_tree(out.child("runs"))
    storage.remove_success(out)
    res = CliRunner().invoke(main, ["report", out.uri, "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert (result["status"], result["run_id"]) == ("unfinished", None)
    assert "report for an output without a run record (killed or running): 8 rows" in res.stderr


def test_report_and_compact_of_a_nightly_output_name_its_latest_partition(tmp_path):
    """Given a nightly OUTPUT (date partitions, ledger/, reports/) instead of one of its partitions, `report`
    said "run `raysegment infer`" and `compact` "nothing to compact": the fix is a partition."""
    from raysegment.config import CompactSpec
    from raysegment.inference.compact import compact

    nightly = tmp_path / "nightly"
    for date in ("2026-12-01", "2026-12-03"):
        make_output(storage.resolve(str(nightly / f"date={date}")), storage.resolve(str(tmp_path / "in")))
    (nightly / "ledger").mkdir()
    (nightly / "reports").mkdir()
    latest = f"{nightly}/date=2026-12-03 (the latest)"
    with pytest.raises(DataError) as refused:
        report.write_run_report(str(nightly))
    assert str(refused.value) == (
        f"{nightly}: a nightly OUTPUT (2 date partitions), not one infer output; give a partition: "
        f"raysegment report {latest}"
    )
    with pytest.raises(DataError, match=re.escape(f"give a partition: raysegment compact {latest}")):
        compact(CompactSpec(output=str(nightly)))
    assert not (nightly / "report.html").exists()


def test_report_command(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    make_output(out, storage.resolve(str(tmp_path / "in")))
    res = CliRunner().invoke(main, ["report", out.uri, "--samples", "2"])
    assert res.exit_code == 0, res.output
    assert f"report for run {RUN_ID}: 8 rows (6 ok, 2 errors), 2 overlays" in res.output
    assert (tmp_path / "out" / "report.html").exists()
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no inference summaries" in res.output


def test_report_renders_in_chromium(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    make_output(out, storage.resolve(str(tmp_path / "in")))
    report.write_run_report(out.uri)
    dom = dump_dom(str(tmp_path / "out" / "report.html"), tmp_path)
    assert dom_text(dom, "images-loaded") == "7/7"
    assert dom_text(dom, "run-processed") == "8"


@pytest.mark.s3
def test_report_on_s3(s3_prefix, caplog):
    out = storage.resolve(f"{s3_prefix}/out")
    make_output(out, storage.resolve(f"{s3_prefix}/in"))
    res = CliRunner().invoke(main, ["report", out.uri])
    assert res.exit_code == 0, res.output
    page = storage.read_bytes(out.child("report.html")).decode()
    assert len(page_images(page)) == 7
    assert "source not readable" not in page  # sources were read from S3
    sheet = decode_png(storage.read_bytes(out.child("overlays.png")))
    assert sheet.size == overlay.sheet_size(6, report.COLUMNS, report.TILE)
    # The tally `report` left names the files by their S3 stamps: infer's next report reads none of them.
    from raysegment import report_scan

    with caplog.at_level("INFO", logger=report_scan.__name__):
        tallied = report_scan.scan_summaries(out, 16, RUN_ID, tally=True)
    assert "8 summary rows from the tally, 0 in 0 files added since" in caplog.text
    assert tallied.files and tallied.tally() == report_scan.scan_summaries(out, 16, RUN_ID).tally()
    assert all("/" in stamp and stamp.split("/", 1)[1] for stamp in tallied.files.values())  # size/ETag


# -- with the real pipeline and model -------------------------------------------------------------------


@pytest.mark.slow
def test_report_of_a_real_run_renders_in_chromium(tiny_model, tmp_path):
    """Done-when: infer on a few images, write the report, Chromium shows the counts and every image."""
    from raysegment.inference.pipeline import infer

    _, model = tiny_model
    src = tmp_path / "in"
    os.makedirs(src / "nested")
    for i, (h, w) in enumerate([(32, 32), (40, 52), (64, 20), (33, 33), (32, 32)]):
        img, _ = synthetic.make_example(500 + i, size=64)
        Image.fromarray(img).resize((w, h)).save(src / ("nested" if i == 4 else "") / f"img{i}.png")
    (src / "broken.png").write_bytes(b"not a png")
    out = str(tmp_path / "out")
    record = infer(InferSpec(model=model, input=str(src), output=out, batch_size=4))
    result = report.write_run_report(out, record["run_id"], samples=4)
    assert (result["rows"], result["ok"], result["error"], result["samples"]) == (6, 5, 1, 4)
    assert result["mask_only"] == 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert "broken" in page and "cannot decode image" in page
    sheet = decode_png(storage.read_bytes(storage.resolve(result["overlays"])))
    assert sheet.size == overlay.sheet_size(4, report.COLUMNS, report.TILE)

    dom = dump_dom(result["report"], tmp_path)
    assert dom_text(dom, "images-loaded") == "5/5"  # 4 overlays + the histograms
    assert dom_text(dom, "run-processed") == "6"
    assert dom_text(dom, "run-ok") == "5"
    assert dom_text(dom, "run-error") == "1"


@pytest.mark.slow
def test_show_writes_an_overlay_at_the_original_size(tiny_model, tmp_path):
    _, model = tiny_model
    img, _ = synthetic.make_example(7, size=64)
    Image.fromarray(img).resize((52, 40)).save(tmp_path / "photo.png")
    res = CliRunner().invoke(
        main, ["show", str(tmp_path / "photo.png"), "--model", model, "--out", str(tmp_path / "o.png")]
    )
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "(52x40, width x height)" in res.output
    out = decode_png((tmp_path / "o.png").read_bytes())
    assert out.size == (52, 40) and out.mode == "RGB"
    res = CliRunner().invoke(main, ["show", str(tmp_path / "missing.png"), "--model", model])
    assert res.exit_code == 2 and "not found" in res.output
    before = (tmp_path / "photo.png").read_bytes()
    res = CliRunner().invoke(
        main, ["show", str(tmp_path / "photo.png"), "--model", model, "--out", str(tmp_path / "photo.png")]
    )
    assert res.exit_code == 2 and "is the image shown" in res.output
    assert (tmp_path / "photo.png").read_bytes() == before


def test_show_never_writes_over_its_image_or_the_model(tmp_path):
    """--out must name a PNG (a .jpg got PNG bytes), not the image shown (also through a link), and not
    a file of MODEL's folder (model.keras was overwritten by the overlay)."""
    from raysegment.errors import ConfigError
    from raysegment.show import check_out

    (tmp_path / "m").mkdir()
    for name in ("model.keras", "model.json", "curves.png"):
        (tmp_path / "m" / name).write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    os.symlink(tmp_path / "a.png", tmp_path / "link.png")
    model, image = storage.resolve(str(tmp_path / "m")), storage.resolve(str(tmp_path / "a.png"))

    def out(path: str) -> None:
        check_out(storage.resolve(str(tmp_path / path)), image, model)

    for path, why in [
        ("o.jpg", "the overlay is a PNG"),
        ("m/model.keras", "the overlay is a PNG"),
        ("a.png", "is the image shown"),
        ("link.png", "is the image shown"),
        ("m/curves.png", "is a file of MODEL"),
    ]:
        with pytest.raises(ConfigError, match=why):
            out(path)
    out("o.PNG")
    out("m/new.overlay.png")  # a new file beside the model is fine


def test_the_report_reads_summary_files_ahead_and_only_its_columns(tmp_path):
    """A report over 62,500 small summary files read them one by one on the driver (136 s; 6 s for the same rows
    in 10 files), each file whole with its 18 columns. Files are fetched ahead in threads now, in order, and the
    scan is the one a file-by-file pass gives: counts, histograms, the first errors and the sample."""
    import threading

    import fsspec.implementations.local
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysegment import report_scan
    from raysegment.inference import output as layout

    schema = layout.summary_schema(NAMES)
    folder = tmp_path / "out" / "summaries" / f"run={RUN_ID}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in range(40):
        n = 1 + f % 7
        ok = [(f + i) % 5 != 0 for i in range(n)]
        shares = [list(rng.dirichlet(np.ones(4)).astype(np.float32)) if o else None for o in ok]
        rows = {c: [None] * n for c in schema.names}
        rows |= {"key": [f"k{f:02d}-{i}" for i in range(n)], "source_uri": [f"/in/{f}-{i}.png" for i in range(n)]}
        rows |= {
            "status": ["ok" if o else "error" for o in ok],
            "error": ["" if o else f"bad {f}-{i}" for i, o in enumerate(ok)],
        }
        rows |= {
            "class_fractions": shares,
            "run_id": [RUN_ID] * n,
            "decode_ms": [1.5] * n,
            "model_sha256": ["a" * 64] * n,
        }
        pq.write_table(pa.table(rows, schema=schema), folder / f"part-{f:04d}.parquet")
    reference = report_scan.Scan(NAMES, capacity=5, run_id=RUN_ID)
    for path in sorted(folder.iterdir()):  # the pass as it was: a file at a time, each whole
        report_scan._add_batch(reference, pq.read_table(path).to_batches()[0])

    readers = []

    class Watched(fsspec.implementations.local.LocalFileSystem):
        cachable = False

        def cat_file(self, path, *args, **kwargs):
            readers.append((threading.current_thread() is threading.main_thread(), path))
            return super().cat_file(path, *args, **kwargs)

    out = storage.Location(str(tmp_path / "out"), Watched(), str(tmp_path / "out"))
    scan = report_scan.scan_summaries(out, 5, RUN_ID)
    data_reads = [p for main, p in readers if not main]
    assert len(data_reads) == 40 and sorted(data_reads) == sorted(str(p) for p in folder.iterdir())
    assert (scan.rows, scan.ok, scan.error) == (reference.rows, reference.ok, reference.error)
    assert scan.run_rows == reference.run_rows == scan.rows
    # Sums kept exactly: the same floats however the rows were batched.
    assert (scan.hist == reference.hist).all() and (scan.share_sum == reference.share_sum).all()
    assert scan.errors == reference.errors and scan.samples[:5] == reference.samples
    assert scan.stage_sum == reference.stage_sum and scan.stage_sum["decode_ms"] == 1.5 * scan.rows
    # The sample rows carry the fields the page shows, no more.
    assert all(set(row) <= set(report_scan.SAMPLE_FIELDS) for _, row in scan.samples)
