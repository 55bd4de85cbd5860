"""Guarded edits: keep an edit only if the rest of the model barely moves; otherwise undo it bit-exact.

Long ROME/MEMIT sequences collapse a model one edit at a time (docs/evaluation.md, the 1,000-edit drift
table), and each single step is cheap to check. :class:`EditGuard` fixes a small probe on the unedited model
and, after an edit is applied, measures it again:

* **neighbourhood**: the share of fixed CounterFact neighbourhood prompts (the first two of the run's first
  20 cases) on which the true answer still beats that case's new target (ROME's NS test);
* **known facts**: the share of unrelated known facts (``known_1000.json``, subjects no edit of the run is
  about, predicted by the unedited model) still predicted, :func:`~factedit.evaluation.capability.known_accuracy`;
* **perplexity** of a short held-out text (WikiText-2 test and the last lines of the Wikipedia corpus,
  :func:`~factedit.evaluation.capability.window_nll` over the probe's windows).

The probe's inputs are those of :class:`~factedit.evaluation.capability.CapabilityProbe` (built with small
sizes); nothing is measured twice per edit (the state after an accepted edit is the next edit's "before").
An edit crossing a limit of :class:`~factedit.evaluation.config.GuardSettings` is undone with the patch's own
revert (bit-exact) and reported with the reasons. The same object guards one edit (:meth:`EditGuard.try_patch`),
a :class:`~factedit.editing.sequential.SequentialEditor` step (:func:`guarded_step`), or a run's sequence
(``RunConfig(guard=GuardSettings())``, ``factedit eval --sequential --guard``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.data.counterfact import CounterFactCase
from factedit.editing.patch import AppliedPatch, Patch, PatchStack
from factedit.editing.requests import EditRequest
from factedit.editing.result import EditResult
from factedit.editing.sequential import SequentialEditor
from factedit.errors import FactEditError
from factedit.evaluation.capability import CapabilityProbe, known_accuracy, window_nll
from factedit.evaluation.config import GuardSettings
from factedit.predict import new_beats_true, top_next_tokens

log = logging.getLogger(__name__)

TOLERANCE = 1e-9  # a drop equal to a limit (2 of 50 facts = 0.04) is within it, whatever the float rounding


@dataclass(frozen=True)
class NeighbourProbe:
    """Prompts whose answer must stay ``true`` rather than become ``new`` (one CounterFact case's neighbours)."""

    prompts: tuple[str, ...]
    new: str
    true: str


@dataclass
class GuardVerdict:
    """What the guard decided about one edit, with the measures before and after it."""

    accepted: bool
    reasons: list[str]
    before: dict[str, Any]
    after: dict[str, Any]
    handle: AppliedPatch | None = field(default=None, repr=False)  # the applied patch (accepted, no stack)

    def record(self) -> dict[str, Any]:
        """The verdict as a case log stores it."""
        return {
            "verdict": "accepted" if self.accepted else "refused",
            "reasons": list(self.reasons),
            "before": self.before,
            "after": self.after,
        }


def neighbour_probes(cases: Iterable[Any], settings: GuardSettings) -> list[NeighbourProbe]:
    """The first ``settings.neighbour_cases`` CounterFact cases' first ``settings.neighbour_prompts``
    neighbourhood prompts, with their new and true targets as scored (zsRE cases have none to compare)."""
    probes = []
    for case in cases:
        if len(probes) >= settings.neighbour_cases:
            break
        if isinstance(case, CounterFactCase) and case.neighborhood_prompts:
            req = case.scored_request
            probes.append(
                NeighbourProbe(
                    tuple(case.neighborhood_prompts[: settings.neighbour_prompts]), req.new_text, req.true_text
                )
            )
    return probes


class EditGuard:
    """A fixed probe and limits; :attr:`current` holds the measures of the model as it is now."""

    def __init__(
        self,
        settings: GuardSettings,
        probe: CapabilityProbe,
        neighbours: Sequence[NeighbourProbe],
        baseline: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.neighbours = list(neighbours)
        self.baseline = baseline  # the unedited model's measures (the total limits' reference)
        self.current = baseline

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        settings: GuardSettings | None = None,
        *,
        cases: Iterable[Any] = (),
        edited_subjects: Iterable[str] = (),
        neighbours: Sequence[NeighbourProbe] | None = None,
        seed: int = 0,
        baseline: dict[str, Any] | None = None,
    ) -> EditGuard:
        """Fix the probe on ``model``, which must be unedited, and measure it (unless ``baseline`` is given,
        as a resumed run reads it from its log). Known facts about ``edited_subjects`` (and the subjects of
        ``cases``) are left out; ``neighbours`` default to those of ``cases``."""
        settings = settings or GuardSettings()
        settings.check()
        cases = list(cases)
        subjects = [*edited_subjects, *(c.request.subject for c in cases)]
        probe = CapabilityProbe.build(model, tok, settings.capability(seed), subjects)
        guard = cls(settings, probe, neighbour_probes(cases, settings) if neighbours is None else neighbours)
        guard.baseline = guard.current = baseline if baseline is not None else guard.measure(model, tok)
        return guard

    @classmethod
    def for_requests(
        cls,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        neighbour_texts: Sequence[str] = (),
        settings: GuardSettings | None = None,
        seed: int = 0,
    ) -> EditGuard:
        """A guard for edits outside an evaluation run (``factedit edit --guard``): the user's neighbour
        prompts must keep preferring what the unedited model answers now over each request's new target;
        known facts about the edited subjects are left out of the probe."""
        neighbours = []
        texts = list(neighbour_texts)
        if texts:
            answers = [top[0][0] for top in top_next_tokens(model, tok, texts, k=1)]
            for request in requests:
                for text, answer in zip(texts, answers):
                    if answer.strip() and answer.strip() != request.new_text.strip():
                        neighbours.append(NeighbourProbe((text,), request.new_text, answer))
        return cls.build(
            model, tok, settings, edited_subjects=[r.subject for r in requests], neighbours=neighbours, seed=seed
        )

    def check_applied(
        self, model: nn.Module, tok: PreTrainedTokenizerBase, handles: Sequence[AppliedPatch]
    ) -> GuardVerdict:
        """Judge patches already applied (``handles``, oldest first) against the measures before them; a
        refusal reverts them bit-exact, newest first."""
        before = self.current if self.current is not None else self.measure(model, tok)
        try:
            after = self.measure(model, tok)
            reasons = self.judge(before, after)
        except BaseException:
            for handle in reversed(handles):
                handle.revert()
            raise
        if reasons:
            for handle in reversed(handles):
                handle.revert()
            log.info("guard refused the edit: %s", "; ".join(reasons))
            return GuardVerdict(False, reasons, before, after)
        self.current = after
        return GuardVerdict(True, [], before, after, handles[-1] if handles else None)

    def describe(self) -> dict[str, Any]:
        """The size of the probe."""
        return {
            "neighbour_prompts": sum(len(n.prompts) for n in self.neighbours),
            "known_facts": len(self.probe.facts),
            "ppl_windows": sum(len(w) for w in self.probe.windows.values()),
        }

    def measure(self, model: nn.Module, tok: PreTrainedTokenizerBase) -> dict[str, Any]:
        """The three measures on the model as it is now (a measure without inputs is None)."""
        kept = [not x for n in self.neighbours for x in new_beats_true(model, tok, list(n.prompts), n.new, n.true)]
        total, count = 0.0, 0
        for windows in self.probe.windows.values():
            if windows:
                nll, tokens = window_nll(model, tok, windows)
                total, count = total + nll, count + tokens
        return {
            "neighbour_kept": sum(kept) / len(kept) if kept else None,
            "neighbour_prompts": len(kept),
            "known_acc": known_accuracy(model, tok, self.probe.facts) if self.probe.facts else None,
            "known_facts": len(self.probe.facts),
            "ppl": math.exp(total / count) if count else None,
            "ppl_tokens": count,
        }

    def judge(self, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
        """Why the change from ``before`` to ``after`` is refused ([] = accepted)."""
        s, base = self.settings, self.baseline or before
        reasons = []
        for key, label in (
            ("neighbour_kept", "neighbourhood prompts keeping their answer"),
            ("known_acc", "known facts"),
        ):
            if after.get(key) is None or before.get(key) is None:
                continue
            step, limit = (
                before[key] - after[key],
                s.max_neighbour_drop if key == "neighbour_kept" else s.max_known_drop,
            )
            total = base[key] - after[key]
            total_limit = s.max_total_neighbour_drop if key == "neighbour_kept" else s.max_total_known_drop
            if step > limit + TOLERANCE:
                reasons.append(f"{label} fell {100 * step:.1f} points in this edit (limit {100 * limit:g})")
            elif total > total_limit + TOLERANCE and step > TOLERANCE:
                reasons.append(
                    f"{label} {100 * total:.1f} points below the unedited model after this edit "
                    f"(limit {100 * total_limit:g}; {100 * step:.1f} in this edit)"
                )
        if after.get("ppl") is not None and before.get("ppl") is not None:
            step, total = after["ppl"] / before["ppl"] - 1, after["ppl"] / base["ppl"] - 1
            if not math.isfinite(after["ppl"]) or step > s.max_ppl_rise + TOLERANCE:
                reasons.append(f"perplexity rose {100 * step:.2f}% in this edit (limit {100 * s.max_ppl_rise:g}%)")
            elif total > s.max_total_ppl_rise + TOLERANCE and step > TOLERANCE:
                reasons.append(
                    f"perplexity {100 * total:.2f}% above the unedited model after this edit "
                    f"(limit {100 * s.max_total_ppl_rise:g}%; +{100 * step:.2f}% in this edit)"
                )
        return reasons

    def try_patch(
        self, model: nn.Module, tok: PreTrainedTokenizerBase, patch: Patch, stack: PatchStack | None = None
    ) -> GuardVerdict:
        """Apply ``patch`` (pushed on ``stack`` if given), measure, and keep it or undo it bit-exact."""
        if stack is not None and stack.undo_depth == 0:
            raise FactEditError(
                "the guard must be able to undo the newest edit: use a patch stack with undo_depth >= 1"
            )
        before = self.current if self.current is not None else self.measure(model, tok)
        handle = stack.push(patch) if stack is not None else patch.apply(model)
        try:
            after = self.measure(model, tok)
            reasons = self.judge(before, after)
        except BaseException:
            self._undo(handle, stack)
            raise
        if reasons:
            self._undo(handle, stack)
            log.info("guard refused %s: %s", patch.describe(), "; ".join(reasons))
            return GuardVerdict(False, reasons, before, after)
        self.current = after
        return GuardVerdict(True, [], before, after, handle)

    def accept(self, measures: dict[str, Any]) -> None:
        """The model now is in a state measured earlier (a resumed run re-applying an accepted edit)."""
        self.current = measures

    @staticmethod
    def _undo(handle: AppliedPatch, stack: PatchStack | None) -> None:
        if stack is not None:
            stack.pop()
        else:
            handle.revert()


def compute_step(editor: SequentialEditor, requests: Sequence[EditRequest], **options: Any) -> EditResult | None:
    """:meth:`SequentialEditor.step` without applying: the edit computed on the model as it is now."""
    if editor.templates is not None:
        options.setdefault("templates", editor.templates)
    if editor.second_moment is not None:
        options.setdefault("second_moment", editor.second_moment)
    return editor.method.compute(
        editor.model,
        editor.tok,
        list(requests),
        editor.hparams,
        resources=editor.resources,
        state=editor.state,
        progress=editor.progress,
        **options,
    )


def settle(editor: SequentialEditor, result: EditResult, guard: EditGuard) -> GuardVerdict:
    """Apply a computed step on ``editor``'s stack under ``guard``: kept (the method's state commits it)
    or undone bit-exact (its state forgets it)."""
    try:
        verdict = guard.try_patch(editor.model, editor.tok, result.patch, editor.stack)
    except BaseException:
        if editor.state is not None:
            editor.state.discard()
        raise
    if editor.state is not None:
        (editor.state.commit if verdict.accepted else editor.state.discard)()
    if verdict.accepted:
        editor.results.append(result)
    return verdict


def guarded_step(
    editor: SequentialEditor, requests: Sequence[EditRequest], guard: EditGuard, **options: Any
) -> tuple[EditResult | None, GuardVerdict | None]:
    """One :class:`SequentialEditor` step under ``guard`` (the editor needs ``undo_depth >= 1``); the result
    and the verdict (both None for the method ``none``)."""
    if editor.stack.undo_depth == 0:
        raise FactEditError("the guard must be able to undo the newest edit: make the editor with undo_depth=1")
    result = compute_step(editor, requests, **options)
    if result is None:
        return None, None
    return result, settle(editor, result, guard)
