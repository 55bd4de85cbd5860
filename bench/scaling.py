"""Scaling table and plot: how ES/PS/NS/GE change with the number of edits in the model, per method.

    python bench/scaling.py memit:runs/scale/memit_10 memit:runs/scale/memit_100 \
        rome-seq:runs/scale/rome_seq_10 ... [--out out/scaling]

Each argument is LABEL:RUN_FOLDER (a run written by ``factedit eval`` with ``--batch`` or
``--sequential``); the number of edits is read from the run (its cases). Writes scaling.md,
scaling.csv and scaling.png/.pdf (one panel per metric, one line per label, 95% CIs as bands),
and, for sequential runs with ``--drift-every``, drift.png/.pdf: edits still holding, neighbours
keeping the true answer and fluency (GE) after every measured step of the longest run per label.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from factedit.evaluation.batched import read_drift
from factedit.evaluation.summary import load_run, summarize_runs

METRICS = ["ES", "PS", "NS", "S", "GE"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="LABEL:RUN_FOLDER")
    ap.add_argument("--out", default="out/scaling")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.runs:
        label, folder = spec.split(":", 1)
        run = load_run(folder)
        edits = len(run.cases) + len(run.errors)
        summary = summarize_runs([folder], common=False, pre=True)
        pre_row, post_row = summary.rows[0], summary.rows[-1]
        edit_s = sum(c.get("timing", {}).get("edit_s", 0.0) for c in run.cases.values())
        rows.append(
            {
                "label": label,
                "edits": edits,
                "folder": folder,
                "mode": run.manifest.get("mode", {}),
                "post": post_row.cells,
                "pre": pre_row.cells,
                "edit_s": edit_s,
                "steps_s": _edit_seconds_by_step(run.cases.values()),
            }
        )
    rows.sort(key=lambda r: (r["label"], r["edits"]))

    lines = [
        "| method | edits | mode | " + " | ".join(METRICS) + " | NS unedited | edit time | edits/s |",
        "|---|---:|---|" + "---:|" * (len(METRICS) + 3),
    ]
    for r in rows:
        cells = [f"{r['post'][m].mean:.1f} ± {r['post'][m].half:.1f}" if m in r["post"] else "–" for m in METRICS]
        mode = r["mode"]
        mode_text = f"{mode.get('kind', '?')}" + (f" (batch {mode['batch']})" if "batch" in mode else "")
        pre_ns = f"{r['pre']['NS'].mean:.1f}" if "NS" in r["pre"] else "–"
        rate = f"{r['edits'] / r['edit_s']:.2f}" if r["edit_s"] else "–"
        lines.append(
            f"| {r['label']} | {r['edits']} | {mode_text} | " + " | ".join(cells) + f" | {pre_ns} | "
            f"{r['edit_s'] / 60:.1f} min | {rate} |"
        )
    lines += ["", *drift_table(rows)]
    table = "\n".join(lines)
    (out / "scaling.md").write_text(table + "\n")
    with open(out / "scaling.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "edits", "metric", "mean", "ci_low", "ci_high"])
        for r in rows:
            for m in METRICS:
                if m in r["post"]:
                    c = r["post"][m]
                    w.writerow([r["label"], r["edits"], m, f"{c.mean:.4g}", f"{c.low:.4g}", f"{c.high:.4g}"])
    print(table)
    plot(rows, out / "scaling")
    plot_drift(rows, out / "drift")


def _edit_seconds_by_step(cases) -> dict[int, float]:
    """Editing seconds of each sequential step (the per-case shares of its edit time, summed)."""
    out: dict[int, float] = defaultdict(float)
    for case in cases:
        step = (case.get("edit") or {}).get("step")
        if step is not None:
            out[int(step)] += case.get("timing", {}).get("edit_s", 0.0)
    return out


def _scaled(value: float | None, scale: float) -> str:
    return "–" if value is None else f"{scale * value:.1f}"


def drift_table(rows: list[dict]) -> list[str]:
    """Along each sequential run: its drift points, with the editing time spent up to each (markdown lines).
    A point measuring every edit so far (``--drift-cases`` at least the edits) gives ES and PS over all of
    them (new beats true on the rewrite prompt and on the paraphrases) and NS on two neighbours per case."""
    lines = [
        "| method | edits in the model | edits measured | edits holding (ES) | paraphrases holding (PS) |"
        " neighbours keeping truth | GE | edit time so far | edits/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    found = False
    for r in rows:
        for d in read_drift(r["folder"]):
            if not d.get("edits"):
                continue
            found = True
            spent = sum(s for step, s in r["steps_s"].items() if step < d["step"])
            cells = [_scaled(d.get(key), 100) for key in ("edits_holding", "paraphrases_holding", "neighbourhood_kept")]
            lines.append(
                f"| {r['label']} | {d['edits']} | {d.get('measured_cases', '–')} | " + " | ".join(cells) + " | "
                f"{_scaled(d.get('ngram_entropy'), 100)} | {spent / 60:.1f} min | "
                + (f"{d['edits'] / spent:.2f} |" if spent else "– |")
            )
    return lines if found else []


def _panels(n: int, width: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, 3.0), squeeze=False)
    return fig, axes[0]


def _finish(fig, axes, stem: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_xlabel("edits in the model")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(f"{stem}.{ext}", dpi=200)
    plt.close(fig)
    print(f"plot: {stem}.png")


def plot(rows: list[dict], stem: Path) -> None:
    metrics = [m for m in METRICS if any(m in r["post"] for r in rows)]
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    fig, axes = _panels(len(metrics), 3.0)
    for ax, metric in zip(axes, metrics):
        for label, points in by_label.items():
            pts = [p for p in points if metric in p["post"]]
            if not pts:
                continue
            x = [p["edits"] for p in pts]
            mean = [p["post"][metric].mean for p in pts]
            ax.plot(x, mean, marker="o", label=label)
            ax.fill_between(x, [p["post"][metric].low for p in pts], [p["post"][metric].high for p in pts], alpha=0.2)
        ax.set_xscale("log")
        ax.set_title(metric)
    _finish(fig, axes, stem)


DRIFT = [
    ("edits_holding", "earlier edits holding"),
    ("paraphrases_holding", "their paraphrases holding"),
    ("neighbourhood_kept", "neighbours keeping truth"),
    ("ngram_entropy", "fluency (GE)"),
]


def plot_drift(rows: list[dict], stem: Path) -> None:
    """Drift along each label's longest sequential run (points without a field are skipped)."""
    longest: dict[str, dict] = {}
    for r in rows:
        if read_drift(r["folder"]) and r["edits"] >= longest.get(r["label"], {"edits": -1})["edits"]:
            longest[r["label"]] = r
    if not longest:
        return
    fig, axes = _panels(len(DRIFT), 3.4)
    for ax, (key, title) in zip(axes, DRIFT):
        for label, r in longest.items():
            pts = [(d["edits"], d[key]) for d in read_drift(r["folder"]) if d.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=f"{label} ({r['edits']})")
        ax.set_title(title)
    _finish(fig, axes, stem)


if __name__ == "__main__":
    main()
