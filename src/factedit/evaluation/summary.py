"""Side-by-side summaries of evaluation runs: mean ± 95% CI per metric, S, tables and a plot.

Metrics (percentages, as ROME/MEMIT report them): CounterFact ES/EM, PS/PM, NS/NM, S (harmonic
mean of ES, PS, NS), MEMIT's argmax accuracies, and with generation GE (n-gram entropy x 100) and
RS (reference score x 100); zsRE efficacy, paraphrase and specificity token accuracies. Intervals:
Student-t over cases for means; a seeded percentile bootstrap over cases for S. ΔNS / ΔSpec: the
paired change of the specificity metric against the unedited model on the same cases.
Beside them: WILD's generative success (Gen ES/PS/NS, or Gen Eff/Para/Spec on zsRE) and its
locality (Gen loc: neighbourhood answers identical to the unedited model's), and EasyEdit's token
accuracies (EE rel, EE gen, EE loc); runs made before those existed just lack the columns. Batch and
sequential runs with capability measures get a second table (before/after).
By default only the cases every run finished are compared (``common=True``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from factedit.errors import FactEditError
from factedit.evaluation.metrics import (
    bootstrap_ci,
    counterfact_case_scores,
    harmonic_mean,
    mean_ci,
    paired_case_scores,
    zsre_case_scores,
)
from factedit.evaluation.records import read_capability, read_cases, read_manifest

log = logging.getLogger(__name__)

# (column, per-case key, scale)
COUNTERFACT_METRICS = [
    ("ES", "rewrite_success", 100),
    ("EM", "rewrite_diff", 100),
    ("PS", "paraphrase_success", 100),
    ("PM", "paraphrase_diff", 100),
    ("NS", "neighborhood_success", 100),
    ("NM", "neighborhood_diff", 100),
    ("S", None, 1),
    ("GE", "ngram_entropy", 100),
    ("RS", "reference_score", 100),
    ("Acc rewrite", "rewrite_acc", 100),
    ("Acc para", "paraphrase_acc", 100),
    ("Acc neigh", "neighborhood_acc", 100),
    ("Gen ES", "rewrite_gen", 100),
    ("Gen PS", "paraphrase_gen", 100),
    ("Gen NS", "neighborhood_gen", 100),
    ("EE rel", "rewrite_token_acc", 100),
    ("EE gen", "paraphrase_token_acc", 100),
]
ZSRE_METRICS = [
    ("Efficacy", "rewrite_acc", 100),
    ("Paraphrase", "paraphrase_acc", 100),
    ("Specificity", "neighborhood_acc", 100),
    ("Gen Eff", "rewrite_gen", 100),
    ("Gen Para", "paraphrase_gen", 100),
    ("Gen Spec", "neighborhood_gen", 100),
    ("EE rel", "rewrite_token_acc", 100),
    ("EE gen", "paraphrase_token_acc", 100),
]
# edited vs unedited on the same case: (column, per-case key, column it follows)
PAIRED = {
    "counterfact": [("Gen loc", "neighborhood_same_gen", "Gen NS"), ("EE loc", "neighborhood_token_agree", "EE gen")],
    "zsre": [("Gen loc", "neighborhood_same_gen", "Gen Spec"), ("EE loc", "neighborhood_token_agree", "EE gen")],
}
# columns runs made before them lack for some cases (a resumed old run): the summary says on how many
NEWER = {"Gen ES", "Gen PS", "Gen NS", "Gen Eff", "Gen Para", "Gen Spec", "Gen loc", "EE rel", "EE gen", "EE loc"}
TIME = ("edit s", "edit_s", 1)
RATE = "cases/min"  # throughput: cases over the summed per-case wall time (edit + evaluation + revert)
DELTA = {"counterfact": ("ΔNS", "neighborhood_success"), "zsre": ("ΔSpec", "neighborhood_acc")}
BOUNDED = {
    "rewrite_success",
    "paraphrase_success",
    "neighborhood_success",
    "rewrite_acc",
    "paraphrase_acc",
    "neighborhood_acc",
    "rewrite_gen",
    "paraphrase_gen",
    "neighborhood_gen",
    "rewrite_token_acc",
    "paraphrase_token_acc",
    "neighborhood_same_gen",
    "neighborhood_token_agree",
}


@dataclass
class Run:
    """A run folder: its manifest and its finished cases (errors apart)."""

    path: Path
    manifest: dict[str, Any]
    cases: dict[str, dict[str, Any]]
    errors: dict[str, str] = field(default_factory=dict)
    capability: list[dict[str, Any]] = field(default_factory=list)  # capability.jsonl (batch/sequential runs)

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]["name"]

    @property
    def label(self) -> str:
        return self.path.name


def load_run(path: str | Path) -> Run:
    folder = Path(path)
    manifest = read_manifest(folder)
    records = read_cases(folder)  # every log: one per rank when the run was sharded
    cases = {k: r for k, r in records.items() if "error" not in r}
    errors = {k: r["error"] for k, r in records.items() if "error" in r}
    return Run(path=folder, manifest=manifest, cases=cases, errors=errors, capability=read_capability(folder))


@dataclass
class Cell:
    mean: float
    low: float
    high: float
    n: int | None = None  # cases the value is over (when it can be fewer than the row's)

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2


@dataclass
class Row:
    label: str
    method: str
    n: int
    cells: dict[str, Cell]
    errors: int = 0
    refused: int = 0  # edits a guarded run rolled back (their cases are scored without their edit)


@dataclass
class Summary:
    dataset: str
    columns: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    capability: list[dict[str, Any]] = field(default_factory=list)  # one row per run and state (before/after)


def _case_scores(dataset: str, block: dict[str, Any]) -> dict[str, float]:
    return counterfact_case_scores(block) if dataset == "counterfact" else zsre_case_scores(block)


def summarize_block(
    dataset: str, blocks: list[dict[str, Any]], times: list[float] | None = None, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Cell]:
    """Mean and 95% interval of every metric over cases (``blocks``: the ``pre`` or ``post`` of each case)."""
    per_case = [_case_scores(dataset, b) for b in blocks]
    spec = COUNTERFACT_METRICS if dataset == "counterfact" else ZSRE_METRICS
    cells: dict[str, Cell] = {}
    for column, key, scale in spec:
        if key is None:
            continue
        values = [c[key] for c in per_case if key in c]
        if not values:
            continue
        cells[column] = _cell(values, key, scale)
    if dataset == "counterfact" and all(k in cells for k in ("ES", "PS", "NS")):
        cols = [
            [c["rewrite_success"] for c in per_case],
            [c["paraphrase_success"] for c in per_case],
            [c["neighborhood_success"] for c in per_case],
        ]
        point, lo, hi = bootstrap_ci(cols, lambda m: harmonic_mean(100 * m), n_boot=n_boot, seed=seed)
        cells["S"] = Cell(point, lo, hi)
    if times:
        mean, half = mean_ci(times)
        cells[TIME[0]] = Cell(mean, mean - half, mean + half)
    return cells


def _cell(values: list[float], key: str, scale: float) -> Cell:
    mean, half = mean_ci(values)
    lo, hi = mean - half, mean + half
    if key in BOUNDED:  # proportions: the t-interval is clipped to [0, 1]
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return Cell(scale * mean, scale * lo, scale * hi, len(values))


def _paired_cells(dataset: str, cases: list[dict[str, Any]]) -> dict[str, Cell]:
    """WILD's and EasyEdit's localities: edited against unedited on the same case (needs both blocks)."""
    per_case = [paired_case_scores(c["pre"], c["post"]) for c in cases]
    cells = {}
    for column, key, _ in PAIRED[dataset]:
        values = [p[key] for p in per_case if key in p]
        if values:
            cells[column] = _cell(values, key, 100)
    return cells


def _capability_rows(run: Run) -> list[dict[str, Any]]:
    """The run's capability states: before, and after (a batch run's batches averaged)."""
    records = run.capability
    if not records:
        return []
    rows = []
    before = [r for r in records if r.get("when") == "before"]
    after = [r for r in records if r.get("when") == "after"]
    for state, chosen in (("before", before), ("after", after)):
        if not chosen:
            continue
        row: dict[str, Any] = {"run": run.label, "state": state, "measured": len(chosen)}
        row["edits"] = float(np.mean([r.get("edits", 0) for r in chosen]))
        for key in ("ppl_wikitext", "ppl_wikipedia", "known_acc", "ngram_entropy"):
            values = [r[key] for r in chosen if r.get(key) is not None and not math.isnan(r[key])]
            if values:
                row[key] = float(np.mean(values))
        rows.append(row)
    return rows


def summarize_runs(
    paths: list[str | Path], *, common: bool = True, pre: bool = True, n_boot: int = 2000, seed: int = 0
) -> Summary:
    """One row per run (its ``post`` metrics), preceded by the unedited model's row (the first run's ``pre``)
    unless a run of method ``none`` is among them."""
    runs = [load_run(p) for p in paths]
    if not runs:
        raise FactEditError("no runs given")
    datasets = {r.dataset for r in runs}
    if len(datasets) > 1:
        raise FactEditError(f"runs mix data sets ({', '.join(sorted(datasets))}); summarise each separately")
    dataset = datasets.pop()
    notes: list[str] = []
    ids = [set(r.cases) for r in runs]
    keep = set.intersection(*ids) if common else None
    if common and any(len(i) != len(keep) for i in ids):
        notes.append(f"compared on the {len(keep)} cases every run finished (use --all-cases to use each run's own)")
    shas = {r.manifest["dataset"].get("sha256") for r in runs}
    if len(shas) > 1:
        notes.append("warning: the runs used different data files")
    fps = {r.manifest["model"].get("fingerprint") for r in runs}
    if len(fps) > 1:
        notes.append("warning: the runs used different model weights")
    rows: list[Row] = []
    capability_rows: list[dict[str, Any]] = []
    pre = pre and all(r.manifest["method"] != "none" for r in runs)  # a 'none' run already is that row
    for i, run in enumerate(runs):
        chosen = [run.cases[k] for k in _ordered(run, keep)]
        if pre and i == 0:
            rows.append(
                Row(
                    label="pre (unedited)",
                    method="-",
                    n=len(chosen),
                    cells=summarize_block(dataset, [c["pre"] for c in chosen], n_boot=n_boot, seed=seed),
                )
            )
        times = [c["timing"]["edit_s"] for c in chosen if "timing" in c] if run.manifest["method"] != "none" else None
        cells = summarize_block(dataset, [c["post"] for c in chosen], times, n_boot=n_boot, seed=seed)
        cells.update(_specificity_drop(dataset, chosen))
        cells.update(_paired_cells(dataset, chosen))
        totals = [c["timing"]["total_s"] for c in chosen if "total_s" in c.get("timing", {})]
        if totals and sum(totals) > 0:
            cells[RATE] = Cell(60 * len(totals) / sum(totals), math.nan, math.nan)
        refused = sum(1 for c in chosen if (c.get("guard") or {}).get("verdict") == "refused")
        rows.append(
            Row(
                label=run.label,
                method=run.manifest["method"],
                n=len(chosen),
                errors=len(run.errors),
                cells=cells,
                refused=refused,
            )
        )
        if (run.manifest.get("config") or {}).get("guard"):
            notes.append(
                f"{run.label}: the guard refused {refused} of its {len(chosen)} edits (rolled back bit-exact; "
                "those cases are scored on the final model, without their edit)"
            )
        for note in run.manifest.get("notes", []):
            if note not in notes:
                notes.append(note)
        partial = [
            f"{c} on {cell.n}"
            for c, cell in cells.items()
            if c in NEWER and cell.n is not None and cell.n < len(chosen)
        ]
        if partial:
            notes.append(
                f"{run.label}: {', '.join(partial)} of its {len(chosen)} cases (the others were scored before "
                "these metrics existed)"
            )
        capability_rows.extend(_capability_rows(run))
        if run.errors:
            notes.append(
                f"{run.label}: {len(run.errors)} case(s) failed to edit and are excluded "
                f"(ids {', '.join(sorted(run.errors)[:10])}{'…' if len(run.errors) > 10 else ''})"
            )
    spec = COUNTERFACT_METRICS if dataset == "counterfact" else ZSRE_METRICS
    columns = [c for c, _, _ in spec if any(c in r.cells for r in rows)]
    delta = DELTA[dataset][0]
    if any(delta in r.cells for r in rows):
        columns.insert(columns.index("NS" if dataset == "counterfact" else "Specificity") + 1, delta)
    for column, _, after in PAIRED[dataset]:
        if any(column in r.cells for r in rows):
            columns.insert(columns.index(after) + 1 if after in columns else len(columns), column)
    if any(TIME[0] in r.cells for r in rows):
        columns.append(TIME[0])
    if any(RATE in r.cells for r in rows):
        columns.append(RATE)
    return Summary(dataset=dataset, columns=columns, rows=rows, notes=notes, capability=capability_rows)


def _specificity_drop(dataset: str, cases: list[dict[str, Any]]) -> dict[str, Cell]:
    """Paired change of the specificity metric, edited minus unedited on the same cases (t-interval)."""
    column, key = DELTA[dataset]
    diffs = []
    for c in cases:
        pre, post = _case_scores(dataset, c["pre"]), _case_scores(dataset, c["post"])
        if key in pre and key in post:
            diffs.append(post[key] - pre[key])
    if not diffs:
        return {}
    mean, half = mean_ci(diffs)
    return {column: Cell(100 * mean, 100 * (mean - half), 100 * (mean + half))}


def _ordered(run: Run, keep: set[str] | None) -> list[str]:
    keys = [k for k in run.cases if keep is None or k in keep]
    return sorted(keys, key=lambda k: (0, int(k)) if k.lstrip("-").isdigit() else (1, k))


def _fmt(cell: Cell | None, digits: int = 1) -> str:
    if cell is None or math.isnan(cell.mean):
        return "–"
    if math.isnan(cell.half):
        return f"{cell.mean:.{digits}f}"
    if abs((cell.high - cell.mean) - (cell.mean - cell.low)) > 0.1 * max(cell.half, 1e-9):  # asymmetric
        return f"{cell.mean:.{digits}f} [{cell.low:.{digits}f}, {cell.high:.{digits}f}]"
    return f"{cell.mean:.{digits}f} ± {cell.half:.{digits}f}"


def to_markdown(summary: Summary) -> str:
    head = ["run", "method", "n", *summary.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(summary.columns)) + "|"]
    for row in summary.rows:
        cells = [_fmt(row.cells.get(c), 2 if c == "edit s" else 1) for c in summary.columns]
        lines.append("| " + " | ".join([row.label, row.method, str(row.n), *cells]) + " |")
    text = (
        f"**{summary.dataset}** (mean ± 95% CI over cases; [low, high] where the interval is asymmetric: "
        "bootstrap for S, clipped to 0–100 for rates)\n\n" + "\n".join(lines)
    )
    if summary.capability:
        text += "\n\n" + capability_markdown(summary.capability)
    if summary.notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in summary.notes)
    return text


CAPABILITY_COLUMNS = [
    ("PPL WikiText-2", "ppl_wikitext", 1, 2),
    ("PPL Wikipedia (held out)", "ppl_wikipedia", 1, 2),
    ("known facts %", "known_acc", 100, 1),
    ("GE", "ngram_entropy", 100, 1),
]


def capability_markdown(rows: list[dict[str, Any]]) -> str:
    """General capability before and after editing (a batch run's batches averaged)."""
    head = ["run", "state", "edits in the model", *(c for c, _, _, _ in CAPABILITY_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for row in rows:
        cells = [
            "–" if row.get(key) is None else f"{scale * row[key]:.{digits}f}"
            for _, key, scale, digits in CAPABILITY_COLUMNS
        ]
        state = row["state"] if row["measured"] == 1 else f"{row['state']} (mean of {row['measured']})"
        lines.append("| " + " | ".join([row["run"], state, f"{row['edits']:g}", *cells]) + " |")
    return "**general capability** (known facts: those the unedited model predicts, no edited subject)\n\n" + "\n".join(
        lines
    )


def to_csv(summary: Summary) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "run", "method", "n", "metric", "mean", "ci_low", "ci_high"])
    for row in summary.rows:
        for c in summary.columns:
            cell = row.cells.get(c)
            if cell is not None:
                w.writerow(
                    [
                        summary.dataset,
                        row.label,
                        row.method,
                        row.n,
                        c,
                        # full precision: a table rounded from the file rounds as the report does
                        # (11.85 kept as 11.85 reads back as 11.8499..., 11.8 where the report says 11.9)
                        repr(float(cell.mean)),
                        repr(float(cell.low)),
                        repr(float(cell.high)),
                    ]
                )
    return buf.getvalue()


def plot(summary: Summary, path: str | Path, metrics: list[str] | None = None) -> Path:
    """Grouped bars (one group per metric, one bar per run) with 95% intervals; written with Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default = ["ES", "PS", "NS", "S"] if summary.dataset == "counterfact" else ["Efficacy", "Paraphrase", "Specificity"]
    metrics = [m for m in (metrics or default) if m in summary.columns]
    if not metrics:
        raise FactEditError("nothing to plot")
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(summary.rows))
    fig, ax = plt.subplots(figsize=(3.6 + 1.4 * len(metrics) + 0.3 * len(summary.rows), 3.6))
    for i, row in enumerate(summary.rows):
        means = [row.cells[m].mean if m in row.cells else np.nan for m in metrics]
        errs = np.array(
            [
                [row.cells[m].mean - row.cells[m].low, row.cells[m].high - row.cells[m].mean]
                if m in row.cells and not math.isnan(row.cells[m].half)
                else [0, 0]
                for m in metrics
            ]
        ).T
        ax.bar(
            x + (i - (len(summary.rows) - 1) / 2) * width,
            means,
            width,
            yerr=errs,
            capsize=2,
            label=f"{row.label} (n={row.n})",
        )
    ax.set_xticks(x, metrics)
    ax.set_ylabel("%")
    ax.set_title(f"{summary.dataset}: mean ± 95% CI")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
