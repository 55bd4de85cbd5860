"""Attribution patching (``method="attribution"``): the first-order limit, the certificate's exact cells,
the command line and its bad input, the many-facts run.

Tiny random models (:mod:`tests.tiny_models`) with the small byte-level tokenizer of
:mod:`tests.gguf_files`, their vocabulary cut to the tokenizer's so that every answer is a real token;
no real model is loaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

from factedit.errors import FactEditError
from factedit.tracing import ALL_KINDS, KINDS, SEVERED_KINDS, TraceResult, causal_trace
from factedit.tracing.attribution import random_cell_count, rank, spearman, top_overlap, window_sums
from factedit.tracing.dataset import read_results, trace_dataset

from .gguf_files import write_tiny_gguf
from .tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "the cat is in the house"  # the tokenizer's own words: six tokens
SUBJECT = "cat is"  # tokens 1-2
# Noise small enough for the first-order term to dominate, large enough above float32 rounding of the
# probabilities (measured: at 1e-5 the float32 softmax's rounding dominates the difference). The tiny
# models' embeddings have spread 0.2 (their initializer range).
FIRST_ORDER_NOISE = {family: 1e-4 for family in FAMILIES} | {
    "gpt2": 3e-4,
    "gptj": 3e-4,
    "gpt_neox": 3e-4,
    "gemma3": 1e-3,
}
# Largest |estimate - exact| allowed, as a share of the largest exact effect of the kind. At these noises
# the measured share is 0.05-0.6%; at noise 0.1 it is 20-65%, so the bound tells the limit apart.
FIRST_ORDER_RTOL = 0.02


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_gguf(folder / "m.gguf", "llama")
    return AutoTokenizer.from_pretrained(folder, gguf_file="m.gguf")


def _model(family: str, tok, dtype: torch.dtype = torch.float32):
    model = tiny_model(family, init=0.2)  # weights large enough that probabilities move under noise
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return model.to(dtype)


# ----------------------------------------------------------------------------- first-order limit


@pytest.mark.parametrize("family", FAMILIES)
def test_estimates_equal_exact_effects_in_the_first_order_limit(family, tok):
    """Every kind, window 1 (severed kinds at one token and at all later ones): the estimated effect is
    the exact one to first order. Window 3: the estimate is the sum of the exact single-layer effects over
    the window (its documented meaning; the joint restoration differs at first order)."""
    model = _model(family, tok, torch.float64)  # float64 states: only the probabilities are float32
    kw = dict(kinds=ALL_KINDS, samples=3, noise=FIRST_ORDER_NOISE[family], window=1)
    for sever_all_tokens in (False, True):
        kinds = ALL_KINDS if not sever_all_tokens else SEVERED_KINDS
        both = dict(kw, kinds=kinds, sever_all_tokens=sever_all_tokens)
        approx = causal_trace(model, tok, PROMPT, SUBJECT, method="attribution", **both)
        exact = causal_trace(model, tok, PROMPT, SUBJECT, method="fast", **both)
        assert approx.low_prob == exact.low_prob and approx.clean_prob == exact.clean_prob  # the same runs
        for kind in kinds:
            est, ex = approx.effects(kind), exact.effects(kind)
            scale = np.abs(ex).max()
            assert scale > 1e-6, kind  # the noise moves the probability: there is an effect to estimate
            assert np.abs(est - ex).max() <= FIRST_ORDER_RTOL * scale, (kind, sever_all_tokens)
            np.testing.assert_array_equal(est[: approx.subject_range[0]], 0.0)  # nothing differs before the subject
        if not sever_all_tokens:
            single = {k: exact.effects(k) for k in ("mlp", "attn")}
    windowed = causal_trace(model, tok, PROMPT, SUBJECT, method="attribution", **{**kw, "window": 3, "kinds": KINDS})
    for kind in ("mlp", "attn"):
        summed = window_sums(single[kind], 3)
        assert np.abs(windowed.effects(kind) - summed).max() <= FIRST_ORDER_RTOL * np.abs(summed).max(), kind
    assert approx.estimated and approx.method == "attribution" and not approx.exact_cells


# ----------------------------------------------------------------------------- certificate


def test_verified_cells_are_the_exact_trace_values(tok):
    model = _model("llama", tok)
    kw = dict(kinds=ALL_KINDS, samples=3, noise=1.0, window=2, seed=3)
    approx = causal_trace(model, tok, PROMPT, SUBJECT, method="attribution", verify=3, **kw)
    exact = causal_trace(model, tok, PROMPT, SUBJECT, method="fast", **kw)
    first = approx.subject_range[0]
    for kind in ALL_KINDS:
        cells = approx.exact_cells[kind]
        cert = approx.certificate[kind]
        assert len(cells) == 3 + random_cell_count(3) == len(cert["cells"])
        assert len(set(cells)) == len(cells) and all(t >= first for t, _ in cells)
        top = [(c["token"], c["layer"]) for c in cert["cells"] if c["pick"] == "top"]
        effects = approx.estimates[kind][first:]
        assert sorted(approx.estimates[kind][t, layer] for t, layer in top) == sorted(
            np.sort(effects[np.isfinite(effects)])[-3:]
        )
        mask = approx.exact_mask(kind)
        assert mask.sum() == len(cells)
        np.testing.assert_allclose(approx.scores[kind][mask], exact.scores[kind][mask], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(approx.scores[kind][~mask], approx.estimates[kind][~mask])
        for c in cert["cells"]:
            assert c["exact"] == pytest.approx(exact.scores[kind][c["token"], c["layer"]], rel=1e-5, abs=1e-7)
        est = [c["estimate"] for c in cert["cells"]]
        ex = [c["exact"] for c in cert["cells"]]
        assert cert["spearman"] == pytest.approx(spearman(est, ex))
        assert cert["top_k_overlap"] == top_overlap(est, ex, 3)
    again = causal_trace(model, tok, PROMPT, SUBJECT, method="attribution", verify=3, **kw)
    assert again.exact_cells == approx.exact_cells  # the random cells come from the seed


def test_rank_statistics():
    np.testing.assert_array_equal(rank(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 2, 3], [5, 5, 5])) and np.isnan(spearman([1], [1]))
    assert top_overlap([0.9, 0.8, 0.1, 0.0], [0.9, 0.0, 0.8, 0.1], 2) == 0.5


def test_estimated_result_round_trips_and_plots(tok, tmp_path):
    from factedit.tracing.plots import plot_trace_all

    model = _model("gpt2", tok)
    r = causal_trace(model, tok, PROMPT, SUBJECT, kinds=KINDS, samples=2, noise=1.0, method="attribution", verify=2)
    r.save(tmp_path)
    back = TraceResult.load(tmp_path)
    assert back.exact_cells == r.exact_cells and back.certificate == json.loads(json.dumps(r.certificate))
    for kind in KINDS:
        np.testing.assert_allclose(back.estimates[kind], r.estimates[kind], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(back.exact_mask(kind), r.exact_mask(kind))
    with np.load(tmp_path / "trace.npz") as npz:
        assert npz["exact_mlp"].sum() == len(r.exact_cells["mlp"]) and "estimates_attn" in npz
    names = {p.name for p in plot_trace_all(r, tmp_path, formats=("png",))}
    assert {"trace_mlp.png", "trace_all.png", "trace_certificate.png"} <= names
    exact = causal_trace(model, tok, PROMPT, SUBJECT, kinds=["hidden"], samples=2, noise=1.0, tokens=[-1])
    assert not {"estimates", "exact_cells", "certificate"} & set(exact.to_dict())  # exact traces keep their shape
    assert exact.exact_mask("hidden").all()


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, "llama")
    return path


def _cli(*args: str):
    from factedit.cli.main import app

    return CliRunner().invoke(app, list(args), terminal_width=200)


def test_cli_trace_approx_verify_writes_results_and_plots(gguf_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
    out = tmp_path / "trace"
    res = _cli(
        "trace", "--model", str(gguf_model), "--prompt", PROMPT, "--subject", SUBJECT, "--noise", "1.0",
        "--samples", "2", "--window", "2", "--approx", "--verify", "3", "--formats", "png", "--threads", "1",
        "--out", str(out),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "Spearman" in res.output and "re-patched exactly" in res.output
    saved = json.loads((out / "trace.json").read_text())
    assert saved["method"] == "attribution" and saved["meta"]["verify"] == 3
    for kind in KINDS:
        assert len(saved["exact_cells"][kind]) == 3 + random_cell_count(3)
        assert set(saved["certificate"][kind]) >= {"spearman", "top_k_overlap", "cells"}
    assert {f"trace_{k}.png" for k in KINDS} | {"trace_all.png", "trace_certificate.png"} <= {
        p.name for p in out.iterdir()
    }


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("trace", ["--verify", "3"], "give --approx with it"),
        ("trace", ["--approx", "--verify", "-1"], "--verify must be a whole number"),
        ("trace", ["--approx", "--method", "straightforward"], "leave out --method straightforward"),
        ("trace-dataset", ["--verify", "3"], "give --approx with it"),
        ("trace-dataset", ["--approx", "--verify", "-2"], "--verify must be a whole number"),
    ],
)
def test_cli_bad_verify_is_one_line_before_any_load(command, args, message, tmp_path):
    out = tmp_path / "trace"
    fact = ["--prompt", PROMPT, "--subject", SUBJECT] if command == "trace" else []
    res = _cli(command, *fact, "--out", str(out), *args)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(verify=2), "needs method 'attribution'"),
        (dict(method="attribution", verify=-1), "verify"),
        (dict(method="attribution", verify=True), "verify"),
    ],
)
def test_api_bad_verify_raises(tok, kwargs, match):
    with pytest.raises(FactEditError, match=match):
        causal_trace(_model("llama", tok), tok, PROMPT, SUBJECT, samples=1, noise=1.0, **kwargs)


# ----------------------------------------------------------------------------- many facts


def _knows_house(model, tok, prompts: list[str]) -> None:
    """Make the random model answer ' house' to every prompt (a known fact needs a word for an answer):
    the head's row of that token points along the mean final state of the prompts."""
    from factedit.hooks import Trace
    from factedit.models.architectures import arch_for, get_module

    arch = arch_for(model)
    finals = []
    with torch.no_grad():
        for prompt in prompts:
            with Trace(model, arch.final_norm, stop=True) as fin:
                model(input_ids=torch.tensor([tok(prompt)["input_ids"]]))
            finals.append(fin.output[0, -1])
        direction = torch.stack(finals).mean(0)
        get_module(model, arch.lm_head).weight[tok(" house")["input_ids"][0]] = 3 * direction / direction.norm()


def test_dataset_approx_same_summary_shape_and_agreement(tok, tmp_path):
    model = _model("llama", tok)
    facts = [("the cat is in the house", "cat is"), ("the house is", "house"), ("the cat is in", "cat")]
    _knows_house(model, tok, [p for p, _ in facts])
    records = [{"known_id": i, "subject": s, "prompt": p, "attribute": "house"} for i, (p, s) in enumerate(facts)]
    data = tmp_path / "known.json"
    data.write_text(json.dumps(records))
    kw = dict(data=data, samples=2, noise=1.0, window=2, plots=False, progress=False)
    approx = trace_dataset(model, tok, tmp_path / "approx", method="attribution", verify=2, **kw)
    exact = trace_dataset(model, tok, tmp_path / "exact", **kw)
    assert approx.n_facts == exact.n_facts == 3
    assert approx.mean_low_prob == pytest.approx(exact.mean_low_prob)  # the same corrupted runs
    assert {(r["kind"], r["bucket"], r["layer"], r["n"]) for r in approx.rows} == {
        (r["kind"], r["bucket"], r["layer"], r["n"]) for r in exact.rows
    }
    lines = read_results(tmp_path / "approx")
    assert all(line["method"] == "attribution" and set(line["certificate"]) == set(ALL_KINDS) for line in lines)
    summary = json.loads((tmp_path / "approx" / "effects.json").read_text())
    assert summary["method"] == "attribution" and summary["certificate"]["mlp"]["n_facts"] == 3
    assert "method" not in json.loads((tmp_path / "exact" / "effects.json").read_text())
    with pytest.raises(FactEditError, match="other settings"):
        trace_dataset(model, tok, tmp_path / "approx", **kw)  # an estimated run is not resumed exactly
