"""AlphaEdit: project each update onto the null space of preserved knowledge (arXiv 2410.02355).

P projects onto the eigenvectors of C whose eigenvalues are below ``nullspace_threshold``
(directions the preserved-knowledge keys hardly use), so ΔW k₀ ≈ 0 for those keys. The
keys of earlier edits in a sequence are accumulated (K_p K_pᵀ) so later edits keep them:

    A = (P (K Kᵀ + K_p K_pᵀ) + L2·I)⁻¹ P K,    ΔW = R Aᵀ

Everything else (z, keys, statistics, templates) is MEMIT's, i.e. the core's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import AlphaEditHyperParams
from factedit.editing.memit import compute_memit
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.editing.result import EditResult
from factedit.errors import FactEditError
from factedit.progress import Progress


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
                    "raise the threshold"
                )
            self.projection[layer] = basis @ basis.T
        self.previous: dict[int, torch.Tensor] = {}
        self._pending: dict[int, torch.Tensor] = {}

    def null_space_dim(self, layer: int) -> int:
        return int(round(float(torch.trace(self.projection[layer]))))

    def observe(self, layer: int, keys: torch.Tensor) -> None:
        """Keep K Kᵀ of the batch being computed (added to the edits already made by :meth:`commit`).

        Called by the solve itself, and under torchrun by the ranks that do not solve (rank 0 does), with
        the same keys: every rank's state stays the same."""
        self._pending[layer] = keys @ keys.T

    def __call__(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        p = self.projection[layer].to(keys.device)  # on the layer's device, like the keys
        self.observe(layer, keys)
        kk = self._pending[layer]
        prev = self.previous[layer].to(kk.device) if layer in self.previous else torch.zeros_like(kk)
        eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
        return torch.linalg.solve(p @ (kk + prev) + self.hparams.L2 * eye, p @ keys)

    def commit(self) -> None:
        """Remember the keys of the batch just applied, so later edits keep it."""
        for layer, kk in self._pending.items():
            self.previous[layer] = (self.previous[layer].to(kk.device) + kk) if layer in self.previous else kk
        self._pending.clear()

    def discard(self) -> None:
        """Forget the keys of a batch that was computed but not kept."""
        self._pending.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed sequence needs (the projections are recomputed from C)."""
        return {f"previous.{layer}": kk.contiguous() for layer, kk in self.previous.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.previous = {int(k.split(".", 1)[1]): v.double() for k, v in tensors.items() if k.startswith("previous.")}
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
    resources: EditResources | None = None,
    progress: Progress | bool | None = None,
    z_cache: str | Path | None = None,
    key_batch_size: int = 64,
) -> EditResult:
    """One AlphaEdit batch. ``state`` carries the projections and the keys of earlier batches of a
    sequence: pass the same object to every batch and call ``state.commit()`` once a batch's patch is
    applied (without ``state``, a fresh one is made: a single batch). ``z_cache`` and ``key_batch_size``
    are :func:`~factedit.editing.memit.compute_memit`'s. Under torchrun (every rank calling with the same
    requests and the same ``state``) the work is shared as MEMIT's; every rank's ``state`` stays the same."""
    hp = hparams or AlphaEditHyperParams.for_model(model)
    resources = resources or EditResources(model, tok, corpus=corpus)
    second_moment = resources.moments_with(hp, second_moment, progress)
    state = state or AlphaEditState({layer: second_moment[layer] for layer in hp.layers}, hp)
    return compute_memit(
        model,
        tok,
        requests,
        hp,
        second_moment=second_moment,
        templates=templates,
        resources=resources,
        progress=progress,
        solver=state,
        method="alphaedit",
        z_cache=z_cache,
        key_batch_size=key_batch_size,
    )
