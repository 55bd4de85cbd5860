"""General-capability measures (perplexity, known facts, entropy), their inputs, and their place in a
sequential run (capability.jsonl, drift points) and its summary.

Tiny random models with the small byte-level tokenizer of :mod:`tests.gguf_files`; no real model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from factedit.errors import FactEditError
from factedit.evaluation.batched import read_drift
from factedit.evaluation.capability import (
    CapabilityProbe,
    CapabilitySettings,
    heldout_is_unused,
    heldout_lines,
    perplexity,
    token_windows,
    unrelated_facts,
)
from factedit.evaluation.config import RunConfig
from factedit.evaluation.records import read_capability
from factedit.evaluation.runner import run_evaluation
from factedit.evaluation.summary import summarize_runs, to_markdown
from factedit.tracing.knowns import KnownFact

from .gguf_files import byte_level_tokenizer, wide_tiny_model
from .test_generative import CASES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "the cat is in the house. the house is in the cat."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return byte_level_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model(tok):
    return wide_tiny_model(tok)


def test_perplexity_is_exp_of_the_mean_token_nll(model, tok):
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        direct = math.exp(float(model(input_ids=ids, labels=ids).loss))
    assert perplexity(model, tok, [TEXT]) == pytest.approx(direct, rel=1e-5)


def test_perplexity_reads_windows_alone_and_pads_nothing_in(model, tok):
    """Two texts, the first cut into windows of 16 tokens: the mean NLL over every window's predicted tokens,
    each window read on its own (batched with right padding, which must not count)."""
    texts = [TEXT * 2, "is the cat"]
    windows = token_windows(tok, texts, 16, 100)
    first = len(tok(texts[0])["input_ids"])
    assert [len(w) for w in windows] == [16, first - 16, len(tok(texts[1])["input_ids"])]
    total, count = 0.0, 0
    for window in windows:
        ids = torch.tensor([window])
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)
        total += loss * (len(window) - 1)
        count += len(window) - 1
    got = perplexity(model, tok, texts, window_tokens=16, batch_size=3)
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)
    with torch.no_grad():
        one = math.exp(float(model(input_ids=torch.tensor([windows[0]]), labels=torch.tensor([windows[0]])).loss))
    assert perplexity(model, tok, texts, window_tokens=16, max_windows=1) == pytest.approx(one, rel=1e-5)
    with pytest.raises(FactEditError):
        perplexity(model, tok, ["t"])  # one token predicts nothing


def test_known_facts_exclude_every_edited_subject():
    facts = [
        KnownFact(0, "Danielle Darrieux", "French", "Danielle Darrieux speaks"),
        KnownFact(1, "Darrieux", "French", "Darrieux speaks"),  # inside an edited subject
        KnownFact(2, "the Vinson Massif range", "Antarctica", "the Vinson Massif range is in"),  # contains one
        KnownFact(3, "danielle darrieux!", "French", "danielle darrieux! speaks"),  # case and punctuation
        KnownFact(4, "Toyota", "Japan", "Toyota is from"),
        KnownFact(5, "Massifs of France", "France", "Massifs of France are in"),  # a longer word: unrelated
    ]
    kept = unrelated_facts(facts, ["Danielle Darrieux", "Vinson Massif"])
    assert [f.known_id for f in kept] == [4, 5]


def test_the_held_out_slice_is_the_corpus_end_which_statistics_do_not_reach(tok, corpus_file):
    last = heldout_lines(corpus_file, 3)
    lines = [line for line in corpus_file.read_text().splitlines() if line.strip()]
    assert last == lines[-3:]
    # statistics take whole lines from the first on, in file order: 100,000 tokens stop far before the end
    assert heldout_is_unused(tok, corpus_file, 200, 100_000)


def test_the_probe_measures_the_same_inputs_each_time(model, tok, data_dir):
    settings = CapabilitySettings(windows=2, window_tokens=32, known_facts=20, entropy_prompts=2, max_out_len=24)
    settings.check()
    probe = CapabilityProbe.build(model, tok, settings, ["Vinson Massif"])
    assert [len(w) for w in probe.windows["wikitext"]] == [32, 32]
    assert all("Vinson Massif" not in f.subject for f in probe.facts)
    first, second = probe.measure(model, tok), probe.measure(model, tok)
    assert first == second
    assert first["ppl_wikitext"] > 1 and first["ppl_wikipedia"] > 1 and first["ppl_wikipedia_tokens"] == 62
    assert first["settings"] == settings.describe()
    if probe.facts:  # the facts the unedited model gets right: all of them, by construction
        assert first["known_acc"] == 1.0


def test_capability_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(FactEditError, match="capability windows"):
        CapabilitySettings(windows=0).check()
    with pytest.raises(FactEditError, match="not found"):
        CapabilitySettings(wikitext=str(tmp_path / "missing.txt")).check()
    with pytest.raises(FactEditError, match="--batch or --sequential"):
        RunConfig(method="ft", dataset="counterfact", capability=True).check()


def test_a_sequential_run_measures_capability_before_after_and_at_drift_points(model, tok, tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(CASES))
    config = RunConfig(
        method="ft",
        dataset="counterfact",
        data_path=str(data),
        sequential=True,
        drift_every=1,
        answer_tokens=4,
        capability=True,
        capability_windows=1,
        capability_window_tokens=32,
        capability_facts=10,
        capability_prompts=2,
        overrides={"num_steps": 2},
    )
    run_evaluation(model, tok, config, tmp_path / "seq", progress=False)
    states = {r["case_id"]: r for r in read_capability(tmp_path / "seq")}
    assert set(states) == {"before", "after"} and states["after"]["edits"] == 2
    drift = read_drift(tmp_path / "seq")
    assert [p["step"] for p in drift] == [0, 1, 2]
    assert all("ppl_wikitext" in p["capability"] for p in drift)
    assert drift[0]["capability"]["ppl_wikitext"] == pytest.approx(states["before"]["ppl_wikitext"])
    assert drift[-1]["capability"]["ppl_wikitext"] == pytest.approx(states["after"]["ppl_wikitext"])
    summary = summarize_runs([tmp_path / "seq"])
    assert [row["state"] for row in summary.capability] == ["before", "after"]
    assert "general capability" in to_markdown(summary)
    # run again: nothing is measured twice
    run_evaluation(model, tok, config, tmp_path / "seq", progress=False)
    lines = (tmp_path / "seq" / "capability.jsonl").read_text().splitlines()
    assert len(lines) == 2
