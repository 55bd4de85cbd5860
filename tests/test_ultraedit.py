"""UltraEdit on tiny random models: batch edits land from one gradient pass, patches revert bit-exact, the
lifelong statistics carry a sequence and survive state_dict/load_state_dict, bad settings are one line."""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from factedit import EditRequest, FactEditError, SequentialEditor, edit_and_compare, get_method, method_names
from factedit.editing.hparams import UltraEditHyperParams
from factedit.editing.patch import Patch
from factedit.editing.ultraedit import RunningMoments, UltraEditState, compute_ultraedit

from .test_emmet import default_tokenizer
from .tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A random tiny model's keys and gradients are small: lr 1e-3 (the official 1e-6 is for 7B models, whose
# pseudo values grow with the key and value widths) moves both targets to the top here.
SETTINGS = dict(layers=[1, 2], lr=1e-3)
EIFFEL = EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome", target_true="Paris")
LEBRON = EditRequest("{} plays the sport of", "LeBron James", "football", target_true="basketball")
OBAMA = EditRequest("{} was born in", "Barack Obama", "Paris", target_true="Hawaii")
JOBS = EditRequest("{} was the founder of", "Steve Jobs", "Microsoft", target_true="Apple")


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", hidden=256, intermediate=512)


def _argmax(model, tok, text):
    with torch.no_grad():
        return int(model(**tok(text, return_tensors="pt")).logits[0, -1].argmax())


def _first_target(tok, request):
    return tok(request.new_text, add_special_tokens=False)["input_ids"][0]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, weights) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_batch_of_two_edits_makes_both_targets_top1_and_reverts_bit_exact(model, tokenizer, tmp_path):
    tok, requests = tokenizer, [EIFFEL, LEBRON]
    before = _weights(model)
    targets = [_first_target(tok, r) for r in requests]
    assert [_argmax(model, tok, r.text) for r in requests] != targets
    hp = UltraEditHyperParams.for_model(model, **SETTINGS)
    result = compute_ultraedit(model, tok, requests, hp)
    assert _same(model, before)  # computing changes nothing
    assert [e.name for e in result.patch.entries] == [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    ]
    # one gradient pass, no optimisation: before and after the update, the new targets' loss fell
    assert all(len(h) == 2 and h[1]["total"] < h[0]["total"] for h in result.losses)
    handle = result.patch.apply(model)
    assert [_argmax(model, tok, r.text) for r in requests] == targets
    edited = _weights(model)
    handle.revert()
    assert _same(model, before)
    loaded = Patch.load(result.patch.save(tmp_path / "ultraedit"))
    assert loaded.method == "ultraedit" and loaded.info["normaliser_rows"] == {"512x256": 4}
    loaded.apply(model)
    assert _same(model, edited)
    loaded.revert(model)
    assert _same(model, before)


# the MLP input projections each family's table names, and the shape class their statistics share
INPUT_MODULES = {
    "llama": ["gate_proj", "up_proj"],
    "gemma3": ["gate_proj", "up_proj"],
    "phi3": ["gate_up_proj"],
    "gpt2": ["c_fc"],
    "gpt_neox": ["dense_h_to_4h"],
}


@pytest.mark.parametrize("family", sorted(INPUT_MODULES))
def test_input_projections_are_edited_when_asked_and_revert_bit_exact(family, tokenizer):
    """modules="input" (the official Llama 3 / Qwen2.5 / Gemma 3 runs): the MLP's input projections of each
    layer are edited from the same pass, share one set of statistics, and the batch lands and reverts."""
    model, tok, requests = tiny_model(family, hidden=256, intermediate=512), tokenizer, [EIFFEL, LEBRON]
    before = _weights(model)
    targets = [_first_target(tok, r) for r in requests]
    # the input projections act through the MLP's nonlinearity: lr 3e-3 moves both targets to the top on every
    # family here (1e-3 leaves LeBron's on the Llama and Phi-3 ones short)
    hp = UltraEditHyperParams.for_model(model, **{**SETTINGS, "lr": 3e-3, "modules": "input"})
    result = compute_ultraedit(model, tok, requests, hp)
    assert _same(model, before)
    names = [e.name.split(".")[-2] for e in result.patch.entries]
    assert names == INPUT_MODULES[family] * 2, names  # layers 1 and 2, in layer order
    per_layer = len(INPUT_MODULES[family])
    assert [int(e.name.split(".")[-4]) for e in result.patch.entries] == [1] * per_layer + [2] * per_layer
    assert len(result.patch.info["normaliser_rows"]) == 1  # one shape: one set of statistics
    handle = result.patch.apply(model)
    assert [_argmax(model, tok, r.text) for r in requests] == targets
    handle.revert()
    assert _same(model, before)


def test_running_moments_merge_to_the_statistics_of_all_rows():
    rows = torch.randn(7, 5, dtype=torch.float64)
    merged = RunningMoments.empty(5).merged(rows[:1]).merged(rows[1:4]).merged(rows[4:])
    assert merged.count == 7
    assert torch.allclose(merged.mean, rows.mean(0)) and torch.allclose(merged.m2 / 6, rows.var(0))
    standard = merged.standardised(rows)
    assert torch.allclose(standard.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(standard.std(0), torch.ones(5, dtype=torch.float64), atol=1e-6)


def test_ridge_update_is_the_same_solution_for_few_and_many_rows():
    """ΔWᵀ = (KᵀK + λI)⁻¹KᵀV, solved directly for many rows and as Vᵀ(KKᵀ + λI)⁻¹K (low rank) for few."""
    from factedit.editing.ultraedit import _ridge_update

    torch.manual_seed(0)
    for rows in (3, 20, 40):
        keys, values = torch.randn(rows, 30, dtype=torch.float64), torch.randn(rows, 12, dtype=torch.float64)
        direct = torch.linalg.solve(keys.T @ keys + 0.5 * torch.eye(30, dtype=torch.float64), keys.T @ values).T
        left, right = _ridge_update(keys, values, 0.5)
        assert (right is not None) == (rows <= 6)  # factors only while smaller than the dense (12, 30)
        assert torch.allclose(left @ right if right is not None else left, direct, atol=1e-10)


def test_state_carries_a_sequence_and_round_trips_through_state_dict(model, tokenizer):
    """Two batches in sequence; a state saved after the first and loaded into a fresh object gives the
    second batch the same patch bit for bit; a discarded batch leaves the statistics as they were."""
    tok = tokenizer
    hp = UltraEditHyperParams.for_model(model, **SETTINGS)
    before = _weights(model)
    state = UltraEditState()
    first = compute_ultraedit(model, tok, [EIFFEL, LEBRON], hp, state=state)
    assert state.rows("512x256") == 0  # pending until the patch is kept
    handle = first.patch.apply(model)
    state.commit()
    assert state.rows("512x256") == 4  # 2 single-token targets x 2 layers sharing one shape
    saved = {k: v.clone() for k, v in state.state_dict().items()}
    resumed = UltraEditState()
    resumed.load_state_dict(saved)
    second = compute_ultraedit(model, tok, [OBAMA, JOBS], hp, state=state)
    again = compute_ultraedit(model, tok, [OBAMA, JOBS], hp, state=resumed)
    for a, b in zip(second.patch.entries, again.patch.entries, strict=True):
        assert torch.equal(a.delta(), b.delta())
    resumed.discard()
    assert all(torch.equal(v, saved[k]) for k, v in resumed.state_dict().items())
    fresh = compute_ultraedit(model, tok, [OBAMA, JOBS], hp)  # without the first batch's statistics
    assert not torch.equal(fresh.patch.entries[0].delta(), second.patch.entries[0].delta())
    handle.revert()
    assert _same(model, before)
    with pytest.raises(FactEditError, match="not an UltraEdit state"):
        UltraEditState().load_state_dict({"previous.1": torch.zeros(3)})


def test_sequential_editor_runs_two_batches_and_reverts_all(model, tokenizer):
    tok = tokenizer
    before = _weights(model)
    requests = [EIFFEL, LEBRON, OBAMA, JOBS]
    editor = SequentialEditor(model, tok, "ultraedit", {**SETTINGS})
    assert isinstance(editor.state, UltraEditState)
    history = editor.run(requests, batch_size=2, after_step=lambda step, done: editor.edits_holding(done))
    assert [(h["step"], h["edits"]) for h in history] == [(1, 2), (2, 4)]
    assert editor.state.rows("512x256") == 8 and len(editor.patches) == 2
    assert editor.patches[1].base_fingerprint != editor.patches[0].base_fingerprint  # step 2 saw step 1
    assert [_argmax(model, tok, r.text) for r in requests[2:]] == [_first_target(tok, r) for r in requests[2:]]
    editor.revert_all()
    assert _same(model, before) and editor.state.rows("512x256") == 0


def test_bad_settings_and_requests_are_refused_in_one_line(model, tokenizer):
    method = get_method("ultraedit")
    for overrides, problem in (
        ({"lr": 0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"L2": -1.0}, "L2"),
        ({"batch_size": 0}, "batch_size"),
        ({"fact_token": "subject_last"}, "fact_token"),
        ({"mom2_n_tokens": 1000}, "unknown key 'mom2_n_tokens'"),
        ({"layers": [4]}, "layer"),
    ):
        with pytest.raises(FactEditError, match=problem) as info:
            method.hparams(model, overrides={"layers": [1], **overrides})
        assert "\n" not in str(info.value)
    hp = method.hparams(model, overrides={"layers": [1], "lr": 1e-3})
    before = _weights(model)
    with pytest.raises(FactEditError, match="at least two requests") as info:  # one row: a zero update
        method.compute(model, tokenizer, [EIFFEL], hp)
    assert "\n" not in str(info.value)
    with pytest.raises(FactEditError, match="conflicting requests"):
        method.compute(model, tokenizer, [EIFFEL, EditRequest(EIFFEL.prompt, EIFFEL.subject, "Berlin")], hp)
    assert _same(model, before)


def test_registry_runs_ultraedit_through_the_api_every_front_end_uses(model, tokenizer):
    assert "ultraedit" in method_names()
    caps = get_method("ultraedit").capabilities
    assert caps.batch and caps.sequential and caps.state and not caps.each
    before = _weights(model)
    report = edit_and_compare(
        model, tokenizer, [EIFFEL, LEBRON], "ultraedit", overrides=SETTINGS, templates=["{}", "Hello. {}"]
    )  # templates, as the front ends pass to every method: UltraEdit reads none
    assert report.method == "ultraedit" and all(report.landed), report.summary_line()
    assert len(report.converged) == 2 and "top prediction" in report.summary_line()
    report.applied[0].revert()
    assert _same(model, before)


def test_default_files_cover_every_family():
    root = resources.files("factedit") / "hparams" / "ultraedit"
    assert sorted(f.name.removesuffix(".json") for f in root.iterdir() if f.name.endswith(".json")) == sorted(FAMILIES)
    for family in FAMILIES:
        with torch.device("meta"):  # a 30-layer model of the family, no weights allocated
            model = tiny_model(family, layers=30)
        hp = UltraEditHyperParams.for_model(model)
        assert hp.layers == list(range(hp.layers[0], hp.layers[-1] + 1)) and hp.layers[-1] >= 27
        assert hp.lr == 1e-6 and hp.L2 == 1.0 and hp.batch_size == 10
