"""NAS, Norm-Anchor Scaling of the value vectors (arXiv 2602.02543), on tiny random models: with an anchor
set, every solved value vector v* = v₀ + δ has exactly the anchor's norm (ROME's v*, MEMIT's and
AlphaEdit's z through their MLP output), the edits still land, the fast and plain paths agree, an edit
over the skip threshold is dropped, the default (off) is untouched, and bad settings fail in one line."""

from __future__ import annotations

import logging

import pytest
import torch

from factedit import EditRequest, FactEditError, get_method
from factedit.editing.alphaedit import AlphaEditState, compute_alphaedit
from factedit.editing.hparams import (
    AlphaEditHyperParams,
    EMMETHyperParams,
    MEMITHyperParams,
    ROMEHyperParams,
)
from factedit.editing.keys import lookup_position, module_inputs_at
from factedit.editing.memit import compute_memit
from factedit.editing.rome import compute_rome
from factedit.editing.values import (
    anchor_value_norms,
    build_value_problem,
    optimize_values,
    reference_value_norm,
    upper_trimmed_mean,
)
from factedit.models import arch_for
from factedit.stats.second_moment import second_moments
from factedit.text import encode_with_subject, pad_id

from .test_emmet import default_tokenizer
from .tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Random tiny models need the settings explained in test_families.py (edit at the last token,
# no weight decay, loose clamp): information at the subject barely reaches the last position.
SETTINGS = dict(
    fact_token="last", v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=12, mom2_update_weight=1.0
)
ROME_SETTINGS = dict(layers=[1], fact_token="last", v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=12)
REQUESTS = [
    EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome"),
    EditRequest("{} plays the sport of", "LeBron James", "football"),
]
TEMPLATES = ["{}", "Hello. {}"]


@pytest.fixture(scope="module")
def setup(corpus_file):
    tok = default_tokenizer()
    torch.manual_seed(0)
    model = tiny_model("llama", hidden=256, intermediate=512)
    moments = second_moments(model, tok, [1, 2], corpus=corpus_file, n_tokens=4000, cache=False, progress=False)
    return model, tok, moments


def _argmax(model, tok, text):
    with torch.no_grad():
        return int(model(**tok(text, return_tensors="pt")).logits[0, -1].argmax())


def _targets(tok):
    return [tok(r.new_text, add_special_tokens=False)["input_ids"][0] for r in REQUESTS]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def _mlp_outputs(model, tok, layer, requests, fact_token="last"):
    """v₀, read independently of the optimisation: block ``layer``'s MLP output at each bare prompt's lookup."""
    arch = arch_for(model)
    bare = [encode_with_subject(tok, r.prompt, r.subject) for r in requests]
    name = arch.mlp_at(layer)
    return module_inputs_at(
        model, [name], [b.ids for b in bare], [lookup_position(b, fact_token) for b in bare],
        pad=pad_id(tok), output=True,
    )[name].float()  # fmt: skip


def _z(model, tok, hp, requests=REQUESTS, layer=2, **kwargs):
    arch = arch_for(model)
    problems = [build_value_problem(tok, r, TEMPLATES, hp.fact_token) for r in requests]
    return optimize_values(
        model, arch, problems, site=arch.block(layer), layer=layer, hparams=hp, pad=pad_id(tok), **kwargs
    )


def test_anchor_rule_rescales_every_value_to_the_anchor_and_drops_outliers():
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(4, 8, generator=g)
    delta = torch.randn(4, 8, generator=g) * torch.tensor([0.1, 1.0, 10.0, 0.0])[:, None]
    v0[3] = 0.0  # v* = 0: left as it is
    norms = (v0 + delta).norm(dim=1)
    anchor = float(norms[:3].mean())
    kept, skipped = anchor_value_norms(v0, delta, anchor, None)
    assert not skipped.any()
    assert torch.allclose((v0 + kept)[:3].norm(dim=1), torch.full((3,), anchor), rtol=1e-6)
    assert torch.equal(kept[3], torch.zeros(8))  # a zero v* stays zero (and δ stays 0)
    directions = torch.nn.functional.cosine_similarity(v0 + kept, v0 + delta, dim=1)[:3]
    assert torch.allclose(directions, torch.ones(3), atol=1e-6)  # only the length changes
    dropped, skipped = anchor_value_norms(v0, delta, anchor, 2.0)
    assert skipped.tolist() == [bool(n > 2 * anchor) for n in norms] and skipped.any()
    assert torch.equal(dropped[skipped], torch.zeros_like(dropped[skipped]))  # a dropped edit asks for no change
    assert torch.equal(dropped[~skipped], kept[~skipped])


def test_the_anchor_leaves_out_the_largest_five_percent():
    norms = [float(x) for x in range(1, 20)] + [1000.0]  # 20 norms: the largest one is left out
    assert upper_trimmed_mean(norms, 0.95) == (10.0, 1)
    assert upper_trimmed_mean(norms[:19], 0.95) == (10.0, 0)  # 19 x 5 % < 1: nothing is left out
    assert upper_trimmed_mean([3.0], 1.0) == (3.0, 0)


def test_memit_values_sit_at_the_anchor_and_fast_equals_plain(setup):
    model, tok, _ = setup
    off = MEMITHyperParams.for_model(model, layers=[1, 2], **SETTINGS)
    free = _z(model, tok, off, report_value_norms=True)
    v0 = _mlp_outputs(model, tok, 2, REQUESTS)
    assert torch.allclose(free.value_norms, (v0 + free.delta).norm(dim=1), rtol=1e-5)  # the same v₀ is read
    anchor = float(free.value_norms.mean())  # one value is shortened, the other lengthened
    runs = {}
    for fast in (True, False):
        runs[fast] = _z(model, tok, off.replace(value_norm_anchor=anchor, prefix_cache=fast))
        norms = (v0 + runs[fast].delta).norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, anchor), rtol=1e-5), norms
        assert not runs[fast].anchor_skipped.any()
        assert all(h[-1]["anchor_skipped"] == 0.0 and h[-1]["value_norm"] > 0 for h in runs[fast].losses)
    fast, plain = runs[True].delta, runs[False].delta
    assert float((fast - plain).norm() / plain.norm()) < 1e-4
    # z = (h − v₀) + s·v*: the part of the block output that is not the MLP's is kept
    assert torch.allclose(runs[True].targets - (v0 + runs[True].delta), free.target_init - v0, atol=1e-5)


def test_an_anchor_that_changes_no_length_changes_nothing_and_the_default_is_off(setup):
    model, tok, _ = setup
    off = MEMITHyperParams.for_model(model, layers=[1, 2], **SETTINGS)
    assert off.value_norm_anchor is None and off.value_norm_skip_factor == 2.0
    plain = _z(model, tok, off, requests=REQUESTS[:1])
    assert plain.value_norms is None and plain.anchor_skipped is None  # NAS did not run
    other_skip = _z(model, tok, off.replace(value_norm_skip_factor=3.0), requests=REQUESTS[:1])
    assert torch.equal(plain.delta, other_skip.delta)  # the skip factor is not read while NAS is off
    own = float(_z(model, tok, off, requests=REQUESTS[:1], report_value_norms=True).value_norms[0])
    same = _z(model, tok, off.replace(value_norm_anchor=own, value_norm_skip_factor=None), requests=REQUESTS[:1])
    assert torch.allclose(same.delta, plain.delta, atol=1e-5 * float(plain.delta.norm()))  # a rescaling by 1


def test_an_edit_over_the_skip_threshold_is_dropped(setup, caplog):
    model, tok, _ = setup
    hp = MEMITHyperParams.for_model(model, layers=[1, 2], **SETTINGS)
    norms = _z(model, tok, hp, report_value_norms=True).value_norms
    anchor = float(norms.min()) / 2.5  # the smaller v* is 2.5 anchors long: over the threshold of 2
    with caplog.at_level(logging.WARNING, logger="factedit.editing.values"):
        result = _z(model, tok, hp.replace(value_norm_anchor=anchor))
    assert result.anchor_skipped.all() and torch.equal(result.delta, torch.zeros_like(result.delta))
    assert "NAS: 2 of 2 edits dropped" in caplog.text
    assert all(h[-1]["anchor_skipped"] == 1.0 for h in result.losses)


def test_memit_and_an_alphaedit_sequence_with_nas_land_every_edit(setup):
    model, tok, moments = setup
    before = _weights(model)
    targets = _targets(tok)
    assert [_argmax(model, tok, r.text) for r in REQUESTS] != targets
    memit = MEMITHyperParams.for_model(model, layers=[1, 2], **SETTINGS)
    reference = reference_value_norm(model, tok, REQUESTS, memit, layer=2)
    assert reference.dropped == 0 and reference.refused == 0 and len(reference.norms) == len(REQUESTS)
    assert reference.anchor == pytest.approx(sum(reference.norms) / len(REQUESTS))
    nas = memit.replace(value_norm_anchor=reference.anchor)
    result = compute_memit(model, tok, REQUESTS, nas, second_moment=moments, templates=TEMPLATES)
    assert _same(model, before) and all(h[-1]["anchor_skipped"] == 0.0 for h in result.losses)
    handle = result.patch.apply(model)
    assert [_argmax(model, tok, r.text) for r in REQUESTS] == targets
    handle.revert()
    assert _same(model, before)

    threshold = float(torch.linalg.eigvalsh(moments[1].double()).median())  # half the key space preserved
    alpha = AlphaEditHyperParams.for_model(
        model, layers=[1, 2], nullspace_threshold=threshold, L2=1e-3, value_norm_anchor=reference.anchor, **SETTINGS
    )
    z = _z(model, tok, alpha)  # AlphaEdit's z: the same optimisation, anchored the same way
    norms = (_mlp_outputs(model, tok, 2, REQUESTS) + z.delta).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, reference.anchor), rtol=1e-5)
    state, handles = AlphaEditState({layer: moments[layer] for layer in (1, 2)}, alpha), []
    for request in REQUESTS:  # a sequence of two one-request batches, each anchored on the edited model
        step = compute_alphaedit(model, tok, [request], alpha, state=state, second_moment=moments, templates=TEMPLATES)
        assert step.losses[0][-1]["anchor_skipped"] == 0.0
        handles.append(step.patch.apply(model))
        state.commit()
    assert [_argmax(model, tok, r.text) for r in REQUESTS] == targets
    for handle in reversed(handles):
        handle.revert()
    assert _same(model, before)


def test_rome_v_star_sits_at_the_anchor_lands_and_fast_equals_plain(setup):
    model, tok, moments = setup
    before = _weights(model)
    request, target = REQUESTS[0], _targets(tok)[0]
    hp = ROMEHyperParams.for_model(model, **ROME_SETTINGS)
    assert hp.value_norm_anchor is None and hp.value_norm_skip_factor == 5.0  # the official ROME threshold
    anchor = reference_value_norm(model, tok, [request], hp, layer=1).anchor
    details = {}
    for fast in (True, False):
        nas = hp.replace(value_norm_anchor=anchor, prefix_cache=fast)
        result = compute_rome(model, tok, request, nas, second_moment={1: moments[1]}, templates=TEMPLATES)
        details[fast] = result.details[0]
        assert float(details[fast].v_star.norm()) == pytest.approx(anchor, rel=1e-5)
        assert result.losses[0][-1]["anchor_skipped"] == 0.0
        if fast:
            handle = result.patch.apply(model)
            assert _argmax(model, tok, request.text) == target
            handle.revert()
            assert _same(model, before)
    fast, plain = details[True].v_star, details[False].v_star
    assert float((fast - plain).norm() / plain.norm()) < 1e-4
    with pytest.raises(FactEditError, match="one layer") as info:
        compute_rome(model, tok, request, hp.replace(layers=[1, 2], value_norm_anchor=anchor), templates=TEMPLATES)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cls", [ROMEHyperParams, MEMITHyperParams, AlphaEditHyperParams, EMMETHyperParams])
def test_bad_nas_settings_are_refused_in_one_line(cls):
    for overrides, problem in (
        ({"value_norm_anchor": 0}, "value_norm_anchor"),
        ({"value_norm_anchor": -3.0}, "value_norm_anchor"),
        ({"value_norm_anchor": float("inf")}, "value_norm_anchor"),
        ({"value_norm_anchor": "large"}, "value_norm_anchor"),
        ({"value_norm_skip_factor": 0.5}, "value_norm_skip_factor"),
        ({"value_norm_anchr": 3.0}, "unknown key 'value_norm_anchr'"),
    ):
        with pytest.raises(FactEditError, match=problem) as info:
            cls.from_dict({"layers": [1], **overrides})
        assert "\n" not in str(info.value)
    hp = cls.from_dict({"layers": [1], "value_norm_anchor": 3.5, "value_norm_skip_factor": None})
    assert hp.value_norm_anchor == 3.5 and hp.value_norm_skip_factor is None


def test_bad_reference_requests_are_refused_in_one_line(setup):
    model, tok, _ = setup
    hp = MEMITHyperParams.for_model(model, layers=[1, 2], **SETTINGS)
    with pytest.raises(FactEditError, match="value_norm_anchor") as info:  # through the registry, as --set does
        get_method("alphaedit").hparams(model, overrides={"layers": [1], "value_norm_anchor": -1})
    assert "\n" not in str(info.value)
    for kwargs, problem in (
        (dict(requests=[]), "at least one request"),
        (dict(upper_quantile=0.0), "upper_quantile"),
        (dict(batch_size=0), "batch_size"),
        (dict(layer=99), "layer"),
    ):
        args = dict(requests=REQUESTS, layer=2) | kwargs
        with pytest.raises(FactEditError, match=problem) as info:
            reference_value_norm(model, tok, args.pop("requests"), hp, **args)
        assert "\n" not in str(info.value)
