"""`raysegment serve` on the test cluster: real HTTP; masks equal to `infer`'s, every 4xx, health, SIGTERM ends it."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import wait_for, write_infer_inputs
from PIL import Image

from raysegment.config import InferSpec, ServeSpec, load_spec
from raysegment.data import imaging
from raysegment.errors import ConfigError
from raysegment.serve import APP_NAME, deployment_options

MAX_BODY_MB = 0.05  # 52,428 bytes: the test images are a few KB
MAX_PIXELS = 64 * 64
BODY_S = 3  # a body must arrive within this; the test images are sent at once over loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def segment(self, body: bytes, query: str = "", content_type: str = "image/png", **headers: str):
        return self.request("POST", f"/segment{query}", body, {"Content-Type": content_type, **headers})

    def status_of(self, path: str) -> int:
        try:
            return self.request("GET", path)[0]
        except OSError:  # the proxy is not listening yet
            return 0


@pytest.fixture(scope="module")
def server(tiny_model, ray_cluster):
    """`raysegment serve` as a process joined to the test cluster, ready; SIGTERM after the module (as `ray job
    stop` sends), which must end it with exit 0 and its summary line."""
    from ray import serve

    _, model = tiny_model
    port = free_port()
    command = [sys.executable, "-m", "raysegment.cli", "serve", model, "--port", str(port), "--max-batch-size", "4"]
    command += ["--max-body-mb", str(MAX_BODY_MB), "--max-pixels", str(MAX_PIXELS), "--body-timeout-s", str(BODY_S)]
    proc = subprocess.Popen(command, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = Client(port)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode} before it was ready: {proc.communicate()}")
        return client.status_of("/readyz") == 200

    try:
        wait_for(ready, "readiness", timeout=180)
        yield client
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"at http://127.0.0.1:{port}/segment for" in out and out.startswith("served unet-"), out
        wait_for(lambda: APP_NAME not in serve.status().applications, "the app deleted on SIGTERM", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        serve.shutdown()


@pytest.fixture(scope="module")
def inferred(tiny_model, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(input dir, infer's output dir, good keys): `infer` over the images the server is sent."""
    from raysegment.inference.pipeline import infer

    _, model = tiny_model
    root = tmp_path_factory.mktemp("serve-infer")
    inputs = write_infer_inputs(str(root / "in"))
    infer(InferSpec(model=model, input=str(root / "in"), output=str(root / "out"), actors=1, report=False))
    return root / "in", root / "out", inputs["good"]


@pytest.mark.slow
def test_health_and_readiness(server):
    status, _, body = server.request("GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = server.request("GET", "/readyz")
    state = json.loads(body)
    assert status == 200 and state["ready"] is True and state["error"] is None and state["model_id"].startswith("unet-")


def test_a_port_held_by_another_clusters_proxy_is_refused(server, tiny_model):
    """This cluster's Serve proxy is joined; a port where something else answers /-/healthz (another
    local Ray's Serve: it binds with SO_REUSEPORT, so both proxies would take turns) is refused."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from raysegment.serve import _check_port

    _, model = tiny_model
    _check_port(ServeSpec(model=model, port=server.port))

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        port = other.server_address[1]
        assert Client(port).status_of("/-/healthz") == 200
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} is in use .*another Ray cluster's Serve"):
            _check_port(ServeSpec(model=model, port=port))
    finally:
        other.shutdown()
        other.server_close()


@pytest.mark.slow
def test_masks_and_json_equal_infer(server, inferred):
    inputs, out, keys = inferred
    rows = {r["key"]: r for r in pq.read_table(out / "summaries").to_pylist()}
    for key in keys:
        image = (inputs / f"{key}.png").read_bytes()
        status, headers, png = server.segment(image)
        assert status == 200 and headers["content-type"] == "image/png", png
        assert png == (out / "masks" / f"{key}.png").read_bytes(), key  # the very file infer wrote
        assert Image.open(io.BytesIO(png)).mode == "P"  # a palette PNG, as infer writes

        status, headers, body = server.segment(image, "?format=json")
        assert status == 200 and headers["content-type"] == "application/json"
        answer, row = json.loads(body), rows[key]
        assert (answer["height"], answer["width"]) == (row["height"], row["width"])
        names = list(answer["class_fractions"])
        assert [answer["class_fractions"][n] for n in names] == pytest.approx(row["class_fractions"], abs=1e-6)
        assert answer["mean_confidence"] == pytest.approx(row["mean_confidence"], abs=1e-5)
        assert json.loads(server.segment(image, Accept="application/json")[2]) == answer


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_each_gets_its_own_mask(server, inferred):
    inputs, out, keys = inferred
    images = [(inputs / f"{k}.png").read_bytes() for k in keys] * 4
    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(server.segment, images))
    for i, (status, _, png) in enumerate(answers):
        assert status == 200 and png == (out / "masks" / f"{keys[i % len(keys)]}.png").read_bytes()


def _error(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = answer
    assert headers["content-type"] == "application/json" and body.count(b"\n") == 0, body
    return status, json.loads(body)["error"]


@pytest.mark.slow
def test_bad_requests_get_one_line_json_4xx(server, inferred):
    inputs, _, keys = inferred
    good = (inputs / f"{keys[0]}.png").read_bytes()
    status, error = _error(server.segment((inputs / "corrupt.png").read_bytes()))  # header fine, pixels cut off
    assert status == 400 and "cannot decode image" in error
    status, error = _error(server.segment((inputs / "notes.jpg").read_bytes(), content_type="image/jpeg"))
    assert status == 400 and "not a PNG, JPEG" in error
    assert _error(server.segment(b""))[0] == 400
    status, error = _error(server.segment(os.urandom(int(MAX_BODY_MB * 2**20) + 1)))
    assert status == 413 and "--max-body-mb" in error
    big = imaging.encode_mask(np.zeros((65, 64), np.uint8))  # one row over MAX_PIXELS
    status, error = _error(server.segment(big))
    assert status == 413 and "64x65 pixels, over the limit of 4096" in error
    status, error = _error(server.segment(good, content_type="text/plain"))
    assert status == 415 and "Content-Type" in error
    assert _error(server.segment(good, content_type=""))[0] == 415
    assert _error(server.segment(good, "?format=xml"))[0] == 400
    assert _error(server.request("GET", "/segment"))[0] == 405
    assert _error(server.request("GET", "/nothing"))[0] == 404
    status, error = _error(server.segment(tiff_stack(3), content_type="image/tiff"))
    assert status == 400 and "the TIFF has 3 pages and serve segments one image" in error
    assert server.segment(good, content_type="application/octet-stream")[0] == 200  # and still serving

    # A body that never completes (a client that stalls, or trickles bytes to hold a slot) gets 408.
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as stalled:
        head = f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(good)}\r\n\r\n"
        stalled.sendall(head.encode() + good[:10])
        reply = http.client.HTTPResponse(stalled)
        reply.begin()
        status, error = reply.status, json.loads(reply.read())["error"]
    assert status == 408 and f"within {BODY_S} s (--body-timeout-s)" in error, error


def test_each_route_takes_its_methods_and_405_says_which(server):
    """405 answers had no `Allow` header (RFC 9110 requires one), and POST /healthz answered 200 though
    the routes are GET /healthz, GET /readyz and POST /segment."""
    for method, path, allow in [
        ("GET", "/segment", "POST"),
        ("OPTIONS", "/segment", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/readyz", "GET, HEAD"),
    ]:
        answer = server.request(method, path, b"x" if method in ("POST", "PUT") else None)
        status, error = _error(answer)
        assert (status, answer[1].get("allow")) == (405, allow), (method, path, answer)
        assert error.startswith(f"{path} takes {allow.split(',')[0]}"), error
    for path in ("/healthz", "/readyz"):  # GET's status and headers, no body (http.client reads none for HEAD)
        _, got, body = server.request("GET", path)
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, rest = answer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        assert status_line.split()[1] == "200" and rest == b"", (path, answer)
        for name in ("content-type", "content-length"):
            assert headers.get(name) == got.get(name), (path, name, headers, got)
        assert got["content-length"] == str(len(body)) and body, (path, got, body)
    status, headers, _ = server.request("DELETE", "/nothing")
    assert status == 404 and "allow" not in headers


def tiff_stack(pages: int) -> bytes:
    """A TIFF of `pages` 8x8 RGB pages (a z-stack, as infer splits into one mask per page)."""
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for page in range(pages):
            tif.write(np.full((8, 8, 3), page * 40, np.uint8), photometric="rgb")
    return buf.getvalue()


def test_a_tiff_stack_is_refused_naming_its_pages_and_one_page_is_taken():
    """infer writes a mask per page; serve answered page 0 alone, silently."""
    from raysegment.serve import _header_problem, _pages_problem

    assert _header_problem(tiff_stack(3), MAX_PIXELS) is None  # the first page's header is an image's
    status, message = _pages_problem(tiff_stack(3))
    assert status == 400 and message.startswith("the TIFF has 3 pages and serve segments one image: send one page")
    assert "infer segments every page" in message and "\n" not in message
    assert _pages_problem(tiff_stack(1)) is None


def test_a_page_past_a_stacks_end_is_named_in_the_singular_too(tmp_path):
    """`show IMAGE#page=5` of a one-page TIFF said "the TIFF has 1 pages (0..0)": the count reads as English."""
    from raysegment.data import tiff
    from raysegment.errors import DataError
    from raysegment.show import read_image

    for pages, text in ((1, "1 page (0)"), (3, "3 pages (0..2)")):
        path = tmp_path / f"stack{pages}.tif"
        path.write_bytes(tiff_stack(pages))
        with pytest.raises(DataError, match=rf"stack{pages}.tif#page=5: the TIFF has {re.escape(text)}$"):
            read_image(f"{path}#page=5", None)
        with pytest.raises(tiff.TiffError, match=rf"^page 5 asked for; the TIFF has {re.escape(text)}$"):
            tiff.page_bytes(tiff_stack(pages), 5)


def test_a_damaged_model_file_is_the_users_error_exit_2(tmp_path):
    """A model.keras that is no zip archive, its hash rewritten in the card: the replica's load fails as
    export's and show's do (exit 2), not as a failed job (3)."""
    import dataclasses
    import hashlib
    import shutil

    from raysegment import storage
    from raysegment.errors import DataError
    from raysegment.models.card import ModelCard
    from raysegment.serve import Segmenter, load_failed, replica_config

    junk = b"PK\x03\x04" + os.urandom(500)  # a zip's first bytes, then nothing of one
    (tmp_path / "model.keras").write_bytes(junk)
    ModelCard.create(
        hashlib.sha256(junk).hexdigest(), architecture={"name": "unet", "depth": 2, "base_filters": 4},
        num_classes=2, class_names=["a", "b"], palette=imaging.default_palette(2), ignore_index=imaging.IGNORE_INDEX,
        input={"size": [32, 32], "channels": 3, "normalization": "scale_0_1", "resize": "bilinear"},
    ).write(storage.resolve(str(tmp_path)))  # fmt: skip
    # In this process, whose TensorFlow may be running already: threads=0 leaves its thread pools as they are.
    replica = Segmenter(dataclasses.replace(replica_config(ServeSpec(model=str(tmp_path)), 5.0), threads=0))
    try:
        wait_for(lambda: replica.readiness()["error"], "the load error", timeout=60)
        state = replica.readiness()
        assert not state["ready"] and state["user_error"] is True, state
        error = load_failed(state)
        assert isinstance(error, DataError) and error.exit_code == 2
        assert str(error).startswith(f"serve: model did not load: {tmp_path / 'model.keras'}: not a readable Keras")
    finally:
        shutil.rmtree(replica.scratch.path, ignore_errors=True)
    assert load_failed({"error": "model did not load: OSError: ...", "user_error": False}).exit_code == 3


def test_serve_spec_replicas_and_deployment_options():
    spec = load_spec(ServeSpec, None, {"model": "m", "replicas": "1:4", "gpus_per_replica": 1})
    options = deployment_options(spec)
    assert options["autoscaling_config"]["min_replicas"] == 1 and options["autoscaling_config"]["max_replicas"] == 4
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0} and "num_replicas" not in options
    assert deployment_options(load_spec(ServeSpec, None, {"model": "m", "replicas": 2}))["num_replicas"] == 2
    # A replica Serve stops finishes its requests in flight for the drain timeout (Serve's default was 20 s
    # whatever --drain-timeout-s said), looking every 0.25 s (its default 2 s made every stop take 2 s).
    drained = deployment_options(load_spec(ServeSpec, None, {"model": "m", "drain_timeout_s": 5}))
    assert (drained["graceful_shutdown_timeout_s"], drained["graceful_shutdown_wait_loop_s"]) == (5.0, 0.25)
    assert options["graceful_shutdown_timeout_s"] == 20.0
    assert spec.host == "127.0.0.1"  # loopback unless asked
    for bad in ("4:1", "0", "a:b"):
        with pytest.raises(ConfigError, match="replicas"):
            load_spec(ServeSpec, None, {"model": "m", "replicas": bad})


def test_accept_header_q_values_choose_the_answer():
    from raysegment.serve import answer_format

    cases = {
        "": "png",
        "*/*": "png",
        "application/json": "json",
        "application/json, text/plain, */*": "json",  # axios' default: the specific range wins a tie
        "application/json;q=0, image/png": "png",  # q=0: not acceptable (it used to answer JSON)
        "image/png;q=1, application/json;q=0.5": "png",
        "application/json;q=0.9, image/png;q=0.5": "json",
        "text/html,application/xhtml+xml,*/*;q=0.8": "png",
        "application/json;q=oops": "png",
        "image/png, application/json": "json",  # a full tie: JSON, as any header naming it answered before q-values
    }
    assert {accept: answer_format(accept) for accept in cases} == cases


def test_accept_ranges_and_refusals_choose_the_answer_or_406():
    from raysegment.serve import answer_format

    cases = {
        "application/*": "json",  # matches application/json, not image/png
        "application/*;q=0.5, image/*;q=0.4": "json",
        "image/*, application/*": "json",  # a full tie of named ranges
        "image/png;q=0.5, */*": "json",  # image/png's own q is 0.5; */* gives JSON 1
        "image/png;q=0": "json",  # PNG refused, JSON not named: JSON is still given
        "application/json;q=0": "png",
        "text/html": "png",  # names neither: PNG, as the README says
        "application/json;q=0, image/png;q=0": None,  # every answer refused: 406
        "*/*;q=0": None,
        "image/*;q=0, application/json;q=0, text/html": None,
        "image/png;q=0, */*;q=0.3, application/json;q=0": None,
        "image/*;q=0, image/png": "png",  # the most specific range decides
        "application/json;q=nan, image/png;q=0": "json",  # an unreadable q leaves its range out
    }
    assert {accept: answer_format(accept) for accept in cases} == cases


def test_a_content_encoded_body_is_refused_not_decoded():
    from raysegment.serve import _encoding_problem

    assert _encoding_problem("") is None and _encoding_problem("identity") is None
    assert _encoding_problem(" Identity ") is None
    for coding in ("gzip", "deflate", "br", "gzip, identity", "x-gzip"):
        message = _encoding_problem(coding)
        assert message and "without Content-Encoding" in message and "\n" not in message, coding


@pytest.mark.slow
def test_accept_406_and_content_encoding_415_over_http(server, inferred):
    import gzip

    inputs, _, keys = inferred
    good = (inputs / f"{keys[0]}.png").read_bytes()
    status, headers, body = server.segment(good, Accept="application/*")
    assert status == 200 and headers["content-type"] == "application/json", body
    status, error = _error(server.segment(good, Accept="application/json;q=0, image/png;q=0"))
    assert status == 406 and "image/png" in error and "application/json" in error
    status, error = _error(server.segment(gzip.compress(good), **{"Content-Encoding": "gzip"}))
    assert status == 415 and "without Content-Encoding" in error
    assert server.segment(good, **{"Content-Encoding": "identity"})[0] == 200


def test_scratch_of_a_gone_replica_is_swept_and_an_ipv6_host_is_bracketed(tmp_path):
    from raysegment.serve import SCRATCH_PREFIX, scratch_prefix, sweep_scratch, url_of

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = tmp_path / f"{SCRATCH_PREFIX}{gone.pid}@{host}@abc"
    live = tmp_path / f"{scratch_prefix()}def"
    other = tmp_path / f"{SCRATCH_PREFIX}notapid@{host}@x"
    # Another container sharing /tmp: its PIDs are not this host's, so its folders are never judged here.
    elsewhere = tmp_path / f"{SCRATCH_PREFIX}{gone.pid}@{host}-other@abc"
    # Named before the host was part of the name (PID-random): judged by the PID alone, as then.
    # Such a name may be another container's PID, so it goes only once a day old as well.
    old_dead, old_live = tmp_path / f"{SCRATCH_PREFIX}{gone.pid}-xyz", tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-xyz"
    old_recent = tmp_path / f"{SCRATCH_PREFIX}{gone.pid}-new"
    for folder in (dead, live, other, elsewhere, old_dead, old_live, old_recent):
        (folder / "masks").mkdir(parents=True)
    for folder in (old_dead, old_live):
        os.utime(folder, (time.time() - 2 * 86400,) * 2)
    sweep_scratch(str(tmp_path))
    kept = sorted([live.name, other.name, elsewhere.name, old_live.name, old_recent.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
    assert url_of(ServeSpec(model="m", host="::1", port=8000)) == "http://[::1]:8000"
    assert url_of(ServeSpec(model="m", host="0.0.0.0", port=8000)) == "http://127.0.0.1:8000"


def test_a_model_id_any_text_is_a_valid_header_value():
    """A model id with non-Latin-1 text or CR/LF (model.json is free text) made every PNG answer a non-JSON
    500 while /readyz said ready."""
    from starlette.responses import Response

    from raysegment.serve import header_text

    assert header_text("unet-3f2a9c01_x.y") == "unet-3f2a9c01_x.y"
    for model_id in ("unet-猫", "unet-x\r\nSet-Cookie: a=b", "50%"):
        value = header_text(model_id)
        assert value.isascii() and value.isprintable() and urllib.parse.unquote(value) == model_id
        Response(b"", headers={"X-Model-Id": value})  # starlette encodes headers as Latin-1


def test_a_stop_ends_by_one_deadline_and_replicas_delete_an_orphaned_app(server):
    """The drain's waits were four constants on top of --drain-timeout-s (the route gone 5 s, the app gone 10 s
    past the timeout, ...): one deadline now, the drain timeout + DRAIN_MARGIN_S; a request that never ends
    holds the stop no longer and is counted cut off. A driver killed before it deletes the app (`ray job stop`
    SIGKILLs it 3 s after SIGTERM) leaves it to the replicas, told to stop taking requests: they delete it at
    the deadline they were given. `Draining` is Segmenter's side of the drain; a replica without a model here."""
    import asyncio

    from ray import serve

    from raysegment.serve import DRAIN_MARGIN_S, Draining, drain

    @serve.deployment(
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=DRAIN_MARGIN_S + 5,
        graceful_shutdown_wait_loop_s=0.25,
    )
    class Held(Draining):
        async def hold(self) -> None:  # a request in flight that never ends, counted as Segmenter counts its own
            self.in_flight += 1
            try:
                await asyncio.Event().wait()
            finally:
                self.in_flight -= 1

        async def count(self) -> int:
            return self.in_flight

    apps = [serve.RunTarget(Held.bind(), name=name, route_prefix=None) for name in ("drain-held", "drain-orphan")]
    held, orphan = serve.run_many(apps)
    request = held.hold.remote()
    try:
        wait_for(lambda: held.count.remote().result(timeout_s=10) == 1, "the request held")
        # Its driver dies here; the deadline is a wall-clock time (a call that waited in a busy replica's queue
        # does not move it).
        assert orphan.broadcast("stop_accepting", time.time() + 0.5).results(timeout_s=10) == [0]
        started = time.monotonic()
        drained = drain(held, 0.0)  # Serve would wait DRAIN_MARGIN_S + 5 s for the request: the driver does not
        took = time.monotonic() - started
        assert (drained["in_flight_at_stop"], drained["cut_off"]) == (1, 1), drained
        assert DRAIN_MARGIN_S - 0.5 < took < DRAIN_MARGIN_S + 2, took
        assert "drain-orphan" not in serve.status().applications  # deleted by its replica 0.5 s after the stop
    finally:
        request.cancel()
        for app in ("drain-held", "drain-orphan"):
            serve.delete(app, _blocking=False)
        wait_for(lambda: not {"drain-held", "drain-orphan"} & set(serve.status().applications), "gone", timeout=30)


def test_a_stopped_servers_app_is_deleted_before_a_new_serve_so_its_guard_spares_the_new_one(
    server, tmp_path, monkeypatch
):
    """A driver killed after its stop leaves replicas that delete the app at its deadline unless the app "was
    deployed again since", judged by Serve's last_deployed_time_s, which serve.run of the same name never
    changes: a new `serve` before that deadline, over a replica kept alive by a request in flight (up to its
    graceful_shutdown_timeout_s after its replacement), was deleted by that replica's guard. Now the new
    `serve` deletes a stopped app and waits until its replicas, guards with them, are gone before it deploys
    (`clear_stopped_app`); a live app that answers is left to serve.run, a busy one that does not is deleted
    too. `Draining` is Segmenter's side; no model here."""
    import asyncio

    from ray import serve

    from raysegment import serve as segment_serve
    from raysegment.serve import Draining, clear_stopped_app

    @serve.deployment(
        ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=2, graceful_shutdown_wait_loop_s=0.25
    )
    class Server(Draining):
        def __init__(self, generation: int) -> None:
            super().__init__()
            self.generation = generation

        async def hold(self, started: str | None = None) -> None:  # never ends: Serve kills the replica at 2 s
            self.in_flight += 1
            if started:  # told where the test can see it, when no request slot is left to ask
                open(started, "w").close()
            await asyncio.Event().wait()

        async def state(self) -> tuple[int, int, int]:
            return self.generation, os.getpid(), self.in_flight

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    app = "drain-restarted"
    stopped = serve.run(Server.bind(1), name=app, route_prefix=None)
    request = stopped.hold.remote()
    busy_request = None
    try:
        wait_for(lambda: stopped.state.remote().result(timeout_s=10)[2] == 1, "the request held")
        old_pid = stopped.state.remote().result(timeout_s=10)[1]
        # Its driver is killed here; its replica deletes the app in 1 s unless it is gone; deleted, it lives 2 s more.
        delete_at = time.time() + 1.0
        assert stopped.broadcast("stop_accepting", delete_at).results(timeout_s=10) == [1]
        said = clear_stopped_app(app, 30)  # a new `serve`, before the deadline
        assert (
            said and "was stopping, not yet deleted by its driver (killed, or still draining): deleted it first" in said
        ), said
        assert app not in serve.status().applications  # gone before the new deploy
        # It waited for the stopped replica (its request in flight holds it 2 s), past its guard's deadline.
        assert time.time() > delete_at
        new = serve.run(Server.bind(2), name=app, route_prefix=None)
        wait_for(lambda: not alive(old_pid), "the stopped replica ended, its guard with it", timeout=30)
        assert serve.status().applications[app].status == "RUNNING"  # the guard spared the new app
        assert new.state.remote().result(timeout_s=10)[0] == 2
        assert clear_stopped_app(app, 30) is None  # a live server: left to serve.run (replaced replica by replica)
        assert serve.status().applications[app].status == "RUNNING"
        # A live server with every request slot busy cannot say within ASK_STOPPING_S whether it was told to
        # stop (the question takes a slot): it is deleted too, as a stopped one might delete its successor.
        busy = Server.options(max_ongoing_requests=1, graceful_shutdown_timeout_s=0.5)
        busy = serve.run(busy.bind(3), name=app, route_prefix=None)
        busy_request = busy.hold.remote(str(tmp_path / "held"))
        wait_for((tmp_path / "held").exists, "the busy replica's one slot taken")
        monkeypatch.setattr(segment_serve, "ASK_STOPPING_S", 1.0)  # 5 s: the wait is the same, only shorter
        said = clear_stopped_app(app, 30)
        assert said and "did not say whether it was stopping (a replica not answering in 1 s" in said, said
        assert app not in serve.status().applications
    finally:
        request.cancel()
        if busy_request is not None:
            busy_request.cancel()
        serve.delete(app, _blocking=False)
        wait_for(lambda: app not in serve.status().applications, "gone", timeout=30)


def test_a_stop_with_every_replica_slot_busy_says_so_at_once_and_keeps_its_deadline(server, tmp_path):
    """The replicas are told to stop by a call that takes one of their max_ongoing_requests: with every slot
    busy (slow uploads, --body-timeout-s over the drain timeout) it waits in the replica's queue. The driver
    waited for it until the stop's last deadline: no "stopping" line until then, the app deleted with no
    margin left for Serve, and the end said "cut off at the drain timeout" of requests it never counted. Now
    the line comes within COUNT_LINE_S ("an unknown number"), the count is waited for until the drain timeout
    at most, and the end says the requests were not counted."""
    import asyncio
    import io

    from ray import serve

    from raysegment import progress
    from raysegment.serve import COUNT_LINE_S, DRAIN_MARGIN_S, Draining, drain

    @serve.deployment(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1,
        graceful_shutdown_timeout_s=0.5,
        graceful_shutdown_wait_loop_s=0.25,
    )
    class Busy(Draining):
        async def hold(self, started: str) -> None:  # takes the replica's one slot, never ends
            self.in_flight += 1
            Path(started).touch()
            await asyncio.Event().wait()

    class Lines(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.at: list[tuple[float, str]] = []

        def write(self, text: str) -> int:
            self.at.append((time.monotonic(), text))
            return super().write(text)

    busy = serve.run(Busy.bind(), name="drain-busy", route_prefix=None)
    request = busy.hold.remote(str(tmp_path / "held"))
    lines = Lines()
    progress.configure(progress.LINES, stream=lines)
    try:
        wait_for(lambda: (tmp_path / "held").exists(), "the request holding the only slot")
        started = time.monotonic()
        drained = drain(busy, 0.0)
        took = time.monotonic() - started
        assert (drained["in_flight_at_stop"], drained["cut_off"]) == (None, None), drained
        (stopping, stopped) = [(at - started, text) for at, text in lines.at if " stop" in text]
        assert "waiting up to 0 s for an unknown number of requests in flight" in stopping[1], stopping
        assert stopping[0] < COUNT_LINE_S + 1, stopping  # not at the deadline, DRAIN_MARGIN_S
        assert "requests in flight were not counted (the replicas did not answer in time)" in stopped[1], stopped
        assert "drain timeout" not in stopped[1] and took < DRAIN_MARGIN_S + 1, (stopped, took)  # one deadline
    finally:
        progress.configure(progress.OFF)
        request.cancel()
        serve.delete("drain-busy", _blocking=False)
        wait_for(lambda: "drain-busy" not in serve.status().applications, "gone", timeout=30)


def test_sigterm_answers_the_requests_in_flight_and_refuses_new_ones(tiny_model):
    """SIGTERM (systemd stop, a Kubernetes rolling restart) with uploads in flight cut every one of them off
    (BrokenPipe, no answer) while the driver said "stopped", exit 0: it deleted the app without waiting and
    its local Ray, Serve's proxy with it, died at once. Now a request in flight when SIGTERM arrives gets
    its 200, one begun after the stop line gets 503 with Retry-After (it got Serve's plain-text 404: the app
    was deleted first) and /readyz 503 with the stop line's count, and the driver exits 0 once the replica has
    answered. A Ray of its own (no RAY_ADDRESS): on the test cluster Serve's proxy outlives the driver."""
    import queue
    import threading

    _, model = tiny_model
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    command = [sys.executable, "-m", "raysegment.cli", "serve", model, "--port", str(port), "--drain-timeout-s", "60"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    said: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()

    def line_with(text: str) -> str:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                said.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                break
            if text in said[-1]:
                return said[-1]
        raise AssertionError(f"no line with {text!r}; the serve process said: {''.join(said)[-3000:]}")

    client = Client(port)
    try:
        line_with(" serving unet-")
        upload = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n"
        upload.sendall(head.encode() + png[: len(png) // 2])
        # The replica says when it holds the upload (reading its body): the event the SIGTERM waits for.
        wait_for(lambda: json.loads(client.request("GET", "/readyz")[2])["in_flight"] == 1, "the upload in flight")
        proc.send_signal(signal.SIGTERM)
        stopping = line_with(" stopping: ")
        assert "new requests are refused; waiting up to 60 s for 1 request in flight" in stopping, stopping
        refused = client.segment(png)  # begun after the stop: refused, saying when to try again
        status, error = _error(refused)
        assert (status, refused[1].get("retry-after")) == (503, "5") and "server is stopping" in error, refused
        status, _, body = client.request("GET", "/readyz")  # a load balancer drops it; the stop line's one count
        state = json.loads(body)
        assert status == 503 and state["draining"] is True and state["in_flight"] == 1, (status, state)

        upload.sendall(png[len(png) // 2 :])
        answer = http.client.HTTPResponse(upload)
        answer.begin()
        mask = answer.read()
        upload.close()
        assert answer.status == 200 and answer.getheader("content-type") == "image/png", (answer.status, mask)
        assert Image.open(io.BytesIO(mask)).size == (48, 40)

        stopped = line_with(" stopped: ")
        assert proc.wait(timeout=60) == 0, "".join(said)
        assert "stopped: 1 request in flight answered; drained in" in stopped, stopped
        out = proc.stdout.read()
        assert out.startswith("served unet-") and f"127.0.0.1:{port}/segment for" in out and "; stopped" in out, out
        with pytest.raises(ConnectionRefusedError):  # gone with its Ray: new connections are refused
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
