"""Applied-patch handles and patch stacks on real models: reverts are bit-exact, an unsafe order
or a patch that is not applied is refused with the weights untouched, and a stack restores any
number of steps from one snapshot."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import pytest
import torch

from factedit.editing.patch import AppliedPatch, Patch, PatchEntry, PatchStack, applied_patches, model_name
from factedit.errors import FactEditError
from factedit.models import arch_for, model_fingerprint
from factedit.models.fingerprint import tensor_sha256
from tests.tiny_models import tiny_model


def _patch(model, layer: int, seed: int, *, rank: int = 1, subject: str = "x", scale: float = 1e-2) -> Patch:
    """A low-rank change of one layer's rewrite weight, computed on the model's current weights."""
    name = arch_for(model).rewrite_weight_at(layer)
    weight = model.get_parameter(name)
    out_dim, in_dim = weight.shape  # llama-style (out, in) storage
    gen = torch.Generator().manual_seed(seed)
    entry = PatchEntry(
        name=name,
        shape=tuple(weight.shape),
        base_sha256=tensor_sha256(weight),
        left=torch.randn(out_dim, rank, generator=gen),
        right=scale * torch.randn(rank, in_dim, generator=gen),
    )
    return Patch.for_model(
        model,
        method="test",
        entries=[entry],
        base_fingerprint=model_fingerprint(model),
        requests=[{"prompt": "{} is in", "subject": subject, "target_new": "y"}],
        hparams={"layers": [layer]},
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture()
def model():
    return tiny_model("llama")


def test_handle_reverts_bit_exact(model):
    before = _state(model)
    patch = _patch(model, 1, seed=0)
    handle = patch.apply(model)
    assert isinstance(handle, AppliedPatch) and handle.patch is patch and handle.model is model
    assert handle.is_applied and patch.is_applied(model) and applied_patches(model) == (handle,)
    assert not _same(model, before)
    assert set(handle.written) == {patch.entries[0].name}
    assert handle.written[patch.entries[0].name] == tensor_sha256(model.get_parameter(patch.entries[0].name))
    assert handle.revert() is patch
    assert _same(model, before)
    assert not handle.is_applied and handle.state == "reverted" and applied_patches(model) == ()
    with pytest.raises(FactEditError, match="already reverted"):
        handle.revert()


def test_patch_revert_uses_its_own_live_handle(model):
    before = _state(model)
    patch = _patch(model, 2, seed=1)
    patch.apply(model)
    with pytest.raises(FactEditError, match="already applied"):
        patch.apply(model)
    assert patch.revert(model) is patch
    assert _same(model, before)


def test_revert_of_a_patch_that_is_not_applied_is_refused(model):
    before = _state(model)
    patch = _patch(model, 1, seed=0)
    with pytest.raises(FactEditError, match="not applied to this model"):
        patch.revert(model)
    assert _same(model, before)
    # a copy of an applied patch (e.g. loaded from its file) is another patch: not applied, refused
    patch.apply(model)
    edited = _state(model)
    copy = Patch.from_bytes(patch.to_bytes())
    with pytest.raises(FactEditError, match="not applied to this model"):
        copy.revert(model)
    assert _same(model, edited)
    patch.revert(model)
    assert _same(model, before)


def test_reverting_out_of_order_is_refused_naming_the_later_patch(model):
    before = _state(model)
    first = _patch(model, 1, seed=0, subject="Eiffel Tower")
    a = first.apply(model)
    after_a = _state(model)
    second = _patch(model, 1, seed=1, subject="Louvre")  # the same weight
    b = second.apply(model)
    after_b = _state(model)
    with pytest.raises(FactEditError, match=r"revert test patch 'Louvre' -> 'y' first") as info:
        a.revert()
    assert "\n" not in str(info.value)
    with pytest.raises(FactEditError, match="Louvre"):
        first.revert(model)
    assert _same(model, after_b) and a.is_applied and b.is_applied
    b.revert()
    assert _same(model, after_a)
    a.revert()
    assert _same(model, before)


def test_patches_on_other_weights_revert_in_any_order(model):
    before = _state(model)
    a = _patch(model, 0, seed=0).apply(model)
    b = _patch(model, 3, seed=1).apply(model)
    a.revert()
    b.revert()
    assert _same(model, before)


def test_revert_refuses_a_weight_changed_behind_its_back(model):
    patch = _patch(model, 1, seed=0)
    handle = patch.apply(model)
    with torch.no_grad():
        model.get_parameter(patch.entries[0].name)[0, 0] += 1.0
    changed = _state(model)
    with pytest.raises(FactEditError, match="changed since it was applied"):
        handle.revert()
    assert _same(model, changed) and handle.is_applied


def test_released_handle_cannot_revert(model):
    before = _state(model)
    patch = _patch(model, 1, seed=0)
    handle = patch.apply(model)
    edited = _state(model)
    patch.release(model)
    assert not handle.is_applied and handle.state == "released" and not patch.is_applied(model)
    with pytest.raises(FactEditError, match="released"):
        handle.revert()
    with pytest.raises(FactEditError, match="not applied"):
        patch.revert(model)
    assert _same(model, edited)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(before[k])


def test_the_registry_does_not_keep_models_alive():
    model = tiny_model("llama", layers=2)
    ref = weakref.ref(model)
    handle = _patch(model, 1, seed=0).apply(model)
    del model
    gc.collect()
    assert ref() is None
    assert not handle.is_applied
    with pytest.raises(FactEditError, match="no longer exists"):
        handle.revert()


def test_stack_push_pop_is_bit_exact(model):
    stack = PatchStack(model)
    states = [_state(model)]
    patches = []
    for step, layer in enumerate([1, 1, 2]):
        patches.append(_patch(model, layer, seed=step))
        handle = stack.push(patches[-1])
        assert handle.patch is patches[-1]
        states.append(_state(model))
    assert len(stack) == 3 and [h.patch for h in stack.handles] == patches
    assert stack.pop() is patches[2]
    assert _same(model, states[2]) and len(stack) == 2
    assert stack.pop() is patches[1]
    assert _same(model, states[1])
    assert stack.pop() is patches[0]
    assert _same(model, states[0])
    with pytest.raises(FactEditError, match="empty"):
        stack.pop()


def test_stack_revert_all_after_many_steps_from_one_snapshot(model):
    before = _state(model)
    stack = PatchStack(model, undo_depth=0)
    layers = [1, 2]
    for step in range(40):
        stack.push(_patch(model, layers[step % 2], seed=step))
        # memory flat in the number of steps: the snapshot holds each touched weight once, no push keeps a copy
        assert len(stack.snapshot_names) == min(step + 1, 2)
        assert all(h.state == "released" for h in stack.handles)
    assert len(stack) == 40 and not _same(model, before)
    with pytest.raises(FactEditError, match="revert_all"):
        stack.pop()
    patches = stack.revert_all()
    assert len(patches) == 40 and len(stack) == 0 and stack.snapshot_names == ()
    assert _same(model, before)
    assert applied_patches(model) == ()


def test_stack_undo_depth_keeps_the_newest_pushes_revertible(model):
    stack = PatchStack(model, undo_depth=1)
    before = _state(model)
    stack.push(_patch(model, 1, seed=0))
    after_first = _state(model)
    stack.push(_patch(model, 1, seed=1))
    assert [h.state for h in stack.handles] == ["released", "applied"]
    stack.pop()
    assert _same(model, after_first)
    with pytest.raises(FactEditError, match="newest"):
        stack.pop()
    stack.revert_all()
    assert _same(model, before)


def test_stack_revert_all_refuses_a_foreign_patch_on_its_weights(model):
    before = _state(model)
    stack = PatchStack(model)
    stack.push(_patch(model, 1, seed=0))
    foreign = _patch(model, 1, seed=1, subject="outsider").apply(model)
    with pytest.raises(FactEditError, match="outsider"):
        stack.revert_all()
    with pytest.raises(FactEditError, match="outsider"):
        stack.pop()  # the stack's own handle is blocked by the later patch on the same weight
    assert len(stack) == 1
    foreign.revert()
    stack.revert_all()
    assert _same(model, before)


def test_stack_on_the_default_model(default_model):
    """Two real-sized pushes on one weight of SmolLM2: order refusal, model name in the messages, exact revert."""
    model, _ = default_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model_name(model) == "smollm2-135m"
    stack = PatchStack(model)
    first = stack.push(_patch(model, 6, seed=0, subject="Eiffel Tower"))
    assert first.patch.model_name == "smollm2-135m"
    second = stack.push(_patch(model, 6, seed=1, subject="Louvre"))
    with pytest.raises(FactEditError, match="Louvre"):
        first.revert()
    # a patch computed before the second push no longer fits these weights: refused, naming the model
    stale = replace(second.patch, base_fingerprint=first.patch.base_fingerprint)
    with pytest.raises(FactEditError, match="weights of smollm2-135m differ"):
        stale.apply(model)
    stack.revert_all()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_other_model_refusal_names_both_models(default_model, model):
    smollm, _ = default_model
    patch = _patch(smollm, 6, seed=0)
    before = _state(model)
    with pytest.raises(FactEditError, match="another model, smollm2-135m") as info:
        patch.apply(model)
    assert "this model is an unnamed model" in str(info.value)  # a tiny random model has no name or path
    assert _same(model, before)
