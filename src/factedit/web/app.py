"""The local web app: a FastAPI JSON API over one loaded model, plus a static page that uses it.

``create_app(model, tokenizer)`` takes an already-loaded model (tests pass the session
fixture; ``factedit serve`` loads one). Long work (traces, edits, reverts, uploads,
model switches) is queued on the single-worker :class:`~factedit.web.jobs.JobQueue` and
answered ``202`` with a job to poll; quick reads answer directly.

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

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, HTTPException, Path, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.requests import EditRequest
from factedit.errors import FactEditError
from factedit.models.registry import DEFAULT_MODEL, REGISTRY
from factedit.version import __version__
from factedit.web.edits import edit_method
from factedit.web.jobs import JobQueue, QueueFull
from factedit.web.patches import Conflict, summarize_patch
from factedit.web.schemas import EditIn, ModelIn, PredictIn, TraceIn
from factedit.web.session import Busy, ModelSession, fill_prompt, installed_models

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024  # JSON requests: prompts and a few settings
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # patch files (a dense MEMIT patch of a small model is a few MB per layer)
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
    """Host and origin checks, size limits and content types, enforced before routing or parsing.

    ``Host`` must name an allowed host (``"*"`` in ``allowed_hosts`` skips this check only);
    an ``Origin`` header, when sent, must equal the request's own origin, on every method.
    The body is read here, counting bytes, and refused with 413 as soon as it exceeds
    the limit (a missing or lying ``Content-Length`` does not help); only then is it
    replayed to the app.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, max_upload: int, allowed_hosts: tuple[str, ...]) -> None:
        self.app, self.max_body, self.max_upload = app, max_body, max_upload
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = frozenset(normalize_host(h) for h in allowed_hosts if h != "*")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
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
                await _reject(scope, send, 400, "invalid Content-Length header")
                return
            if int(declared) > limit:
                await _reject(
                    scope, send, 413, f"request body of {int(declared):,} bytes exceeds the limit of {limit:,}"
                )
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            if len(body) > limit:
                await _reject(scope, send, 413, f"request body exceeds the limit of {limit:,} bytes")
                return
            if not message.get("more_body", False):
                break
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
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

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


async def _reject(scope: Scope, send: Send, status: int, detail: str) -> None:
    log.info("refused %s %s: %d %s", scope.get("method"), scope.get("path"), status, detail)
    response = JSONResponse({"detail": detail}, status_code=status)
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
    max_body_bytes: int = MAX_BODY_BYTES,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    busy_timeout: float = 5.0,
    max_waiting_jobs: int = 16,
) -> FastAPI:
    """The web app around an already-loaded ``(model, tokenizer)``.

    ``second_moment``/``hparams_overrides`` are server-side edit settings (precomputed
    statistics; e.g. ``{"mom2_n_tokens": 20000}``): clients can only change the numeric
    hyper-parameters listed in :data:`factedit.web.edits.EDITABLE_HPARAMS` that the chosen
    method's hyper-parameter class has.
    ``allowed_hosts``: ``Host`` names accepted (``"*"`` accepts any ``Host``; a browser
    ``Origin`` must still be the request's own).
    """
    session = ModelSession(
        model,
        tokenizer,
        model_name,
        second_moment=second_moment,
        hparams_overrides=hparams_overrides,
        busy_timeout=busy_timeout,
    )
    jobs = JobQueue(max_waiting=max_waiting_jobs)
    hosts = tuple(allowed_hosts)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.shutdown()

    app = FastAPI(
        title="factedit",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,  # Swagger UI / ReDoc load scripts from a CDN: offline and against the CSP
        description="Locate (causal tracing) and edit (every method of the library's registry: ROME, MEMIT, "
        "AlphaEdit, FT...) facts in the loaded language model. "
        "Long operations return a job to poll at /api/jobs/{id}.",
    )
    app.state.session, app.state.jobs = session, jobs
    app.add_middleware(RequestGuard, max_body=max_body_bytes, max_upload=max_upload_bytes, allowed_hosts=hosts)
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

    @app.exception_handler(Busy)
    async def _busy(_: Request, exc: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "2"})

    @app.exception_handler(QueueFull)
    async def _full(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "5"})

    def queued(kind: str, fn, params: dict[str, Any]) -> JSONResponse:
        job = jobs.submit(kind, fn, params)
        return JSONResponse(
            {"job": jobs.snapshot(job.id)}, status_code=202, headers={"Location": f"/api/jobs/{job.id}"}
        )

    # -- page -------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # -- model ------------------------------------------------------------------------
    @app.get("/api/info", summary="The loaded model, its state and the edit defaults")
    def info() -> dict[str, Any]:
        return {
            **session.info(),
            "version": __version__,
            "queue_busy": jobs.busy(),
            "limits": {"max_body_bytes": max_body_bytes, "max_upload_bytes": max_upload_bytes},
        }

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
    def predict(body: PredictIn) -> dict[str, Any]:
        text, _ = fill_prompt(body.prompt, body.subject)
        top = session.predict([text], body.k)[0]
        return {
            "text": text,
            "top": [[t, p] for t, p in top],
            "fingerprint": session.fingerprint,
            "edited": bool(session.patches),
        }

    # -- tracing ----------------------------------------------------------------------
    @app.post("/api/trace", summary="Causal trace: hidden / MLP / attention heatmaps (job)", status_code=202)
    def trace(body: TraceIn) -> JSONResponse:
        from factedit.text import encode_with_subject
        from factedit.tracing.core import answer_token

        _, template = fill_prompt(body.prompt, body.subject)
        if template is None:  # pragma: no cover - the schema requires a subject
            raise FactEditError("a trace needs the subject")
        with session.check_lock:  # tokenization problems are 400s now, not failed jobs later
            generation = session.generation  # the tokenizer's model: the job refuses to run on another
            encoded = encode_with_subject(session.check_tok, template, body.subject)
            if body.answer is not None:
                answer_token(session.check_tok, encoded.text, body.answer)
        if len(encoded.ids) > 64:
            raise FactEditError(f"the prompt is {len(encoded.ids)} tokens long; traces are limited to 64")
        params = {**body.model_dump(), "model": session.name}
        return queued(
            "trace",
            lambda p: session.trace(
                template, body.subject, body.answer, body.samples, body.window, p, generation=generation
            ),
            params,
        )

    # -- editing ----------------------------------------------------------------------
    @app.post(
        "/api/edit",
        summary="Edit a fact (ROME by default; any registry method) and compare predictions (job)",
        status_code=202,
    )
    def edit(body: EditIn) -> JSONResponse:
        from factedit.editing.values import build_value_problem

        _, template = fill_prompt(body.prompt, body.subject)
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
        params = {**body.model_dump(), "model": session.name}
        return queued(
            "edit",
            lambda p: session.edit(
                request,
                body.method,
                hp,
                list(body.paraphrases),
                list(body.neighbours),
                body.generate_tokens,
                p,
                generation=generation,
            ),
            params,
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

    # -- patches ------------------------------------------------------------------------
    @app.get("/api/patches", summary="Applied patches, in application order (revert the last first)")
    def list_patches() -> dict[str, Any]:
        return {
            "patches": [p.summary() for p in session.patches],
            "fingerprint": session.fingerprint,
            "base_fingerprint": session.base_fingerprint,
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
        file: Annotated[UploadFile, File(description="a patch .safetensors written by factedit")],
    ) -> JSONResponse:
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"patch file exceeds the limit of {max_upload_bytes:,} bytes")
        if not data:
            raise FactEditError("the uploaded file is empty")
        generation = session.generation
        patch = session.validate_upload(data)  # 400/409 here (metadata types too); the model is untouched
        summary = summarize_patch(patch)
        return queued(
            "apply",
            lambda p: session.apply_uploaded(patch, p, generation=generation),
            {"method": summary["method"], "entries": summary["weights"], "model": session.name},
        )

    return app
