"""AlphaEdit: project each update onto the null space of preserved knowledge (arXiv 2410.02355).

P projects onto the eigenvectors of C whose eigenvalues are below ``nullspace_threshold``
(directions the preserved-knowledge keys hardly use), so ΔW k₀ ≈ 0 for those keys. The
keys of earlier edits in a sequence are accumulated (K_p K_pᵀ) so later edits keep them:

    A = (P (K Kᵀ + K_p K_pᵀ) + L2·I)⁻¹ P K,    ΔW = R Aᵀ

Everything else (z, keys, statistics, templates) is MEMIT's, i.e. the core's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import AlphaEditHyperParams
from factedit.editing.memit import compute_memit
from factedit.editing.patch import Patch
from factedit.editing.requests import EditRequest
from factedit.errors import FactEditError
from factedit.stats.second_moment import second_moments


class AlphaEditState:
    """Null-space projections per layer and the running K_p K_pᵀ of edits already made."""

    def __init__(self, second_moment: dict[int, torch.Tensor], hparams: AlphaEditHyperParams) -> None:
        self.hparams = hparams
        self.projection: dict[int, torch.Tensor] = {}
        for layer, moment in second_moment.items():
            eigvals, eigvecs = torch.linalg.eigh(moment.double())
            basis = eigvecs[:, eigvals < hparams.nullspace_threshold]
            if basis.shape[1] == 0:
                raise FactEditError(
                    f"layer {layer}: no eigenvalue of C is below nullspace_threshold={hparams.nullspace_threshold:g} "
                    f"(smallest {float(eigvals[0]):.3g}), so every update would be projected to zero; "
                    "raise the threshold")
            self.projection[layer] = basis @ basis.T
        self.previous: dict[int, torch.Tensor] = {}
        self._pending: dict[int, torch.Tensor] = {}

    def null_space_dim(self, layer: int) -> int:
        return int(round(float(torch.trace(self.projection[layer]))))

    def __call__(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        p = self.projection[layer].to(keys.device)
        kk = keys @ keys.T
        self._pending[layer] = kk
        prev = self.previous.get(layer, torch.zeros_like(kk))
        eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
        return torch.linalg.solve(p @ (kk + prev) + self.hparams.L2 * eye, p @ keys)

    def commit(self) -> None:
        """Remember the keys of the batch just applied, so later edits keep it."""
        for layer, kk in self._pending.items():
            self.previous[layer] = self.previous.get(layer, 0) + kk
        self._pending.clear()


def compute_alphaedit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    hparams: AlphaEditHyperParams | None = None,
    *,
    state: AlphaEditState | None = None,
    second_moment: dict[int, torch.Tensor] | None = None,
    templates: list[str] | None = None,
    corpus: str | None = None,
    progress: bool = False,
) -> tuple[Patch, AlphaEditState]:
    """One AlphaEdit batch; pass the returned ``state`` to the next batch of a sequence
    (and call ``state.commit()`` once this batch's patch is applied)."""
    hp = hparams or AlphaEditHyperParams.for_model(model)
    if second_moment is None or any(layer not in second_moment for layer in hp.layers):
        second_moment = {**(second_moment or {}), **second_moments(
            model, tok, [lyr for lyr in hp.layers if not second_moment or lyr not in second_moment],
            corpus=corpus or hp.mom2_dataset, n_tokens=hp.mom2_n_tokens, max_length=hp.mom2_max_length,
            dtype=hp.mom2_dtype, progress=progress)}
    state = state or AlphaEditState({layer: second_moment[layer] for layer in hp.layers}, hp)
    patch = compute_memit(model, tok, requests, hp, second_moment=second_moment, templates=templates,
                          progress=progress, solver=state, method="alphaedit")
    return patch, state
