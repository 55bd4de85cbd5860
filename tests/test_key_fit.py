"""ROME's two answers to a bare prompt whose key is far from the template mean: a left vector fitted to
every template's key (``key_fit="every_template"``) and v* fitted to the update as applied
(``value_objective="applied"``)."""

from __future__ import annotations

import pytest
import torch

from factedit.editing.hparams import ROMEHyperParams
from factedit.editing.rome import _applied_problem, compute_rome, fitted_left_vector, left_vector
from factedit.editing.values import _flatten, build_value_problem, optimize_values
from factedit.errors import FactEditError
from factedit.models.architectures import arch_for, get_module
from factedit.text import pad_id

from .requests_for_tests import REQUEST
from .tiny_models import tiny_model

TEMPLATES = ["{}", "Hi. {}", "Yes. {}", "The weather is nice today. {}", "He said that it was late. {}"]
LENGTHS = [(5, 2), (10, 2)]
SETTINGS = dict(
    layers=[1],
    mom2_n_tokens=2000,
    v_weight_decay=0.0,
    clamp_norm_factor=100.0,
    v_num_grad_steps=10,
    context_template_length_params=LENGTHS,
)


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d)


def test_fitted_u_answers_every_key_alike_and_tends_to_rome_as_the_ridge_grows():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 16, generator=g, dtype=torch.float64) + 3.0  # similar keys, as a template set is
    keys[0] = torch.randn(16, generator=g, dtype=torch.float64)  # one far from the mean (a bare prompt)
    moment = _spd(16, 1)
    rome = left_vector(keys.mean(0), moment).double()
    rome_response = keys @ rome / (keys.mean(0) @ rome)
    assert float(rome_response.min()) < 0.9 or float(rome_response.max()) > 1.1  # ROME answers them unequally
    fitted = fitted_left_vector(keys, moment, ridge=1e-6).double()
    response = keys @ fitted / (keys.mean(0) @ fitted)
    assert torch.allclose(response, torch.ones(5, dtype=torch.float64), atol=1e-3)
    assert abs(float(fitted.norm()) - 1.0) < 1e-6
    wide = fitted_left_vector(keys, moment, ridge=1e6).double()
    assert float(torch.dot(wide, rome)) > 1 - 1e-6  # the same direction as ROME's u = C⁻¹k*
    with pytest.raises(FactEditError, match="key_fit"):
        ROMEHyperParams.from_dict({"layers": [1], "key_fit": "all"})
    with pytest.raises(FactEditError, match="key_fit_ridge"):
        ROMEHyperParams.from_dict({"layers": [1], "key_fit_ridge": 0})


def _change_at_keys(model, arch, layer, patch, keys):
    """ΔW kᵢ for each key, read from the rewrite module before and after the patch."""
    rewrite = get_module(model, arch.rewrite_at(layer))
    with torch.no_grad():
        before = rewrite(keys.to(model.dtype)).float()
        handle = patch.apply(model)
        after = rewrite(keys.to(model.dtype)).float()
        handle.revert()
    return after - before


def test_rome_with_fitted_u_gives_every_template_the_same_change(tokenizer, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    model = tiny_model("llama", hidden=256, intermediate=512)
    arch = arch_for(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    changes = {}
    for fit in ("mean", "every_template"):
        hp = ROMEHyperParams.for_model(model, key_fit=fit, key_fit_ridge=1e-4, **SETTINGS)
        result = compute_rome(model, tokenizer, REQUEST, hp, templates=TEMPLATES, corpus=str(corpus_file))
        detail = result.details[0]
        change = _change_at_keys(model, arch, 1, result.patch, detail.keys)
        at_mean = _change_at_keys(model, arch, 1, result.patch, detail.k_update[None])[0]
        changes[fit] = (change @ at_mean / at_mean.norm() ** 2).tolist()  # each key's share of the change at k*
    assert max(abs(s - 1) for s in changes["every_template"]) < 0.01
    assert max(abs(s - 1) for s in changes["mean"]) > max(abs(s - 1) for s in changes["every_template"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # computing edits nothing


def test_applied_objective_with_unit_response_is_the_injected_one(tokenizer):
    model = tiny_model("qwen2", hidden=128, intermediate=256)
    arch = arch_for(model)
    hp = ROMEHyperParams.for_model(model, **SETTINGS)
    problem = build_value_problem(tokenizer, REQUEST, TEMPLATES)
    width = model.config.hidden_size
    unit = problem.with_response([1.0] * (len(TEMPLATES) + 1), torch.zeros(width))
    kwargs = dict(site=arch.rewrite_at(1), layer=1, hparams=hp, pad=pad_id(tokenizer))
    plain = optimize_values(model, arch, [problem], **kwargs)
    responsive = optimize_values(model, arch, [unit], **kwargs)
    assert torch.allclose(plain.delta, responsive.delta, atol=1e-6)
    with pytest.raises(ValueError, match="gains"):
        problem.with_response([1.0], torch.zeros(width))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_applied_objective_fast_equals_plain_and_models_the_applied_update(
    family, tokenizer, corpus_file, tmp_path, monkeypatch
):
    """Under "applied", v* is fitted to what ΔW does: each prompt's change is gᵢ(δ + W k₀ − W k*)."""
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
    torch.manual_seed(1)
    model = tiny_model(family, hidden=128, intermediate=256)
    arch = arch_for(model)
    results = {}
    for fast in (True, False):
        hp = ROMEHyperParams.for_model(model, value_objective="applied", prefix_cache=fast, **SETTINGS)
        results[fast] = compute_rome(model, tokenizer, REQUEST, hp, templates=TEMPLATES, corpus=str(corpus_file))
    fast, plain = (results[f].details[0] for f in (True, False))
    assert float((fast.v_star - plain.v_star).norm() / plain.v_star.norm()) < 1e-4
    # what the optimisation added at each prompt, gᵢ(δ + offset), is what the patch changes at that prompt's key
    hp = ROMEHyperParams.for_model(model, value_objective="applied", **SETTINGS)
    problem = _applied_problem(
        model,
        tokenizer,
        arch,
        REQUEST,
        hp,
        1,
        fast.keys,
        fast.u,
        fast.k_update,
        build_value_problem(tokenizer, REQUEST, TEMPLATES, hp.fact_token),
    )
    rows = _flatten([problem], torch.device("cpu"))
    rewrite = get_module(model, arch.rewrite_at(1))
    with torch.no_grad():
        delta = fast.v_star - rewrite(fast.keys[:1].to(model.dtype))[0].float()  # v* = W k₀ + δ
    modelled = rows.injected(delta[None])[: len(TEMPLATES)]
    change = _change_at_keys(model, arch, 1, results[True].patch, fast.keys)
    assert torch.allclose(modelled, change, atol=1e-4 * float(change.norm(dim=1).max()))
    assert float(rows.gain[: len(TEMPLATES)].std()) > 0  # the prompts do respond differently
