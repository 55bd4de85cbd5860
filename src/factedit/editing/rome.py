"""ROME: Rank-One Model Editing (Meng et al. 2022, arXiv 2202.05262), as in kmeng01/rome.

For each edited layer: k* = mean key over context templates (each template alike, as ROME, or each
context type alike, as MEMIT's keys: ``key_average``), u = C⁻¹k* / |C⁻¹k*|,
v* from the value optimisation, and ΔW = (v* − W k)(u)ᵀ / (kᵀu), so the edited
weight maps k to v*. ``consistent_key`` (default, r-ROME) uses k = k*; switched
off, k is the bare prompt's key, as in the original code.

Two factedit options (not in ROME or r-ROME; defaults off) for prompts whose key lies far from k*
(on SmolLM2, a prompt that opens with its subject gets ~0.2 of the update: bench/rome_key_projection.py):
``key_fit="every_template"`` fits u so that every template's key gets nearly the same change
(:func:`fitted_left_vector`; the update stays rank one and consistent, ΔW k* = v* − W k*), and
``value_objective="applied"`` optimises v* through the update as it will be applied
(:func:`_applied_problem`).

NAS (``value_norm_anchor``, off by default; arXiv 2602.02543) rescales v* to a norm measured on the unedited
model, and drops an edit whose v* is over ``value_norm_skip_factor`` (5, the official ROME value) anchors
(:mod:`factedit.editing.values`). The anchor is one layer's, so NAS edits a single ROME layer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import ROMEHyperParams
from factedit.editing.keys import subject_keys
from factedit.editing.patch import Patch, PatchEntry
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.editing.result import EditResult, converged_from_history
from factedit.editing.templates import check_templates, template_group_sizes, template_weights
from factedit.editing.values import build_value_problem, optimize_values
from factedit.errors import FactEditError
from factedit.models.architectures import arch_for, get_module, get_parameter
from factedit.models.fingerprint import model_fingerprint, tensor_sha256
from factedit.models.placement import device_of, require_resident
from factedit.progress import Progress, as_progress
from factedit.text import pad_id

log = logging.getLogger(__name__)


@dataclass
class RomeLayerResult:
    """Everything ROME computed for one layer (useful for inspection and equivalence tests)."""

    layer: int
    keys: torch.Tensor  # (n_templates, d_in)
    u: torch.Tensor
    v: torch.Tensor  # right vector: (v* − W k) / (kᵀu)
    v_star: torch.Tensor
    k_update: torch.Tensor
    losses: list[dict[str, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def left_vector(k_mean: torch.Tensor, second_moment: torch.Tensor | None) -> torch.Tensor:
    """u = C⁻¹k (solved in float64), normalised; k itself when ``second_moment`` is None."""
    u = k_mean.double()
    if second_moment is not None:
        u = torch.linalg.solve(second_moment.to(u.device).double(), u)  # C moved to the key's (layer's) device
    return (u / u.norm()).float()


def compute_rome(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: ROMEHyperParams | None = None,
    *,
    second_moment: dict[int, torch.Tensor] | None = None,
    templates: list[str] | None = None,
    corpus: str | None = None,
    resources: EditResources | None = None,
    progress: Progress | bool | None = None,
) -> EditResult:
    """Compute a ROME edit; the model is left unchanged. ``result.patch`` is the change to apply,
    ``result.details`` the per-layer :class:`RomeLayerResult` (keys, u, v, losses).

    ``second_moment``: ``{layer: C}`` to use instead of the cached statistics; ``templates``: context
    templates to use instead of generating them; ``resources``: the shared cache of both (one per model,
    see :class:`~factedit.editing.resources.EditResources`); ``corpus``: the statistics text when no
    resources are given.
    """
    hp = hparams or ROMEHyperParams.for_model(model)
    hp.check_model(model)
    if hp.value_norm_anchor is not None and len(hp.layers) > 1:
        raise FactEditError(
            f"value_norm_anchor is the norm measured at one layer, and ROME would edit layers {hp.layers}: "
            "edit one layer with NAS (or leave value_norm_anchor unset)"
        )
    arch = arch_for(model)
    require_resident(model, [arch.rewrite_weight_at(layer) for layer in hp.layers], "edit with ROME")
    progress = as_progress(progress)
    build_value_problem(tok, request, ["{}"], hp.fact_token)  # bad subject/target refused before any work
    base_fp = model_fingerprint(model)
    resources = resources or EditResources(model, tok, corpus=corpus)
    if templates is None:
        templates = resources.templates(hp.template_spec, progress)
    check_templates(templates)
    if hp.mom2_adjustment:
        second_moment = resources.moments_with(hp, second_moment, progress)
    problem = build_value_problem(tok, request, templates, hp.fact_token)

    results: list[RomeLayerResult] = []
    entries: list[PatchEntry] = []
    originals: dict[str, torch.Tensor] = {}
    try:
        for layer in hp.layers:
            results.append(
                _edit_layer(
                    model,
                    tok,
                    arch,
                    request,
                    hp,
                    layer,
                    templates,
                    problem,
                    second_moment.get(layer) if hp.mom2_adjustment else None,
                    progress,
                )
            )
            res = results[-1]
            name = arch.rewrite_weight_at(layer)
            weight = get_parameter(model, name)
            entries.append(
                PatchEntry(
                    name=name,
                    shape=tuple(weight.shape),
                    transposed=arch.conv1d,
                    left=res.v[:, None].cpu(),
                    right=res.u[None, :].cpu(),
                    base_sha256=tensor_sha256(weight),
                )
            )
            if layer != hp.layers[-1]:  # later layers are computed on the model with this layer edited
                with torch.no_grad():
                    originals.setdefault(name, weight.detach().clone())
                    weight.copy_((weight.float() + entries[-1].delta().to(weight.device)).to(weight.dtype))
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                get_parameter(model, name).copy_(original)

    patch = Patch.for_model(
        model,
        method="rome" if hp.consistent_key else "rome-original",
        entries=entries,
        base_fingerprint=base_fp,
        requests=[request.to_dict()],
        hparams=hp.model_dump(mode="json"),
        info={"losses": [r.losses for r in results], "timings": [r.timings for r in results], "templates": templates},
    )
    converged = all(converged_from_history(r.losses, hp.early_stop_loss) for r in results)
    timings = {key: sum(r.timings.get(key, 0.0) for r in results) for key in ("k", "v", "update")}
    return EditResult(
        patch=patch,
        requests=[request],
        converged=[converged],
        losses=[results[-1].losses],
        timings=timings,
        details=results,
    )


def fitted_left_vector(keys: torch.Tensor, second_moment: torch.Tensor | None, ridge: float) -> torch.Tensor:
    """u minimising uᵀCu + ridge·s·|α|² over u = C⁻¹Kᵀα with Ku ≈ 1 (every key gets the same response), normalised.

    Solved in float64: u = C⁻¹Kᵀ(KC⁻¹Kᵀ + ridge·s·I)⁻¹1 with s the mean of diag(KC⁻¹Kᵀ), so ``ridge`` is
    scale-free. ROME's u = C⁻¹k* answers each key kᵢ with kᵢᵀu, which is small for a key far from the
    template mean (a prompt that opens with its subject: bench/rome_key_projection.py); this u makes the
    responses nearly equal, at the cost of a larger C-norm (a larger expected change on other keys).
    As ``ridge`` → ∞ it tends to ROME's direction.
    """
    k = keys.double()
    c_inv_kt = k.T if second_moment is None else torch.linalg.solve(second_moment.to(k.device).double(), k.T)
    gram = k @ c_inv_kt
    scale = gram.diagonal().mean()
    eye = torch.eye(len(k), dtype=k.dtype, device=k.device)
    alpha = torch.linalg.solve(gram + ridge * scale * eye, torch.ones(len(k), dtype=k.dtype, device=k.device))
    u = c_inv_kt @ alpha
    return (u / u.norm()).float()


def average_key(keys: torch.Tensor, templates: list[str], hp: ROMEHyperParams) -> torch.Tensor:
    """k*: the keys' mean over the templates, each alike or each context type alike (``hp.key_average``)."""
    if hp.key_average == "templates":
        return keys.mean(0)
    sizes = template_group_sizes([tuple(p) for p in hp.context_template_length_params])
    weights = torch.tensor(template_weights(templates, sizes), dtype=keys.dtype, device=keys.device)
    return (keys * weights[:, None]).sum(0)


def _edit_layer(
    model, tok, arch, request, hp: ROMEHyperParams, layer, templates, problem, moment, progress: Progress
) -> RomeLayerResult:
    started = time.perf_counter()
    keys = subject_keys(model, tok, arch, [layer], request.prompt, request.subject, templates, hp.fact_token)[layer]
    k_mean = average_key(keys, templates, hp)
    u = left_vector(k_mean, moment) if hp.key_fit == "mean" else fitted_left_vector(keys, moment, hp.key_fit_ridge)
    if hp.consistent_key:
        k_update = k_mean
    elif templates[0] == "{}":
        k_update = keys[0]
    else:
        k_update = subject_keys(model, tok, arch, [layer], request.prompt, request.subject, ["{}"], hp.fact_token)[
            layer
        ][0]
    denom = torch.dot(k_update.float(), u)
    if abs(float(denom)) < 1e-8:
        raise FactEditError(f"layer {layer}: key is orthogonal to u (kᵀu={float(denom):.3g}); cannot edit")
    rewrite = get_module(model, arch.rewrite_at(layer))
    if hp.value_objective == "applied":
        problem = _applied_problem(model, tok, arch, request, hp, layer, keys, u, k_update, problem)
    t_k = time.perf_counter()
    values = optimize_values(
        model, arch, [problem], site=arch.rewrite_at(layer), layer=layer, hparams=hp, pad=pad_id(tok), progress=progress
    )
    t_v = time.perf_counter()
    v_star = values.targets[0]
    with torch.no_grad():
        w_k = _output_at(rewrite, k_update, model.dtype).to(v_star.device)
        v = (v_star - w_k) / denom.to(v_star.device)
    timings = {"k": t_k - started, "v": t_v - t_k, "update": time.perf_counter() - t_v}
    return RomeLayerResult(
        layer=layer, keys=keys, u=u, v=v, v_star=v_star, k_update=k_update, losses=values.losses[0], timings=timings
    )


def _output_at(rewrite: nn.Module, key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rewrite module's (unedited) output for one key, in float32."""
    with torch.no_grad():
        return rewrite(key[None].to(device_of(rewrite), dtype))[0].float()


def _applied_problem(model, tok, arch, request, hp: ROMEHyperParams, layer, keys, u, k_update, problem):
    """The value problem under the "applied" objective: each prompt sees the change ΔW will make there.

    ΔW = (v* − W k)uᵀ / (kᵀu) with v* = W k₀ + δ (k₀: the first prompt's key, where the optimisation
    starts, as in ROME) changes the output at a prompt whose key is kᵢ by
    gᵢ(δ + W k₀ − W k), gᵢ = kᵢᵀu / kᵀu. ROME optimises as if every gᵢ were 1 and the offset 0; on this
    tokenizer a prompt that opens with the subject has gᵢ ≈ 0.2–0.4 against the template-averaged key
    (bench/rome_key_projection.py), so its edit falls short of what was optimised. Here δ is fitted to the
    update as applied; the rank-one form, u, k and the clamp are unchanged.
    """
    kl_keys = [
        subject_keys(model, tok, arch, [layer], prompt, request.subject, ["{}"], hp.fact_token)[layer][0]
        for prompt in problem.kl_prompt_texts
    ]
    all_keys = torch.cat([keys, torch.stack(kl_keys)]).float()
    gains = (all_keys @ u.to(all_keys.device)) / torch.dot(k_update.float(), u)
    rewrite = get_module(model, arch.rewrite_at(layer))
    offset = _output_at(rewrite, keys[0], model.dtype) - _output_at(rewrite, k_update, model.dtype)
    return problem.with_response(gains.tolist(), offset)


def apply_rome(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: EditRequest,
    hparams: ROMEHyperParams | None = None,
    **kwargs,
):
    """Compute a ROME edit and apply it; returns the applied patch's handle (``.revert()`` undoes it)."""
    return compute_rome(model, tok, request, hparams, **kwargs).patch.apply(model)
