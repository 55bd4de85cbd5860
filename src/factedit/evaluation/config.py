"""The settings of an evaluation run (:class:`RunConfig`) and what a finished call reports (:class:`RunReport`).

Kept apart from the runner so that the batch/sequential driver can read a run's settings
without importing the runner that calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError
from factedit.models.chat import PROMPT_FORMATS

DATASETS = ("counterfact", "zsre")
ZSRE_TARGETS = ("answers", "alt")
# Upper bounds of the counts (far above any published protocol): a typo must not ask for days of work.
MAX_OUT_LEN = 8192  # generated text, prompt included (ROME: 100)
MAX_TOP_K = 1000  # sampling (ROME: 5)
MAX_BATCH = 100_000  # cases edited at once (MEMIT's largest: 10,000)
MAX_GROUP = 4096  # FT edits computed together
MAX_SCORE_BATCH = 4096  # prompts scored per forward pass


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
    prompts_edit: str = "raw"  # "chat": edits are made on prompts wrapped in the chat template (models/chat.py)
    prompts_eval: str = "raw"  # "chat": every evaluated prompt is wrapped; differing from prompts_edit = transfer

    def check(self) -> None:
        """Refuse bad settings before anything is loaded or written (one line, naming the setting)."""
        if self.dataset not in DATASETS:
            raise FactEditError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.zsre_target not in ZSRE_TARGETS:
            raise FactEditError(f"zsRE target must be one of {', '.join(ZSRE_TARGETS)}, not {self.zsre_target!r}")
        if self.dataset == "zsre" and self.generation:
            raise FactEditError("generation metrics are defined for CounterFact only")
        for name, value in (("prompts_edit", self.prompts_edit), ("prompts_eval", self.prompts_eval)):
            if value not in PROMPT_FORMATS:
                raise FactEditError(f"{name} must be one of {', '.join(PROMPT_FORMATS)}, not {value!r}")
        counts = (
            ("n", self.n, 1, None, True),
            ("start", self.start, 0, None, False),
            ("n_gen", self.n_gen, 1, None, True),
            ("max_out_len", self.max_out_len, 1, MAX_OUT_LEN, False),
            ("top_k", self.top_k, 1, MAX_TOP_K, False),
            ("seed", self.seed, 0, 2**63 - 1, False),
            ("reference_max_texts", self.reference_max_texts, 1, None, False),
            ("batch_size", self.batch_size, 1, MAX_SCORE_BATCH, False),
            ("batch", self.batch, 1, MAX_BATCH, True),
            ("drift_every", self.drift_every, 1, None, True),
            ("gen_cases", self.gen_cases, 1, None, True),
            ("group", self.group, 1, MAX_GROUP, False),
        )
        for name, value, low, high, optional in counts:
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                span = f"from {low} to {high:,}" if high else f"of at least {low}"
                raise FactEditError(f"{name} must be a whole number {span}, not {value!r}")
        if self.drift_every is not None and not self.sequential:
            raise FactEditError("drift_every needs a sequential run")
        if not isinstance(self.overrides, dict):
            raise FactEditError(f"overrides must be a dict of hyper-parameters, not {type(self.overrides).__name__}")
        for name, path, folder in (
            ("data", self.data_path, None),
            ("hparams", self.hparams, False),
            ("pre_from", self.pre_from, True),
        ):
            if path is None:
                continue
            p = Path(path).expanduser()
            if not p.exists():
                raise FactEditError(f"{name} {p} not found")
            if folder is True and not p.is_dir():
                raise FactEditError(f"{name} {p} is a file: give a run folder")
            if folder is False and p.is_dir():
                raise FactEditError(f"{name} {p} is a folder: give a JSON file")


@dataclass
class RunReport:
    out_dir: Path
    total: int
    already_done: int
    evaluated: int
    errors: int
    seconds: float
    skipped: int = 0  # malformed records of the data file, left out (listed in the manifest with reasons)
