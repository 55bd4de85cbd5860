"""Resumable evaluation runs: edit each case from the unedited model, evaluate, revert, append one line.

A run folder holds ``manifest.json`` (model fingerprint, method and hyper-parameters, data
file hash, seeds, generation settings, library versions) and ``cases.jsonl`` (one JSON
line per finished case, written with a single ``write`` followed by flush + fsync). A killed
run is resumed by running the same command again: finished case ids are skipped, a torn last
line (the process died mid-write) is cut off and that case is redone, so no case is lost or
duplicated. A resumed run must match the manifest (same model weights, method, hyper-parameters,
data and seeds); ``n`` may grow, to extend a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from factedit import __version__
from factedit.data import load_dataset
from factedit.data.counterfact import CounterFactCase
from factedit.errors import FactEditError
from factedit.evaluation.cases import GenerationSettings, evaluate_counterfact, evaluate_zsre
from factedit.evaluation.methods import get_method
from factedit.evaluation.reference import reference_texts
from factedit.models.fingerprint import model_fingerprint, model_identity
from factedit.paths import atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CASES = "cases.jsonl"
FORMAT = "factedit-eval-run-v1"
GENERATION_KEYS = ("ngram_entropy", "reference_score", "text")


@dataclass
class RunConfig:
    """Everything that decides a run's results (and must match when it is resumed), plus ``n``."""

    method: str
    dataset: str
    n: int | None = None
    start: int = 0
    data_path: str | None = None
    download: bool = False  # fetch the official file when it is not found locally
    zsre_target: str = "answers"
    hparams: str | None = None  # JSON file; None = the family defaults
    overrides: dict[str, Any] = field(default_factory=dict)
    generation: bool = False
    n_gen: int | None = None
    max_out_len: int = 100
    top_k: int = 5
    seed: int = 0
    reference_corpus: str | None = None
    reference_max_texts: int = 50
    batch_size: int = 64


@dataclass
class RunReport:
    out_dir: Path
    total: int
    already_done: int
    evaluated: int
    errors: int
    seconds: float


# -- the case log -------------------------------------------------------------------------------------------
class CaseLog:
    """``cases.jsonl``: append-only, one line per case, fsynced; reading repairs a torn last line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, *, repair: bool = True) -> dict[str, dict[str, Any]]:
        """Finished cases by ``str(case_id)`` (first occurrence wins)."""
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: discarding a torn last line (%d bytes, the run was interrupted mid-write); "
                        "that case will be evaluated again", self.path, len(data) - keep)
            if repair:
                with open(self.path, "r+b") as fh:
                    fh.truncate(keep)
                    fh.flush()
                    os.fsync(fh.fileno())
            data = data[:keep]
        done: dict[str, dict[str, Any]] = {}
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = str(record["case_id"])
            except (ValueError, KeyError, TypeError):
                log.warning("%s: line %d is unreadable and is ignored (its case will be evaluated again)",
                            self.path, lineno)
                continue
            if key in done:
                log.warning("%s: case %s appears twice; keeping the first", self.path, key)
                continue
            done[key] = record
        return done

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with open(self.path, "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


@contextlib.contextmanager
def _run_lock(folder: Path) -> Iterator[None]:
    """Refuse two processes writing the same run folder."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    fh = open(folder / ".lock", "w")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise FactEditError(f"run folder {folder} is in use by another process") from exc
        yield
    finally:
        fh.close()


# -- manifest -----------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import numpy
    import transformers

    return {"factedit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform()}


# fields of the manifest that must be equal for a resumed run
_MUST_MATCH = ("method", "hparams", "model.fingerprint", "dataset.name", "dataset.sha256", "dataset.format",
               "selection.start", "generation", "seeds", "reference")


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FactEditError(f"{folder} is not an evaluation run (cannot read {MANIFEST}: {exc})") from exc


def _check_resumable(old: dict[str, Any], new: dict[str, Any], folder: Path) -> None:
    if old.get("format") != FORMAT:
        raise FactEditError(f"{folder}/{MANIFEST} has format {old.get('format')!r}, expected {FORMAT}")
    diffs = [k for k in _MUST_MATCH
             if json.dumps(_get(old, k), sort_keys=True) != json.dumps(_get(new, k), sort_keys=True)]
    if diffs:
        detail = "; ".join(f"{k}: run has {_get(old, k)!r}, now {_get(new, k)!r}" for k in diffs)
        raise FactEditError(f"cannot resume {folder}: the run was made with other settings ({detail}); "
                            "use a new --out folder")


# -- the run ------------------------------------------------------------------------------------------------
def run_evaluation(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    config: RunConfig,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    on_case: Callable[[str, dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> RunReport:
    """Evaluate ``config.method`` on ``config.n`` cases, resuming whatever ``out_dir`` already holds.

    ``on_case(case_id, record)`` is called after each case's line is safely on disk.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    with _run_lock(out):
        dataset = load_dataset(config.dataset, config.data_path, n=config.n, start=config.start,
                               target=config.zsre_target, download=config.download)
        if config.dataset == "zsre" and config.generation:
            raise FactEditError("generation metrics are defined for CounterFact only")
        method = get_method(config.method)
        hparams = method.setup(model, tok, config.hparams, config.overrides or None)
        base_fp = model_fingerprint(model)
        reference = None
        gen = None
        if config.generation:
            gen = GenerationSettings(n_gen=config.n_gen, max_out_len=config.max_out_len, top_k=config.top_k,
                                     seed=config.seed)
            reference = reference_texts(config.reference_corpus, config.reference_max_texts)
        param = next(model.parameters())
        manifest = {
            "format": FORMAT,
            "method": method.name,
            "hparams": hparams,
            "model": {"name": model_name, "fingerprint": base_fp, "identity": model_identity(model),
                      "dtype": str(param.dtype), "device": str(param.device),
                      "family": getattr(model.config, "model_type", None)},
            "dataset": {k: v for k, v in dataset.describe().items() if k not in ("n_cases",)},
            "selection": {"start": config.start, "n": config.n, "n_cases": len(dataset)},
            "generation": asdict(gen) if gen else None,
            "reference": {k: v for k, v in reference.describe().items() if k != "note"} if reference else None,
            "seeds": {"generation": config.seed, "template_seed": hparams.get("template_seed")},
            "config": asdict(config),
            "versions": _versions(),
            "torch_threads": torch.get_num_threads(),
            "notes": _notes(config, reference),
        }
        path = out / MANIFEST
        if path.is_file():
            old = read_manifest(out)
            _check_resumable(old, manifest, out)
            manifest["created"] = old.get("created")
        else:
            manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_bytes(path, json.dumps(manifest, indent=1, ensure_ascii=False).encode())

        caselog = CaseLog(out / CASES)
        done = caselog.load()
        todo = [c for c in dataset.cases if str(c.case_id) not in done]
        already = len(dataset) - len(todo)
        if already:
            log.info("resuming %s: %d of %d cases already done", out, already, len(dataset))
        errors = 0
        bar = tqdm(total=len(dataset), initial=already, desc=f"{method.name} {config.dataset}", unit="case",
                   disable=not progress, dynamic_ncols=True)
        try:
            for case in todo:
                record = _evaluate_case(model, tok, method, case, config, gen, reference, base_fp)
                errors += "error" in record
                caselog.append(record)
                bar.update(1)
                if on_case is not None:
                    on_case(str(case.case_id), record)
        finally:
            bar.close()
    return RunReport(out_dir=out, total=len(dataset), already_done=already, evaluated=len(todo), errors=errors,
                     seconds=time.perf_counter() - started)


def _notes(config: RunConfig, reference) -> list[str]:
    notes = []
    if config.generation:
        notes.append("generation metrics are computed on the edited model only ('post'); the unedited model's "
                     "come from a run with method 'none' (same seeds, so the same samples)")
        notes.append(reference.note())
        notes.append("n-gram entropy uses a regex word tokenizer approximating NLTK's word_tokenize")
    if config.dataset == "zsre":
        origin = " (as ROME/MEMIT)" if config.zsre_target == "answers" else ""
        notes.append(f"zsRE new target = {config.zsre_target}{origin}")
    return notes


def _evaluate_case(model, tok, method, case, config: RunConfig, gen, reference, base_fp: str) -> dict[str, Any]:
    req = case.request
    record: dict[str, Any] = {
        "case_id": case.case_id,
        "requested_rewrite": {"prompt": req.prompt, "subject": req.subject, "target_new": req.target_new,
                              "target_true": req.target_true},
    }
    is_cf = isinstance(case, CounterFactCase)

    def evaluate(with_generation: bool) -> dict[str, Any]:
        if is_cf:
            return evaluate_counterfact(model, tok, case, generation=gen if with_generation else None,
                                        reference=reference, batch_size=config.batch_size)
        return evaluate_zsre(model, tok, case, batch_size=config.batch_size)

    t0 = time.perf_counter()
    if method.name == "none":
        post = evaluate(True)
        pre = {k: v for k, v in post.items() if k not in GENERATION_KEYS}
        edit_s = 0.0
        t1 = time.perf_counter()
    else:
        pre = evaluate(False)
        t1 = time.perf_counter()
        try:
            patch = method.compute(model, tok, req)
        except FactEditError as exc:
            log.warning("case %s: %s failed: %s", case.case_id, method.name, exc)
            return {**record, "error": str(exc)}
        edit_s = time.perf_counter() - t1
        if patch is not None:
            record["edit"] = _edit_info(patch)
            patch.apply(model)
        try:
            post = evaluate(True)
        finally:
            if patch is not None:
                patch.revert(model)
        if model_fingerprint(model) != base_fp:
            raise FactEditError(f"case {case.case_id}: the model was not restored after the edit; stopping")
    total = time.perf_counter() - t0
    return {**record, "pre": pre, "post": post,
            "timing": {"edit_s": edit_s, "eval_s": total - edit_s, "total_s": total}}


def _edit_info(patch) -> dict[str, Any]:
    """A few numbers about the edit worth keeping: size of the change, steps, final loss."""
    info: dict[str, Any] = {"method": patch.method,
                            "delta_norm": float(sum(float(e.delta().norm()) for e in patch.entries))}
    losses = patch.info.get("losses")
    last = losses[-1] if losses else None
    if isinstance(last, list):  # ROME: per layer, a list of per-step dicts
        last = last[-1] if last else None
    if last is not None:
        info["final_loss"] = last
    if "steps" in patch.info:
        info["steps"] = patch.info["steps"]
    return info
