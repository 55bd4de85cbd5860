"""Evaluation harness: CounterFact and zsRE metrics as ROME/MEMIT define them, resumable runs, summaries."""

from factedit.evaluation.cases import GenerationSettings, evaluate_counterfact, evaluate_zsre
from factedit.evaluation.methods import METHODS, EditMethod, get_method, register_method
from factedit.evaluation.runner import CaseLog, RunConfig, RunReport, run_evaluation
from factedit.evaluation.summary import load_run, plot, summarize_runs, to_csv, to_markdown

__all__ = [
    "METHODS", "CaseLog", "EditMethod", "GenerationSettings", "RunConfig", "RunReport", "evaluate_counterfact",
    "evaluate_zsre", "get_method", "load_run", "plot", "register_method", "run_evaluation", "summarize_runs",
    "to_csv", "to_markdown",
]
