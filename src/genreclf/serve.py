"""`genreclf serve`: an HTTP service that tags uploaded audio, and a page to try it in a browser.

The model is loaded once. Uploads are streamed to a temporary folder (bytes counted against the cap
as they come) and decoded in long-lived worker processes (pool.py's workers running predict's
per-file decoder), each sending the log-mel features of its upload's 30-s windows as they are
ready. One engine thread owns the workers' pipes and the model: after each look at the pipes it
scores every window that has arrived, from all uploads in flight, in one batch (predict's batcher),
so concurrent requests share the model's batches while the workers keep decoding. A worker that
dies costs its upload a 500; one that sends nothing for `timeout` seconds is killed and its upload
gets a 504; a fresh worker takes its place, and the server goes on. The event loop only streams
uploads and awaits results.
"""

import asyncio
import contextlib
import itertools
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from importlib.resources import files
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch

from genreclf.audio import AUDIO_EXTENSIONS, N_FRAMES, SAMPLE_RATE
from genreclf.errors import GenreclfError
from genreclf.models import config_to_dict
from genreclf.pool import _READY, CLIP_TIMEOUT, Pool, default_workers
from genreclf.predict import WINDOWS_PER_BATCH, Prediction, Tagger, _Batcher
from genreclf.windows import decode_file

log = logging.getLogger(__name__)

TIMELINE_STEP = 10.0  # seconds per timeline segment in every answer
TOP = 5  # genres listed per answer and per timeline segment
MULTIPART_SLACK = 64 * 1024  # bytes of multipart headers and other fields allowed beyond the upload cap


@dataclass(frozen=True)
class ServeConfig:
    """How `genreclf serve` runs; the CLI's defaults come from here."""

    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000
    max_upload_mb: float = 50.0  # larger uploads get 413, without being read whole
    workers: int | None = None  # decoder processes (None: one per core)
    api_key: str | None = None  # when set, /v1/* needs it (X-API-Key or Authorization: Bearer)
    timeout: float = CLIP_TIMEOUT  # seconds a decoder may go without a window before it counts as hung
    max_queue: int = 256  # uploads waiting for a decoder; more get 503
    consistent: bool = False  # hierarchy-consistent probabilities (Tagger's consistent), for a model given by path


@dataclass
class Outcome:
    """What became of one upload: its prediction, its decoded length, and the HTTP status to answer with."""

    prediction: Prediction
    seconds: float
    status: int = 200


@dataclass
class _Upload:
    path: str
    name: str  # the client's file name, for messages only
    future: Future
    samples: int = 0  # decoded so far (16 kHz)
    status: int = 0  # set when the engine fails it (crash, hang)


@dataclass
class _Stats:
    batches: int = 0  # model calls over windows
    windows: int = 0  # windows scored
    largest: int = 0  # most windows in one batch
    done: int = 0  # uploads answered

    def scored(self, n: int) -> None:
        if n:
            self.batches, self.windows, self.largest = self.batches + 1, self.windows + n, max(self.largest, n)


def _status_of(error: str) -> int:
    """The HTTP status of a decoder's error message: too short 422, a decoder bug 500, not audio 415."""
    if "too short" in error:
        return 422
    if ": unexpected " in error:
        return 500
    return 415


class Engine:
    """Decoder processes and the model: `submit(path, name)` returns a Future of the upload's Outcome."""

    def __init__(
        self,
        tagger: Tagger,
        workers: int | None = None,
        timeout: float = CLIP_TIMEOUT,
        max_queue: int = ServeConfig.max_queue,
        work=decode_file,  # the workers' job (a test swaps in one that crashes or hangs on cue)
    ):
        self.tagger, self.timeout, self.max_queue, self.work = tagger, timeout, max_queue, work
        self.n_workers = default_workers() if workers is None else max(1, workers)
        self.uploads: dict[int, _Upload] = {}
        self.waiting: deque[int] = deque()  # uploads not yet sent to a worker
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self.stats = _Stats()
        self.ready_workers = 0
        self.stopping = False
        self.any_ready = False
        self.deaths = 0  # workers that died before any became ready: a broken setup, not a file
        threads = max(1, torch.get_num_threads() - self.n_workers) if tagger.device.type == "cpu" else None
        self.batcher = _Batcher(tagger, WINDOWS_PER_BATCH, threads, TIMELINE_STEP)
        self.ended: dict[int, tuple[str, float]] = {}  # uploads whose last windows wait in the batch
        self.wake_r, self.wake_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="genreclf-engine", daemon=True)

    def start(self) -> None:
        """Start the decoder processes and the engine thread."""
        self.thread.start()

    def alive(self) -> bool:
        """Return True while the engine thread runs."""
        return self.thread.is_alive()

    def submit(self, path: str | Path, name: str) -> Future:
        """Queue the audio file at `path` (shown as `name` in messages); return a Future of its Outcome."""
        future: Future = Future()
        with self.lock:
            if not self.alive() or self.stopping:
                raise GenreclfError("the service is shutting down")
            if len(self.waiting) >= self.max_queue:
                future.set_result(self._refused(name))
                return future
            i = next(self.ids)
            self.uploads[i] = _Upload(str(path), name, future)
            self.waiting.append(i)
        os.write(self.wake_w, b".")
        return future

    def _refused(self, name: str) -> Outcome:
        nan = np.full(len(self.tagger.genres), np.nan)
        error = f"{name}: the server is busy ({self.max_queue} uploads waiting); try again shortly"
        return Outcome(Prediction(name, self.tagger.genres, nan, error=error), 0.0, 503)

    def counts(self) -> dict:
        """Return the engine's counters: workers ready, uploads waiting and in flight, batches scored."""
        with self.lock:
            waiting, in_flight = len(self.waiting), len(self.uploads) - len(self.waiting)
        s = self.stats
        mean = s.windows / s.batches if s.batches else 0.0
        return {
            "workers": self.n_workers,
            "workers_ready": self.ready_workers,
            "waiting": waiting,
            "in_flight": in_flight,
            "answered": s.done,
            "batches": s.batches,
            "windows_scored": s.windows,
            "windows_per_batch": round(mean, 2),
            "largest_batch": s.largest,
        }

    def close(self) -> None:
        """Stop the engine and its workers; uploads still in flight get a 503."""
        self.stopping = True
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b".")
        if self.thread.is_alive():
            self.thread.join(15)
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        pool = None
        try:
            pool = Pool(self.n_workers, self.work, None)
            while not self.stopping:
                self._step(pool)
        except Exception:  # a bug here must not leave requests waiting forever
            log.exception("the serving engine stopped")
        finally:
            if pool is not None:
                pool.close()
            with self.lock:
                left, self.waiting = list(self.uploads), deque()
            for i in left:
                self._answer(i, "the service stopped before this upload was tagged", 0.0, 503)

    def _step(self, pool: Pool) -> None:
        """Feed idle workers, wait for messages (or a hang's deadline), score what arrived."""
        now = time.monotonic()
        for worker in pool.workers:
            if worker.ready and not worker.jobs:
                with self.lock:
                    i = self.waiting.popleft() if self.waiting else None
                if i is None:
                    break
                job = (i, self.uploads[i].path, TIMELINE_STEP, self.tagger.crop or N_FRAMES)
                worker.jobs.append((i, job))
                worker.since = now
                with contextlib.suppress(OSError):  # it died since we last looked: its sentinel says so below
                    worker.conn.send([(i, job)])
        waits = [w.since + self.timeout - now for w in pool.workers if w.ready and w.jobs]
        handles = {w.conn: w for w in pool.workers} | {w.process.sentinel: w for w in pool.workers}
        ready = wait([*handles, self.wake_r], timeout=max(0.0, min(waits)) if waits else None)
        if self.wake_r in ready:
            os.read(self.wake_r, 4096)
        for handle in ready:
            worker = handles.get(handle)
            if worker is None or worker not in pool.workers:  # the wake-up pipe, or replaced this round
                continue
            try:
                while worker.conn.poll():
                    message = worker.conn.recv()
                    if message == _READY:
                        worker.ready, worker.since = True, time.monotonic()
                        self.ready_workers += 1
                        self.any_ready = True
                        continue
                    _, items, done = message
                    worker.since = time.monotonic()
                    if done:
                        worker.jobs.popleft()
                    for item in items:
                        self._item(item)
            except (EOFError, OSError):
                pass
            if not worker.process.is_alive():
                self._lose(pool, worker, "the decoder crashed (its process died); the file is probably corrupt", 500)
        now = time.monotonic()
        for worker in list(pool.workers):
            if worker.ready and worker.jobs and now - worker.since > self.timeout:
                self._lose(pool, worker, f"the decoder timed out (no result after {self.timeout:g} s)", 504)
        self._flush()

    def _lose(self, pool, worker, reason: str, status: int) -> None:
        """Fail the upload `worker` was on and put a fresh worker in its place."""
        self.ready_workers -= worker.ready
        if not worker.ready and not self.any_ready:
            self.deaths += 1
            if self.deaths >= 3:
                raise GenreclfError(f"decoder processes died {self.deaths} times while starting; check memory")
        if worker.jobs:
            i = worker.jobs.popleft()[0]
            log.warning("%s: %s", self.uploads[i].name, reason)
            self.uploads[i].status = status
            self._end(i, f"{self.uploads[i].path}: {reason}", 0.0)
        pool.replace(worker)

    def _item(self, item: tuple) -> None:
        i, kind = item[0], item[1]
        if i not in self.uploads or self.uploads[i].status:  # failed already (its worker was lost)
            return
        if kind == "window":
            _, _, features, samples, silent = item
            self.uploads[i].samples += samples
            queued = len(self.batcher.owners)
            if self.batcher.add(i, features, samples, silent):
                self.stats.scored(queued + 1)
                self._finish_ended()
        else:
            _, _, error, level, details = item
            if details:
                log.debug("%s: the decoders said: %s", self.uploads[i].name, details)
            self._end(i, error, level)

    def _end(self, i: int, error: str, level: float) -> None:
        if self.batcher.pending(i):  # answered once its last windows are scored
            self.ended[i] = (error, level)
        else:
            self._answer(i, error, level)

    def _flush(self) -> None:
        self.stats.scored(len(self.batcher.owners))
        self.batcher.flush()
        self._finish_ended()

    def _finish_ended(self) -> None:
        for i in list(self.ended):
            if not self.batcher.pending(i):
                self._answer(i, *self.ended.pop(i))

    def _answer(self, i: int, error: str, level: float, status: int | None = None) -> None:
        with self.lock:
            upload = self.uploads.pop(i)
        error = error.replace(upload.path, upload.name)  # the server's temporary path is nobody's business
        prediction = self.tagger._ended(upload.name, self.batcher, i, error, level)
        status = status or upload.status or (_status_of(error) if error else 200)
        self.stats.done += 1
        if not upload.future.done():
            upload.future.set_result(Outcome(prediction, upload.samples / SAMPLE_RATE, status))


# --- answers -----------------------------------------------------------------------------------


def _round(p: float) -> float | None:
    return None if np.isnan(p) else round(float(p), 4)


def prediction_record(outcome: Outcome, tagger: Tagger) -> dict:
    """Return the JSON answer of a tagged upload."""
    p = outcome.prediction
    thresholds = tagger.decision.thresholds is not None
    record = {
        "file": p.source,
        "duration": round(outcome.seconds, 3),
        "genres": [{"genre": g, "probability": round(v, 4)} for g, v in p.top(TOP)],
        "chosen": p.chosen() if thresholds else None,
        "probabilities": {g: _round(v) for g, v in zip(p.genres, p.probabilities)},
    }
    if p.warning:
        record["warning"] = p.warning
    if p.timeline is not None:
        record["timeline"] = p.timeline.record(p.genres, TOP)
    return record


def model_record(tagger: Tagger) -> dict:
    """Return the JSON description of the served model: architecture, size, training provenance, decisions."""
    f = tagger.file
    return {
        "architecture": config_to_dict(f.config)["kind"],
        "config": config_to_dict(f.config),
        "parameters": sum(p.numel() for p in tagger.model.parameters()),
        "genres": len(f.genres),
        "has_thresholds": f.thresholds is not None,
        "has_genre_tree": bool(f.genre_parents),
        "consistent": tagger.consistent,
        "signal": f.signal.to_dict(),
        "provenance": f.provenance,
        "timeline_step": TIMELINE_STEP,
    }


def genres_record(tagger: Tagger) -> dict:
    """Return the model's genres with their FMA ids, parents and decision thresholds."""
    f = tagger.file
    values = (f.thresholds or {}).get("values") or [None] * len(f.genres)
    parents = f.genre_parents or [None] * len(f.genres)
    return {
        "genres": [
            {"genre": g, "id": int(i), "parent": (int(p) or None) if p is not None else None, "threshold": t}
            for g, i, p, t in zip(f.genres, f.genre_ids, parents, values)
        ]
    }


# --- uploads -----------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 200: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_SAFE_NAME = re.compile(r"[^\w .,()+&'-]")


def display_name(filename: str) -> str:
    """Return a client's file name fit to appear in a message: its last part, printable, at most 80 characters."""
    name = re.split(r"[/\\]", filename)[-1]
    name = _SAFE_NAME.sub("_", name).strip()[:80]
    return name or "upload"


class UploadParser:
    """A streaming multipart/form-data parser that writes the field `file` to `folder`, counting its bytes.

    The file is always `folder`/upload plus its name's suffix if that is an audio extension: nothing
    else from the request becomes part of a path.
    """

    def __init__(self, boundary: bytes, folder: Path, limit: int):
        from python_multipart.multipart import MultipartParser

        self.folder, self.limit = folder, limit
        self.path: Path | None = None
        self.name = "upload"
        self.size = 0
        self.complete = False  # the file part ended
        self._file = None
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: setattr(self, "_field", self._field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def write(self, chunk: bytes) -> None:
        """Parse the next piece of the body; ApiError 413 once the file passes the cap, 422 if malformed."""
        from python_multipart.multipart import MultipartParseError

        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            raise ApiError(422, f"malformed multipart/form-data body ({str(e).splitlines()[0][:80]})") from None

    def close(self) -> None:
        """Close the file being written, if any."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") != b"file" or self.path is not None:
            return
        self.name = display_name(options.get(b"filename", b"upload").decode("utf-8", "replace"))
        suffix = os.path.splitext(self.name)[1].lower()
        self.path = self.folder / ("upload" + (suffix if suffix in AUDIO_EXTENSIONS else ""))
        self._file = open(self.path, "xb")  # noqa: SIM115 (closed in _part_end or close)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is None:
            return
        self.size += end - start
        if self.size > self.limit:
            raise ApiError(413, f"the upload is over the {_megabytes(self.limit)} limit")
        self._file.write(data[start:end])

    def _part_end(self) -> None:
        if self._file is not None:
            self.close()
            self.complete = True


def _megabytes(n: int) -> str:
    return f"{n / 1e6:g} MB"


# --- the app -----------------------------------------------------------------------------------


def create_app(
    model: str | Path | Tagger,
    config: ServeConfig = ServeConfig(),
    upload_root: str | Path | None = None,
    work=decode_file,
):
    """Return the FastAPI app serving `model` (a model file, run folder or Tagger); start it with uvicorn.

    Uploads go to temporary folders under `upload_root` (None: the system's). `work`: see Engine.
    """
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from python_multipart.multipart import parse_options_header
    from starlette.exceptions import HTTPException

    tagger = model if isinstance(model, Tagger) else Tagger.load(model, consistent=config.consistent)
    limit = int(config.max_upload_mb * 1e6)
    engine = Engine(tagger, config.workers, config.timeout, config.max_queue, work)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(
        title="genreclf",
        summary="Multi-label music genre tagging of uploaded audio",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"error": str(e)}, e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, 422)

    async def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not given and scheme.lower() == "bearer":
            given = token.strip()
        if not given or not secrets.compare_digest(given.encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send it as the X-API-Key header or Authorization: Bearer")

    keyed = [Depends(check_key)]
    upload_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                }
            },
        }
    }

    @app.post("/v1/predict", dependencies=keyed, openapi_extra=upload_body)
    async def predict(request: Request) -> dict:
        """Tag one audio file (multipart field `file`): top genres, all probabilities, chosen genres, timeline."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit + MULTIPART_SLACK:
            raise ApiError(413, f"the upload is over the {_megabytes(limit)} limit")
        kind, options = parse_options_header(request.headers.get("content-type", ""))
        if kind != b"multipart/form-data" or not options.get(b"boundary"):
            raise ApiError(422, "send the audio as the multipart/form-data field 'file'")
        folder = Path(tempfile.mkdtemp(prefix="genreclf-serve-", dir=upload_root))
        parser = UploadParser(options[b"boundary"], folder, limit)
        try:
            total = 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit + MULTIPART_SLACK:  # the body beside the file (no Content-Length, other fields)
                    raise ApiError(413, f"the upload is over the {_megabytes(limit)} limit")
                parser.write(chunk)
            parser.close()
            if parser.path is None or not parser.complete:
                raise ApiError(422, "missing the multipart/form-data field 'file' (the audio file)")
            if parser.size == 0:
                raise ApiError(400, f"{parser.name}: empty upload")
            try:
                outcome = await asyncio.wrap_future(engine.submit(parser.path, parser.name))
            except GenreclfError as e:
                raise ApiError(503, str(e)) from None
            if outcome.status != 200:
                raise ApiError(outcome.status, outcome.prediction.error.splitlines()[0])
            return prediction_record(outcome, tagger)
        finally:
            parser.close()
            shutil.rmtree(folder, ignore_errors=True)

    @app.get("/v1/genres", dependencies=keyed)
    async def genres() -> dict:
        """The model's genres: name, FMA id, parent id, decision threshold."""
        return genres_record(tagger)

    @app.get("/v1/model", dependencies=keyed)
    async def model_info() -> dict:
        """The served model: architecture and config, parameter count, training provenance, thresholds."""
        return model_record(tagger)

    @app.get("/healthz")
    async def healthz():
        """Open without a key: 200 while the engine runs (with its counters), else 503."""
        if not engine.alive():
            return JSONResponse({"status": "stopped"}, 503)
        return {"status": "ok", **engine.counts()}

    page = (files("genreclf") / "assets" / "serve_page.html").read_text(encoding="utf-8")
    page = page.replace("__NEEDS_KEY__", "true" if config.api_key else "false")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_POLICY})

    return app


# The page needs nothing from elsewhere: inline style and script only, requests to this server only.
_PAGE_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _version() -> str:
    from genreclf import __version__

    return __version__


def serve(model: str | Path, config: ServeConfig = ServeConfig()) -> None:
    """Load `model` and serve it with uvicorn on config.host:config.port until interrupted."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise GenreclfError(f'`genreclf serve` needs {e.name}: pip install "genreclf[serve]"') from None
    app = create_app(model, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", access_log=False)
