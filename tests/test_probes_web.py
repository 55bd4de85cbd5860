"""Hostile and exhausting requests against the web app: one parametrized probe per kind.

Each probe tries one way to exhaust or confuse the server (a job too costly, a cancel, a cap, a
slow or malformed client...) and asserts clean handling: a JSON ``{"detail": ...}`` with the
right status and message, the model's weights and the patch stack unchanged, and the server
still answering ``/api/info``. The app runs over a tiny random Llama (the default model's
tokenizer) with tight limits; server-level probes (timeouts, connection cap, malformed HTTP)
use raw sockets against the same app served by uvicorn on a free port in a thread.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from factedit.editing.patch import Patch, PatchEntry  # noqa: E402
from factedit.models.architectures import arch_for, get_parameter  # noqa: E402
from factedit.models.fingerprint import model_fingerprint, tensor_sha256  # noqa: E402
from factedit.web.app import create_app  # noqa: E402
from factedit.web.limits import MiB, WebLimits  # noqa: E402
from factedit.web.server import book_of, make_server, wait_started  # noqa: E402

from .tiny_models import tiny_model  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
LIMITS = WebLimits(
    max_job_cost=20_000,  # the tiny model's default trace costs ~1,500; samples 50 / window 64 ~30,000
    max_queued_jobs=3,
    max_patches=2,
    max_patch_memory=4 * MiB,  # a rewrite weight is 32 KiB; the embedding 12 MiB
    max_body_bytes=64 * 1024,
    max_upload_bytes=512 * 1024,
    max_upload_memory=1 * MiB,
    max_pending_predictions=8,
    prediction_batch=4,
    busy_timeout=0.3,
    body_timeout=0.5,
    header_timeout=0.5,
    keep_alive_timeout=1.0,
    max_connections=8,
    max_header_bytes=8 * 1024,
    backlog=64,
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ctx(default_model, corpus_file, tmp_path_factory):
    """The app over a tiny model, a TestClient, and the same app served by uvicorn."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    tok = default_model[1]
    overrides = {
        "mom2_n_tokens": 2000,
        "mom2_dataset": str(corpus_file),
        "v_num_grad_steps": 5,
        "context_template_length_params": [[5, 2]],
    }
    app = create_app(
        model,
        tok,
        model_name="tiny-llama",
        hparams_overrides=overrides,
        limits=LIMITS,
        patch_store=tmp_path_factory.mktemp("web-store"),
    )
    with TestClient(app, base_url="http://127.0.0.1") as client:
        port = _free_port()
        server = make_server(app, "127.0.0.1", port, LIMITS)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_started(server)
        yield Ctx(app, client, model, server, port)
        server.should_exit = True
        thread.join(10)
    app.state.jobs.shutdown(wait=True, timeout=30)
    app.state.predictor.shutdown()
    app.state.session.close()


class Ctx:
    def __init__(self, app, client: TestClient, model, server, port: int) -> None:
        self.app, self.client, self.model, self.server, self.port = app, client, model, server, port
        self.session, self.jobs = app.state.session, app.state.jobs

    def state(self) -> dict:
        return {"fingerprint": model_fingerprint(self.model), "patches": [p.id for p in self.session.patches]}

    def wait(self, job_id: str, timeout: float = 120) -> dict:
        return self.jobs.wait(job_id, timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HoldModel:
    """A job that holds the model lock until released: makes 'queued' and 'busy' deterministic."""

    def __init__(self, ctx: Ctx) -> None:
        self.holding, self.release = threading.Event(), threading.Event()
        session = ctx.session

        def hold(_report):
            with session.using_model(wait=60, what="test-hold"):
                self.holding.set()
                if not self.release.wait(60):
                    raise RuntimeError("the test never released the model")
            return {"held": True}

        self.job = ctx.jobs.submit("test-hold", hold, {})
        assert self.holding.wait(30), "the holding job did not start"
        self.ctx = ctx

    def __enter__(self) -> HoldModel:
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.ctx.wait(self.job.id)


def synthetic_patch(ctx: Ctx, name: str | None = None, seed: int = 0) -> Patch:
    """A small valid rank-one patch of one weight (layer 1's rewrite weight unless ``name``)."""
    model = ctx.model
    name = name or arch_for(model).rewrite_weight_at(1)
    weight = get_parameter(model, name)
    out_dim, in_dim = weight.shape
    gen = torch.Generator().manual_seed(seed)
    entry = PatchEntry(
        name=name,
        shape=tuple(weight.shape),
        left=torch.randn(out_dim, 1, generator=gen) * 1e-3,
        right=torch.randn(1, in_dim, generator=gen),
        base_sha256=tensor_sha256(weight),
    )
    return Patch.for_model(
        model,
        method="rome",
        entries=[entry],
        base_fingerprint=ctx.session.fingerprint,
        requests=[{"prompt": "The {} is in", "subject": "Test", "target_new": "Nowhere"}],
        hparams={"layers": [1]},
    )


def upload(ctx: Ctx, data: bytes):
    return ctx.client.post("/api/patches/upload", files={"file": ("p.safetensors", data, "application/octet-stream")})


def revert_all(ctx: Ctx) -> None:
    for entry in reversed(ctx.session.patches):
        r = ctx.client.post(f"/api/patches/{entry.id}/revert")
        assert r.status_code == 202, r.text
        assert ctx.wait(r.json()["job"]["id"])["status"] == "done"


def json_error(r, status: int, *words: str) -> dict:
    """A refusal in the app's JSON shape with ``status`` and a detail containing every word."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body.get("detail"), str) and len(body["detail"]) > 10, body
    for word in words:
        assert word.lower() in body["detail"].lower(), (word, body["detail"])
    return body


# raw HTTP against the uvicorn server -----------------------------------------------------


def connect(ctx: Ctx, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", ctx.port), timeout=timeout)
    s.settimeout(timeout)
    return s


def read_response(s: socket.socket) -> tuple[int, dict[str, str], dict | None]:
    """Status, headers and JSON body of one response (read until the body is complete or EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    parsed = json.loads(body[:length]) if headers.get("content-type", "").startswith("application/json") else None
    return status, headers, parsed


def raw(ctx: Ctx, data: bytes) -> tuple[int, dict[str, str], dict | None]:
    with connect(ctx) as s:
        s.sendall(data)
        return read_response(s)


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def settle(ctx: Ctx) -> None:
    """Wait until the server has seen every earlier test connection closed."""
    deadline = time.monotonic() + 5
    while ctx.server.server_state.connections and time.monotonic() < deadline:
        time.sleep(0.02)


def raw_info_ok(ctx: Ctx) -> None:
    status, _, body = raw(ctx, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status == 200 and body["model"] == "tiny-llama"


def get_line(path: str = "/api/info") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()


# --------------------------------------------------------------------------- probes

PROBES: dict[str, Callable[[Ctx], None]] = {}
SERVER_PROBES: set[str] = set()


def probe(name: str, server: bool = False):
    def register(fn):
        PROBES[name] = fn
        if server:
            SERVER_PROBES.add(name)
        return fn

    return register


def _trace(ctx: Ctx, **extra):
    return ctx.client.post("/api/trace", json={"prompt": PROMPT, "subject": SUBJECT, **extra})


def _edit(ctx: Ctx, **extra):
    return ctx.client.post("/api/edit", json={"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", **extra})


# -- job cost --------------------------------------------------------------------------


@probe("trace-cost-over-limit")
def _(ctx):
    before = len(ctx.jobs.list())
    body = json_error(_trace(ctx, samples=50, window=64), 422, "token-block passes", "max-job-cost")
    assert body["estimate"] > body["limit"] == LIMITS.max_job_cost
    assert f"{body['estimate']:,}" in body["detail"] and f"{body['limit']:,}" in body["detail"]
    assert len(ctx.jobs.list()) == before  # refused before anything was queued


@probe("trace-under-limit-runs")
def _(ctx):
    r = _trace(ctx, samples=2, window=2)
    assert r.status_code == 202 and 0 < r.json()["job"]["cost"] <= LIMITS.max_job_cost
    assert ctx.wait(r.json()["job"]["id"])["status"] == "done"


@probe("edit-cost-over-limit")
def _(ctx):
    body = json_error(_edit(ctx, hparams={"v_num_grad_steps": 100}), 422, "edit", "optimisation steps")
    assert body["estimate"] > body["limit"]


@probe("trace-too-many-tokens")
def _(ctx):
    json_error(_trace(ctx, prompt=PROMPT + " and" * 70), 400, "tokens long")


# -- cancel -----------------------------------------------------------------------------


@probe("cancel-queued-trace")
def _(ctx):
    with HoldModel(ctx):
        r = _trace(ctx, samples=2)
        job_id = r.json()["job"]["id"]
        c = ctx.client.post(f"/api/jobs/{job_id}/cancel")
        assert c.status_code == 200 and c.json()["job"]["status"] == "cancelled"
    snap = ctx.wait(job_id)
    assert snap["status"] == "cancelled" and snap["started"] is None  # never ran


@probe("cancel-running-trace")
def _(ctx):
    def stop(job):
        if job.kind == "trace" and job.message.startswith("trace"):
            ctx.jobs.cancel(job.id)

    ctx.jobs.listeners.append(stop)
    try:
        job_id = _trace(ctx, samples=2).json()["job"]["id"]
        snap = ctx.wait(job_id)
    finally:
        ctx.jobs.listeners.remove(stop)
    assert snap["status"] == "cancelled" and snap["started"] is not None and snap["result"] is None


@probe("cancel-running-edit")
def _(ctx):
    seen = []

    def stop(job):  # at the first stage of the edit's computation (statistics, templates or optimisation)
        seen.append(job.message)
        if job.kind == "edit" and job.message not in ("started", "predictions before the edit"):
            ctx.jobs.cancel(job.id)

    ctx.jobs.listeners.append(stop)
    try:
        job_id = _edit(ctx, generate_tokens=0).json()["job"]["id"]
        snap = ctx.wait(job_id)
    finally:
        ctx.jobs.listeners.remove(stop)
    assert snap["status"] == "cancelled", (snap["status"], snap["error"], seen)
    assert "nothing was changed" in snap["message"]


@probe("cancel-edit-after-push")
def _(ctx):
    pushed = []

    def stop(job):  # the edit is computed and pushed: cancelling now must still leave the model unchanged
        if job.kind == "edit" and job.message == "saving the edit":
            pushed.append(len(ctx.session.stack))
            ctx.jobs.cancel(job.id)

    ctx.jobs.listeners.append(stop)
    try:
        job_id = _edit(ctx, generate_tokens=0).json()["job"]["id"]
        snap = ctx.wait(job_id)
    finally:
        ctx.jobs.listeners.remove(stop)
    assert pushed == [1] and snap["status"] == "cancelled"
    assert len(ctx.session.stack) == 0


@probe("cancel-finished-job")
def _(ctx):
    job_id = _trace(ctx, samples=1, window=1).json()["job"]["id"]
    ctx.wait(job_id)
    json_error(ctx.client.post(f"/api/jobs/{job_id}/cancel"), 409, "already finished")


@probe("cancel-unknown-job")
def _(ctx):
    json_error(ctx.client.post("/api/jobs/0123456789abcdef/cancel"), 404, "no job")


@probe("cancel-bad-job-id")
def _(ctx):
    json_error(ctx.client.post("/api/jobs/..%2F..%2Fetc/cancel"), 404, "no such endpoint")
    json_error(ctx.client.post("/api/jobs/xyz/cancel"), 422, "invalid request")


@probe("cancel-twice")
def _(ctx):
    with HoldModel(ctx):
        job_id = _trace(ctx, samples=1).json()["job"]["id"]
        assert ctx.client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
        json_error(ctx.client.post(f"/api/jobs/{job_id}/cancel"), 409, "cancelled")


@probe("cancel-queued-upload-frees-memory")
def _(ctx):
    data = synthetic_patch(ctx).to_bytes()
    with HoldModel(ctx):
        r = upload(ctx, data)
        assert r.status_code == 202 and ctx.app.state.uploads.held >= len(data) // 2
        ctx.client.post(f"/api/jobs/{r.json()['job']['id']}/cancel")
    assert ctx.app.state.uploads.held == 0


# -- caps -------------------------------------------------------------------------------


@probe("queue-full")
def _(ctx):
    with HoldModel(ctx):
        ids = [_trace(ctx, samples=1).json()["job"]["id"] for _ in range(LIMITS.max_queued_jobs)]
        r = _trace(ctx, samples=1)
        json_error(r, 429, "already waiting", "max-queued-jobs")
        assert r.headers["retry-after"]
        for job_id in ids:
            ctx.client.post(f"/api/jobs/{job_id}/cancel")


@probe("patch-stack-cap")
def _(ctx):
    try:
        for seed in range(LIMITS.max_patches):
            r = upload(ctx, synthetic_patch(ctx, seed=seed).to_bytes())
            assert r.status_code == 202, r.text
            assert ctx.wait(r.json()["job"]["id"])["status"] == "done"
        fingerprint = ctx.session.fingerprint
        json_error(upload(ctx, synthetic_patch(ctx, seed=9).to_bytes()), 409, "max-patches")
        json_error(_edit(ctx), 409, "max-patches")  # refused before it is queued, too
        assert ctx.session.fingerprint == fingerprint == model_fingerprint(ctx.model)
    finally:
        revert_all(ctx)


@probe("patch-memory-cap")
def _(ctx):
    embed = arch_for(ctx.model).embed + ".weight"
    json_error(upload(ctx, synthetic_patch(ctx, name=embed).to_bytes()), 409, "max-patch-memory", "MiB")


@probe("upload-over-size")
def _(ctx):
    json_error(upload(ctx, b"x" * (LIMITS.max_upload_bytes + 10)), 413, "exceeds the limit")


@probe("upload-memory-budget-full")
def _(ctx):
    budget = ctx.app.state.uploads
    assert budget.take(budget.limit - 1000)  # as if other uploads were in flight
    try:
        r = upload(ctx, synthetic_patch(ctx).to_bytes())
        json_error(r, 503, "max-upload-memory")
        assert r.headers["retry-after"]
    finally:
        budget.give(budget.limit - 1000)


@probe("upload-memory-freed-after-apply")
def _(ctx):
    r = upload(ctx, synthetic_patch(ctx).to_bytes())
    assert r.status_code == 202
    ctx.wait(r.json()["job"]["id"])
    try:
        assert ctx.app.state.uploads.held == 0
    finally:
        revert_all(ctx)


@probe("upload-for-other-model")
def _(ctx):
    other = tiny_model("llama", seed=1, layers=2)
    patch = synthetic_patch(ctx)
    bad = Patch.for_model(other, method="rome", entries=patch.entries, base_fingerprint=model_fingerprint(other))
    r = upload(ctx, bad.to_bytes())
    assert r.status_code in (400, 409), r.text
    json_error(r, r.status_code)


@probe("json-body-too-large")
def _(ctx):
    r = ctx.client.post(
        "/api/predict", content=json.dumps({"prompt": "x" * 100_000}), headers={"content-type": "application/json"}
    )
    json_error(r, 413, "exceeds the limit")


@probe("chunked-body-too-large")
def _(ctx):
    r = ctx.client.post(
        "/api/edit", content=(b"a" * 16384 for _ in range(8)), headers={"content-type": "application/json"}
    )
    json_error(r, 413, "exceeds the limit")


@probe("wrong-content-type")
def _(ctx):
    json_error(ctx.client.post("/api/predict", content=b"{}", headers={"content-type": "text/plain"}), 415, "JSON")


# -- predictions and info ----------------------------------------------------------------


@probe("predict-busy-is-honest")
def _(ctx):
    with HoldModel(ctx):
        r = ctx.client.post("/api/predict", json={"prompt": PROMPT})
        json_error(r, 503, "busy", "test-hold")
        assert r.headers["retry-after"]


@probe("predict-burst-no-spurious-busy")
def _(ctx):
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: ctx.client.post("/api/predict", json={"prompt": f"{PROMPT} {i}"}), range(40)))
    # the queue holds 8 and the worker takes 4 at a time: a burst of 40 may be told "queue full", never "busy"
    for r in codes:
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            json_error(r, 503, "already waiting")
    assert sum(r.status_code == 200 for r in codes) >= LIMITS.max_pending_predictions


@probe("predict-queue-full")
def _(ctx):
    session, predictor = ctx.session, ctx.app.state.predictor
    old = session.busy_timeout
    session.busy_timeout = 5.0
    session.lock.acquire()  # not a job: predictions wait for it (up to the busy timeout) in their queue
    locked = True
    try:
        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(ctx.client.post, "/api/predict", json={"prompt": PROMPT}) for _ in range(24)]
            deadline = time.monotonic() + 10
            while predictor.pending < LIMITS.max_pending_predictions and time.monotonic() < deadline:
                time.sleep(0.01)
            info = ctx.client.get("/api/info")  # answers while predictions wait (event loop, no lock)
            assert info.status_code == 200 and info.json()["predictions_waiting"] >= 1
            session.lock.release()
            locked = False
            results = [f.result() for f in futures]
    finally:
        if locked:
            session.lock.release()
        session.busy_timeout = old
    full = [r for r in results if r.status_code == 503]
    assert full and all("already waiting" in r.json()["detail"] for r in full)
    assert all(r.status_code == 200 for r in results if r not in full)


@probe("predict-k-too-large")
def _(ctx):
    json_error(ctx.client.post("/api/predict", json={"prompt": PROMPT, "k": 10_000}), 422, "k")


@probe("info-while-job-runs")
def _(ctx):
    with HoldModel(ctx):
        info = ctx.client.get("/api/info")
        health = ctx.client.get("/api/health")
        assert info.status_code == 200 and info.json()["jobs"]["running"] == 1
        assert health.status_code == 200 and health.json()["ok"]


@probe("internal-error-json")
def _(ctx):
    session = ctx.session
    original = session.info

    def broken():
        raise RuntimeError("boom")

    session.info = broken  # type: ignore[method-assign]
    try:
        # not entered: a second lifespan would shut the shared app's workers down at its end
        c = TestClient(ctx.app, base_url="http://127.0.0.1", raise_server_exceptions=False)
        json_error(c.get("/api/info"), 500, "internal error", "RuntimeError")
    finally:
        session.info = original  # type: ignore[method-assign]


@probe("unknown-route-json")
def _(ctx):
    r = ctx.client.get("/api/nothing-here")
    json_error(r, 404, "no such endpoint", "/api/nothing-here")
    assert r.headers["content-type"] == "application/json"


@probe("method-not-allowed-json")
def _(ctx):
    json_error(ctx.client.delete("/api/info"), 405, "DELETE is not allowed")


@probe("switch-model-unknown")
def _(ctx):
    json_error(ctx.client.post("/api/model", json={"name": "no-such-model"}), 404, "unknown model")


# -- server level (raw sockets against uvicorn) --------------------------------------------


@probe("slow-headers", server=True)
def _(ctx):
    with connect(ctx) as s:
        s.sendall(get_line())  # and never the blank line
        status, headers, body = read_response(s)
        assert status == 408 and "did not arrive" in body["detail"] and headers["connection"] == "close"
        assert closed_by_server(s)
    assert book_of(ctx.server).header_timeouts >= 1


@probe("silent-connection", server=True)
def _(ctx):
    with connect(ctx) as s:  # connects and sends nothing
        status, _, body = read_response(s)
        assert status == 408 and "within" in body["detail"]


@probe("slow-headers-after-keep-alive", server=True)
def _(ctx):
    with connect(ctx) as s:
        s.sendall(get_line() + b"\r\n")
        assert read_response(s)[0] == 200
        s.sendall(get_line("/api/health"))  # the second request's headers never complete
        status, _, body = read_response(s)
        assert status == 408 and body["detail"]


@probe("keep-alive-idle-closed", server=True)
def _(ctx):
    with connect(ctx) as s:
        s.sendall(get_line() + b"\r\n")
        assert read_response(s)[0] == 200
        assert closed_by_server(s)  # after the keep-alive timeout, without a response


@probe("slow-body", server=True)
def _(ctx):
    with connect(ctx) as s:
        s.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt":'
        )
        status, headers, body = read_response(s)
        assert status == 408 and "body did not arrive" in body["detail"] and headers["connection"] == "close"


@probe("lying-content-length", server=True)
def _(ctx):
    with connect(ctx) as s:
        s.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n" + json.dumps({"prompt": PROMPT}).encode()
        )
        assert read_response(s)[0] == 408


@probe("malformed-http", server=True)
def _(ctx):
    status, headers, body = raw(ctx, b"THIS IS NOT HTTP\r\n\r\n")
    assert status == 400 and "malformed HTTP" in body["detail"] and headers["x-frame-options"] == "DENY"


@probe("malformed-header-line", server=True)
def _(ctx):
    status, _, body = raw(ctx, get_line() + b"no colon in this header\r\n\r\n")
    assert status == 400 and body["detail"]


@probe("bad-content-length", server=True)
def _(ctx):
    status, _, body = raw(ctx, b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n")
    assert status == 400 and body["detail"]


@probe("content-length-with-chunked", server=True)
def _(ctx):
    # h11 lets Transfer-Encoding win over Content-Length (RFC 9112 6.3): an empty chunked body, refused as JSON
    status, _, body = raw(
        ctx,
        b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    )
    assert status in (400, 422) and body["detail"]


@probe("broken-chunked-body", server=True)
def _(ctx):
    status, _, body = raw(
        ctx,
        b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    )
    assert status == 400 and body["detail"]


@probe("http2-preface", server=True)
def _(ctx):
    status, _, body = raw(ctx, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # h11 reads it as a request without Host
    assert status == 400 and body["detail"]


@probe("oversized-headers", server=True)
def _(ctx):
    status, _, body = raw(ctx, get_line() + b"X-Big: " + b"a" * (2 * LIMITS.max_header_bytes) + b"\r\n\r\n")
    assert status == 431 and f"{LIMITS.max_header_bytes:,}" in body["detail"]


@probe("oversized-headers-trickled", server=True)
def _(ctx):
    with connect(ctx) as s:
        s.sendall(get_line() + b"X-Big: " + b"a" * (LIMITS.max_header_bytes // 2))
        time.sleep(0.05)
        s.sendall(b"a" * LIMITS.max_header_bytes)  # still no end of headers: h11's incomplete-event limit
        status, _, body = read_response(s)
    assert status == 431 and "exceed" in body["detail"]


@probe("websocket-upgrade", server=True)
def _(ctx):
    status, _, body = raw(
        ctx,
        b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: close\r\n\r\n",
    )
    assert status == 200 and body["model"] == "tiny-llama"  # served as plain HTTP: no WebSocket protocol


@probe("foreign-host-raw", server=True)
def _(ctx):
    status, _, body = raw(ctx, b"GET /api/info HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert status == 400 and "Host" in body["detail"]


@probe("connection-cap-evicts-slow", server=True)
def _(ctx):
    settle(ctx)
    book = book_of(ctx.server)
    evicted = book.evicted
    slow = []
    try:
        for _ in range(LIMITS.max_connections + 4):
            s = connect(ctx)
            s.sendall(b"GET /api/info HTTP/1.1\r\n")  # and then nothing
            slow.append(s)
        time.sleep(0.1)
        raw_info_ok(ctx)  # a client that sends its request at once is served
        assert book.evicted > evicted
    finally:
        for s in slow:
            s.close()


@probe("connection-cap-all-busy", server=True)
def _(ctx):
    settle(ctx)
    book = book_of(ctx.server)
    refused = book.refused
    busy = []
    try:
        for _ in range(LIMITS.max_connections):
            s = connect(ctx)
            s.sendall(
                b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )  # headers complete, body pending: a request in progress, not evictable
            busy.append(s)
        time.sleep(0.2)
        with connect(ctx) as s:
            status, headers, body = read_response(s)
        assert status == 503 and "max-connections" in body["detail"] and headers["retry-after"]
        assert book.refused > refused
    finally:
        for s in busy:
            s.close()
    time.sleep(0.2)


@probe("concurrent-uploads-bounded", server=True)
def _(ctx):
    budget = ctx.app.state.uploads
    size = 400 * 1024  # three of these exceed the 1 MiB upload memory
    partial = []
    try:
        for _ in range(2):
            s = connect(ctx)
            s.sendall(
                b"POST /api/patches/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: multipart/form-data; boundary=x\r\n"
                + f"Content-Length: {size}\r\n\r\n".encode()
                + b"--x"
            )
            partial.append(s)
        deadline = time.monotonic() + 5
        while budget.held < 2 * size and time.monotonic() < deadline:
            time.sleep(0.01)
        with connect(ctx) as s:
            s.sendall(
                b"POST /api/patches/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: multipart/form-data; boundary=x\r\n" + f"Content-Length: {size}\r\n\r\n".encode()
            )
            status, headers, body = read_response(s)
        assert status == 503 and "max-upload-memory" in body["detail"] and headers["retry-after"]
    finally:
        for s in partial:
            s.close()
    deadline = time.monotonic() + 5
    while budget.held and time.monotonic() < deadline:
        time.sleep(0.02)
    assert budget.held == 0


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("kind", list(PROBES))
def test_probe(ctx, kind):
    before = ctx.state()
    PROBES[kind](ctx)
    assert ctx.state() == before, f"{kind}: the model or the patch stack changed"
    info = ctx.client.get("/api/info")
    assert info.status_code == 200 and info.json()["model"] == "tiny-llama"
    if kind in SERVER_PROBES:
        raw_info_ok(ctx)
    assert ctx.app.state.predictor._thread.is_alive() and ctx.jobs._thread.is_alive()


def test_probe_count():
    """The issue asks for at least 40 kinds of web probes here."""
    assert len(PROBES) >= 40, len(PROBES)
