"""Guarded edits: an edit that moves the probe too far is rolled back bit-exact and recorded as refused;
a guard that never trips changes nothing; a resumed guarded run never re-applies a refused edit.

Tiny random models with the small byte-level tokenizer of :mod:`tests.gguf_files`; FT edits (fast). The
edit that must trip is made to: it rewrites, on its exact text, a prompt the guard probes.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from factedit.data.counterfact import load_counterfact
from factedit.editing.methods import get_method
from factedit.editing.requests import EditRequest
from factedit.editing.sequential import SequentialEditor
from factedit.errors import FactEditError
from factedit.evaluation.batched import read_drift, read_guard
from factedit.evaluation.config import GuardSettings, RunConfig
from factedit.evaluation.guard import EditGuard, guarded_step
from factedit.evaluation.records import read_cases
from factedit.evaluation.runner import run_evaluation
from factedit.evaluation.summary import summarize_runs, to_markdown
from factedit.models.fingerprint import model_fingerprint

from .gguf_files import byte_level_tokenizer, wide_tiny_model
from .test_generative import CASES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(windows=1, window_tokens=32, known_facts=10)  # a probe of a few forward passes
NEVER = dict(
    max_neighbour_drop=1.0,
    max_known_drop=1.0,
    max_ppl_rise=1e6,
    max_total_neighbour_drop=1.0,
    max_total_known_drop=1.0,
    max_total_ppl_rise=1e6,
)
# A third case, between the two of test_generative (its edit is the one the guard refuses in the run below).
EREBUS = {
    "case_id": 11,
    "requested_rewrite": {
        "prompt": "{} is located in the continent of",
        "subject": "Mount Erebus",
        "target_new": {"str": "Europe", "id": "Q46"},
        "target_true": {"str": "Antarctica", "id": "Q51"},
    },
    "paraphrase_prompts": ["Mount Erebus lies in"],
    "neighborhood_prompts": ["Vinson Massif is located in the continent of"],
    "attribute_prompts": [],
    "generation_prompts": ["Mount Erebus is"],
}
FT = {"num_steps": 25}
LIMIT = {"max_ppl_rise": 0.01}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return byte_level_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model(tok):
    return wide_tiny_model(tok)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cf.json"
    path.write_text(json.dumps([CASES[0], EREBUS, CASES[1]]))
    return path


def _ft(model, tok, requests):
    method = get_method("ft")
    return method.compute(model, tok, requests, method.hparams(model, None, FT))


def test_an_edit_that_trips_is_rolled_back_bit_exact_and_says_why(model, tok, data):
    """The edit rewrites a known fact the guard probes, on its exact prompt: the fact is lost, so it must trip."""
    guard = EditGuard.build(model, tok, GuardSettings(**SMALL))  # no edited subjects: every known fact may be probed
    assert guard.baseline["known_acc"] == 1.0 and guard.baseline["ppl_tokens"] > 0
    fact = guard.probe.facts[0]
    request = EditRequest(fact.prompt.replace(fact.subject, "{}", 1), fact.subject, "Antarctica")
    method = get_method("ft")
    patch = method.compute(model, tok, [request], method.hparams(model, None, {"num_steps": 25, "lr": 0.05})).patch
    before = model_fingerprint(model)
    verdict = guard.try_patch(model, tok, patch)
    assert not verdict.accepted
    assert model_fingerprint(model) == before  # bit-exact: the weights are those before the edit
    assert verdict.after["known_acc"] < 1.0
    assert any(r.startswith("known facts fell") for r in verdict.reasons)
    assert guard.current == guard.baseline  # the model is measured as unedited again
    assert verdict.record()["verdict"] == "refused"


def test_a_guard_for_one_edit_judges_applied_patches_and_undoes_a_refused_one(model, tok):
    """``factedit edit --guard``'s path: the guard is built before the edit, the edit is applied, then judged;
    the user's neighbour prompts are probed against what the unedited model answers them."""
    probe = EditGuard.build(model, tok, GuardSettings(**SMALL))
    fact = probe.probe.facts[0]
    request = EditRequest(fact.prompt.replace(fact.subject, "{}", 1), fact.subject, "Antarctica")
    neighbour = "Vinson Massif is located in the continent of"
    guard = EditGuard.for_requests(model, tok, [request], [neighbour], GuardSettings(**SMALL))
    assert [n.prompts for n in guard.neighbours] == [(neighbour,)]
    assert guard.neighbours[0].new == request.new_text
    assert all(f.subject != fact.subject for f in guard.probe.facts)  # the edited subject is not probed
    before = model_fingerprint(model)
    method = get_method("ft")
    # the edit rewrites the known fact on the prompt of another probed fact's subject: strict limits trip
    patch = method.compute(model, tok, [request], method.hparams(model, None, {"num_steps": 25, "lr": 0.05})).patch
    strict = EditGuard.for_requests(model, tok, [request], [neighbour], GuardSettings(**SMALL, max_ppl_rise=1e-6))
    handle = patch.apply(model)
    verdict = strict.check_applied(model, tok, [handle])
    assert not verdict.accepted and verdict.reasons
    assert model_fingerprint(model) == before  # undone bit-exact
    loose = EditGuard.for_requests(model, tok, [request], [neighbour], GuardSettings(**SMALL, **NEVER))
    handle = patch.apply(model)
    verdict = loose.check_applied(model, tok, [handle])
    assert verdict.accepted and verdict.handle is handle and model_fingerprint(model) != before
    handle.revert()
    assert model_fingerprint(model) == before


def test_a_guard_that_never_trips_gives_the_weights_of_no_guard(model, tok, data):
    cases = load_counterfact(str(data)).cases
    requests = [c.request for c in cases]
    before = model_fingerprint(model)
    hp = get_method("ft").hparams(model, None, FT)
    plain = SequentialEditor(model, tok, "ft", hp)
    for request in requests:
        plain.step([request])
    unguarded = model_fingerprint(model)
    plain.revert_all()
    assert model_fingerprint(model) == before
    guard = EditGuard.build(model, tok, GuardSettings(**SMALL, **NEVER), cases=cases)
    guarded = SequentialEditor(model, tok, "ft", hp, undo_depth=1)
    verdicts = [guarded_step(guarded, [request], guard)[1] for request in requests]
    assert all(v.accepted for v in verdicts)
    assert model_fingerprint(model) == unguarded != before
    guarded.revert_all()
    with pytest.raises(FactEditError, match="undo_depth"):
        guarded_step(SequentialEditor(model, tok, "ft", hp), requests[:1], guard)


def _config(data, **guard) -> RunConfig:
    return RunConfig(
        method="ft",
        dataset="counterfact",
        data_path=str(data),
        sequential=True,
        drift_every=1,
        answer_tokens=4,
        overrides=FT,
        guard=GuardSettings(**SMALL, **guard),
    )


def test_a_guarded_run_refuses_resumes_and_summarises(model, tok, data, tmp_path):
    """Case 11's edit raises the held-out perplexity by 2.3% (measured; the other two lower it): refused."""
    base = model_fingerprint(model)
    out = tmp_path / "guarded"
    run_evaluation(model, tok, _config(data, **LIMIT), out, progress=False)
    assert model_fingerprint(model) == base
    records = read_cases(out)
    verdicts = {k: r["guard"]["verdict"] for k, r in records.items()}
    assert verdicts == {"7": "accepted", "11": "refused", "9": "accepted"}
    refused = records["11"]
    assert refused["edit"]["refused"] and refused["guard"]["reasons"][0].startswith("perplexity rose")
    assert refused["edit"]["edits_in_model"] == 2  # scored on the final model, without its own edit
    assert (out / "patches" / "step_00001.refused.safetensors").is_file()
    assert not (out / "patches" / "step_00001.safetensors").exists()
    log = read_guard(out)
    assert log["baseline"]["settings"] == GuardSettings(**SMALL, **LIMIT).describe()
    assert [s["verdict"] for s in log["steps"]] == ["accepted", "refused", "accepted"]
    drift = {p["step"]: p for p in read_drift(out)}
    assert drift[3]["refused"] == 1 and drift[3]["edits"] == 2
    assert sorted(drift) == [0, 1, 2, 3]  # the refused step keeps its drift point: the model without its edit
    assert drift[2]["refused"] == 1 and drift[2]["edits"] == 1
    summary = summarize_runs([out])
    assert summary.rows[-1].refused == 1 and "the guard refused 1 of its 3 edits" in to_markdown(summary)

    # killed after the sequence, before the cases were written: resumed, nothing is judged or computed again
    posts = {k: r["post"] for k, r in records.items()}
    guard_lines = (out / "guard.jsonl").read_text()
    step_files = {p.name: load_file(p) for p in (out / "patches").glob("step_*.safetensors")}
    (out / "cases.jsonl").unlink()
    # and the point after the refused step lost (a run from before points were taken at refused steps):
    # measured again on resume, though the refused step is never judged again
    lines = (out / "drift.jsonl").read_text().splitlines(keepends=True)
    (out / "drift.jsonl").write_text("".join(line for line in lines if json.loads(line)["case_id"] != 2))
    run_evaluation(model, tok, _config(data, **LIMIT), out, progress=False)
    assert {p["step"]: p for p in read_drift(out)} == drift
    assert (out / "guard.jsonl").read_text() == guard_lines
    again = read_cases(out)
    assert {k: r["guard"]["verdict"] for k, r in again.items()} == verdicts
    assert {k: r["post"] for k, r in again.items()} == posts
    for name, tensors in step_files.items():
        assert all((load_file(out / "patches" / name)[k] == v).all() for k, v in tensors.items())
    assert model_fingerprint(model) == base
    with pytest.raises(FactEditError, match="other guard settings"):
        run_evaluation(model, tok, _config(data, max_ppl_rise=0.5), out, progress=False)
    with pytest.raises(FactEditError, match="guarded run"):
        run_evaluation(model, tok, _unguarded(data), out, progress=False)


def _unguarded(data) -> RunConfig:
    config = _config(data)
    config.guard = None
    return config


def test_a_never_tripping_guarded_run_makes_the_same_edits_as_no_guard(model, tok, data, tmp_path):
    run_evaluation(model, tok, _unguarded(data), tmp_path / "plain", progress=False)
    run_evaluation(model, tok, _config(data, **NEVER), tmp_path / "never", progress=False)
    plain, never = read_cases(tmp_path / "plain"), read_cases(tmp_path / "never")
    assert {k: r["post"] for k, r in plain.items()} == {k: r["post"] for k, r in never.items()}
    assert all(r["guard"]["verdict"] == "accepted" for r in never.values())
    for path in (tmp_path / "plain" / "patches").glob("step_*.safetensors"):
        theirs = load_file(tmp_path / "never" / "patches" / path.name)
        assert all((theirs[k] == v).all() for k, v in load_file(path).items())


def test_guard_settings_are_checked_before_anything_runs(data):
    with pytest.raises(FactEditError, match="max_ppl_rise"):
        GuardSettings(max_ppl_rise=-0.1).check()
    with pytest.raises(FactEditError, match="max_known_drop"):
        GuardSettings(max_known_drop=float("nan")).check()
    with pytest.raises(FactEditError, match="--sequential"):
        RunConfig(method="ft", dataset="counterfact", guard=GuardSettings()).check()
