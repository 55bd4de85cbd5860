"""Shared bits of the benchmark scripts: machine description and CounterFact scoring."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from factedit.editing.requests import EditRequest
from factedit.predict import target_log_probs


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"GPU: {gpu}; python {platform.python_version()}")


def data_dir() -> Path:
    return Path(os.environ.get("FACTEDIT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def counterfact(n: int, start: int = 0) -> list[dict]:
    records = json.loads((data_dir() / "counterfact" / "counterfact_dev.json").read_text())
    return records[start : start + n]


def new_beats_true(model, tok, texts: list[str], request: EditRequest) -> list[bool]:
    """Per prompt: is the new target more likely than the true one (length-normalised NLL, as ROME)?"""
    new = target_log_probs(model, tok, texts, [request.new_text] * len(texts))
    true = target_log_probs(model, tok, texts, [request.true_text] * len(texts))
    return [ln / nn > lt / nt for (ln, nn), (lt, nt) in zip(new, true)]


def score_record(model, tok, record: dict, request: EditRequest) -> dict:
    rewrite = new_beats_true(model, tok, [request.text], request)
    para = new_beats_true(model, tok, record["paraphrase_prompts"], request)
    neigh = new_beats_true(model, tok, record["neighborhood_prompts"], request)
    return {"rewrite": sum(rewrite), "paraphrase": sum(para), "n_paraphrase": len(para),
            "neighbourhood_kept": sum(not x for x in neigh), "n_neighbourhood": len(neigh)}
