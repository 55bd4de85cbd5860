"""The local web app: a FastAPI JSON API over one loaded model, plus a static page that uses it.

``create_app(model, tokenizer)`` takes an already-loaded model (tests pass the session
fixture; ``factedit serve`` loads one). Long work (traces, edits, reverts, uploads,
model switches) is queued on the single-worker :class:`~factedit.web.jobs.JobQueue` and
answered ``202`` with a job to poll (``POST /api/jobs/{id}/cancel`` stops it); quick reads answer
directly, ``/api/info`` and ``/api/health`` from the event loop without touching the model, and
predictions through a bounded, batching queue (:mod:`factedit.web.predictions`).

Limits (:class:`~factedit.web.limits.WebLimits`, ``docs/web.md``): a job whose estimated cost is
above the limit is refused before it is queued (422, with the estimate and the limit); the
queue, the patch stack (count and bytes of replaced weights), the upload bytes in flight and the
pending predictions are capped (429/409/503 with ``Retry-After`` where waiting helps); a request
body must arrive within the body timeout (408). Connection-level limits (header timeout,
connection cap, malformed HTTP as JSON) are the server's: :mod:`factedit.web.server`.

Security posture (a local tool that rewrites model weights): bound to 127.0.0.1 by the
``serve`` command; ``Host`` must be one of the allowed names (loopback names, the bound
address and any ``--allowed-host``: DNS rebinding); a browser ``Origin``, when sent, must be
the request's own ``scheme://host:port`` (cross-site posts), whatever the allowed hosts;
JSON endpoints only accept ``application/json``; bodies are size-limited before they are
parsed; request models are strict; no field is a server path (models are registry names,
patches are uploaded bytes, downloads are addressed by patch id); every failure is a 4xx
JSON ``detail`` and is raised before anything touches the model. Every response carries
``X-Frame-Options: DENY``, a same-origin ``Content-Security-Policy`` (``frame-ancestors
'none'``) and ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path as FsPath
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, HTTPException, Path, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.requests import EditRequest
from factedit.errors import FactEditError
from factedit.models.registry import DEFAULT_MODEL, REGISTRY
from factedit.version import __version__
from factedit.web.edits import edit_method
from factedit.web.jobs import JobQueue, NotCancellable, QueueFull
from factedit.web.limits import ByteBudget, CostTooHigh, WebLimits, edit_cost, edit_shape, trace_cost
from factedit.web.patches import Conflict, summarize_patch
from factedit.web.predictions import PredictionsFull, Predictor
from factedit.web.schemas import EditIn, ModelIn, PredictIn, TraceIn
from factedit.web.session import Busy, ModelSession, fill_prompt, installed_models

log = logging.getLogger(__name__)

MAX_BODY_BYTES = WebLimits.max_body_bytes  # JSON requests: prompts and a few settings
MAX_UPLOAD_BYTES = WebLimits.max_upload_bytes  # patch files (a dense MEMIT patch of a small model: MBs per layer)
MAX_TRACE_TOKENS = 64
RESERVATION = "factedit.body_bytes"  # scope key: the guard's reservation of upload-memory bytes for this body
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # the page is one HTML file, one script and one stylesheet, all from this origin, with no inline code
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
}
DEFAULT_PORTS = {"http": 80, "https": 443}
UPLOAD_PATH = "/api/patches/upload"
STATIC = resources.files("factedit.web") / "static"

PatchId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="id from GET /api/patches")]
JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="id returned when the job was queued")]


# --------------------------------------------------------------------------- middleware


def normalize_host(name: str) -> str:
    """``"[::1]"`` -> ``"::1"``, lower case: the form allowed hosts are compared in."""
    name = name.strip().lower()
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


def split_host_header(value: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of a ``Host`` header (``"[::1]:8000"``, ``"localhost"``), ``None`` if malformed."""
    value = value.strip().lower()
    port: str | None = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif ":" in value:  # an IPv6 address must be bracketed
        return None
    else:
        host = value
    if not host:
        return None
    if port is None:
        return host, None
    if not (port.isascii() and port.isdigit()) or len(port) > 5:
        return None
    return host, int(port)


def same_origin(origin: str, scheme: str, host_header: str | None) -> bool:
    """Whether a browser's ``Origin`` is exactly this request's ``scheme://host:port``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(origin.strip())
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or parts.hostname is None or host_header is None:
        return False
    if parts.username is not None or parts.password is not None or parts.path not in ("", "/") or parts.query:
        return False
    target = split_host_header(host_header)
    if target is None:
        return False
    host, port = target
    return (
        parts.scheme == scheme
        and parts.hostname.lower() == host
        and (origin_port or DEFAULT_PORTS[parts.scheme]) == (port or DEFAULT_PORTS.get(scheme))
    )


class RequestGuard:
    """Host and origin checks, size limits, content types and the body timeout, before routing or parsing.

    ``Host`` must name an allowed host (``"*"`` in ``allowed_hosts`` skips this check only);
    an ``Origin`` header, when sent, must equal the request's own origin, on every method.
    The body is read here, counting bytes, and refused with 413 as soon as it exceeds
    the limit (a missing or lying ``Content-Length`` does not help), with 408 if it has not
    all arrived within ``body_timeout`` seconds, and with 503 if the bytes of all bodies in
    flight (and of uploaded patches waiting to be applied) would exceed ``budget``; only then
    is it replayed to the app. The bytes stay reserved until the response is sent, or, for an
    upload the app queues, until its job ends (the app takes over ``scope[RESERVATION]``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        max_upload: int,
        allowed_hosts: tuple[str, ...],
        budget: ByteBudget | None = None,
        body_timeout: float = 30.0,
        max_header_bytes: int = 64 * 1024,
    ) -> None:
        self.app, self.max_body, self.max_upload = app, max_body, max_upload
        self.max_header_bytes = max_header_bytes
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = frozenset(normalize_host(h) for h in allowed_hosts if h != "*")
        self.budget = budget or ByteBudget(max(max_upload, max_body) * 2)
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        head += sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if head > self.max_header_bytes:  # h11 bounds headers that arrive slowly; these came in one piece
            await _reject(
                scope, send, 431, f"the request line and headers exceed {self.max_header_bytes:,} bytes", close=True
            )
            return
        headers = Headers(scope=scope)
        host_header = headers.get("host")
        if not self.any_host:
            parsed = split_host_header(host_header or "")
            if parsed is None or parsed[0] not in self.allowed_hosts:
                shown = (host_header or "")[:100]
                names = ", ".join(sorted(self.allowed_hosts))
                await _reject(
                    scope,
                    send,
                    400,
                    f"invalid Host header {shown!r}: this server answers to {names} (serve --allowed-host adds names)",
                )
                return
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, scope.get("scheme", "http"), host_header):
            await _reject(scope, send, 403, f"cross-origin request from {origin[:100]!r} refused")
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self.max_upload if path == UPLOAD_PATH else self.max_body
        declared = headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                await _reject(scope, send, 400, "invalid Content-Length header", close=True)
                return
            if int(declared) > limit:
                await _reject(
                    scope,
                    send,
                    413,
                    f"request body of {int(declared):,} bytes exceeds the limit of {limit:,}",
                    close=True,
                )
                return
        reservation = {"bytes": 0}
        try:
            await self._read_and_forward(scope, receive, send, path, limit, declared, reservation, headers)
        finally:
            self.budget.give(reservation["bytes"])

    async def _read_and_forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        limit: int,
        declared: str | None,
        reservation: dict[str, int],
        headers: Headers,
    ) -> None:
        def reserve(n: int) -> bool:
            if not self.budget.take(n):
                return False
            reservation["bytes"] += n
            return True

        async def refuse_busy() -> None:
            held = self.budget.held
            await _reject(
                scope,
                send,
                503,
                f"the server is already receiving or holding {held / 2**20:,.1f} MiB of request bodies and uploaded "
                f"patches, its limit is {self.budget.limit / 2**20:,.1f} MiB (factedit serve --max-upload-memory); "
                "retry when those uploads are done",
                headers={"Retry-After": "5"},
                close=True,
            )

        if declared is not None and not reserve(int(declared)):
            await refuse_busy()
            return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await _reject(
                    scope,
                    send,
                    408,
                    f"the request body did not arrive within {self.body_timeout:g} s (received {size:,} bytes)",
                    close=True,
                )
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reject(scope, send, 413, f"request body exceeds the limit of {limit:,} bytes", close=True)
                return
            if size > reservation["bytes"] and not reserve(size - reservation["bytes"]):
                await refuse_busy()
                return
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if path != UPLOAD_PATH and body and ctype != "application/json":
            await _reject(scope, send, 415, f"send JSON with Content-Type: application/json (got {ctype or 'none'!r})")
            return
        if path == UPLOAD_PATH and ctype != "multipart/form-data":
            await _reject(scope, send, 415, "upload the patch file as multipart/form-data (field 'file')")
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        scope[RESERVATION] = reservation
        await self.app(scope, replay, send)


class SecurityHeaders:
    """Add :data:`SECURITY_HEADERS` to every response (refusals included) unless already set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _reject(
    scope: Scope, send: Send, status: int, detail: str, *, headers: dict[str, str] | None = None, close: bool = False
) -> None:
    """A JSON refusal; ``close``: end the connection after it (the rest of an unread body is not wanted)."""
    log.info("refused %s %s: %d %s", scope.get("method"), scope.get("path"), status, detail)
    extra = dict(headers or {})
    if close:
        extra["Connection"] = "close"
    response = JSONResponse({"detail": detail}, status_code=status, headers=extra)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - responses never read the request
    return {"type": "http.disconnect"}


# --------------------------------------------------------------------------- app


def create_app(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str = DEFAULT_MODEL,
    second_moment: dict[int, torch.Tensor] | None = None,
    hparams_overrides: dict[str, Any] | None = None,
    allowed_hosts: tuple[str, ...] | list[str] = LOOPBACK_HOSTS,
    limits: WebLimits | None = None,
    patch_store: str | FsPath | None = None,
    max_body_bytes: int | None = None,
    max_upload_bytes: int | None = None,
    busy_timeout: float | None = None,
    max_waiting_jobs: int | None = None,
) -> FastAPI:
    """The web app around an already-loaded ``(model, tokenizer)``.

    ``second_moment``/``hparams_overrides`` are server-side edit settings (precomputed
    statistics; e.g. ``{"mom2_n_tokens": 20000}``): clients can only change the numeric
    hyper-parameters listed in :data:`factedit.web.edits.EDITABLE_HPARAMS` that the chosen
    method's hyper-parameter class has.
    ``allowed_hosts``: ``Host`` names accepted (``"*"`` accepts any ``Host``; a browser
    ``Origin`` must still be the request's own).
    ``limits``: every bound (:class:`WebLimits`; the keyword arguments after it override single fields).
    ``patch_store``: a folder where the applied patches are saved and restored from on start
    (``factedit serve`` uses ``$FACTEDIT_HOME/web``); ``None`` keeps them in memory only.
    """
    limits = (limits or WebLimits()).with_changes(
        max_body_bytes=max_body_bytes,
        max_upload_bytes=max_upload_bytes,
        busy_timeout=busy_timeout,
        max_queued_jobs=max_waiting_jobs,
    )
    if limits.max_upload_memory < limits.max_upload_bytes:
        limits = limits.with_changes(max_upload_memory=limits.max_upload_bytes)
    session = ModelSession(
        model,
        tokenizer,
        model_name,
        second_moment=second_moment,
        hparams_overrides=hparams_overrides,
        busy_timeout=limits.busy_timeout,
        limits=limits,
        store_root=FsPath(patch_store) if patch_store is not None else None,
    )
    jobs = JobQueue(max_waiting=limits.max_queued_jobs)
    predictor = Predictor(
        session.predict_locked,
        session.acquire_for_prediction,
        session.release_after_prediction,
        max_pending=limits.max_pending_predictions,
        batch=limits.prediction_batch,
    )
    uploads = ByteBudget(limits.max_upload_memory)
    hosts = tuple(allowed_hosts)
    max_upload = limits.max_upload_bytes

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.shutdown()
        predictor.shutdown()

    app = FastAPI(
        title="factedit",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,  # Swagger UI / ReDoc load scripts from a CDN: offline and against the CSP
        description="Locate (causal tracing) and edit (every method of the library's registry: ROME, MEMIT, "
        "AlphaEdit, FT...) facts in the loaded language model. "
        "Long operations return a job to poll at /api/jobs/{id} (and to cancel at /api/jobs/{id}/cancel).",
    )
    app.state.session, app.state.jobs, app.state.predictor = session, jobs, predictor
    app.state.limits, app.state.uploads = limits, uploads
    app.add_middleware(
        RequestGuard,
        max_body=limits.max_body_bytes,
        max_upload=max_upload,
        allowed_hosts=hosts,
        budget=uploads,
        body_timeout=limits.body_timeout,
        max_header_bytes=limits.max_header_bytes,
    )
    app.add_middleware(SecurityHeaders)  # outermost: refusals by the guard get the headers too

    # -- errors: one JSON shape, {"detail": "..."} ---------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        text = "; ".join(f"{'.'.join(e['loc'][1:] or e['loc'])}: {e['msg']}" for e in errors[:5])
        return JSONResponse({"detail": f"invalid request: {text}", "errors": errors}, status_code=422)

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(FactEditError)
    async def _bad(_: Request, exc: FactEditError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(CostTooHigh)
    async def _costly(_: Request, exc: CostTooHigh) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc), "estimate": exc.estimate, "limit": exc.limit, "unit": "token-block passes"},
            status_code=422,
        )

    @app.exception_handler(Busy)
    async def _busy(_: Request, exc: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "2"})

    @app.exception_handler(PredictionsFull)
    async def _predictions_full(_: Request, exc: PredictionsFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(QueueFull)
    async def _full(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "5"})

    @app.exception_handler(NotCancellable)
    async def _not_cancellable(_: Request, exc: NotCancellable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path[:200]} (the API is listed at /openapi.json)"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {request.url.path[:200]} (see /openapi.json)"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # the server log has the traceback
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); the server log has the details"}, status_code=500
        )

    def queued(kind: str, fn, params: dict[str, Any], *, cost: int | None = None, on_end=None) -> JSONResponse:
        job = jobs.submit(kind, fn, params, cost=cost, on_end=on_end)
        return JSONResponse(
            {"job": jobs.snapshot(job.id)}, status_code=202, headers={"Location": f"/api/jobs/{job.id}"}
        )

    def check_cost(what: str, estimate: int, hint: str) -> None:
        if estimate > limits.max_job_cost:
            raise CostTooHigh(what, estimate, limits.max_job_cost, hint, jobs.rates().get(what))

    # -- page -------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # -- model ------------------------------------------------------------------------
    @app.get("/api/info", summary="The loaded model, its state, the edit defaults and the server's limits")
    async def info() -> dict[str, Any]:
        # on the event loop, touching neither the model nor its lock: answers at once, whatever runs
        return {
            **session.info(),
            "version": __version__,
            "queue_busy": jobs.busy(),
            "jobs": jobs.counts(),
            "predictions_waiting": predictor.pending,
            "upload_bytes_held": uploads.held,
            "measured_cost_per_second": jobs.rates(),
            "limits": limits.public(),
        }

    @app.get("/api/health", summary="Liveness: answers from the event loop, whatever the model is doing")
    async def health() -> dict[str, Any]:
        return {"ok": True, "jobs": jobs.counts(), "predictions_waiting": predictor.pending}

    @app.get("/api/models", summary="Registered models (the only names /api/model accepts)")
    def models() -> dict[str, Any]:
        installed = installed_models()
        return {
            "loaded": session.name,
            "default": DEFAULT_MODEL,
            "models": [
                {"name": n, "description": s.description, "installed": installed[n]} for n, s in REGISTRY.items()
            ],
        }

    @app.post("/api/model", summary="Load another registered model (job)", status_code=202)
    def choose_model(body: ModelIn) -> Any:
        name = body.name
        if name not in REGISTRY:
            raise HTTPException(404, f"unknown model {name!r}: choose one of {', '.join(REGISTRY)}")
        if name == session.name:
            return JSONResponse({"model": name, "changed": False}, status_code=200)
        if not installed_models()[name]:
            raise HTTPException(
                409, f"model {name!r} is not installed; install it with: {REGISTRY[name].install_hint()}"
            )
        if session.patches:
            raise Conflict("revert the applied patches before switching models")
        return queued("load", lambda p: session.switch(name, p), {"name": name})

    # -- predictions ------------------------------------------------------------------
    @app.post("/api/predict", summary="Top-k next tokens on the current (possibly edited) model")
    async def predict(body: PredictIn) -> dict[str, Any]:
        text, _ = fill_prompt(body.prompt, body.subject)
        text = session.wrap(text, body.chat)
        top = await predictor.predict(text, body.k)  # queued and batched; never holds a server thread
        return {
            "text": text,
            "top": [[t, p] for t, p in top],
            "fingerprint": session.fingerprint,
            "edited": bool(session.patches),
        }

    # -- tracing ----------------------------------------------------------------------
    @app.post("/api/trace", summary="Causal trace: hidden / MLP / attention heatmaps (job)", status_code=202)
    def trace(body: TraceIn) -> JSONResponse:
        from factedit.models.architectures import num_layers
        from factedit.text import encode_with_subject
        from factedit.tracing.core import answer_token

        _, template = fill_prompt(body.prompt, body.subject)
        if template is None:  # pragma: no cover - the schema requires a subject
            raise FactEditError("a trace needs the subject")
        template = session.wrap(template, body.chat)
        with session.check_lock:  # tokenization problems are 400s now, not failed jobs later
            generation = session.generation  # the tokenizer's model: the job refuses to run on another
            encoded = encode_with_subject(session.check_tok, template, body.subject)
            if body.answer is not None:
                answer_token(session.check_tok, encoded.text, body.answer)
            n_layers = num_layers(session.model)
        if len(encoded.ids) > MAX_TRACE_TOKENS:
            raise FactEditError(
                f"the prompt is {len(encoded.ids)} tokens long; traces are limited to {MAX_TRACE_TOKENS}"
            )
        cost = trace_cost(len(encoded.ids), encoded.subject_first, n_layers, body.samples, body.window)
        check_cost(
            "trace",
            cost,
            f"use fewer noise samples (asked {body.samples}), a smaller window (asked {body.window}) or a shorter "
            f"prompt ({len(encoded.ids)} tokens)",
        )
        params = {**body.model_dump(), "model": session.name}
        return queued(
            "trace",
            lambda p: session.trace(
                template, body.subject, body.answer, body.samples, body.window, p, generation=generation
            ),
            params,
            cost=cost,
        )

    # -- editing ----------------------------------------------------------------------
    @app.post(
        "/api/edit",
        summary="Edit a fact (ROME by default; any registry method) and compare predictions (job)",
        status_code=202,
    )
    def edit(body: EditIn) -> JSONResponse:
        from factedit.editing.values import build_value_problem
        from factedit.models.architectures import num_layers

        _, template = fill_prompt(body.prompt, body.subject)
        template = session.wrap(template, body.chat)
        paraphrases = [session.wrap(p, body.chat) for p in body.paraphrases]
        neighbours = [session.wrap(p, body.chat) for p in body.neighbours]
        request = EditRequest(
            prompt=template, subject=body.subject, target_new=body.target, target_true=body.target_true
        )
        overrides = body.hparams.model_dump(exclude_none=True) if body.hparams else {}
        with session.check_lock:
            generation = session.generation  # hp belongs to this model: the job refuses to run on another
            hp = session.hparams_for(body.method, overrides)
            edit_method(body.method).check_requests([request], hp)
            # the subject's span and the target's tokens: tokenization problems are 400s now, not failed jobs
            build_value_problem(session.check_tok, request, ["{}"], getattr(hp, "fact_token", "subject_last"))
            prompt_tokens = max(
                len(session.check_tok(text)["input_ids"])
                for text in [template.replace("{}", body.subject, 1), *paraphrases, *neighbours]
            )
            n_layers = num_layers(session.model)
        steps, rows = edit_shape(hp)
        cost = edit_cost(
            n_layers=n_layers,
            prompt_tokens=prompt_tokens,
            steps=steps,
            rows=rows,
            probes=1 + len(body.paraphrases) + len(body.neighbours),
            generate_tokens=body.generate_tokens,
        )
        check_cost("edit", cost, f"use fewer optimisation steps (asked {steps}) or a shorter prompt")
        session.check_room(session.edit_bytes(hp), "edit")  # checked again when the job runs
        params = {**body.model_dump(), "model": session.name}
        return queued(
            "edit",
            lambda p: session.edit(
                request,
                body.method,
                hp,
                paraphrases,
                neighbours,
                body.generate_tokens,
                p,
                generation=generation,
            ),
            params,
            cost=cost,
        )

    # -- jobs ---------------------------------------------------------------------------
    @app.get("/api/jobs", summary="Recent jobs, oldest first (without results)")
    def list_jobs() -> dict[str, Any]:
        return {"jobs": jobs.list()}

    @app.get("/api/jobs/{job_id}", summary="One job: status, progress, and its result once done")
    def get_job(job_id: JobId) -> dict[str, Any]:
        snap = jobs.snapshot(job_id)
        if snap is None:
            raise HTTPException(404, f"no job {job_id} (finished jobs are kept for a while only)")
        return snap

    @app.post(
        "/api/jobs/{job_id}/cancel",
        summary="Cancel a queued job, or stop a running one at its next step (the model is left unchanged)",
        status_code=202,
    )
    def cancel_job(job_id: JobId) -> JSONResponse:
        try:
            snap = jobs.cancel(job_id)
        except KeyError:
            raise HTTPException(404, f"no job {job_id} (finished jobs are kept for a while only)") from None
        return JSONResponse({"job": snap}, status_code=200 if snap["status"] == "cancelled" else 202)

    # -- patches ------------------------------------------------------------------------
    @app.get("/api/patches", summary="Applied patches, in application order (revert the last first)")
    def list_patches() -> dict[str, Any]:
        return {
            "patches": [p.summary() for p in session.patches],
            "fingerprint": session.fingerprint,
            "base_fingerprint": session.base_fingerprint,
            "persistence": dict(session.persistence),
            "max_patches": limits.max_patches,
            "patch_memory": session.held_bytes(),
            "max_patch_memory": limits.max_patch_memory,
        }

    @app.post("/api/patches/{patch_id}/revert", summary="Revert the last applied patch (job)", status_code=202)
    def revert(patch_id: PatchId) -> JSONResponse:
        try:
            session.check_revertible(patch_id)
        except KeyError:
            raise HTTPException(404, f"no applied patch {patch_id}") from None
        return queued("revert", lambda p: session.revert(patch_id, p), {"patch_id": patch_id})

    @app.get(
        "/api/patches/{patch_id}/download",
        summary="The patch file (factedit's .safetensors format)",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    def download(patch_id: PatchId) -> Response:
        entry = session.find_patch(patch_id)
        if entry is None:
            raise HTTPException(404, f"no applied patch {patch_id}")
        disposition = f'attachment; filename="factedit-patch-{patch_id}.safetensors"'
        return Response(
            entry.patch.to_bytes(), media_type="application/octet-stream", headers={"Content-Disposition": disposition}
        )

    @app.post(UPLOAD_PATH, summary="Upload a patch file and apply it (validated first; job)", status_code=202)
    def upload(
        request: Request,
        file: Annotated[UploadFile, File(description="a patch .safetensors written by factedit")],
    ) -> JSONResponse:
        data = file.file.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(413, f"patch file exceeds the limit of {max_upload:,} bytes")
        if not data:
            raise FactEditError("the uploaded file is empty")
        generation = session.generation
        patch = session.validate_upload(data)  # 400/409 here (metadata types too); the model is untouched
        del data
        summary = summarize_patch(patch)
        # the body's reserved bytes now stand for the parsed patch: held until its job ends
        reservation = request.scope.get(RESERVATION) or {"bytes": 0}
        held, reservation["bytes"] = reservation["bytes"], 0
        return queued(
            "apply",
            lambda p: session.apply_uploaded(patch, p, generation=generation),
            {"method": summary["method"], "entries": summary["weights"], "model": session.name},
            on_end=lambda: uploads.give(held),
        )

    return app
