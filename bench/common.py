"""Shared bits of the benchmark scripts: machine description, CounterFact cases and their scores.

Scores come from the evaluation layer (:func:`factedit.evaluation.cases.evaluate_counterfact` and
ROME's per-prompt rule :func:`factedit.evaluation.metrics.prompt_success`), so a benchmark counts
exactly what ``factedit eval`` reports.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from machine import cpu_name

from factedit.data import CounterFactCase, load_counterfact
from factedit.evaluation.cases import evaluate_counterfact
from factedit.evaluation.metrics import prompt_success


def machine() -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"GPU: {gpu}; python {platform.python_version()}"
    )


def data_dir() -> Path:
    return Path(os.environ.get("FACTEDIT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def counterfact(n: int, start: int = 0) -> list[CounterFactCase]:
    """The CounterFact dev cases ``start .. start + n``."""
    return load_counterfact(data_dir() / "counterfact" / "counterfact_dev.json", n=n, start=start).cases


def score_case(model, tok, case: CounterFactCase) -> dict:
    """Counts on the model as it is: rewrite and paraphrase prompts where the new target beats the true
    one, neighbourhood prompts where the true one still wins (length-normalised NLL, as ROME)."""
    block = evaluate_counterfact(model, tok, case)
    wins = {
        key: [prompt_success(pair, new_should_win=key != "neighborhood") for pair in block[f"{key}_prompts_probs"]]
        for key in ("rewrite", "paraphrase", "neighborhood")
    }
    return {
        "rewrite": sum(wins["rewrite"]),
        "paraphrase": sum(wins["paraphrase"]),
        "n_paraphrase": len(wins["paraphrase"]),
        "neighbourhood_kept": sum(wins["neighborhood"]),
        "n_neighbourhood": len(wins["neighborhood"]),
    }
