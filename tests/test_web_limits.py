"""The web app's limits as behaviour: job cost bounds, cancelling, batched predictions, the saved
patch stack, and the server settings (see docs/web.md). Probes of each limit one by one are in
tests/test_probes_web.py; the load figures are bench/web_load.py's."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from factedit.editing.patch import Patch, PatchEntry  # noqa: E402
from factedit.models.architectures import arch_for, get_parameter  # noqa: E402
from factedit.models.fingerprint import model_fingerprint, tensor_sha256  # noqa: E402
from factedit.predict import top_next_tokens  # noqa: E402
from factedit.web.app import create_app  # noqa: E402
from factedit.web.jobs import CANCELLED, DONE, JobQueue, NotCancellable  # noqa: E402
from factedit.web.limits import REFERENCE_UNITS_PER_SECOND, WebLimits, trace_cost  # noqa: E402

from .tiny_models import tiny_model  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


def synthetic_patch(model, fingerprint: str, seed: int = 0, layer: int = 1) -> Patch:
    name = arch_for(model).rewrite_weight_at(layer)
    weight = get_parameter(model, name)
    gen = torch.Generator().manual_seed(seed)
    entry = PatchEntry(
        name=name,
        shape=tuple(weight.shape),
        left=torch.randn(weight.shape[0], 1, generator=gen) * 1e-3,
        right=torch.randn(1, weight.shape[1], generator=gen),
        base_sha256=tensor_sha256(weight),
    )
    return Patch.for_model(
        model,
        method="rome",
        entries=[entry],
        base_fingerprint=fingerprint,
        requests=[{"prompt": "The {} is in", "subject": f"Test {seed}", "target_new": "Nowhere"}],
        hparams={"layers": [layer]},
    )


def upload_and_wait(client: TestClient, app, data: bytes) -> dict:
    r = client.post("/api/patches/upload", files={"file": ("p.safetensors", data, "application/octet-stream")})
    assert r.status_code == 202, r.text
    return app.state.jobs.wait(r.json()["job"]["id"], 60)


class HoldModel:
    def __init__(self, app) -> None:
        self.holding, self.release = threading.Event(), threading.Event()
        session = app.state.session

        def hold(_report):
            with session.using_model(wait=60, what="test-hold"):
                self.holding.set()
                self.release.wait(60)

        self.job = app.state.jobs.submit("test-hold", hold, {})
        assert self.holding.wait(30)
        self.jobs = app.state.jobs

    def __enter__(self) -> HoldModel:
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.jobs.wait(self.job.id, 60)


# --------------------------------------------------------------------------- job cost


def test_largest_trace_is_refused_and_ordinary_jobs_are_not(default_model, corpus_file):
    """The largest trace the schema allows (64 tokens, 50 samples, window 64) would hold the worker for hours
    on the default model: refused with the estimate and the limit. The page's default trace and edit pass."""
    model, tok = default_model
    app = create_app(model, tok, hparams_overrides={"mom2_n_tokens": 10_000, "mom2_dataset": str(corpus_file)})
    try:
        with TestClient(app, base_url="http://127.0.0.1") as client:
            words = SUBJECT
            while len(tok(words + " the")["input_ids"]) <= 64:
                words += " the"
            assert len(tok(words)["input_ids"]) == 64
            r = client.post("/api/trace", json={"prompt": words, "subject": SUBJECT, "samples": 50, "window": 64})
            assert r.status_code == 422, r.text
            body = r.json()
            assert body["limit"] == WebLimits().max_job_cost and body["estimate"] > 40 * body["limit"]
            assert body["estimate"] / REFERENCE_UNITS_PER_SECOND > 3 * 3600  # hours of one thread
            assert f"{body['estimate']:,}" in body["detail"] and "--max-job-cost" in body["detail"]
            assert " h " in body["detail"]  # "~7.2 h on the reference CPU"
            assert not app.state.jobs.list()  # nothing was queued
            with HoldModel(app):  # the defaults of the page are accepted (and cancelled before they run)
                trace = client.post("/api/trace", json={"prompt": PROMPT, "subject": SUBJECT})
                edit = client.post("/api/edit", json={"prompt": PROMPT, "subject": SUBJECT, "target": "Rome"})
                assert trace.status_code == edit.status_code == 202, (trace.text, edit.text)
                for r in (trace, edit):
                    assert 0 < r.json()["job"]["cost"] <= WebLimits().max_job_cost
                    assert client.post(f"/api/jobs/{r.json()['job']['id']}/cancel").status_code == 200
    finally:
        app.state.jobs.shutdown(wait=True, timeout=30)
        app.state.predictor.shutdown()


def test_trace_cost_follows_the_tracers_work(default_model):
    """The estimate grows with every dimension of the work, linearly in the samples, and counts the
    restorations the tracer really runs (3 kinds x traced tokens x layers)."""
    from factedit.text import encode_with_subject
    from factedit.tracing.core import causal_trace

    tok = default_model[1]
    model = tiny_model("llama")
    encoded = encode_with_subject(tok, "The {} is located in the city of", SUBJECT)
    T, first, L = len(encoded.ids), encoded.subject_first, 4
    base = trace_cost(T, first, L, 2, 2)
    assert trace_cost(T, first, L, 4, 2) - trace_cost(T, first, L, 3, 2) == trace_cost(T, first, L, 3, 2) - base
    assert trace_cost(T, first, L, 2, 4) > base and trace_cost(T + 5, first, L, 2, 2) > base
    assert trace_cost(T, first, 2 * L, 2, 2) > 2 * base
    result = causal_trace(model, tok, PROMPT, SUBJECT, samples=2, window=2, noise=0.1)
    assert result.meta["restorations"] == 3 * (T - first) * L


# --------------------------------------------------------------------------- jobs and cancelling


def test_job_queue_cancel_semantics():
    jobs = JobQueue(max_waiting=4)
    ended: list[str] = []
    try:
        gate, started = threading.Event(), threading.Event()

        def blocker(report):
            started.set()
            gate.wait(30)
            return "first"

        first = jobs.submit("block", blocker, on_end=lambda: ended.append("block"))
        assert started.wait(10)
        ran: list[int] = []
        queued = jobs.submit("never", lambda report: ran.append(1), on_end=lambda: ended.append("never"))
        assert jobs.cancel(queued.id)["status"] == CANCELLED and ended == ["never"]  # at once, never run

        steps: list[int] = []

        def loop(report):
            for i in range(10_000):
                steps.append(i)
                report(i / 10_000, f"step {i}")
            return "finished"

        running = jobs.submit("loop", loop, on_end=lambda: ended.append("loop"))
        jobs.listeners.append(lambda job: job.kind == "loop" and len(steps) == 3 and jobs.cancel(job.id))
        gate.set()
        assert jobs.wait(running.id, 30)["status"] == CANCELLED and len(steps) == 3  # stopped at its next report
        assert jobs.wait(first.id, 30)["status"] == DONE

        committed, release = threading.Event(), threading.Event()

        def keep(report):
            report.commit()
            committed.set()
            release.wait(30)
            return "kept"

        kept = jobs.submit("commit", keep)
        assert committed.wait(10)
        with pytest.raises(NotCancellable, match="can no longer be cancelled"):
            jobs.cancel(kept.id)
        release.set()
        assert jobs.wait(kept.id, 30)["result"] == "kept"
        with pytest.raises(NotCancellable, match="already finished"):
            jobs.cancel(first.id)
        with pytest.raises(KeyError):
            jobs.cancel("0" * 16)
        assert sorted(ended) == ["block", "loop", "never"] and ran == []  # every on_end exactly once
    finally:
        jobs.shutdown(wait=True, timeout=10)


def test_commit_after_a_cancel_request_stops_the_job():
    jobs = JobQueue()
    try:
        marks = []

        def work(report):
            jobs.cancel(report._job.id)  # asked while running, before the commit point
            marks.append("before commit")
            report.commit()
            marks.append("after commit")  # never reached

        job = jobs.submit("w", work)
        assert jobs.wait(job.id, 10)["status"] == CANCELLED and marks == ["before commit"]
    finally:
        jobs.shutdown(wait=True, timeout=10)


# --------------------------------------------------------------------------- predictions


def test_predictions_are_batched_and_do_not_starve_info(default_model):
    tok = default_model[1]
    model = tiny_model("llama")
    app = create_app(model, tok, model_name="tiny", limits=WebLimits(prediction_batch=16))
    predictor = app.state.predictor
    calls: list[int] = []
    run = predictor._run

    def counting(texts, k):
        calls.append(len(texts))
        return run(texts, k)

    predictor._run = counting
    texts = [f"{PROMPT} {i % 10}" for i in range(60)]
    try:
        with TestClient(app, base_url="http://127.0.0.1") as client, ThreadPoolExecutor(30) as pool:
            infos = []
            futures = [pool.submit(client.post, "/api/predict", json={"prompt": t, "k": 3}) for t in texts]
            infos = [client.get("/api/info") for _ in range(5)]
            answers = [f.result() for f in futures]
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:2]
        assert all(r.status_code == 200 for r in infos)
        assert len(calls) < len(texts) and sum(calls) <= len(texts)  # batched, identical prompts run once
        for text, r in zip(texts, answers):
            (expected,) = top_next_tokens(model, tok, [text], 3)
            got = r.json()["top"]
            assert [t for t, _ in got] == [t for t, _ in expected]
            assert all(abs(p - q) < 1e-4 for (_, p), (_, q) in zip(got, expected))
    finally:
        app.state.jobs.shutdown(wait=True, timeout=10)
        app.state.predictor.shutdown()


# --------------------------------------------------------------------------- the saved patch stack


@pytest.fixture()
def tiny_app_factory(default_model, tmp_path):
    tok = default_model[1]
    made = []

    def make(seed: int = 0, store=tmp_path / "store", **kwargs):
        model = tiny_model("llama", seed=seed)
        app = create_app(model, tok, model_name="tiny", patch_store=store, **kwargs)
        made.append(app)
        return app, model

    yield make
    for app in made:
        app.state.jobs.shutdown(wait=True, timeout=10)
        app.state.predictor.shutdown()
        app.state.session.close()


def test_patch_stack_is_saved_and_restored_verified(tiny_app_factory, tmp_path):
    app, model = tiny_app_factory()
    assert app.state.session.persistence["enabled"]
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for seed in (0, 1):
            data = synthetic_patch(model, app.state.session.fingerprint, seed=seed).to_bytes()
            assert upload_and_wait(client, app, data)["status"] == "done"
        ids = [p["id"] for p in client.get("/api/patches").json()["patches"]]
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        fingerprint = app.state.session.fingerprint
    app.state.session.close()  # as at a restart (or crash: the files were written when each job finished)

    again, fresh = tiny_app_factory()
    session = again.state.session
    assert session.persistence["restored"] == 2 and session.persistence["problem"] is None
    assert session.fingerprint == fingerprint == model_fingerprint(fresh)
    assert [p.id for p in session.patches] == ids
    assert all(torch.equal(v, weights[k]) for k, v in fresh.state_dict().items())
    with TestClient(again, base_url="http://127.0.0.1") as client:
        r = client.post(f"/api/patches/{ids[-1]}/revert")
        assert again.state.jobs.wait(r.json()["job"]["id"], 30)["status"] == "done"
        manifest = json.loads((session.store.folder / "stack.json").read_text())
        assert [e["id"] for e in manifest["patches"]] == ids[:1]
        assert client.get("/api/info").json()["persistence"]["enabled"]
    session.close()
    third, _ = tiny_app_factory()
    assert third.state.session.persistence["restored"] == 1


def test_damaged_or_foreign_saved_stacks_are_refused(tiny_app_factory, tmp_path):
    app, model = tiny_app_factory()
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for seed in (0, 1):
            data = synthetic_patch(model, app.state.session.fingerprint, seed=seed).to_bytes()
            assert upload_and_wait(client, app, data)["status"] == "done"
    folder = app.state.session.store.folder
    app.state.session.close()

    # one flipped bit in the second file: the first patch is restored, the second refused and kept aside
    second = sorted(folder.glob("*.safetensors"))[1]
    raw = bytearray(second.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    second.write_bytes(bytes(raw))
    again, fresh = tiny_app_factory()
    kept = again.state.session.persistence
    assert kept["restored"] == 1 and "SHA-256" in kept["problem"] and "rejected-" in kept["problem"]
    rejected = [p for p in folder.iterdir() if p.name.startswith("rejected-")]
    assert len(rejected) == 1 and (rejected[0] / second.name).is_file() and (rejected[0] / "reason.json").is_file()
    assert len(again.state.session.patches) == 1
    again.state.session.close()

    # saved for other weights: nothing is applied
    other, other_model = tiny_app_factory(seed=3)
    kept = other.state.session.persistence
    assert kept["restored"] == 0 and "other weights" in kept["problem"]
    assert other.state.session.fingerprint == model_fingerprint(other_model) == other.state.session.base_fingerprint

    # a second server on the same folder keeps its patches in memory only, and says so
    second_server, _ = tiny_app_factory(seed=3)
    kept = second_server.state.session.persistence
    assert not kept["enabled"] and "another factedit server" in kept["problem"]
    other.state.session.close()

    # an unreadable manifest is moved aside with the patch files it named; the stack starts empty
    saver, saver_model = tiny_app_factory()
    with TestClient(saver, base_url="http://127.0.0.1") as client:
        data = synthetic_patch(saver_model, saver.state.session.fingerprint).to_bytes()
        assert upload_and_wait(client, saver, data)["status"] == "done"
    saver.state.session.close()
    (folder / "stack.json").write_text("{not json")
    last, last_model = tiny_app_factory()
    kept = last.state.session.persistence
    assert kept["enabled"] and kept["restored"] == 0
    assert last.state.session.fingerprint == model_fingerprint(last_model)
    aside = [p for p in folder.iterdir() if p.name.startswith("rejected-") and (p / "stack.json").is_file()]
    assert len(aside) == 1 and list(aside[0].glob("*.safetensors"))


def test_a_patch_that_cannot_be_saved_is_not_applied(tiny_app_factory, monkeypatch):
    app, model = tiny_app_factory()
    base = model_fingerprint(model)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app.state.session.store, "add", disk_full)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        job = upload_and_wait(client, app, synthetic_patch(model, base).to_bytes())
        assert job["status"] == "failed" and "could not save" in job["error"] and "not applied" in job["error"]
        assert model_fingerprint(model) == base and not app.state.session.patches


# --------------------------------------------------------------------------- server, page, command line


def test_server_settings_and_descriptor_limit():
    import resource

    from factedit.web.server import raise_fd_limit, server_config

    limits = WebLimits(max_connections=100, backlog=50, header_timeout=2, keep_alive_timeout=3)
    config = server_config(object(), "127.0.0.1", 0, limits)
    assert config.timeout_keep_alive == 3 and config.h11_max_incomplete_event_size == limits.max_header_bytes
    assert config.limit_concurrency == 101 and config.backlog == 50 and config.ws == "none"
    fitted = raise_fd_limit(limits)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == resource.RLIM_INFINITY or fitted.max_connections + fitted.backlog < soft
    with pytest.raises(ValueError, match="max_patches"):
        WebLimits(max_patches=0)
    with pytest.raises(ValueError, match="max_upload_memory"):
        WebLimits(max_upload_bytes=10, max_upload_memory=5)


def test_page_offers_cancel_and_states_persistence(default_model):
    app = create_app(tiny_model("llama"), default_model[1], model_name="tiny")
    try:
        client = TestClient(app, base_url="http://127.0.0.1")
        page = client.get("/").text
        assert 'id="trace-cancel"' in page and 'id="edit-cancel"' in page and 'id="persist-status"' in page
        script = client.get("/static/app.js").text
        assert "/cancel" in script and "kept in memory only" in script and "re-applied" in script
        listed = client.get("/api/patches").json()
        assert listed["persistence"]["enabled"] is False and listed["max_patches"] == WebLimits().max_patches
        info = client.get("/api/info").json()
        assert info["limits"]["max_job_cost"] == WebLimits().max_job_cost and info["jobs"]["queued"] == 0
    finally:
        app.state.jobs.shutdown(wait=True, timeout=10)
        app.state.predictor.shutdown()


def test_serve_refuses_bad_limits_before_loading_a_model(tmp_path):
    from typer.testing import CliRunner

    from factedit.cli.main import app as cli

    result = CliRunner().invoke(
        cli, ["serve", "--model", str(tmp_path / "missing.gguf"), "--max-upload", "100", "--max-upload-memory", "10"]
    )
    assert result.exit_code == 2 and "max-upload-memory" in result.output and "not found" not in result.output
    result = CliRunner().invoke(cli, ["serve", "--max-connections", "0"])
    assert result.exit_code == 2
