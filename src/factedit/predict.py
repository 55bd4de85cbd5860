"""What the model says: top next tokens, teacher-forced target probabilities, generations.

Teacher-forced scoring runs one batched forward per chunk of (prompt, continuation) pairs and
applies the LM head only at the positions that predict continuation tokens. Target tokens are
those the model sees when the continuation follows the prompt (:func:`factedit.text.target_ids`),
like ROME's ``tok(f"{prefix} {target}")``.

Inputs are checked before the first forward pass: texts non-blank and at most
:data:`factedit.text.MAX_TEXT_CHARS` characters, ``k`` between 1 and the vocabulary size,
``max_new_tokens`` between 1 and :data:`MAX_NEW_TOKENS` and, with the prompt, within the model's context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.errors import FactEditError
from factedit.hooks import Trace
from factedit.models.architectures import arch_for
from factedit.models.placement import input_device, model_devices
from factedit.models.runtime import lm_logits, text_config
from factedit.text import check_text, pad_id, pad_right, target_ids

MAX_NEW_TOKENS = 8192  # longest generation asked for at once (the model's context may allow fewer)


def vocabulary_size(model: nn.Module) -> int:
    """How many tokens the LM head scores (the largest sensible ``k``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(text_config(model).vocab_size)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover, when its config says."""
    value = getattr(text_config(model), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _check_count(value: int, name: str, low: int, high: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FactEditError(f"{name} must be a whole number from {low} to {high:,}{why}, got {value!r}")
    return value


def _check_length(model: nn.Module, n_tokens: int, what: str) -> None:
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        raise FactEditError(f"{what} is {n_tokens:,} tokens: more than the model's context of {limit:,}")


@torch.no_grad()
def top_next_tokens(
    model: nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str], k: int = 5
) -> list[list[tuple[str, float]]]:
    """The ``k`` most likely next tokens after each text, with probabilities."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise FactEditError("no text to predict from")
    for text in texts:
        check_text(text, "text")
    _check_count(k, "k", 1, vocabulary_size(model), " (the vocabulary size)")
    device = input_device(model)
    seqs = [tok(t)["input_ids"] for t in texts]
    for text, seq in zip(texts, seqs):
        if not seq:
            raise FactEditError(f"text {text!r} tokenizes to nothing")
        _check_length(model, len(seq), f"text {text[:40]!r}")
    ids, mask = pad_right(seqs, pad_id(tok), device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    last = logits[torch.arange(len(seqs), device=logits.device), (mask.sum(1) - 1).to(logits.device)].float()
    probs = torch.softmax(last, dim=-1)
    top = probs.topk(k, dim=-1)
    return [
        [(tok.decode([int(i)]), float(p)) for p, i in zip(row_p, row_i)]
        for row_p, row_i in zip(top.values, top.indices)
    ]


@dataclass(frozen=True)
class ContinuationScore:
    """Per continuation token: log p(token | prompt, previous tokens), whether it was the argmax, and the
    argmax token itself (EasyEdit's locality compares those before and after an edit)."""

    logprobs: tuple[float, ...]
    argmax: tuple[bool, ...]
    predicted: tuple[int, ...] = ()

    @property
    def nll(self) -> float:
        """ROME's length-normalised NLL: -mean log p over the continuation's tokens."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def all_correct(self) -> bool:
        return all(self.argmax)


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
) -> list[ContinuationScore]:
    """Score each ``(prompt, continuation)``; the continuation should carry its leading space."""
    device = input_device(model)
    arch = arch_for(model)
    seqs, spans = [], []
    for prompt, cont in pairs:
        p = tok(prompt)["input_ids"]
        t = target_ids(tok, prompt, cont)
        seqs.append(p + t)
        spans.append((len(p), len(t)))
    out: list[ContinuationScore] = []
    for lo in range(0, len(seqs), batch_size):
        chunk, chunk_spans = seqs[lo : lo + batch_size], spans[lo : lo + batch_size]
        ids, mask = pad_right(chunk, pad_id(tok), device)
        with Trace(model, arch.final_norm, stop=True) as fin:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        states = fin.output  # on the final norm's device, which may not be the embedding's
        rows = torch.cat([torch.full((n,), r, dtype=torch.long) for r, (_, n) in enumerate(chunk_spans)])
        pos = torch.cat([torch.arange(s - 1, s - 1 + n) for s, n in chunk_spans])
        rows, pos = rows.to(states.device), pos.to(states.device)
        logp = torch.log_softmax(lm_logits(model, arch, states[rows, pos]).float(), dim=-1)
        wanted = ids[rows.to(ids.device), (pos + 1).to(ids.device)].to(logp.device)
        token_logp = logp.gather(1, wanted[:, None]).squeeze(1).tolist()
        best = logp.argmax(-1)
        hits, predicted = (best == wanted).tolist(), best.tolist()
        k = 0
        for _, n in chunk_spans:
            out.append(
                ContinuationScore(
                    tuple(token_logp[k : k + n]), tuple(bool(h) for h in hits[k : k + n]), tuple(predicted[k : k + n])
                )
            )
            k += n
    return out


def target_log_probs(
    model: nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str], targets: Sequence[str]
) -> list[tuple[float, int]]:
    """Teacher-forced log-probability of each target continuing its text: ``(sum log p, n_tokens)``.

    ``exp(sum)`` is the joint probability; ``-sum / n`` ROME's length-normalised NLL.
    """
    scores = score_continuations(model, tok, list(zip(texts, targets)))
    return [(sum(s.logprobs), len(s.logprobs)) for s in scores]


def new_beats_true(
    model: nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str], new: str, true: str
) -> list[bool]:
    """Per text: is the new target more likely than the true one (per-token NLL, ROME's test)?

    Both targets of every text go through one forward pass.
    """
    texts = list(texts)
    scores = target_log_probs(model, tok, texts + texts, [new] * len(texts) + [true] * len(texts))
    return [a / n > b / m for (a, n), (b, m) in zip(scores[: len(texts)], scores[len(texts) :])]


def new_beats_true_each(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[tuple[str, str, str]],
    *,
    batch_size: int = 64,
) -> list[bool]:
    """Per ``(text, new, true)``: is the new target more likely than the true one (per-token NLL, ROME's
    test)? Every item's two continuations go through shared forward passes, whatever their targets."""
    pairs = [pair for text, new, true in items for pair in ((text, new), (text, true))]
    scores = score_continuations(model, tok, pairs, batch_size=batch_size)
    return [scores[2 * i].nll < scores[2 * i + 1].nll for i in range(len(items))]


def target_probs(model, tok, texts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """Joint probability of each (multi-token) target after its text."""
    return [float(torch.tensor(s).exp()) for s, _ in target_log_probs(model, tok, texts, targets)]


@torch.no_grad()
def generate(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 40,
    sample: bool = False,
    seed: int = 0,
    top_k: int = 5,
) -> str:
    """Continue a prompt (greedy by default; top-k sampling with a seed when ``sample``)."""
    check_text(prompt, "prompt")
    _check_count(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
    _check_count(top_k, "top_k", 1, vocabulary_size(model), " (the vocabulary size)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise FactEditError(f"seed must be a whole number from 0 to 2**63-1, got {seed!r}")
    device = input_device(model)
    enc = tok(prompt, return_tensors="pt").to(device)
    if enc["input_ids"].shape[1] == 0:
        raise FactEditError(f"prompt {prompt!r} tokenizes to nothing")
    _check_length(model, enc["input_ids"].shape[1] + max_new_tokens, "the prompt plus the new tokens")
    with torch.random.fork_rng(devices=[d for d in model_devices(model) if d.type == "cuda"]):
        torch.manual_seed(seed)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            top_k=top_k if sample else None,
            pad_token_id=pad_id(tok),
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def probe(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[tuple[str, str]],
    target_new: str,
    target_true: str | None,
    k: int = 5,
) -> list[dict]:
    """For each ``(kind, text)``: top-k next tokens and the probabilities of the new and true targets."""
    texts = [text for _, text in prompts]
    tops = top_next_tokens(model, tok, texts, k)
    p_new = target_probs(model, tok, texts, [target_new] * len(texts))
    p_true = target_probs(model, tok, texts, [target_true] * len(texts)) if target_true else [None] * len(texts)
    return [
        {"kind": kind, "text": text, "top": [[t, p] for t, p in top], "p_target_new": pn, "p_target_true": pt}
        for (kind, text), top, pn, pt in zip(prompts, tops, p_new, p_true)
    ]
