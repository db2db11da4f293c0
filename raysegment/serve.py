"""`raysegment serve`: a model behind an HTTP endpoint on Ray Serve, with `infer`'s own code.

    POST /segment   body: the image's bytes (Content-Type image/* or application/octet-stream)
                    -> the mask as a palette PNG at the image's size, exactly the file `infer` writes;
                    ?format=json (or Accept: application/json) -> class fractions by class name,
                    mean confidence, height, width: the summary row `infer` writes
    GET  /healthz   200 while the replica's process is up
    GET  /readyz    200 once the model is loaded and has answered a warm-up request, else 503
    (HEAD as GET; another method 405 with `Allow`, another path 404)

A request is checked before it reaches the model: an Accept that refuses both answers (406), content type
and any Content-Encoding but identity (415; not decoded, see `_encoding_problem`), body size (413,
`max_body_mb`), the header's pixel count (413, `max_pixels`), an image header at all (400) and, for a
TIFF, one page (400: `infer` makes a mask of each page of a stack, one answer would hold the first);
every 4xx is one line of JSON, {"error": "..."}. Requests wait up to `batch_wait_timeout_s` for
`max_batch_size` others (`@serve.batch`) and a batch runs in a thread, so /healthz answers while
the model predicts.

One implementation with `infer`: a batch goes through `predictor.preprocess`, the `Predictor` and
`output.write_masks` (into the replica's scratch folder, read back and removed), so the mask bytes,
class fractions and confidence are those of `infer`'s rows and files. The replica loads the model in
a thread, so /healthz answers during the load and /readyz says when it is done.

The driver (`serve_until_stopped`, the `serve` job) checks the model card and its hash once, starts
Serve's proxy on HOST:PORT (loopback by default), deploys the app `raysegment` (one still there that is
not a live server answering within 5 s, a stopped server's whose driver was killed or a busy one's, is
deleted first: `clear_stopped_app`) and blocks until
SIGINT/SIGTERM (`raysegment jobs stop ID` on a cluster), then drains (`drain`): every replica refuses new
requests (503 with Retry-After; /readyz 503) while it answers those in flight, counted by the replica
itself (`Draining`, shown by its /readyz; the stop lines give the sum); once none is left, or at
`drain_timeout_s`, the app is deleted (from then on Serve's proxy answers 404) and the driver returns once
Serve has stopped the replicas, within `drain_timeout_s` + `DRAIN_MARGIN_S` in all. A local Ray dies with
the driver, Serve's proxy with it: returning earlier cut the connections of requests in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from typing import Any

import numpy as np
from PIL import Image
from ray import serve

from raysegment import progress, storage
from raysegment.config import ServeSpec
from raysegment.data import imaging, tiff
from raysegment.errors import ConfigError, DataError, JobError, UserError
from raysegment.models.card import ModelCard

APP_NAME = "raysegment"
DEPLOYMENT_NAME = "segmenter"
SEGMENT, HEALTHZ, READYZ = "/segment", "/healthz", "/readyz"
# The methods each route takes (HEAD with GET, as every HTTP server should); others get 405 and `Allow`.
METHODS = {SEGMENT: ("POST",), HEALTHZ: ("GET", "HEAD"), READYZ: ("GET", "HEAD")}
# Where a 413 for pixels is decided: read the header's size without a limit, then compare.
NO_LIMIT = 1 << 62
# Retry-After of the 503 a stopping (draining) replica answers a new request: by then a load balancer routes
# to another server, or a restarted one answers.
RETRY_AFTER_S = 5
STOPPING = (
    f"the server is stopping and takes no new requests; send it again in {RETRY_AFTER_S} s (Retry-After), "
    "when your load balancer routes to another server or this one is restarted"
)


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
    """What every replica gets (plain values: it crosses to the replica's process)."""

    model: str
    endpoint_url: str | None
    retry_s: float
    threads: int
    precision: str
    tta_flip: bool | None  # None: the card's advice (`ModelCard.tta`)
    tile_size: int
    tile_overlap: int | None
    max_batch_size: int
    batch_wait_timeout_s: float
    max_body_bytes: int
    body_timeout_s: float
    max_pixels: int


def _error(status: int, message: str, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


# What POST /segment can answer, by the media type that names it.
ANSWER_TYPES = {"json": "application/json", "png": "image/png"}


def _accept_ranges(accept: str) -> list[tuple[str, float]]:
    """(media range, q) of an Accept header, lower case; a range with an unreadable q is left out."""
    ranges = []
    for item in accept.split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = math.nan
        if media and math.isfinite(q):
            ranges.append((media, min(max(q, 0.0), 1.0)))
    return ranges


def answer_format(accept: str) -> str | None:
    """json when the Accept header prefers application/json over a PNG, else png; None (406) when it gives
    both q=0. Each type takes the q of its most specific range (`image/png` over `image/*` over `*/*`);
    JSON wins by q-value, then by the more specific range (`application/json, */*` asks for JSON,
    `image/png;q=1, application/json;q=0.5` not), and on a full tie of named ranges (`image/png,
    application/json`); a type the header does not name is still given (PNG first: `text/html` answers one)."""
    best: dict[str, tuple[float, int]] = {}
    for media, q in _accept_ranges(accept):
        for fmt, full in ANSWER_TYPES.items():
            kind = full.split("/", 1)[0]
            specificity = 2 if media == full else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
            if specificity < 0:
                continue
            q_was, specificity_was = best.get(fmt, (0.0, -1))
            if specificity > specificity_was:
                best[fmt] = (q, specificity)
            elif specificity == specificity_was:
                best[fmt] = (max(q_was, q), specificity)
    refused = {fmt for fmt, (q, _) in best.items() if q <= 0}
    if refused == set(ANSWER_TYPES):
        return None
    if refused:
        return next(fmt for fmt in ANSWER_TYPES if fmt not in refused)
    json_rank, png_rank = best.get("json", (0.0, -1)), best.get("png", (0.0, -1))
    # A full tie between named ranges (`application/json, image/png`) answers JSON, as a header naming JSON
    # always did; `*/*` alone (or a header naming neither) answers the PNG.
    return "json" if json_rank > png_rank or (json_rank == png_rank and json_rank[1] > 0) else "png"


def _not_acceptable() -> str:
    return f"Accept refuses every answer (q=0); this server answers {ANSWER_TYPES['png']} or {ANSWER_TYPES['json']}"


def _encoding_problem(content_encoding: str) -> str | None:
    """Why a body with this Content-Encoding is refused (415), or None for none or identity. Not decoded: the
    body-size limit counts the bytes sent, and a small gzip body can inflate past it (a gzip bomb)."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    if all(c == "identity" for c in codings):
        return None
    return (
        f"Content-Encoding {', '.join(codings)[:60]} is not taken: send the image's bytes as they are, without "
        "Content-Encoding (an image file is compressed already)"
    )


def _accepted_type(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind.startswith("image/") or kind == "application/octet-stream"


def _header_problem(body: bytes, max_pixels: int) -> tuple[int, str] | None:
    """(status, message) when the body is not an image (400) or has too many pixels (413), from the header
    alone; decoding the pixels (and any error in them) is `preprocess`'s, in the batch."""
    try:
        height, width = imaging.image_size(body, NO_LIMIT)
    except imaging.ImageDecodeError as exc:
        if isinstance(exc.__cause__, Image.DecompressionBombError):
            return 413, f"image is over Pillow's decompression-bomb limit; this server takes {max_pixels} pixels"
        return 400, str(exc)
    if height * width > max_pixels:
        return 413, f"image is {width}x{height} pixels, over the limit of {max_pixels} (--max-pixels)"
    return None


def _pages_problem(body: bytes) -> tuple[int, str] | None:
    """(400, message) for a TIFF of several pages: `infer` makes a mask of each, so one answer would hold the
    first page alone. Walks every page header (up to `tiff.MAX_PAGES`), so it runs off the event loop."""
    try:
        pages = tiff.page_count(body)
    except (tiff.TiffError, OSError) as exc:
        return 400, f"cannot read the TIFF's pages: {exc}"
    if pages > 1:
        return 400, (
            f"the TIFF has {pages} pages and serve segments one image: send one page as its own image "
            "(infer segments every page of a stack)"
        )
    return None


SCRATCH_PREFIX = "raysegment-serve-"


def scratch_prefix() -> str:
    """A replica's scratch folder name up to mkdtemp's random part: its PID on this host. Containers that
    share /tmp each have their own PIDs, so a folder is judged only by a process of its own host."""
    return f"{SCRATCH_PREFIX}{os.getpid()}@{socket.gethostname()}@"


OLD_SCRATCH_AGE_S = 86400


def _age_s(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def sweep_scratch(root: str) -> None:
    """Remove the scratch folders of this host's replicas whose process is gone: Serve kills a replica's
    process, so its own clean-up (`__del__`) rarely runs."""
    host = socket.gethostname()
    ours = glob.glob(os.path.join(root, f"{SCRATCH_PREFIX}*@{glob.escape(host)}@*"))
    # Named by a version before the host was in the name (PID-random): the PID may be another container's,
    # so such a folder goes only once a day old as well (no request keeps a mask that long).
    older = [
        p
        for p in glob.glob(os.path.join(root, f"{SCRATCH_PREFIX}[0-9]*-*"))
        if "@" not in os.path.basename(p) and _age_s(p) > OLD_SCRATCH_AGE_S
    ]
    for path in ours + older:
        pid = os.path.basename(path)[len(SCRATCH_PREFIX) :].split("@", 1)[0].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive, another user's


def delete_app(app: str) -> None:
    """Delete the app without waiting (Serve stops its replicas, each after its requests in flight)."""
    try:
        serve.delete(app, _blocking=False)
    except Exception:  # Serve itself is gone, and the app with it
        pass


def _exists(app: str) -> bool:
    """Whether Serve has the app (deleting included); not when Serve's controller is gone, the app with it."""
    try:
        return app in serve.status().applications
    except Exception:  # Serve's controller is gone: so is the app
        return False


def _delete_when_due(app: str, delete_at: float) -> None:
    """A replica's guard (`Draining.stop_accepting`, in a thread): delete its app at `delete_at` (time.time())
    unless it is gone. Still there, it is this replica's: a new `serve` of the same name deletes a stopped
    app and waits until its replicas, guards included, are gone before it deploys (`clear_stopped_app`)."""
    time.sleep(max(0.0, delete_at - time.time()))
    if _exists(app):
        delete_app(app)


class Draining:
    """A replica's side of the driver's drain: its POST /segment requests in flight (its own count, shown by
    its /readyz; the stop lines give the sum over the replicas) and whether it has stopped taking new ones."""

    def __init__(self) -> None:
        self.in_flight = 0  # POST /segment requests this replica is answering (on its event loop only)
        self.draining = False

    async def stop_accepting(self, delete_at: float) -> int:
        """From now on new requests get 503 (the driver's drain, through `handle.broadcast` to every replica,
        again at each look: a replica started since is told too); returns the requests in flight. The first
        call arms the replica's own delete of the app at `delete_at`, the driver's deadline as a wall-clock
        time (time.time()): a call that waited behind busy requests (it takes one of the replica's
        max_ongoing_requests) does not move it. A driver killed before it deletes the app (`ray job stop`
        SIGKILLs it 3 s after its SIGTERM) thus never leaves a server that refuses every request. Serve ends
        the guard with the replica when the driver deletes it; a new `serve` of the app's name before the
        deadline deletes it first, so the guard never outlives it (`clear_stopped_app`)."""
        if not self.draining:
            self.draining = True
            app = serve.get_replica_context().app_name
            threading.Thread(target=_delete_when_due, args=(app, delete_at), name="drain-guard", daemon=True).start()
        return self.in_flight

    async def is_draining(self) -> bool:
        """Whether this replica was told to stop (`stop_accepting`): asked by a new `serve` that finds the app
        (`clear_stopped_app`)."""
        return self.draining


class Segmenter(Draining):
    """The deployment: one per replica, the model loaded once (in a thread, see `/readyz`)."""

    def __init__(self, config: ReplicaConfig) -> None:
        super().__init__()
        self.config = config
        self.card: ModelCard | None = None
        self.predictor: Any = None
        self.load_error: str | None = None
        self.load_error_is_user = False  # a UserError (a damaged model file): the driver exits 2, not 3
        self.ready = threading.Event()
        sweep_scratch(tempfile.gettempdir())
        self.scratch = storage.resolve(tempfile.mkdtemp(prefix=scratch_prefix()))
        self.segment_batch.set_max_batch_size(config.max_batch_size)
        self.segment_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        threading.Thread(target=self._load, name="load-model", daemon=True).start()

    def _load(self) -> None:
        from raysegment.inference.predictor import Predictor

        c = self.config
        try:
            self.predictor = Predictor(
                c.model,
                c.endpoint_url,
                tta_flip=c.tta_flip,
                threads=c.threads,
                precision=c.precision,
                tile_size=c.tile_size,
                tile_overlap=c.tile_overlap,
                batch_size=c.max_batch_size,
                retry_s=c.retry_s,
            )
            self.card = self.predictor.card
            warm = imaging.encode_mask(np.zeros((8, 8), np.uint8))  # one request end to end (traces the graph)
            (answer,) = self._segment([warm], warm_up=True)
            if answer["status"] != "ok":
                raise RuntimeError(f"warm-up request failed: {answer['error']}")
            self.ready.set()
        except Exception as exc:  # reported by /readyz and check_health (Serve then replaces the replica)
            # One line for /readyz and the driver's error: TensorFlow's and h5py's texts span many.
            said = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            self.load_error_is_user = isinstance(exc, UserError)
            self.load_error = f"model did not load: {' '.join(said.split())[:500]}"

    def __del__(self) -> None:
        # Serve calls it when it stops a replica; masks never stay in scratch longer than their request.
        shutil.rmtree(self.scratch.path, ignore_errors=True)

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose model failed to load is replaced."""
        if self.load_error:
            raise RuntimeError(self.load_error)

    def readiness(self) -> dict[str, Any]:
        """Readiness for the driver (through a DeploymentHandle) and /readyz: ready, or the load error; whether
        the server is stopping, and the POST /segment requests this replica is answering."""
        model_id = self.card.model_id if self.card else None
        return {
            "ready": self.ready.is_set(),
            "error": self.load_error,
            "user_error": self.load_error_is_user,
            "model_id": model_id,
            "draining": self.draining,
            "in_flight": self.in_flight,
        }

    def _segment(self, bodies: list[bytes], warm_up: bool = False) -> list[dict[str, Any]]:
        """A batch of encoded images through infer's steps: preprocess, predict, write_masks (into scratch)."""
        from raysegment.inference import output
        from raysegment.inference.predictor import preprocess

        card, n = self.predictor.card, len(bodies)
        keys = np.asarray([uuid.uuid4().hex for _ in range(n)], dtype=object)
        data = np.empty(n, dtype=object)
        data[:] = bodies
        batch = {"key": keys, "source_uri": np.full(n, "http", dtype=object), "bytes": data}
        batch = self.predictor(preprocess(batch, card, self.config.max_pixels, warm_up))
        rows = output.write_masks(batch, self.scratch, card, "serve", "png").to_pylist()
        answers = []
        for key, row in zip(keys, rows):
            if row["status"] == "ok":
                mask = self.scratch.child(output.MASKS, output.png_mask_name(key))
                row["png"] = storage.read_bytes(mask)
                os.remove(mask.path)
            answers.append(row)
        return answers

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def segment_batch(self, bodies: list[bytes]) -> list[dict[str, Any]]:
        # In a thread: the replica's event loop keeps answering /healthz and taking the next batch's requests.
        return await asyncio.to_thread(self._segment, bodies)

    async def __call__(self, request):
        path = "/" + request.url.path.strip("/")
        if path not in METHODS:
            return _error(404, f"no route {path}: POST an image to {SEGMENT}; GET {HEALTHZ} or {READYZ}")
        if request.method not in METHODS[path]:  # 405 names the methods it takes (RFC 9110 15.5.6)
            takes = "POST with the image's bytes as the body" if path == SEGMENT else "GET"
            return _error(405, f"{path} takes {takes}", {"Allow": ", ".join(METHODS[path])})
        if path == HEALTHZ:
            return _json({"status": "ok"})
        if path == READYZ:  # 503 while stopping too: a load balancer drops the server
            state = self.readiness()
            return _json(state, 200 if state["ready"] and not state["draining"] else 503)
        if self.draining:
            return _error(503, STOPPING, {"Retry-After": str(RETRY_AFTER_S)})
        return await self._segment_request(request)

    async def _segment_request(self, request):
        self.in_flight += 1
        try:
            return await self._segment_checked(request)
        finally:
            self.in_flight -= 1

    async def _segment_checked(self, request):
        if not self.ready.is_set():
            return _error(503, self.load_error or "model still loading; poll /readyz")
        fmt = request.query_params.get("format") or answer_format(request.headers.get("accept", ""))
        if fmt is None:
            return _error(406, _not_acceptable())
        if fmt not in ("png", "json"):
            return _error(400, f"format={fmt}: use png (the mask) or json (class fractions)")
        if not _accepted_type(request.headers.get("content-type", "")):
            return _error(415, "send the image's bytes with Content-Type image/* or application/octet-stream")
        encoding = _encoding_problem(request.headers.get("content-encoding", ""))
        if encoding:
            return _error(415, encoding)
        try:
            # A body that trickles in would hold one of the replica's few request slots for good.
            body = await asyncio.wait_for(_read_body(request, self.config.max_body_bytes), self.config.body_timeout_s)
        except TimeoutError:
            return _error(408, f"the body did not arrive within {self.config.body_timeout_s:g} s (--body-timeout-s)")
        if body is None:
            return _error(413, f"body over the limit of {self.config.max_body_bytes} bytes (--max-body-mb)")
        if not body:
            return _error(400, "empty body: POST the image's bytes")
        problem = _header_problem(body, self.config.max_pixels)
        if problem is None and tiff.is_tiff(body):
            problem = await asyncio.to_thread(_pages_problem, body)
        if problem:
            return _error(*problem)
        row = await self.segment_batch(body)
        if row["status"] != "ok":
            return _error(400, row["error"])
        return self._answer(row, fmt)

    def _answer(self, row: dict[str, Any], fmt: str):
        from starlette.responses import Response

        card = self.card
        # A model that overflowed (NaN probabilities) still answers; JSON has no NaN, so it says null.
        confidence = row["mean_confidence"] if math.isfinite(row["mean_confidence"]) else None
        if fmt == "png":
            headers = {"X-Model-Id": header_text(card.model_id), "X-Mean-Confidence": f"{row['mean_confidence']:.6f}"}
            return Response(row["png"], media_type="image/png", headers=headers)
        return _json(
            {
                "model_id": card.model_id,
                "height": row["height"],
                "width": row["width"],
                "mean_confidence": confidence,
                "class_fractions": dict(zip(card.class_names, row["class_fractions"])),
            }
        )


def header_text(text: str) -> str:
    """A card's free text as an HTTP header value: percent-encoded past printable ASCII (a model id with
    non-Latin-1 text or CR/LF made every PNG answer a 500); the JSON body keeps it as it is."""
    return urllib.parse.quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[]^_`{|}~")


def _json(obj: dict[str, Any], status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status_code=status)


async def _read_body(request, limit: int) -> bytes | None:
    """The body, or None once it passes `limit` bytes (by Content-Length, or while it streams in)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


# -- the driver ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Served:
    url: str
    model_id: str
    replicas: tuple[int, int]
    tta: dict[str, Any]  # the flip TTA the replicas run (`TTA.record`)
    handle: Any  # the app's DeploymentHandle: readiness, and the drain


def replica_config(spec: ServeSpec, retry_s: float) -> ReplicaConfig:
    from raysegment.inference.predictor import resolve_precision

    return ReplicaConfig(
        model=spec.model,
        endpoint_url=spec.endpoint_url,
        retry_s=retry_s,
        threads=max(1, int(spec.cpus_per_replica)),
        precision=resolve_precision(spec.precision, spec.gpus_per_replica),
        tta_flip=spec.tta_flip,
        tile_size=spec.tile_size,
        tile_overlap=spec.tile_overlap,
        max_batch_size=spec.max_batch_size,
        batch_wait_timeout_s=spec.batch_wait_timeout_s,
        max_body_bytes=int(spec.max_body_mb * (1 << 20)),
        body_timeout_s=spec.body_timeout_s,
        max_pixels=spec.max_pixels,
    )


def deployment_options(spec: ServeSpec) -> dict[str, Any]:
    """Serve's options: replicas (fixed, or autoscaled between MIN and MAX on ongoing requests) and resources."""
    lo, hi = spec.replicas
    scale: dict[str, Any] = {"num_replicas": lo}
    if hi > lo:
        scale = {
            "autoscaling_config": {
                "min_replicas": lo,
                "max_replicas": hi,
                "target_ongoing_requests": spec.max_batch_size,
            }
        }
    return {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": spec.cpus_per_replica, "num_gpus": spec.gpus_per_replica},
        # Room for one batch predicting and the next one filling (and the health probes).
        "max_ongoing_requests": 2 * spec.max_batch_size + 2,
        # A replica Serve stops (the app deleted on Ctrl-C/SIGTERM, a scale-down, a replacement) first
        # finishes its requests in flight, for this long at most; then Serve kills it.
        "graceful_shutdown_timeout_s": spec.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": SHUTDOWN_WAIT_LOOP_S,
        **scale,
    }


def url_of(spec: ServeSpec) -> str:
    host = "127.0.0.1" if spec.host in ("0.0.0.0", "::") else spec.host
    return f"http://[{host}]:{spec.port}" if ":" in host else f"http://{host}:{spec.port}"


def _check_port(spec: ServeSpec) -> None:
    """A port held by something that is not Serve's proxy is one clear error, before Serve starts."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((spec.host, spec.port))
        return
    except OSError:
        pass
    # Already this cluster's Serve proxy (an earlier `serve`, another app): the app joins it. Another
    # cluster's proxy answers /-/healthz too, but Serve binds with SO_REUSEPORT, so joining it would
    # split the port's connections between two clusters' models.
    if _own_proxy_port() == spec.port:
        try:
            with urllib.request.urlopen(f"{url_of(spec)}/-/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
    raise ConfigError(
        f"{spec.host}:{spec.port} is in use (by another process, or another Ray cluster's Serve) or cannot be "
        "bound; choose another --port or --host"
    )


def _own_proxy_port() -> int | None:
    """The HTTP port of Serve's proxy on the cluster this driver is connected to (None: Serve not started)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return int(ray.get(controller.get_http_config.remote(), timeout=30).port)
    except (ValueError, ray.exceptions.RayError):  # none, or a controller dying or not answering: not ours to join
        return None


def deploy(spec: ServeSpec) -> Served:
    """Check the model, start Serve's proxy and deploy the app; returns once a replica answers ready."""
    loc = storage.resolve(spec.model, spec.endpoint_url, spec.storage_retry_s)
    # Hashed here, once, as infer does: a model.keras that is not the card's would answer under its classes.
    card = ModelCard.read(spec.model, spec.endpoint_url, verify_model=True, retry_s=loc.retry_s)
    _check_port(spec)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    clear_stopped_app(APP_NAME, spec.ready_timeout_s)
    app = serve.deployment(Segmenter, **deployment_options(spec)).bind(replica_config(spec, loc.retry_s))
    handle = serve.run(app, name=APP_NAME, route_prefix="/")
    try:
        _wait_ready(handle, spec.ready_timeout_s)
    except BaseException:
        undeploy()
        raise
    return Served(url_of(spec), card.model_id, spec.replicas, card.tta(spec.tta_flip).record(), handle)


# How long `clear_stopped_app` waits for the replicas of an app already there to say whether they were told to
# stop (the call takes one of a replica's max_ongoing_requests: a busy one answers when a request ends).
ASK_STOPPING_S = 5.0


def clear_stopped_app(app: str, timeout_s: float) -> str | None:
    """Before a new `serve` deploys `app`: when one is there that is not a live server (a replica says it was
    told to stop, or did not say within ASK_STOPPING_S, or it is being deleted), delete it and wait, up to
    `timeout_s`, until Serve has stopped its replicas; returns the line said, None when there was none to
    clear. A stopped server's replicas each delete the app at their driver's deadline (`_delete_when_due`),
    a driver killed before its delete; a replica with requests in flight outlives its app's replacement by
    serve.run (up to its graceful_shutdown_timeout_s), so deployed over it, the new app would be deleted by
    its guard. A live server's app whose replicas all answer is left to serve.run, which replaces it replica by
    replica; one with a replica that does not answer within ASK_STOPPING_S (every request slot busy, its router
    not ready, a replica of a release without `is_draining`) is deleted too, its requests in flight answered
    within its drain timeout and nothing served until the new app is ready: downtime for a server this
    `serve` replaces anyway, rather than a new app that a stopped server's guard may delete."""
    try:
        found = serve.status().applications.get(app)
    except Exception:  # Serve's controller is gone: so is the app
        return None
    if found is None:
        return None
    why = "was being deleted"
    if found.status != "DELETING":
        try:
            handle = serve.get_app_handle(app)
            answers = handle.broadcast("is_draining").results(timeout_s=ASK_STOPPING_S, return_exceptions=True)
        except Exception as exc:  # no replica running (every one stopping or starting), or the app gone meanwhile
            answers = [exc]
        if answers and all(answer is False for answer in answers):
            return None
        unsure = f"a replica not answering in {ASK_STOPPING_S:g} s, or none running"
        why = (
            "was stopping, not yet deleted by its driver (killed, or still draining)"
            if any(answer is True for answer in answers)
            else f"did not say whether it was stopping ({unsure})"
        )
    said = (
        f"serve: the app {app} of an earlier server {why}: deleted it first, waiting for its replicas to stop "
        "(each after its requests in flight, within its --drain-timeout-s)"
    )
    progress.note(said)
    delete_app(app)
    deadline = time.monotonic() + timeout_s
    while _exists(app):
        if time.monotonic() > deadline:
            raise JobError(
                f"serve: the app {app} of an earlier server was still stopping after {timeout_s:g} s "
                "(--ready-timeout-s); run serve again once `serve status` no longer lists it"
            )
        time.sleep(DRAIN_POLL_S)  # polling Serve's state, not driving it
    return said


def _wait_ready(handle: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        state = handle.readiness.remote().result(timeout_s=max(1.0, deadline - time.monotonic()))
        if state["ready"]:
            return
        if state["error"]:
            raise load_failed(state)
        if time.monotonic() > deadline:
            raise JobError(f"serve: the model did not load within {timeout_s:g} s (--ready-timeout-s)")
        time.sleep(0.2)  # polling the replica's state, not driving it


def load_failed(state: dict[str, Any]) -> UserError:
    """A replica's load error as the driver's: the user's (a damaged model file, exit 2) or the job's (3)."""
    message = f"serve: {state['error']}"
    return DataError(message) if state.get("user_error") else JobError(message)


def undeploy() -> None:
    """Delete the app without waiting (Serve itself and its proxy stay for other apps; `serve shutdown` ends
    them): Serve stops the replicas, each after its requests in flight."""
    delete_app(APP_NAME)


# Serve's pause between two looks at a stopping replica's requests in flight (its default, 2 s, made every
# stop take 2 s or more).
SHUTDOWN_WAIT_LOOP_S = 0.25
# How often the driver asks the replicas for their requests in flight, and looks for the app, while they drain.
DRAIN_POLL_S = 0.2
# The one deadline of a stop: it takes at most --drain-timeout-s and this margin. Requests in flight get the
# drain timeout; then the app is deleted and Serve has the margin to stop the replicas (it stops one early
# once its requests are answered). The replicas delete the app themselves at the same deadline were the
# driver killed (`Draining.stop_accepting`).
DRAIN_MARGIN_S = 5.0


# How long the "stopping" line waits for the replicas' first count before it says "an unknown number": a
# replica whose max_ongoing_requests are all busy (slow uploads) answers only when one of them ends. Also the
# least time the first count is waited for (a drain timeout of 0), well inside DRAIN_MARGIN_S.
COUNT_LINE_S = 2.0


def _requests(n: int | None) -> str:
    return "an unknown number of requests" if n is None else f"{n} request{'' if n == 1 else 's'}"


class _Count:
    """One look at the replicas, begun at once in a thread (a second Ctrl-C is not held up): tell every
    replica to refuse new requests (`Draining.stop_accepting`, through `handle.broadcast`, with `delete_at`
    for their guard) and sum the requests they are answering. The call takes one of a replica's
    max_ongoing_requests, so it may wait behind busy ones: the count is waited for until `by`
    (time.monotonic()) at most."""

    def __init__(self, handle: Any, delete_at: float, by: float) -> None:
        self._answer: list[int] = []
        self._done = threading.Event()
        threading.Thread(target=self._ask, args=(handle, delete_at, by), name="drain-count", daemon=True).start()

    def _ask(self, handle: Any, delete_at: float, by: float) -> None:
        try:
            left = max(0.0, by - time.monotonic())
            self._answer.append(sum(handle.broadcast("stop_accepting", delete_at).results(timeout_s=left)))
        except Exception:  # a replica busy, stopped or not answering, the app or Serve gone: no count
            pass
        finally:
            self._done.set()

    def result(self, until: float, hurry: threading.Event) -> int | None:
        """The sum, or None when it is not in by `until` (time.monotonic()) or `hurry` is set first."""
        while not hurry.is_set() and not self._done.wait(min(DRAIN_POLL_S, max(0.0, until - time.monotonic()))):
            if time.monotonic() >= until:
                break
        return self._answer[0] if self._answer else None


def drain(handle: Any, timeout_s: float, hurry: threading.Event | None = None) -> dict[str, Any]:
    """Stop serving the app of `handle`, in `timeout_s` + DRAIN_MARGIN_S at most: every replica refuses new
    requests (503 with Retry-After) while it answers those in flight; once none is left, or at `timeout_s`,
    the app is deleted (Serve's proxy answers 404 from then on) and the driver waits until Serve has stopped
    the replicas, each once its requests are answered or the drain timeout passed again (the deployment's
    `graceful_shutdown_timeout_s`), or the margin is spent. Every count is waited for until the drain timeout
    at most (`_Count`), the "stopping" line COUNT_LINE_S at most. `hurry` (a second Ctrl-C/SIGTERM) ends the
    waits early; the delete is sent all the same.

    Waited for even on a cluster, where Serve's proxy outlives the driver and drains without it: the summary
    then says what happened. `ray job stop` may SIGKILL the driver 3 s after its SIGTERM, before it deletes
    the app: the replicas then delete it themselves at the same deadline (`Draining.stop_accepting`)."""
    hurry = hurry or threading.Event()
    started, delete_at = time.monotonic(), time.time() + timeout_s + DRAIN_MARGIN_S
    answer_by, stop_by = started + timeout_s, started + timeout_s + DRAIN_MARGIN_S
    first_by = max(answer_by, started + COUNT_LINE_S)
    first = _Count(handle, delete_at, first_by)
    in_flight = first.result(started + COUNT_LINE_S, hurry)
    progress.note(
        f"stopping: new requests are refused; waiting up to {timeout_s:g} s for {_requests(in_flight)} in flight "
        "(--drain-timeout-s; Ctrl-C again stops at once)"
    )
    if in_flight is None:  # still told, and counted, when a busy replica's request ends in time
        in_flight = first.result(first_by, hurry)
    last = in_flight
    while last and time.monotonic() < answer_by and not hurry.is_set():
        hurry.wait(DRAIN_POLL_S)
        now = _Count(handle, delete_at, answer_by).result(answer_by, hurry)
        if now is None:  # a replica not answering: Serve's graceful shutdown has the rest
            break
        last = now
    deleted = time.monotonic()
    delete_app(handle.app_name)
    while _exists(handle.app_name) and time.monotonic() < stop_by and not hurry.is_set():
        hurry.wait(DRAIN_POLL_S)
    gone, ended = not _exists(handle.app_name), time.monotonic()
    drain_s = ended - started
    # Serve stops a replica before its graceful_shutdown_timeout_s (the drain timeout again, from the delete)
    # only once its requests are answered. Otherwise those in flight at the last count are cut off by the
    # driver's return (on a local Ray; on a cluster Serve goes on draining them).
    cut_off = 0 if last == 0 or (gone and ended - deleted < timeout_s) else last
    hurried = "by a second Ctrl-C/SIGTERM" if hurry.is_set() else None
    if cut_off == 0:
        progress.note(f"stopped: {_requests(in_flight)} in flight answered; drained in {drain_s:.1f} s")
    elif cut_off is None:  # no count came back, the app deleted without one: not the drain timeout's cut
        progress.note(
            "stopped: the requests in flight were not counted (the replicas did not answer in time); any left "
            f"were cut off {hurried or f'after {drain_s:.1f} s'}, unanswered"
        )
    else:
        of = "" if in_flight is None else f" of {in_flight}"
        why = hurried or f"at the drain timeout ({timeout_s:g} s)"
        progress.note(f"stopped: {_requests(cut_off)}{of} in flight cut off {why}, unanswered")
    return {"in_flight_at_stop": in_flight, "cut_off": cut_off, "drain_s": round(drain_s, 1)}


def serve_until_stopped(spec: ServeSpec, stop: threading.Event | None = None) -> dict[str, Any]:
    """The `serve` job: deploy, block until SIGINT/SIGTERM (or `stop`), drain (`drain`)."""
    stop = stop or threading.Event()
    hurry = threading.Event()
    started = time.time()
    served = deploy(spec)
    restore = _stop_on_signals(stop, hurry)
    drained: dict[str, Any] = {}
    try:
        lo, hi = served.replicas
        progress.note(
            f"serving {served.model_id} at {served.url}{SEGMENT} ({lo}..{hi} replicas; "
            f"{HEALTHZ}, {READYZ}); Ctrl-C or `raysegment jobs stop ID` stops it"
        )
        while not stop.wait(timeout=1.0):  # timed: a signal handled in this thread is acted on within 1 s
            pass
        drained = drain(served.handle, spec.drain_timeout_s, hurry)
    finally:
        restore()
        if not drained:  # an error or a KeyboardInterrupt before the drain: the app goes all the same
            undeploy()
    return {
        "url": served.url,
        "endpoint": served.url + SEGMENT,
        "model_id": served.model_id,
        "replicas": list(served.replicas),
        **served.tta,
        "served_s": round(time.time() - started, 1),
        **drained,
    }


def _stop_on_signals(stop: threading.Event, hurry: threading.Event):
    """SIGINT and SIGTERM set `stop`, a second one `hurry` (in the main thread only; elsewhere the caller sets
    them); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(*_: Any) -> None:
        (hurry if stop.is_set() else stop).set()

    saved = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(sig, handler) for sig, handler in saved.items()]
