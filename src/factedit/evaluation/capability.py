"""General capability of a (possibly edited) model, beside the per-fact metrics: does an edit break the rest?

Three measures, each a plain function, and :class:`CapabilityProbe`, which fixes their inputs once on the
unedited model so the same texts and facts are measured before and after editing:

* :func:`perplexity`: exp of the mean token NLL of held-out text, cut into windows of ``window_tokens``
  tokens (each window is read alone; its first token is context only). Texts: WikiText-2 raw test
  (``corpus/wikitext-2-raw-test.txt``, one stream) and the last ``heldout_lines`` lines of the Wikipedia
  corpus (``corpus/wiki_vital_extracts_en.txt``, each line alone). The second-moment statistics read that
  corpus from its first line on, in file order (no shuffle), until ``mom2_n_tokens`` tokens (100,000 by
  default: roughly its first thousand lines), so its last lines are never part of them unless a run asks
  for nearly the whole corpus (:func:`heldout_is_unused` checks it for a token count).
* :func:`known_accuracy`: the share of known facts (ROME's ``known_1000.json``) whose answer's first token
  is the model's top prediction. The probe keeps the facts the unedited model gets right and whose subject
  is none of the run's edited subjects (nor contains one or is contained in one), so the unedited model
  scores 100% and a drop is damage done to unrelated knowledge.
* :func:`sampled_entropy`: ROME's generation entropy (n-gram entropy x 100 in the summaries) of seeded
  top-k samples, :func:`~factedit.evaluation.generation.sample_texts`, from fixed prompts (the first words
  of held-out Wikipedia lines), so fluency is measured on prompts no edit is about.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.errors import FactEditError
from factedit.evaluation.generation import sample_texts
from factedit.evaluation.metrics import generation_entropy
from factedit.models.placement import input_device
from factedit.paths import data_dir
from factedit.stats.corpus import DEFAULT_CORPUS_FILE
from factedit.text import pad_id, pad_right
from factedit.tracing.knowns import KnownFact, known_by_model, known_facts_path, load_known_facts

log = logging.getLogger(__name__)

WIKITEXT_FILE = "corpus/wikitext-2-raw-test.txt"
MAX_WINDOWS = 10_000
MAX_WINDOW_TOKENS = 4096
PROMPT_WORDS = 6  # words of a held-out line that start a fluency sample


@dataclass(frozen=True)
class CapabilitySettings:
    """Sizes of the capability measures (small by default: a few seconds on a 135M model on one CPU core)."""

    windows: int = 8  # perplexity windows per corpus
    window_tokens: int = 256
    heldout_lines: int = 200  # the last lines of the Wikipedia corpus
    known_facts: int = 200  # at most this many known facts (of those the unedited model predicts)
    entropy_prompts: int = 10
    max_out_len: int = 100  # fluency samples, prompt included (ROME: 100)
    seed: int = 0
    wikitext: str | None = None  # default: the data folder's WikiText-2 test file
    wikipedia: str | None = None  # default: the data folder's Wikipedia corpus
    known: str | None = None  # default: the data folder's known_1000.json

    def check(self) -> None:
        """Refuse bad sizes and missing files before anything is loaded (one line each)."""
        counts = (
            ("capability windows", self.windows, 1, MAX_WINDOWS),
            ("capability window tokens", self.window_tokens, 2, MAX_WINDOW_TOKENS),
            ("capability held-out lines", self.heldout_lines, 1, 100_000),
            ("capability known facts", self.known_facts, 1, 100_000),
            ("capability prompts", self.entropy_prompts, 1, 10_000),
            ("capability sample length", self.max_out_len, 1, 8192),
            ("capability seed", self.seed, 0, 2**63 - 1),
        )
        for name, value, low, high in counts:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise FactEditError(f"{name} must be a whole number from {low} to {high:,}, not {value!r}")
        self.paths()

    def paths(self) -> dict[str, Path]:
        """The three input files (checked to exist)."""
        folder = data_dir()
        out = {}
        for name, given, default in (
            ("wikitext", self.wikitext, WIKITEXT_FILE),
            ("wikipedia", self.wikipedia, DEFAULT_CORPUS_FILE),
        ):
            path = Path(given).expanduser() if given else (folder / default if folder else None)
            if path is None or not path.is_file():
                raise FactEditError(
                    f"capability {name} text {path or default} not found: set FACTEDIT_DATA_DIR or give its path"
                )
            out[name] = path
        out["known"] = known_facts_path(self.known, download=False)
        return out

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# -- the measures -----------------------------------------------------------------------------------------
def token_windows(tok: PreTrainedTokenizerBase, texts: Iterable[str], window_tokens: int, max_windows: int):
    """Each text's tokens cut into windows of ``window_tokens`` (the last one shorter), in order, until
    ``max_windows``; windows of a single token predict nothing and are dropped."""
    windows: list[list[int]] = []
    for text in texts:
        ids = tok(text)["input_ids"]
        for lo in range(0, len(ids), window_tokens):
            piece = ids[lo : lo + window_tokens]
            if len(piece) > 1:
                windows.append(piece)
            if len(windows) >= max_windows:
                return windows
    return windows


@torch.no_grad()
def window_nll(
    model: nn.Module, tok: PreTrainedTokenizerBase, windows: Sequence[Sequence[int]], *, batch_size: int = 2
) -> tuple[float, int]:
    """Summed NLL (nats) of every window's tokens after its first, and how many tokens that is."""
    device = input_device(model)
    total, count = 0.0, 0
    for lo in range(0, len(windows), batch_size):
        chunk = [list(w) for w in windows[lo : lo + batch_size]]
        ids, mask = pad_right(chunk, pad_id(tok), device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        wanted = ids[:, 1:].to(logp.device)
        token_logp = logp.gather(-1, wanted[..., None])[..., 0]
        valid = mask[:, 1:].to(logp.device).bool()
        total -= float(token_logp[valid].double().sum())
        count += int(valid.sum())
    return total, count


def perplexity(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    window_tokens: int = 256,
    max_windows: int = MAX_WINDOWS,
    batch_size: int = 2,
) -> float:
    """exp(mean token NLL) of ``texts`` read in windows of ``window_tokens`` tokens (see the module doc)."""
    windows = token_windows(tok, texts, window_tokens, max_windows)
    if not windows:
        raise FactEditError("no text to measure perplexity on (every text is shorter than two tokens)")
    total, count = window_nll(model, tok, windows, batch_size=batch_size)
    return math.exp(total / count)


def known_accuracy(
    model: nn.Module, tok: PreTrainedTokenizerBase, facts: Sequence[KnownFact], *, batch_size: int = 64
) -> float:
    """Share of ``facts`` whose answer's first token is the model's top next token."""
    if not facts:
        return math.nan
    return sum(p.correct for p in known_by_model(model, tok, facts, batch_size=batch_size)) / len(facts)


def sampled_entropy(
    model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], *, max_out_len: int = 100, seed: int = 0
) -> float:
    """ROME's generation entropy (bits; x 100 in the tables) of one seeded top-5 sample per prompt."""
    return generation_entropy(sample_texts(model, tok, list(prompts), max_out_len=max_out_len, seed=seed))


# -- inputs ---------------------------------------------------------------------------------------------------
def heldout_lines(path: str | Path, n: int) -> list[str]:
    """The last ``n`` non-blank lines of a corpus file (one document per line, as the statistics read it)."""
    lines = [line for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-n:]


def heldout_is_unused(tok: PreTrainedTokenizerBase, path: str | Path, n_lines: int, n_tokens: int) -> bool:
    """Would second-moment statistics of ``n_tokens`` tokens, read from the corpus's first line on, stop
    before its last ``n_lines`` lines? (They take whole documents in file order until the count is reached.)"""
    lines = [line for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    seen = 0
    for line in lines[: max(0, len(lines) - n_lines)]:
        seen += len(tok(line)["input_ids"])
        if seen >= n_tokens:
            return True
    return False


def _prefix(text: str, settings: CapabilitySettings, chars_per_token: int = 16) -> str:
    """The start of a long text that surely holds the windows asked for (no token is 16 characters on
    average), cut at a line end, so a 1.3 MB file is not tokenized for 2,000 tokens."""
    limit = settings.windows * settings.window_tokens * chars_per_token
    if len(text) <= limit:
        return text
    end = text.rfind("\n", 0, limit)
    return text[: end if end > 0 else limit]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def unrelated_facts(facts: Sequence[KnownFact], subjects: Iterable[str]) -> list[KnownFact]:
    """Facts whose subject is no edited subject, contains none and is contained in none (as whole words,
    ignoring case and punctuation)."""
    edited = {" ".join(_words(s)) for s in subjects}
    edited.discard("")

    def related(subject: str) -> bool:
        mine = " ".join(_words(subject))
        padded = f" {mine} "
        return any(mine == e or f" {e} " in padded or padded in f" {e} " for e in edited)

    return [f for f in facts if not related(f.subject)]


class CapabilityProbe:
    """The capability measures' inputs, fixed once on the unedited model: perplexity windows of both texts,
    the known facts it predicts (unrelated to the run's edits), and the fluency prompts."""

    def __init__(
        self,
        settings: CapabilitySettings,
        windows: dict[str, list[list[int]]],
        facts: list[KnownFact],
        prompts: list[str],
        excluded: int,
    ) -> None:
        self.settings, self.windows, self.facts, self.prompts, self.excluded = (
            settings,
            windows,
            facts,
            prompts,
            excluded,
        )

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        settings: CapabilitySettings,
        edited_subjects: Iterable[str] = (),
    ) -> CapabilityProbe:
        """Read the texts and choose the facts; ``model`` must be the unedited model."""
        paths = settings.paths()
        wikitext = _prefix(paths["wikitext"].read_text(encoding="utf-8", errors="replace"), settings)
        held = heldout_lines(paths["wikipedia"], settings.heldout_lines)
        windows = {
            "wikitext": token_windows(tok, [wikitext], settings.window_tokens, settings.windows),
            "wikipedia": token_windows(tok, held, settings.window_tokens, settings.windows),
        }
        facts = load_known_facts(paths["known"])
        unrelated = unrelated_facts(facts, edited_subjects)
        known: list[KnownFact] = []
        for lo in range(0, len(unrelated), 64):  # in file order, until enough are found
            chunk = unrelated[lo : lo + 64]
            known += [f for f, p in zip(chunk, known_by_model(model, tok, chunk)) if p.correct]
            if len(known) >= settings.known_facts:
                break
        known = known[: settings.known_facts]
        prompts = [" ".join(line.split()[:PROMPT_WORDS]) for line in held[: settings.entropy_prompts]]
        log.info(
            "capability probe: %d + %d perplexity windows, %d known facts (of %d; %d share an edited subject), "
            "%d fluency prompts",
            len(windows["wikitext"]),
            len(windows["wikipedia"]),
            len(known),
            len(facts),
            len(facts) - len(unrelated),
            len(prompts),
        )
        return cls(settings, windows, known, prompts, len(facts) - len(unrelated))

    def measure(self, model: nn.Module, tok: PreTrainedTokenizerBase) -> dict[str, Any]:
        """Every measure on the model as it is now."""
        out: dict[str, Any] = {}
        for name, windows in self.windows.items():
            if windows:
                total, count = window_nll(model, tok, windows)
                out[f"ppl_{name}"] = math.exp(total / count)
                out[f"ppl_{name}_tokens"] = count
        out["known_acc"] = known_accuracy(model, tok, self.facts)
        out["known_facts"] = len(self.facts)
        out["ngram_entropy"] = sampled_entropy(
            model, tok, self.prompts, max_out_len=self.settings.max_out_len, seed=self.settings.seed
        )
        out["settings"] = self.settings.describe()
        return out
