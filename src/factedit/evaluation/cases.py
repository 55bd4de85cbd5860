"""Evaluate one case on the model as it is now: the raw per-prompt numbers ROME/MEMIT store.

Results are plain JSON-able dicts with ROME's key names (``rewrite_prompts_probs`` with
``{"target_new": nll, "target_true": nll}``, ``*_prompts_correct``, ``ngram_entropy``,
``reference_score``, ``text``) so they can be summarised, or compared with ROME's own output,
by :mod:`factedit.evaluation.metrics`.

Two more blocks sit beside them (:func:`generative_scores`, :func:`easyedit_scores`):
``{key}_prompts_generated`` (per prompt the greedy answer, its token ids and whether it succeeds,
WILD's protocol) and ``{key}_prompts_token_acc`` / ``neighborhood_prompts_argmax`` (EasyEdit's
teacher-forced token accuracy and the argmax tokens its locality compares before/after the edit).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.data.counterfact import CounterFactCase
from factedit.data.zsre import ZsRECase
from factedit.evaluation.generation import GreedyAnswer, case_seed, greedy_answers, sample_texts
from factedit.evaluation.metrics import ARGMAX, GENERATED, TOKEN_ACC, generation_entropy, generative_success
from factedit.evaluation.reference import ReferenceTexts
from factedit.predict import ContinuationScore, score_continuations
from factedit.text import target_ids

# keys of the generative (WILD) block, and of EasyEdit's: a block has all of one kind or none
GENERATIVE_KEYS = tuple(GENERATED.format(key=k) for k in ("rewrite", "paraphrase", "neighborhood"))
EASYEDIT_KEYS = (
    TOKEN_ACC.format(key="rewrite"),
    TOKEN_ACC.format(key="paraphrase"),
    ARGMAX.format(key="neighborhood"),
)


@dataclass(frozen=True)
class GenerationSettings:
    """Fluency/consistency generation: ROME uses every generation prompt, top-k 5, 100 tokens."""

    n_gen: int | None = None  # generation prompts used per case (first n_gen); None = all
    max_out_len: int = 100
    top_k: int = 5
    seed: int = 0
    n_cases: int | None = None  # only the run's first n_cases cases get generation metrics; None = all


@dataclass(frozen=True)
class GenerativeSettings:
    """WILD's generative metrics: greedy answers of at most ``max_new_tokens`` tokens (WILD: 50), cut at the
    first sentence end. ``rule`` names the matching rule (:func:`~factedit.evaluation.metrics.
    generative_success`), so a run's manifest says which one scored it."""

    max_new_tokens: int = 50
    rule: str = "wild-contains-v1"


def _prompt_groups(case) -> dict[str, list[tuple[str, str, str | None]]]:
    """Per group of prompts, ``(prompt, expected answer, competing answer)`` as the generative metrics score
    them: edited prompts should give the new target and not the old, neighbours the true one and not the new."""
    req = case.scored_request
    if isinstance(case, CounterFactCase):
        return {
            "rewrite": [(p, req.target_new, req.target_true) for p in case.rewrite_prompts()],
            "paraphrase": [(p, req.target_new, req.target_true) for p in case.paraphrase_prompts],
            "neighborhood": [(p, req.target_true, req.target_new) for p in case.neighborhood_prompts],
        }
    return {  # zsRE: no old answer to compete; the neighbour is the NQ question and its answer
        "rewrite": [(p, req.target_new, None) for p in case.rewrite_prompts()],
        "paraphrase": [(p, req.target_new, None) for p in case.paraphrase_prompts],
        "neighborhood": [(q, a.strip(), None) for q, a in case.neighborhood],
    }


def generative_prompts(case: CounterFactCase | ZsRECase) -> list[str]:
    """Every prompt the generative block answers, in its order."""
    return [p for items in _prompt_groups(case).values() for p, _, _ in items]


def answer_slices(cases: Sequence[Any], rows: int) -> Iterator[list[Any]]:
    """``cases`` in consecutive slices whose generative prompts fill about one batch of ``rows`` rows."""
    chunk: list[Any] = []
    filled = 0
    for case in cases:
        chunk.append(case)
        filled += len(generative_prompts(case))
        if filled >= rows:
            yield chunk
            chunk, filled = [], 0
    if chunk:
        yield chunk


def prefetch_answers(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    cases: Sequence[CounterFactCase | ZsRECase],
    settings: GenerativeSettings,
    *,
    batch_size: int = 64,
) -> dict[str, GreedyAnswer]:
    """The greedy answers of several cases' prompts in shared batches, for :func:`generative_scores`.

    Why: one case has only 13 CounterFact prompts (3 for zsRE), so a case's own batch multiplies skinny,
    memory-bound products (about 150 ms a step for 13 rows of the default model on 2 CPU threads). Where
    the model stays the same over many cases (the unedited model, a batch edit, the end of a sequence)
    their prompts go in one batch. Valid only while the model is not changed."""
    prompts = list(dict.fromkeys(p for case in cases for p in generative_prompts(case)))
    answers = greedy_answers(model, tok, prompts, max_new_tokens=settings.max_new_tokens, batch_size=batch_size)
    return dict(zip(prompts, answers))


def generative_scores(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    case: CounterFactCase | ZsRECase,
    settings: GenerativeSettings,
    *,
    batch_size: int = 64,
    answers: Mapping[str, GreedyAnswer] | None = None,
) -> dict[str, Any]:
    """WILD's protocol on every rewrite, paraphrase and neighbourhood prompt: the greedy answer of the model
    as it is now (no teacher forcing), and whether it states the expected answer and not the competing one.
    ``answers``: greedy answers already computed on this same model (:func:`prefetch_answers`); prompts not
    in it are answered here."""
    groups = _prompt_groups(case)
    flat = [item for items in groups.values() for item in items]
    known = answers or {}
    missing = list(dict.fromkeys(p for p, _, _ in flat if p not in known))
    fresh = greedy_answers(model, tok, missing, max_new_tokens=settings.max_new_tokens, batch_size=batch_size)
    lookup = {**dict(zip(missing, fresh)), **{p: known[p] for p, _, _ in flat if p in known}}
    out: dict[str, Any] = {}
    for key, items in groups.items():
        rows = []
        for prompt, expected, competing in items:
            answer = lookup[prompt]
            rows.append({**answer.to_dict(), "success": generative_success(answer.text, expected, competing)})
        out[GENERATED.format(key=key)] = rows
    return out


def teacher_forced_argmax(
    model: nn.Module, tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], *, batch_size: int = 64
) -> list[tuple[list[int], list[int]]]:
    """Per ``(prompt, continuation)``: the argmax token at each continuation position given the prompt and the
    preceding continuation tokens, and the continuation's tokens (as EasyEdit's ``test_prediction_acc``)."""
    scores = score_continuations(model, tok, pairs, batch_size=batch_size)
    return [(list(s.predicted), target_ids(tok, p, c)) for s, (p, c) in zip(scores, pairs)]


def easyedit_scores(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    case: CounterFactCase | ZsRECase,
    *,
    batch_size: int = 64,
    scores: Mapping[tuple[str, str], ContinuationScore] | None = None,
) -> dict[str, Any]:
    """EasyEdit's token accuracies: per rewrite/paraphrase prompt the share of the new target's tokens that
    are the teacher-forced argmax (reliability, generalisation), and the neighbourhood prompts' argmax tokens
    under the true target (locality compares them with the unedited model's).

    ``scores``: teacher-forced scores of ``(prompt, continuation)`` pairs already computed on this model (the
    case's ROME/MEMIT scores hold every pair needed here), so no second forward pass is made for them."""
    req = case.scored_request
    if isinstance(case, CounterFactCase):
        neighbours = [(p, req.true_text) for p in case.neighborhood_prompts]
    else:
        neighbours = list(case.neighborhood)
    edited = [(p, req.new_text) for p in case.rewrite_prompts()] + [(p, req.new_text) for p in case.paraphrase_prompts]
    pairs = edited + neighbours
    known = scores or {}
    missing = list(dict.fromkeys(pair for pair in pairs if pair not in known))
    lookup = {**dict(zip(missing, score_continuations(model, tok, missing, batch_size=batch_size))), **known}
    results = [lookup[pair] for pair in pairs]
    n_rw = len(case.rewrite_prompts())

    def accuracy(chunk: list[ContinuationScore]) -> list[float]:
        return [sum(s.argmax) / len(s.argmax) for s in chunk]

    return {
        TOKEN_ACC.format(key="rewrite"): accuracy(results[:n_rw]),
        TOKEN_ACC.format(key="paraphrase"): accuracy(results[n_rw : len(edited)]),
        ARGMAX.format(key="neighborhood"): [list(s.predicted) for s in results[len(edited) :]],
    }


def extra_scores(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    case: CounterFactCase | ZsRECase,
    generative: GenerativeSettings | None,
    *,
    batch_size: int = 64,
    have: dict[str, Any] | None = None,
    answers: Mapping[str, GreedyAnswer] | None = None,
    scores: Mapping[tuple[str, str], ContinuationScore] | None = None,
) -> dict[str, Any]:
    """The EasyEdit block and (with ``generative``) the WILD block, leaving out those ``have`` already holds
    (so the unedited scores of an older run can be completed instead of measured again); ``answers`` as
    :func:`generative_scores` takes them, ``scores`` as :func:`easyedit_scores` does."""
    have = have or {}
    out: dict[str, Any] = {}
    if not all(k in have for k in EASYEDIT_KEYS):
        out.update(easyedit_scores(model, tok, case, batch_size=batch_size, scores=scores))
    if generative is not None and not all(k in have for k in GENERATIVE_KEYS):
        out.update(generative_scores(model, tok, case, generative, batch_size=batch_size, answers=answers))
    return out


def evaluate_counterfact(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    case: CounterFactCase,
    *,
    generation: GenerationSettings | None = None,
    reference: ReferenceTexts | None = None,
    batch_size: int = 64,
    generative: GenerativeSettings | None = None,
    extras: bool = False,
    answers: Mapping[str, GreedyAnswer] | None = None,
) -> dict[str, Any]:
    """NLLs of new/true target and argmax hits on rewrite, paraphrase and neighbourhood prompts;
    with ``generation``, also the generated texts, their n-gram entropy and the reference score; with
    ``extras``, EasyEdit's token accuracies and (with ``generative``) WILD's greedy answers."""
    req = case.scored_request
    groups = {
        "rewrite": case.rewrite_prompts(),
        "paraphrase": list(case.paraphrase_prompts),
        "neighborhood": list(case.neighborhood_prompts),
    }
    pairs = [(p, t) for prompts in groups.values() for p in prompts for t in (req.new_text, req.true_text)]
    scored = score_continuations(model, tok, pairs, batch_size=batch_size)
    scores = iter(scored)
    out: dict[str, Any] = {}
    for key, prompts in groups.items():
        probs, correct = [], []
        for _ in prompts:
            new, true = next(scores), next(scores)
            probs.append({"target_new": new.nll, "target_true": true.nll})
            # MEMIT: the target that should win must be the argmax at every one of its tokens
            correct.append((true if key == "neighborhood" else new).all_correct)
        out[f"{key}_prompts_probs"] = probs
        out[f"{key}_prompts_correct"] = correct
    if generation is not None:
        prompts = list(case.generation_prompts)
        if generation.n_gen is not None:
            prompts = prompts[: generation.n_gen]
        texts = sample_texts(
            model,
            tok,
            prompts,
            max_out_len=generation.max_out_len,
            top_k=generation.top_k,
            seed=case_seed(generation.seed, case.case_id),
        )
        out["ngram_entropy"] = generation_entropy(texts) if texts else None
        out["reference_score"] = reference.score(texts, req.target_new) if (reference and texts) else None
        out["text"] = texts
    if extras:
        out.update(
            extra_scores(
                model, tok, case, generative, batch_size=batch_size, answers=answers, scores=dict(zip(pairs, scored))
            )
        )
    return out


def evaluate_zsre(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    case: ZsRECase,
    *,
    batch_size: int = 64,
    generative: GenerativeSettings | None = None,
    extras: bool = False,
    answers: Mapping[str, GreedyAnswer] | None = None,
) -> dict[str, Any]:
    """Per target token, teacher-forced: is it the argmax? (rewrite and paraphrase: the new answer;
    neighbourhood: the NQ answer after ``question?``); with ``extras`` the EasyEdit and WILD blocks."""
    req = case.scored_request
    pairs = [(p, req.new_text) for p in case.rewrite_prompts()]
    pairs += [(p, req.new_text) for p in case.paraphrase_prompts]
    pairs += list(case.neighborhood)
    scores = score_continuations(model, tok, pairs, batch_size=batch_size)
    by_pair = dict(zip(pairs, scores))
    n_rw, n_para = len(case.rewrite_prompts()), len(case.paraphrase_prompts)

    def flat(chunk) -> list[bool]:
        return [hit for s in chunk for hit in s.argmax]

    out: dict[str, Any] = {
        "rewrite_prompts_correct": flat(scores[:n_rw]),
        "paraphrase_prompts_correct": flat(scores[n_rw : n_rw + n_para]),
        "neighborhood_prompts_correct": flat(scores[n_rw + n_para :]),
    }
    if extras:
        out.update(extra_scores(model, tok, case, generative, batch_size=batch_size, answers=answers, scores=by_pair))
    return out
