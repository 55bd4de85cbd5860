"""Causal tracing over many known facts: average indirect effects per layer and token bucket (paper Fig. 2).

Each fact's trace is appended as one JSON line to ``results.jsonl`` as soon as it
is done, so an interrupted run resumes where it stopped and partial results can
be summarised at any time. The summary averages the indirect effect (restored
probability − corrupted probability) over facts for six token buckets, as the
official plotting notebook: first / middle / last subject token, first subsequent
token, further tokens, last token. Middle and further tokens are averaged within
a fact first; a bucket a fact lacks (one-token subject, subject right before the
last token) is left out for that fact; the last subject token and the first
subsequent token may coincide with other buckets, as in the official code.
Confidence intervals are mean ± t₀.₉₇₅(n−1) · sd / √n (Student t; ≈ 1.96 for the
hundreds of facts of a real run).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from factedit import precision
from factedit.errors import FactEditError
from factedit.models.fingerprint import model_fingerprint
from factedit.paths import atomic_write_bytes
from factedit.text import encode_with_subject
from factedit.tracing.core import (
    DEFAULT_BATCH_SIZE, DEFAULT_NOISE_FACTOR, DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_WINDOW, KINDS, SEVERED_KINDS,
    causal_trace, split_prompt,
)
from factedit.tracing.knowns import KnownFact, known_by_model, load_known_facts
from factedit.tracing.noise import noise_scale

log = logging.getLogger(__name__)

BUCKETS: tuple[str, ...] = (
    "first subject token", "middle subject tokens", "last subject token",
    "first subsequent token", "further tokens", "last token",
)
RESULTS = "results.jsonl"
RUN = "run.json"
SELECTION = "selection.json"


# Two-sided 95% Student-t quantiles for 1..30 degrees of freedom; beyond, a Cornish-Fisher expansion.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t (for 95% confidence intervals), without scipy."""
    if dof < 1:
        return math.nan
    if dof <= len(_T975):
        return _T975[dof - 1]
    z, v = 1.959964, float(dof)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def bucket_rows(matrix: np.ndarray, subject_range: Sequence[int]) -> dict[str, np.ndarray]:
    """One row (per layer) per token bucket of a fact's ``(tokens, layers)`` matrix; absent buckets omitted."""
    first, end = int(subject_range[0]), int(subject_range[1])
    last_subj, T = end - 1, matrix.shape[0]
    out: dict[str, np.ndarray] = {"first subject token": matrix[first]}
    if last_subj - first > 1:
        out["middle subject tokens"] = matrix[first + 1 : last_subj].mean(0)
    out["last subject token"] = matrix[last_subj]
    if end < T:
        out["first subsequent token"] = matrix[end]
    if end + 1 < T - 1:
        out["further tokens"] = matrix[end + 1 : T - 1].mean(0)
    out["last token"] = matrix[T - 1]
    return {k: v for k, v in out.items() if not np.all(np.isnan(v))}


@dataclass
class EffectTable:
    """Average indirect effects: ``rows`` of (kind, bucket, layer, n, mean, sd, ci95_low, ci95_high)."""

    rows: list[dict[str, Any]]
    n_facts: int
    mean_clean_prob: float
    mean_low_prob: float
    num_layers: int

    def series(self, kind: str, bucket: str) -> dict[str, np.ndarray] | None:
        rows = [r for r in self.rows if r["kind"] == kind and r["bucket"] == bucket]
        if not rows:
            return None
        rows.sort(key=lambda r: r["layer"])
        keys = ("layer", "mean", "ci95_low", "ci95_high", "n")
        return {key: np.array([r[key] for r in rows], dtype=float) for key in keys}

    def kinds(self) -> list[str]:
        return list(dict.fromkeys(r["kind"] for r in self.rows))

    def peaks(self) -> dict[str, dict[str, Any]]:
        """Per kind: the (bucket, layer) of the largest mean effect, and each bucket's peak layer."""
        out: dict[str, dict[str, Any]] = {}
        for kind in self.kinds():
            rows = [r for r in self.rows if r["kind"] == kind]
            best = max(rows, key=lambda r: r["mean"])
            per_bucket = {}
            for bucket in BUCKETS:
                br = [r for r in rows if r["bucket"] == bucket]
                if br:
                    b = max(br, key=lambda r: r["mean"])
                    per_bucket[bucket] = {"layer": b["layer"], "mean": b["mean"],
                                          "ci95": [b["ci95_low"], b["ci95_high"]]}
            out[kind] = {"bucket": best["bucket"], "layer": best["layer"], "mean": best["mean"],
                         "ci95": [best["ci95_low"], best["ci95_high"]], "per_bucket": per_bucket}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"n_facts": self.n_facts, "mean_clean_prob": self.mean_clean_prob, "mean_low_prob": self.mean_low_prob,
                "num_layers": self.num_layers, "peaks": self.peaks(), "rows": self.rows}

    def to_csv(self) -> str:
        buf = io.StringIO()
        fields = ["kind", "bucket", "layer", "n", "mean", "sd", "ci95_low", "ci95_high"]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: r[k] for k in fields})
        return buf.getvalue()


def summarize(records: Sequence[dict[str, Any]]) -> EffectTable:
    """Average indirect effects over facts (``records`` as stored in ``results.jsonl``)."""
    if not records:
        raise FactEditError("no traced facts to summarise")
    per: dict[tuple[str, str], list[np.ndarray]] = {}
    for rec in records:
        low = rec["low_prob"]
        for kind, m in rec["scores"].items():
            matrix = np.array([[np.nan if x is None else x for x in row] for row in m], dtype=float) - low
            for bucket, row in bucket_rows(matrix, rec["subject_range"]).items():
                per.setdefault((kind, bucket), []).append(row)
    rows = []
    kinds = list(dict.fromkeys(k for rec in records for k in rec["scores"]))
    for kind in kinds:
        for bucket in BUCKETS:
            if (kind, bucket) not in per:
                continue
            data = np.stack(per[(kind, bucket)])  # (facts, layers)
            for layer in range(data.shape[1]):
                col = data[:, layer]
                col = col[~np.isnan(col)]
                n = len(col)
                if n == 0:
                    continue
                mean = float(col.mean())
                sd = float(col.std(ddof=1)) if n > 1 else 0.0
                half = t_quantile_975(n - 1) * sd / math.sqrt(n) if n > 1 else 0.0
                rows.append({"kind": kind, "bucket": bucket, "layer": layer, "n": n, "mean": mean, "sd": sd,
                             "ci95_low": mean - half, "ci95_high": mean + half})
    n_layers = max(len(rec["scores"][k][0]) for rec in records for k in rec["scores"])
    return EffectTable(rows=rows, n_facts=len(records),
                       mean_clean_prob=float(np.mean([r["clean_prob"] for r in records])),
                       mean_low_prob=float(np.mean([r["low_prob"] for r in records])), num_layers=n_layers)


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The complete lines of ``results.jsonl`` (a torn last line from a crash is ignored)."""
    path = Path(out_dir) / RESULTS
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


def _selection(model: nn.Module, tok: PreTrainedTokenizerBase, facts: list[KnownFact], out: Path,
               fingerprint: str, progress: bool) -> list[dict[str, Any]]:
    """Which facts the model predicts (cached in the output folder for resumed runs)."""
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
    atomic_write_bytes(path, json.dumps({"fingerprint": fingerprint, "n_facts": len(facts), "n_correct": n_ok,
                                         "predictions": preds}).encode())
    return preds


def trace_dataset(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    n: int | None = None,
    data: str | Path | None = None,
    kinds: Sequence[str] = KINDS,
    severed: bool = True,
    samples: int = DEFAULT_SAMPLES,
    noise: float | None = None,
    noise_factor: float = DEFAULT_NOISE_FACTOR,
    window: int = DEFAULT_WINDOW,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast: str | None = None,
    plots: bool = True,
    progress: bool = True,
) -> EffectTable:
    """Trace the first ``n`` known facts the model predicts; resumable; writes table, JSON and plots.

    ``severed``: also trace the paper's Fig. 3 severed paths, at the last subject token only.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = load_known_facts(data)
    fingerprint = model_fingerprint(model)
    scale = noise_factor * noise_scale(model, tokenizer) if noise is None else float(noise)
    config = {"fingerprint": fingerprint, "model_type": getattr(model.config, "model_type", None),
              "kinds": list(kinds), "severed": severed, "samples": samples, "noise": scale, "window": window,
              "seed": seed, "data": str(data) if data else "known_1000.json"}
    if precision.autocast_dtype(autocast) is not None:  # only when set: older runs stay resumable
        config["autocast"] = str(precision.autocast_dtype(autocast)).replace("torch.", "")
    run_path = out / RUN
    if run_path.is_file():
        previous = json.loads(run_path.read_text())
        diff = sorted(k for k in set(config) | set(previous) if config.get(k) != previous.get(k)
                      and not (k == "noise" and math.isclose(config[k], previous.get(k) or 0.0, rel_tol=1e-6)))
        if diff:
            raise FactEditError(f"{out} holds a run with other settings ({', '.join(diff)}); "
                                "use another --out folder or delete that one")
    else:
        atomic_write_bytes(run_path, json.dumps(config, indent=1).encode())

    preds = _selection(model, tokenizer, facts, out, fingerprint, progress)
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
    all_kinds = list(kinds) + (list(SEVERED_KINDS) if severed else [])
    try:
        for fact in tqdm(todo, desc="tracing facts", unit="fact", disable=not progress):
            try:
                encoded = encode_with_subject(tokenizer, split_prompt(fact.prompt, fact.subject), fact.subject)
                tokens = {k: [encoded.subject_last] for k in SEVERED_KINDS}
                res = causal_trace(model, tokenizer, fact.prompt, fact.subject, kinds=all_kinds, samples=samples,
                                   noise=scale, window=window, seed=seed, batch_size=batch_size, tokens=tokens,
                                   autocast=autocast)
            except FactEditError as exc:
                log.warning("skipping known fact %d (%s)", fact.known_id, exc)
                continue
            rec = {"known_id": fact.known_id, "subject": fact.subject, "prompt": fact.prompt,
                   "attribute": fact.attribute, "relation_id": fact.relation_id}
            rec.update({k: v for k, v in res.to_dict().items()
                        if k in ("tokens", "subject_range", "answer", "answer_id", "clean_prob", "low_prob", "scores")})
            rec["seconds"] = res.meta["seconds"]
            _append_line(results, rec)
    except KeyboardInterrupt:
        if read_results(out):
            log.warning("interrupted: summarising the %d facts traced so far (rerun to resume)", len(read_results(out)))
            write_summary(out, plots=plots)
        raise
    return write_summary(out, plots=plots)


def write_summary(out_dir: str | Path, *, plots: bool = True) -> EffectTable:
    """Summarise whatever ``results.jsonl`` holds into ``effects.csv``, ``effects.json`` and plots."""
    out = Path(out_dir)
    table = summarize(read_results(out))
    atomic_write_bytes(out / "effects.csv", table.to_csv().encode())
    atomic_write_bytes(out / "effects.json", json.dumps(table.to_json(), indent=1).encode())
    if plots:
        from factedit.tracing.plots import plot_average_effects

        plot_average_effects(table, out)
    return table
