"""What the model says: top next tokens, teacher-forced target probabilities, generations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.text import pad_id, pad_right, target_ids


@torch.no_grad()
def top_next_tokens(
    model: nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str], k: int = 5
) -> list[list[tuple[str, float]]]:
    """The ``k`` most likely next tokens after each text, with probabilities."""
    device = next(model.parameters()).device
    seqs = [tok(t)["input_ids"] for t in texts]
    ids, mask = pad_right(seqs, pad_id(tok), device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    last = logits[torch.arange(len(seqs), device=device), mask.sum(1) - 1].float()
    probs = torch.softmax(last, dim=-1)
    top = probs.topk(k, dim=-1)
    return [
        [(tok.decode([int(i)]), float(p)) for p, i in zip(row_p, row_i)]
        for row_p, row_i in zip(top.values, top.indices)
    ]


@torch.no_grad()
def target_log_probs(
    model: nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str], targets: Sequence[str]
) -> list[tuple[float, int]]:
    """Teacher-forced log-probability of each target continuing its text: ``(sum log p, n_tokens)``.

    ``exp(sum)`` is the joint probability; ``-sum / n`` ROME's length-normalised NLL.
    """
    device = next(model.parameters()).device
    seqs, spans = [], []
    for text, target in zip(texts, targets):
        prompt = tok(text)["input_ids"]
        tgt = target_ids(tok, text, target)
        seqs.append(prompt + tgt)
        spans.append((len(prompt), len(tgt)))
    ids, mask = pad_right(seqs, pad_id(tok), device)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), dim=-1)
    out = []
    for row, (start, n) in enumerate(spans):
        pos = torch.arange(start - 1, start - 1 + n, device=device)
        out.append((float(logp[row, pos, ids[row, pos + 1]].sum()), n))
    return out


def new_beats_true(
    model: nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str], new: str, true: str
) -> list[bool]:
    """Per text: is the new target more likely than the true one (per-token NLL, ROME's test)?

    Both targets of every text go through one forward pass.
    """
    texts = list(texts)
    scores = target_log_probs(model, tok, texts + texts, [new] * len(texts) + [true] * len(texts))
    return [a / n > b / m for (a, n), (b, m) in zip(scores[: len(texts)], scores[len(texts) :])]


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
    device = next(model.parameters()).device
    enc = tok(prompt, return_tensors="pt").to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=sample, top_k=top_k if sample else None,
            pad_token_id=pad_id(tok),
        )
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


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
