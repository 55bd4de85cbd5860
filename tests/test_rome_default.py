"""ROME on the embedded default model: equivalence with the official code, fast == plain, patches."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from factedit import EditRequest, Patch, ROMEHyperParams, compute_rome
from factedit.editing.values import build_value_problem, optimize_values
from factedit.models import arch_for, load_model, model_fingerprint
from factedit.predict import top_next_tokens
from factedit.stats.second_moment import second_moments
from factedit.text import pad_id

from .conftest import shared_reference

EIFFEL = EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target_new="Rome")


@pytest.fixture(scope="module")
def reference():
    root = shared_reference() / "rome_official_smollm2"
    if not root.is_dir():
        pytest.skip(f"reference vectors not found at {root}")
    return {
        "C": load_file(str(root / "second_moment_layer6.safetensors"))["C"],
        "templates": json.loads((root / "context_templates.json").read_text()),
        "vectors": load_file(str(root / "rome_vectors.safetensors")),
        "cases": json.loads((root / "edits.json").read_text())["cases"],
    }


@pytest.fixture(scope="module")
def small_stats(default_model, corpus_file):
    """10k tokens at layer 6 in $FACTEDIT_HOME's cache: the web tests ask for the same file, so the
    suite computes it once (the cache lock makes a second worker wait and read it)."""
    model, tok = default_model
    return second_moments(model, tok, [6], corpus=corpus_file, n_tokens=10_000, progress=False)


@pytest.fixture(scope="module")
def eiffel_patch(default_model, small_stats):
    """One ROME patch for the tests that apply, save, load and refuse it (computing leaves the model as it was).
    8 value steps instead of 20: Rome at p = 0.97 already, in 2/5 of the time (the full default run:
    test_edit_and_compare_reports_a_converged_landed_edit)."""
    model, tok = default_model
    hp = ROMEHyperParams.for_model(model, layers=[6], v_num_grad_steps=8)
    return compute_rome(model, tok, EIFFEL, hp, second_moment=small_stats).patch


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


@pytest.fixture(scope="module")
def published_tokenizer_model():
    """The default model with its tokenizer as published (no document-start token), as the official code ran it."""
    return load_model(document_start=False)


def _official_match(model, tok, reference, cases) -> None:
    """Original-ROME mode, given the official C and templates: u and v match (cosine ≥ 0.999)."""
    hp = ROMEHyperParams.for_model(model, layers=[6], consistent_key=False, key_fit="mean")
    before = model_fingerprint(model)
    report = []
    for case in cases:
        request = EditRequest.from_dict(case["request"])
        (res,) = compute_rome(
            model, tok, request, hp, second_moment={6: reference["C"]}, templates=reference["templates"]
        ).details
        cid = case["case_id"]
        cos_u = _cos(res.u, reference["vectors"][f"case{cid}.u"])
        cos_v = _cos(res.v, reference["vectors"][f"case{cid}.v"])
        report.append((cid, round(cos_u, 6), round(cos_v, 6)))
    print("case, cos(u), cos(v):", report)
    assert len(report) == len(cases) > 0
    assert all(cu >= 0.999 and cv >= 0.999 for _, cu, cv in report), report
    assert model_fingerprint(model) == before  # computing a patch leaves the model unchanged


def test_matches_official_rome_on_two_reference_cases(published_tokenizer_model, reference):
    """The first two of the ten reference cases (all ten: ``-m slow``), to keep CI short."""
    _official_match(*published_tokenizer_model, reference, reference["cases"][:2])


@pytest.mark.slow
def test_matches_official_rome_on_all_reference_cases(published_tokenizer_model, reference):
    assert len(reference["cases"]) == 10
    _official_match(*published_tokenizer_model, reference, reference["cases"])


@pytest.mark.parametrize(
    "steps",
    [pytest.param(5, id="first-5-steps"), pytest.param(None, id="all-steps", marks=pytest.mark.slow)],
)
def test_prefix_cached_optimisation_equals_plain(default_model, reference, steps):
    """The fast v* path (prefix cache, skipped lower blocks, sparse LM head) gives the plain result: over
    the first 5 steps in the default suite (every forward and backward of both paths compared through
    the losses and the vector), over the whole optimisation with ``-m slow`` (the README's figure)."""
    model, tok = default_model
    arch = arch_for(model)
    hp = ROMEHyperParams.for_model(model, layers=[6])
    if steps is not None:
        hp = hp.replace(v_num_grad_steps=steps)
    request = EditRequest.from_dict(reference["cases"][0]["request"])
    problem = build_value_problem(tok, request, reference["templates"])
    results = {
        fast: optimize_values(
            model,
            arch,
            [problem],
            site=arch.rewrite_at(6),
            layer=6,
            hparams=hp.replace(prefix_cache=fast),
            pad=pad_id(tok),
        )
        for fast in (True, False)
    }
    fast, plain = results[True], results[False]
    assert fast.steps == plain.steps
    assert torch.allclose(fast.target_init, plain.target_init, atol=1e-5)
    rel = float((fast.delta - plain.delta).norm() / plain.delta.norm())
    print(f"relative difference of the optimised vectors: {rel:.2e}")
    assert rel < 1e-3
    assert [round(x["total"], 3) for x in fast.losses[0]] == [round(x["total"], 3) for x in plain.losses[0]]


def test_edit_apply_revert_save_load(default_model, eiffel_patch, tmp_path):
    model, tok = default_model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    patch = eiffel_patch
    assert top_next_tokens(model, tok, [EIFFEL.text], 1)[0][0][0] == " Paris"

    patch.apply(model)
    assert top_next_tokens(model, tok, [EIFFEL.text], 1)[0][0][0] == " Rome"
    edited_logits = model(**tok(EIFFEL.text, return_tensors="pt")).logits
    with pytest.raises(Exception, match="already applied"):
        patch.apply(model)
    patch.revert(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

    path = patch.save(tmp_path / "eiffel")
    loaded = Patch.load(path)
    from factedit.editing.patch import read_patch_metadata

    assert read_patch_metadata(path)["method"] == "rome" and not path.with_suffix(".json").exists()
    loaded.apply(model)
    assert torch.equal(model(**tok(EIFFEL.text, return_tensors="pt")).logits, edited_logits)
    loaded.revert(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_edit_and_compare_reports_a_converged_landed_edit(default_model, small_stats):
    """The report every front end shows: before/after rows, and the edit converged and landed."""
    from factedit import edit_and_compare

    model, tok = default_model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = edit_and_compare(
        model,
        tok,
        EIFFEL,
        "rome",
        second_moment=small_stats,
        paraphrases=["The Eiffel Tower can be found in the city of"],
        neighbours=["The Louvre is located in the city of"],
    )
    assert [row.kind for row in report.rows] == ["prompt", "paraphrase", "neighbour"]
    assert report.rows[0].before["top"][0][0] == " Paris" and report.rows[0].after["top"][0][0] == " Rome"
    assert report.landed == [True] and report.converged == [True]
    assert "converged" in report.summary_line() and "is now the top prediction" in report.summary_line()
    report.applied[0].revert()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_patch_refused_on_other_weights_and_corrupt_files(default_model, eiffel_patch, tmp_path):
    from factedit.errors import FactEditError

    model, _ = default_model
    patch = eiffel_patch
    path = patch.save(tmp_path / "p")
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(FactEditError, match="corrupt or truncated"):
        Patch.load(truncated)
    assert truncated.read_bytes() == data[: len(data) // 2]

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a patch at all")
    with pytest.raises(FactEditError):
        Patch.load(garbage)

    # the same model with one other weight changed: refused, and nothing is modified
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from dataclasses import replace

    other = replace(patch, base_fingerprint="0" * 32)
    with pytest.raises(FactEditError, match="differ from those this patch was computed on"):
        other.apply(model)
    other = replace(other, model_identity="another")
    with pytest.raises(FactEditError, match="another model"):
        other.apply(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
