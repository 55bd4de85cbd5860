"""Average indirect effects over facts, per layer and token bucket (paper Fig. 2), with 95% intervals.

The summary averages the indirect effect (restored probability − corrupted
probability) over facts for six token buckets, as the official plotting notebook:
first / middle / last subject token, first subsequent token, further tokens, last
token. Middle and further tokens are averaged within a fact first; a bucket a fact
lacks (one-token subject, subject right before the last token) is left out for that
fact; the last subject token and the first subsequent token may coincide with other
buckets, as in the official code. Confidence intervals are mean ± t₀.₉₇₅(n−1) · sd / √n
(Student t; ≈ 1.96 for the hundreds of facts of a real run).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from factedit.errors import FactEditError

BUCKETS: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


# Two-sided 95% Student-t quantiles for 1..30 degrees of freedom; beyond, a Cornish-Fisher expansion.
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t (for 95% confidence intervals), without scipy."""
    if dof < 1:
        return math.nan
    if dof <= len(_T975):
        return _T975[dof - 1]
    z, v = 1.959964, float(dof)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


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
                    per_bucket[bucket] = {
                        "layer": b["layer"],
                        "mean": b["mean"],
                        "ci95": [b["ci95_low"], b["ci95_high"]],
                    }
            out[kind] = {
                "bucket": best["bucket"],
                "layer": best["layer"],
                "mean": best["mean"],
                "ci95": [best["ci95_low"], best["ci95_high"]],
                "per_bucket": per_bucket,
            }
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "n_facts": self.n_facts,
            "mean_clean_prob": self.mean_clean_prob,
            "mean_low_prob": self.mean_low_prob,
            "num_layers": self.num_layers,
            "peaks": self.peaks(),
            "rows": self.rows,
        }

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
                rows.append(
                    {
                        "kind": kind,
                        "bucket": bucket,
                        "layer": layer,
                        "n": n,
                        "mean": mean,
                        "sd": sd,
                        "ci95_low": mean - half,
                        "ci95_high": mean + half,
                    }
                )
    n_layers = max(len(rec["scores"][k][0]) for rec in records for k in rec["scores"])
    return EffectTable(
        rows=rows,
        n_facts=len(records),
        mean_clean_prob=float(np.mean([r["clean_prob"] for r in records])),
        mean_low_prob=float(np.mean([r["low_prob"] for r in records])),
        num_layers=n_layers,
    )
