"""The web app's REST API against the real default model: happy paths, queueing, and hostile requests.

Every hostile request must get a 4xx with a readable ``detail`` and leave the model's
weights, the patch stack and the job queue exactly as they were.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from factedit.editing.patch import Patch, PatchEntry  # noqa: E402
from factedit.models.architectures import arch_for, get_parameter  # noqa: E402
from factedit.models.fingerprint import model_fingerprint, model_identity, tensor_sha256  # noqa: E402
from factedit.web.app import create_app  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
# Statistics settings shared with the browser test (10k tokens, as tests/test_rome_default.py uses;
# the Eiffel Tower edit lands as with 20k, p(Rome) 0.97 after 8 steps either way):
# computed once into $FACTEDIT_HOME/stats by the first edit, then read from the cache.
STATS_TOKENS = 10_000


def web_overrides(corpus_file) -> dict:
    return {"mom2_n_tokens": STATS_TOKENS, "mom2_dataset": str(corpus_file)}


def restore_model(app, model, original: str) -> None:
    """Fixture teardown: revert whatever a failed test left applied (last first); the shared model must be as loaded."""
    session = app.state.session
    if session.model is model:
        session.revert_all()
    assert model_fingerprint(model) == original, "the session's default model was left edited"


@pytest.fixture(scope="module")
def app(default_model, corpus_file):
    model, tok = default_model
    original = model_fingerprint(model)
    app = create_app(model, tok, hparams_overrides=web_overrides(corpus_file), max_upload_bytes=1_000_000)
    yield app
    app.state.jobs.shutdown(wait=True, timeout=120)
    restore_model(app, model, original)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def wait_job(client: TestClient, job: dict, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    seen = [job["progress"]]
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"job {job['id']} did not finish in {timeout}s"
        time.sleep(0.2)
        r = client.get(f"/api/jobs/{job['id']}")
        assert r.status_code == 200
        job = r.json()
        seen.append(job["progress"])
    assert seen == sorted(seen), "progress went backwards"
    return job


def state(app, model) -> dict:
    """Everything a refused request must not change."""
    arch = arch_for(model)
    return {
        "fingerprint": model_fingerprint(model),
        "rewrite6": tensor_sha256(get_parameter(model, arch.rewrite_weight_at(6))),
        "rewrite10": tensor_sha256(get_parameter(model, arch.rewrite_weight_at(10))),
        "patches": [p.id for p in app.state.session.patches],
        "jobs": len(app.state.jobs.list()),
    }


def synthetic_patch(model, layer: int = 10, scale: float = 1e-3, base: str | None = None) -> Patch:
    """A small valid rank-one patch (no optimisation needed) to exercise uploads."""
    arch = arch_for(model)
    name = arch.rewrite_weight_at(layer)
    weight = get_parameter(model, name)
    out_dim, in_dim = weight.shape
    gen = torch.Generator().manual_seed(layer)
    entry = PatchEntry(
        name=name,
        shape=tuple(weight.shape),
        left=torch.randn(out_dim, 1, generator=gen) * scale,
        right=torch.randn(1, in_dim, generator=gen),
        base_sha256=tensor_sha256(weight),
    )
    return Patch(
        method="rome",
        entries=[entry],
        base_fingerprint=base or model_fingerprint(model),
        model_identity=model_identity(model),
        requests=[{"prompt": "The {} is in", "subject": "Test", "target_new": "Nowhere"}],
        hparams={"layers": [layer]},
        version="test",
    )


def with_meta(data: bytes, change) -> bytes:
    """Rewrite the JSON metadata of a patch file (to build hostile variants), with a fresh content
    checksum: a checksum is not a signature, so a hostile client can always compute one."""
    from safetensors.torch import load

    from factedit.integrity import save_signed

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["factedit_patch"])
    change(meta)
    return save_signed(load(data), {"factedit_patch": json.dumps(meta)})


def upload(client: TestClient, data: bytes, name: str = "patch.safetensors"):
    return client.post("/api/patches/upload", files={"file": (name, data, "application/octet-stream")})


class HoldModel:
    """A job that holds the model lock until released: makes 'queued' and 'busy' deterministic."""

    def __init__(self, app) -> None:
        self.holding, self.release = threading.Event(), threading.Event()
        session = app.state.session

        def hold(_progress):
            with session.using_model(wait=60):
                self.holding.set()
                if not self.release.wait(120):
                    raise RuntimeError("the test never released the model")
            return {"held": True}

        self.job = app.state.jobs.submit("test-hold", hold, {})
        assert self.holding.wait(60), "the holding job did not start"

    def __enter__(self) -> HoldModel:
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()


# --------------------------------------------------------------------------- happy paths


def test_page_openapi_info_models(client, default_model):
    page = client.get("/")
    assert page.status_code == 200 and "heatmap-hidden" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in (
        "/api/info",
        "/api/models",
        "/api/model",
        "/api/predict",
        "/api/trace",
        "/api/edit",
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/patches",
        "/api/patches/{patch_id}/revert",
        "/api/patches/{patch_id}/download",
        "/api/patches/upload",
    ):
        assert path in spec["paths"], path
    info = client.get("/api/info").json()
    assert info["model"] == "smollm2-135m" and info["num_layers"] == 30 and not info["edited"]
    assert info["fingerprint"] == model_fingerprint(default_model[0])
    assert info["edit_defaults"]["rome"]["layers"] == [6]
    models = client.get("/api/models").json()
    assert models["loaded"] == "smollm2-135m"
    assert {m["name"] for m in models["models"]} >= {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"}


def test_predict_in_the_chat_template(client, default_model):
    from factedit.models.chat import chat_format

    fmt = chat_format(default_model[1])
    chat = client.post("/api/predict", json={"prompt": PROMPT, "subject": SUBJECT, "k": 3, "chat": True})
    assert chat.status_code == 200, chat.text
    assert chat.json()["text"] == fmt.wrap(PROMPT)
    raw = client.post("/api/predict", json={"prompt": PROMPT, "k": 3})
    assert chat.json()["top"] != raw.json()["top"]
    bad = client.post("/api/predict", json={"prompt": PROMPT, "chat": "yes"})  # strict: a boolean only
    assert bad.status_code == 422


def test_predict_both_prompt_forms(client):
    full = client.post("/api/predict", json={"prompt": PROMPT, "subject": SUBJECT, "k": 3})
    template = client.post("/api/predict", json={"prompt": "The {} is located in the city of", "subject": SUBJECT})
    bare = client.post("/api/predict", json={"prompt": PROMPT})
    assert full.status_code == template.status_code == bare.status_code == 200
    assert full.json()["text"] == template.json()["text"] == PROMPT
    assert len(full.json()["top"]) == 3 and len(template.json()["top"]) == 5
    assert full.json()["top"][0][0] == " Paris" == bare.json()["top"][0][0]


def test_choose_model(client, app, default_model):
    before = state(app, default_model[0])
    same = client.post("/api/model", json={"name": "smollm2-135m"})
    assert same.status_code == 200 and same.json() == {"model": "smollm2-135m", "changed": False}
    installed = {m["name"]: m["installed"] for m in client.get("/api/models").json()["models"]}
    if not installed["gemma3-270m"]:
        r = client.post("/api/model", json={"name": "gemma3-270m"})
        assert r.status_code == 409 and "pip install" in r.json()["detail"]
    assert state(app, default_model[0]) == before


def test_trace_job_and_queueing(client, app, default_model):
    """Two traces queue behind each other; a quick read during a job says 'busy'; the model is untouched."""
    before = state(app, default_model[0])
    session = app.state.session
    with HoldModel(app):  # a job holds the model: both traces wait, a quick read answers "busy"
        first = client.post("/api/trace", json={"prompt": PROMPT, "subject": SUBJECT, "samples": 1})
        second = client.post(
            "/api/trace",
            json={"prompt": "The {} is located in the city of", "subject": SUBJECT, "samples": 1, "answer": "Paris"},
        )
        assert first.status_code == second.status_code == 202
        assert first.headers["location"] == f"/api/jobs/{first.json()['job']['id']}"
        snaps = [client.get(f"/api/jobs/{r.json()['job']['id']}").json() for r in (first, second)]
        assert [s["status"] for s in snaps] == ["queued", "queued"]
        assert snaps[0]["queue_position"] == 1 and snaps[1]["queue_position"] == 2
        session.busy_timeout = 0.05
        try:
            busy = client.post("/api/predict", json={"prompt": PROMPT})
        finally:
            session.busy_timeout = 5.0
        assert busy.status_code == 503 and "busy" in busy.json()["detail"]
        assert busy.headers["retry-after"] == "2"
    a = wait_job(client, first.json()["job"])
    b = wait_job(client, second.json()["job"])
    assert a["status"] == b["status"] == "done", (a["error"], b["error"])
    assert b["started"] >= a["finished"]  # one at a time, in order
    r = a["result"]
    assert set(r["scores"]) == {"hidden", "mlp", "attn"}
    n_tokens = len(r["tokens"])
    assert all(len(m) == n_tokens and all(len(row) == 30 for row in m) for m in r["scores"].values())
    assert r["answer"] == " Paris" and r["clean_prob"] > 0.5 > r["low_prob"]
    assert b["result"]["samples"] == 1 and b["result"]["answer"] == " Paris"
    assert [j["kind"] for j in client.get("/api/jobs").json()["jobs"]][-2:] == ["trace", "trace"]
    after = state(app, default_model[0])
    assert {k: v for k, v in after.items() if k != "jobs"} == {k: v for k, v in before.items() if k != "jobs"}


def test_edit_download_revert_upload(client, app, default_model):
    model, _ = default_model
    base = state(app, model)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    r = client.post(
        "/api/edit",
        json={
            "prompt": PROMPT,
            "subject": SUBJECT,
            "target": "Rome",
            "paraphrases": ["The Eiffel Tower can be found in the city of"],
            "neighbours": ["The Louvre is located in the city of"],
            "generate_tokens": 8,
            "hparams": {"v_num_grad_steps": 8},  # Rome at p = 0.97 already, in 2/5 of the default's time
        },
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"])
    assert job["status"] == "done", job["error"]
    res = job["result"]
    rows = {row["kind"]: row for row in res["checks"]}
    assert rows["prompt"]["before"]["top"][0][0] == " Paris"
    assert rows["prompt"]["after"]["top"][0][0] == " Rome"
    assert rows["prompt"]["after"]["p_target_new"] > 0.5 > rows["prompt"]["before"]["p_target_new"]
    assert set(rows) == {"prompt", "paraphrase", "neighbour"}
    assert res["generation"]["before"] and res["generation"]["after"] and res["method"] == "rome"
    assert res["layers"] == [6] and res["target_true"] == " Paris"
    patch_id = res["patch"]["id"]
    assert client.post("/api/predict", json={"prompt": PROMPT}).json()["top"][0][0] == " Rome"
    listed = client.get("/api/patches").json()
    assert [p["id"] for p in listed["patches"]] == [patch_id]
    assert app.state.session.patches[0].patch.hparams["v_num_grad_steps"] == 8  # the request's setting was used
    assert listed["fingerprint"] != listed["base_fingerprint"] == base["fingerprint"]

    # download: the core's single-file patch format
    dl = client.get(f"/api/patches/{patch_id}/download")
    assert dl.status_code == 200 and dl.headers["content-type"] == "application/octet-stream"
    assert f"factedit-patch-{patch_id}.safetensors" in dl.headers["content-disposition"]
    patch_bytes = dl.content
    downloaded = Patch.from_bytes(patch_bytes)
    assert downloaded.base_fingerprint == base["fingerprint"] and downloaded.requests[0]["target_new"] == "Rome"

    # the same patch cannot go on top of itself: computed on other weights -> 409, nothing applied
    again = upload(client, patch_bytes)
    assert again.status_code == 409 and "Revert" in again.json()["detail"]

    # a second (synthetic) patch on the edited model; the first can no longer be reverted (LIFO)
    second = synthetic_patch(model, base=app.state.session.fingerprint)
    up = upload(client, second.to_bytes())
    assert up.status_code == 202, up.text
    second_id = wait_job(client, up.json()["job"])["result"]["patch"]["id"]
    assert [p["id"] for p in client.get("/api/patches").json()["patches"]] == [patch_id, second_id]
    refused = client.post(f"/api/patches/{patch_id}/revert")
    assert refused.status_code == 409 and second_id in refused.json()["detail"]
    for pid in (second_id, patch_id):
        rv = client.post(f"/api/patches/{pid}/revert")
        assert rv.status_code == 202
        done = wait_job(client, rv.json()["job"])
        assert done["status"] == "done", done["error"]
    assert done["result"]["restored_base"]
    assert all(torch.equal(v, originals[k]) for k, v in model.state_dict().items())  # bit-exact
    assert client.post("/api/predict", json={"prompt": PROMPT}).json()["top"][0][0] == " Paris"
    assert client.get(f"/api/patches/{patch_id}/download").status_code == 404  # reverted: gone from the list

    # upload the downloaded file: validated, applied, Rome again; then revert
    up = upload(client, patch_bytes)
    assert up.status_code == 202, up.text
    applied = wait_job(client, up.json()["job"])
    assert applied["status"] == "done" and applied["result"]["patch"]["source"] == "upload"
    assert client.post("/api/predict", json={"prompt": PROMPT}).json()["top"][0][0] == " Rome"
    rv = wait_job(client, client.post(f"/api/patches/{applied['result']['patch']['id']}/revert").json()["job"])
    assert rv["status"] == "done"
    end = state(app, model)
    assert {k: v for k, v in end.items() if k != "jobs"} == {k: v for k, v in base.items() if k != "jobs"}


def test_info_lists_the_registry_methods(client, default_model):
    """The app has no method list of its own: /api/info offers the registry's, less the stated exclusions."""
    from factedit.editing.methods import get_method, method_names
    from factedit.web.edits import EDITABLE_HPARAMS, NOT_EDITS
    from factedit.web.schemas import EditHyperParamsIn

    info = client.get("/api/info").json()
    assert NOT_EDITS == ("none",)
    assert info["methods"] == [name for name in method_names() if name not in NOT_EDITS]
    assert {"rome", "rome-original", "memit", "alphaedit", "ft", "ft-l"} <= set(info["methods"])
    assert [m["name"] for m in info["method_details"]] == info["methods"]
    assert set(info["edit_defaults"]) == set(info["methods"])  # every method has defaults for the default model
    for name in info["methods"]:
        hp = get_method(name).hparams(default_model[0])
        expected = {k: getattr(hp, k) for k in EDITABLE_HPARAMS if k in type(hp).model_fields}
        assert info["edit_defaults"][name] == expected, name
    details = {m["name"]: m["hparams"] for m in info["method_details"]}
    assert "num_steps" in details["ft"] and "v_lr" not in details["ft"]
    assert "v_lr" in details["alphaedit"] and "num_steps" not in details["rome"]
    assert set(EditHyperParamsIn.model_fields) == set(EDITABLE_HPARAMS)  # the schema offers exactly these
    schema = client.get("/openapi.json").json()["components"]["schemas"]["EditIn"]["properties"]["method"]
    assert schema["enum"] == info["methods"]


# AlphaEdit at layer 6 alone (the statistics file the ROME edits here use, not five more) and 8 value
# steps: the API's dispatch and revert are tested, not AlphaEdit's efficacy (CI time)
@pytest.mark.parametrize(
    "method, hparams",
    [("alphaedit", {"layers": [6], "v_num_grad_steps": 8}), ("ft", {"num_steps": 20, "layers": [6]})],
    ids=["alphaedit", "ft"],
)
def test_registry_method_edit_and_revert(client, app, default_model, method, hparams):
    """AlphaEdit and FT through the API: the job completes, the prediction changes, the revert restores the weights."""
    model = default_model[0]
    base = state(app, model)
    body = {
        "prompt": PROMPT,
        "subject": SUBJECT,
        "target": "Rome",
        "method": method,
        "neighbours": ["The Louvre is located in the city of"],
        "generate_tokens": 0,
    }
    if hparams:
        body["hparams"] = hparams
    r = client.post("/api/edit", json=body)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"])
    assert job["status"] == "done", job["error"]
    res = job["result"]
    assert res["method"] == method and res["patch"]["method"] == method and res["patch"]["source"] == "edit"
    rows = {row["kind"]: row for row in res["checks"]}
    assert set(rows) == {"prompt", "neighbour"}
    before, after = rows["prompt"]["before"], rows["prompt"]["after"]
    assert before["top"][0][0] == " Paris"
    assert after["top"] != before["top"] and after["p_target_new"] > before["p_target_new"]
    assert res["landed"] == (after["top"][0][0] == " Rome")
    assert isinstance(res["converged"], bool) and res["generation"]["before"] is None
    if hparams:
        assert res["layers"] == hparams["layers"]
    edited = client.get("/api/info").json()
    assert edited["edited"] and edited["fingerprint"] == model_fingerprint(model) != base["fingerprint"]
    assert client.post("/api/predict", json={"prompt": PROMPT}).json()["top"][0][0] == after["top"][0][0]
    rv = client.post(f"/api/patches/{res['patch']['id']}/revert")
    assert rv.status_code == 202, rv.text
    done = wait_job(client, rv.json()["job"])
    assert done["status"] == "done" and done["result"]["restored_base"], done["error"]
    assert done["result"]["fingerprint"] == base["fingerprint"] == model_fingerprint(model)
    end = state(app, model)
    assert {k: v for k, v in end.items() if k != "jobs"} == {k: v for k, v in base.items() if k != "jobs"}


def test_job_progress_maps_core_stages():
    """The core's stages drive a job's fraction (monotone, inside its span) and its "name: done / total" message."""
    from factedit.web.jobs import Job, JobProgress, Reporter

    job = Job(id="0" * 16, kind="test", params={})
    progress = JobProgress(Reporter(job, threading.Lock()).span(0.1, 0.9))
    seen = []
    with progress.stage("second moments", total=4, unit="tok") as stage:
        stage.advance(2)
        assert job.message == "second moments: 2 / 4 tok"
        stage.advance(2)
        seen.append(job.progress)
    assert job.message == "second moments: done" and job.progress == pytest.approx(0.5)  # half of 0.1..0.9
    with progress.stage("z vectors", total=2, unit="req") as outer:
        for _ in range(2):
            with progress.stage("value optimisation", total=5) as inner:
                for _ in range(5):
                    inner.advance(1, loss=1.5)
                    seen.append(job.progress)
                assert job.message == "value optimisation: 5 / 5 (loss 1.5)"
            outer.advance(1)
            seen.append(job.progress)
    assert seen == sorted(seen) and 0.1 <= seen[0] and seen[-1] <= 0.9
    assert seen[-1] == pytest.approx(0.7)  # the second stage took half of what was left
    with progress.stage("context templates") as untimed:  # no total: the message says it is working
        assert job.message == "context templates: working"
        untimed.advance(3)
        assert job.message == "context templates: 3"
    assert job.progress <= 0.9


def test_edit_queued_behind_a_model_switch_is_refused(client, app, default_model):
    """An edit validated for one model must not run on the next one (its hyper-parameters were resolved for the
    first)."""
    model, tok = default_model
    session = app.state.session
    before = state(app, model)
    old_check_tok, old_generation = session.check_tok, session.generation
    session._loader = lambda name: (model, tok)  # a "switch" that reloads the same weights under another name
    try:
        with HoldModel(app):
            switch = app.state.jobs.submit("load", lambda p: session.switch("smollm2-135m-again", p), {})
            r = client.post("/api/edit", json={"prompt": PROMPT, "subject": SUBJECT, "target": "Rome"})
            assert r.status_code == 202, r.text
            trace = client.post("/api/trace", json={"prompt": PROMPT, "subject": SUBJECT, "samples": 1})
            assert trace.status_code == 202, trace.text
        assert app.state.jobs.wait(switch.id, timeout=120)["status"] == "done"
        for queued in (r, trace):
            job = wait_job(client, queued.json()["job"])
            assert job["status"] == "failed" and "switched" in job["error"], job["error"]
        assert session.name == "smollm2-135m-again" and session.generation == old_generation + 1
        assert session.check_tok is not old_check_tok  # request-time checks use the new model's tokenizer
        back = app.state.jobs.submit("load", lambda p: session.switch("smollm2-135m", p), {})
        assert app.state.jobs.wait(back.id, timeout=120)["status"] == "done"
    finally:
        session._loader = None
    assert session.name == "smollm2-135m" and not session.patches
    after = state(app, model)
    assert {k: v for k, v in after.items() if k != "jobs"} == {k: v for k, v in before.items() if k != "jobs"}


# --------------------------------------------------------------------------- hostile requests


def _patch_variants(model) -> dict[str, bytes]:
    good = synthetic_patch(model).to_bytes()
    other_shape = synthetic_patch(model)
    wrong_entry = dataclasses.replace(other_shape.entries[0], shape=(10, 10))
    other_shape = dataclasses.replace(other_shape, entries=[wrong_entry])
    nonfinite = synthetic_patch(model)
    nonfinite.entries[0].left[0, 0] = float("nan")
    return {
        "garbage": b"this is not a patch file at all" * 10,
        "truncated": good[: len(good) // 2],
        "foreign_model": with_meta(good, lambda m: m.update(model_identity="0123456789abcdef")),
        "unknown_weight": with_meta(good, lambda m: m["entries"][0].update(name="model.layers.99.mlp.weight")),
        "wrong_shape": with_meta(good, lambda m: m["entries"][0].update(shape=[576, 999])),
        "bad_shape_type": with_meta(good, lambda m: m["entries"][0].update(shape=7)),
        "other_format": with_meta(good, lambda m: m.update(format="something-else")),
        "other_weights": with_meta(good, lambda m: m.update(base_fingerprint="f" * 32)),
        "nonfinite": nonfinite.to_bytes(),
        "declared_shape_mismatch": other_shape.to_bytes(),
    }


HOSTILE_JSON = [
    # (endpoint, body, expected status)
    ("/api/predict", {"prompt": 123}, 422),  # wrong type
    ("/api/predict", {"prompt": PROMPT, "k": "5"}, 422),  # strict: no string->int coercion
    ("/api/predict", {"prompt": PROMPT, "k": 10_000}, 422),
    ("/api/predict", {"prompt": PROMPT, "path": "/etc/passwd"}, 422),  # unknown field
    ("/api/predict", {"prompt": PROMPT, "subject": "Louvre"}, 400),  # subject not in prompt
    ("/api/predict", {"prompt": "The {} is in"}, 400),  # placeholder without a subject
    ("/api/predict", [PROMPT], 422),  # not an object
    ("/api/trace", {"prompt": PROMPT, "subject": SUBJECT, "samples": 100_000}, 422),
    ("/api/trace", {"prompt": PROMPT, "subject": SUBJECT, "samples": 2.5}, 422),
    ("/api/trace", {"prompt": PROMPT, "subject": SUBJECT, "answer": "\x00"}, 422),
    ("/api/trace", {"prompt": PROMPT}, 422),  # subject missing
    ("/api/edit", {"prompt": "The {} is in {0.__class__}", "subject": SUBJECT, "target": "Rome"}, 422),  # format string
    ("/api/edit", {"prompt": "x" * 5000 + " {}", "subject": SUBJECT, "target": "Rome"}, 422),  # too long
    ("/api/edit", {"prompt": PROMPT, "subject": SUBJECT, "target": "   "}, 422),
    ("/api/edit", {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "method": "sgd"}, 422),  # not a method
    ("/api/edit", {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "method": "none"}, 422),  # makes no patch
    (
        "/api/edit",
        {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "method": "ft", "hparams": {"v_lr": 0.5}},
        400,
    ),  # not a setting FT has
    ("/api/edit", {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "hparams": {"num_steps": 5}}, 400),  # FT's
    (
        "/api/edit",
        {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "method": "ft-l", "hparams": {"norm_constraint": 0.0}},
        422,
    ),
    (
        "/api/edit",
        {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "hparams": {"mom2_dataset": "/etc/passwd"}},
        422,
    ),  # no server paths
    ("/api/edit", {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "hparams": {"layers": [29, 100_000]}}, 422),
    ("/api/edit", {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "hparams": {"layers": [45]}}, 400),
    ("/api/edit", {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "hparams": {"v_lr": -1.0}}, 422),
    ("/api/edit", {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "paraphrases": ["p"] * 50}, 422),
    ("/api/edit", {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome", "generate_tokens": True}, 422),
    ("/api/model", {"name": "gpt2"}, 404),  # unknown model
    ("/api/model", {"name": "../../etc/passwd"}, 422),  # path strings are not names
    ("/api/model", {"name": "/root/model.gguf"}, 422),
    ("/api/model", {"name": "HuggingFaceTB/SmolLM2-135M"}, 422),  # no hub ids either
    ("/api/model", {"name": ["smollm2-135m"]}, 422),
]


@pytest.mark.parametrize(
    "endpoint, body, status",
    HOSTILE_JSON,
    ids=[f"{i:02d}{e.replace('/', '_')}" for i, (e, _, _) in enumerate(HOSTILE_JSON)],
)
def test_hostile_json_requests(client, app, default_model, endpoint, body, status):
    before = state(app, default_model[0])
    r = client.post(endpoint, json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10
    assert state(app, default_model[0]) == before


def test_hostile_transport_requests(client, app, default_model):
    before = state(app, default_model[0])
    edit = {"prompt": PROMPT, "subject": SUBJECT, "target": "Rome"}
    cases = {
        "huge body": (
            lambda: client.post(
                "/api/edit",
                content=json.dumps({**edit, "x": "a" * 5_000_000}),
                headers={"content-type": "application/json"},
            ),
            413,
        ),
        "huge chunked body": (
            lambda: client.post(
                "/api/edit", content=(b"a" * 65536 for _ in range(64)), headers={"content-type": "application/json"}
            ),
            413,
        ),
        "malformed json": (
            lambda: client.post(
                "/api/edit", content=b'{"prompt": "The {} is", ', headers={"content-type": "application/json"}
            ),
            422,
        ),
        "not json": (
            lambda: client.post("/api/edit", content=json.dumps(edit), headers={"content-type": "text/plain"}),
            415,
        ),
        "cross-site form post": (
            lambda: client.post("/api/edit", json=edit, headers={"origin": "http://evil.example"}),
            403,
        ),
        "foreign host (DNS rebinding)": (lambda: client.get("/api/info", headers={"host": "evil.example"}), 400),
        "path traversal in patch id": (lambda: client.get("/api/patches/..%2F..%2Fetc%2Fpasswd/download"), 404),
        "bad patch id": (lambda: client.get("/api/patches/not-an-id/download"), 422),
        "unknown patch": (lambda: client.post("/api/patches/0123456789ab/revert"), 404),
        "unknown job": (lambda: client.get("/api/jobs/0123456789abcdef"), 404),
        "bad job id": (lambda: client.get("/api/jobs/..%2Fsecret"), 404),
        "upload not multipart": (
            lambda: client.post(
                "/api/patches/upload", content=b"x" * 100, headers={"content-type": "application/octet-stream"}
            ),
            415,
        ),
        "upload without file": (lambda: client.post("/api/patches/upload", files={"other": ("a", b"x")}), 422),
        "upload empty file": (lambda: upload(client, b""), 400),
        "upload too big": (lambda: upload(client, b"x" * 1_100_000), 413),
    }
    for name, (call, status) in cases.items():
        r = call()
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert state(app, default_model[0]) == before, name


def test_hostile_patch_uploads(client, app, default_model):
    model = default_model[0]
    before = state(app, model)
    for name, data in _patch_variants(model).items():
        r = upload(client, data, name="../../../etc/passwd")  # the file name is never used
        assert r.status_code in (400, 409), (name, r.status_code, r.text[:300])
        assert isinstance(r.json()["detail"], str), name
        assert state(app, model) == before, name


def _duplicate_entry_patch(model) -> bytes:
    patch = synthetic_patch(model)
    twice = synthetic_patch(model, scale=2e-3)
    patch = dataclasses.replace(patch, entries=[*patch.entries, twice.entries[0]])  # the same weight named twice
    return patch.to_bytes()


def _crafted_metadata(model) -> dict[str, bytes]:
    good = synthetic_patch(model).to_bytes()
    return {
        "requests not a list": with_meta(good, lambda m: m.update(requests=5)),
        "request not an object": with_meta(good, lambda m: m.update(requests=["x"])),
        "request prompt not a string": with_meta(good, lambda m: m.update(requests=[{"prompt": 5, "subject": "x"}])),
        "layers a string": with_meta(good, lambda m: m["hparams"].update(layers="x")),
        "layers of strings": with_meta(good, lambda m: m["hparams"].update(layers=["6"])),
        "hparams a list": with_meta(good, lambda m: m.update(hparams=[1])),
        "info a string": with_meta(good, lambda m: m.update(info="x")),
        "entry name a list": with_meta(good, lambda m: m["entries"][0].update(name=["model.layers.10.mlp"])),
        "entry shape of floats": with_meta(
            good, lambda m: m["entries"][0].update(shape=[float(d) for d in m["entries"][0]["shape"]])
        ),
        "fingerprint a number": with_meta(good, lambda m: m.update(base_fingerprint=5)),
        "identity a number": with_meta(good, lambda m: m.update(model_identity=5)),
        "method an object": with_meta(good, lambda m: m.update(method={"rome": 1})),
        "entry not an object": with_meta(good, lambda m: m.update(entries=[1])),
        "duplicate entry names": _duplicate_entry_patch(model),
    }


def test_uploads_with_crafted_metadata_are_refused(client, app, default_model):
    """Wrong metadata types and duplicate weights: 400 before any job, the model and the listing unharmed."""
    model = default_model[0]
    before = state(app, model)
    for name, data in _crafted_metadata(model).items():
        r = upload(client, data)
        assert r.status_code == 400, (name, r.status_code, r.text[:300])
        assert isinstance(r.json()["detail"], str), name
        assert state(app, model) == before, name
        listed = client.get("/api/patches")
        assert listed.status_code == 200 and listed.json()["patches"] == [], name


def test_upload_with_odd_but_valid_metadata_lists_and_reverts(client, app, default_model):
    model = default_model[0]
    before = state(app, model)
    good = synthetic_patch(model).to_bytes()
    odd = with_meta(
        good,
        lambda m: m.update(
            info={"nested": [1, {"x": None}]},
            hparams={"layers": [10], "other": {"a": [1]}},
            requests=[{"prompt": "The {} is in " + "x" * 2000, "subject": "Test", "target_new": None, "extra": [1, 2]}],
        ),
    )
    r = upload(client, odd)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"])
    assert job["status"] == "done", job["error"]
    listed = client.get("/api/patches")
    assert listed.status_code == 200
    (entry,) = listed.json()["patches"]
    assert entry["layers"] == [10] and entry["request"]["target_new"] is None and len(entry["request"]["text"]) <= 1100
    rv = wait_job(client, client.post(f"/api/patches/{entry['id']}/revert").json()["job"])
    assert rv["status"] == "done" and rv["result"]["restored_base"], rv["error"]
    after = state(app, model)
    assert {k: v for k, v in after.items() if k != "jobs"} == {k: v for k, v in before.items() if k != "jobs"}


def test_patch_summary_never_raises(default_model):
    from factedit.web.patches import PatchListing

    patch = synthetic_patch(default_model[0])
    odd_entry = dataclasses.replace(patch.entries[0], name=["not", "a", "name"])
    patch = dataclasses.replace(
        patch,
        requests=5,
        hparams={"layers": "x"},
        method=["rome"],  # as an unchecked file
        entries=[odd_entry],
    )  # could say
    summary = PatchListing(id="0123456789ab", patch=patch, source="upload").summary()
    assert summary["method"] is None and summary["layers"] is None and summary["weights"] == []
    assert summary["n_requests"] == 0 and summary["request"]["text"] is None and summary["id"] == "0123456789ab"
    json.dumps(summary)


def test_security_headers(client):
    for r in (
        client.get("/"),
        client.get("/api/info"),
        client.get("/static/app.js"),
        client.post("/api/predict", json={"prompt": PROMPT}, headers={"origin": "http://evil.example"}),
    ):
        assert r.headers["x-frame-options"] == "DENY", r.url
        assert r.headers["x-content-type-options"] == "nosniff"
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp and "unsafe-inline" not in csp
    page = client.get("/").text
    assert "<script>" not in page and "<style" not in page and " style=" not in page  # nothing inline for the CSP
    assert client.get("/docs").status_code == 404  # Swagger UI would load scripts from a CDN


def test_origin_must_be_the_requests_own(client, app, default_model):
    before = state(app, default_model[0])
    body = {"prompt": PROMPT, "k": 1}
    assert client.post("/api/predict", json=body, headers={"origin": "http://127.0.0.1"}).status_code == 200
    assert client.post("/api/predict", json=body, headers={"origin": "http://127.0.0.1:80"}).status_code == 200
    for origin in (
        "http://127.0.0.1:8001",
        "https://127.0.0.1",
        "http://localhost",
        "null",
        "http://evil.example",
        "http://127.0.0.1:99999",
        "file://",
        "http://user@127.0.0.1",
    ):
        r = client.post("/api/predict", json=body, headers={"origin": origin})
        assert r.status_code == 403 and "cross-origin" in r.json()["detail"], origin
    r = client.get("/api/info", headers={"host": "evil.example"})
    assert r.status_code == 400 and "Host" in r.json()["detail"]  # JSON, like every refusal
    assert state(app, default_model[0]) == before


def test_host_and_origin_checks_when_bound_beyond_loopback(default_model):
    """Binding 0.0.0.0 with --allowed-host box.lan: other Host names refused, cross-site posts still refused."""
    from factedit.cli.serve import allowed_hosts_for
    from factedit.errors import FactEditError
    from factedit.web.app import same_origin, split_host_header

    assert "127.0.0.2" in allowed_hosts_for("127.0.0.2", None)
    hosts = allowed_hosts_for("0.0.0.0", ["box.lan", "[fd00::1]"])
    assert "box.lan" in hosts and "fd00::1" in hosts and "0.0.0.0" not in hosts and "localhost" in hosts
    for bad in ("http://box.lan", "box.lan:8000", "a b"):
        with pytest.raises(FactEditError):
            allowed_hosts_for("0.0.0.0", [bad])
    assert split_host_header("[::1]:8000") == ("::1", 8000) and split_host_header("Box.LAN") == ("box.lan", None)
    assert split_host_header("::1") is None and split_host_header("a:b") is None and split_host_header(":80") is None
    assert same_origin("http://[::1]:8000", "http", "[::1]:8000")
    assert not same_origin("http://[::1]:8001", "http", "[::1]:8000")

    model, tok = default_model
    app = create_app(model, tok, allowed_hosts=hosts)
    try:
        c = TestClient(app, base_url="http://box.lan:8000")
        assert c.get("/api/info").status_code == 200
        ok = c.post("/api/predict", json={"prompt": PROMPT, "k": 1}, headers={"origin": "http://box.lan:8000"})
        assert ok.status_code == 200
        for origin in ("http://evil.example", "http://box.lan:9000", "http://127.0.0.1:8000"):
            r = c.post("/api/predict", json={"prompt": PROMPT, "k": 1}, headers={"origin": origin})
            assert r.status_code == 403, origin
        assert c.get("/api/info", headers={"host": "evil.example:8000"}).status_code == 400
        assert c.get("/api/info", headers={"host": "127.0.0.1:8000"}).status_code == 200
    finally:
        app.state.jobs.shutdown(wait=True, timeout=30)


def test_serve_command_is_registered_and_refuses_a_missing_model(tmp_path):
    from typer.testing import CliRunner

    from factedit.cli.main import app as cli

    runner = CliRunner()
    assert "serve" in runner.invoke(cli, ["--help"]).output
    result = runner.invoke(cli, ["serve", "--model", str(tmp_path / "missing.gguf"), "--port", "0"])
    assert result.exit_code == 2 and "not found" in result.output
