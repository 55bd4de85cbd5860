"""Sequential editing: one batch after another on the same model, each computed on the edited model.

Users of ROME/MEMIT report that long edit sequences collapse a model; this driver makes
that measurable (a callback after every step) and offers AlphaEdit, whose projection and
accumulated keys are meant to prevent it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.alphaedit import AlphaEditState, compute_alphaedit
from factedit.editing.hparams import AlphaEditHyperParams, HyperParams, MEMITHyperParams, ROMEHyperParams
from factedit.editing.memit import check_batch, compute_memit
from factedit.editing.patch import Patch
from factedit.editing.requests import EditRequest
from factedit.editing.templates import context_templates
from factedit.errors import FactEditError
from factedit.predict import new_beats_true
from factedit.stats.second_moment import second_moments

log = logging.getLogger(__name__)
METHODS: dict[str, type[HyperParams]] = {
    "rome": ROMEHyperParams, "memit": MEMITHyperParams, "alphaedit": AlphaEditHyperParams,
}


def default_hparams(method: str, model: nn.Module, **overrides) -> HyperParams:
    if method not in METHODS:
        raise FactEditError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[method].for_model(model, **overrides)


class SequentialEditor:
    """Edits a model in place, batch after batch, keeping every applied patch (revertible in reverse)."""

    def __init__(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        method: str = "memit",
        hparams: HyperParams | None = None,
        *,
        second_moment: dict[int, torch.Tensor] | None = None,
        templates: list[str] | None = None,
        corpus: str | None = None,
        progress: bool = False,
    ) -> None:
        self.model, self.tok, self.method = model, tok, method
        self.hparams = hparams or default_hparams(method, model)
        self.progress = progress
        hp = self.hparams
        # Statistics and context templates are the *unedited* model's, made once, as in the papers'
        # sequential setups (and so a step does not regenerate templates from an edited model).
        self.templates = templates or context_templates(
            model, tok, hp.context_template_length_params, seed=hp.template_seed,
            starts=getattr(hp, "template_starts", None))
        self.second_moment = second_moment or second_moments(
            model, tok, hp.layers, corpus=corpus or hp.mom2_dataset, n_tokens=hp.mom2_n_tokens,
            max_length=hp.mom2_max_length, dtype=hp.mom2_dtype, progress=progress)
        self.alpha: AlphaEditState | None = None
        self.patches: list[Patch] = []

    def edits_holding(self, requests: Sequence[EditRequest], max_requests: int = 200) -> dict[str, Any]:
        """A drift measure for ``run``'s ``after_step``: the share of the first ``max_requests``
        edited requests (with a true target) whose new target still beats the true one."""
        measured = [r for r in requests if r.target_true][:max_requests]
        held = sum(new_beats_true(self.model, self.tok, [r.text], r.new_text, r.true_text)[0] for r in measured)
        return {"measured": len(measured), "edits_holding": held / len(measured) if measured else None}

    def step(self, requests: Sequence[EditRequest]) -> Patch:
        """Compute one batch on the current (already edited) model and apply it."""
        from factedit.editing.rome import compute_rome

        if self.method == "rome":
            if len(requests) != 1:
                raise FactEditError("ROME edits one request per step; use memit or alphaedit for batches")
            patch, _ = compute_rome(self.model, self.tok, requests[0], self.hparams,
                                    second_moment=self.second_moment, templates=self.templates)
        elif self.method == "memit":
            patch = compute_memit(self.model, self.tok, requests, self.hparams, second_moment=self.second_moment,
                                  templates=self.templates, progress=self.progress)
        else:
            patch, self.alpha = compute_alphaedit(self.model, self.tok, requests, self.hparams, state=self.alpha,
                                                  second_moment=self.second_moment, templates=self.templates,
                                                  progress=self.progress)
        patch.apply(self.model)
        if self.alpha is not None:
            self.alpha.commit()
        self.patches.append(patch)
        return patch

    def run(
        self,
        requests: Sequence[EditRequest],
        batch_size: int = 1,
        after_step: Callable[[int, list[EditRequest]], dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Edit ``requests`` in consecutive batches; ``after_step(i, edited_so_far)`` measures drift."""
        history = []
        done: list[EditRequest] = []
        batches = [list(requests[start : start + batch_size]) for start in range(0, len(requests), batch_size)]
        if self.method != "rome":  # a conflict in a later batch must not leave earlier ones applied
            for batch in batches:
                check_batch(batch, self.hparams.fact_token)
        for i, batch in enumerate(batches):
            self.step(batch)
            done.extend(batch)
            if after_step is not None:
                record = {"step": i + 1, "edits": len(done), **after_step(i + 1, done)}
                log.info("step %s", record)
                history.append(record)
        return history

    def revert_all(self) -> None:
        """Undo every step, newest first (bit-exact)."""
        while self.patches:
            self.patches.pop().revert(self.model)
        self.alpha = None
