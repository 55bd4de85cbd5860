"""Honest metrics: WILD's generative success (matching rule and batched greedy answers), EasyEdit's token
accuracies, and both in an evaluation run's records and summary.

Tiny random models (:mod:`tests.tiny_models`) with the small byte-level tokenizer of :mod:`tests.gguf_files`
(every text tokenizes, byte by byte); no real model is loaded.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from factedit.evaluation.cases import (
    GenerativeSettings,
    answer_slices,
    easyedit_scores,
    generative_prompts,
    generative_scores,
    prefetch_answers,
    teacher_forced_argmax,
)
from factedit.evaluation.config import RunConfig
from factedit.evaluation.generation import greedy_answers, stop_token_ids
from factedit.evaluation.metrics import (
    answer_of,
    argmax_token_scores,
    exact_match,
    first_sentence,
    generative_case_scores,
    generative_success,
    normalize_answer,
    paired_case_scores,
    token_agreement,
)
from factedit.evaluation.records import read_cases
from factedit.evaluation.runner import _extra_settings, run_evaluation
from factedit.evaluation.summary import summarize_runs, to_markdown

from .conftest import REPO
from .gguf_files import byte_level_tokenizer, wide_tiny_model
from .tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = [
    {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": [
            "Shayna does this. Danielle Darrieux speaks",
            "The native language of Danielle Darrieux is",
        ],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
        "attribute_prompts": [],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    },
    {
        "case_id": 9,
        "requested_rewrite": {
            "prompt": "{} is located in the continent of",
            "subject": "Vinson Massif",
            "target_new": {"str": "Europe", "id": "Q46"},
            "target_true": {"str": "Antarctica", "id": "Q51"},
        },
        "paraphrase_prompts": ["Vinson Massif lies in"],
        "neighborhood_prompts": ["Mount Erebus is located in the continent of"],
        "attribute_prompts": [],
        "generation_prompts": ["Vinson Massif is"],
    },
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return byte_level_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model(tok):
    return wide_tiny_model(tok)


# ----------------------------------------------------------------------------- the matching rule (pure)


@pytest.mark.parametrize(
    ("continuation", "success"),
    [
        (" English. She was born in Paris.", True),  # states the new target
        (" the English language, which she spoke at home.", True),  # article and more words
        (" ENGLISH!", True),  # case and punctuation
        ("  english ", True),  # whitespace, no sentence end
        (" French. She was born in Paris.", False),  # the old answer
        (" French, and later English.", False),  # both: a hedge
        (" English or French.", False),  # both
        (" a language spoken in Europe.", False),  # neither
        (" Englishman.", False),  # a longer word is not the word
        (" French. Later she spoke English.", False),  # the answer is the first sentence only
        ("\nEnglish", False),  # a newline before any word ends the answer (as WILD)
    ],
)
def test_generative_success_on_hand_made_continuations(continuation, success):
    assert generative_success(continuation, "English", "French") is success


def test_a_target_inside_the_other_counts_only_on_its_own():
    # new "French", old "French Polynesia": the old answer's "French" is not the new one
    assert generative_success(" French.", "French", "French Polynesia")
    assert not generative_success(" French Polynesia.", "French", "French Polynesia")
    # the other way round: "French Polynesia" states the new target and its "French" is no old answer
    assert generative_success(" French Polynesia.", "French Polynesia", "French")
    assert not generative_success(" French.", "French Polynesia", "French")


def test_normalisation_and_exact_match_are_squads():
    assert normalize_answer("  The U.S.A.!  ") == "usa"
    assert normalize_answer("An apple, the end") == "apple end"
    assert normalize_answer("Saint-Étienne") == normalize_answer("saint–étienne") == "saintétienne"
    assert exact_match(" The Netherlands.", "Netherlands")
    assert not exact_match("Netherlands, a country", "Netherlands")


@pytest.mark.parametrize(
    ("text", "final", "sentence"),
    [
        ("Rome. It is", True, "Rome."),
        ("Washington, D.C. is the capital", True, None),  # initials do not end a sentence
        ("St. Petersburg is", True, None),  # nor abbreviations
        ("about 3.5 million", True, None),  # nor decimals
        ("born in 1990.", False, None),  # it may still be 1990.5
        ("born in 1990.", True, "born in 1990."),
        ("born in 1990. Then", False, "born in 1990."),
        ("Paris\nand", True, "Paris\n"),
        ("Really?! Yes", True, "Really?!"),
    ],
)
def test_first_sentence(text, final, sentence):
    assert first_sentence(text, final=final) == sentence
    assert answer_of(text) == (first_sentence(text) or text)


# ----------------------------------------------------------------------------- greedy answers on a model


def _direct_greedy(model, tok, prompt: str, max_new_tokens: int) -> list[int]:
    """The reference: one prompt, no padding, no cache, full forward pass per token."""
    ids = tok(prompt)["input_ids"]
    stops = stop_token_ids(tok)
    out: list[int] = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        out.append(token)
        if first_sentence(tok.decode(out, skip_special_tokens=True), final=False) is not None:
            break
    return out


def test_greedy_answers_match_a_direct_greedy_loop_and_are_deterministic(model, tok):
    prompts = ["the cat", "the cat is in the house and", "is", "Danielle Darrieux speaks"]  # unequal lengths
    answers = greedy_answers(model, tok, prompts, max_new_tokens=12, batch_size=3)
    again = greedy_answers(model, tok, prompts, max_new_tokens=12, batch_size=3)
    assert answers == again
    for prompt, answer in zip(prompts, answers):
        expected = _direct_greedy(model, tok, prompt, 12)
        assert list(answer.ids) == expected
        text = tok.decode(expected, skip_special_tokens=True)
        assert answer.text == (first_sentence(text) or text)
    assert all(len(a.ids) <= 12 for a in answers)


def test_finished_answers_leave_the_batch_without_changing_any(default_model):
    """On the default model, whose answers end at different lengths: dropping finished rows from the batch
    gives the answers of the plain path (every row kept to the end) and of a direct greedy loop."""
    model, tok = default_model
    prompts = ["The capital of France is", "Danielle Darrieux's mother tongue is", "Toko Yasuda plays the", "Hi"]
    compact = greedy_answers(model, tok, prompts, max_new_tokens=16)
    assert len({len(a.ids) for a in compact}) > 1  # rows did finish at different steps
    assert compact == greedy_answers(model, tok, prompts, max_new_tokens=16, compact=False)
    for prompt, answer in zip(prompts, compact):
        assert list(answer.ids) == _direct_greedy(model, tok, prompt, 16)


def test_greedy_answers_stop_at_a_sentence_end(model, tok):
    """A model that always says ". " stops after one token; one that never does runs to the budget."""
    dot = tok(".", add_special_tokens=False)["input_ids"][-1]
    biased = tiny_model("llama", init=0.5, layers=2)
    biased.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        biased.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok)))
        biased.lm_head.bias[dot] = 1e4
    answers = greedy_answers(biased.eval(), tok, ["the cat", "is"], max_new_tokens=9)
    assert [a.ids for a in answers] == [(dot,), (dot,)]
    assert [a.text for a in answers] == [".", "."]


# ----------------------------------------------------------------------------- EasyEdit's token accuracy


def test_easyedit_accuracy_and_locality_on_hand_made_logits():
    logits = np.array([[0.1, 2.0, 0.3], [1.0, 0.0, -1.0], [0.0, 0.1, 0.2]])  # argmax 1, 0, 2
    predicted, accuracy = argmax_token_scores(logits, [1, 0, 0])
    assert predicted == [1, 0, 2]
    assert accuracy == pytest.approx(2 / 3)
    assert token_agreement([1, 0, 2], [1, 1, 2]) == pytest.approx(2 / 3)
    pre = {
        "neighborhood_prompts_argmax": [[1, 0, 2], [5]],
        "neighborhood_prompts_generated": [{"text": " Paris.", "ids": [3, 4]}, {"text": " Rome.", "ids": [6]}],
    }
    post = {
        "neighborhood_prompts_argmax": [[1, 1, 2], [5]],
        "neighborhood_prompts_generated": [
            {"text": " Paris.", "ids": [3, 4], "success": True},
            {"text": " Oslo.", "ids": [7], "success": False},
        ],
        "rewrite_prompts_token_acc": [0.5],
        "paraphrase_prompts_token_acc": [1.0, 0.0],
        "rewrite_prompts_generated": [{"text": " Oslo.", "ids": [7], "success": True}],
    }
    paired = paired_case_scores(pre, post)
    assert paired["neighborhood_token_agree"] == pytest.approx((2 / 3 + 1) / 2)
    assert paired["neighborhood_same_gen"] == pytest.approx(0.5)
    scores = generative_case_scores(post)
    assert scores == {
        "rewrite_gen": 1.0,
        "rewrite_token_acc": 0.5,
        "paraphrase_token_acc": 0.5,
        "neighborhood_gen": 0.5,
    }


def test_teacher_forced_argmax_is_the_argmax_of_a_direct_forward_pass(model, tok):
    pairs = [("the cat is", " in the house"), ("is", " the cat")]
    results = teacher_forced_argmax(model, tok, pairs)
    for (prompt, cont), (predicted, target) in zip(pairs, results):
        p = tok(prompt)["input_ids"]
        full = tok(prompt + cont)["input_ids"]
        assert p + target == full  # byte-level BPE: the prompt's tokens are a prefix
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0]
        assert predicted == logits[len(p) - 1 : len(full) - 1].argmax(-1).tolist()


def test_case_blocks_have_one_entry_per_prompt(model, tok):
    from factedit.data.counterfact import parse_counterfact

    cases, skipped, _ = parse_counterfact(CASES)
    assert not skipped
    case = cases[0]
    gen = generative_scores(model, tok, case, GenerativeSettings(max_new_tokens=4))
    ee = easyedit_scores(model, tok, case)
    assert [len(gen[f"{k}_prompts_generated"]) for k in ("rewrite", "paraphrase", "neighborhood")] == [1, 2, 2]
    assert len(ee["rewrite_prompts_token_acc"]) == 1 and len(ee["paraphrase_prompts_token_acc"]) == 2
    n_true = len(tok(case.request.text + " French")["input_ids"]) - len(tok(case.request.text)["input_ids"])
    assert all(len(ids) >= 1 for ids in ee["neighborhood_prompts_argmax"]) and n_true >= 1
    assert all(0.0 <= a <= 1.0 for a in ee["paraphrase_prompts_token_acc"])


def test_answers_batched_across_cases_equal_each_case_alone(model, tok):
    """Where one model state scores many cases, their greedy answers share batches: the blocks are the same."""
    from factedit.data.counterfact import parse_counterfact

    cases, _, _ = parse_counterfact(CASES)
    settings = GenerativeSettings(max_new_tokens=6)
    shared = prefetch_answers(model, tok, cases, settings, batch_size=64)
    assert set(shared) == {p for case in cases for p in generative_prompts(case)}
    for case in cases:
        alone = generative_scores(model, tok, case, settings)
        assert generative_scores(model, tok, case, settings, answers=shared) == alone
        partial = dict(list(shared.items())[:1])  # prompts missing from the given answers are answered here
        assert generative_scores(model, tok, case, settings, answers=partial) == alone
    assert [len(s) for s in answer_slices(cases, 1)] == [1, 1]  # each case's prompts fill a 1-row batch
    assert [len(s) for s in answer_slices(cases, 64)] == [2]


def test_easyedit_block_comes_from_the_case_scores_forward(model, tok):
    """The EasyEdit pairs are among the case's ROME pairs: the block equals the one computed alone, and
    the case takes one forward pass (its pairs fit one batch), not a second for EasyEdit."""
    from factedit.data.counterfact import parse_counterfact
    from factedit.evaluation.cases import evaluate_counterfact

    cases, _, _ = parse_counterfact(CASES)
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for case in cases:
            alone = easyedit_scores(model, tok, case)
            calls.clear()
            block = evaluate_counterfact(model, tok, case, extras=True)
            assert len(calls) == 1
            assert {k: block[k] for k in alone} == alone
    finally:
        hook.remove()


def test_new_beats_true_for_many_items_at_once_equals_each_alone(model, tok):
    """Drift points score every edit's rewrite, paraphrases and neighbours in shared batches, whatever their
    targets: the verdicts are those of one item at a time, and of the NLLs compared directly."""
    from factedit.predict import new_beats_true, new_beats_true_each, score_continuations

    items = [("the cat is", " in", " on"), ("is", " the cat", " a"), ("Danielle Darrieux speaks", " French", " cat")]
    together = new_beats_true_each(model, tok, items, batch_size=4)
    assert together == [new_beats_true(model, tok, [t], n, r)[0] for t, n, r in items]
    for (text, new, true), verdict in zip(items, together):
        a, b = score_continuations(model, tok, [(text, new), (text, true)])
        assert verdict == (a.nll < b.nll)


# ----------------------------------------------------------------------------- in a run, and old runs


def test_a_run_records_and_summarises_the_new_metrics(model, tok, tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(CASES))
    config = RunConfig(method="none", dataset="counterfact", data_path=str(data), answer_tokens=6)
    run_evaluation(model, tok, config, tmp_path / "run", progress=False)
    records = read_cases(tmp_path / "run")
    assert set(records) == {"7", "9"}
    for record in records.values():
        for block in (record["pre"], record["post"]):
            assert "rewrite_prompts_generated" in block and "neighborhood_prompts_argmax" in block
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["extra_metrics"]["generative"]["max_new_tokens"] == 6
    summary = summarize_runs([tmp_path / "run"])
    for column in ("Gen ES", "Gen PS", "Gen NS", "Gen loc", "EE rel", "EE gen", "EE loc"):
        assert column in summary.columns
    assert summary.rows[0].cells["Gen loc"].mean == 100.0  # the unedited model is its own reference
    assert "Gen ES" in to_markdown(summary)


def test_a_run_made_before_the_new_metrics_resumes_without_them(tmp_path):
    old = REPO / "state" / "counterfact_rome_keyfit"
    if not (old / "manifest.json").is_file():
        pytest.skip("no old run folder in this checkout")
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest.get("extra_metrics") is None  # that run was resumed from one made before the metrics
    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(old / "manifest.json", folder / "manifest.json")
    assert _extra_settings(RunConfig(method="rome", dataset="counterfact"), folder) == (False, None)
    manifest.pop("extra_metrics")  # the form of a run that was never resumed
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert _extra_settings(RunConfig(method="rome", dataset="counterfact"), folder) == (False, None)
    assert _extra_settings(RunConfig(method="rome", dataset="counterfact"), tmp_path / "new") == (
        True,
        GenerativeSettings(max_new_tokens=50),
    )
    summary = summarize_runs([old])  # an old run still summarises, without the new columns
    assert "ES" in summary.columns and "Gen ES" not in summary.columns
