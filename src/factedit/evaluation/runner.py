"""Resumable evaluation runs: edit each case from the unedited model, evaluate, revert, append one line.

A run folder holds ``manifest.json`` (model fingerprint, method and hyper-parameters, data
file hash, seeds, generation settings, library versions) and ``cases.jsonl`` (one JSON
line per finished case, written with a single ``write`` followed by flush + fsync). A killed
run is resumed by running the same command again: finished case ids are skipped, a torn last
line (the process died mid-write) is cut off and that case is redone, so no case is lost or
duplicated. A resumed run must match the manifest (same model weights, method, hyper-parameters,
data and seeds); ``n`` may grow, to extend a run.

Three ways to edit (``RunConfig.batch`` / ``sequential``):

* each case alone (the default, ROME's protocol): edit from the unedited model, evaluate, revert;
* ``batch=B``: MEMIT's protocol, chunks of B cases edited at once from the unedited model, every
  case of the chunk evaluated on the edited model, then reverted (``batch=1000`` = one batch of
  1,000 edits);
* ``sequential=True``: chunks of B (default 1) applied one after another, each computed on the
  already edited model; every case is evaluated once all edits are in.

Batch and sequential runs save each chunk's patch under ``patches/`` as soon as it is computed,
so a resumed run re-applies them instead of recomputing (and AlphaEdit's kept keys beside them).
The unedited model's scores (``pre``) may be taken from an earlier run of the same model and data
(``pre_from``), since they do not depend on the method.

Several processes (``torchrun ... -m factedit eval ...``, :mod:`factedit.distributed`): the cases still to do
are shared out by rank (whole groups of ``group``, in data-set order: rank ``r`` takes every ``world``-th),
each rank appends to its own log ``cases.rank<r>.jsonl`` in the same folder, and a case's line is the
line one process would write (the same edit from the same unedited model). Rank 0 checks and writes the
manifest (which records the world size), repairs torn lines and decides what is done, from all the logs,
so a run resumes per rank and after a change of world size (alone or on any number of processes). A rank
that fails ends the run (torchrun stops the others); every line written before is kept: run again to
resume. Batch and sequential runs are not shared out (their chunks depend on one another's saved state).
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit import distributed
from factedit.data import load_dataset
from factedit.data.counterfact import CounterFactCase
from factedit.editing.methods import batch_method_names
from factedit.errors import FactEditError
from factedit.evaluation.batched import run_chunks
from factedit.evaluation.cases import (
    GENERATIVE_KEYS,
    GenerationSettings,
    GenerativeSettings,
    answer_slices,
    evaluate_counterfact,
    evaluate_zsre,
    extra_scores,
    prefetch_answers,
)
from factedit.evaluation.config import RunConfig, RunReport
from factedit.evaluation.edits import RunMethod
from factedit.evaluation.records import (
    GENERATION_KEYS,
    MANIFEST,
    CaseLog,
    case_header,
    case_log_name,
    case_logs,
    edit_info,
    read_cases,
    read_manifest,
)
from factedit.evaluation.reference import reference_texts
from factedit.models.chat import prompt_format
from factedit.models.fingerprint import model_fingerprint, model_identity
from factedit.models.placement import device_map_of
from factedit.paths import atomic_write_bytes, check_output_path
from factedit.progress import Progress, as_progress
from factedit.version import __version__

log = logging.getLogger(__name__)

FORMAT = "factedit-eval-run-v1"


@contextlib.contextmanager
def _run_lock(folder: Path, rank: int = 0) -> Iterator[None]:
    """Refuse two runs writing the same run folder: one process, or rank 0 of several, holds ``.lock``
    (so a second run of either kind is refused); the other ranks hold one lock each beside it."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    fh = open(folder / (".lock" if rank == 0 else f".lock.rank{rank}"), "w")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError:
            locked = False
        distributed.agree(locked, f"run folder {folder} is in use by another process", "locking the run folder")
        yield
    finally:
        fh.close()


# -- manifest -----------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import numpy
    import transformers

    return {
        "factedit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# fields of the manifest that must be equal for a resumed run
_MUST_MATCH = (
    "method",
    "hparams",
    "model.fingerprint",
    "dataset.name",
    "dataset.sha256",
    "dataset.format",
    "selection.start",
    "generation",
    "seeds",
    "reference",
    "mode",
    "prompts",
    "extra_metrics",
)


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _check_resumable(
    old: dict[str, Any], new: dict[str, Any], folder: Path, hparams_defaults: dict[str, Any] | None = None
) -> None:
    if old.get("format") != FORMAT:
        raise FactEditError(f"{folder}/{MANIFEST} has format {old.get('format')!r}, expected {FORMAT}")
    old = {"mode": {"kind": "single"}, **old}  # runs made before batch/sequential modes existed
    if isinstance(old.get("hparams"), dict) and hparams_defaults:
        # settings added since the run began: it was made with their defaults
        added = {k: v for k, v in hparams_defaults.items() if k not in old["hparams"] and k in new.get("hparams", {})}
        old["hparams"] = {**added, **old["hparams"]}
    diffs = [
        k for k in _MUST_MATCH if json.dumps(_get(old, k), sort_keys=True) != json.dumps(_get(new, k), sort_keys=True)
    ]
    if _get(new, "mode.kind") in ("batch", "sequential") and _get(old, "selection.n") != _get(new, "selection.n"):
        # the chunks (and, in a sequence, the edits in the model when a case is scored) depend on n
        diffs.append("selection.n")
    if diffs:
        detail = "; ".join(f"{k}: run has {_get(old, k)!r}, now {_get(new, k)!r}" for k in diffs)
        raise FactEditError(
            f"cannot resume {folder}: the run was made with other settings ({detail}); use a new --out folder"
        )


# -- the run ------------------------------------------------------------------------------------------------
def run_evaluation(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    config: RunConfig,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    on_case: Callable[[str, dict[str, Any]], None] | None = None,
    progress: Progress | bool | None = True,
) -> RunReport:
    """Evaluate ``config.method`` on ``config.n`` cases, resuming whatever ``out_dir`` already holds.

    ``on_case(case_id, record)`` is called after each case's line is safely on disk. ``progress`` (an
    adapter, or ``True`` for bars on stderr) gets a stage "evaluating" counting the cases, plus the
    stages of statistics, templates and batch edits.
    """
    started = time.perf_counter()
    progress = as_progress(progress)
    # Everything that can be wrong with the settings, the data, the hyper-parameters or the run folder is
    # refused here, before the folder is created and before any work.
    config.check()
    out = check_output_path(out_dir, "run folder")
    if config.pre_from:
        read_manifest(config.pre_from)
    dataset = load_dataset(
        config.dataset,
        config.data_path,
        n=config.n,
        start=config.start,
        target=config.zsre_target,
        download=config.download,
    )
    if dataset.skipped:
        log.warning(
            "%d malformed record(s) of %s are skipped (listed with their reasons in the manifest)",
            len(dataset.skipped),
            dataset.path,
        )
    formats = {
        role: prompt_format(tok, name, model_name or "this model")
        for role, name in (("edit", config.prompts_edit), ("eval", config.prompts_eval))
    }
    if any(formats.values()):
        dataset.cases = [case.in_formats(formats["edit"], formats["eval"]) for case in dataset.cases]
    method = RunMethod(model, tok, config.method, config.hparams, config.overrides or None, progress=progress)
    mode = _mode(config, method)
    distributed.init(next(model.parameters()).device)  # joins the ranks when started by torchrun; else nothing
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1 and mode["kind"] != "single":
        raise FactEditError(
            f"{mode['kind']} runs are not shared between processes (each chunk depends on saved state): "
            "run them in one process, or drop --batch/--sequential"
        )
    extras, generative = _extra_settings(config, out)
    capability = config.capability_settings()
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    with _run_lock(out, rank):
        # generation metrics (slow) only for the first gen_cases cases, when limited
        gen_ids = (
            None if config.gen_cases is None else frozenset(str(c.case_id) for c in dataset.cases[: config.gen_cases])
        )
        method.prepare()
        hparams = method.manifest_hparams()
        base_fp = model_fingerprint(model)
        reference = None
        gen = None
        if config.generation:
            gen = GenerationSettings(
                n_gen=config.n_gen,
                max_out_len=config.max_out_len,
                top_k=config.top_k,
                seed=config.seed,
                n_cases=config.gen_cases,
            )
            reference = reference_texts(config.reference_corpus, config.reference_max_texts)
        param = next(model.parameters())
        manifest = {
            "format": FORMAT,
            "method": method.name,
            "hparams": hparams,
            "model": {
                "name": model_name,
                "fingerprint": base_fp,
                "identity": model_identity(model),
                "dtype": str(param.dtype),
                "device": device_map_of(model) or str(param.device),
                "family": getattr(model.config, "model_type", None),
            },
            "dataset": {k: v for k, v in dataset.describe().items() if k not in ("n_cases",)},
            "selection": {
                "start": config.start,
                "n": config.n,
                "n_cases": len(dataset),
                "skipped_records": len(dataset.skipped),  # malformed records left out: dataset.skipped says why
            },
            # n_cases appears only when set, so runs made before it existed still resume
            "generation": {k: v for k, v in asdict(gen).items() if k != "n_cases" or v is not None} if gen else None,
            "reference": {k: v for k, v in reference.describe().items() if k != "note"} if reference else None,
            "seeds": {"generation": config.seed, "template_seed": hparams.get("template_seed")},
            "config": asdict(config),
            "versions": _versions(),
            "mode": mode,
            # absent (None) for raw/raw, so runs made before chat prompts existed still resume
            "prompts": _prompts_manifest(config, formats),
            # EasyEdit's token accuracies and WILD's generative metrics; absent (None) in runs made before them
            "extra_metrics": {"easyedit": True, "generative": asdict(generative) if generative else None}
            if extras
            else None,
            "capability": capability.describe() if capability else None,
            "torch_threads": torch.get_num_threads(),
            "world_size": world,  # processes that share the cases (each rank its own cases.rank<r>.jsonl)
            "notes": _notes(config, reference, extras, generative),
        }
        if world > 1:
            _check_same_run(manifest)
        defaults = method.hparams_defaults()
        done = distributed.on_main(lambda: _start(out, manifest, defaults), "checking and writing the run's manifest")
        distributed.agree(
            (out / MANIFEST).is_file(),
            f"rank {rank} does not see the run folder {out} rank 0 wrote: with several machines it must be on "
            "a shared file system",
            "checking the run folder is shared",
        )
        # a full run's ``done`` is everything: the records themselves stay on disk (a rank never needs them)
        done = {key: {} for key in done} if isinstance(done, list) else done
        caselog = CaseLog(out / case_log_name(rank if world > 1 else None))
        todo = [c for c in dataset.cases if str(c.case_id) not in done]
        already = len(dataset) - len(todo)
        if already and distributed.is_main():
            log.info("resuming %s: %d of %d cases already done", out, already, len(dataset))
        errors = 0
        evaluated = 0
        if world > 1:
            groups = distributed.shard(list(_groups(dataset.cases, todo, _group_size(config, method))))
            mine = [case for group in groups for case in group]
            log.info("rank %d of %d: %d of the %d cases still to do", rank, world, len(mine), len(todo))
            stage = progress.stage(f"evaluating (rank {rank} of {world})", total=len(mine), unit="case")
        else:
            mine = todo
            stage = progress.stage("evaluating", total=len(dataset), unit="case")
            if already:
                stage.advance(already)

        def finished(case, record: dict[str, Any]) -> None:
            nonlocal errors, evaluated
            errors += "error" in record
            evaluated += 1
            caselog.append(record)
            stage.advance(1, errors=errors)
            if on_case is not None:
                on_case(str(case.case_id), record)

        try:
            with distributed.independent():  # ranks are at different cases: nothing waits for the others
                pre_known = _read_pre(config.pre_from, manifest) if config.pre_from else {}

                def complete(case, pre: dict[str, Any]) -> dict[str, Any]:
                    """Unedited scores of an earlier run completed with the blocks it lacks (unedited model)."""
                    if not extras:
                        return pre
                    more = extra_scores(model, tok, case, generative, batch_size=config.batch_size, have=pre)
                    return {**pre, **more} if more else pre

                def score(case, with_generation: bool, answers: dict | None = None) -> dict[str, Any]:
                    """A case's scores on the model as it is now (the one call every protocol makes)."""
                    return _evaluate(
                        model,
                        tok,
                        case,
                        config,
                        gen,
                        reference,
                        with_generation,
                        gen_ids,
                        extras=extras,
                        generative=generative,
                        answers=answers,
                    )

                def prefetch(cases: list) -> dict:
                    """Greedy answers of ``cases`` on the model as it is now, batched across them."""
                    if not (extras and generative) or len(cases) < 2:
                        return {}
                    return prefetch_answers(model, tok, cases, generative, batch_size=config.batch_size)

                if mode["kind"] == "single":
                    each = method.capabilities.each
                    if config.group > 1 and method.name != "none" and not each and distributed.is_main():
                        log.warning("%s computes one edit at a time; group=%d is ignored", method.name, config.group)
                    # the unedited model is the same for every case: its greedy answers are batched across cases
                    groups = (
                        answer_slices(mine, config.batch_size)
                        if method.name == "none"
                        else _groups(dataset.cases, mine, _group_size(config, method))
                    )
                    for group in groups:
                        edits = (
                            _compute_each(model, tok, method, group) if len(group) > 1 and method.name != "none" else {}
                        )
                        answers = prefetch(group) if method.name == "none" else {}
                        for case in group:
                            finished(
                                case,
                                _evaluate_case(
                                    model,
                                    tok,
                                    method,
                                    case,
                                    score,
                                    base_fp,
                                    pre_known.get(str(case.case_id)),
                                    edits.get(str(case.case_id)),
                                    complete=complete,
                                    answers=answers,
                                ),
                            )
                else:
                    run_chunks(
                        model,
                        tok,
                        method,
                        dataset.cases,
                        done,
                        config,
                        mode,
                        out,
                        evaluate=score,
                        prefetch=prefetch,
                        pre_known=pre_known,
                        complete=complete,
                        capability=capability,
                        edited_subjects=[c.request.subject for c in dataset.cases],
                        finished=finished,
                        base_fp=base_fp,
                        progress=progress,
                    )
        finally:
            stage.close()
        if world > 1:  # every rank reports the whole run, once all are done
            counts = distributed.all_gather_objects((evaluated, errors), "waiting for the other ranks to finish")
            evaluated, errors = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return RunReport(
        out_dir=out,
        total=len(dataset),
        already_done=already,
        evaluated=len(todo) if world == 1 else evaluated,
        errors=errors,
        seconds=time.perf_counter() - started,
        skipped=len(dataset.skipped),
    )


def _start(
    out: Path, manifest: dict[str, Any], hparams_defaults: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]] | list[str]:
    """Check a resumed run's manifest, write the manifest, repair torn lines of every log and read what
    is done (one process, or rank 0 of several while the others wait: nobody writes meanwhile).

    Several processes get the ids only (a list; they need to know what to skip, not the records)."""
    path = out / MANIFEST
    if path.is_file():
        old = read_manifest(out)
        _check_resumable(old, manifest, out, hparams_defaults)
        manifest["created"] = old.get("created")
        if old.get("world_size", 1) != manifest["world_size"]:
            log.info(
                "resuming %s on %d process(es); it ran on %d before",
                out,
                manifest["world_size"],
                old.get("world_size", 1),
            )
    else:
        manifest["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    manifest["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    atomic_write_bytes(path, json.dumps(manifest, indent=1, ensure_ascii=False).encode())
    logs = case_logs(out)
    if len(logs) > 1:
        log.info("%s: reading %d case logs (%s)", out, len(logs), ", ".join(p.name for p in logs))
    done = read_cases(out, repair=True)
    return list(done) if manifest["world_size"] > 1 else done


def _check_same_run(manifest: dict[str, Any]) -> None:
    """Every rank must run the same evaluation: same weights, method, data and settings as rank 0."""
    mine = {k: _get(manifest, k) for k in _MUST_MATCH + ("selection.n",)}
    views = distributed.all_gather_objects(mine, "comparing the ranks' settings")
    for other, view in enumerate(views):
        diffs = [k for k in mine if json.dumps(view[k], sort_keys=True) != json.dumps(views[0][k], sort_keys=True)]
        if diffs:
            raise FactEditError(
                f"rank {other} runs another evaluation than rank 0 ({', '.join(diffs)} differ): "
                "start every rank with the same model, data and options"
            )


def _group_size(config: RunConfig, method: RunMethod) -> int:
    """Cases computed together (``group``), for methods that compute independent edits at once."""
    return config.group if method.capabilities.each else 1


def _prompts_manifest(config: RunConfig, formats: dict[str, Any]) -> dict[str, Any] | None:
    """How prompts were given to the model: the format of edits and of evaluation, and the chat text."""
    if not any(formats.values()):
        return None
    chat = next(f for f in formats.values() if f is not None)
    return {
        "edit": config.prompts_edit,
        "eval": config.prompts_eval,
        "chat": {"before": chat.before, "after": chat.after},
    }


def _mode(config: RunConfig, method: RunMethod) -> dict[str, Any]:
    """How cases are edited; part of the manifest, so a resumed run cannot switch protocol (the settings
    themselves were checked by :meth:`RunConfig.check`)."""
    if config.batch is None and not config.sequential:
        return {"kind": "single"}
    if method.name == "none":
        raise FactEditError("method 'none' makes no edits: --batch and --sequential do not apply")
    size = config.batch or 1
    if config.sequential and not method.capabilities.sequential:
        raise FactEditError(f"{method.name} cannot edit in sequence")
    if size > 1 and not method.capabilities.batch:
        raise FactEditError(
            f"{method.name} edits one request at a time: use --batch 1 (with --sequential) "
            f"or a batch method ({', '.join(batch_method_names())})"
        )
    return {"kind": "sequential" if config.sequential else "batch", "batch": size}


def _groups(cases: list, todo: list, size: int) -> Iterator[list]:
    """``todo`` in groups of at most ``size`` by position in the data set, so that a resumed run groups the
    cases it still has to do as an uninterrupted run would have (when a group was not cut in half)."""
    position = {str(c.case_id): i for i, c in enumerate(cases)}
    group: list = []
    for case in todo:
        if group and position[str(case.case_id)] // size != position[str(group[0].case_id)] // size:
            yield group
            group = []
        group.append(case)
    if group:
        yield group


def _compute_each(model, tok, method: RunMethod, cases: list) -> dict[str, tuple[Any, float, int]]:
    """Independent edits of ``cases`` computed together: ``{case_id: (patch, seconds per case, group size)}``.

    A group with a request that cannot be edited is left to the one-at-a-time path, which reports
    that case's error and edits the others."""
    started = time.perf_counter()
    try:
        patches = method.compute_each(model, tok, [c.request for c in cases])
    except (FactEditError, torch.OutOfMemoryError) as exc:
        log.info("computing %d edits together failed (%s); computing them one at a time", len(cases), exc)
        return {}
    seconds = (time.perf_counter() - started) / len(cases)
    return {str(c.case_id): (p, seconds, len(cases)) for c, p in zip(cases, patches)}


def _read_pre(folder: str, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``pre`` scores of another run of the same model weights, data file and selection start."""
    other = read_manifest(folder)
    for key in ("model.fingerprint", "dataset.name", "dataset.sha256", "dataset.format"):
        if _get(other, key) != _get(manifest, key):
            raise FactEditError(
                f"--pre-from {folder}: its {key} ({_get(other, key)!r}) differs from this run's "
                f"({_get(manifest, key)!r}); its unedited scores cannot be reused"
            )
    cases = read_cases(folder)
    pre = {k: v["pre"] for k, v in cases.items() if "pre" in v}
    ours, theirs = _get(manifest, "extra_metrics.generative"), _get(other, "extra_metrics.generative")
    if ours is not None and theirs != ours:  # greedy answers made with other settings are measured again
        pre = {k: {n: v for n, v in block.items() if n not in GENERATIVE_KEYS} for k, block in pre.items()}
    return pre


def _extra_settings(config: RunConfig, out: Path) -> tuple[bool, GenerativeSettings | None]:
    """Whether the run records EasyEdit's and WILD's blocks, and WILD's settings. A run folder made before
    they existed keeps its protocol when resumed (its cases stay comparable with each other)."""
    generative = GenerativeSettings(max_new_tokens=config.answer_tokens) if config.generative else None
    if (out / MANIFEST).is_file():
        try:
            old = read_manifest(out)
        except FactEditError:
            return True, generative  # the resume check says what is wrong with it
        # absent in runs made before the metrics, None once such a run has been resumed
        if old.get("format") == FORMAT and old.get("extra_metrics") is None:
            log.info(
                "%s was started before the EasyEdit and generative metrics existed: they stay off for this run "
                "(use a new --out folder to get them)",
                out,
            )
            return False, None
    return True, generative


def _evaluate(
    model,
    tok,
    case,
    config: RunConfig,
    gen,
    reference,
    with_generation: bool,
    gen_ids: frozenset[str] | None = None,
    *,
    extras: bool = False,
    generative: GenerativeSettings | None = None,
    answers: dict | None = None,
) -> dict[str, Any]:
    if gen_ids is not None and str(case.case_id) not in gen_ids:
        with_generation = False
    if isinstance(case, CounterFactCase):
        return evaluate_counterfact(
            model,
            tok,
            case,
            generation=gen if with_generation else None,
            reference=reference,
            batch_size=config.batch_size,
            generative=generative,
            extras=extras,
            answers=answers,
        )
    return evaluate_zsre(
        model, tok, case, batch_size=config.batch_size, generative=generative, extras=extras, answers=answers
    )


def _notes(
    config: RunConfig, reference, extras: bool = False, generative: GenerativeSettings | None = None
) -> list[str]:
    notes = []
    if generative is not None:
        notes.append(
            f"Gen ES/PS/NS: WILD protocol (arXiv 2502.11177): greedy answer of at most {generative.max_new_tokens} "
            "tokens cut at its first sentence end; success when its SQuAD-normalised words contain the expected "
            "answer and not the competing one (WILD's LLM judge is not used)"
        )
    if extras:
        notes.append(
            "EE rel/gen/loc: EasyEdit's teacher-forced token accuracies (locality: argmax tokens unchanged "
            "by the edit on the neighbourhood prompts)"
        )
    if config.generation:
        notes.append(
            "generation metrics are computed on the edited model only ('post'); the unedited model's "
            "come from a run with method 'none' (same seeds, so the same samples)"
        )
        notes.append(reference.note())
        notes.append("n-gram entropy uses a regex word tokenizer approximating NLTK's word_tokenize")
        if config.gen_cases is not None:
            notes.append(
                f"GE and RS are measured on the run's first {config.gen_cases} cases only (to save time); "
                "the other metrics on all"
            )
    if config.dataset == "zsre":
        origin = " (as ROME/MEMIT)" if config.zsre_target == "answers" else ""
        notes.append(f"zsRE new target = {config.zsre_target}{origin}")
    return notes


def _failed_case(record: dict[str, Any], case, stage: str, exc: Exception) -> dict[str, Any]:
    """The line of a case that could not be edited or evaluated: logged, recorded with its reason, and the
    run goes on (the summaries leave such cases out and count them)."""
    log.warning("case %s: %s failed: %s", case.case_id, stage, exc)
    return {**record, "error": str(exc)}


def _evaluate_case(
    model,
    tok,
    method: RunMethod,
    case,
    score: Callable[..., dict[str, Any]],
    base_fp: str,
    pre: dict[str, Any] | None = None,
    computed: tuple[Any, float, int] | None = None,
    *,
    complete: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
    answers: dict | None = None,
) -> dict[str, Any]:
    """One case: edit (or take the patch ``computed`` with its group), ``score`` it, revert. ``answers``:
    greedy answers computed on the unedited model (method ``none`` only, where nothing is edited)."""
    req = case.request
    record = case_header(case)

    def evaluate(with_generation: bool) -> dict[str, Any]:
        return score(case, with_generation, answers if method.name == "none" else None)

    t0 = time.perf_counter()
    if method.name == "none":
        try:
            post = evaluate(True)
        except FactEditError as exc:  # a record the loader's checks let through: this case only
            return _failed_case(record, case, "evaluation", exc)
        pre = {k: v for k, v in post.items() if k not in GENERATION_KEYS}
        edit_s = 0.0
        t1 = time.perf_counter()
    else:
        try:
            pre = evaluate(False) if pre is None else (complete(case, pre) if complete else pre)
        except FactEditError as exc:
            return _failed_case(record, case, "evaluation", exc)
        t1 = time.perf_counter()
        if computed is not None:
            patch, edit_s, group = computed
            t0 -= edit_s  # this case's share of the group's edit time counts in its total
        else:
            group = 1
            try:
                patch = method.compute_patch(model, tok, req)
            except FactEditError as exc:
                return _failed_case(record, case, method.name, exc)
            edit_s = time.perf_counter() - t1
        if patch is not None:
            record["edit"] = edit_info(patch)
            patch.apply(model)
        failure = None
        try:
            post = evaluate(True)
        except FactEditError as exc:
            failure = exc
        finally:
            if patch is not None:
                patch.revert(model)
        if model_fingerprint(model) != base_fp:
            raise FactEditError(f"case {case.case_id}: the model was not restored after the edit; stopping")
        if failure is not None:
            return _failed_case(case_header(case), case, "evaluation", failure)
    total = time.perf_counter() - t0
    timing = {"edit_s": edit_s, "eval_s": total - edit_s, "total_s": total}
    if method.name != "none" and group > 1:
        timing["group"] = group
    return {**record, "pre": pre, "post": post, "timing": timing}
