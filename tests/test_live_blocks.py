"""The live-token runner of the value optimisation: which models it serves, and that it computes what the
model's own forward computes (the HF fast path and the plain path), on tiny models of each family."""

from __future__ import annotations

import pytest
import torch

import factedit.editing.values as values_module
from factedit.editing.hparams import ROMEHyperParams
from factedit.editing.requests import EditRequest
from factedit.editing.values import build_value_problem, optimize_values
from factedit.models.architectures import arch_for
from factedit.models.live import LIVE_FAMILIES, LiveBlocks
from factedit.text import pad_id

from .requests_for_tests import REQUEST, TEMPLATES
from .tiny_models import FAMILIES, LAYERS, tiny_model

SETTINGS = dict(v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=8, early_stop_loss=0.0)
OTHER = EditRequest(prompt="{} speaks the language", subject="Danielle Darrieux", target_new="English")


def _optimize(model, problems, tokenizer, *, layer: int, site: str, path: str, monkeypatch, **settings):
    """Run the value optimisation along one path: "live", "model" (the HF fast path) or "plain"."""
    with monkeypatch.context() as patch:
        if path == "model":
            patch.setattr(values_module, "_live_blocks", lambda *args: None)
        hp = ROMEHyperParams.for_model(model, layers=[layer], prefix_cache=path != "plain", **{**SETTINGS, **settings})
        return optimize_values(
            model, arch_for(model), problems, site=site, layer=layer, hparams=hp, pad=pad_id(tokenizer)
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_serves_only_families_it_reproduces(family):
    model = tiny_model(family)
    runner = LiveBlocks.for_model(model, arch_for(model), 1, max_position=32)
    assert (runner is not None) == (family in LIVE_FAMILIES)
    assert {f for f, _ in LIVE_CASES} == LIVE_FAMILIES  # the equivalence test below covers every served family
    if runner is not None:
        assert len(runner.blocks) == LAYERS - 1
        assert LiveBlocks.for_model(model, arch_for(model), LAYERS, max_position=32) is None  # no block above


# every family the runner serves, each site (ROME's and MEMIT's) on two of them
LIVE_CASES = [("llama", "rewrite"), ("qwen2", "block"), ("qwen3", "rewrite"), ("mistral", "block")]


@pytest.mark.parametrize("family,site_kind", LIVE_CASES)
def test_live_path_equals_model_forward_and_plain_path(family, site_kind, tokenizer, monkeypatch):
    """ROME's site (the MLP output projection) or MEMIT's (the block output), two problems of different
    lengths in one batch: the three paths give the same deltas and losses."""
    model = tiny_model(family)
    arch = arch_for(model)
    layer = 1
    site = arch.rewrite_at(layer) if site_kind == "rewrite" else arch.block(layer)
    problems = [build_value_problem(tokenizer, r, TEMPLATES) for r in (REQUEST, OTHER)]
    assert values_module._live_blocks(model, arch, site, layer, values_module._flatten(problems, "cpu")) is not None
    runs = {
        path: _optimize(model, problems, tokenizer, layer=layer, site=site, path=path, monkeypatch=monkeypatch)
        for path in ("live", "model", "plain")
    }
    live = runs["live"]
    assert live.delta.norm() > 0.1 * live.target_init.norm(), "the optimisation did not move"
    for other in ("model", "plain"):
        ref = runs[other]
        torch.testing.assert_close(live.target_init, ref.target_init, rtol=1e-5, atol=1e-6)
        assert (live.delta - ref.delta).norm() <= 1e-4 * ref.delta.norm(), other
        for mine, theirs in zip(live.losses, ref.losses, strict=True):
            for a, b in zip(mine, theirs, strict=True):
                assert a["nll"] == pytest.approx(b["nll"], rel=1e-4, abs=1e-5)
                assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-6)
    assert all(p.requires_grad for p in model.parameters()), "parameter flags not restored"


def test_live_path_keeps_per_request_early_stop(tokenizer, monkeypatch):
    """Requests leave the batch at different steps (the runner's batch is cut down with them)."""
    model = tiny_model("llama", init=0.1)  # larger weights than the default tiny model: the losses can fall
    arch = arch_for(model)
    problems = [build_value_problem(tokenizer, r, TEMPLATES) for r in (REQUEST, OTHER)]
    settings = dict(v_num_grad_steps=30, v_lr=0.5)
    plain = _optimize(
        model, problems, tokenizer, layer=1, site=arch.rewrite_at(1), path="plain", monkeypatch=monkeypatch, **settings
    )
    finals = sorted(h[-1]["total"] for h in plain.losses)
    threshold = (finals[0] + finals[1]) / 2  # crossed by one request on the way, never by the other
    runs = {
        path: _optimize(
            model, problems, tokenizer, layer=1, site=arch.rewrite_at(1), path=path, monkeypatch=monkeypatch,
            early_stop_loss=threshold, **settings,
        )
        for path in ("live", "plain")
    }  # fmt: skip
    live_steps = [len(h) for h in runs["live"].losses]
    assert live_steps == [len(h) for h in runs["plain"].losses]
    assert len(set(live_steps)) == 2, f"both requests stopped together ({live_steps})"
    assert (runs["live"].delta - runs["plain"].delta).norm() <= 1e-4 * runs["plain"].delta.norm()


def test_live_path_in_bfloat16(tokenizer, monkeypatch):
    """Half-precision weights: the runner computes in the weights' dtype like the model's own forward."""
    model = tiny_model("qwen2").to(torch.bfloat16)
    arch = arch_for(model)
    problems = [build_value_problem(tokenizer, REQUEST, TEMPLATES)]
    live, model_path = (
        _optimize(model, problems, tokenizer, layer=1, site=arch.rewrite_at(1), path=p, monkeypatch=monkeypatch)
        for p in ("live", "model")
    )
    assert live.delta.dtype == torch.float32  # the optimisation itself stays in float32
    assert (live.delta - model_path.delta).norm() <= 0.05 * model_path.delta.norm()
    assert live.losses[0][-1]["nll"] == pytest.approx(model_path.losses[0][-1]["nll"], rel=0.05)
