"""The settings of an evaluation run (:class:`RunConfig`) and what a finished call reports (:class:`RunReport`).

Kept apart from the runner so that the batch/sequential driver can read a run's settings
without importing the runner that calls it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
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
MAX_ANSWER_TOKENS = 512  # greedy answer of the generative metrics (WILD: 50)
MAX_PPL_RISE = 1e6  # a guard's perplexity limit (relative rise); "never refuse on perplexity" is a large number


@dataclass(frozen=True)
class GuardSettings:
    """What :class:`~factedit.evaluation.guard.EditGuard` probes after each edit and when it refuses one.

    Per edit (against the model just before it) and in total (against the unedited model; an edit is then
    refused only if it makes the measure worse). Drops are shares (0.05 = 5 points), the perplexity limit a
    relative rise (0.02 = 2%). The defaults are a demanding user's, measured on small probes (docs/evaluation.md,
    "Guarded edits"): a good single ROME edit moves none of these by more than noise, so 3 of 40 unrelated
    neighbour prompts flipping, 3 of 50 known facts lost or +2% perplexity in one edit is damage worth refusing.
    """

    neighbour_cases: int = 20  # CounterFact cases of the run (its first) whose neighbourhood prompts are probed
    neighbour_prompts: int = 2  # per case (ROME's drift points use 2 as well)
    known_facts: int = 50  # unrelated known facts the unedited model predicts
    windows: int = 2  # perplexity windows per text (WikiText-2 test, held-out Wikipedia)
    window_tokens: int = 256
    max_neighbour_drop: float = 0.05  # per edit: more than 2 of 40 neighbour prompts lose their true answer
    max_known_drop: float = 0.04  # per edit: more than 2 of 50 known facts lost
    max_ppl_rise: float = 0.02  # per edit: perplexity of the held-out text up by more than 2%
    max_total_neighbour_drop: float = 0.10  # since the unedited model
    max_total_known_drop: float = 0.10
    max_total_ppl_rise: float = 0.10

    def check(self) -> None:
        """Refuse bad sizes and limits before anything is loaded (one line each)."""
        for name, value, low, high in (
            ("guard neighbour cases", self.neighbour_cases, 0, 100_000),
            ("guard neighbour prompts per case", self.neighbour_prompts, 1, 1000),
            ("guard known facts", self.known_facts, 1, 100_000),
            ("guard perplexity windows", self.windows, 1, 10_000),
            ("guard window tokens", self.window_tokens, 2, 4096),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise FactEditError(f"{name} must be a whole number from {low} to {high:,}, not {value!r}")
        for name, value, high in (
            ("max_neighbour_drop", self.max_neighbour_drop, 1.0),
            ("max_known_drop", self.max_known_drop, 1.0),
            ("max_ppl_rise", self.max_ppl_rise, MAX_PPL_RISE),
            ("max_total_neighbour_drop", self.max_total_neighbour_drop, 1.0),
            ("max_total_known_drop", self.max_total_known_drop, 1.0),
            ("max_total_ppl_rise", self.max_total_ppl_rise, MAX_PPL_RISE),
        ):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not 0 <= value <= high:
                raise FactEditError(f"guard {name} must be a number from 0 to {high:g}, not {value!r}")

    def capability(self, seed: int = 0):
        """The capability probe's sizes for these settings (one fluency prompt: the guard does not sample)."""
        from factedit.evaluation.capability import CapabilitySettings

        return CapabilitySettings(
            windows=self.windows,
            window_tokens=self.window_tokens,
            known_facts=self.known_facts,
            entropy_prompts=1,
            seed=seed,
        )

    def describe(self) -> dict[str, Any]:
        return asdict(self)


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
    drift_at: tuple[int, ...] = ()  # sequential: also measure once this many edits are in the model (e.g. 10, 100)
    drift_cases: int = 200  # a drift point measures the first this many edited cases (the oldest edits)
    gen_cases: int | None = None  # generation metrics (slow) on the first this many cases only; None = all
    group: int = 1  # single mode: independent edits of this many cases computed together (``compute_each``)
    prompts_edit: str = "raw"  # "chat": edits are made on prompts wrapped in the chat template (models/chat.py)
    prompts_eval: str = "raw"  # "chat": every evaluated prompt is wrapped; differing from prompts_edit = transfer
    # WILD's generative metrics (greedy answers, no teacher forcing) on every rewrite/paraphrase/neighbour
    # prompt: on by default (about 1-2 s per case on the default model on one CPU core, see docs)
    generative: bool = True
    answer_tokens: int = 50  # the greedy answer's budget (WILD: 50)
    # general capability before/after batch edits and at sequential drift points (capability.py); off by default
    capability: bool = False
    capability_windows: int = 8
    capability_window_tokens: int = 256
    capability_facts: int = 200
    capability_prompts: int = 10
    # sequential runs: roll back (bit-exact) and record as refused every edit that moves the probe too far
    guard: GuardSettings | None = None

    def drift_steps(self, n_steps: int) -> set[int]:
        """The steps after which a sequential run takes a drift point: 0 (the unedited model), every
        ``drift_every``-th, and the first step by which ``drift_at`` edits are in the model (steps of
        ``batch`` edits; the last step when the run has fewer)."""
        if not self.drift_every and not self.drift_at:
            return set()
        every = range(self.drift_every, n_steps + 1, self.drift_every) if self.drift_every else ()
        size = self.batch or 1
        return {0, *every, *(min(n_steps, -(-edits // size)) for edits in self.drift_at)}

    def capability_settings(self):
        """The capability measures' sizes (None when they are off)."""
        from factedit.evaluation.capability import CapabilitySettings

        if not self.capability:
            return None
        return CapabilitySettings(
            windows=self.capability_windows,
            window_tokens=self.capability_window_tokens,
            known_facts=self.capability_facts,
            entropy_prompts=self.capability_prompts,
            seed=self.seed,
        )

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
            ("drift_cases", self.drift_cases, 1, None, False),
            ("gen_cases", self.gen_cases, 1, None, True),
            ("group", self.group, 1, MAX_GROUP, False),
            ("answer_tokens", self.answer_tokens, 1, MAX_ANSWER_TOKENS, False),
        )
        for name, value, low, high, optional in counts:
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                span = f"from {low} to {high:,}" if high else f"of at least {low}"
                raise FactEditError(f"{name} must be a whole number {span}, not {value!r}")
        if self.drift_every is not None and not self.sequential:
            raise FactEditError("drift_every needs a sequential run")
        if self.drift_at:
            if not self.sequential:
                raise FactEditError("drift_at needs a sequential run")
            bad = [v for v in self.drift_at if isinstance(v, bool) or not isinstance(v, int) or v < 1]
            if bad:
                raise FactEditError(f"drift_at must be numbers of edits of at least 1, not {bad[0]!r}")
        if self.capability:
            if self.batch is None and not self.sequential:
                raise FactEditError(
                    "capability measures are taken before/after batch edits and at sequential drift points: "
                    "use them with --batch or --sequential"
                )
            self.capability_settings().check()
        if self.guard is not None:
            if not isinstance(self.guard, GuardSettings):
                raise FactEditError(f"guard must be GuardSettings, not {type(self.guard).__name__}")
            if not self.sequential:
                raise FactEditError("the guard judges edits kept one after another: use it with --sequential")
            self.guard.check()
            self.guard.capability(self.seed).check()
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
