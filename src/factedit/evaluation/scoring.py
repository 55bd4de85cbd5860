"""Teacher-forced scoring of (prompt, continuation) pairs: per-token log-probabilities and argmax hits.

One batched forward per chunk of pairs; the LM head runs only at the positions that
predict continuation tokens (the rest of the vocabulary projection would be wasted).
Target tokens are those the model sees when the continuation follows the prompt
(:func:`factedit.text.target_ids`), like ROME's ``tok(f"{prefix} {target}")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.values import lm_logits
from factedit.hooks import Trace
from factedit.models.architectures import arch_for
from factedit.text import pad_id, pad_right, target_ids


@dataclass(frozen=True)
class ContinuationScore:
    """Per continuation token: log p(token | prompt, previous tokens) and whether it was the argmax."""

    logprobs: tuple[float, ...]
    argmax: tuple[bool, ...]

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
    device = next(model.parameters()).device
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
        rows = torch.cat([torch.full((n,), r, dtype=torch.long) for r, (_, n) in enumerate(chunk_spans)]).to(device)
        pos = torch.cat([torch.arange(s - 1, s - 1 + n) for s, n in chunk_spans]).to(device)
        logp = torch.log_softmax(lm_logits(model, arch, fin.output[rows, pos]).float(), dim=-1)
        wanted = ids[rows, pos + 1]
        token_logp = logp.gather(1, wanted[:, None]).squeeze(1).tolist()
        hits = (logp.argmax(-1) == wanted).tolist()
        k = 0
        for _, n in chunk_spans:
            out.append(ContinuationScore(tuple(token_logp[k : k + n]), tuple(bool(h) for h in hits[k : k + n])))
            k += n
    return out
