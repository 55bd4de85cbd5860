"""Metric definitions, as pure functions, exactly as ROME/MEMIT compute them.

Sources (kmeng01/rome and kmeng01/memit, ``experiments/py/eval_utils_*.py`` and
``experiments/summarize.py``):

* Per prompt, CounterFact stores the length-normalised teacher-forced NLL of
  ``" " + target_new`` and ``" " + target_true`` (``{"target_new": nll, "target_true": nll}``).
* Per case: rewrite/paraphrase *success* = mean over the case's prompts of
  ``nll_true > nll_new`` (i.e. p_new > p_true), *diff* = mean of ``exp(-nll_new) - exp(-nll_true)``;
  neighbourhood success = mean of ``nll_true < nll_new``, diff = ``exp(-nll_true) - exp(-nll_new)``.
  Cases are averaged afterwards (a paraphrase score is averaged within a case first).
* ES/PS/NS and EM/PM/NM are those case means x 100; S is the harmonic mean of ES, PS, NS.
* MEMIT's argmax accuracies: a prompt is correct when every target token is the argmax under
  teacher forcing (``target_new`` for rewrite/paraphrase prompts, ``target_true`` for neighbours).
* zsRE: per target token, whether it is the argmax given the prompt and the preceding target
  tokens; a case's score is the mean over its tokens.
* Generation entropy: per generated text, the mean of (2/3)·H₂ and (4/3)·H₃ (bi-/tri-gram
  entropies in bits over word tokens), averaged over texts. Reference score: TF-IDF cosine
  between all generated texts joined and all reference texts joined.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from factedit.tracing.dataset import t_quantile_975  # the one Student-t quantile (95% intervals)

PROB_KEYS = ("rewrite", "paraphrase", "neighborhood")


# -- CounterFact ------------------------------------------------------------------------------------------
def prompt_success(pair: Mapping[str, float], *, new_should_win: bool) -> bool:
    """One prompt's success from its two NLLs (ties are failures, as in ROME's strict comparisons)."""
    if new_should_win:
        return pair["target_true"] > pair["target_new"]
    return pair["target_true"] < pair["target_new"]


def prompt_diff(pair: Mapping[str, float], *, new_should_win: bool) -> float:
    """exp(-nll_new) - exp(-nll_true) (or the reverse for neighbours): ROME's magnitude terms."""
    d = math.exp(-pair["target_new"]) - math.exp(-pair["target_true"])
    return d if new_should_win else -d


def counterfact_case_scores(block: Mapping[str, Any]) -> dict[str, float]:
    """Per-case success/diff/accuracy values (fractions, not percentages) from one ``pre``/``post`` block."""
    out: dict[str, float] = {}
    for key in PROB_KEYS:
        pairs = block.get(f"{key}_prompts_probs")
        if pairs:
            new_wins = key != "neighborhood"
            out[f"{key}_success"] = float(np.mean([prompt_success(p, new_should_win=new_wins) for p in pairs]))
            out[f"{key}_diff"] = float(np.mean([prompt_diff(p, new_should_win=new_wins) for p in pairs]))
        correct = block.get(f"{key}_prompts_correct")
        if correct:
            out[f"{key}_acc"] = float(np.mean(correct))
    for key in ("ngram_entropy", "reference_score"):
        if block.get(key) is not None:
            out[key] = float(block[key])
    return out


def zsre_case_scores(block: Mapping[str, Any]) -> dict[str, float]:
    """Per-case token accuracies (fractions) from one zsRE ``pre``/``post`` block."""
    out = {}
    for key in PROB_KEYS:
        tokens = block.get(f"{key}_prompts_correct")
        if tokens:
            out[f"{key}_acc"] = float(np.mean(tokens))
    return out


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (the limit), NaN if any is NaN."""
    vals = [float(v) for v in values]
    if any(math.isnan(v) for v in vals):
        return math.nan
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


# -- fluency: n-gram entropy -----------------------------------------------------------------------------------
# NLTK's word_tokenize needs the punkt model (a separate download); this regex follows its Treebank
# rules closely enough for n-gram statistics: words (with inner hyphens/apostrophes/periods),
# numbers, clitics split off ("do" + "n't", "John" + "'s"), and each punctuation mark on its own.
_WORD_RE = re.compile(
    r"""(?ix)
    (?:[a-z]+(?=n't\b))           # "do" of "don't"
    | n't\b | '(?:s|re|ve|ll|d|m)\b   # clitics
    | \d+(?:[.,:]\d+)*              # numbers, 1,000 3.14 10:30
    | [^\W\d_]\.(?:[^\W\d_]\.)+     # abbreviations, U.S.
    | [^\W\d_]+(?:-[^\W\d_]+)*(?:'(?!(?:s|re|ve|ll|d|m)\b)[^\W\d_]+)*   # words, well-known, O'Neill
    | \.\.\.|--|``|''               # multi-character punctuation
    | [^\w\s]                        # any other single symbol
    """
)


def word_tokenize(text: str) -> list[str]:
    """Word tokens for n-gram statistics (an approximation of NLTK's ``word_tokenize``)."""
    return _WORD_RE.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of ``tokens`` (0 if there are none)."""
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    freqs = np.array(list(grams.values()), dtype=np.float64) / total
    return float(-(freqs * np.log2(freqs)).sum())


def text_ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: arithmetic mean of the weighted n-gram entropies of one text."""
    tokens = word_tokenize(text)
    return float(np.mean([w * ngram_entropy(tokens, n) for n, w in zip(ns, weights)]))


def generation_entropy(texts: Iterable[str]) -> float:
    """ROME's ``n_gram_entropy``: mean over texts of :func:`text_ngram_entropy`."""
    values = [text_ngram_entropy(t) for t in texts]
    return float(np.mean(values)) if values else math.nan


# -- consistency: TF-IDF ---------------------------------------------------------------------------------------
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern (lower-cased text)


def tfidf_tokens(text: str) -> list[str]:
    return _TFIDF_TOKEN.findall(text.lower())


class TfidfModel:
    """scikit-learn ``TfidfVectorizer`` defaults without the dependency: raw counts x smooth IDF
    (``ln((1 + n) / (1 + df)) + 1``), unknown words ignored, compared by cosine."""

    def __init__(self, vocabulary: dict[str, int], idf: np.ndarray) -> None:
        self.vocabulary = vocabulary
        self.idf = np.asarray(idf, dtype=np.float64)

    @classmethod
    def fit(cls, documents: Iterable[str]) -> TfidfModel:
        df: Counter[str] = Counter()
        n_docs = 0
        for doc in documents:
            n_docs += 1
            df.update(set(tfidf_tokens(doc)))
        words = sorted(df)
        vocabulary = {w: i for i, w in enumerate(words)}
        counts = np.array([df[w] for w in words], dtype=np.float64)
        idf = np.log((1.0 + n_docs) / (1.0 + counts)) + 1.0
        return cls(vocabulary, idf)

    def vector(self, text: str) -> dict[int, float]:
        counts = Counter(self.vocabulary[t] for t in tfidf_tokens(text) if t in self.vocabulary)
        return {i: c * float(self.idf[i]) for i, c in counts.items()}

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine of the two TF-IDF vectors (0 when either has no known word)."""
        a, b = self.vector(text_a), self.vector(text_b)
        na = math.sqrt(sum(v * v for v in a.values()))
        nb = math.sqrt(sum(v * v for v in b.values()))
        if na == 0 or nb == 0:
            return 0.0
        return sum(v * b.get(i, 0.0) for i, v in a.items()) / (na * nb)


# -- intervals -------------------------------------------------------------------------------------------------
def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (NaN half-width for fewer than 2 values)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), math.nan
    return float(x.mean()), float(t_quantile_975(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def bootstrap_ci(
    columns: Sequence[Sequence[float]], statistic, *, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Statistic of the column means, with a 95% percentile bootstrap interval over cases (rows resampled
    jointly, seeded). Used for S, which is a harmonic mean of means and has no closed-form interval."""
    data = np.asarray(columns, dtype=np.float64)  # (k, n)
    n = data.shape[1]
    point = float(statistic(data.mean(axis=1)))
    if n < 2:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = np.array([statistic(data[:, row].mean(axis=1)) for row in idx])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, float(lo), float(hi)
