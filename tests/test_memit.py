"""MEMIT on tiny random models: batch edits land, patches revert bit-exact, one request ≈ ROME."""

from __future__ import annotations

import pytest
import torch

from factedit import EditRequest, FactEditError, ROMEHyperParams, compute_rome
from factedit.editing.hparams import MEMITHyperParams
from factedit.editing.memit import check_batch, compute_memit, template_weights
from factedit.editing.patch import Patch
from factedit.editing.sequential import SequentialEditor
from factedit.editing.templates import template_group_sizes
from factedit.stats.second_moment import second_moments

from .tiny_models import tiny_model

# Random tiny models need the settings explained in test_families.py (edit at the last token,
# no weight decay, loose clamp): information at the subject barely reaches the last position.
SETTINGS = dict(
    fact_token="last", v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=15, mom2_update_weight=1.0
)
REQUESTS = [
    EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome"),
    EditRequest("{} plays the sport of", "LeBron James", "football"),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tokenizer, corpus_file):
    model = tiny_model("llama", hidden=256, intermediate=512)
    moments = second_moments(model, tokenizer, [1, 2], corpus=corpus_file, n_tokens=4000, cache=False, progress=False)
    return model, tokenizer, moments


def _argmax(model, tok, text):
    with torch.no_grad():
        return int(model(**tok(text, return_tensors="pt")).logits[0, -1].argmax())


def test_batch_of_two_edits_makes_both_targets_top1_and_reverts_bit_exact(setup, tmp_path):
    model, tok, moments = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = [tok(r.new_text, add_special_tokens=False)["input_ids"][0] for r in REQUESTS]
    assert [_argmax(model, tok, r.text) for r in REQUESTS] != targets
    hp = MEMITHyperParams.for_model(model, layers=[1, 2], **SETTINGS)
    patch = compute_memit(model, tok, REQUESTS, hp, second_moment=moments, templates=["{}", "Hello. {}"]).patch
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [e.name for e in patch.entries] == [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    ]
    patch.apply(model)
    assert [_argmax(model, tok, r.text) for r in REQUESTS] == targets
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    patch.revert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the saved file is the same edit: applied from disk it gives the same weights, and reverts
    loaded = Patch.load(patch.save(tmp_path / "memit"))
    assert loaded.method == "memit" and loaded.requests == patch.requests
    loaded.apply(model)
    assert all(torch.equal(v, edited[k]) for k, v in model.state_dict().items())
    loaded.revert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_single_request_points_where_rome_does(setup):
    """With one layer, one request and the same templates, MEMIT's update is ROME's up to scale:
    (λC + kkᵀ)⁻¹k ∝ C⁻¹k, and z at the block output is v* at the MLP output (residual add)."""
    model, tok, moments = setup
    request = REQUESTS[0]
    memit = compute_memit(
        model,
        tok,
        [request],
        MEMITHyperParams.for_model(model, layers=[1], **SETTINGS),
        second_moment=moments,
        templates=["{}"],
    ).patch
    rome = compute_rome(
        model,
        tok,
        request,
        ROMEHyperParams.for_model(
            model, layers=[1], fact_token="last", v_weight_decay=0.0, clamp_norm_factor=100.0, v_num_grad_steps=15
        ),
        second_moment=moments,
        templates=["{}"],
    ).patch
    d_memit, d_rome = memit.entries[0].delta().flatten(), rome.entries[0].delta().flatten()
    cos = float(torch.nn.functional.cosine_similarity(d_memit, d_rome, dim=0))
    print(f"cosine(MEMIT update, ROME update) = {cos:.4f}")
    assert cos > 0.95


def test_bad_batches_are_refused(setup):
    model, tok, moments = setup
    with pytest.raises(FactEditError, match="empty batch"):
        check_batch([])
    conflicting = [REQUESTS[0], EditRequest(REQUESTS[0].prompt, REQUESTS[0].subject, "Berlin")]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FactEditError, match="conflicting requests"):
        compute_memit(
            model,
            tok,
            conflicting,
            MEMITHyperParams.for_model(model, layers=[1], **SETTINGS),
            second_moment=moments,
            templates=["{}"],
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(check_batch([REQUESTS[0], REQUESTS[0]])) == 1  # exact duplicates collapse to one edit
    # the keys are read up to the subject: another relation after the same subject shares them ...
    same_keys = EditRequest("The {} was designed by", "Eiffel Tower", "Gaudi")
    with pytest.raises(FactEditError, match="conflicting requests"):
        check_batch([REQUESTS[0], same_keys])
    # ... but with the key read at the last token, the two prompts are different keys
    assert len(check_batch([REQUESTS[0], same_keys], fact_token="last")) == 2


def test_alphaedit_sequence_keeps_updates_in_the_null_space(setup):
    """Each AlphaEdit update leaves the preserved keys' principal directions untouched: ΔW P_⊥ = 0."""
    from factedit.editing.alphaedit import AlphaEditState, compute_alphaedit
    from factedit.editing.hparams import AlphaEditHyperParams

    model, tok, moments = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = moments[1].double()
    threshold = float(torch.linalg.eigvalsh(c).median())  # half of the key space is "preserved"
    hp = AlphaEditHyperParams.for_model(model, layers=[1], nullspace_threshold=threshold, L2=1e-3, **SETTINGS)
    state, patches = AlphaEditState({1: moments[1]}, hp), []
    for request in REQUESTS:  # a sequence of two one-request batches
        patch = compute_alphaedit(model, tok, [request], hp, state=state, second_moment=moments, templates=["{}"]).patch
        patch.apply(model)
        state.commit()
        patches.append(patch)
    p = state.projection[1]
    assert 0 < state.null_space_dim(1) < c.shape[0]
    for patch in patches:
        delta = patch.entries[0].delta().double()  # (out, in)
        assert float((delta @ (torch.eye(p.shape[0], dtype=p.dtype) - p)).norm()) < 1e-6 * float(delta.norm())
    assert torch.linalg.matrix_rank(state.previous[1]) == len(REQUESTS)  # K_p K_pᵀ holds one key per edit
    for patch in reversed(patches):
        patch.revert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_batched_values_equal_one_at_a_time_with_early_stopping(setup):
    """Requests optimised together (some stopping early and leaving the batch) get the same
    vectors as when each is optimised alone, on the fast and on the plain path."""
    from factedit.editing.values import build_value_problem, optimize_values
    from factedit.models import arch_for
    from factedit.text import pad_id

    model, tok, _ = setup
    arch = arch_for(model)
    requests = REQUESTS + [EditRequest("{} was born in", "Barack Obama", "Paris")]
    problems = [build_value_problem(tok, r, ["{}", "Hello. {}"], "last") for r in requests]
    kwargs = dict(site=arch.block(1), layer=1, pad=pad_id(tok))
    free = MEMITHyperParams.for_model(model, layers=[1], **{**SETTINGS, "early_stop_loss": 0.0})
    final = [h[-1]["total"] for h in optimize_values(model, arch, problems, hparams=free, **kwargs).losses]
    # a threshold between the lowest and highest final loss: some requests stop early, others never
    hp = free.replace(early_stop_loss=(min(final) + max(final)) / 2)
    together = {
        fast: optimize_values(model, arch, problems, hparams=hp.replace(prefix_cache=fast), **kwargs)
        for fast in (True, False)
    }
    alone = [optimize_values(model, arch, [p], hparams=hp, **kwargs) for p in problems]
    steps = [len(h) for h in together[True].losses]
    assert len(set(steps)) > 1, f"the test needs requests that stop at different steps: {steps}"
    assert steps == [len(r.losses[0]) for r in alone]
    for i, single in enumerate(alone):
        for result in together.values():
            rel = float((result.delta[i] - single.delta[0]).norm() / single.delta[0].norm())
            assert rel < 1e-3, (i, rel)


def test_template_weights_follow_memit_context_types():
    """compute_ks averages keys within each context type, then over the types."""
    starts = ["The", "Therefore", "Because", "I", "You"]
    sizes = template_group_sizes([(10, 5)], starts)
    weights = template_weights(["{}"] + [f"t{i}. {{}}" for i in range(sizes[1])], sizes)
    assert sizes == [1, 5] and weights[0] == pytest.approx(0.5) and sum(weights) == pytest.approx(1.0)
    sizes = template_group_sizes([(5, 10), (10, 10)])
    weights = template_weights(["{}"] + ["x. {}"] * 20, sizes)
    assert sizes == [1, 10, 10] and weights[0] == pytest.approx(1 / 3) and weights[1] == pytest.approx(1 / 30)
    assert template_weights(["a {}", "b {}"], sizes) == [0.5, 0.5]  # not laid out as generated: equal weights


def test_sequential_editor_tracks_holding_and_reverts_all(setup):
    """Two MEMIT steps on one model: templates made once, drift recorded per step, undone bit-exact."""
    model, tok, moments = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = MEMITHyperParams.for_model(model, layers=[1, 2], **SETTINGS)
    requests = [EditRequest(r.prompt, r.subject, r.target_new, target_true="Paris") for r in REQUESTS]
    editor = SequentialEditor(model, tok, "memit", hp, second_moment=moments, templates=["{}", "Hello. {}"])
    history = editor.run(requests, batch_size=1, after_step=lambda step, done: editor.edits_holding(done))
    assert [(h["step"], h["edits"], h["measured"]) for h in history] == [(1, 1, 1), (2, 2, 2)]
    assert history[0]["edits_holding"] == 1.0  # the edit just made beats the old answer
    assert all(p.info["templates"] == ["{}", "Hello. {}"] for p in editor.patches)
    assert editor.patches[1].base_fingerprint != editor.patches[0].base_fingerprint  # step 2 saw step 1
    editor.revert_all()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a conflict in the second batch is found before the first one is applied
    clash = EditRequest(requests[0].prompt, requests[0].subject, "Berlin")
    with pytest.raises(FactEditError, match="conflicting requests"):
        editor.run(requests + [requests[0], clash], batch_size=2)
    assert not editor.patches and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_alphaedit_refuses_an_empty_null_space_and_zero_l2(setup):
    from factedit.editing.alphaedit import compute_alphaedit
    from factedit.editing.hparams import AlphaEditHyperParams

    model, tok, moments = setup
    with pytest.raises(FactEditError, match="L2"):
        AlphaEditHyperParams.for_model(model, layers=[1], L2=0.0)
    smallest = float(torch.linalg.eigvalsh(moments[1].double())[0])
    hp = AlphaEditHyperParams.for_model(model, layers=[1], nullspace_threshold=smallest / 2, **SETTINGS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FactEditError, match="projected to zero"):
        compute_alphaedit(model, tok, REQUESTS[:1], hp, second_moment=moments, templates=["{}"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_memit_and_alphaedit_files_cover_every_rome_family():
    """Every family with a ROME file has MEMIT and AlphaEdit files that parse, with consecutive
    layers and the threshold/L2 AlphaEdit adds."""
    from importlib import resources

    from factedit.editing.hparams import AlphaEditHyperParams

    root = resources.files("factedit") / "hparams"
    families = sorted(f.name for f in (root / "rome").iterdir() if f.name.endswith(".json"))
    for method, cls in (("memit", MEMITHyperParams), ("alphaedit", AlphaEditHyperParams)):
        assert sorted(f.name for f in (root / method).iterdir() if f.name.endswith(".json")) == families
        for name in families:
            with torch.device("meta"):  # a 30-layer model of the family, no weights allocated
                model = tiny_model(name.removesuffix(".json"), layers=30)
            hp = cls.for_model(model)
            assert hp.layers == list(range(hp.layers[0], hp.layers[-1] + 1)) and len(hp.layers) >= 5
            assert hp.context_template_length_params == [(10, 5)] and hp.mom2_update_weight > 0
            if method == "alphaedit":
                assert hp.nullspace_threshold == 2e-2 and hp.L2 == 10.0
