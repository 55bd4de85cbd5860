"""The model-runtime layer (LM head, KV caches, explicit masks, skipped blocks) and progress reporting.

Everything runs real tiny models of every family (tests/tiny_models.py): a fast path built
from these pieces must give the numbers of the model's own full forward.
"""

from __future__ import annotations

import pytest
import torch

from factedit.editing.hparams import ROMEHyperParams
from factedit.editing.requests import EditRequest
from factedit.editing.values import build_value_problem, optimize_values
from factedit.errors import FactEditError
from factedit.hooks import Trace, known_blocks
from factedit.models.architectures import arch_for, get_parameter, math_shape
from factedit.models.cache import cache_states, full_cache, gather_positions, prefix_states, select_rows
from factedit.models.masks import additive_mask, attention_masks
from factedit.models.runtime import embedding_width, lm_logits
from factedit.progress import Progress, Stage
from factedit.text import pad_id
from factedit.tracing import causal_trace

from .tiny_models import FAMILIES, GEMMA_SLIDING_WINDOW, HIDDEN, INTERMEDIATE, LAYERS, tiny_model

PROMPT = "Before anything else, the famous Space Needle tower is located in the beautiful city of"


class Recorder(Progress):
    """Keeps every stage and the info of every advance (a real adapter, as a front end would pass)."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self.infos: dict[str, list[dict]] = {}

    def on_start(self, stage: Stage) -> None:
        self.stages.append(stage)
        self.infos[stage.name] = []

    def on_advance(self, stage: Stage, info: dict) -> None:
        self.infos[stage.name].append(info)

    def named(self, name: str) -> Stage:
        (stage,) = [s for s in self.stages if s.name == name]
        return stage


def _ids(tokenizer, text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_and_widths_match_the_model(family, tokenizer):
    model = tiny_model(family)
    arch = arch_for(model)
    ids = _ids(tokenizer)
    with torch.no_grad(), Trace(model, arch.final_norm) as fin:
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(lm_logits(model, arch, fin.output), logits)
    assert embedding_width(model, arch) == HIDDEN
    assert tuple(math_shape(get_parameter(model, arch.rewrite_weight_at(0)), arch)) == (HIDDEN, INTERMEDIATE)


def test_soft_capped_logits_match_the_model(tokenizer):
    model = tiny_model("gemma3", init=0.5)
    model.config.final_logit_softcapping = 2.0  # small, so that capping changes the logits visibly
    arch = arch_for(model)
    with torch.no_grad(), Trace(model, arch.final_norm) as fin:
        logits = model(input_ids=_ids(tokenizer)).logits
    with torch.no_grad():
        capped, raw = lm_logits(model, arch, fin.output), model.lm_head(fin.output)
    torch.testing.assert_close(capped, logits)
    assert float(capped.abs().max()) <= 2.0 < float(raw.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_continues_the_forward(family, tokenizer):
    """Keys/values of a full run, cut to a prefix, let a forward of the rest give the full run's logits."""
    model = tiny_model(family)
    ids = _ids(tokenizer)
    T, cut = ids.shape[1], 7
    cache = full_cache()
    with torch.no_grad():
        full = model(input_ids=ids, cache=cache, use_cache=True).logits
    states = cache_states(cache)
    assert len(states) == LAYERS and all(k.shape[2] == T for k, _ in states)
    with torch.no_grad():
        rest = model(
            input_ids=ids[:, cut:],
            position_ids=torch.arange(cut, T)[None],
            cache=full_cache(prefix_states(states, cut)),
            use_cache=True,
        ).logits
    torch.testing.assert_close(rest, full[:, cut:], rtol=1e-4, atol=1e-5)


def test_state_gather_and_row_selection():
    keys = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)
    states = [(keys, -keys)]
    source = torch.tensor([[0, 0, 1], [2, 3, 4]])
    ((k, v),) = gather_positions(states, source)
    for b in range(2):
        for s in range(3):
            assert torch.equal(k[b, :, s], keys[b, :, source[b, s]])
            assert torch.equal(v[b, :, s], -keys[b, :, source[b, s]])
    ((k1, v1),) = select_rows(states, torch.tensor([1]))
    assert torch.equal(k1, keys[1:]) and torch.equal(v1, -keys[1:])
    cut = prefix_states([(keys, keys), (keys, -keys)], 2, first_layer=1)  # layer 0 left empty
    assert cut[0] == (None, None) and torch.equal(cut[1][1], -keys[:, :, :2])


def _causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def test_explicit_masks_follow_the_sliding_window_policy():
    pos = torch.arange(10)
    allowed = _causal(10)
    llama = tiny_model("llama")
    plain = attention_masks(llama, allowed, pos, pos)
    assert torch.equal(plain, additive_mask(allowed, llama.dtype))

    mistral = tiny_model("mistral", layers=1)
    mistral.config.sliding_window = 4  # the policy is read from the config at call time
    windowed = attention_masks(mistral, allowed, pos, pos)[0, 0]
    visible = windowed == 0
    assert visible[9].nonzero().flatten().tolist() == [6, 7, 8, 9]  # the last 4 positions only
    assert visible[2].nonzero().flatten().tolist() == [0, 1, 2]

    gemma = tiny_model("gemma3")
    per_type = attention_masks(gemma, allowed, pos, pos)
    assert set(per_type) == {"full_attention", "sliding_attention"}
    assert torch.equal(per_type["full_attention"], plain)
    assert int((per_type["sliding_attention"][0, 0, 9] == 0).sum()) == GEMMA_SLIDING_WINDOW

    gemma.config.layer_types = ["chunked_attention"] * LAYERS
    with pytest.raises(FactEditError, match="chunked_attention"):
        attention_masks(gemma, allowed, pos, pos)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_known_blocks_skip_without_changing_the_result(family, tokenizer):
    model = tiny_model(family)
    arch = arch_for(model)
    ids = _ids(tokenizer)
    with torch.no_grad(), Trace(model, arch.block(1)) as below:
        full = model(input_ids=ids).logits
    calls = []
    handle = model.get_submodule(arch.block(0)).register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), known_blocks(model, arch, 2, below.output):
            skipped = model(input_ids=ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(skipped, full)
    assert not calls, "a skipped block ran"
    assert model.get_submodule(arch.block(0)).__class__.__name__ != "KnownOutput"  # restored


# ----------------------------------------------------------------------------- progress


def test_trace_reports_restorations(tokenizer):
    model = tiny_model("llama", init=0.2)
    for method in ("fast", "straightforward"):
        rec = Recorder()
        r = causal_trace(
            model,
            tokenizer,
            PROMPT,
            "Space Needle",
            kinds=["hidden", "mlp"],
            samples=2,
            noise=1.0,
            window=2,
            tokens=[5, -1],
            method=method,
            progress=rec,
        )
        stage = rec.named(f"trace ({method})")
        assert stage.total == r.meta["restorations"] == stage.done and stage.closed
    quiet = causal_trace(
        model, tokenizer, PROMPT, "Space Needle", kinds=["hidden"], samples=1, noise=1.0, tokens=[-1], progress=True
    )  # tqdm bars on stderr: still the same numbers
    again = causal_trace(
        model, tokenizer, PROMPT, "Space Needle", kinds=["hidden"], samples=1, noise=1.0, tokens=[-1], progress=False
    )
    assert (quiet.scores["hidden"][-1] == again.scores["hidden"][-1]).all()


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_value_optimisation_reports_each_step_with_its_loss(prefix_cache, tokenizer):
    model = tiny_model("gpt2")
    arch = arch_for(model)
    request = EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target_new="Rome")
    problems = [build_value_problem(tokenizer, request, ["{}", "Hello. {}"])]
    hp = ROMEHyperParams.for_model(
        model, layers=[1], v_num_grad_steps=5, early_stop_loss=0.0, prefix_cache=prefix_cache
    )
    rec = Recorder()
    res = optimize_values(
        model, arch, problems, site=arch.rewrite_at(1), layer=1, hparams=hp, pad=pad_id(tokenizer), progress=rec
    )
    stage = rec.named("value optimisation")
    assert stage.total == hp.v_num_grad_steps and stage.done == res.steps and stage.closed
    losses = [info["loss"] for info in rec.infos["value optimisation"]]
    assert losses == pytest.approx([step["total"] for step in res.losses[0]])
