"""Subject positions match the official code's; the default model loads from its package and cache."""

from __future__ import annotations

import json

import pytest
import torch

from factedit.models import load_model
from factedit.models.registry import REGISTRY, gguf_parts
from factedit.text import encode_with_subject, target_ids

from .conftest import shared_reference


def test_subject_last_token_matches_official_lookup(tokenizer):
    """For all 10 reference cases x 21 templates, the subject's last token is where the official code looked."""
    root = shared_reference() / "rome_official_smollm2"
    if not root.is_dir():
        pytest.skip("reference outputs not available")
    templates = json.loads((root / "context_templates.json").read_text())
    cases = json.loads((root / "edits.json").read_text())["cases"]
    checked = 0
    for case in cases:
        req = case["request"]
        ours = [encode_with_subject(tokenizer, t.replace("{}", req["prompt"]), req["subject"]).subject_last
                for t in templates]
        assert ours == case["lookup_idx"], case["case_id"]
        checked += len(ours)
    assert checked == 210


def test_subject_span_and_targets(tokenizer):
    enc = encode_with_subject(tokenizer, "The {} is located in the city of", "Eiffel Tower")
    tokens = tokenizer.convert_ids_to_tokens(enc.ids)
    assert "".join(tokens[enc.subject_first : enc.subject_last + 1]).replace("Ġ", " ").strip() == "Eiffel Tower"
    assert tokenizer.decode(target_ids(tokenizer, enc.text, " Rome")) == " Rome"
    assert len(target_ids(tokenizer, enc.text, " Buenos Aires")) >= 2


def test_default_model_comes_from_package_and_cache(default_model, tmp_path, monkeypatch):
    model, tok = default_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32 and not model.training
    (gguf,) = gguf_parts(REGISTRY["smollm2-135m"])
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_path_loads_the_same_weights(default_model, tmp_path, monkeypatch):
    """A .gguf path is dequantized once, cached, and gives the same weights as the registry name."""
    monkeypatch.setenv("FACTEDIT_HOME", str(tmp_path))
    model, _ = default_model
    (gguf,) = gguf_parts(REGISTRY["smollm2-135m"])
    first, _ = load_model(str(gguf))
    cached = list((tmp_path / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "factedit-cache.json").is_file()
    second, _ = load_model(str(gguf))  # from the safetensors cache this time
    for (name, a), b in zip(model.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    del first
