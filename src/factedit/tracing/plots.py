"""Figures of causal traces, in the style of the ROME paper (Figs. 1–3).

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend
switch), so plotting works headless and does not disturb a user's interactive
session. Every file is written atomically.

An estimated trace (``method="attribution"``) is drawn from its scores (estimates, exact at the
re-patched cells); each re-patched cell carries a black dot, the titles say "estimated", and
:func:`plot_certificate` draws estimate against exact value at those cells.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from factedit.paths import atomic_write_bytes
from factedit.tracing.effects import BUCKETS, EffectTable
from factedit.tracing.result import TraceResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

CMAPS = {
    "hidden": "Purples",
    "mlp": "Greens",
    "attn": "Reds",
    "hidden_sever_mlp": "Purples",
    "hidden_sever_attn": "Purples",
}
COLOURS = {
    "hidden": "tab:purple",
    "mlp": "tab:green",
    "attn": "tab:red",
    "hidden_sever_mlp": "tab:green",
    "hidden_sever_attn": "tab:red",
}
NAMES = {
    "hidden": "single restored layer",
    "mlp": "MLP",
    "attn": "Attn",
    "hidden_sever_mlp": "state, MLP severed",
    "hidden_sever_attn": "state, attention severed",
}
TITLES = {
    "hidden": "Impact of restoring state after corrupted input",
    "mlp": "Impact of restoring MLP after corrupted input",
    "attn": "Impact of restoring Attn after corrupted input",
    "hidden_sever_mlp": "Restoring state with MLP severed",
    "hidden_sever_attn": "Restoring state with attention severed",
}
FORMATS: tuple[str, ...] = ("png", "pdf")


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=150)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``stem.<fmt>`` for each format (atomically)."""
    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, bbox_inches="tight")
        path = Path(f"{stem}.{fmt}")
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def _xlabel(kind: str, window: int) -> str:
    if kind in ("mlp", "attn"):
        return f"center of interval of {window} restored {NAMES[kind]} layers"
    return "single restored layer"


def _draw_heatmap(fig: Figure, ax, result: TraceResult, kind: str, title: bool = True) -> None:
    scores = result.scores[kind]
    exact = result.exact_cells.get(kind, []) if result.estimated else []
    T, L = scores.shape
    labels = [repr(t)[1:-1] for t in result.tokens]
    for i in range(*result.subject_range):
        labels[i] += "*"
    finite = scores[np.isfinite(scores)]
    vmax = max(float(finite.max()) if finite.size else result.clean_prob, result.low_prob + 1e-6)
    mesh = ax.pcolormesh(np.ma.masked_invalid(scores), cmap=CMAPS[kind], vmin=result.low_prob, vmax=vmax)
    ax.invert_yaxis()
    ax.set_yticks(np.arange(T) + 0.5)
    ax.set_yticklabels(labels)
    step = 5 if L > 12 else 1
    ax.set_xticks(np.arange(0, L, step) + 0.5)
    ax.set_xticklabels(range(0, L, step))
    ax.set_xlabel(_xlabel(kind, result.window))
    if exact:  # the cells re-patched exactly: a dot at each cell's centre
        ax.scatter([layer + 0.5 for _, layer in exact], [t + 0.5 for t, _ in exact], s=9, c="black", marker="o", lw=0)
    if title:
        note = ""
        if result.estimated:
            note = (
                f"\n(first-order estimate; • = {len(exact)} cells re-patched exactly)"
                if exact
                else "\n(first-order estimate)"
            )
        ax.set_title(TITLES[kind] + note, fontsize=9)
    cbar = fig.colorbar(mesh, ax=ax)
    cbar.ax.set_title(f"p({result.answer.strip()})", fontsize=8, y=-0.08)
    cbar.set_label("probability", fontsize=8)


def plot_trace(result: TraceResult, kind: str, stem: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """One heatmap: tokens (subject marked ``*``) by layers, coloured by the restored answer probability."""
    fig = _new_figure(3.6, 0.3 * len(result.tokens) + 1.4)
    _draw_heatmap(fig, fig.add_subplot(), result, kind)
    return save_figure(fig, stem, formats)


def plot_trace_combined(result: TraceResult, stem: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """All traced kinds side by side (paper Fig. 1)."""
    kinds = result.kinds
    fig = _new_figure(3.8 * len(kinds), 0.3 * len(result.tokens) + 1.6)
    for i, kind in enumerate(kinds):
        _draw_heatmap(fig, fig.add_subplot(1, len(kinds), i + 1), result, kind)
    fig.suptitle(
        f"{result.prompt!r} → {result.answer!r}  (clean p={result.clean_prob:.3f}, corrupted p={result.low_prob:.3f})",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, stem, formats)


def plot_certificate(result: TraceResult, stem: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Per kind, estimated against exact restored probability at the re-patched cells (top-K and random)."""
    kinds = [k for k in result.kinds if result.certificate.get(k, {}).get("cells")]
    fig = _new_figure(3.4 * max(1, len(kinds)), 3.3)
    for i, kind in enumerate(kinds):
        cert = result.certificate[kind]
        ax = fig.add_subplot(1, len(kinds), i + 1)
        for pick, marker in (("top", "o"), ("random", "x")):
            cells = [c for c in cert["cells"] if c["pick"] == pick]
            ax.scatter(
                [c["exact"] for c in cells],
                [c["estimate"] for c in cells],
                marker=marker,
                color=COLOURS[kind],
                label=f"top {cert['k']}" if pick == "top" else "random",
                s=18,
            )
        values = [v for c in cert["cells"] for v in (c["exact"], c["estimate"])]
        low, high = min(values), max(values)
        ax.plot([low, high], [low, high], color="0.6", lw=0.8)
        rho = "n/a" if cert["spearman"] is None else f"{cert['spearman']:.2f}"
        overlap = "n/a" if cert["top_k_overlap"] is None else f"{cert['top_k_overlap']:.2f}"
        ax.set_title(f"{NAMES[kind]}\nSpearman {rho}, top-{cert['k']} overlap {overlap}", fontsize=8)
        ax.set_xlabel("exact p(answer) after restoring", fontsize=8)
        ax.set_ylabel("estimated p(answer)", fontsize=8)
        ax.locator_params(nbins=4)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, stem, formats)


def plot_trace_all(
    result: TraceResult, out_dir: str | Path, stem: str = "trace", formats: Sequence[str] = FORMATS
) -> list[Path]:
    """One heatmap per kind plus the combined figure (and the certificate's scatter when cells were re-patched)."""
    out = Path(out_dir)
    paths = []
    for kind in result.kinds:
        paths += plot_trace(result, kind, out / f"{stem}_{kind}", formats)
    paths += plot_trace_combined(result, out / f"{stem}_all", formats)
    if result.estimated and any(c.get("cells") for c in result.certificate.values()):
        paths += plot_certificate(result, out / f"{stem}_certificate", formats)
    return paths


def plot_average_effects(table: EffectTable, out_dir: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Line plots (mean indirect effect per layer with 95% CI bands) per kind, a combined figure,
    averaged heatmaps (bucket × layer, paper Fig. 2 style) and the severed-path comparison (Fig. 3)."""
    out = Path(out_dir)
    paths: list[Path] = []
    main = [k for k in ("hidden", "mlp", "attn") if k in table.kinds()]
    styles = dict(zip(BUCKETS, ["-", "-", "-", "--", "--", "-"], strict=True))
    colours = dict(zip(BUCKETS, ["tab:blue", "tab:cyan", "tab:orange", "tab:olive", "tab:gray", "black"], strict=True))

    def lines(ax, kind: str) -> None:
        for bucket in BUCKETS:
            s = table.series(kind, bucket)
            if s is None:
                continue
            ax.plot(s["layer"], s["mean"], styles[bucket], color=colours[bucket], label=bucket, lw=1.4)
            ax.fill_between(s["layer"], s["ci95_low"], s["ci95_high"], color=colours[bucket], alpha=0.18, lw=0)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.set_xlabel("layer" if kind == "hidden" else f"center of {NAMES[kind]} window")
        ax.set_ylabel("average indirect effect on p(answer)")
        ax.set_title(f"{NAMES[kind] if kind != 'hidden' else 'hidden state'} (n={table.n_facts})", fontsize=9)

    for kind in main:
        fig = _new_figure(5.0, 3.4)
        ax = fig.add_subplot()
        lines(ax, kind)
        ax.legend(fontsize=7)
        paths += save_figure(fig, out / f"effects_{kind}", formats)
    if main:
        fig = _new_figure(4.6 * len(main), 3.6)
        for i, kind in enumerate(main):
            ax = fig.add_subplot(1, len(main), i + 1)
            lines(ax, kind)
            if i == 0:
                ax.legend(fontsize=7)
        fig.suptitle(
            f"Average indirect effects over {table.n_facts} facts "
            f"(clean p={table.mean_clean_prob:.3f}, corrupted p={table.mean_low_prob:.3f})",
            fontsize=9,
        )
        fig.tight_layout()
        paths += save_figure(fig, out / "effects_all", formats)

        fig = _new_figure(4.4 * len(main), 2.4)
        for i, kind in enumerate(main):
            ax = fig.add_subplot(1, len(main), i + 1)
            present = [b for b in BUCKETS if table.series(kind, b) is not None]
            grid = np.full((len(present), table.num_layers), np.nan)
            for r, bucket in enumerate(present):
                s = table.series(kind, bucket)
                grid[r, s["layer"].astype(int)] = s["mean"]
            mesh = ax.pcolormesh(np.ma.masked_invalid(grid), cmap=CMAPS[kind], vmin=min(0.0, np.nanmin(grid)))
            ax.invert_yaxis()
            ax.set_yticks(np.arange(len(present)) + 0.5)
            ax.set_yticklabels(present, fontsize=7)
            step = 5 if table.num_layers > 12 else 1
            ax.set_xticks(np.arange(0, table.num_layers, step) + 0.5)
            ax.set_xticklabels(range(0, table.num_layers, step))
            ax.set_xlabel("layer" if kind == "hidden" else f"center of {NAMES[kind]} window", fontsize=8)
            ax.set_title(f"Average indirect effect: {NAMES[kind] if kind != 'hidden' else 'hidden state'}", fontsize=9)
            fig.colorbar(mesh, ax=ax).set_label("AIE (probability)", fontsize=7)
        fig.tight_layout()
        paths += save_figure(fig, out / "effects_heatmaps", formats)

    severed = [k for k in ("hidden_sever_mlp", "hidden_sever_attn") if k in table.kinds()]
    if severed and table.series("hidden", "last subject token") is not None:
        fig = _new_figure(5.0, 3.4)
        ax = fig.add_subplot()
        bucket = "last subject token"
        base = table.series("hidden", bucket)
        width = 0.28
        ax.bar(base["layer"] - width, base["mean"], width, color="tab:purple", label="effect of a single state")
        for i, kind in enumerate(severed):
            s = table.series(kind, bucket)
            ax.bar(
                s["layer"] + i * width,
                s["mean"],
                width,
                color=COLOURS[kind],
                label="with MLP severed" if kind == "hidden_sever_mlp" else "with attention severed",
            )
        ax.set_xlabel("layer at which the single hidden state is restored")
        ax.set_ylabel("average indirect effect on p(answer)")
        ax.set_title(f"Severed paths at the last subject token (n={table.n_facts})", fontsize=9)
        ax.legend(fontsize=7)
        paths += save_figure(fig, out / "effects_severed", formats)
    log.info("wrote %d figure files to %s", len(paths), out)
    return paths
