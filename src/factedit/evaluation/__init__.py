"""Evaluation harness: CounterFact and zsRE metrics as ROME/MEMIT define them, resumable runs, summaries.

Methods come from the one registry, :mod:`factedit.editing.methods`."""

from factedit.evaluation.cases import GenerationSettings, evaluate_counterfact, evaluate_zsre
from factedit.evaluation.config import RunConfig, RunReport
from factedit.evaluation.records import CaseLog
from factedit.evaluation.runner import run_evaluation
from factedit.evaluation.summary import load_run, plot, summarize_runs, to_csv, to_markdown

__all__ = [
    "CaseLog",
    "GenerationSettings",
    "RunConfig",
    "RunReport",
    "evaluate_counterfact",
    "evaluate_zsre",
    "load_run",
    "plot",
    "run_evaluation",
    "summarize_runs",
    "to_csv",
    "to_markdown",
]
