"""Batch (MEMIT) and sequential evaluation runs on the default model: every case scored, the model
restored, and a killed run resumed to the same per-case results without recomputing saved edits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factedit.data import load_dataset
from factedit.editing.patch import Patch
from factedit.errors import FactEditError
from factedit.evaluation import RunConfig, batched, run_evaluation
from factedit.evaluation.batched import read_drift
from factedit.evaluation.cases import GENERATIVE_KEYS, GenerativeSettings, generative_scores
from factedit.evaluation.records import CASES
from factedit.models import model_fingerprint

from .tiny_models import tiny_model

# Small but real settings: two critical layers, a 4k-token second moment, few optimisation steps.
FAST = {"layers": [5, 6], "mom2_n_tokens": 4000, "v_num_grad_steps": 6}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Stop(Exception):
    pass


def _cases(folder) -> dict[str, dict]:
    rows = [json.loads(line) for line in (folder / CASES).read_text().splitlines()]
    return {str(r["case_id"]): r for r in rows}


def test_memit_batches_score_every_case_and_resume_identically(tokenizer, tmp_path):
    """On a tiny random Llama (chunking and resuming are the same on any model; the default model took
    a minute here): every case scored, saved chunks re-applied, not recomputed, on resume."""
    model, tok = tiny_model("llama"), tokenizer
    before = model_fingerprint(model)
    tiny = {**FAST, "layers": [1, 2], "v_num_grad_steps": 25}
    config = RunConfig(method="memit", dataset="counterfact", n=3, batch=2, overrides=tiny, generative=False)
    full = run_evaluation(model, tok, config, tmp_path / "full", progress=False)
    assert (full.total, full.errors) == (3, 0)
    assert model_fingerprint(model) == before
    cases = _cases(tmp_path / "full")
    assert [c["edit"]["chunk_size"] for c in cases.values()] == [2, 2, 1]
    assert sorted((tmp_path / "full" / "patches").glob("chunk_*.safetensors"))  # kept for resuming
    # MEMIT writes the new fact: on every rewrite prompt the new target's NLL goes down.
    for c in cases.values():
        assert c["post"]["rewrite_prompts_probs"][0]["target_new"] < c["pre"]["rewrite_prompts_probs"][0]["target_new"]

    killed = tmp_path / "killed"
    seen = []

    def stop(case_id, record):
        seen.append(case_id)
        raise _Stop

    with pytest.raises(_Stop):
        run_evaluation(model, tok, config, killed, on_case=stop, progress=False)
    first_chunk = killed / "patches" / "chunk_00000.safetensors"
    stamp = first_chunk.stat().st_mtime_ns
    report = run_evaluation(model, tok, config, killed, progress=False)
    assert report.evaluated == 2 and model_fingerprint(model) == before
    assert first_chunk.stat().st_mtime_ns == stamp  # the saved edit was re-applied, not recomputed
    resumed = _cases(killed)
    for key, case in cases.items():
        assert resumed[key]["post"] == case["post"], key
        assert resumed[key]["pre"] == case["pre"], key


def test_batch_run_answers_are_those_of_each_case_alone(tokenizer, tmp_path):
    """A batch run answers the greedy prompts of several cases in shared batches (one model state): each
    case's generative blocks, before and after the edit, are those it gets scored alone."""
    model, tok = tiny_model("llama"), tokenizer
    tiny = {**FAST, "layers": [1, 2], "v_num_grad_steps": 8}
    config = RunConfig(method="memit", dataset="counterfact", n=3, batch=3, overrides=tiny, answer_tokens=4)
    run_evaluation(model, tok, config, tmp_path / "run", progress=False)
    records = _cases(tmp_path / "run")
    settings = GenerativeSettings(max_new_tokens=4)
    cases = load_dataset("counterfact", n=3).cases
    alone = {str(c.case_id): generative_scores(model, tok, c, settings) for c in cases}
    handle = Patch.load(tmp_path / "run" / "patches" / "chunk_00000.safetensors").apply(model)
    try:
        edited = {str(c.case_id): generative_scores(model, tok, c, settings) for c in cases}
    finally:
        handle.revert()
    assert set(records) == set(alone)
    for key, record in records.items():
        assert {k: record["pre"][k] for k in GENERATIVE_KEYS} == alone[key], key
        assert {k: record["post"][k] for k in GENERATIVE_KEYS} == edited[key], key


def test_drift_points_at_given_numbers_of_edits(tokenizer, tmp_path):
    """``drift_at``: a drift point once 2 and 5 edits are in the model (steps of 2: after steps 1 and 3),
    besides the unedited reference; more than the run makes falls on its last step."""
    config = RunConfig(method="memit", dataset="counterfact", n=5, batch=2, sequential=True, drift_at=(2, 5, 50))
    assert config.drift_steps(3) == {0, 1, 3}
    plain = {"method": "rome", "dataset": "counterfact", "sequential": True}
    assert RunConfig(**plain, drift_every=2, drift_at=(1,)).drift_steps(5) == {0, 1, 2, 4}
    assert RunConfig(**plain).drift_steps(5) == set()
    with pytest.raises(FactEditError, match="drift_at needs a sequential run"):
        RunConfig(method="memit", dataset="counterfact", batch=2, drift_at=(2,)).check()
    with pytest.raises(FactEditError, match="drift_at must be"):
        RunConfig(method="memit", dataset="counterfact", sequential=True, drift_at=(0,)).check()
    model, tok = tiny_model("llama"), tokenizer
    tiny = {**FAST, "layers": [1, 2], "v_num_grad_steps": 4}
    run = {"overrides": tiny, "generative": False, "n": 3}
    run_evaluation(model, tok, RunConfig(**{**config.__dict__, **run}), tmp_path / "run", progress=False)
    drift = read_drift(tmp_path / "run")
    assert [d["edits"] for d in drift] == [0, 2, 3]  # steps 0, 1 and the last (2)
    assert all(0.0 <= d["paraphrases_holding"] <= 1.0 for d in drift)
    assert [d["measured_cases"] for d in drift] == [3, 2, 3]  # every edit made so far (under drift_cases)


@pytest.mark.slow  # 150 s on this CPU; CI covers sequential runs with MEMIT (test_cli_sequential_memit_...)
def test_sequential_alphaedit_keeps_edits_tracks_drift_and_resumes(default_model, tmp_path, monkeypatch):
    model, tok = default_model
    before = model_fingerprint(model)
    config = RunConfig(
        method="alphaedit",
        dataset="counterfact",
        n=2,
        sequential=True,
        drift_every=1,
        overrides=FAST,
        n_gen=1,  # drift fluency on one short text per case: the protocol, not its statistics, is tested
        max_out_len=40,
    )
    run_evaluation(model, tok, config, tmp_path / "full", progress=False)
    assert model_fingerprint(model) == before
    cases = _cases(tmp_path / "full")
    assert {c["edit"]["edits_in_model"] for c in cases.values()} == {2}
    assert sorted(c["edit"]["step"] for c in cases.values()) == [0, 1]
    drift = read_drift(tmp_path / "full")
    assert [d["edits"] for d in drift] == [0, 1, 2]  # step 0: the unedited model, the reference
    assert all(0.0 <= d["edits_holding"] <= 1.0 for d in drift)
    assert drift[0]["measured_cases"] == 2  # both cases the sequence will edit
    assert [d["fluency_cases"] for d in drift] == [2, 1, 2] and all(d["ngram_entropy"] > 1.0 for d in drift)

    # killed while computing the second step: the first is re-applied with AlphaEdit's kept keys
    real_compute, calls = batched._compute, []

    def dying_compute(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Stop
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(batched, "_compute", dying_compute)
    with pytest.raises(_Stop):
        run_evaluation(model, tok, config, tmp_path / "killed", progress=False)
    assert model_fingerprint(model) == before
    calls.clear()
    monkeypatch.setattr(batched, "_compute", lambda *a, **k: (calls.append(1), real_compute(*a, **k))[1])
    run_evaluation(model, tok, config, tmp_path / "killed", progress=False)
    assert len(calls) == 1  # only the second step was computed again
    assert model_fingerprint(model) == before
    resumed = _cases(tmp_path / "killed")
    for key, case in cases.items():
        assert resumed[key]["post"] == case["post"], key

    # a finished run whose drift points are missing replays its saved steps to measure them again
    calls.clear()
    (tmp_path / "full" / "drift.jsonl").unlink()
    run_evaluation(model, tok, config, tmp_path / "full", progress=False)
    assert not calls and model_fingerprint(model) == before
    assert read_drift(tmp_path / "full") == drift


def test_pre_scores_are_reused_and_modes_are_checked(tokenizer, tmp_path):
    """On a tiny random Llama: which scores are reused and which settings are refused is bookkeeping."""
    model, tok = tiny_model("llama"), tokenizer
    run_evaluation(model, tok, RunConfig(method="none", dataset="zsre", n=2), tmp_path / "none", progress=False)
    tiny = {**FAST, "layers": [1, 2]}
    config = RunConfig(method="memit", dataset="zsre", n=2, batch=2, overrides=tiny, pre_from=str(tmp_path / "none"))
    run_evaluation(model, tok, config, tmp_path / "memit", progress=False)
    none, memit = _cases(tmp_path / "none"), _cases(tmp_path / "memit")
    assert {k: v["pre"] for k, v in memit.items()} == {k: v["pre"] for k, v in none.items()}
    assert not (tmp_path / "memit" / "pre.jsonl").exists() or not (tmp_path / "memit" / "pre.jsonl").read_text()

    # unedited scores taken from a run without the generative blocks are completed once and kept, so a
    # resumed run does not measure them again; the completed blocks are those the unedited run measured
    plain = RunConfig(method="none", dataset="zsre", n=2, generative=False)
    run_evaluation(model, tok, plain, tmp_path / "plain", progress=False)
    completed = RunConfig(**{**config.__dict__, "pre_from": str(tmp_path / "plain")})
    run_evaluation(model, tok, completed, tmp_path / "completed", progress=False)
    kept = {
        str(line["case_id"]): line["pre"] for line in map(json.loads, (tmp_path / "completed" / "pre.jsonl").open())
    }
    assert kept == {k: v["pre"] for k, v in none.items()}
    assert all(set(GENERATIVE_KEYS) <= set(pre) for pre in kept.values())

    with pytest.raises(FactEditError, match="makes no edits"):
        run_evaluation(
            model, tok, RunConfig(method="none", dataset="zsre", n=1, batch=2), tmp_path / "a", progress=False
        )
    with pytest.raises(FactEditError, match="one request at a time"):
        run_evaluation(
            model, tok, RunConfig(method="rome", dataset="zsre", n=2, batch=2), tmp_path / "b", progress=False
        )
    with pytest.raises(FactEditError, match="selection.n"):  # chunks depend on n: it cannot grow
        run_evaluation(model, tok, RunConfig(**{**config.__dict__, "n": 3}), tmp_path / "memit", progress=False)
    with pytest.raises(FactEditError, match="drift_every"):
        run_evaluation(model, tok, RunConfig(**{**config.__dict__, "drift_every": 1}), tmp_path / "c", progress=False)
    with pytest.raises(FactEditError, match="other settings"):  # a batch run cannot resume as a sequence
        run_evaluation(
            model, tok, RunConfig(**{**config.__dict__, "sequential": True}), tmp_path / "memit", progress=False
        )


def test_cli_sequential_memit_reports_holding_after_every_step(tmp_path, corpus_file):
    """``factedit edit --method memit --sequential``: both facts edited one step after another, the
    share of earlier edits still holding reported per step, and the patches saved per step."""
    from typer.testing import CliRunner

    from factedit.cli.main import app

    requests = tmp_path / "requests.json"
    requests.write_text(
        json.dumps(
            [
                {"prompt": "The {} is located in the city of", "subject": "Eiffel Tower", "target": "Rome"},
                {"prompt": "{} plays the sport of", "subject": "LeBron James", "target": "football"},
            ]
        )
    )
    hparams = tmp_path / "memit.json"
    hparams.write_text(json.dumps({**FAST, "v_num_grad_steps": 10}))
    result = CliRunner().invoke(
        app,
        [
            "edit",
            "--method",
            "memit",
            "--requests",
            str(requests),
            "--sequential",
            "--hparams",
            str(hparams),
            "--corpus",
            str(corpus_file),
            "--save",
            str(tmp_path / "patches"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    out = json.loads(last[last.index('{"request"') :])  # after any progress bar on the same line
    assert [(d["step"], d["edits"], d["measured"]) for d in out["drift"]] == [(1, 1, 1), (2, 2, 2)]
    assert out["drift"][0]["edits_holding"] == 1.0
    assert all(a["p_target_new"] > b["p_target_new"] for a, b in zip(out["after"], out["before"]))
    assert len(out["patch"]) == 2 and all(Path(p).is_file() for p in out["patch"])
