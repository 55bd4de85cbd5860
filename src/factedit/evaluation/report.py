"""One self-contained HTML page about evaluation runs, to open offline: ``factedit report RUN... --out DIR``.

The page holds the summary table of :func:`~factedit.evaluation.summary.summarize_runs` (the same numbers
``factedit summarize`` prints, CIs included, with the generative and EasyEdit columns when the runs have
them), the capability table, bar plots per metric across runs, drift curves (``drift.jsonl``, capability
fields included) and, for a sample of cases, the prompt with the two targets' probabilities and the greedy
answers before and after the edit, side by side. Figures are PNGs drawn with matplotlib's Agg backend,
embedded as ``data:`` URIs (and also written beside the page); the page has no script and loads nothing
from the network. Runs of every format render: a block a run lacks is left out, with a line saying so.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError
from factedit.evaluation.batched import read_drift, read_guard
from factedit.evaluation.summary import CAPABILITY_COLUMNS, Run, Summary, _fmt, load_run, summarize_runs
from factedit.version import __version__

log = logging.getLogger(__name__)

PAGE = "index.html"
MAX_CASES = 1000
DRIFT_FIELDS = [  # (title, field of a drift point, or capability.<field>, scale)
    ("earlier edits holding (%)", "edits_holding", 100),
    ("their paraphrases holding (%)", "paraphrases_holding", 100),
    ("neighbours keeping the true answer (%)", "neighbourhood_kept", 100),
    ("fluency: GE of seeded samples", "ngram_entropy", 100),
    ("edits refused by the guard", "refused", 1),
    ("perplexity, WikiText-2", "capability.ppl_wikitext", 1),
    ("perplexity, held-out Wikipedia", "capability.ppl_wikipedia", 1),
    ("known facts (%)", "capability.known_acc", 100),
    ("capability GE (unrelated prompts)", "capability.ngram_entropy", 100),
]
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px; color: #1b1b1b; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.notes li { color: #555; } .muted { color: #777; } .figs img { max-width: 100%; margin: 6px 8px 6px 0; }
.case { border: 1px solid #ddd; border-radius: 4px; padding: 8px 12px; margin: 12px 0; }
.side { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; } .side pre { white-space: pre-wrap; margin: 0; }
#summary td.num, #views td.num { white-space: normal; min-width: 4.5em; }
.wide { overflow-x: auto; } .ok { color: #176b1d; } .bad { color: #a21b1b; } .refused { background: #fff1e0; }
"""


@dataclass
class Figure:
    name: str  # file name beside the page
    title: str
    png: bytes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_figures(summary: Summary) -> list[Figure]:
    """One bar chart per metric column: a bar per row (run) with its 95% interval."""
    plt = _pyplot()
    figures = []
    for column in summary.columns:
        rows = [r for r in summary.rows if column in r.cells and not math.isnan(r.cells[column].mean)]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(1.6 + 0.75 * len(rows), 2.8))
        means = [r.cells[column].mean for r in rows]
        errs = [
            [0 if math.isnan(r.cells[column].half) else r.cells[column].mean - r.cells[column].low for r in rows],
            [0 if math.isnan(r.cells[column].half) else r.cells[column].high - r.cells[column].mean for r in rows],
        ]
        colours = [f"C{summary.rows.index(r) % 10}" for r in rows]  # a run keeps its colour in every chart
        ax.bar(range(len(rows)), means, yerr=errs, capsize=3, color=colours)
        ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_title(column, fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        safe = "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in column.replace("Δ", "delta_"))
        figures.append(Figure(f"metric_{safe}.png", column, _png(fig)))
        plt.close(fig)
    return figures


def _field(point: dict[str, Any], key: str) -> float | None:
    value: Any = point
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def drift_figure(drifts: dict[str, list[dict[str, Any]]]) -> Figure | None:
    """Drift curves of every run that has drift points: one panel per measured field, a line per run."""
    drifts = {label: points for label, points in drifts.items() if points}
    fields = [f for f in DRIFT_FIELDS if any(_field(p, f[1]) is not None for ps in drifts.values() for p in ps)]
    if not fields:
        return None
    plt = _pyplot()
    cols = min(4, len(fields))
    rows = math.ceil(len(fields) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, (title, key, scale) in zip(axes.flat, fields):
        for i, (label, points) in enumerate(drifts.items()):
            xy = [(p.get("edits", p["step"]), _field(p, key)) for p in points if _field(p, key) is not None]
            if xy:
                ax.plot([x for x, _ in xy], [scale * y for _, y in xy], marker="o", ms=3, color=f"C{i}", label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("edits in the model", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(fields) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out = Figure("drift.png", "drift", _png(fig))
    plt.close(fig)
    return out


# -- HTML -----------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode()
    return f'<img alt="{_e(figure.title)}" title="{_e(figure.title)}" src="data:image/png;base64,{data}">'


def _is_other_view(column: str) -> bool:
    """Generative (WILD), EasyEdit's token accuracies and cost: the second table, beside ROME's metrics."""
    return column.startswith(("Gen ", "EE ")) or column in ("edit s", "cases/min")


def summary_table(summary: Summary) -> str:
    """ROME/MEMIT's teacher-forced metrics in ``#summary``; the other views and the cost in ``#views`` (one
    table with every column is too wide to read)."""
    main = [c for c in summary.columns if not _is_other_view(c)]
    other = [c for c in summary.columns if _is_other_view(c)]
    refused = any(r.refused for r in summary.rows)
    out = [_table("summary", summary, main, refused)]
    if other:
        out.append("<p class=muted>Generative success (WILD), EasyEdit's token accuracies and cost:</p>")
        out.append(_table("views", summary, other, False))
    return "\n".join(out)


def _table(table_id: str, summary: Summary, columns: list[str], refused: bool) -> str:
    head = ["run", "method", "n", *columns, *(["refused"] if refused else [])]
    out = [
        f'<div class="wide"><table id="{table_id}"><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
    ]
    for row in summary.rows:
        cells = [_fmt(row.cells.get(c), 2 if c == "edit s" else 1) for c in columns]
        if refused:
            cells.append(str(row.refused))
        out.append(
            f"<tr><td>{_e(row.label)}</td><td>{_e(row.method)}</td><td class=num>{row.n}</td>"
            + "".join(f"<td class=num>{_wrap_after_mean(c)}</td>" for c in cells)
            + "</tr>"
        )
    return "\n".join(out) + "</tbody></table></div>"


def _wrap_after_mean(cell: str) -> str:
    """A cell escaped for HTML that a narrow column may break only between the mean and its interval
    (so that a table with many columns fits the page without splitting an interval)."""
    mean, _, interval = cell.partition(" ")
    return _e(mean) + (" " + _e(interval).replace(" ", "&nbsp;") if interval else "")


def capability_table(rows: list[dict[str, Any]]) -> str:
    head = ["run", "state", "edits in the model", *(c for c, _, _, _ in CAPABILITY_COLUMNS)]
    out = ['<table id="capability"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [
            "–" if row.get(key) is None else f"{scale * row[key]:.{digits}f}"
            for _, key, scale, digits in CAPABILITY_COLUMNS
        ]
        state = row["state"] if row["measured"] == 1 else f"{row['state']} (mean of {row['measured']})"
        out.append(
            f"<tr><td>{_e(row['run'])}</td><td>{_e(state)}</td><td class=num>{row['edits']:g}</td>"
            + "".join(f"<td class=num>{_e(c)}</td>" for c in cells)
            + "</tr>"
        )
    return "\n".join(out) + "</table>"


def _prob(nll: float | None) -> str:
    return "–" if nll is None else f"{100 * math.exp(-nll):.2f}%"


def _targets_block(block: dict[str, Any] | None, rewrite: dict[str, Any]) -> str:
    """The rewrite prompt's two targets as the record scores them (per-token NLL as probability), the winner
    first; the records keep these two candidates, not a full top-k list."""
    pairs = (block or {}).get("rewrite_prompts_probs") or []
    if not pairs:
        return "<span class=muted>not recorded</span>"
    pair = pairs[0]
    scored = sorted(
        [
            (pair.get("target_new"), f"new: {rewrite.get('target_new')}"),
            (pair.get("target_true"), f"true: {rewrite.get('target_true')}"),
        ],
        key=lambda x: math.inf if x[0] is None else x[0],
    )
    won = "new" if scored[0][1].startswith("new") else "true"
    rows = "".join(f"<li>{_e(name)} — p per token ≈ {_prob(nll)}</li>" for nll, name in scored)
    return f"<div>top of the two: <b>{won}</b></div><ol>{rows}</ol>"


def _answers_block(block: dict[str, Any] | None, key: str) -> str:
    answers = (block or {}).get(f"{key}_prompts_generated") or []
    if not answers:
        return "<span class=muted>no greedy answers recorded (run made before them, or --no-generative)</span>"
    items = []
    for answer in answers[:3]:
        mark = (
            ""
            if "success" not in answer
            else (" <span class=ok>✓</span>" if answer["success"] else " <span class=bad>✗</span>")
        )
        items.append(f"<pre>{_e(answer.get('text', ''))}</pre>{mark}")
    return "<br>".join(items)


def _fill(prompt: str, subject: str) -> str:
    return prompt.replace("{}", subject, 1)


def case_section(run: Run, case_ids: list[str]) -> str:
    """The sample cases of one run: prompt, targets and greedy answers, before | after."""
    parts = [f"<h3>{_e(run.label)}</h3>"]
    shown = 0
    for key in case_ids:
        record = run.cases.get(key)
        if record is None:
            continue
        shown += 1
        rewrite = record.get("requested_rewrite", {})
        guard = record.get("guard") or {}
        refused = guard.get("verdict") == "refused"
        note = (
            f"<div class=bad>refused by the guard: {_e('; '.join(guard.get('reasons', [])))}</div>" if refused else ""
        )
        post_text = (record.get("post") or {}).get("text")
        if isinstance(post_text, list):
            post_text = post_text[0] if post_text else None
        sample = (
            f"<div><b>sampled text after the edit</b> (GE metric):<pre>{_e(post_text)}</pre></div>" if post_text else ""
        )
        parts.append(
            f'<div class="case{" refused" if refused else ""}" data-case="{_e(key)}">'
            f"<div><b>case {_e(key)}</b>: {_e(_fill(rewrite.get('prompt', ''), rewrite.get('subject', '')))} "
            f"<b>{_e(rewrite.get('target_true'))}</b> → <b>{_e(rewrite.get('target_new'))}</b></div>{note}"
            '<div class="side">'
            f"<div><h4>before the edit</h4>{_targets_block(record.get('pre'), rewrite)}"
            f"<div><b>greedy answer</b>:</div>{_answers_block(record.get('pre'), 'rewrite')}</div>"
            f"<div><h4>after the edit</h4>{_targets_block(record.get('post'), rewrite)}"
            f"<div><b>greedy answer</b>:</div>{_answers_block(record.get('post'), 'rewrite')}</div>"
            f"</div>{sample}</div>"
        )
    if not shown:
        parts.append("<p class=muted>none of the sample cases is in this run</p>")
    return "\n".join(parts)


def _sample_ids(runs: list[Run], n: int) -> list[str]:
    """The first ``n`` case ids (in id order) that the first run finished."""
    keys = list(runs[0].cases)
    keys.sort(key=lambda k: (0, int(k)) if k.lstrip("-").isdigit() else (1, k))
    return keys[:n]


def _run_list(runs: list[Run]) -> str:
    rows = [
        "<table id=runs><tr><th>run</th><th>method</th><th>model</th><th>data</th><th>cases</th><th>failed</th>"
        "<th>protocol</th><th>updated</th></tr>"
    ]
    for run in runs:
        m = run.manifest
        model = m.get("model") or {}
        mode = m.get("mode") or {}
        guard = (m.get("config") or {}).get("guard")
        protocol = f"{mode.get('kind', 'single')}" + (f", batch {mode['batch']}" if mode.get("batch") else "")
        protocol += ", guarded" if guard else ""
        rows.append(
            f"<tr><td>{_e(run.label)}</td><td>{_e(m.get('method'))}</td><td>{_e(model.get('name', ''))}</td>"
            f"<td>{_e((m.get('dataset') or {}).get('name'))}</td><td class=num>{len(run.cases)}</td>"
            f"<td class=num>{len(run.errors)}</td><td>{_e(protocol)}</td><td>{_e(m.get('updated', ''))}</td></tr>"
        )
    return "\n".join(rows) + "</table>"


def write_report(
    paths: list[str | Path], out: str | Path, *, cases: int = 10, common: bool = True, pre: bool = True
) -> Path:
    """Write ``out/index.html`` (and its figures as PNGs beside it) about the runs ``paths``; returns the page."""
    if isinstance(cases, bool) or not isinstance(cases, int) or not 0 <= cases <= MAX_CASES:
        raise FactEditError(f"sample cases must be a whole number from 0 to {MAX_CASES}, not {cases!r}")
    summary = summarize_runs(paths, common=common, pre=pre)
    runs = [load_run(p) for p in paths]
    out = Path(out)
    figures = metric_figures(summary)
    drifts = {run.label: read_drift(run.path) for run in runs}
    drift = drift_figure(drifts)
    body = [
        f"<h1>factedit report: {_e(', '.join(r.label for r in runs))}</h1>",
        f"<p class=muted>written {datetime.now(UTC).isoformat(timespec='seconds')} by factedit {_e(__version__)}; "
        f"data set <b>{_e(summary.dataset)}</b></p>",
        "<h2>Runs</h2>",
        _run_list(runs),
        "<h2>Summary</h2>",
        "<p class=muted>mean ± 95% CI over cases; [low, high] where the interval is asymmetric (bootstrap for S, "
        "clipped to 0–100 for rates); the same numbers as <code>factedit summarize</code>.</p>",
        summary_table(summary),
    ]
    if summary.capability:
        body += ["<h3>General capability</h3>", capability_table(summary.capability)]
    if summary.notes:
        body.append("<ul class=notes>" + "".join(f"<li>{_e(n)}</li>" for n in summary.notes) + "</ul>")
    body += ["<h2>Metrics across runs</h2>", '<div class="figs">' + "".join(_img(f) for f in figures) + "</div>"]
    body.append("<h2>Drift</h2>")
    if drift is not None:
        body.append(f'<div class="figs">{_img(drift)}</div>')
        guarded = [(r.label, read_guard(r.path)) for r in runs]
        for label, g in guarded:
            if g:
                steps = g["steps"]
                refused = [s for s in steps if s.get("verdict") == "refused"]
                body.append(f"<p>{_e(label)}: the guard judged {len(steps)} steps and refused {len(refused)}.</p>")
    else:
        body.append("<p class=muted>no run has drift points (sequential runs with --drift-every)</p>")
    body.append(f"<h2>Sample cases (the first {cases} of {_e(runs[0].label)})</h2>")
    ids = _sample_ids(runs, cases)
    body += [case_section(run, ids) for run in runs]
    page = (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>factedit report: {_e(', '.join(r.label for r in runs))}</title>"
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    for figure in [*figures, *([drift] if drift else [])]:
        (out / figure.name).write_bytes(figure.png)
    path = out / PAGE
    path.write_text(page, encoding="utf-8")
    log.info("report written to %s (%d figures)", path, len(figures) + (drift is not None))
    return path
