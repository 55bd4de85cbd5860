"""Evaluate one case on the model as it is now: the raw per-prompt numbers ROME/MEMIT store.

Results are plain JSON-able dicts with ROME's key names (``rewrite_prompts_probs`` with
``{"target_new": nll, "target_true": nll}``, ``*_prompts_correct``, ``ngram_entropy``,
``reference_score``, ``text``) so they can be summarised, or compared with ROME's own output,
by :mod:`factedit.evaluation.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.data.counterfact import CounterFactCase
from factedit.data.zsre import ZsRECase
from factedit.evaluation.generation import case_seed, sample_texts
from factedit.evaluation.metrics import generation_entropy
from factedit.evaluation.reference import ReferenceTexts
from factedit.predict import score_continuations


@dataclass(frozen=True)
class GenerationSettings:
    """Fluency/consistency generation: ROME uses every generation prompt, top-k 5, 100 tokens."""

    n_gen: int | None = None  # generation prompts used per case (first n_gen); None = all
    max_out_len: int = 100
    top_k: int = 5
    seed: int = 0
    n_cases: int | None = None  # only the run's first n_cases cases get generation metrics; None = all


def evaluate_counterfact(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    case: CounterFactCase,
    *,
    generation: GenerationSettings | None = None,
    reference: ReferenceTexts | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """NLLs of new/true target and argmax hits on rewrite, paraphrase and neighbourhood prompts;
    with ``generation``, also the generated texts, their n-gram entropy and the reference score."""
    req = case.scored_request
    groups = {
        "rewrite": case.rewrite_prompts(),
        "paraphrase": list(case.paraphrase_prompts),
        "neighborhood": list(case.neighborhood_prompts),
    }
    pairs = [(p, t) for prompts in groups.values() for p in prompts for t in (req.new_text, req.true_text)]
    scores = iter(score_continuations(model, tok, pairs, batch_size=batch_size))
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
    return out


def evaluate_zsre(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    case: ZsRECase,
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Per target token, teacher-forced: is it the argmax? (rewrite and paraphrase: the new answer;
    neighbourhood: the NQ answer after ``question?``)."""
    req = case.scored_request
    pairs = [(p, req.new_text) for p in case.rewrite_prompts()]
    pairs += [(p, req.new_text) for p in case.paraphrase_prompts]
    pairs += list(case.neighborhood)
    scores = score_continuations(model, tok, pairs, batch_size=batch_size)
    n_rw, n_para = len(case.rewrite_prompts()), len(case.paraphrase_prompts)

    def flat(chunk) -> list[bool]:
        return [hit for s in chunk for hit in s.argmax]

    return {
        "rewrite_prompts_correct": flat(scores[:n_rw]),
        "paraphrase_prompts_correct": flat(scores[n_rw : n_rw + n_para]),
        "neighborhood_prompts_correct": flat(scores[n_rw + n_para :]),
    }
