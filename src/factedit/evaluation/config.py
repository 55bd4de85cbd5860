"""The settings of an evaluation run (:class:`RunConfig`) and what a finished call reports (:class:`RunReport`).

Kept apart from the runner so that the batch/sequential driver can read a run's settings
without importing the runner that calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunConfig:
    """Everything that decides a run's results (and must match when it is resumed), plus ``n``."""

    method: str
    dataset: str
    n: int | None = None
    start: int = 0
    data_path: str | None = None
    download: bool = False  # fetch the official file when it is not found locally
    zsre_target: str = "answers"
    hparams: str | None = None  # JSON file; None = the family defaults
    overrides: dict[str, Any] = field(default_factory=dict)
    generation: bool = False
    n_gen: int | None = None
    max_out_len: int = 100
    top_k: int = 5
    seed: int = 0
    reference_corpus: str | None = None
    reference_max_texts: int = 50
    batch_size: int = 64
    batch: int | None = None  # edit this many cases at once (MEMIT / AlphaEdit); None = each alone
    sequential: bool = False  # keep every edit: chunks applied one after another
    pre_from: str | None = None  # a run folder of the same model and data whose ``pre`` scores are reused
    drift_every: int | None = None  # sequential: measure earlier edits and neighbours every k steps
    gen_cases: int | None = None  # generation metrics (slow) on the first this many cases only; None = all
    group: int = 1  # single mode: independent edits of this many cases computed together (``compute_each``)


@dataclass
class RunReport:
    out_dir: Path
    total: int
    already_done: int
    evaluated: int
    errors: int
    seconds: float
