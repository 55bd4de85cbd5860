"""The one result type of every edit computation (ROME, MEMIT, AlphaEdit, FT, ...).

An edit is computed on a model that is left unchanged; what comes back is the patch to apply,
whether the optimisation reached its goal, and what it cost. Whether the edit *landed* (the new
target became the top prediction) is measured on the edited model by ``editing/report.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from factedit.editing.patch import Patch
from factedit.editing.requests import EditRequest

# A value optimisation counts as converged when it stopped early (loss below ``early_stop_loss``) or ended
# with the new target's mean token probability over the templated prompts at or above this share.
CONVERGED_PROB = 0.5


@dataclass
class EditResult:
    """``patch``: the change (not yet applied); ``converged``: per request, whether its optimisation reached
    its goal; ``losses``: per request, the loss records of every step; ``timings``: seconds per phase;
    ``details``: method-specific extras (e.g. ROME's per-layer u, v and keys)."""

    patch: Patch
    requests: list[EditRequest]
    converged: list[bool]
    losses: list[list[dict[str, float]]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    details: list[Any] = field(default_factory=list)

    @property
    def all_converged(self) -> bool:
        return all(self.converged)

    def final_losses(self) -> list[dict[str, float] | None]:
        return [steps[-1] if steps else None for steps in self.losses]


def converged_from_history(history: list[dict[str, float]], early_stop_loss: float) -> bool:
    """The convergence rule for a value/fine-tuning optimisation, from its per-step loss records."""
    if not history:
        return False
    last = history[-1]
    if last.get("total", float("inf")) < early_stop_loss:
        return True
    return last.get("avg_prob", 0.0) >= CONVERGED_PROB
