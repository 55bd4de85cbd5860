"""Sequential editing: one batch after another on the same model, each computed on the edited model.

Users of ROME/MEMIT report that long edit sequences collapse a model; this driver makes that
measurable (a callback after every step) and runs every registered method that can edit in
sequence (AlphaEdit's accumulated keys are its :class:`~factedit.editing.methods.MethodState`).
Statistics and context templates are the *unedited* model's, made once (as in the papers'
sequential setups), through the shared :class:`~factedit.editing.resources.EditResources`.
Applied patches live on a :class:`~factedit.editing.patch.PatchStack`: one snapshot of each
touched weight, so memory does not grow with the number of steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import HyperParams
from factedit.editing.methods import EditMethod, get_method
from factedit.editing.patch import Patch, PatchStack
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.editing.result import EditResult
from factedit.errors import FactEditError
from factedit.predict import new_beats_true_each
from factedit.progress import Progress, as_progress

log = logging.getLogger(__name__)


def edits_holding(
    model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], max_requests: int = 200
) -> dict[str, Any]:
    """A drift measure: the share of the first ``max_requests`` edited requests (with a true target)
    whose new target still beats the true one on the model as it is now."""
    measured = [r for r in requests if r.target_true][:max_requests]
    held = sum(new_beats_true_each(model, tok, [(r.text, r.new_text, r.true_text) for r in measured]))
    return {"measured": len(measured), "edits_holding": held / len(measured) if measured else None}


class SequentialEditor:
    """Edits a model in place, batch after batch; every applied patch is on ``stack`` (revertible)."""

    def __init__(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        method: str | EditMethod = "memit",
        hparams: HyperParams | str | dict | None = None,
        *,
        resources: EditResources | None = None,
        second_moment: dict[int, torch.Tensor] | None = None,
        templates: list[str] | None = None,
        corpus: str | None = None,
        undo_depth: int | None = 0,
        progress: Progress | bool | None = None,
    ) -> None:
        """``undo_depth``: how many of the newest steps can be undone one by one (``stack.pop()``); the
        default 0 keeps none, so memory is one snapshot of the touched weights however long the sequence
        (``revert_all`` still restores everything bit-exact); ``None`` keeps every step's."""
        self.model, self.tok = model, tok
        self.method = get_method(method) if isinstance(method, str) else method
        if not self.method.capabilities.sequential:
            raise FactEditError(f"method {self.method.name!r} cannot edit in sequence")
        self.hparams = self.method.hparams(model, hparams)
        self.progress = as_progress(progress)
        self.resources = resources or EditResources(model, tok, corpus=corpus, second_moment=second_moment)
        hp = self.hparams
        # made now, on the unedited weights; later steps find them in the resources' memory
        if templates is None and hp is not None and hp.template_spec is not None:
            templates = self.resources.templates(hp.template_spec, self.progress)
        self.templates = templates
        self.second_moment = second_moment or (
            self.resources.second_moments(hp.layers, hp.stats_spec, self.progress)
            if hp is not None and hp.stats_spec is not None
            else None
        )
        self.state = self.method.new_state(hp, self.resources, self.progress)
        self.stack = PatchStack(model, undo_depth=undo_depth)
        self.results: list[EditResult] = []

    @property
    def patches(self) -> list[Patch]:
        return [handle.patch for handle in self.stack.handles]

    def edits_holding(self, requests: Sequence[EditRequest], max_requests: int = 200) -> dict[str, Any]:
        return edits_holding(self.model, self.tok, requests, max_requests)

    def step(self, requests: Sequence[EditRequest], **options: Any) -> EditResult | None:
        """Compute one batch on the current (already edited) model and apply it."""
        if self.templates is not None:
            options.setdefault("templates", self.templates)
        if self.second_moment is not None:
            options.setdefault("second_moment", self.second_moment)
        result = self.method.compute(
            self.model,
            self.tok,
            list(requests),
            self.hparams,
            resources=self.resources,
            state=self.state,
            progress=self.progress,
            **options,
        )
        if result is None:  # "none": nothing to apply
            return None
        try:
            self.stack.push(result.patch)
        except BaseException:
            if self.state is not None:
                self.state.discard()
            raise
        if self.state is not None:
            self.state.commit()
        self.results.append(result)
        return result

    def run(
        self,
        requests: Sequence[EditRequest],
        batch_size: int = 1,
        after_step: Callable[[int, list[EditRequest]], dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Edit ``requests`` in consecutive batches; ``after_step(i, edited_so_far)`` measures drift."""
        if batch_size < 1:
            raise FactEditError(f"batch size must be at least 1 (got {batch_size})")
        batches = [list(requests[start : start + batch_size]) for start in range(0, len(requests), batch_size)]
        # every batch is checked first: a conflict in a later batch must not leave earlier ones applied
        batches = [self.method.check_requests(batch, self.hparams) for batch in batches]
        history = []
        done: list[EditRequest] = []
        steps = self.progress.stage(f"{self.method.name} sequence", total=len(batches), unit="step")
        with steps:
            for i, batch in enumerate(batches):
                self.step(batch)
                done.extend(batch)
                record = {"step": i + 1, "edits": len(done)}
                if after_step is not None:
                    record.update(after_step(i + 1, done))
                    history.append(record)
                log.info("step %s", record)
                steps.advance(1)
        return history

    def revert_all(self) -> None:
        """Undo every step (bit-exact) and start the method's state afresh."""
        self.stack.revert_all()
        self.results.clear()
        self.state = self.method.new_state(self.hparams, self.resources, self.progress)
