"""Causal tracing over many known facts: average indirect effects per layer and token bucket (paper Fig. 2).

Each fact's trace is appended as one JSON line to ``results.jsonl`` as soon as it
is done, so an interrupted run resumes where it stopped and partial results can
be summarised at any time (:mod:`factedit.tracing.effects` averages them,
:mod:`factedit.tracing.plots` draws them).

``method="attribution"`` traces each fact to first order (:mod:`factedit.tracing.attribution`); the
averages, buckets and intervals are computed exactly as for the exact traces. With ``verify=K`` each
fact's top cells are re-patched exactly, its line holds the agreement (``certificate``), and
``effects.json`` the agreement averaged over the facts.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit import precision
from factedit.errors import FactEditError
from factedit.models.fingerprint import model_fingerprint
from factedit.paths import atomic_write_bytes, check_output_path
from factedit.progress import Progress, as_progress
from factedit.text import encode_with_subject
from factedit.tracing import kinds as trace_kinds
from factedit.tracing.core import causal_trace, check_trace_settings
from factedit.tracing.effects import BUCKETS, EffectTable, bucket_rows, summarize, t_quantile_975
from factedit.tracing.inputs import split_prompt
from factedit.tracing.knowns import KnownFact, known_by_model, load_known_facts
from factedit.tracing.noise import noise_scale
from factedit.tracing.plots import plot_average_effects

__all__ = [  # the summary's names are re-exported: callers import them from here
    "BUCKETS",
    "RESULTS",
    "RUN",
    "SELECTION",
    "EffectTable",
    "agreement_summary",
    "bucket_rows",
    "known_selection",
    "read_results",
    "summarize",
    "t_quantile_975",
    "trace_dataset",
    "write_summary",
]

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
RUN = "run.json"
SELECTION = "selection.json"


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The complete lines of ``results.jsonl`` (a torn last line from a crash is ignored)."""
    return read_jsonl(Path(out_dir) / RESULTS)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file, [] when it is missing (a torn last line is ignored)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("ignoring an incomplete line in %s", path)
    return records


def _repair_tail(path: Path) -> None:
    """Cut a half-written last line so that appended lines start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as fh:
            fh.truncate(keep)


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def known_selection(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    facts: list[KnownFact],
    out: Path,
    fingerprint: str,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Which facts the model predicts, as ``KnownPrediction`` dicts (cached in ``out`` for resumed runs)."""
    path = out / SELECTION
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("fingerprint") == fingerprint and cached.get("n_facts") == len(facts):
                return cached["predictions"]
        except (OSError, ValueError):
            pass
    preds = [p.to_dict() for p in known_by_model(model, tok, facts, progress=progress)]
    n_ok = sum(p["correct"] for p in preds)
    atomic_write_bytes(
        path,
        json.dumps(
            {"fingerprint": fingerprint, "n_facts": len(facts), "n_correct": n_ok, "predictions": preds}
        ).encode(),
    )
    return preds


def trace_dataset(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    n: int | None = None,
    data: str | Path | None = None,
    kinds: Sequence[str] = trace_kinds.KINDS,
    severed: bool = True,
    samples: int = trace_kinds.DEFAULT_SAMPLES,
    noise: float | None = None,
    noise_factor: float = trace_kinds.DEFAULT_NOISE_FACTOR,
    window: int = trace_kinds.DEFAULT_WINDOW,
    seed: int = trace_kinds.DEFAULT_SEED,
    batch_size: int = trace_kinds.DEFAULT_BATCH_SIZE,
    autocast: str | None = None,
    method: str = "fast",
    verify: int = 0,
    plots: bool = True,
    progress: Progress | bool | None = None,
) -> EffectTable:
    """Trace the first ``n`` known facts the model predicts; resumable; writes table, JSON and plots.

    ``severed``: also trace the paper's Fig. 3 severed paths, at the last subject token only.
    ``method``: ``"fast"`` (exact) or ``"attribution"`` (first-order estimates, ``verify`` cells per kind
    and fact re-patched exactly; see :func:`~factedit.tracing.core.causal_trace`).
    ``progress`` gets the stages "known facts" (which facts the model predicts, first run only)
    and "tracing facts".
    """
    progress = as_progress(progress)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise FactEditError(f"n (facts to trace) must be a whole number of at least 1, or None for all; got {n!r}")
    all_kinds = check_trace_settings(
        kinds=list(kinds) + (list(trace_kinds.SEVERED_KINDS) if severed else []),
        samples=samples,
        noise=noise,
        noise_factor=noise_factor,
        window=window,
        batch_size=batch_size,
        autocast=autocast,
        method=method,
        verify=verify,
    )
    if method == "straightforward":
        raise FactEditError("trace_dataset traces with the fast method or 'attribution', not 'straightforward'")
    out = check_output_path(out_dir, "trace output folder")
    facts = load_known_facts(data)  # a bad data file fails before the output folder exists
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model)
    scale = noise_factor * noise_scale(model, tokenizer) if noise is None else float(noise)
    config = {
        "fingerprint": fingerprint,
        "model_type": getattr(model.config, "model_type", None),
        "kinds": list(kinds),
        "severed": severed,
        "samples": samples,
        "noise": scale,
        "window": window,
        "seed": seed,
        "data": str(data) if data else "known_1000.json",
    }
    if precision.autocast_dtype(autocast) is not None:  # only when set: older runs stay resumable
        config["autocast"] = str(precision.autocast_dtype(autocast)).replace("torch.", "")
    if method != "fast":  # likewise: an exact run's settings keep their old shape
        config["method"] = method
        config["verify"] = verify
    run_path = out / RUN
    if run_path.is_file():
        previous = json.loads(run_path.read_text())
        diff = sorted(
            k
            for k in set(config) | set(previous)
            if config.get(k) != previous.get(k)
            and not (k == "noise" and math.isclose(config[k], previous.get(k) or 0.0, rel_tol=1e-6))
        )
        if diff:
            raise FactEditError(
                f"{out} holds a run with other settings ({', '.join(diff)}); "
                "use another --out folder or delete that one"
            )
    else:
        atomic_write_bytes(run_path, json.dumps(config, indent=1).encode())

    preds = known_selection(model, tokenizer, facts, out, fingerprint, progress)
    by_id = {f.known_id: f for f in facts}
    chosen = [by_id[p["known_id"]] for p in preds if p["correct"]]
    log.info("the model predicts %d of %d known facts", len(chosen), len(facts))
    if n is not None:
        chosen = chosen[:n]
    results = out / RESULTS
    _repair_tail(results)
    done = {r["known_id"] for r in read_results(out)}
    todo = [f for f in chosen if f.known_id not in done]
    log.info("%d facts to trace (%d already done)", len(todo), len(chosen) - len(todo))
    try:
        with progress.stage("tracing facts", total=len(todo), unit="fact") as stage:
            for fact in todo:
                try:
                    encoded = encode_with_subject(tokenizer, split_prompt(fact.prompt, fact.subject), fact.subject)
                    tokens = {k: [encoded.subject_last] for k in trace_kinds.SEVERED_KINDS}
                    res = causal_trace(
                        model,
                        tokenizer,
                        fact.prompt,
                        fact.subject,
                        kinds=all_kinds,
                        samples=samples,
                        noise=scale,
                        window=window,
                        seed=seed,
                        batch_size=batch_size,
                        tokens=tokens,
                        autocast=autocast,
                        method=method,
                        verify=verify,
                    )
                except FactEditError as exc:
                    log.warning("skipping known fact %d (%s)", fact.known_id, exc)
                    stage.advance(1)
                    continue
                rec = {
                    "known_id": fact.known_id,
                    "subject": fact.subject,
                    "prompt": fact.prompt,
                    "attribute": fact.attribute,
                    "relation_id": fact.relation_id,
                }
                rec.update(
                    {
                        k: v
                        for k, v in res.to_dict().items()
                        if k in ("tokens", "subject_range", "answer", "answer_id", "clean_prob", "low_prob", "scores")
                    }
                )
                rec["seconds"] = res.meta["seconds"]
                if res.estimated:
                    rec["method"] = res.method
                    rec["certificate"] = {k: {m: c[m] for m in _AGREEMENT} for k, c in res.certificate.items()}
                _append_line(results, rec)
                stage.advance(1)
    except KeyboardInterrupt:
        if read_results(out):
            log.warning("interrupted: summarising the %d facts traced so far (rerun to resume)", len(read_results(out)))
            write_summary(out, plots=plots)
        raise
    return write_summary(out, plots=plots)


_AGREEMENT = ("k", "n_random", "spearman", "top_k_overlap", "max_abs_error")


def agreement_summary(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind, the certificates of estimated facts: how many, and the mean and median of each measure."""
    out: dict[str, dict[str, Any]] = {}
    kinds = list(dict.fromkeys(k for r in records for k in (r.get("certificate") or {})))
    for kind in kinds:
        certs = [r["certificate"][kind] for r in records if kind in (r.get("certificate") or {})]
        row: dict[str, Any] = {"n_facts": len(certs), "k": certs[0]["k"]}
        for measure in ("spearman", "top_k_overlap", "max_abs_error"):
            values = [c[measure] for c in certs if c.get(measure) is not None]
            row[measure] = {
                "mean": float(np.mean(values)) if values else None,
                "median": float(np.median(values)) if values else None,
                "n": len(values),
            }
        out[kind] = row
    return out


def write_summary(out_dir: str | Path, *, plots: bool = True) -> EffectTable:
    """Summarise whatever ``results.jsonl`` holds into ``effects.csv``, ``effects.json`` and plots."""
    out = Path(out_dir)
    if not (out / RESULTS).is_file():
        raise FactEditError(f"{out} holds no traced facts ({RESULTS} is missing): run trace-dataset first")
    check_output_path(out, "trace output folder")
    records = read_results(out)
    table = summarize(records)
    summary = table.to_json()
    methods = sorted({r.get("method", "fast") for r in records})
    if methods != ["fast"]:  # an estimated run says so (an exact run's summary keeps its old shape)
        summary["method"] = methods[0] if len(methods) == 1 else methods
    if any(r.get("certificate") for r in records):
        summary["certificate"] = agreement_summary(records)
    atomic_write_bytes(out / "effects.csv", table.to_csv().encode())
    atomic_write_bytes(out / "effects.json", json.dumps(summary, indent=1).encode())
    if plots:
        plot_average_effects(table, out)
    return table
