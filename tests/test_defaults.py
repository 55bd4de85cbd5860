"""Default hyper-parameters: a registry model's measured values first, else its family's, with the
layer given as a fraction of depth and resolved for the model at hand.

Models of a real size are built on the ``meta`` device from their configs (no weights, no memory):
defaults read only the config.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

from factedit.editing.ft import FTHyperParams, FTLHyperParams
from factedit.editing.hparams import AlphaEditHyperParams, MEMITHyperParams, ROMEHyperParams
from factedit.errors import FactEditError
from factedit.models.architectures import check_layer
from factedit.models.registry import DEFAULT_MODEL, REGISTRY, model_label, registry_name

from .tiny_models import FAMILIES, tiny_model

CLASSES = (ROMEHyperParams, MEMITHyperParams, AlphaEditHyperParams, FTHyperParams, FTLHyperParams)
SINGLE_LAYER = (ROMEHyperParams, FTHyperParams, FTLHyperParams)
RUN_OF_LAYERS = (MEMITHyperParams, AlphaEditHyperParams)
HPARAMS = resources.files("factedit") / "hparams"
FRACTION_KEYS = ("layer_fraction", "layer_count")


def _on_meta(build):
    with torch.device("meta"):
        return build()


def _family_file(cls, family: str) -> dict:
    return json.loads((HPARAMS / cls.method() / f"{family}.json").read_text())


def _run_length(cls, family: str) -> int:
    return _family_file(cls, family)["layer_count"]


def _gpt2(layers: int) -> torch.nn.Module:
    return _on_meta(lambda: GPT2LMHeadModel(GPT2Config(n_layer=layers)))


def _tiny_on_meta(family: str, layers: int) -> torch.nn.Module:
    return _on_meta(lambda: tiny_model(family, layers=layers, hidden=16, heads=2, kv_heads=1, intermediate=32))


def test_gpt2_small_from_a_config_gets_a_valid_layer_for_every_method():
    """The old gpt2 file gave GPT-2 XL's layer 17 to every GPT-2; GPT-2 small has 12 layers."""
    model = _gpt2(12)  # GPT2Config() is GPT-2 small: 12 layers, 768 wide
    assert registry_name(model) is None and model_label(model) == "gpt2"
    for cls in CLASSES:
        hp = cls.for_model(model)
        assert all(check_layer(model, layer) == layer for layer in hp.layers), cls.__name__
        assert hp.layers == list(range(hp.layers[0], hp.layers[-1] + 1))
        if cls in SINGLE_LAYER:
            assert hp.layers == [4]  # round(0.354 x 12)
        else:
            assert hp.layers == [0, 1, 2, 3, 4]  # five layers ending at ROME's layer, as 13-17 end at 17


@pytest.mark.parametrize(
    "build, rome, memit",
    [
        pytest.param(lambda: _gpt2(48), [17], list(range(13, 18)), id="gpt2-xl"),
        pytest.param(lambda: _gpt2(24), [8], list(range(4, 9)), id="gpt2-medium"),
        pytest.param(lambda: _on_meta(lambda: GPTJForCausalLM(GPTJConfig())), [5], list(range(3, 9)), id="gpt-j-6b"),
    ],
)
def test_family_fractions_give_back_the_official_layers(build, rome, memit):
    """The fractions were derived from the official GPT-2 XL and GPT-J files; resolved for those models (and
    for GPT-2 medium, whose official ROME layer is 8 of 24) they give the official layers back."""
    model = build()
    assert ROMEHyperParams.for_model(model).layers == rome
    assert FTHyperParams.for_model(model).layers == rome == FTLHyperParams.for_model(model).layers
    if model.config.n_layer != 24:  # MEMIT published no GPT-2 medium layers
        assert MEMITHyperParams.for_model(model).layers == memit == AlphaEditHyperParams.for_model(model).layers


def test_a_12_layer_llama_gets_the_family_fraction_not_smollm2s_layer():
    model = _tiny_on_meta("llama", 12)
    rome = ROMEHyperParams.for_model(model)
    assert rome.layers == [2] != [6]  # round(0.18 x 12), where the old file gave every Llama SmolLM2's 6
    memit = MEMITHyperParams.for_model(model)
    assert memit.layers == [0, 1, 2, 3]  # GPT-J's run of 6 ending at 0.286 of depth, cut at layer 0
    # a 30-layer Llama that is not SmolLM2 gets the family's values, not SmolLM2's measured ones
    other = _tiny_on_meta("llama", 30)
    assert ROMEHyperParams.for_model(other).layers == [5]
    assert MEMITHyperParams.for_model(other).layers == [4, 5, 6, 7, 8, 9]


def test_default_model_keeps_its_measured_values(default_model):
    """SmolLM2: ROME/FT layer 6, MEMIT/AlphaEdit layers 4-8 with lambda 1000 (README), every other value
    exactly the family file's."""
    model, _ = default_model
    assert registry_name(model) == DEFAULT_MODEL == model_label(model)
    measured = {
        ROMEHyperParams: [6],
        FTHyperParams: [6],
        FTLHyperParams: [6],
        MEMITHyperParams: [4, 5, 6, 7, 8],
        AlphaEditHyperParams: [4, 5, 6, 7, 8],
    }
    for cls, layers in measured.items():
        hp = cls.for_model(model)
        assert hp.layers == layers, cls.__name__
        family = {k: v for k, v in _family_file(cls, "llama").items() if k not in FRACTION_KEYS}
        assert hp == cls.from_dict({**family, "layers": layers}), cls.__name__  # nothing else differs
        if cls in RUN_OF_LAYERS:
            assert hp.mom2_update_weight == 1000
    alpha = AlphaEditHyperParams.for_model(model)
    assert alpha.nullspace_threshold == 2e-2 and alpha.L2 == 10.0
    # the same values on a model loaded by hand from the converted cache folder (recognised by its marker)
    by_hand = _tiny_on_meta("llama", 30)
    assert registry_name(by_hand) is None
    by_hand.config._name_or_path = model.config._name_or_path
    assert registry_name(by_hand) == DEFAULT_MODEL
    assert ROMEHyperParams.for_model(by_hand).layers == [6]


def test_overrides_win(default_model):
    model, _ = default_model
    assert ROMEHyperParams.for_model(model, layers=[3]).layers == [3]
    memit = MEMITHyperParams.for_model(model, layers=[1, 2], mom2_update_weight=50.0)
    assert memit.layers == [1, 2] and memit.mom2_update_weight == 50.0
    # a fraction given as an override replaces the model file's layers too
    assert ROMEHyperParams.for_model(model, layer_fraction=0.5).layers == [15]
    assert MEMITHyperParams.for_model(model, layer_fraction=0.5, layer_count=2).layers == [14, 15]
    small = _gpt2(12)
    assert FTHyperParams.for_model(small, layers=[11], num_steps=3).layers == [11]
    assert AlphaEditHyperParams.for_model(small, layers=[5, 6]).layers == [5, 6]


def test_validation_stays_strict():
    """The fraction keys are resolved before validation; anything else unknown is still an error."""
    model = _gpt2(12)
    with pytest.raises(FactEditError, match="bogus"):
        ROMEHyperParams.for_model(model, bogus=1)
    with pytest.raises(FactEditError, match="layer_fraction"):
        ROMEHyperParams.for_model(model, layer_fraction=1.5)
    with pytest.raises(FactEditError, match="layer_count"):
        MEMITHyperParams.for_model(model, layer_count=0)
    with pytest.raises(FactEditError, match="out of range"):
        ROMEHyperParams.for_model(model, layers=[12])
    assert not hasattr(ROMEHyperParams.for_model(model), "layer_fraction")
    with pytest.raises(FactEditError, match="layer_fraction"):  # a family file is not a complete hparams file
        ROMEHyperParams.from_json(str(HPARAMS / "rome" / "gpt2.json"))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_method_resolves_at_every_depth(family):
    """Each family file gives a fraction (never fixed layers) and yields valid layers at any depth."""
    for cls in CLASSES:
        data = _family_file(cls, family)
        assert "layers" not in data and 0 < data["layer_fraction"] < 1 and data["_comment"]
        assert ("layer_count" in data) == (cls in RUN_OF_LAYERS)
    for depth in (1, 4, 12, 30, 48):
        model = _tiny_on_meta(family, depth)
        rome = ROMEHyperParams.for_model(model)
        for cls in CLASSES:
            hp = cls.for_model(model)
            assert all(0 <= layer < depth for layer in hp.layers), (cls.__name__, depth)
            assert hp.layers == list(range(hp.layers[0], hp.layers[-1] + 1))
            if cls in SINGLE_LAYER:
                assert hp.layers == rome.layers  # FT baselines edit the family's ROME layer
            else:
                assert hp.context_template_length_params == [(10, 5)] and hp.mom2_update_weight > 0
                assert len(hp.layers) == min(_run_length(cls, family), hp.layers[-1] + 1)
        assert FTHyperParams.for_model(model).norm_constraint is None
        assert FTLHyperParams.for_model(model).norm_constraint == 5e-4
        assert AlphaEditHyperParams.for_model(model).nullspace_threshold == 2e-2


def test_model_files_name_registry_models_and_hold_measured_layers():
    found = 0
    for cls in CLASSES:
        for file in (HPARAMS / cls.method() / "models").iterdir():
            name = file.name.removesuffix(".json")
            assert name in REGISTRY, file.name
            data = json.loads(file.read_text())
            assert data["_comment"] and data["layers"] and not set(FRACTION_KEYS) & set(data)
            found += name == "smollm2-135m"
    assert found == len(CLASSES)  # SmolLM2's file for every method
