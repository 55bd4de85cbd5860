"""How ROME's k* averages the keys over context templates (``key_average``): every template alike
(official ROME) or every context type alike (official MEMIT's compute_ks, so the bare prompt is a third)."""

from __future__ import annotations

import pytest
import torch

from factedit.editing.hparams import ROMEHyperParams
from factedit.editing.rome import average_key, compute_rome
from factedit.errors import FactEditError

from .requests_for_tests import REQUEST
from .tiny_models import tiny_model

# ROME's layout: the bare prompt, then 2 sampled prefixes of each of two lengths (a small stand-in for 10 + 10)
TEMPLATES = ["{}", "Hi. {}", "Yes. {}", "The weather is nice today. {}", "He said that it was late. {}"]
LENGTHS = [(5, 2), (10, 2)]


def test_context_types_weigh_the_bare_prompt_as_one_type_of_three():
    keys = torch.randn(5, 8, dtype=torch.float64)
    hp = ROMEHyperParams(layers=[1], context_template_length_params=LENGTHS)
    assert torch.allclose(average_key(keys, TEMPLATES, hp), keys.mean(0))
    typed = average_key(keys, TEMPLATES, hp.replace(key_average="context_types"))
    expected = keys[0] / 3 + keys[1:3].mean(0) / 3 + keys[3:5].mean(0) / 3
    assert torch.allclose(typed, expected)
    # templates that do not follow the spec's layout (given by hand) fall back to every template alike
    assert torch.allclose(
        average_key(keys[:3], TEMPLATES[:3], hp.replace(key_average="context_types")), keys[:3].mean(0)
    )
    with pytest.raises(FactEditError, match="key_average"):
        ROMEHyperParams.from_dict({"layers": [1], "key_average": "median"})


def test_rome_with_per_type_key_lands(tokenizer, corpus_file, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path / "home"))
    model = tiny_model("qwen2", hidden=256, intermediate=512)
    hp = ROMEHyperParams.for_model(
        model,
        layers=[1],
        mom2_n_tokens=2000,
        fact_token="last",
        v_weight_decay=0.0,
        clamp_norm_factor=100.0,
        v_num_grad_steps=10,
        context_template_length_params=LENGTHS,
        key_average="context_types",
    )
    result = compute_rome(model, tokenizer, REQUEST, hp, templates=TEMPLATES, corpus=str(corpus_file))
    detail = result.details[0]
    assert torch.allclose(detail.k_update, average_key(detail.keys, TEMPLATES, hp))  # r-ROME: the same k* in u and ΔW
    handle = result.patch.apply(model)
    target = tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokenizer(REQUEST.text)["input_ids"]])).logits
    assert int(logits[0, -1].argmax()) == target
    handle.revert()
