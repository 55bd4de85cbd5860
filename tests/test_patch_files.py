"""Patch files are untrusted input: malformed metadata and duplicate entries are refused on load,
and applying is all or nothing (tiny random llama; no download)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from factedit.editing.patch import Patch, PatchEntry
from factedit.errors import FactEditError
from factedit.models import arch_for, model_fingerprint
from factedit.models.fingerprint import model_identity, tensor_sha256
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _patch(model, layers=(0, 1)) -> Patch:
    arch = arch_for(model)
    entries = []
    for layer in layers:
        name = arch.rewrite_weight_at(layer)
        weight = model.get_parameter(name)
        gen = torch.Generator().manual_seed(layer)
        entries.append(PatchEntry(name=name, shape=tuple(weight.shape), base_sha256=tensor_sha256(weight),
                                  dense=1e-2 * torch.randn(weight.shape, generator=gen)))
    return Patch(method="test", entries=entries, base_fingerprint=model_fingerprint(model),
                 model_identity=model_identity(model), requests=[{"prompt": "{} is", "subject": "x"}],
                 hparams={"layers": list(layers)})


def _with_meta(data: bytes, **changes) -> bytes:
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["factedit_patch"])
    meta.update(changes)
    return save_bytes(load_bytes(data), metadata={"factedit_patch": json.dumps(meta)})


def test_round_trip_is_exact(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch = Patch.from_bytes(_patch(model).to_bytes())
    patch.apply(model)
    assert not torch.equal(model.get_parameter(patch.entries[0].name), before[patch.entries[0].name])
    patch.revert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("changes, message", [
    ({"requests": 5}, "requests"),
    ({"requests": ["x"]}, "requests"),
    ({"requests": [{"prompt": 5}]}, "prompt"),
    ({"hparams": {"layers": "x"}}, "layers"),
    ({"hparams": []}, "hparams"),
    ({"base_fingerprint": 7}, "base_fingerprint"),
    ({"method": None}, "method"),
    ({"entries": []}, "entries"),
    ({"entries": [{"name": ["a"], "shape": [2, 2], "transposed": False, "kind": "dense"}]}, "malformed"),
    ({"entries": [{"name": "a", "shape": [2, "2"], "transposed": False, "kind": "dense"}]}, "malformed"),
])
def test_malformed_metadata_is_refused(model, changes, message):
    data = _with_meta(_patch(model).to_bytes(), **changes)
    with pytest.raises(FactEditError, match=message):
        Patch.from_bytes(data)


def test_duplicate_entries_are_refused(model):
    patch = _patch(model, layers=(0, 0))
    with pytest.raises(FactEditError, match="two entries for one weight"):
        Patch.from_bytes(patch.to_bytes())
    fingerprint = model_fingerprint(model)
    with pytest.raises(FactEditError, match="two entries for one weight"):
        patch.apply(model)
    assert model_fingerprint(model) == fingerprint


def test_apply_is_all_or_nothing(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch = _patch(model)
    patch.entries[1].dense = None  # no factors either: computing this entry's delta fails mid-apply
    with pytest.raises(AttributeError):
        patch.apply(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not patch.is_applied(model)
