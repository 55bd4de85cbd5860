"""Batch and sequential evaluation runs: many edits in the model at once (MEMIT's protocol) or kept
one after another (the sequential-editing protocol where ROME/MEMIT are reported to collapse).

Called by :func:`factedit.evaluation.runner.run_evaluation`; it owns the run folder's ``cases.jsonl``
and manifest, this module the chunks. What makes a killed run resumable without recomputing edits:

* ``pre.jsonl`` keeps every case's unedited scores as soon as they are measured;
* MEMIT's target vectors z, per chunk of requests, in ``$FACTEDIT_HOME/memit-z`` (content-addressed:
  weights, hyper-parameters, templates and requests), so neither a resumed run nor another run of
  the same edits redoes the z optimisation;
* ``patches/chunk_NNNNN.safetensors`` (batch) or ``patches/step_NNNNN.safetensors`` (sequential)
  keeps each computed patch, with the case ids it edits in its ``info``; a saved patch is used only
  if it edits exactly the same cases, else it is recomputed;
* ``patches/state.safetensors``: AlphaEdit's kept keys after the last saved step;
* ``drift.jsonl`` (sequential, CounterFact, with ``drift_every`` or ``drift_at``): after every k-th step
  (or once so many edits are in), how many of
  the edits made so far still hold and how neighbourhood prompts and fluency drift (and, with
  ``capability``, the general-capability measures of :mod:`factedit.evaluation.capability`);
* ``capability.jsonl`` (with ``capability``): those measures on the unedited model (``before``), after
  each batch (``chunk-NNNNN``) or after the whole sequence (``after``); a record made with other sizes
  is measured again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.data.counterfact import CounterFactCase
from factedit.editing.memit import check_batch, key_text
from factedit.editing.methods import MethodState
from factedit.editing.patch import Patch, PatchStack
from factedit.editing.requests import EditRequest
from factedit.editing.result import EditResult
from factedit.editing.sequential import SequentialEditor, edits_holding
from factedit.errors import FactEditError
from factedit.evaluation.capability import CapabilityProbe, CapabilitySettings
from factedit.evaluation.cases import answer_slices
from factedit.evaluation.config import GuardSettings, RunConfig
from factedit.evaluation.edits import RunMethod
from factedit.evaluation.guard import EditGuard, GuardVerdict, compute_step, settle
from factedit.evaluation.records import CAPABILITY, GENERATION_KEYS, CaseLog, case_header, edit_info
from factedit.models.fingerprint import model_fingerprint
from factedit.paths import cache_dir
from factedit.progress import SILENT, Progress
from factedit.text import encode_with_subject, target_ids

log = logging.getLogger(__name__)

Evaluate = Callable[..., dict[str, Any]]  # (case, with_generation, answers=None) -> the case's scores
Prefetch = Callable[[list[Any]], dict[str, Any]]  # cases -> their greedy answers on the model as it is now
Finished = Callable[[Any, dict[str, Any]], None]
Compute = Callable[[list[EditRequest]], EditResult | None]
Complete = Callable[[Any, dict[str, Any]], dict[str, Any]]


def _chunks(cases: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(cases[i : i + size]) for i in range(0, len(cases), size)]


def _ids(chunk: Sequence[Any]) -> list[str]:
    return [str(c.case_id) for c in chunk]


def _with_answers(cases: Sequence[Any], prefetch: Prefetch | None, rows: int) -> Iterator[tuple[Any, dict, float]]:
    """Each case with the greedy answers computed for its slice of ``cases`` in shared batches, and its share
    of the seconds that took. Lazy: the model must stay as it is while this is iterated."""
    for chunk in answer_slices(cases, rows) if prefetch is not None else [list(cases)]:
        started = time.perf_counter()
        answers = prefetch(chunk) if prefetch is not None else {}
        share = (time.perf_counter() - started) / len(chunk)
        for case in chunk:
            yield case, answers, share


def split_valid(
    tok: PreTrainedTokenizerBase, chunk: Sequence[Any], fact_token: str = "subject_last"
) -> tuple[list[Any], dict[str, str]]:
    """Cases whose request can be edited in one batch, and an error message for each other case.

    The core's rule (:func:`~factedit.editing.memit.check_batch`) decides per case: a case that
    conflicts with an earlier one of the chunk (same key text, other target) is refused and the
    earlier one edited, so a chunk is never refused as a whole, nor half-applied.
    """
    valid, errors = [], {}
    first: dict[str, Any] = {}  # the first valid case per key text: the only one a later case can conflict with
    for case in chunk:
        req = case.request
        try:
            encode_with_subject(tok, req.prompt, req.subject)
            target_ids(tok, req.text, req.target_new)
        except FactEditError as exc:
            errors[str(case.case_id)] = str(exc)
            continue
        key = key_text(req, fact_token)
        if key in first:
            other = first[key].request
            try:
                check_batch([other, req], fact_token)
            except FactEditError:
                errors[str(case.case_id)] = (
                    f"conflicts with case {first[key].case_id} in the same batch: same key "
                    f"text {key!r} ({req.text!r} -> {req.target_new!r} vs {other.text!r} -> "
                    f"{other.target_new!r})"
                )
                continue
        first.setdefault(key, case)
        valid.append(case)
    return valid, errors


def _load_saved(path: Path, ids: list[str], model: nn.Module) -> Patch | None:
    if not path.is_file():
        return None
    try:
        patch = Patch.load(path)
    except FactEditError as exc:
        log.warning("%s is unreadable (%s); recomputing it", path, exc)
        return None
    if patch.info.get("case_ids") != ids or patch.base_fingerprint != model_fingerprint(model):
        log.warning("%s was made for other cases or another model state; recomputing it", path)
        return None
    return patch


def _compute(compute: Compute, chunk: list[Any], path: Path) -> tuple[Patch, float]:
    """``compute`` the edit of ``chunk``'s requests and save its patch (with the case ids) at ``path``."""
    t = time.perf_counter()
    result = compute([c.request for c in chunk])
    if result is None:
        raise FactEditError("the method made no edit")
    patch = result.patch
    seconds = time.perf_counter() - t
    patch.info["case_ids"] = _ids(chunk)
    patch.info["edit_s"] = seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    patch.save(path)
    return patch, seconds


class _PreScores:
    """The unedited model's scores per case: from ``pre_from``, ``pre.jsonl``, or measured now (and kept)."""

    def __init__(
        self,
        out: Path,
        known: dict[str, dict[str, Any]],
        evaluate: Evaluate,
        complete: Complete | None = None,
        prefetch: Prefetch | None = None,
        rows: int = 64,
    ) -> None:
        self.log = CaseLog(out / "pre.jsonl")
        self.known = {**known, **{k: v["pre"] for k, v in self.log.load().items()}}
        self.evaluate = evaluate
        self.complete = complete
        self.prefetch = prefetch
        self.rows = rows
        self.failed: dict[str, str] = {}  # case id -> why its unedited scores could not be measured

    def ensure(self, cases: Sequence[Any], progress: Progress) -> None:
        """Measure (on the model as it is now, which must be unedited) the cases not known yet, and complete
        known ones that lack blocks this run records (taken from an older run)."""
        if self.complete is not None:
            known = [c for c in cases if str(c.case_id) in self.known]
            stage_of = progress if len(known) > 1 else SILENT
            with stage_of.stage("completing unedited scores", total=len(known), unit="case") as stage:
                for case in known:
                    key = str(case.case_id)
                    try:
                        completed = self.complete(case, self.known[key])
                    except FactEditError as exc:
                        log.warning("case %s: evaluation failed: %s", case.case_id, exc)
                        self.failed[key] = f"evaluation failed: {exc}"
                        completed = None
                    if completed is not None and completed != self.known[key]:  # kept: a resume does not redo it
                        self.log.append({"case_id": case.case_id, "pre": completed})
                        self.known[key] = completed
                    stage.advance(1)
        todo = [c for c in cases if str(c.case_id) not in self.known and str(c.case_id) not in self.failed]
        if not todo:
            return
        with (progress if len(todo) > 1 else SILENT).stage("unedited scores", total=len(todo), unit="case") as stage:
            for case, answers, _ in _with_answers(todo, self.prefetch, self.rows):
                try:
                    scores = self.evaluate(case, False, answers)
                except FactEditError as exc:  # this case cannot be scored: it gets an error line, the run goes on
                    log.warning("case %s: evaluation failed: %s", case.case_id, exc)
                    self.failed[str(case.case_id)] = f"evaluation failed: {exc}"
                    stage.advance(1)
                    continue
                pre = {k: v for k, v in scores.items() if k not in GENERATION_KEYS}
                self.log.append({"case_id": case.case_id, "pre": pre})
                self.known[str(case.case_id)] = pre
                stage.advance(1)

    def __getitem__(self, case_id: str) -> dict[str, Any]:
        return self.known[case_id]


def run_chunks(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    method: RunMethod,
    cases: Sequence[Any],
    done: dict[str, Any],
    config: RunConfig,
    mode: dict[str, Any],
    out: Path,
    *,
    evaluate: Evaluate,
    pre_known: dict[str, dict[str, Any]],
    finished: Finished,
    base_fp: str,
    progress: Progress = SILENT,
    complete: Complete | None = None,
    capability: CapabilitySettings | None = None,
    edited_subjects: Sequence[str] = (),
    prefetch: Prefetch | None = None,
) -> None:
    """Edit and evaluate ``cases`` in chunks of ``mode['batch']``; skip the ones in ``done``. With
    ``capability``, its measures are taken on the unedited model and after each batch (or the sequence).
    ``prefetch``: greedy answers for several cases at once, used wherever many cases are scored on one
    state of the model (``evaluate`` then gets them as its third argument)."""
    pre = _PreScores(out, pre_known, evaluate, complete, prefetch, config.batch_size)
    run = _Run(model, tok, method, done, out, evaluate, pre, finished, base_fp, progress, prefetch, config.batch_size)
    probe = None
    if capability is not None:  # the model is unedited here
        probe = CapabilityProbe.build(model, tok, capability, edited_subjects or [c.request.subject for c in cases])
    capability_log = _CapabilityLog(out, probe)
    capability_log.ensure("before", model, tok, when="before", edits=0)
    chunks = _chunks(cases, mode["batch"])
    if mode["kind"] == "batch":
        _run_batches(run, chunks, capability_log)
    else:
        _run_sequence(run, chunks, config, capability_log)


class _CapabilityLog:
    """``capability.jsonl``: one record per measured state of the model, taken unless already there with
    the same settings (a run resumed, or given the measures later, measures only what it lacks)."""

    def __init__(self, out: Path, probe: CapabilityProbe | None) -> None:
        self.probe = probe
        self.log = CaseLog(out / CAPABILITY)
        self.done: set[str] = set()
        if probe is not None:
            wanted = probe.settings.describe()
            self.done = {k for k, r in self.log.load().items() if r.get("settings") == wanted}

    def missing(self, key: str) -> bool:
        return self.probe is not None and key not in self.done

    def ensure(self, key: str, model: nn.Module, tok: PreTrainedTokenizerBase, **fields: Any) -> None:
        if not self.missing(key):
            return
        self.log.append({"case_id": key, **fields, **self.probe.measure(model, tok)})
        self.done.add(key)


@dataclass
class _Run:
    """What both drivers share: the model and method, the run folder, and where results go."""

    model: nn.Module
    tok: PreTrainedTokenizerBase
    method: RunMethod
    done: dict[str, Any]
    out: Path
    evaluate: Evaluate
    pre: _PreScores
    finished: Finished
    base_fp: str
    progress: Progress
    prefetch: Prefetch | None = None
    rows: int = 64

    def parts(self) -> tuple:
        return (
            self.model,
            self.tok,
            self.method,
            self.done,
            self.out,
            self.evaluate,
            self.pre,
            self.finished,
            self.base_fp,
            self.progress,
        )


def _run_batches(run: _Run, chunks: list[list[Any]], capability: _CapabilityLog) -> None:
    model, tok, method, done, out, evaluate, pre, finished, base_fp, progress = run.parts()
    options = {"z_cache": cache_dir("memit-z")} if method.capabilities.batch else {}

    def compute(requests: list[EditRequest]) -> EditResult | None:
        return method.compute(model, tok, requests, progress=progress if len(requests) > 1 else None, **options)

    for index, chunk in enumerate(chunks):
        todo = [c for c in chunk if str(c.case_id) not in done]
        capability_key = f"chunk-{index:05d}"
        if not todo and not capability.missing(capability_key):
            continue
        pre.ensure(todo, progress)
        valid, errors = split_valid(tok, chunk, method.fact_token)
        errors.update({k: v for k, v in pre.failed.items() if k in set(_ids(chunk))})
        valid = [c for c in valid if str(c.case_id) not in errors]
        for case in todo:
            if str(case.case_id) in errors:
                finished(case, {**case_header(case), "error": errors[str(case.case_id)]})
        path = out / "patches" / f"chunk_{index:05d}.safetensors"
        patch = _load_saved(path, _ids(valid), model)
        edit_s = patch.info.get("edit_s", 0.0) if patch is not None else 0.0
        if patch is None and valid:
            try:
                patch, edit_s = _compute(compute, valid, path)
            except FactEditError as exc:  # a check the per-case validation did not foresee: the chunk fails
                log.warning("chunk %d: %s failed: %s", index, method.name, exc)
                for case in todo:
                    if str(case.case_id) not in errors:
                        finished(case, {**case_header(case), "error": f"batch edit failed: {exc}"})
                continue
        if patch is None:
            continue
        info = {**edit_info(patch), "chunk": index, "chunk_size": len(valid)}
        breakdown = patch.info.get("timings")
        breakdown = {f"chunk_{k}_s": v for k, v in breakdown.items()} if isinstance(breakdown, dict) else {}
        handle = None
        try:
            handle = patch.apply(model)
            scored = [c for c in todo if str(c.case_id) not in errors]
            for case, answers, answers_s in _with_answers(scored, run.prefetch, run.rows):
                t = time.perf_counter() - answers_s
                try:
                    post = evaluate(case, True, answers)
                except FactEditError as exc:  # this case only; the chunk's other cases are still scored
                    log.warning("case %s: evaluation failed: %s", case.case_id, exc)
                    finished(case, {**case_header(case), "error": f"evaluation failed: {exc}"})
                    continue
                finished(
                    case,
                    {
                        **case_header(case),
                        "edit": info,
                        "pre": pre[str(case.case_id)],
                        "post": post,
                        "timing": {
                            "edit_s": edit_s / len(valid),
                            "chunk_edit_s": edit_s,
                            "eval_s": time.perf_counter() - t,
                            **breakdown,
                        },
                    },
                )
            capability.ensure(capability_key, model, tok, when="after", chunk=index, edits=len(valid))
        finally:
            if handle is not None and handle.is_applied:
                handle.revert()
            method.discard()
        if model_fingerprint(model) != base_fp:
            raise FactEditError(f"chunk {index}: the model was not restored after the edit; stopping")


def _run_sequence(run: _Run, chunks: list[list[Any]], config: RunConfig, capability: _CapabilityLog) -> None:
    model, tok, method, done, out, evaluate, pre, finished, base_fp, progress = run.parts()
    all_cases = [c for chunk in chunks for c in chunk]
    todo = [c for c in all_cases if str(c.case_id) not in done]
    drift_log = CaseLog(out / "drift.jsonl")
    drift_log.load()  # drops a torn last line
    probe = capability.probe
    # steps measured before fluency (or, when asked for, the capability measures) was part of a drift point
    # are measured again
    drift_done = {int(r["step"]) for r in read_drift(out) if _drift_complete(r, probe)}
    drift_due = config.drift_steps(len(chunks))
    guard_log = _GuardLog(out, config.guard)
    if 0 in drift_due - drift_done:  # the reference: the unedited model on the cases the sequence will edit
        point = drift_point(model, tok, all_cases, 0, max_cases=config.drift_cases, probe=probe)
        drift_log.append({"case_id": 0, **point, "edits": 0})
        drift_done.add(0)
    if not todo and drift_due <= drift_done and not capability.missing("after"):
        return
    # (a finished run with drift points missing replays its saved steps to measure them)
    pre.ensure(todo, progress)  # before any edit: the model is unedited here
    guard = guard_log.guard(model, tok, all_cases, config.seed)  # built and measured on the unedited model
    # The core's sequence driver: statistics and templates of the unedited model (the run's shared
    # resources), the method's state (AlphaEdit's kept keys) and a patch stack that keeps one snapshot
    # of each touched weight (undo_depth 0: memory does not grow with the number of steps; 1 with the
    # guard, which must be able to undo the newest step).
    editor = SequentialEditor(model, tok, method.method, method.hp, resources=method.resources)
    editor.stack = PatchStack(model, undo_depth=0 if guard is None else 1)
    state = editor.state
    state_path = out / "patches" / "state.safetensors"
    saved_state_step = _state_step(state_path) if state is not None else None
    errors: dict[str, str] = {}
    step_of: dict[str, int] = {}
    patch_of: dict[int, Patch] = {}
    refused: dict[int, dict[str, Any]] = {}  # step -> the guard's record of it
    edited: list[Any] = []
    last_step = -1  # the last step applied
    recomputing = False

    def drift_at(step: int) -> None:
        """The drift point after ``step`` steps, when due: taken whatever those steps' fate (refused,
        failed, judged in an earlier session), since a step that changed nothing leaves the model as it was."""
        if step not in drift_due or step in drift_done:
            return
        point = drift_point(model, tok, edited, step, max_cases=config.drift_cases, probe=probe)
        if guard is not None:
            point["refused"] = sum(len(r["case_ids"]) for r in refused.values())
        drift_log.append({"case_id": step, **point})
        drift_done.add(step)

    try:
        with progress.stage(f"{method.name} sequence", total=len(chunks), unit="step") as steps:
            for index, chunk in enumerate(chunks):
                drift_at(index)  # after the steps before this one, whichever way each ended
                steps.advance(1)
                valid, chunk_errors = split_valid(tok, chunk, method.fact_token)
                errors.update(chunk_errors)
                errors.update({k: v for k, v in pre.failed.items() if k in set(_ids(chunk))})
                valid = [c for c in valid if str(c.case_id) not in errors]
                if not valid:
                    continue
                path = out / "patches" / f"step_{index:05d}.safetensors"
                verdict = guard_log.verdict(index, _ids(valid)) if guard is not None and not recomputing else None
                if verdict is not None and verdict["verdict"] == "refused":  # judged before: never re-applied
                    refused[index] = verdict
                    for case in valid:
                        step_of[str(case.case_id)] = index
                    continue
                patch = None
                if not recomputing and (saved_state_step is None or index <= saved_state_step):
                    patch = _load_saved(path, _ids(valid), model)  # AlphaEdit: only steps its saved state includes
                if patch is None:
                    if not recomputing and last_step >= 0 and state is not None:
                        _restore_state(state, state_path, last_step, torch.device("cpu"))  # moved per layer when used
                    recomputing = True
                    try:
                        if guard is None:
                            patch, _ = _compute(editor.step, valid, path)  # computed on the edited model, applied, kept
                        else:
                            computed: list[EditResult] = []
                            patch, _ = _compute(
                                lambda reqs, into=computed: _keep(into, compute_step(editor, reqs)), valid, path
                            )
                    except FactEditError as exc:
                        log.warning("step %d: %s failed: %s", index, method.name, exc)
                        if state is not None:
                            state.discard()
                        errors.update({str(c.case_id): f"edit failed: {exc}" for c in valid})
                        continue
                    if guard is not None:
                        judged = settle(editor, computed[-1], guard)  # applied, kept or undone
                        record = guard_log.record(index, _ids(valid), judged, patch, path)
                        if not judged.accepted:
                            refused[index] = record
                    if index not in refused:
                        _save_state(state, state_path, index)
                elif guard is not None and verdict is None:  # saved, never judged (killed in between): judge now
                    judged = guard.try_patch(model, tok, patch, editor.stack)
                    record = guard_log.record(index, _ids(valid), judged, patch, path)
                    if not judged.accepted:
                        refused[index] = record
                else:
                    editor.stack.push(patch)
                    if verdict is not None:
                        guard.accept(verdict["after"])
                for case in valid:
                    step_of[str(case.case_id)] = index
                if index not in refused:
                    last_step = index
                    edited.extend(valid)
                    patch_of[index] = patch
            drift_at(len(chunks))
        capability.ensure("after", model, tok, when="after", edits=len(edited))
        infos = {step: edit_info(p) for step, p in patch_of.items()}
        for case in todo:
            if str(case.case_id) in errors:
                finished(case, {**case_header(case), "error": errors[str(case.case_id)]})
        scored = [c for c in todo if str(c.case_id) not in errors]
        for case, answers, answers_s in _with_answers(scored, run.prefetch, run.rows):
            key = str(case.case_id)
            t = time.perf_counter() - answers_s
            step = step_of[key]
            try:
                post = evaluate(case, True, answers)
            except FactEditError as exc:  # this case only
                log.warning("case %s: evaluation failed: %s", case.case_id, exc)
                finished(case, {**case_header(case), "error": f"evaluation failed: {exc}"})
                continue
            if step in refused:  # scored on the final model, which lacks its edit: it counts as not made
                record = refused[step]
                edit = {**record.get("edit", {}), "step": step, "edits_in_model": len(edited), "refused": True}
                edit_s = record.get("edit_s", 0.0) / max(1, len(record["case_ids"]))
                guard_field = {"guard": _guard_field(record)}
            else:
                patch = patch_of[step]
                edit = {**infos[step], "step": step, "edits_in_model": len(edited)}
                edit_s = patch.info.get("edit_s", 0.0) / len(patch.info["case_ids"])
                record = guard_log.latest.get(step) if guard is not None else None
                guard_field = {"guard": _guard_field(record)} if record is not None else {}
            finished(
                case,
                {
                    **case_header(case),
                    "edit": edit,
                    **guard_field,
                    "pre": pre[key],
                    "post": post,
                    "timing": {"edit_s": edit_s, "eval_s": time.perf_counter() - t},
                },
            )
    finally:
        editor.stack.revert_all()
    if model_fingerprint(model) != base_fp:
        raise FactEditError("the model was not restored after the sequence; stopping")


def _keep(into: list[EditResult], result: EditResult | None) -> EditResult | None:
    if result is not None:
        into.append(result)
    return result


def _guard_field(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("verdict", "reasons", "step", "before", "after") if k in record}


GUARD_LOG = "guard.jsonl"


class _GuardLog:
    """``guard.jsonl``: the guard's probe and the unedited model's measures (``baseline``), then one verdict
    per judged step (``step-NNNNN``: case ids, accepted or refused with reasons, measures before and after).
    A resumed run re-applies accepted steps without measuring them again and never re-applies a refused
    one; a step judged again (its edit recomputed) counts by its last record. A refused step's patch is
    kept beside the others as ``step_NNNNN.refused.safetensors``."""

    def __init__(self, out: Path, settings: GuardSettings | None) -> None:
        self.out, self.settings = out, settings
        self.path = out / GUARD_LOG
        self.latest: dict[int, dict[str, Any]] = {}
        self.baseline: dict[str, Any] | None = None
        for record in _read_jsonl(self.path):
            if record.get("case_id") == "baseline":
                self.baseline = record
            elif isinstance(record.get("step"), int):
                self.latest[record["step"]] = record
        steps_saved = any((out / "patches").glob("step_*.safetensors"))
        if settings is None and (self.baseline is not None or self.latest):
            raise FactEditError(f"{out} is a guarded run: resume it with --guard (and the same guard settings)")
        if settings is not None:
            if self.baseline is None and steps_saved:
                raise FactEditError(
                    f"{out} was started without the guard: resume it without --guard, or use a new --out"
                )
            if self.baseline is not None and self.baseline.get("settings") != settings.describe():
                raise FactEditError(
                    f"cannot resume {out} with other guard settings (run has {self.baseline.get('settings')}, "
                    f"now {settings.describe()}); use a new --out folder"
                )

    def guard(
        self, model: nn.Module, tok: PreTrainedTokenizerBase, cases: Sequence[Any], seed: int
    ) -> EditGuard | None:
        """The run's guard, built on the unedited model; its baseline is measured once and kept."""
        if self.settings is None:
            return None
        known = self.baseline["measures"] if self.baseline is not None else None
        guard = EditGuard.build(model, tok, self.settings, cases=cases, seed=seed, baseline=known)
        if self.baseline is None:
            self.baseline = {
                "case_id": "baseline",
                "settings": self.settings.describe(),
                "probe": guard.describe(),
                "measures": guard.baseline,
            }
            CaseLog(self.path).append(self.baseline)
        return guard

    def verdict(self, step: int, case_ids: list[str]) -> dict[str, Any] | None:
        record = self.latest.get(step)
        return record if record is not None and record.get("case_ids") == case_ids else None

    def record(self, step: int, case_ids: list[str], verdict: GuardVerdict, patch: Patch, path: Path) -> dict[str, Any]:
        record = {
            "case_id": f"step-{step:05d}",
            "step": step,
            "case_ids": case_ids,
            **verdict.record(),
            "edit": edit_info(patch),
            "edit_s": patch.info.get("edit_s", 0.0),
        }
        CaseLog(self.path).append(record)
        self.latest[step] = record
        if not verdict.accepted and path.is_file():  # kept to be looked at, never loaded as a step again
            path.replace(path.with_name(path.name.replace(".safetensors", ".refused.safetensors")))
        return record


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The readable lines of a JSON-lines file, in order (a torn or broken line is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_guard(folder: str | Path) -> dict[str, Any]:
    """A guarded run's ``guard.jsonl``: its ``baseline`` record and its latest verdict per step ({} if none)."""
    records = _read_jsonl(Path(folder) / GUARD_LOG)
    if not records:
        return {}
    steps = {r["step"]: r for r in records if isinstance(r.get("step"), int)}
    return {
        "baseline": next((r for r in records if r.get("case_id") == "baseline"), None),
        "steps": [steps[k] for k in sorted(steps)],
    }


def _state_step(path: Path) -> int:
    """The step after which AlphaEdit's kept keys were saved (-1: none saved)."""
    if not path.is_file():
        return -1
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return int((fh.metadata() or {}).get("step", -1))
    except Exception:  # noqa: BLE001 - an unreadable state file is as good as none: recompute from there
        log.warning("%s is unreadable; the sequence is recomputed from its first step", path)
        return -1


def _save_state(state: MethodState | None, path: Path, step: int) -> None:
    """The method's state after ``step`` (AlphaEdit's kept keys), beside the step patches."""
    tensors = state.state_dict() if state is not None else {}
    if tensors:
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"step": str(step)})
        tmp.replace(path)


def _restore_state(state: MethodState, path: Path, step: int, device: torch.device) -> None:
    """The state after ``step``; without it a resumed sequence would forget the edits already kept."""
    saved = _state_step(path)
    if saved != step:
        raise FactEditError(f"{path} holds the state after step {saved}, not {step}: use a new --out folder")
    state.load_state_dict(load_file(str(path), device=str(device)))


def _drift_complete(record: dict[str, Any], probe: CapabilityProbe | None) -> bool:
    """Has a drift point every field this run measures?"""
    if not ("ngram_entropy" in record or "measured_cases" not in record):
        return False
    return probe is None or (record.get("capability") or {}).get("settings") == probe.settings.describe()


def drift_point(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    edited: Sequence[Any],
    step: int,
    max_cases: int = 200,
    fluency_cases: int = 5,
    seed: int = 0,
    probe: CapabilityProbe | None = None,
) -> dict[str, Any]:
    """The model after ``step`` steps, on the first ``max_cases`` edited CounterFact cases: how many
    edits still hold (new beats true on the rewrite prompt), how many neighbour prompts keep the
    true answer, and fluency: GE (n-gram entropy) of seeded samples from the first generation
    prompt of the first ``fluency_cases`` cases (the same texts' seeds at every step); with ``probe``,
    also the general-capability measures (perplexity, known facts, entropy on unrelated prompts)."""
    point = _edit_drift(model, tok, edited, step, max_cases, fluency_cases, seed)
    if probe is not None:
        point["capability"] = probe.measure(model, tok)
    return point


def _edit_drift(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    edited: Sequence[Any],
    step: int,
    max_cases: int,
    fluency_cases: int,
    seed: int,
) -> dict[str, Any]:
    from factedit.evaluation.generation import case_seed, sample_texts
    from factedit.evaluation.metrics import generation_entropy
    from factedit.predict import new_beats_true_each

    cases = [c for c in edited if isinstance(c, CounterFactCase)][:max_cases]
    if not cases:
        return {"step": step, "edits": len(edited)}
    holding = edits_holding(model, tok, [c.request for c in cases], max_requests=max_cases)

    def scored(c: CounterFactCase, prompts) -> list[tuple[str, str, str]]:
        return [(p, c.scored_request.new_text, c.scored_request.true_text) for p in prompts]

    kept = [
        not x
        for x in new_beats_true_each(model, tok, [i for c in cases for i in scored(c, c.neighborhood_prompts[:2])])
    ]
    paraphrased = new_beats_true_each(model, tok, [i for c in cases for i in scored(c, c.paraphrase_prompts)])
    texts = [
        sample_texts(model, tok, [c.generation_prompts[0]], seed=case_seed(seed, c.case_id))[0]
        for c in cases[:fluency_cases]
        if c.generation_prompts
    ]
    return {
        "step": step,
        "edits": len(edited),
        "measured_cases": len(cases),
        "edits_holding": holding["edits_holding"],
        "paraphrases_holding": sum(paraphrased) / len(paraphrased) if paraphrased else None,
        "neighbourhood_kept": sum(kept) / max(1, len(kept)),
        "ngram_entropy": generation_entropy(texts),
        "fluency_cases": len(texts),
    }


def read_drift(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / "drift.jsonl"
    if not path.is_file():
        return []
    latest = {}  # a step measured again (resumed run, newer fields) counts once: its last record
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[record["step"]] = record
    return [latest[k] for k in sorted(latest)]
