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
* Generative success (the WILD protocol of "The Mirage of Model Editing", arXiv 2502.11177): the
  model's own greedy continuation, cut at its first sentence end, is normalised as SQuAD/WILD's
  exact match does (case, punctuation, articles, whitespace) and succeeds when it states the
  expected answer and not the competing one (:func:`generative_success`).
* EasyEdit's token accuracies (``easyeditor/evaluate``): per prompt, the mean over the target's
  tokens of "teacher-forced argmax = target token" (reliability, generalisation); locality is the
  share of the neighbourhood prompts' teacher-forced argmax tokens unchanged by the edit.
* Generation entropy: per generated text, the mean of (2/3)·H₂ and (4/3)·H₃ (bi-/tri-gram
  entropies in bits over word tokens), averaged over texts. Reference score: TF-IDF cosine
  between all generated texts joined and all reference texts joined.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from factedit.tracing.dataset import t_quantile_975  # the one Student-t quantile (95% intervals)

PROB_KEYS = ("rewrite", "paraphrase", "neighborhood")
# per-prompt generated answers (WILD) and EasyEdit's per-prompt token accuracies / argmax tokens
GENERATED = "{key}_prompts_generated"
TOKEN_ACC = "{key}_prompts_token_acc"
ARGMAX = "{key}_prompts_argmax"


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
    out.update(generative_case_scores(block))
    return out


def generative_case_scores(block: Mapping[str, Any]) -> dict[str, float]:
    """Per-case generative success (``{key}_gen``) and EasyEdit token accuracy (``{key}_token_acc``) from the
    stored generations and accuracies of one block; absent in runs made before they existed."""
    out: dict[str, float] = {}
    for key in PROB_KEYS:
        generated = block.get(GENERATED.format(key=key))
        if generated:
            out[f"{key}_gen"] = float(np.mean([bool(g["success"]) for g in generated]))
        token_acc = block.get(TOKEN_ACC.format(key=key))
        if token_acc:
            out[f"{key}_token_acc"] = float(np.mean(token_acc))
    return out


def paired_case_scores(pre: Mapping[str, Any], post: Mapping[str, Any]) -> dict[str, float]:
    """Scores that compare the edited model with the unedited one on the same case (fractions):

    * ``neighborhood_same_gen``: WILD's locality, the share of neighbourhood prompts whose generated
      answer (token ids) is exactly the unedited model's;
    * ``neighborhood_token_agree``: EasyEdit's locality, per neighbourhood prompt the share of the true
      target's teacher-forced argmax tokens equal to the unedited model's, averaged over the prompts.
    """
    out: dict[str, float] = {}
    key = GENERATED.format(key="neighborhood")
    before, after = pre.get(key), post.get(key)
    if before and after and len(before) == len(after):
        out["neighborhood_same_gen"] = float(np.mean([a["ids"] == b["ids"] for a, b in zip(after, before)]))
    key = ARGMAX.format(key="neighborhood")
    before, after = pre.get(key), post.get(key)
    if before and after and len(before) == len(after):
        out["neighborhood_token_agree"] = float(np.mean([token_agreement(a, b) for a, b in zip(after, before)]))
    return out


def token_accuracy(predicted: Sequence[int], target: Sequence[int]) -> float:
    """EasyEdit's per-prompt accuracy: the share of target tokens that are the teacher-forced argmax."""
    if len(predicted) != len(target) or not target:
        raise ValueError("predicted and target tokens must be non-empty and of the same length")
    return float(np.mean([int(p) == int(t) for p, t in zip(predicted, target)]))


def token_agreement(after: Sequence[int], before: Sequence[int]) -> float:
    """EasyEdit's per-prompt locality: the share of positions whose argmax token the edit left unchanged."""
    if len(after) != len(before) or not before:
        raise ValueError("argmax tokens before and after must be non-empty and of the same length")
    return float(np.mean([int(a) == int(b) for a, b in zip(after, before)]))


def argmax_token_scores(logits: Any, targets: Sequence[int]) -> tuple[list[int], float]:
    """From the logits that predict a target's tokens (one row per target token, teacher forced): the argmax
    tokens (EasyEdit's locality compares them before/after) and the token accuracy (its reliability)."""
    predicted = [int(i) for i in np.asarray(logits).argmax(-1).reshape(-1)]
    return predicted, token_accuracy(predicted, targets)


# -- generative success (WILD) ----------------------------------------------------------------------------
# Words a period follows without ending the sentence ("St. Louis", "Mr. Smith", "Washington, D.C.").
ABBREVIATIONS = frozenset(
    "mr mrs ms dr st mt ft jr sr prof gen col lt sgt capt rev fr hon no vs etc inc co ltd corp dept univ est".split()
)
_SENTENCE_END = re.compile(r"[.!?]+(?=[\"'”’)\]]*(?:\s|$))|\n")


def _ends_sentence(text: str, end: int) -> bool:
    """Does the mark at ``text[end]`` end a sentence? A period does not after an initial or a known
    abbreviation (the word right before it)."""
    if text[end] != ".":
        return True
    word = re.search(r"([^\W\d_]+)$", text[:end].rstrip("."))
    return word is None or not (len(word.group(1)) == 1 or word.group(1).lower() in ABBREVIATIONS)


def first_sentence(text: str, *, final: bool = True) -> str | None:
    """The text up to and including its first sentence end (``.``, ``!``, ``?`` followed by a space or the
    end, or a newline), or ``None`` when it has none yet. A period after an initial or an abbreviation
    ("D.C.", "St.") does not end a sentence; with ``final=False`` (the text may still grow) a period right
    after a digit at the very end does not either (it may be "3.5")."""
    for match in _SENTENCE_END.finditer(text):
        end = match.start() if match.group() == "\n" else match.end() - 1
        if not _ends_sentence(text, end):
            continue
        if not final and match.end() == len(text) and text[end] == "." and end > 0 and text[end - 1].isdigit():
            continue
        return text[: end + 1]
    return None


def answer_of(continuation: str) -> str:
    """The answer a greedy continuation gives: its first sentence (all of it when it never ends one)."""
    sentence = first_sentence(continuation)
    return continuation if sentence is None else sentence


_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's (and WILD's exact-match) normalisation: lower case, punctuation removed, the articles
    a/an/the removed, whitespace collapsed; Unicode punctuation counts too (NFKC first)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, target: str) -> bool:
    """WILD's exact-match fallback: the normalised answer equals the normalised target."""
    return normalize_answer(answer) == normalize_answer(target)


def _word_spans(words: list[str], phrase: list[str]) -> list[tuple[int, int]]:
    n = len(phrase)
    return [(i, i + n) for i in range(len(words) - n + 1) if n and words[i : i + n] == phrase]


def states(answer: str, target: str, *, unless: str | None = None) -> bool:
    """Does the normalised answer contain the normalised target as whole words? An occurrence inside an
    occurrence of ``unless`` does not count (target "French", unless "French Polynesia")."""
    words, phrase = normalize_answer(answer).split(), normalize_answer(target).split()
    spans = _word_spans(words, phrase)
    if unless is not None:
        other = normalize_answer(unless).split()
        if len(other) > len(phrase):
            covers = _word_spans(words, other)
            spans = [s for s in spans if not any(a <= s[0] and s[1] <= b for a, b in covers)]
    return bool(spans)


def generative_success(continuation: str, expected: str, competing: str | None = None) -> bool:
    """WILD-style success of one greedy continuation: its answer (first sentence) states ``expected`` and
    does not state ``competing`` (the old answer for an edited prompt, the new one for a neighbour).
    A continuation that names both (a hedge, "French or English") or neither fails."""
    answer = answer_of(continuation)
    if not states(answer, expected, unless=competing):
        return False
    return competing is None or not states(answer, competing, unless=expected)


def zsre_case_scores(block: Mapping[str, Any]) -> dict[str, float]:
    """Per-case token accuracies (fractions) from one zsRE ``pre``/``post`` block."""
    out = {}
    for key in PROB_KEYS:
        tokens = block.get(f"{key}_prompts_correct")
        if tokens:
            out[f"{key}_acc"] = float(np.mean(tokens))
    out.update(generative_case_scores(block))
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
