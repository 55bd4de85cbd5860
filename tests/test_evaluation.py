"""Evaluation harness: metric definitions, data loaders, resumable runs, summaries, FT/FT-L baselines."""

from __future__ import annotations

import json
import logging
import math
from importlib import resources
from pathlib import Path

import pytest
import torch

from factedit import EditRequest
from factedit.data import DatasetError, load_counterfact, load_known_facts, load_zsre, parse_counterfact
from factedit.editing.ft import FTHyperParams, FTLHyperParams, compute_ft, compute_ft_each
from factedit.editing.methods import METHODS, EditMethod, register
from factedit.errors import FactEditError
from factedit.evaluation import RunConfig, run_evaluation, summarize_runs, to_csv, to_markdown
from factedit.evaluation.metrics import (
    TfidfModel,
    bootstrap_ci,
    counterfact_case_scores,
    generation_entropy,
    harmonic_mean,
    mean_ci,
    text_ngram_entropy,
    word_tokenize,
    zsre_case_scores,
)
from factedit.evaluation.records import CASES, MANIFEST, CaseLog
from factedit.evaluation.summary import plot
from factedit.models import arch_for, model_fingerprint
from factedit.predict import score_continuations, target_log_probs

from .tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


MADRID = EditRequest("{}, which is located in", "Autonomous University of Madrid", "Sweden", "Spain")


# -- metric definitions on hand-computable inputs -------------------------------------------------------------
def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert text_ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert text_ngram_entropy("") == 0.0
    assert text_ngram_entropy("word") == 0.0  # no bigrams: 0, as ROME's empty FreqDist
    # all distinct: 4 tokens -> 3 bigrams, 2 trigrams
    expected = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    assert generation_entropy(["w x y z", "w x y z"]) == pytest.approx(expected)


def test_word_tokenize_follows_treebank():
    assert word_tokenize("I don't know, John's well-known U.S. car.") == [
        "I",
        "do",
        "n't",
        "know",
        ",",
        "John",
        "'s",
        "well-known",
        "U.S.",
        "car",
        ".",
    ]


def test_tfidf_matches_smooth_idf_formula():
    docs = ["the cat sat", "the dog sat", "a cat ran"]  # "a" is dropped by the 2+ character token pattern
    model = TfidfModel.fit(docs)
    idf = {w: math.log(4 / (1 + df)) + 1 for w, df in {"the": 2, "cat": 2, "sat": 2, "dog": 1, "ran": 1}.items()}
    for w, v in idf.items():
        assert model.idf[model.vocabulary[w]] == pytest.approx(v)
    # "cat sat" vs "dog sat": only "sat" is shared
    expected = idf["sat"] ** 2 / (math.hypot(idf["cat"], idf["sat"]) * math.hypot(idf["dog"], idf["sat"]))
    assert model.similarity("cat sat", "dog sat") == pytest.approx(expected)
    assert model.similarity("Cat SAT", "cat sat") == pytest.approx(1.0)
    assert model.similarity("cat", "dog") == 0.0
    assert model.similarity("unknown words", "cat") == 0.0


def test_counterfact_case_scores_by_hand():
    block = {
        "rewrite_prompts_probs": [{"target_new": 0.5, "target_true": 1.0}],
        "paraphrase_prompts_probs": [{"target_new": 0.5, "target_true": 1.0}, {"target_new": 2.0, "target_true": 1.0}],
        "neighborhood_prompts_probs": [
            {"target_new": 3.0, "target_true": 1.0},
            {"target_new": 1.0, "target_true": 1.0},
        ],
        "rewrite_prompts_correct": [True],
        "paraphrase_prompts_correct": [True, False],
        "neighborhood_prompts_correct": [False, False],
        "ngram_entropy": 6.25,
    }
    s = counterfact_case_scores(block)
    e = math.exp
    assert s["rewrite_success"] == 1.0
    assert s["rewrite_diff"] == pytest.approx(e(-0.5) - e(-1.0))
    assert s["paraphrase_success"] == 0.5  # averaged within the case first
    assert s["paraphrase_diff"] == pytest.approx(((e(-0.5) - e(-1)) + (e(-2) - e(-1))) / 2)
    assert s["neighborhood_success"] == 0.5  # a tie is not a success
    assert s["neighborhood_diff"] == pytest.approx((e(-1) - e(-3)) / 2)
    assert (s["rewrite_acc"], s["paraphrase_acc"], s["neighborhood_acc"]) == (1.0, 0.5, 0.0)
    assert s["ngram_entropy"] == 6.25


def test_zsre_scores_harmonic_mean_and_intervals():
    assert zsre_case_scores({"rewrite_prompts_correct": [True, False, True]})["rewrite_acc"] == pytest.approx(2 / 3)
    assert harmonic_mean([100, 50, 100]) == pytest.approx(75.0)
    assert harmonic_mean([100, 0, 100]) == 0.0
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
    mean, half = mean_ci([0.0] * 20 + [1.0] * 20)  # t(39) = 2.0227
    assert half == pytest.approx(2.0227 * math.sqrt(40 / 39 * 0.25) / math.sqrt(40), rel=1e-3)
    point, lo, hi = bootstrap_ci([[1.0, 1.0, 0.0, 1.0]], lambda m: float(m[0]), n_boot=500, seed=0)
    assert point == 0.75 and 0.0 <= lo <= point <= hi <= 1.0
    assert bootstrap_ci([[1.0, 1.0, 0.0, 1.0]], lambda m: float(m[0]), n_boot=500, seed=0)[1:] == (lo, hi)


def _fake_run(folder: Path, method: str, posts: list[dict], pre: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    manifest = {
        "format": "factedit-eval-run-v1",
        "method": method,
        "dataset": {"name": "counterfact", "sha256": "x"},
        "model": {"fingerprint": "f"},
        "notes": [],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    log = CaseLog(folder / CASES)
    for i, post in enumerate(posts):
        log.append({"case_id": i, "pre": pre or post, "post": post, "timing": {"edit_s": 1.0 + i, "total_s": 2.0 + i}})
    return folder


def _block(rw_new_wins: bool, para_wins: list[bool], neigh_kept: list[bool]) -> dict:
    def pair(win):
        return {"target_new": 1.0, "target_true": 2.0} if win else {"target_new": 2.0, "target_true": 1.0}

    return {
        "rewrite_prompts_probs": [pair(rw_new_wins)],
        "paraphrase_prompts_probs": [pair(w) for w in para_wins],
        "neighborhood_prompts_probs": [pair(not k) for k in neigh_kept],
    }


def test_summary_tables_and_plot(tmp_path):
    posts = [
        _block(True, [True, True], [True, False]),
        _block(True, [True, False], [True, True]),
        _block(False, [False, False], [True, True]),
        _block(True, [True, True], [True, True]),
    ]
    run = _fake_run(tmp_path / "runA", "rome", posts, pre=_block(False, [False, False], [True, True]))
    s = summarize_runs([run], n_boot=200)
    pre_row, row = s.rows
    assert pre_row.cells["ES"].mean == 0.0 and pre_row.cells["NS"].mean == 100.0
    assert row.n == 4 and row.cells["ES"].mean == pytest.approx(75.0)
    assert row.cells["PS"].mean == pytest.approx(62.5)  # (1 + .5 + 0 + 1) / 4
    assert row.cells["NS"].mean == pytest.approx(87.5)
    assert row.cells["S"].mean == pytest.approx(harmonic_mean([75.0, 62.5, 87.5]))
    assert row.cells["ΔNS"].mean == pytest.approx(87.5 - 100.0)  # paired against the cases' pre
    assert row.cells["ES"].high <= 100.0 and row.cells["ES"].low >= 0.0  # clipped rates
    assert row.cells["edit s"].mean == pytest.approx(2.5)
    assert row.cells["cases/min"].mean == pytest.approx(60 * 4 / (2 + 3 + 4 + 5))  # 4 cases in 14 s
    md, csv_text = to_markdown(s), to_csv(s)
    assert "| runA | rome | 4 | 75.0" in md and "pre (unedited)" in md
    assert "counterfact,runA,rome,4,S," in csv_text
    assert plot(s, tmp_path / "p.png").stat().st_size > 1000
    # a second run with fewer cases: compared on the common cases only
    run_b = _fake_run(tmp_path / "runB", "ft", posts[:2])
    s2 = summarize_runs([run, run_b], n_boot=50)
    assert [r.n for r in s2.rows] == [2, 2, 2] and any("every run finished" in n for n in s2.notes)


def test_summarize_cli(tmp_path):
    from typer.testing import CliRunner

    from factedit.cli.main import app

    run = _fake_run(tmp_path / "r", "ft", [_block(True, [True, False], [True, True])] * 3)
    result = CliRunner().invoke(app, ["summarize", str(run), "--format", "both", "--csv", str(tmp_path / "t.csv")])
    assert result.exit_code == 0, result.output
    assert "| r | ft | 3 | 100.0" in result.output and (tmp_path / "t.csv").is_file()
    bad = CliRunner().invoke(app, ["summarize", str(tmp_path / "missing")])
    assert bad.exit_code == 2


# -- loaders on the shared data -------------------------------------------------------------------------------
def test_counterfact_loaders(data_dir):
    ds = load_counterfact(data_dir / "counterfact" / "counterfact_dev.json", n=5)
    assert len(ds) == 5 and ds.source_format == "rome" and len(ds.sha256) == 64 and not ds.skipped
    c = ds.cases[0]
    assert c.case_id == 3 and c.request.text == "Autonomous University of Madrid, which is located in"
    assert (c.request.target_new, c.request.target_true) == ("Sweden", "Spain")
    assert len(c.paraphrase_prompts) == 2 and len(c.neighborhood_prompts) == 10 and len(c.generation_prompts) == 10
    assert load_counterfact(n=2, start=1).cases[0].case_id == ds.cases[1].case_id  # default: the data folder
    ee = load_counterfact(data_dir / "counterfact" / "easyedit_counterfact-val.json")
    assert ee.source_format == "easyedit" and len(ee) > 1000
    assert ee.cases[0].request.prompt.count("{}") == 1 and len(ee.cases[0].paraphrase_prompts) == 1


def test_zsre_and_known_loaders(data_dir):
    ds = load_zsre(data_dir / "zsre" / "zsre_mend_train_1k.json")
    assert len(ds) + len(ds.skipped) == 1000 and len(ds) > 990
    c = ds.cases[0]
    assert c.request.prompt == "What is the product made by {}?" and c.request.target_new == "uniform"
    assert c.neighborhood == (("nq question: john goodman's character in the big lebowski?", " Walter Sobchak"),)
    assert load_zsre(n=1, target="alt").cases[0].request.target_new == "unmanned aircraft"
    facts = load_known_facts(data_dir / "known_1000.json")
    assert len(facts) > 1000 and facts[0].subject in facts[0].prompt


def test_malformed_records_are_reported_not_fatal(tmp_path, caplog):
    good = {
        "case_id": 1,
        "requested_rewrite": {
            "prompt": "{} is in",
            "subject": "X",
            "target_new": {"str": "A"},
            "target_true": {"str": "B"},
        },
        "paraphrase_prompts": ["X is in"],
        "neighborhood_prompts": ["Y is in"],
    }
    records = [
        good,
        {"case_id": 2, "paraphrase_prompts": []},
        {**good, "case_id": 3, "requested_rewrite": {**good["requested_rewrite"], "prompt": "no slot"}},
        {**good, "case_id": 4, "neighborhood_prompts": "not a list"},
        {**good},  # duplicate id 1
        {**good, "case_id": 6, "requested_rewrite": {**good["requested_rewrite"], "target_new": {"str": "B"}}},
    ]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    with caplog.at_level(logging.WARNING):
        ds = load_counterfact(path)
    assert [c.case_id for c in ds.cases] == [1]
    assert [i for i, _ in ds.skipped] == ["2", "3", "4", "1", "6"]
    assert "5 malformed" in caplog.text and "duplicate" in caplog.text
    with pytest.raises(DatasetError, match="malformed"):
        load_counterfact(path, on_error="raise")
    zpath = tmp_path / "z.json"
    zpath.write_text(
        json.dumps(
            [{"subject": "Q", "src": "Who is R?", "answers": ["a"], "rephrase": "x", "loc": "l", "loc_ans": "m"}]
        )
    )
    assert load_zsre(zpath).skipped[0][1].startswith("subject")
    with pytest.raises(DatasetError, match="not found"):
        load_counterfact(tmp_path / "missing.json")
    assert parse_counterfact([])[0] == []


# -- scoring on the default model -----------------------------------------------------------------------------
def test_scoring_matches_a_direct_full_forward(default_model):
    """The sparse LM-head scoring equals log-softmax of the model's own full logits, token by token."""
    from factedit.text import target_ids

    model, tok = default_model
    pairs = [(MADRID.text, " Spain"), ("The Eiffel Tower is in", " the city of Paris")]
    scores = score_continuations(model, tok, pairs, batch_size=1)
    ref = target_log_probs(model, tok, [p for p, _ in pairs], [t for _, t in pairs])
    for (prompt, cont), s, (total, n) in zip(pairs, scores, ref):
        ids = tok(prompt)["input_ids"]
        tgt = target_ids(tok, prompt, cont)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids + tgt])).logits[0].float(), dim=-1)
        direct = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(tgt)]
        assert len(s.logprobs) == n == len(tgt)
        assert s.logprobs == pytest.approx(direct, abs=1e-4)
        assert sum(s.logprobs) == pytest.approx(total, abs=1e-4) and s.nll == pytest.approx(-total / n, abs=1e-4)


# -- resumable runs ---------------------------------------------------------------------------------------------
def _strip(path: Path) -> list[dict]:
    """Per-case results without the timings (which differ between runs)."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec.pop("timing", None)
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ref") / "corpus.txt"
    path.write_text(
        "Sweden is a country in Northern Europe.\nThe capital of Sweden is Stockholm.\n"
        "Spain is in southern Europe.\nEnglish is a West Germanic language.\n"
        "Russian is spoken in Russia.\n"
    )
    return str(path)


def _config(ref: str, **kw) -> RunConfig:
    base = dict(
        method="none",
        dataset="counterfact",
        n=3,
        generation=True,
        n_gen=1,
        max_out_len=12,
        seed=7,
        reference_corpus=ref,
        answer_tokens=8,  # the generative answers are resumed too, on a short budget
    )
    return RunConfig(**{**base, **kw})


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    """A tiny random Llama with the default tokenizer: the runner's bookkeeping (resume, grouping) is the
    same on any model, and every case is scored in milliseconds instead of seconds."""
    return tiny_model("llama"), tokenizer


def test_interrupted_run_resumes_to_identical_results(tiny_llama, tmp_path, tiny_reference):
    model, tok = tiny_llama
    full = tmp_path / "full"
    report = run_evaluation(model, tok, _config(tiny_reference), full, progress=False)
    assert report.evaluated == 3 and report.errors == 0
    expected = _strip(full / CASES)
    assert [r["case_id"] for r in expected] == [3, 5, 9]
    assert all(r["post"]["text"] and r["post"]["reference_score"] is not None for r in expected)

    # killed after two cases (the callback raises once the second line is on disk), then resumed
    killed = tmp_path / "killed"
    seen = []

    def stop_after_two(case_id, record):
        seen.append(case_id)
        if len(seen) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        run_evaluation(model, tok, _config(tiny_reference), killed, on_case=stop_after_two, progress=False)
    assert len(_strip(killed / CASES)) == 2
    report = run_evaluation(model, tok, _config(tiny_reference), killed, progress=False)
    assert (report.already_done, report.evaluated) == (2, 1)
    assert _strip(killed / CASES) == expected

    # killed mid-write: a torn last line is cut off and that case is redone, once
    torn = tmp_path / "torn"
    torn.mkdir()
    for name in (MANIFEST, CASES):
        (torn / name).write_bytes((full / name).read_bytes())
    data = (torn / CASES).read_bytes()
    last_start = data[:-1].rfind(b"\n") + 1
    (torn / CASES).write_bytes(data[: last_start + (len(data) - last_start) // 2])
    report = run_evaluation(model, tok, _config(tiny_reference), torn, progress=False)
    assert (report.already_done, report.evaluated) == (2, 1)
    assert _strip(torn / CASES) == expected

    # nothing left to do; a larger n extends the run; other settings are refused
    assert run_evaluation(model, tok, _config(tiny_reference), full, progress=False).evaluated == 0
    assert run_evaluation(model, tok, _config(tiny_reference, n=4), full, progress=False).evaluated == 1
    with pytest.raises(FactEditError, match="seeds"):
        run_evaluation(model, tok, _config(tiny_reference, seed=8), full, progress=False)


def test_zsre_run_and_method_registry(default_model, tmp_path):
    model, tok = default_model

    class Broken(EditMethod):
        name = "broken"

        def compute(self, model, tok, requests, hp, **options):
            raise FactEditError("cannot edit this")

    register(Broken())
    try:
        report = run_evaluation(
            model, tok, RunConfig(method="broken", dataset="zsre", n=2), tmp_path / "z", progress=False
        )
    finally:
        METHODS.pop("broken")
    assert report.errors == 2 and all("error" in r for r in _strip(tmp_path / "z" / CASES))
    report = run_evaluation(model, tok, RunConfig(method="none", dataset="zsre", n=2), tmp_path / "z0", progress=False)
    rec = _strip(tmp_path / "z0" / CASES)[0]
    assert rec["pre"] == rec["post"] and len(rec["post"]["neighborhood_prompts_correct"]) >= 2
    s = summarize_runs([tmp_path / "z0"])
    assert s.dataset == "zsre" and "Efficacy" in s.columns
    with pytest.raises(FactEditError, match="unknown method"):
        run_evaluation(model, tok, RunConfig(method="nope", dataset="zsre", n=1), tmp_path / "z1", progress=False)


def test_eval_takes_every_registry_method_rome_original(default_model, tmp_path):
    """``factedit eval --method`` dispatches through the core registry: original ROME (not in the old
    evaluation-only list) edits the case, the model is restored, the manifest names the method."""
    from typer.testing import CliRunner

    from factedit.cli.main import app

    model, _ = default_model
    before = model_fingerprint(model)
    out = tmp_path / "rome_original"
    result = CliRunner().invoke(
        app,
        ["eval", "--method", "rome-original", "--dataset", "counterfact", "--n", "1", "--out", str(out)]
        + ["--set", "mom2_n_tokens=4000", "--set", "v_num_grad_steps=8", "--no-generative"],  # dispatch, not efficacy
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["method"] == "rome-original" and manifest["hparams"]["consistent_key"] is False
    records = _strip(out / CASES)
    assert len(records) == 1 and all(r["edit"]["method"] == "rome-original" for r in records)
    for r in records:  # the edit lowers the new target's NLL on the rewrite prompt
        assert r["post"]["rewrite_prompts_probs"][0]["target_new"] < r["pre"]["rewrite_prompts_probs"][0]["target_new"]
    assert model_fingerprint(model) == before  # the CLI loaded its own copy; ours is untouched


def test_run_reports_cases_through_progress(default_model, tmp_path):
    """The runner reports through ``factedit.progress``: a stage "evaluating" counting every case,
    continued (not restarted from zero) when a run is resumed."""
    from factedit.progress import Progress

    class Recorder(Progress):
        def __init__(self) -> None:
            self.started, self.done = [], {}

        def on_start(self, stage) -> None:
            self.started.append((stage.name, stage.total, stage.unit))

        def on_advance(self, stage, info) -> None:
            self.done[stage.name] = stage.done

    model, tok = default_model
    first = Recorder()
    run_evaluation(model, tok, RunConfig(method="none", dataset="zsre", n=1), tmp_path / "p", progress=first)
    assert first.started == [("evaluating", 1, "case")] and first.done == {"evaluating": 1}
    resumed = Recorder()
    run_evaluation(model, tok, RunConfig(method="none", dataset="zsre", n=2), tmp_path / "p", progress=resumed)
    assert resumed.started == [("evaluating", 2, "case")] and resumed.done == {"evaluating": 2}


# -- FT / FT-L ------------------------------------------------------------------------------------------------
def _patch_and_steps(edit):
    """An FT ``EditResult`` as ``(patch, FTResult)``: the change and its per-step losses."""
    (steps,) = edit.details
    return edit.patch, steps


def test_ft_patch_reverts_bit_exact(default_model):
    model, tok = default_model
    hp = FTHyperParams.for_model(model, num_steps=3)
    name = arch_for(model).rewrite_weight_at(hp.layers[0])
    original = model.get_parameter(name).detach().clone()
    fp = model_fingerprint(model)
    patch, result = _patch_and_steps(compute_ft(model, tok, MADRID, hp))
    assert model_fingerprint(model) == fp  # computing leaves the model unchanged
    assert result.steps == 3 and result.losses[-1] < result.losses[0]
    assert patch.method == "ft" and patch.entries[0].dense is not None
    patch.apply(model)
    assert not torch.equal(model.get_parameter(name), original)
    patch.revert(model)
    assert torch.equal(model.get_parameter(name), original) and model_fingerprint(model) == fp


def test_ft_l_respects_its_linf_bound(default_model):
    model, tok = default_model
    eps = 1e-4
    hp = FTLHyperParams.for_model(model, num_steps=4, norm_constraint=eps)
    name = arch_for(model).rewrite_weight_at(hp.layers[0])
    original = model.get_parameter(name).detach().clone()
    patch = compute_ft(model, tok, [MADRID], hp).patch
    assert patch.method == "ft-l"
    delta = patch.entries[0].dense
    assert float(delta.abs().max()) <= eps
    assert float(delta.abs().max()) > eps / 2  # the bound is active, not trivially met
    patch.apply(model)
    try:
        # the patch's delta is bounded exactly; the float32 weights within one rounding of W0 + delta
        rounding = 2 * torch.finfo(torch.float32).eps * float(original.abs().max())
        assert float((model.get_parameter(name).detach() - original).abs().max()) <= eps + rounding
    finally:
        patch.revert(model)
    with pytest.raises(FactEditError):
        FTLHyperParams.from_dict({"layers": [1], "norm_constraint": -1.0})


@pytest.mark.parametrize(
    "cls, changes",
    [
        (FTHyperParams, {"num_steps": 4}),
        (FTLHyperParams, {"num_steps": 4}),
        # one request stops early, the other goes on: stopped rows stay put
        (FTHyperParams, {"num_steps": 6, "lr": 5e-3, "early_stop_loss": 0.5}),
    ],
)
def test_ft_each_equals_ft_alone(default_model, cls, changes):
    """Edits computed together follow the same path as alone: same steps, same change up to float rounding."""
    model, tok = default_model
    hp = cls.for_model(model, **changes)
    other = EditRequest("{} is a native speaker of", "Danielle Darrieux", "English", "French")
    fp = model_fingerprint(model)
    together = [_patch_and_steps(edit) for edit in compute_ft_each(model, tok, [MADRID, other], hp)]
    assert model_fingerprint(model) == fp
    print("steps:", [r.steps for _, r in together])
    if "early_stop_loss" in changes:
        assert len({r.steps for _, r in together}) == 2  # one stopped before the other
    for (patch, result), req in zip(together, [MADRID, other]):
        alone, alone_result = _patch_and_steps(compute_ft(model, tok, req, hp))
        a, b = patch.entries[0].dense.double(), alone.entries[0].dense.double()
        cosine = float((a * b).sum() / (a.norm() * b.norm()))
        print(
            f"{cls.__name__} {req.subject}: cosine {cosine:.8f}, relative difference "
            f"{float((a - b).norm() / b.norm()):.2e}"
        )
        assert result.steps == alone_result.steps and cosine > 0.9999
        assert result.losses == pytest.approx(alone_result.losses, rel=1e-3, abs=1e-4)
        assert patch.requests == alone.requests and patch.method == alone.method
        if hp.norm_constraint is not None:  # the bound as a float32 number, the patch's dtype
            assert bool(patch.entries[0].dense.abs().max() <= torch.tensor(hp.norm_constraint))


def test_grouped_run_matches_one_at_a_time(tiny_llama, tmp_path):
    """``group``: the same cases, edited alone each, scored the same as without grouping; resumes by position."""
    model, tok = tiny_llama
    overrides = {"num_steps": 3}
    one = run_evaluation(
        model,
        tok,
        RunConfig(method="ft", dataset="zsre", n=4, overrides=overrides, generative=False),
        tmp_path / "one",
        progress=False,
    )
    cut = run_evaluation(
        model,
        tok,
        RunConfig(method="ft", dataset="zsre", n=1, overrides=overrides, group=2, generative=False),
        tmp_path / "grouped",
        progress=False,
    )
    assert one.evaluated == 4 and cut.evaluated == 1
    rest = run_evaluation(
        model,
        tok,
        RunConfig(method="ft", dataset="zsre", n=4, overrides=overrides, group=2, generative=False),
        tmp_path / "grouped",
        progress=False,
    )
    assert rest.already_done == 1 and rest.evaluated == 3
    a, b = _strip(tmp_path / "one" / CASES), _strip(tmp_path / "grouped" / CASES)
    assert [r["case_id"] for r in a] == [r["case_id"] for r in b]
    for x, y in zip(a, b):
        assert x["post"]["rewrite_prompts_correct"] == y["post"]["rewrite_prompts_correct"]
        assert x["edit"]["steps"] == y["edit"]["steps"]
        assert x["edit"]["delta_norm"] == pytest.approx(y["edit"]["delta_norm"], rel=1e-3)
    timings = [json.loads(line)["timing"] for line in (tmp_path / "grouped" / CASES).read_text().splitlines()]
    # groups are cut by position: the case left over from the interrupted first pair is edited alone
    assert [t.get("group", 1) for t in timings] == [1, 1, 2, 2]
    with pytest.raises(FactEditError, match="group"):
        run_evaluation(
            model, tok, RunConfig(method="ft", dataset="zsre", n=3, group=0), tmp_path / "bad", progress=False
        )
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_ft_hparams_files_parse():
    for method, cls in (("ft", FTHyperParams), ("ft-l", FTLHyperParams)):
        files = [f for f in (resources.files("factedit") / "hparams" / method).iterdir() if f.name.endswith(".json")]
        assert len(files) >= 9
        for f in files:
            with torch.device("meta"):  # the family's defaults resolved for a model of that family
                model = tiny_model(f.name.removesuffix(".json"), layers=30)
            hp = cls.for_model(model)
            assert hp.lr == 5e-4 and hp.num_steps == 25
            assert (hp.norm_constraint is None) == (method == "ft")


def test_a_run_older_than_a_setting_resumes_with_its_default(tmp_path):
    """A manifest written before a setting existed matches a run with that setting at its default, and
    only then (every other difference is still refused)."""
    from factedit.editing.hparams import ROMEHyperParams
    from factedit.evaluation.runner import FORMAT, _check_resumable

    hparams = ROMEHyperParams(layers=[6]).model_dump(mode="json")
    new = {"format": FORMAT, "method": "rome", "mode": {"kind": "single"}, "hparams": hparams}
    old = json.loads(json.dumps(new))
    del old["hparams"]["value_norm_skip_factor"], old["hparams"]["value_norm_anchor"]  # added later
    defaults = ROMEHyperParams.defaults()
    with pytest.raises(FactEditError, match="other settings"):
        _check_resumable(old, new, tmp_path)  # without the defaults the added settings differ
    _check_resumable(old, new, tmp_path, defaults)
    changed = json.loads(json.dumps(new))
    changed["hparams"]["value_norm_skip_factor"] = 3.0
    with pytest.raises(FactEditError, match="value_norm_skip_factor"):
        _check_resumable(old, changed, tmp_path, defaults)
