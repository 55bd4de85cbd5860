"""Causal tracing: invariants of the measurement, fast == official computation, bad input, outputs.

Most tests use tiny random models (4 layers, hidden 64) with the default tokenizer;
the default model is used for a few restricted traces (few tokens/layers/samples).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM
from typer.testing import CliRunner

from factedit.errors import FactEditError
from factedit.progress import Progress
from factedit.tracing import ALL_KINDS, KINDS, TraceResult, causal_trace, window_layers
from factedit.tracing.dataset import (
    BUCKETS,
    bucket_rows,
    read_results,
    summarize,
    t_quantile_975,
    trace_dataset,
    write_summary,
)
from tests.tiny_models import FAMILIES, tiny_model

PROMPT = "The Space Needle is located in the city of"
SUBJECT = "Space Needle"
LONG_PROMPT = "Before anything else, the famous Space Needle tower is located in the beautiful city of"


@pytest.fixture(scope="module")
def tiny():
    # initializer_range 0.2: random weights with enough structure that probabilities move under noise
    return tiny_model("llama", init=0.2)


def _close(a: TraceResult, b: TraceResult) -> None:
    assert a.kinds == b.kinds
    for k in a.kinds:
        x, y = a.scores[k], b.scores[k]
        assert np.array_equal(np.isnan(x), np.isnan(y)), k
        np.testing.assert_allclose(x[~np.isnan(x)], y[~np.isnan(y)], rtol=1e-4, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------- invariants


def test_last_layer_at_last_token_recovers_clean(tiny, tokenizer):
    r = causal_trace(tiny, tokenizer, PROMPT, SUBJECT, kinds=["hidden"], samples=4, noise=1.0)
    T, L = r.scores["hidden"].shape
    assert r.low_prob != pytest.approx(r.clean_prob, rel=1e-3)  # the noise does something
    # the final state at the read position is the whole clean computation
    assert r.scores["hidden"][T - 1, L - 1] == pytest.approx(r.clean_prob, rel=1e-5)
    # a final-layer state elsewhere cannot reach the read position
    np.testing.assert_allclose(r.scores["hidden"][: T - 1, L - 1], r.low_prob, rtol=1e-5)
    # tokens before the subject are not corrupted: restoring them does nothing
    np.testing.assert_allclose(r.scores["hidden"][: r.subject_range[0]], r.low_prob, rtol=1e-5)


def test_zero_noise_gives_clean_probability_everywhere(tiny, tokenizer):
    for method in ("fast", "straightforward"):
        r = causal_trace(
            tiny,
            tokenizer,
            PROMPT,
            SUBJECT,
            kinds=ALL_KINDS,
            samples=2,
            noise=0.0,
            method=method,
            tokens=[3, -1] if method == "straightforward" else None,
        )
        assert r.low_prob == pytest.approx(r.clean_prob, rel=1e-5)
        for k in r.kinds:
            m = r.scores[k]
            np.testing.assert_allclose(m[~np.isnan(m)], r.clean_prob, rtol=1e-5, err_msg=f"{method} {k}")


def test_same_seed_same_result_other_seed_other(tiny, tokenizer):
    kw = dict(kinds=["hidden", "mlp"], samples=3, noise=1.0, tokens=[3, -1])
    a = causal_trace(tiny, tokenizer, PROMPT, SUBJECT, seed=5, **kw)
    b = causal_trace(tiny, tokenizer, PROMPT, SUBJECT, seed=5, **kw)
    c = causal_trace(tiny, tokenizer, PROMPT, SUBJECT, seed=6, **kw)
    for k in a.kinds:
        assert np.array_equal(a.scores[k], b.scores[k], equal_nan=True)
    assert a.low_prob == b.low_prob and a.low_prob != c.low_prob


def test_window_convention():
    assert list(window_layers(7, 10, 30)) == list(range(2, 12))  # l-5 .. l+4
    assert list(window_layers(0, 10, 30)) == list(range(0, 5))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    assert list(window_layers(4, 1, 30)) == [4]
    assert list(window_layers(4, 5, 30)) == [2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- fast == official


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_equals_straightforward_every_family(family, tokenizer):
    """Every kind (severed paths included), long prompt (past Gemma 3's sliding window), small batches."""
    model = tiny_model(family, init=0.2)
    kw = dict(kinds=ALL_KINDS, samples=2, noise=1.0, window=3, tokens=[5, 9, -1])
    fast = causal_trace(model, tokenizer, LONG_PROMPT, SUBJECT, batch_size=5, **kw)
    slow = causal_trace(model, tokenizer, LONG_PROMPT, SUBJECT, method="straightforward", **kw)
    assert fast.clean_prob == pytest.approx(slow.clean_prob, rel=1e-5)
    assert fast.low_prob == pytest.approx(slow.low_prob, rel=1e-5)
    _close(fast, slow)


def test_fast_equals_straightforward_sliding_window_every_layer(tokenizer):
    """Models whose every layer slides (Mistral/Phi-3 style ``sliding_window``)."""
    cfg = MistralConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    kw = dict(kinds=KINDS, samples=2, noise=1.0, window=2, tokens=[6, 8, -1])
    _close(
        causal_trace(model, tokenizer, LONG_PROMPT, SUBJECT, batch_size=4, **kw),
        causal_trace(model, tokenizer, LONG_PROMPT, SUBJECT, method="straightforward", **kw),
    )


def test_fast_equals_straightforward_sever_all_tokens(tiny, tokenizer):
    kw = dict(
        kinds=["hidden_sever_mlp", "hidden_sever_attn"], samples=2, noise=1.0, tokens=[2, 4], sever_all_tokens=True
    )
    _close(
        causal_trace(tiny, tokenizer, PROMPT, SUBJECT, **kw),
        causal_trace(tiny, tokenizer, PROMPT, SUBJECT, method="straightforward", **kw),
    )


def test_default_model_fast_equals_straightforward(default_model):
    model, tok = default_model
    kw = dict(kinds=["hidden", "mlp", "hidden_sever_attn"], samples=2, noise=0.35, tokens=[3, -1], layers=[7, 29])
    fast = causal_trace(model, tok, PROMPT, SUBJECT, **kw)
    slow = causal_trace(model, tok, PROMPT, SUBJECT, method="straightforward", **kw)
    _close(fast, slow)
    assert fast.tokens[fast.subject_range[0] : fast.subject_range[1]] == [" Space", " Need", "le"]
    assert fast.answer_is_prediction and fast.clean_prob > fast.low_prob
    assert fast.scores["hidden"][-1, 29] == pytest.approx(fast.clean_prob, rel=1e-5)
    assert np.isnan(fast.scores["mlp"][5, 7]) and np.isnan(fast.scores["mlp"][3, 8])
    assert not np.isnan(fast.scores["mlp"][3, 7])


def test_default_model_bfloat16_autocast_stays_close_to_float32(default_model):
    """The fast option for many-fact runs: scores move by bfloat16 rounding only, peaks stay put."""
    model, tok = default_model
    kw = dict(kinds=["hidden", "mlp"], samples=2, noise=0.35, tokens=[3, 4, 9], layers=[2, 6, 12, 20, 29])
    full = causal_trace(model, tok, PROMPT, SUBJECT, **kw)
    half = causal_trace(model, tok, PROMPT, SUBJECT, autocast="bfloat16", **kw)
    assert half.meta["autocast"] == "bfloat16" and full.meta["autocast"] is None
    assert half.answer_id == full.answer_id
    assert half.clean_prob == pytest.approx(full.clean_prob, abs=0.02)
    for k in kw["kinds"]:
        x, y = full.scores[k], half.scores[k]
        ok = ~np.isnan(x)
        assert np.abs(x[ok] - y[ok]).max() < 0.02, k
        assert np.corrcoef(x[ok], y[ok])[0, 1] > 0.99, k
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the weights alone


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "prompt, subject, answer, match",
    [
        ("", SUBJECT, None, "prompt is empty"),
        ("   ", SUBJECT, None, "prompt is empty"),
        (PROMPT, "Eiffel Tower", None, "does not occur in the prompt"),
        (PROMPT, "", None, "subject is empty"),
        (PROMPT, SUBJECT, "", "tokenizes to nothing"),
        (PROMPT, SUBJECT, "   ", "tokenizes to nothing"),
    ],
)
def test_bad_input_raises(tiny, tokenizer, prompt, subject, answer, match):
    with pytest.raises(FactEditError, match=match):
        causal_trace(tiny, tokenizer, prompt, subject, answer, samples=1, noise=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kinds=["neurons"]), "unknown kind"),
        (dict(method="slow"), "unknown method"),
        (dict(samples=0), "samples"),
        (dict(window=0), "window"),
        (dict(noise=-1.0), "noise scale"),
        (dict(tokens=[40]), "out of range"),
        (dict(layers=[4]), "out of range"),
        (dict(autocast="int8"), "autocast"),
    ],
)
def test_bad_options_raise(tiny, tokenizer, kwargs, match):
    with pytest.raises(FactEditError, match=match):
        causal_trace(tiny, tokenizer, PROMPT, SUBJECT, **{"samples": 1, "noise": 1.0, **kwargs})


def test_answer_other_than_prediction_warns_and_is_recorded(tiny, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="factedit.tracing.core"):
        r = causal_trace(tiny, tokenizer, PROMPT, SUBJECT, "Seattle", samples=1, noise=1.0, tokens=[-1])
    assert "not the given answer" in caplog.text
    assert r.answer == " Seattle" and not r.answer_is_prediction and r.predicted != r.answer
    assert json.loads(json.dumps(r.to_dict()))["answer_is_prediction"] is False


def test_cli_bad_input_writes_nothing(tmp_path):
    import typer

    from factedit.cli.trace import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "trace"
    runner = CliRunner()
    res = runner.invoke(
        app, ["trace", "--prompt", PROMPT, "--subject", "Eiffel Tower", "--noise", "0.3", "--out", str(out)]
    )
    assert res.exit_code == 2 and "does not occur in the prompt" in res.output
    res = runner.invoke(
        app, ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--kind", "neurons", "--out", str(out)]
    )
    assert res.exit_code == 2 and "unknown --kind" in res.output
    assert not out.exists()


# ----------------------------------------------------------------------------- outputs


def test_result_save_load_and_plots(tiny, tokenizer, tmp_path):
    from factedit.tracing.plots import plot_trace_all

    r = causal_trace(tiny, tokenizer, PROMPT, SUBJECT, kinds=KINDS, samples=2, noise=1.0, tokens=[1, 3, -1])
    files = r.save(tmp_path)
    back = TraceResult.load(tmp_path)
    _close(r, back)
    assert back.tokens == r.tokens and back.subject_range == r.subject_range
    with np.load(files[1]) as npz:
        np.testing.assert_allclose(npz["scores_mlp"], r.scores["mlp"])
    paths = plot_trace_all(r, tmp_path, formats=("png", "svg"))
    assert {p.name for p in paths} >= {"trace_hidden.png", "trace_mlp.svg", "trace_all.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
    assert not list(tmp_path.glob(".*.tmp"))


def test_buckets_and_summary():
    m = np.arange(8 * 3, dtype=float).reshape(8, 3)  # 8 tokens, 3 layers; subject = tokens 1..3
    rows = bucket_rows(m, (1, 4))
    assert list(rows) == list(BUCKETS)
    np.testing.assert_array_equal(rows["middle subject tokens"], m[2])
    np.testing.assert_array_equal(rows["further tokens"], m[5:7].mean(0))
    one = bucket_rows(m[:3], (1, 2))  # one-token subject right before the last token
    assert "middle subject tokens" not in one and "further tokens" not in one
    assert one["first subsequent token"] is not None
    recs = [
        {"low_prob": 0.1, "clean_prob": 0.5, "subject_range": [1, 4], "scores": {"hidden": (m / 100 + i).tolist()}}
        for i in range(3)
    ]
    table = summarize(recs)
    s = table.series("hidden", "last token")
    np.testing.assert_allclose(s["mean"], m[7] / 100 + 1 - 0.1)
    half = t_quantile_975(2) * 1.0 / np.sqrt(3)
    np.testing.assert_allclose(s["ci95_high"] - s["mean"], half)
    assert table.peaks()["hidden"]["bucket"] == "last token" and table.peaks()["hidden"]["layer"] == 2
    assert "kind,bucket,layer,n,mean" in table.to_csv()
    assert t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)


def test_dataset_run_is_resumable(tiny, tokenizer, tmp_path):
    from factedit.tracing.knowns import KnownFact, known_by_model

    # a data file whose attributes are what the tiny model predicts: the first three candidates whose
    # prediction is a word (leading space), so that the known-facts filter keeps them
    candidates = [
        (PROMPT, SUBJECT),
        ("Beats Music is owned by", "Beats Music"),
        ("Toko Yasuda plays the instrument", "Toko Yasuda"),
        ("The Eiffel Tower is located in", "Eiffel Tower"),
        ("Danielle Darrieux's mother tongue is", "Danielle Darrieux"),
        ("Apple A5 was created by", "Apple A5"),
        ("Lionel Messi plays the sport of", "Lionel Messi"),
        ("Michael Jordan is a professional", "Michael Jordan"),
    ]
    guesses = known_by_model(tiny, tokenizer, [KnownFact(i, s, "x", p) for i, (p, s) in enumerate(candidates)])
    chosen = [(c, g) for c, g in zip(candidates, guesses, strict=True) if g.predicted.startswith(" ")][:3]
    assert len(chosen) == 3, [g.predicted for g in guesses]
    prompts, preds = [c for c, _ in chosen], [g for _, g in chosen]
    records = [
        {"known_id": i, "subject": s, "prompt": p, "attribute": pr.predicted.strip(), "relation_id": "P1"}
        for i, ((p, s), pr) in enumerate(zip(prompts, preds, strict=True))
    ]
    records.insert(1, {"known_id": 9, "subject": "Paris", "prompt": "Paris is the capital of", "attribute": "zzzqx"})
    data = tmp_path / "known.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    kw = dict(data=data, samples=2, noise=1.0, batch_size=64, plots=False, progress=False)
    stages = []

    class Stages(Progress):
        def on_end(self, stage):
            stages.append((stage.name, stage.total, stage.done))

    trace_dataset(tiny, tokenizer, out, n=2, **{**kw, "progress": Stages()})
    assert [r["known_id"] for r in read_results(out)] == [0, 1]  # fact 9 is not predicted: skipped
    assert stages == [("known facts", 4, 4), ("tracing facts", 2, 2)]
    with open(out / "results.jsonl", "a") as fh:  # a crash in the middle of a line
        fh.write('{"known_id": 2, "scor')
    table = trace_dataset(tiny, tokenizer, out, n=3, **kw)
    assert [r["known_id"] for r in read_results(out)] == [0, 1, 2]
    assert table.n_facts == 3 and (out / "effects.csv").is_file() and (out / "effects.json").is_file()
    sel = json.loads((out / "selection.json").read_text())
    assert sel["n_correct"] == 3 and sel["n_facts"] == 4
    rec = read_results(out)[0]
    assert set(rec["scores"]) == set(KINDS) | {"hidden_sever_mlp", "hidden_sever_attn"}
    sever = np.array(rec["scores"]["hidden_sever_mlp"], dtype=float)
    assert np.isfinite(sever[rec["subject_range"][1] - 1]).all() and np.isnan(sever[-1]).all()
    with pytest.raises(FactEditError, match="other settings"):
        trace_dataset(tiny, tokenizer, out, n=3, **{**kw, "samples": 3})
    write_summary(out, plots=True)
    assert (out / "effects_all.png").is_file() and (out / "effects_severed.pdf").is_file()


def test_noise_scale_is_cached_per_model(tiny, tokenizer, tmp_path, monkeypatch, data_dir):
    import factedit.tracing.noise as noise

    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path))
    std = noise.noise_scale(tiny, tokenizer)
    assert 0 < std < 10 and list((tmp_path / "tracing").glob("embedding_std-*.json"))

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(noise, "embedding_std", boom)
    assert noise.noise_scale(tiny, tokenizer) == std
    r = causal_trace(tiny, tokenizer, PROMPT, SUBJECT, samples=1, tokens=[-1], layers=[0])
    assert r.noise == pytest.approx(3 * std)
