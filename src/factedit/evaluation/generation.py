"""Seeded top-k sampling for the fluency/consistency metrics, following ROME's ``generate_fast``, and
greedy answers for the generative (WILD) metrics.

ROME samples one continuation per generation prompt with top-k 5 until the text
(prompt included) is ``max_out_len`` = 100 tokens long, does not stop at EOS, and
scores the decoded prompt + continuation (NFKD-normalised, blank lines joined).
Here the sampler is batched with left padding and a KV cache, and draws from its own
``torch.Generator`` so a case's texts depend only on its seed, not on what ran before.

:func:`greedy_answers` is the WILD protocol's decoding ("The Mirage of Model Editing", arXiv
2502.11177): no teacher forcing, the model's own argmax continuation of each prompt, at most
``max_new_tokens`` tokens, each row stopping at its first sentence end, newline or special token.
Batched the same way (left padding, positions from the mask, KV cache); deterministic.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.evaluation.metrics import first_sentence
from factedit.models.cache import cache_states, full_cache, select_rows
from factedit.models.placement import input_device
from factedit.text import pad_id


def case_seed(seed: int, case_id: int | str) -> int:
    """A per-case seed from the run seed, so resumed or reordered runs sample identical texts."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{case_id}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def sample_texts(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_out_len: int = 100,
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """One top-k sample per prompt; each text (prompt included) is at most ``max_out_len`` tokens."""
    if not prompts:
        return []
    device = input_device(model)
    seqs = [tok(p)["input_ids"] for p in prompts]
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    ids, mask = _left_padded(seqs, pad_id(tok), device)
    steps = max(0, max_out_len - int(lengths.min()))
    gen = torch.Generator(device=device).manual_seed(seed)
    new_tokens: list[torch.Tensor] = []
    cache = full_cache()
    step_ids, positions = ids, (mask.cumsum(1) - 1).clamp(min=0)
    for _ in range(steps):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        top = probs.topk(top_k, dim=-1)
        pick = torch.multinomial(top.values / top.values.sum(1, keepdim=True), 1, generator=gen)
        nxt = top.indices.gather(1, pick)
        new_tokens.append(nxt)
        step_ids = nxt
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    generated = torch.cat(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in seqs]
    texts = []
    for s, g in zip(seqs, generated):
        full = s + g[: max(0, max_out_len - len(s))]
        text = tok.decode(full, skip_special_tokens=True)
        texts.append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    return texts


def _left_padded(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding: every row's next token is at the same column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, device=device)
        mask[i, width - len(s) :] = 1
    return ids, mask


@dataclass(frozen=True)
class GreedyAnswer:
    """One prompt's greedy continuation: the decoded text (up to and including its first sentence end) and
    the generated token ids (compared exactly by WILD's locality)."""

    text: str
    ids: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"text": self.text, "ids": list(self.ids)}


def stop_token_ids(tok: PreTrainedTokenizerBase) -> frozenset[int]:
    """Tokens that end an answer: EOS and every other special token (a chat turn's end, a document start)."""
    ids = set(getattr(tok, "all_special_ids", None) or [])
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return frozenset(ids)


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 50,
    batch_size: int = 64,
    compact: bool = True,
) -> list[GreedyAnswer]:
    """Greedy (argmax) continuation of each prompt, at most ``max_new_tokens`` tokens; a row stops at a
    special token (not kept), a newline or its first sentence end (:func:`~factedit.evaluation.metrics.
    first_sentence`); the text is cut there. Batched with left padding; a finished row leaves the batch
    (its cache rows dropped), so later steps cost only the answers still running. ``compact=False`` keeps
    every row to the end (the plain path, for comparison: same answers up to float ties)."""
    out: list[GreedyAnswer] = []
    for lo in range(0, len(prompts), batch_size):
        out += _greedy_batch(model, tok, list(prompts[lo : lo + batch_size]), max_new_tokens, compact)
    return out


def _greedy_batch(
    model: nn.Module, tok: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int, compact: bool = True
):
    if not prompts:
        return []
    device = input_device(model)
    stops = stop_token_ids(tok)
    seqs = [tok(p)["input_ids"] for p in prompts]
    ids, mask = _left_padded(seqs, pad_id(tok), device)
    generated: list[list[int]] = [[] for _ in prompts]
    texts = [""] * len(prompts)
    active = [True] * len(prompts)
    running = list(range(len(prompts)))  # the prompts still in the batch, by batch row
    cache = full_cache()
    step_ids, positions = ids, (mask.cumsum(1) - 1).clamp(min=0)
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].float().argmax(-1, keepdim=True)
        for row, token in zip(running, nxt[:, 0].tolist()):
            if not active[row]:  # finished, still in the batch (compact=False)
                continue
            if token in stops:
                active[row] = False
                continue
            generated[row].append(token)
            texts[row] = tok.decode(generated[row], skip_special_tokens=True)
            if first_sentence(texts[row], final=False) is not None:
                active[row] = False
        keep = [i for i, row in enumerate(running) if active[row]]
        if not keep:
            break
        if compact and len(keep) < len(running):  # finished answers leave: later steps cost what still runs
            index = torch.tensor(keep, device=mask.device)
            cache = full_cache(select_rows(cache_states(cache), index))
            mask, positions, nxt = mask[index], positions[index], nxt[index.to(nxt.device)]
            running = [running[i] for i in keep]
        step_ids = nxt.to(device)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(nxt, device=mask.device)], dim=1)
    answers = []
    for row, text in enumerate(texts):
        sentence = first_sentence(text)
        answers.append(GreedyAnswer(text if sentence is None else sentence, tuple(generated[row])))
    return answers
