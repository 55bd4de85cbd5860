"""Gemma 3 normalises the MLP's output before the residual: MEMIT's residuals are mapped through that norm."""

from __future__ import annotations

import pytest
import torch

from factedit import EditRequest
from factedit.editing.hparams import MEMITHyperParams
from factedit.editing.keys import module_inputs_at
from factedit.editing.memit import compute_memit
from factedit.models.architectures import arch_for, get_module
from factedit.models.runtime import mlp_output_change
from factedit.stats.second_moment import second_moments

from .tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp_outputs(model, tok, layer: int, texts: list[str]) -> torch.Tensor:
    arch = arch_for(model)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    name = arch.rewrite_at(layer)
    return module_inputs_at(model, [name], ids, [len(i) - 1 for i in ids], pad=0, output=True)[name]


def test_a_reachable_residual_change_is_met_through_the_norm(tokenizer):
    model = tiny_model("gemma3")
    arch = arch_for(model)
    norm = get_module(model, arch.mlp_post_norm_at(1))
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))  # a gain far from 1, as trained Gemma models have
    m = _mlp_outputs(model, tokenizer, 1, ["The Eiffel Tower is in", "LeBron James plays"])
    torch.manual_seed(0)
    moved = m + 0.5 * m.norm(dim=1, keepdim=True) * torch.nn.functional.normalize(torch.randn_like(m), dim=1)
    with torch.no_grad():
        wanted = norm(moved) - norm(m)  # a residual change some MLP output does make
        change = mlp_output_change(model, arch, 1, m, wanted)
        naive = (norm(m + wanted) - norm(m) - wanted).norm(dim=1) / wanted.norm(dim=1)
        met = (norm(m + change) - norm(m) - wanted).norm(dim=1) / wanted.norm(dim=1)
    assert float(met.max()) < 1e-3 < 0.1 < float(naive.min())  # the unmapped R misses by a tenth or more


def test_families_without_a_post_norm_keep_the_residual(tokenizer):
    model = tiny_model("llama")
    arch = arch_for(model)
    assert arch.mlp_post_norm_at(1) is None
    r = torch.randn(2, 64, dtype=torch.float64)
    assert mlp_output_change(model, arch, 1, torch.randn(2, 64), r) is r


def test_memit_batch_lands_on_gemma3_with_trained_like_gains(tokenizer, corpus_file):
    """Two requests over two layers whose post-feedforward norms have gains far from 1: both become top-1."""
    model = tiny_model("gemma3", hidden=128, intermediate=256)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in (1, 2):
            get_module(model, arch_for(model).mlp_post_norm_at(layer)).weight.uniform_(0.5, 3.0)
    settings = dict(fact_token="last", v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=15)
    hp = MEMITHyperParams.for_model(model, layers=[1, 2], mom2_update_weight=1.0, **settings)
    moments = second_moments(model, tokenizer, [1, 2], corpus=corpus_file, n_tokens=4000, cache=False, progress=False)
    requests = [
        EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome"),
        EditRequest("{} plays the sport of", "LeBron James", "football"),
    ]
    result = compute_memit(model, tokenizer, requests, hp, second_moment=moments, templates=["{}"])
    targets = [tokenizer(r.new_text, add_special_tokens=False)["input_ids"][0] for r in requests]
    result.patch.apply(model)
    try:
        with torch.no_grad():
            got = [int(model(**tokenizer(r.text, return_tensors="pt")).logits[0, -1].argmax()) for r in requests]
    finally:
        result.patch.revert(model)
    assert got == targets
