"""Edits on half-precision weights: a ROME patch computed on bfloat16 / float16 tiny models lands,
its factors stay float32 (the optimisation and solves run in float32 whatever the weights' dtype),
and revert restores the half-precision weights bit-exact."""

from __future__ import annotations

import pytest
import torch

from factedit.editing.hparams import ROMEHyperParams
from factedit.editing.rome import compute_rome
from factedit.models.architectures import arch_for, get_parameter

from .requests_for_tests import REQUEST, TEMPLATES
from .tiny_models import tiny_model

SETTINGS = dict(fact_token="last", v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=10)


@pytest.fixture
def factedit_home(tokenizer, tmp_path, monkeypatch):
    """Statistics under a temporary folder (the default model's tokenizer is loaded first, from the real cache)."""
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_half_precision_edit_lands_and_reverts_bit_exact(family, dtype, tokenizer, corpus_file, factedit_home):
    model = tiny_model(family, hidden=256, intermediate=512).to(dtype)
    arch = arch_for(model)
    target = tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
    ids = torch.tensor([tokenizer(REQUEST.text)["input_ids"]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = ROMEHyperParams.for_model(model, layers=[1], mom2_n_tokens=2000, **SETTINGS)
    patch = compute_rome(model, tokenizer, REQUEST, hp, templates=TEMPLATES, corpus=str(corpus_file)).patch
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "computing changed the model"
    assert all(t.dtype == torch.float32 for e in patch.entries for t in e.tensors().values())

    handle = patch.apply(model)
    weight = get_parameter(model, arch.rewrite_weight_at(1))
    assert weight.dtype == dtype and not torch.equal(weight, before[arch.rewrite_weight_at(1)])
    with torch.no_grad():
        assert int(model(input_ids=ids).logits[0, -1].argmax()) == target
    handle.revert()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "revert is not bit-exact"
