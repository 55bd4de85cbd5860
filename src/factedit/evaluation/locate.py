"""``factedit locate``: a model's ROME and MEMIT layers from its own causal trace and a short layer sweep.

The rule (documented in docs/locate.md, numbers kept in ``locate.json`` beside the files it writes):

1. **Trace.** Trace the first ``n_facts`` known facts the model predicts (known_1000; MLP kind only,
   window ``window``, ``samples`` noise samples) and average the indirect effect of restoring the MLP
   outputs at the *last subject token*, per window centre. The **rule layer** is where it peaks: ROME's
   reading of Fig. 2 (the MLPs at the last subject token mediate factual recall).
2. **Sweep.** Edit ``sweep_cases`` CounterFact records with ROME at each layer within ``radius`` of the
   rule layer (records ``sweep_start``…, by default after the first 500, so that the dev-100/dev-500
   checks are not tuned on), scoring ES, PS and NS. The **best layer** maximises the CounterFact score
   S, the harmonic mean of ES, PS and NS (ROME, Sec. 4); ties go to the layer nearer the rule's.
3. **Write.** ``rome.json`` (the method's full hyper-parameters with the best layer), ``memit.json``
   (MEMIT's with ``count`` consecutive layers centred on the rule layer, ``count`` = GPT-J's share of
   depth in official MEMIT: 6 of 28 layers, at least 2), and ``locate.json`` (trace curve, sweep table,
   both picks, settings). Hase et al. (2023) found that where tracing localises a fact does not
   predict where editing works best; reporting the rule layer against the sweep's best measures that
   here.

Everything is resumable: the trace and every sweep layer are run folders of their own, so a rerun of
the same command continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.methods import get_method
from factedit.errors import FactEditError
from factedit.evaluation.config import RunConfig
from factedit.evaluation.runner import run_evaluation
from factedit.evaluation.summary import summarize_runs
from factedit.models.architectures import num_layers
from factedit.paths import atomic_write_bytes, check_output_path
from factedit.progress import Progress, as_progress
from factedit.tracing.dataset import trace_dataset

log = logging.getLogger(__name__)
LOCATE_FORMAT = "factedit-locate-v1"
TRACE_BUCKET = "last subject token"
MEMIT_SHARE = 6 / 28  # official MEMIT on GPT-J: layers 3-8 of 28


@dataclass(frozen=True)
class LocateSettings:
    """How much tracing and sweeping :func:`locate` does (defaults: 100 facts, 5 layers x 20 cases)."""

    n_facts: int = 100
    samples: int = 10
    window: int = 10
    seed: int = 1
    radius: int = 2
    sweep_cases: int = 20
    sweep_start: int = 500
    data_path: str | None = None  # CounterFact file (default: the data folder's)
    knowns_path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # ROME hyper-parameters of the sweep (not layers)
    # Trace with first-order (attribution-patching) estimates instead of exact restorations: minutes
    # instead of hours on a deep model; a window's estimate sums its layers' (docs/tracing.md).
    approx: bool = False

    def check(self) -> None:
        for name, low in (("n_facts", 1), ("samples", 1), ("window", 1), ("sweep_cases", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FactEditError(f"{name} must be a whole number of at least {low}, not {value!r}")
        for name in ("radius", "sweep_start", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FactEditError(f"{name} must be a whole number of at least 0, not {value!r}")
        if self.radius > 16:
            raise FactEditError(f"radius must be at most 16 layers (asked {self.radius})")


@dataclass
class LocateReport:
    """What :func:`locate` found; ``to_dict`` is ``locate.json``."""

    model: str | None
    num_layers: int
    rule_layer: int
    rule_effect: float
    best_layer: int
    memit_layers: list[int]
    trace: list[dict[str, float]]  # per window centre: layer, mean AIE, 95% CI, n
    sweep: list[dict[str, Any]]  # per layer: ES, PS, NS, S (and their intervals)
    settings: LocateSettings
    n_facts: int
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["settings"] = asdict(self.settings)
        return {"format": LOCATE_FORMAT, **out}


def memit_layers_around(center: int, n_layers: int) -> list[int]:
    """``count`` consecutive layers centred on ``center`` (clamped to the model), count = 6/28 of depth."""
    count = max(2, round(MEMIT_SHARE * n_layers))
    first = min(max(0, center - count // 2), max(0, n_layers - count))
    return list(range(first, min(n_layers, first + count)))


def sweep_layers(rule_layer: int, radius: int, n_layers: int) -> list[int]:
    return [layer for layer in range(rule_layer - radius, rule_layer + radius + 1) if 0 <= layer < n_layers]


def best_of_sweep(sweep: list[dict[str, Any]], rule_layer: int) -> int:
    """The layer with the highest S (ties: the one nearest the rule layer, then the lower)."""
    return max(sweep, key=lambda row: (round(row["S"], 6), -abs(row["layer"] - rule_layer), -row["layer"]))["layer"]


def locate(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    out_dir: str | Path,
    settings: LocateSettings = LocateSettings(),
    *,
    model_name: str | None = None,
    progress: Progress | bool | None = None,
) -> LocateReport:
    """Trace, sweep, write ``rome.json``, ``memit.json`` and ``locate.json`` under ``out_dir`` (resumable)."""
    settings.check()
    out = check_output_path(out_dir, "locate output folder")
    progress = as_progress(progress)
    n_layers = num_layers(model)
    table = trace_dataset(
        model,
        tok,
        out / "trace",
        n=settings.n_facts,
        data=settings.knowns_path,
        kinds=("mlp",),
        severed=False,
        samples=settings.samples,
        window=settings.window,
        seed=settings.seed,
        method="attribution" if settings.approx else "fast",
        plots=True,
        progress=progress,
    )
    series = table.series("mlp", TRACE_BUCKET)
    if series is None or table.n_facts == 0:
        raise FactEditError("the trace found no known fact the model predicts: nothing to locate from")
    trace = [
        {
            "layer": int(layer),
            "mean": float(mean),
            "ci95_low": float(low),
            "ci95_high": float(high),
            "n": int(n),
        }
        for layer, mean, low, high, n in zip(
            series["layer"], series["mean"], series["ci95_low"], series["ci95_high"], series["n"], strict=True
        )
    ]
    peak = max(trace, key=lambda row: row["mean"])
    rule_layer = peak["layer"]
    log.info("MLP effect at the last subject token peaks at layer %d (AIE %.4f)", rule_layer, peak["mean"])

    candidates = sweep_layers(rule_layer, settings.radius, n_layers)
    folders = []
    for i, layer in enumerate(candidates):
        folder = out / "sweep" / f"layer{layer:02d}"
        config = RunConfig(
            method="rome",
            dataset="counterfact",
            n=settings.sweep_cases,
            start=settings.sweep_start,
            data_path=settings.data_path,
            overrides={**settings.overrides, "layers": [layer]},
            pre_from=str(folders[0]) if i else None,  # the unedited scores once, shared by every layer
        )
        log.info("sweep: ROME at layer %d (%d/%d)", layer, i + 1, len(candidates))
        run_evaluation(model, tok, config, folder, model_name=model_name, progress=progress)
        folders.append(folder)
    summary = summarize_runs(folders, pre=False)
    sweep = []
    for layer, row in zip(candidates, summary.rows, strict=True):
        cells = {k: row.cells[k] for k in ("ES", "PS", "NS", "S") if k in row.cells}
        sweep.append(
            {
                "layer": layer,
                "n": row.n,
                **{k: round(c.mean, 2) for k, c in cells.items()},
                **{f"{k}_ci95": [round(c.low, 2), round(c.high, 2)] for k, c in cells.items()},
            }
        )
    best = best_of_sweep(sweep, rule_layer)
    report = LocateReport(
        model=model_name,
        num_layers=n_layers,
        rule_layer=rule_layer,
        rule_effect=peak["mean"],
        best_layer=best,
        memit_layers=memit_layers_around(rule_layer, n_layers),
        trace=trace,
        sweep=sweep,
        settings=settings,
        n_facts=table.n_facts,
    )
    report.files = write_hparams(model, report, out)
    atomic_write_bytes(out / "locate.json", json.dumps(report.to_dict(), indent=1).encode())
    report.files["locate"] = str(out / "locate.json")
    return report


def write_hparams(model: nn.Module, report: LocateReport, out: Path) -> dict[str, str]:
    """Full ROME and MEMIT hyper-parameter files for the located layers (usable with ``--hparams``)."""
    where = (
        f"factedit locate: MLP effect at the last subject token over {report.n_facts} known facts peaks at "
        f"layer {report.rule_layer} (AIE {report.rule_effect:.4f}); ROME sweep over layers "
        f"{report.sweep[0]['layer']}-{report.sweep[-1]['layer']} on {report.settings.sweep_cases} CounterFact "
        f"records from {report.settings.sweep_start}: best S at layer {report.best_layer}"
    )
    files = {}
    for method, layers, why in (
        ("rome", [report.best_layer], "the sweep's best layer"),
        ("memit", report.memit_layers, f"{len(report.memit_layers)} layers centred on the trace peak"),
    ):
        fields = get_method(method).hparams_class.model_fields
        shared = {k: v for k, v in report.settings.overrides.items() if k in fields}
        hp = get_method(method).hparams(model, None, {**shared, "layers": layers})
        data = {"_comment": f"{where}; {method} layers: {why} (locate.json has the numbers)", **hp.model_dump()}
        path = out / f"{method}.json"
        atomic_write_bytes(path, json.dumps(data, indent=1).encode())
        files[method] = str(path)
    return files
