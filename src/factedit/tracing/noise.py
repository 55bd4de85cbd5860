"""The corrupting noise: its default scale (the spread of subject-token embeddings) and the fixed samples.

The paper corrupts the subject with noise of standard deviation 3σ, σ being the
standard deviation of the embedding module's outputs over the subject tokens of
the known facts (official ``collect_embedding_std``). σ depends only on the model,
so it is computed once and cached under ``cache_dir("tracing")`` keyed by the
model fingerprint. Tokens are taken as they occur *in each prompt* (the tokens that
get noised), where the official code tokenized each subject alone.

The samples of one trace come from a seeded CPU generator, so a seed gives the same
noise on every device and the fast and official runners corrupt identically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.errors import FactEditError
from factedit.hooks import Trace
from factedit.models.architectures import arch_for
from factedit.models.fingerprint import model_fingerprint
from factedit.models.placement import input_device
from factedit.paths import atomic_write_bytes, cache_dir
from factedit.text import encode_with_subject, pad_id, pad_right
from factedit.tracing.inputs import split_prompt
from factedit.tracing.knowns import known_facts_path, load_known_facts

log = logging.getLogger(__name__)


def make_noise(samples: int, n_tokens: int, hidden: int, scale: float, seed: int) -> torch.Tensor:
    """The fixed noise of one trace: ``scale`` × standard normal, from a seeded generator (CPU, float32)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((samples, n_tokens, hidden), generator=gen) * float(scale)


@torch.no_grad()
def embedding_std(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    facts: Sequence[tuple[str, str]],
    *,
    batch_size: int = 128,
) -> tuple[float, int]:
    """Std (over all elements) of the embedding output at the subject tokens of ``(prompt, subject)`` pairs."""
    if not facts:
        raise FactEditError("no facts to measure the embedding spread on")
    arch = arch_for(model)
    device = input_device(model)
    pad = pad_id(tok)
    pieces: list[torch.Tensor] = []
    for start in range(0, len(facts), batch_size):
        encoded = [encode_with_subject(tok, split_prompt(p, s), s) for p, s in facts[start : start + batch_size]]
        ids, mask = pad_right([e.ids for e in encoded], pad, device)
        with Trace(model, arch.embed, stop=True) as emb:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for row, e in enumerate(encoded):
            pieces.append(emb.output[row, e.subject_first : e.subject_last + 1].float())
    values = torch.cat(pieces)
    return float(values.std()), int(values.shape[0])


def noise_scale(model: nn.Module, tok: PreTrainedTokenizerBase, *, refresh: bool = False) -> float:
    """σ of subject-token embeddings over the known facts, from the on-disk cache when present."""
    fingerprint = model_fingerprint(model)
    path = cache_dir("tracing") / f"embedding_std-{fingerprint}.json"
    if path.is_file() and not refresh:
        try:
            return float(json.loads(path.read_text())["std"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable cache %s (%s)", path, exc)
    source = known_facts_path()
    facts = load_known_facts(source)
    std, n_tokens = embedding_std(model, tok, [(f.prompt, f.subject) for f in facts])
    record = {
        "std": std,
        "n_facts": len(facts),
        "n_tokens": n_tokens,
        "source": str(source),
        "fingerprint": fingerprint,
    }
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    log.info("subject-embedding std %.5f over %d tokens of %d facts (cached in %s)", std, n_tokens, len(facts), path)
    return std
