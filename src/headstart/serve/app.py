"""`headstart serve`: a trained model over HTTP (FastAPI + uvicorn), with a page to try it on.

Decisions:
- The same answer as `headstart predict` for the same file: an upload is decoded by
  `images.load_image` (JPEG draft at the preprocessing's resize size, EXIF, alpha on white,
  MAX_PIXELS), resized and cut by the same decode half of the transform, and normalised and run by
  the engine the same rule picks (pixels.py). One image per request is a batch of one, as `predict` on one file.
- The model and its engine are made and warmed up (the ONNX conversion) once, before the port
  opens: /healthz answers only when a request would be served at full speed.
- One thread runs the engine and head (converted engines compile lazily and count calls: not
  thread-safe), batching together the requests that wait (see Predictor). Decoding runs in
  the threadpool, at most one per core (a decoded image can be MAX_PIXELS x 3 bytes, about
  270 MB), so it overlaps inference. A grayscale upload is decoded and resized as one channel (a
  third of the work, the same pixels as its RGB decoding; images.load_image). Inference threads
  of one intra-op thread each, as extraction's streams, were measured and not kept: with ONNX
  Runtime at concurrency 8 they served 384-395 images/s against 398-411 for one thread.
- The upload limit is an ASGI layer in front of FastAPI: a Content-Length over the limit is
  refused before any byte is read, and a streamed body is counted and refused as soon as it
  passes the limit, so nothing beyond it is ever buffered.
- Multipart files over 1 MB are spooled by Starlette to anonymous temporary files; the form is
  closed when the request ends, on success or error (a test counts open fds and temp files).
- 127.0.0.1 unless told otherwise; `--token` makes every request but /healthz and the page
  itself (static HTML holding no model data; it asks for the token) need `Authorization: Bearer`.
- No CDN: FastAPI's /docs and /redoc (Swagger UI and ReDoc from a CDN) are turned off; the page
  is one file with its CSS and JS inline.
- /openapi.json is the document contract.py writes out (it says why), checked against the live server
  by Schemathesis in the tests. An undeclared method gets 405 with `Allow`; GET routes answer HEAD.
- An ensemble is served through its own `proba_from_features`, from its members' features side by
  side: one averaging for predict, evaluate and the server.
- `POST /explain` goes /predict's way (body forms, decoding, errors, limits, token) and takes its class
  and probability from /predict's own numbers, so the two never disagree (an int8 model's maps come from
  its fp32 backbone: Model.map_engine). The map is `Model.explain`'s (`Ensemble.explain`'s) of that
  class, on the image decoded as /predict decodes it, one image per call on the inference thread: a map
  is as large as the image it is placed on, and predict batches go between two maps. It is answered at
  the image's size as decoded (EXIF applied), at most MAP_SIDE px a side: as a PNG coloured as
  `headstart explain` draws it (heatmaps/overlay.py), transparent where the centre crop cut the image
  away, and/or as numbers. The map engine is converted and warmed up with the other before the port opens.
"""

import asyncio
import base64
import hmac
import io
import ipaddress
import json
import logging
import os
import queue
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from headstart.models.ensemble import Ensemble
from headstart.errors import HeadstartError
from headstart.settings import Runtime
from headstart.data.decoding import decode_side, stack_pixels
from headstart.engines.features import cache_root_of
from headstart.data.images import ImageError, load_image
from headstart.heatmaps.explain import class_index
from headstart.heatmaps.overlay import ALPHA, shown
from headstart.heatmaps.placement import displayed_size
from headstart.quiet import quiet
from headstart.runs.predict import describe_engines
from headstart.serve import contract

log = logging.getLogger(__name__)

MAX_FILES = 64  # per request
MAP_SIDE = 256  # the longest side of a map /explain answers: a thumbnail's overlay, not the photo's
FORMATS = ("png", "array", "both")  # what /explain answers each map as
COLOURS = "jet"  # matplotlib's colour map, as heatmaps/overlay.py draws the overlays of `headstart explain`


@dataclass(frozen=True)
class Viewed:
    """An upload decoded for /explain: what `Predictor.decode` gives (`pixels`), the decoded image the map is
    drawn on, and the image's own (width, height) as decoded in full, EXIF orientation applied."""

    pixels: torch.Tensor | tuple[torch.Tensor, ...]
    image: Image.Image
    size: tuple[int, int]


class Predictor:
    """A loaded model and its warmed-up engine; `decode` and `submit` may be called from any thread.

    One thread runs the network: it takes the oldest waiting request and every other one already
    queued (up to `batch_size` images) as one batch. A lone request is a batch of its own, with no
    wait; under load, requests that arrive while a batch runs go together in the next one. Maps
    (`explain`) are drawn on that thread too, one image at a time, in their turn between batches.
    """

    def __init__(self, model, runtime: Runtime | None = None, **kw):
        rt = Runtime.of(runtime, **kw)  # kw: device, engine, precision, cache_dir, batch_size (older signature)
        self.model = model
        # An ensemble's members each decode, preprocess and run the image their own way, as in predict.
        self._single = not isinstance(model, Ensemble)
        members = [model] if self._single else model.members
        self.batch_size = rt.batch_size
        self._parts = [(m, m.preprocessing.transform(), m.engine(rt.device, rt.engine, rt.precision,
                                                                 cache_root_of(rt.cache_dir))) for m in members]
        self.transform, self.engine = self._parts[0][1], self._parts[0][2]
        self._runtime = rt
        self._sides = [decode_side(t) for _, t, _ in self._parts]
        # The map is drawn on the image as the member that decodes it largest does (None: in full).
        self._map_part = max(range(len(self._sides)), key=lambda k: self._sides[k] or float("inf"))
        self._decoding = threading.BoundedSemaphore(os.cpu_count() or 1)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        blank = Image.new("RGB", (max(m.preprocessing.crop_size for m in members),) * 2)
        self._proba([self._pixels([blank] * len(self._parts))])  # converts the backbones now
        self.model.explain(blank, runtime=rt)  # and the networks the maps are drawn from
        threading.Thread(target=self._batches, name="headstart-inference", daemon=True).start()

    def decode(self, data: bytes) -> torch.Tensor:
        """(3, crop, crop) uint8 from an image file's bytes, (1, crop, crop) for a grayscale one (resized as one
        channel, as extraction does: a third of the work, the same pixels), a tuple of them for an ensemble
        (one per member, each decoded as predict decodes it for that member); raises ImageError saying why not."""
        with self._decoding:
            return self._pixels(self._images(data))

    def decode_for_map(self, data: bytes) -> Viewed:
        """As `decode`, with what `explain` needs too, from the same decoding."""
        with self._decoding:
            images = self._images(data)
            with quiet():  # the header again (load_image read it): Pillow's notes on odd EXIF are not news
                size = displayed_size(io.BytesIO(data))
            return Viewed(self._pixels(images), images[self._map_part], size)

    def _images(self, data: bytes) -> list[Image.Image]:
        """The image decoded for each part, as predict decodes it (draft size, EXIF, gray kept as one channel)."""
        by_side = {side: load_image(data, side, gray=True) for side in dict.fromkeys(self._sides)}
        return [by_side[side] for side in self._sides]

    def _pixels(self, images: list[Image.Image]):
        out = tuple(t.decode(im) for (_, t, _), im in zip(self._parts, images))
        return out[0] if self._single else out

    def submit(self, images: list[torch.Tensor]) -> Future:
        """A future of the (n, n_classes) probabilities of decoded images."""
        future: Future = Future()
        self._queue.put((images, future))
        return future

    def explain(self, viewed: Viewed, class_: str) -> Future:
        """A future of (map, method): the model's map of `class_` over a decoded upload, (height, width) float32 at
        `map_size(viewed.size)`, NaN where the centre crop cut the image away; drawn on the inference thread."""
        def work():
            (e,) = self.model.explain([viewed.image], class_=class_, runtime=self._runtime)
            if not e.ok:  # the image decode_for_map gave back: it was decoded once already
                raise RuntimeError(f"explaining a decoded image failed: {e.error}")
            return resized(e.map, map_size(viewed.size)), e.method

        future: Future = Future()
        self._queue.put((work, future))
        return future

    def stats(self) -> dict:
        return {"images": self.engine.n_images, "batches": self.engine.n_batches}

    @property
    def choices(self) -> list:
        """The EngineChoice of each part: the model's, or each ensemble member's."""
        return [engine.choice for _, _, engine in self._parts]

    def _proba(self, images: list) -> np.ndarray:
        feats = []
        for k, (model, _, engine) in enumerate(self._parts):  # one part, or an ensemble's members
            batch = stack_pixels([im if self._single else im[k] for im in images])  # (n, 3 or 1, crop, crop) uint8
            feats.append(np.concatenate([model.batch_features(engine, batch[i:i + self.batch_size])  # every view
                                         for i in range(0, len(batch), self.batch_size)]))
        # The members' features side by side, as Ensemble.features gives them: the model's own
        # proba_from_features averages an ensemble, the one averaging predict and evaluate use too.
        return self.model.proba_from_features(np.concatenate(feats, axis=1))  # (n, n_classes)

    def _batches(self) -> None:
        held = None  # work (a map) taken from the queue while a batch was being gathered: it goes next
        while True:
            job, held = held or self._queue.get(), None
            if callable(job[0]):
                self._work(*job)
                continue
            jobs, n = [job], len(job[0])
            while n < self.batch_size:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if callable(job[0]):
                    held = job
                    break
                jobs.append(job)
                n += len(job[0])
            try:
                proba = self._proba([im for images, _ in jobs for im in images])
            except Exception as exc:  # noqa: BLE001 - handed to the requests, which answer 500
                for _, future in jobs:
                    future.set_exception(exc)
                continue
            start = 0
            for images, future in jobs:
                future.set_result(proba[start:start + len(images)])
                start += len(images)

    @staticmethod
    def _work(work, future: Future) -> None:
        try:
            future.set_result(work())
        except Exception as exc:  # noqa: BLE001 - handed to the request, which answers 500
            future.set_exception(exc)


def map_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the map /explain answers for an image of `size`: the same, or at most MAP_SIDE a side."""
    width, height = size
    scale = min(1.0, MAP_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resized(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The (height, width) map at `size` (width, height), resampled bilinearly (averaging when it shrinks); a
    pixel that takes from beyond the crop's edge stays NaN."""
    if heatmap.shape == (size[1], size[0]):
        return heatmap.astype(np.float32, copy=False)
    return np.asarray(Image.fromarray(heatmap.astype(np.float32)).resize(size, Image.BILINEAR))


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """The map as an RGBA PNG to lay over its image: coloured as heatmaps/overlay.py draws it (the positive
    part, scaled to its maximum) at ALPHA opacity, transparent where the model did not see the image."""
    from matplotlib import colormaps

    values = shown(heatmap)  # 0 to 1, NaN kept
    rgba = colormaps[COLOURS](np.nan_to_num(values), bytes=True)  # (h, w, 4) uint8
    rgba[..., 3] = np.where(np.isnan(values), 0, round(ALPHA * 255))
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return out.getvalue()


def heatmap_rows(heatmap: np.ndarray) -> list[list[float | None]]:
    """The map as JSON rows: its values to 5 significant digits of its largest magnitude (a 256 px map is
    about 0.6 MB so, 1.3 MB with float32's full digits), null where it is NaN."""
    finite = np.abs(heatmap[np.isfinite(heatmap)])
    top = float(finite.max()) if finite.size else 0.0
    decimals = 4 - int(np.floor(np.log10(top))) if top > 0 else 0
    rows = np.round(heatmap.astype(np.float64), decimals).tolist()
    return [[None if v != v else v for v in row] for row in rows]  # v != v: NaN


def model_info(model, engine_choice, source: Path) -> dict:
    """What GET /model answers: classes, backbone, input, engine, and the run's test metrics if a run.

    `engine_choice`: the EngineChoice that computes the numbers, or one per ensemble member (Predictor.choices).
    """
    choices = engine_choice if isinstance(engine_choice, (list, tuple)) else [engine_choice]
    if isinstance(model, Ensemble):
        members = model.members
        choices = choices * len(members) if len(choices) == 1 else choices
        engine = {**describe_engines(choices), "reason": "; ".join(dict.fromkeys(c.reason for c in choices))}
        info = {"source": source.resolve().name, "backbone": " + ".join(m.entry.name for m in members),
                "strategy": model.strategy, "tta": model.tta, "classes": list(model.classes),
                "image_size": "/".join(str(m.preprocessing.crop_size) for m in members),
                "members": [{"name": model.name(i), "backbone": m.entry.name, "strategy": m.strategy, "tta": m.tta,
                             "image_size": m.preprocessing.crop_size, "preprocessing": m.preprocessing.to_dict(),
                             "engine": c.to_dict()} for i, (m, c) in enumerate(zip(members, choices))],
                "engine": engine, "metrics": None}
    else:
        info = {"source": source.resolve().name, "backbone": model.entry.name, "strategy": model.strategy,
                "tta": model.tta, "classes": list(model.classes), "image_size": model.preprocessing.crop_size,
                "preprocessing": model.preprocessing.to_dict(), "engine": choices[0].to_dict(), "metrics": None}
    try:
        metrics = json.loads((source / "metrics.json").read_text(encoding="utf-8"))
        test = metrics.get("test") or {}
        info["metrics"] = {"val_accuracy": metrics.get("val_accuracy"),
                           "test": {k: test[k] for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                                         "top_k_accuracy", "n_images") if k in test}}
    except (OSError, ValueError, AttributeError):
        pass  # a bare bundle has no metrics
    return info


def info_name(model) -> str:
    return model.describe() if isinstance(model, Ensemble) else model.entry.name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_note(host: str, port: int, token: str | None) -> str | None:
    """What to tell the user when the server is reachable from other machines; None on loopback."""
    if is_loopback(host):
        return None
    return (f"headstart serve: listening on {host}:{port}, reachable from the network: anyone who can reach this "
            "machine can use the model" + (" with the token." if token else
                                           "; add --token to require `Authorization: Bearer <token>`."))


class ApiError(Exception):
    def __init__(self, status: int, message: str, files: list[dict] | None = None):
        super().__init__(message)
        self.status, self.message, self.files = status, message, files


class BodyTooLarge(Exception):
    pass


def _status_of(reason: str) -> int:
    if reason.startswith("not an image"):
        return 415
    return 400 if reason.startswith("empty file") else 422  # truncated, corrupt, too many pixels


class Guard:
    """ASGI layer in front of the app: the bearer token, then the upload limit (see the module docstring)."""

    OPEN_PATHS = ("/healthz", "/")

    def __init__(self, app, *, max_bytes: int, token: str | None = None):
        self.app, self.max_bytes, self.token = app, max_bytes, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"] not in self.OPEN_PATHS:
            if not hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.token}".encode()):
                return await _send_json(send, 401, {"error": "missing or wrong token: send the header "
                                                             "`Authorization: Bearer <token>`"},
                                        [(b"www-authenticate", b"Bearer")])
        limit_mb = f"{self.max_bytes / 2**20:g} MB"
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await _send_json(send, 400, {"error": "the Content-Length header is not a number"})
        if length > self.max_bytes:
            return await _send_json(send, 413, {"error": f"request body of {length:,} bytes is over the server's "
                                                         f"limit of {limit_mb} (--max-upload-mb)"})
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"request body is over the server's limit of {limit_mb} (--max-upload-mb)")
            return message

        await self.app(scope, counted, send)


async def _send_json(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def create_app(predictor: Predictor, info: dict, *, default_top_k: int = 3, secured: bool = False,
               max_upload_mb: float | None = None):
    """The FastAPI app; `secured` and `max_upload_mb` say what the Guard in front of it enforces (--token,
    --max-upload-mb), for the OpenAPI document."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from headstart._version import __version__

    app = FastAPI(title="headstart", version=__version__, docs_url=None, redoc_url=None)  # both: JS from a CDN
    page = resources.files("headstart.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    classes = predictor.model.classes
    document = contract.document(title=app.title, version=app.version, classes=list(classes),
                                 default_top_k=default_top_k, max_files=MAX_FILES, max_upload_mb=max_upload_mb,
                                 secured=secured, map_side=MAP_SIDE)
    app.openapi = lambda: document  # what /openapi.json answers (contract.py says why it is written out)

    def error(status: int, message: str, **extra) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, exc.message, **({"files": exc.files} if exc.files else {}))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, exc: BodyTooLarge):
        return error(413, str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):  # 404, and 405 with its Allow header (RFC 9110)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # the traceback goes to the log; the client gets JSON
        return error(500, f"internal error ({type(exc).__name__}); the server's log has the details")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error(400, "; ".join(f"{' '.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    # HEAD with every GET (RFC 9110: a general-purpose server supports both; uvicorn leaves the body out).
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index():
        return page

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        return {"status": "ok"}

    @app.api_route("/model", methods=["GET", "HEAD"])
    async def model():
        return {**info, "top_k": default_top_k, "served": predictor.stats()}

    @app.post("/predict")
    async def predict(request: Request, top_k: int = default_top_k, name: str = "body"):
        if top_k < 1:
            raise ApiError(400, f"query top_k: must be at least 1, not {top_k}")
        uploads = await _uploads(request, name)
        k = min(top_k, len(classes))  # more than the model has: all of them, as `headstart predict`
        decoded = await _decoded(uploads, predictor.decode)
        proba = await asyncio.wrap_future(predictor.submit(decoded))
        results = []
        for (filename, _), p in zip(uploads, proba):
            order = np.argsort(-p, kind="stable")[:k]
            results.append({"name": filename,
                            "predictions": [{"class": classes[j], "probability": float(p[j])} for j in order]})
        return {"results": results}

    @app.post("/explain")
    async def explain(request: Request, class_: str | None = Query(None, alias="class"), format: str = "png",
                      name: str = "body"):
        if format not in FORMATS:
            raise ApiError(400, f"query format: one of {', '.join(FORMATS)}, not {format!r}")
        try:
            wanted = class_index(classes, class_)
        except HeadstartError as exc:
            raise ApiError(400, f"query class: {exc}") from None
        uploads = await _uploads(request, name)
        viewed = await _decoded(uploads, predictor.decode_for_map)
        # The class and its probability are /predict's own numbers for these images (module docstring).
        proba = await asyncio.wrap_future(predictor.submit([v.pixels for v in viewed]))
        predicted = np.argmax(proba, axis=1)  # the first of equals, as /predict's stable sort
        targets = predicted if wanted is None else np.full(len(viewed), wanted)
        maps = await asyncio.gather(*(asyncio.wrap_future(predictor.explain(v, classes[t]))
                                      for v, t in zip(viewed, targets)))

        def answer() -> dict:
            results = []
            for (filename, _), v, p, t, j, (heatmap, method) in zip(uploads, viewed, proba, targets, predicted, maps):
                result = {"name": filename, "class": classes[t], "probability": float(p[t]),
                          "predicted": {"class": classes[j], "probability": float(p[j])}, "method": method,
                          "width": heatmap.shape[1], "height": heatmap.shape[0],
                          "image_width": v.size[0], "image_height": v.size[1]}
                if format in ("png", "both"):
                    result["png"] = base64.b64encode(heatmap_png(heatmap)).decode("ascii")
                if format in ("array", "both"):
                    result["map"] = heatmap_rows(heatmap)
                results.append(result)
            return {"results": results}

        # Straight to JSON: FastAPI's encoder would walk each of a map's numbers in Python first.
        return JSONResponse(await run_in_threadpool(answer))

    async def _decoded(uploads: list[tuple[str, bytes]], decode) -> list:
        """Each upload through `decode`, in the threadpool; an ApiError naming every file that cannot be used,
        with the first one's status."""
        decoded, failed = [], []
        for filename, data in uploads:
            try:
                decoded.append(await run_in_threadpool(decode, data))
            except ImageError as exc:
                failed.append({"name": filename, "error": str(exc), "status": _status_of(str(exc))})
        if failed:
            first = failed[0]
            raise ApiError(first["status"], f"{first['name']}: {first['error']}", failed)
        return decoded

    async def _uploads(request: Request, name: str) -> list[tuple[str, bytes]]:
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await request.form(max_files=MAX_FILES)
                try:
                    uploads = [(v.filename or key, await v.read()) for key, v in form.multi_items()
                               if isinstance(v, UploadFile)]
                finally:
                    await form.close()
            else:
                body = await request.body()
                uploads = [(name, body)] if body else []
        except ClientDisconnect:
            raise ApiError(400, "the client went away before the whole request was sent") from None
        if not uploads:
            raise ApiError(400, "no file: send images as multipart form files (curl -F file=@shoe.png "
                                f"...{request.url.path}) or one image as the request body")
        return uploads

    return app


def serve(path, *, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 20.0, token: str | None = None,
          top_k: int = 3, runtime: Runtime | None = None, log_level: str = "info", **kw) -> int:
    """Load the model and its engine, then serve until SIGTERM or Ctrl-C (in-flight requests finish first).

    `runtime` (or its fields as keywords: device, engine, precision, cache_dir, batch_size) runs the backbone.
    """
    runtime = Runtime.of(runtime, **kw)
    try:
        import fastapi, python_multipart, uvicorn  # noqa: F401,E401 - the serve extra
    except ImportError:
        raise HeadstartError("headstart serve needs FastAPI and uvicorn: pip install 'headstart[serve]'.") from None
    from headstart.models.bundle import load

    if not max_upload_mb > 0:
        raise HeadstartError(f"--max-upload-mb must be a positive number of MB, not {max_upload_mb}.")
    if top_k < 1:
        raise HeadstartError(f"--top-k must be at least 1 (classes per image), not {top_k}.")
    source = Path(path).expanduser()
    model = load(source)
    predictor = Predictor(model, runtime)
    app = create_app(predictor, model_info(model, predictor.choices, source), default_top_k=top_k,
                     secured=bool(token), max_upload_mb=max_upload_mb)
    note = exposure_note(host, port, token)
    if note:
        print(note, file=sys.stderr, flush=True)
    engine = describe_engines(predictor.choices)
    print(f"headstart serve: {source} ({info_name(model)}, {len(model.classes)} classes, "
          f"{engine['engine']} {engine['precision']}) on http://{host}:{port}/",
          file=sys.stderr, flush=True)
    run_server(Guard(app, max_bytes=int(max_upload_mb * 2**20), token=token), host=host, port=port,
               log_level=log_level)
    return 0


def run_server(app, *, host: str, port: int, log_level: str) -> None:
    import signal

    import uvicorn

    # uvicorn handles SIGTERM and SIGINT: stop accepting, finish in-flight requests, then raise
    # the signal again under the handler found before it started (its run() swallows the
    # KeyboardInterrupt that gives for SIGINT). SIGTERM is the normal way to stop a service
    # (systemd, docker stop): under a do-nothing handler it exits 0 too, instead of dying by it.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
    except SystemExit as exc:  # uvicorn's way of saying it could not listen; its log says why
        if exc.code:
            raise HeadstartError(f"cannot listen on {host}:{port} (the reason is logged above): another "
                                 "program may use the port; choose another with --port.") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
