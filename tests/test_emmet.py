"""EMMET on tiny random models: batch edits land, every edit is an equality constraint, patches revert
bit-exact, bad settings are refused in one line, and the registry runs it like every other method."""

from __future__ import annotations

import functools
from importlib import resources

import pytest
import torch

from factedit import EditRequest, FactEditError, edit_and_compare, get_method, method_names
from factedit.editing.emmet import compute_emmet, emmet_solver
from factedit.editing.hparams import EMMETHyperParams
from factedit.editing.keys import mean_keys
from factedit.editing.patch import Patch
from factedit.models import arch_for
from factedit.stats.second_moment import second_moments

from .tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Random tiny models need the settings explained in test_families.py (edit at the last token,
# no weight decay, loose clamp): information at the subject barely reaches the last position.
SETTINGS = dict(
    fact_token="last", v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=15, mom2_update_weight=1.0
)
REQUESTS = [
    EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome", target_true="Paris"),
    EditRequest("{} plays the sport of", "LeBron James", "football", target_true="basketball"),
]
TEMPLATES = ["{}", "Hello. {}"]


@functools.cache
def default_tokenizer():
    """The default model's tokenizer, read from its GGUF file's metadata: these tests need no real weights
    (loading them would need the model lock), and it encodes as the converted model's tokenizer does."""
    from transformers import AutoTokenizer

    from factedit.models.registry import DEFAULT_MODEL, REGISTRY, gguf_parts
    from factedit.models.tokens import add_document_start

    (gguf,) = gguf_parts(REGISTRY[DEFAULT_MODEL])
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    add_document_start(tok)
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def setup(tokenizer, corpus_file):
    model = tiny_model("llama", hidden=256, intermediate=512)
    moments = second_moments(model, tokenizer, [1, 2], corpus=corpus_file, n_tokens=4000, cache=False, progress=False)
    return model, tokenizer, moments


def _argmax(model, tok, text):
    with torch.no_grad():
        return int(model(**tok(text, return_tensors="pt")).logits[0, -1].argmax())


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_batch_of_two_edits_makes_both_targets_top1_and_reverts_bit_exact(setup, tmp_path):
    model, tok, moments = setup
    before = _weights(model)
    targets = [tok(r.new_text, add_special_tokens=False)["input_ids"][0] for r in REQUESTS]
    assert [_argmax(model, tok, r.text) for r in REQUESTS] != targets
    hp = EMMETHyperParams.for_model(model, layers=[1, 2], **SETTINGS)
    result = compute_emmet(model, tok, REQUESTS, hp, second_moment=moments, templates=TEMPLATES)
    assert _same(model, before)  # computing changes nothing
    patch = result.patch
    assert patch.method == "emmet" and patch.hparams["emmet_lambda"] == 0.1
    assert [e.name for e in patch.entries] == [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    ]
    handle = patch.apply(model)
    assert [_argmax(model, tok, r.text) for r in REQUESTS] == targets
    edited = _weights(model)
    handle.revert()
    assert _same(model, before)
    loaded = Patch.load(patch.save(tmp_path / "emmet"))  # the saved file is the same edit
    assert loaded.method == "emmet"
    loaded.apply(model)
    assert _same(model, edited)
    loaded.revert(model)
    assert _same(model, before)


def test_every_edit_is_an_equality_constraint(setup):
    """With emmet_lambda 0, ΔW = R Aᵀ writes each key's residual exactly (AᵀK = I), and A is the paper's
    C⁻¹K(KᵀC⁻¹K)⁻¹; a positive emmet_lambda relaxes a batch's constraints, never a single edit's."""
    model, tok, moments = setup
    arch = arch_for(model)
    requests = REQUESTS + [EditRequest("{} was born in", "Barack Obama", "Paris")]
    keys = mean_keys(model, tok, arch, 1, requests, TEMPLATES, [0.5, 0.5], "last").double().T  # (d_in, n)
    exact = EMMETHyperParams.for_model(model, layers=[1], emmet_lambda=0.0, **SETTINGS)
    adj = emmet_solver(moments, exact)(1, keys)
    eye = torch.eye(len(requests), dtype=torch.float64)
    assert torch.allclose(adj.T @ keys, eye, atol=1e-6)
    c_inv = torch.inverse(moments[1].double())  # the paper's formula, with explicit inverses
    reference = c_inv @ keys @ torch.inverse(keys.T @ c_inv @ keys)
    assert torch.allclose(adj, reference, rtol=1e-5, atol=1e-8 * float(reference.abs().max()))
    relaxed = emmet_solver(moments, exact.replace(emmet_lambda=0.1))
    d = keys.T @ c_inv @ keys  # with λ: AᵀK = D (D + λI)⁻¹, each constraint met up to λ(D + λI)⁻¹
    assert torch.allclose(relaxed(1, keys).T @ keys, d @ torch.inverse(d + 0.1 * eye), atol=1e-6)
    assert torch.allclose(relaxed(1, keys[:, :1]).T @ keys[:, :1], eye[:1, :1], atol=1e-9)


def test_bad_settings_are_refused_in_one_line(setup):
    model, _, _ = setup
    for overrides, problem in (
        ({"emmet_lambda": -1.0}, "emmet_lambda"),
        ({"update_norm_lambda": float("inf")}, "update_norm_lambda"),
        ({"mom2_update_weight": 0}, "mom2_update_weight"),
        ({"emmet_lamda": 0.1}, "unknown key 'emmet_lamda'"),
        ({"layers": [99]}, "layer"),
    ):
        with pytest.raises(FactEditError, match=problem) as info:
            get_method("emmet").hparams(model, overrides={"layers": [1], **overrides})
        assert "\n" not in str(info.value)
    with pytest.raises(FactEditError, match="conflicting requests"):
        get_method("emmet").check_requests(
            [REQUESTS[0], EditRequest(REQUESTS[0].prompt, "Eiffel Tower", "Berlin")], None
        )


def test_registry_runs_emmet_through_the_api_every_front_end_uses(setup):
    model, tok, moments = setup
    assert "emmet" in method_names()
    method = get_method("emmet")
    assert method.capabilities.batch and method.capabilities.sequential and not method.capabilities.state
    before = _weights(model)
    report = edit_and_compare(
        model,
        tok,
        REQUESTS,
        "emmet",
        overrides=dict(layers=[1, 2], **SETTINGS),
        second_moment=moments,
        templates=TEMPLATES,
    )
    assert report.method == "emmet" and all(report.landed), report.summary_line()
    assert len(report.converged) == len(REQUESTS) and "top prediction" in report.summary_line()
    report.applied[0].revert()
    assert _same(model, before)


def test_default_files_cover_every_family_with_one_layer():
    """Every family has an EMMET file (ROME's layer, as the official files); SmolLM2 gets ROME's measured layer."""
    root = resources.files("factedit") / "hparams" / "emmet"
    assert sorted(f.name.removesuffix(".json") for f in root.iterdir() if f.name.endswith(".json")) == sorted(FAMILIES)
    for family in FAMILIES:
        with torch.device("meta"):  # a 30-layer model of the family, no weights allocated
            model = tiny_model(family, layers=30)
        hp = EMMETHyperParams.for_model(model)
        assert len(hp.layers) == 1 and hp.emmet_lambda == 0.1 and hp.update_norm_lambda == 0
        assert hp.context_template_length_params == [(10, 5)]
