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
* ``drift.jsonl`` (sequential, CounterFact, with ``drift_every``): after every k-th step, how many of
  the edits made so far still hold and how neighbourhood prompts and fluency drift.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from factedit.data.counterfact import CounterFactCase
from factedit.editing.memit import key_text
from factedit.editing.patch import Patch
from factedit.errors import FactEditError
from factedit.evaluation.runner import GENERATION_KEYS, CaseLog, RunConfig, case_header, edit_info
from factedit.models.architectures import get_parameter
from factedit.models.fingerprint import model_fingerprint
from factedit.paths import cache_dir
from factedit.text import encode_with_subject, target_ids

log = logging.getLogger(__name__)

Evaluate = Callable[[Any, bool], dict[str, Any]]
Finished = Callable[[Any, dict[str, Any]], None]


def _chunks(cases: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(cases[i : i + size]) for i in range(0, len(cases), size)]


def _ids(chunk: Sequence[Any]) -> list[str]:
    return [str(c.case_id) for c in chunk]


def split_valid(tok: PreTrainedTokenizerBase, chunk: Sequence[Any],
                fact_token: str = "subject_last") -> tuple[list[Any], dict[str, str]]:
    """Cases whose request can be edited in one batch, and an error message for each other case.

    MEMIT's rule (``check_batch``): requests whose keys are read from the same text must share
    their target; a later case that asks for another target is refused (the first one is
    edited), so a batch is never half-applied.
    """
    valid, errors = [], {}
    first: dict[str, Any] = {}
    for case in chunk:
        req = case.request
        try:
            encode_with_subject(tok, req.prompt, req.subject)
            target_ids(tok, req.text, req.target_new)
        except FactEditError as exc:
            errors[str(case.case_id)] = str(exc)
            continue
        key = key_text(req, fact_token)
        if key in first and first[key].request.target_new.strip() != req.target_new.strip():
            other = first[key].request
            errors[str(case.case_id)] = (f"conflicts with case {first[key].case_id} in the same batch: same key text "
                                         f"{key!r} ({req.text!r} -> {req.target_new!r} vs {other.text!r} -> "
                                         f"{other.target_new!r})")
            continue
        first.setdefault(key, case)
        valid.append(case)
    return valid, errors


def _fact_token(method: Any) -> str:
    return getattr(getattr(method, "hp", None), "fact_token", "subject_last")


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


def _compute(method, model, tok, chunk: list[Any], path: Path, progress: bool,
             z_cache: Path | None = None) -> tuple[Patch, float]:
    requests = [c.request for c in chunk]
    t = time.perf_counter()
    if hasattr(method, "compute_batch"):
        patch = method.compute_batch(model, tok, requests, progress=progress and len(requests) > 1, z_cache=z_cache)
    elif len(requests) == 1:
        patch = method.compute(model, tok, requests[0])
    else:
        raise FactEditError(f"{method.name} edits one request at a time")
    seconds = time.perf_counter() - t
    patch.info["case_ids"] = _ids(chunk)
    patch.info["edit_s"] = seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    patch.save(path)
    return patch, seconds


class _PreScores:
    """The unedited model's scores per case: from ``pre_from``, ``pre.jsonl``, or measured now (and kept)."""

    def __init__(self, out: Path, known: dict[str, dict[str, Any]], evaluate: Evaluate) -> None:
        self.log = CaseLog(out / "pre.jsonl")
        self.known = {**known, **{k: v["pre"] for k, v in self.log.load().items()}}
        self.evaluate = evaluate

    def ensure(self, cases: Sequence[Any], progress: bool) -> None:
        """Measure (on the model as it is now, which must be unedited) the cases not known yet."""
        todo = [c for c in cases if str(c.case_id) not in self.known]
        for case in tqdm(todo, desc="unedited scores", unit="case", disable=not progress or len(todo) < 2):
            pre = {k: v for k, v in self.evaluate(case, False).items() if k not in GENERATION_KEYS}
            self.log.append({"case_id": case.case_id, "pre": pre})
            self.known[str(case.case_id)] = pre

    def __getitem__(self, case_id: str) -> dict[str, Any]:
        return self.known[case_id]


def run_chunks(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    method,
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
    progress: bool = True,
) -> None:
    """Edit and evaluate ``cases`` in chunks of ``mode['batch']``; skip the ones in ``done``."""
    pre = _PreScores(out, pre_known, evaluate)
    chunks = _chunks(cases, mode["batch"])
    if mode["kind"] == "batch":
        _run_batches(model, tok, method, chunks, done, out, evaluate, pre, finished, base_fp, progress)
    else:
        _run_sequence(model, tok, method, chunks, done, config, out, evaluate, pre, finished, base_fp, progress)


def _run_batches(model, tok, method, chunks, done, out: Path, evaluate: Evaluate, pre: _PreScores,
                 finished: Finished, base_fp: str, progress: bool) -> None:
    for index, chunk in enumerate(chunks):
        todo = [c for c in chunk if str(c.case_id) not in done]
        if not todo:
            continue
        pre.ensure(todo, progress)
        valid, errors = split_valid(tok, chunk, _fact_token(method))
        for case in todo:
            if str(case.case_id) in errors:
                finished(case, {**case_header(case), "error": errors[str(case.case_id)]})
        path = out / "patches" / f"chunk_{index:05d}.safetensors"
        patch = _load_saved(path, _ids(valid), model)
        edit_s = patch.info.get("edit_s", 0.0) if patch is not None else 0.0
        if patch is None and valid:
            try:
                patch, edit_s = _compute(method, model, tok, valid, path, progress, z_cache=cache_dir("memit-z"))
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
        try:
            patch.apply(model)
            for case in todo:
                if str(case.case_id) in errors:
                    continue
                t = time.perf_counter()
                post = evaluate(case, True)
                finished(case, {**case_header(case), "edit": info, "pre": pre[str(case.case_id)], "post": post,
                                "timing": {"edit_s": edit_s / len(valid), "chunk_edit_s": edit_s,
                                           "eval_s": time.perf_counter() - t, **breakdown}})
        finally:
            if patch.is_applied(model):
                patch.revert(model)
            if hasattr(method, "discard"):
                method.discard()
        if model_fingerprint(model) != base_fp:
            raise FactEditError(f"chunk {index}: the model was not restored after the edit; stopping")


def _run_sequence(model, tok, method, chunks, done, config: RunConfig, out: Path, evaluate: Evaluate,
                  pre: _PreScores, finished: Finished, base_fp: str, progress: bool) -> None:
    all_cases = [c for chunk in chunks for c in chunk]
    todo = [c for c in all_cases if str(c.case_id) not in done]
    drift_log = CaseLog(out / "drift.jsonl")
    drift_log.load()  # drops a torn last line
    # steps measured before fluency was part of a drift point are measured again
    drift_done = {int(r["step"]) for r in read_drift(out) if "ngram_entropy" in r or "measured_cases" not in r}
    drift_due = {0, *range(config.drift_every, len(chunks) + 1, config.drift_every)} if config.drift_every else set()
    if 0 in drift_due - drift_done:  # the reference: the unedited model on the cases the sequence will edit
        drift_log.append({"case_id": 0, **drift_point(model, tok, all_cases, 0), "edits": 0})
        drift_done.add(0)
    if not todo and drift_due <= drift_done:
        return
    # (a finished run with drift points missing replays its saved steps to measure them)
    pre.ensure(todo, progress)  # before any edit: the model is unedited here
    state_path = out / "patches" / "state.safetensors"
    saved_state_step = _state_step(state_path) if _has_state(method) else None
    # One snapshot of every weight a step changes, taken before its first change: the sequence is
    # undone from it, so the patches need not each keep a copy of the weights (1,000 steps would).
    snapshot: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    step_of: dict[str, int] = {}
    patch_of: dict[int, Patch] = {}
    edited: list[Any] = []
    last_step = -1  # the last step applied
    recomputing = False
    try:
        for index, chunk in enumerate(tqdm(chunks, desc=f"{method.name} sequence", unit="step",
                                           disable=not progress or len(chunks) < 2)):
            valid, chunk_errors = split_valid(tok, chunk, _fact_token(method))
            errors.update(chunk_errors)
            if not valid:
                continue
            path = out / "patches" / f"step_{index:05d}.safetensors"
            patch = None
            if not recomputing and (saved_state_step is None or index <= saved_state_step):
                patch = _load_saved(path, _ids(valid), model)  # AlphaEdit: only steps its saved state includes
            if patch is None:
                if not recomputing and last_step >= 0 and _has_state(method):
                    _restore_state(method, state_path, last_step, next(model.parameters()).device)
                recomputing = True
                try:
                    patch, _ = _compute(method, model, tok, valid, path, progress=False)
                except FactEditError as exc:
                    log.warning("step %d: %s failed: %s", index, method.name, exc)
                    errors.update({str(c.case_id): f"edit failed: {exc}" for c in valid})
                    continue
                _apply_kept(patch, model, snapshot)
                if hasattr(method, "commit"):
                    method.commit()
                _save_state(method, state_path, index)
            else:
                _apply_kept(patch, model, snapshot)
            last_step = index
            edited.extend(valid)
            for case in valid:
                step_of[str(case.case_id)] = index
            patch_of[index] = patch
            if config.drift_every and (index + 1) % config.drift_every == 0 and index + 1 not in drift_done:
                drift_log.append({"case_id": index + 1, **drift_point(model, tok, edited, index + 1)})
        infos = {step: edit_info(p) for step, p in patch_of.items()}
        for case in tqdm(todo, desc="evaluating edited model", unit="case", disable=not progress):
            key = str(case.case_id)
            if key in errors:
                finished(case, {**case_header(case), "error": errors[key]})
                continue
            t = time.perf_counter()
            patch = patch_of[step_of[key]]
            finished(case, {**case_header(case),
                            "edit": {**infos[step_of[key]], "step": step_of[key], "edits_in_model": len(edited)},
                            "pre": pre[key], "post": evaluate(case, True),
                            "timing": {"edit_s": patch.info.get("edit_s", 0.0) / len(patch.info["case_ids"]),
                                       "eval_s": time.perf_counter() - t}})
    finally:
        with torch.no_grad():
            for name, original in snapshot.items():
                get_parameter(model, name).copy_(original)
    if model_fingerprint(model) != base_fp:
        raise FactEditError("the model was not restored after the sequence; stopping")


def _apply_kept(patch: Patch, model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Apply a step for good: first snapshot the weights it is the first to touch."""
    for entry in patch.entries:
        if entry.name not in snapshot:
            snapshot[entry.name] = get_parameter(model, entry.name).detach().clone()
    patch.apply(model)
    patch.release(model)


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


def _has_state(method) -> bool:
    return getattr(method, "state", None) is not None


def _save_state(method, path: Path, step: int) -> None:
    tensors = method.state_tensors() if hasattr(method, "state_tensors") else {}
    if tensors:
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"step": str(step)})
        tmp.replace(path)


def _restore_state(method, path: Path, step: int, device: torch.device) -> None:
    """AlphaEdit's kept keys after ``step``; without them a resumed sequence would forget earlier edits."""
    saved = _state_step(path)
    if saved != step:
        raise FactEditError(f"{path} holds the state after step {saved}, not {step}: use a new --out folder")
    method.load_state_tensors(load_file(str(path), device=str(device)))


def drift_point(model: nn.Module, tok: PreTrainedTokenizerBase, edited: Sequence[Any], step: int,
                max_cases: int = 200, fluency_cases: int = 5, seed: int = 0) -> dict[str, Any]:
    """The model after ``step`` steps, on the first ``max_cases`` edited CounterFact cases: how many
    edits still hold (new beats true on the rewrite prompt), how many neighbour prompts keep the
    true answer, and fluency: GE (n-gram entropy) of seeded samples from the first generation
    prompt of the first ``fluency_cases`` cases (the same texts' seeds at every step)."""
    from factedit.evaluation.generation import case_seed, sample_texts
    from factedit.evaluation.metrics import generation_entropy
    from factedit.predict import new_beats_true

    cases = [c for c in edited if isinstance(c, CounterFactCase)][:max_cases]
    if not cases:
        return {"step": step, "edits": len(edited)}
    held = sum(new_beats_true(model, tok, [c.request.text], c.request.new_text, c.request.true_text)[0]
               for c in cases)
    kept = [not x for c in cases for x in new_beats_true(model, tok, list(c.neighborhood_prompts[:2]),
                                                         c.request.new_text, c.request.true_text)]
    texts = [sample_texts(model, tok, [c.generation_prompts[0]], seed=case_seed(seed, c.case_id))[0]
             for c in cases[:fluency_cases] if c.generation_prompts]
    return {"step": step, "edits": len(edited), "measured_cases": len(cases),
            "edits_holding": held / len(cases), "neighbourhood_kept": sum(kept) / max(1, len(kept)),
            "ngram_entropy": generation_entropy(texts), "fluency_cases": len(texts)}


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
