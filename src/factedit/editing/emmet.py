"""EMMET: batched ROME with equality constraints (Gupta, Sajnani & Anumanchipalli 2024, "A Unified
Framework for Model Editing", arXiv 2403.14236), after the official code in
scalable-model-editing/unified-model-editing (``emmet/emmet_main.py``, ``hparams/EMMET/*.json``).

ROME keeps the preserved keys K₀ by least squares and *forces* its single new fact; MEMIT treats the
new facts by least squares too. EMMET forces every fact of the batch:

    min ‖ΔW K₀‖²  subject to  (W + ΔW) kᵢ = vᵢ for every edit i
    ΔW = R (D + λ_E I)⁻¹ Kᵀ C⁻¹,   D = Kᵀ C⁻¹ K,   C = mom2_update_weight · E[kkᵀ] + update_norm_lambda · I

with R the residuals. ``emmet_lambda`` (λ_E, 0.1 in every official file) is added to D only when the
batch has more than one edit, as in the official code: D of a large batch is ill-conditioned, and this is
what lets EMMET scale to batches of 10,000; one edit stays an exact equality (ROME's update).

Everything else is MEMIT's and therefore the core's, reused, not copied: the z vectors (the shared value
optimisation at the last edited layer's block output), the template-averaged keys, the statistics C, the
residual spread R / (number of layers left) over the edited layers and the patch; only the solve
(:func:`emmet_solver`, a :class:`~factedit.editing.memit.KeySolver`) differs.

Deviations from the official code:
- D is solved with ``torch.linalg.solve`` in float64 instead of inverting C and D (the same matrix, more
  accurate); the official fallback to a pseudo-inverse when D is singular is kept (``emmet_lambda = 0`` with
  two identical keys), with a warning.
- The official files edit one layer (ROME's); the defaults here do the same for every family: the layer of
  ``hparams/rome/<family>.json`` (for SmolLM2, ROME's measured layer 6), except Llama's, which is the official
  llama2-7b file's (layer 5 of 32). Settings of families without an official file are named in their files.
- The z optimisation's loss is read at the final logits (the official ``v_loss_layer`` is the last layer too).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import EMMETHyperParams
from factedit.editing.memit import KeySolver, compute_memit
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.editing.result import EditResult
from factedit.progress import Progress

log = logging.getLogger(__name__)


def emmet_solver(second_moment: dict[int, torch.Tensor], hparams: EMMETHyperParams) -> KeySolver:
    """A (d_in, n) with ΔW = R Aᵀ: A = C⁻¹ K (Kᵀ C⁻¹ K + λ_E I)⁻¹ (D is symmetric), in float64."""

    def solve(layer: int, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.double()
        moment = second_moment[layer].to(keys.device).double() * hparams.mom2_update_weight
        if hparams.update_norm_lambda:
            moment = moment + hparams.update_norm_lambda * torch.eye(
                moment.shape[0], dtype=moment.dtype, device=moment.device
            )
        c_inv_k = torch.linalg.solve(moment, keys)  # (d_in, n)
        d = keys.T @ c_inv_k  # (n, n)
        if d.shape[0] > 1:
            d = d + hparams.emmet_lambda * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
        try:
            return torch.linalg.solve(d, c_inv_k.T).T
        except torch.linalg.LinAlgError:  # singular D: the official code falls back to the pseudo-inverse
            log.warning("layer %d: Kᵀ C⁻¹ K is singular (identical keys?); using its pseudo-inverse", layer)
            return c_inv_k @ torch.linalg.pinv(d)

    return solve


def compute_emmet(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    hparams: EMMETHyperParams | None = None,
    *,
    second_moment: dict[int, torch.Tensor] | None = None,
    templates: list[str] | None = None,
    corpus: str | None = None,
    resources: EditResources | None = None,
    progress: Progress | bool | None = None,
    **memit_options: Any,
) -> EditResult:
    """One EMMET patch for a batch of requests (the model is left unchanged); the arguments, and
    ``memit_options`` (``z_cache``, ...), are :func:`~factedit.editing.memit.compute_memit`'s."""
    hp = hparams or EMMETHyperParams.for_model(model)
    hp.check_model(model)
    resources = resources or EditResources(model, tok, corpus=corpus)
    return compute_memit(
        model,
        tok,
        requests,
        hp,
        second_moment=second_moment,
        templates=templates,
        resources=resources,
        progress=progress,
        solver=_LazySolver(resources, hp, second_moment, progress),
        method="emmet",
        **memit_options,
    )


class _LazySolver:
    """EMMET's solver over the statistics compute_memit resolves: they are looked up only when the first
    layer is solved, so bad requests are refused before any statistics are computed (as with MEMIT)."""

    def __init__(
        self,
        resources: EditResources,
        hp: EMMETHyperParams,
        given: dict[int, torch.Tensor] | None,
        progress: Progress | bool | None,
    ) -> None:
        self.resources, self.hp, self.given, self.progress = resources, hp, given, progress
        self._solve: KeySolver | None = None

    def __call__(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        if self._solve is None:
            self._solve = emmet_solver(self.resources.moments_with(self.hp, self.given, self.progress), self.hp)
        return self._solve(layer, keys)
