"""Seeded top-k sampling for the fluency/consistency metrics, following ROME's ``generate_fast``.

ROME samples one continuation per generation prompt with top-k 5 until the text
(prompt included) is ``max_out_len`` = 100 tokens long, does not stop at EOS, and
scores the decoded prompt + continuation (NFKD-normalised, blank lines joined).
Here the sampler is batched with left padding and a KV cache, and draws from its own
``torch.Generator`` so a case's texts depend only on its seed, not on what ran before.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.models.cache import full_cache
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
    width = int(lengths.max())
    ids = torch.full((len(seqs), width), pad_id(tok), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):  # left padding: every row's next token is at the same column
        ids[i, width - len(s) :] = torch.tensor(s, device=device)
        mask[i, width - len(s) :] = 1
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
