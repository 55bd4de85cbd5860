"""A document-start token for tokenizers that add none, so no prompt's first word sits at position 0.

Models pretrained on packed documents see a separator (``<|endoftext|>``) or a BOS before every
document, and position 0 becomes an attention sink whose hidden states look unlike any other
position's. Tokenizers of such models (SmolLM2, Qwen2.5, GPT-2) add nothing when they encode a
prompt, so a subject that opens a prompt ("Olot, located in") is read at the sink. Its MLP key
then differs from the keys of the same subject after the context templates' prefixes, and a
rank-one update written for the template-averaged key (r-ROME's consistent key) reaches it only
in part: on SmolLM2-135M the bare prompts that failed got a median 0.275 of the update
(``bench/rome_key_projection.py``).

:func:`add_document_start` makes the tokenizer itself prepend the separator, so editing (keys,
values, templates), statistics, evaluation, tracing and generation all read the same sequences
with no second code path. Tokenizers that already add a BOS (Llama, Gemma, Mistral) are left as
they are. The change is made on the fast tokenizer's post-processor and is idempotent.
"""

from __future__ import annotations

import json
import logging

from tokenizers.processors import Sequence, TemplateProcessing
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Set on a tokenizer once its document start is decided: the token prepended, or "" for none added.
DOCUMENT_START_ATTRIBUTE = "factedit_document_start"
# Preferred separators, in order: the token pretraining put between packed documents.
_SEPARATORS = ("<|endoftext|>",)


def _adds_leading_special(tok: PreTrainedTokenizerBase) -> bool:
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] in set(tok.all_special_ids)


def document_start_token(tok: PreTrainedTokenizerBase) -> str | None:
    """The token :func:`add_document_start` prepends (``None``: the tokenizer adds one already, or has none)."""
    if _adds_leading_special(tok):
        return None
    vocab = tok.get_vocab()
    for candidate in (*_SEPARATORS, tok.bos_token, tok.eos_token):
        if isinstance(candidate, str) and candidate in vocab:
            return candidate
    return None


def add_document_start(tok: PreTrainedTokenizerBase) -> str:
    """Make ``tok`` prepend a document-start token to every encoding (in place); returns the token, or ""
    when none is added (the tokenizer adds a BOS itself, has no candidate, or is a slow tokenizer)."""
    done = getattr(tok, DOCUMENT_START_ATTRIBUTE, None)
    if isinstance(done, str):
        return done
    token = document_start_token(tok)
    backend = getattr(tok, "_tokenizer", None)
    if token and backend is None:
        log.warning("slow tokenizer: no document-start token added; prompts start at position 0")
        token = None
    if token:
        prepend = TemplateProcessing(
            single=f"{token} $A", pair=f"{token} $A $B:1", special_tokens=[(token, tok.convert_tokens_to_ids(token))]
        )
        current = backend.post_processor
        state = json.loads(backend.to_str()).get("post_processor") or {}
        adds_nothing = state.get("type") == "TemplateProcessing" and not state.get("special_tokens")
        # A template that adds nothing is replaced; any other processor (ByteLevel offset trimming) runs first.
        backend.post_processor = prepend if current is None or adds_nothing else Sequence([current, prepend])
    setattr(tok, DOCUMENT_START_ATTRIBUTE, token or "")
    return token or ""


def document_start_of(tok: PreTrainedTokenizerBase) -> str:
    """What :func:`add_document_start` did to ``tok`` ("" when nothing or not called): part of cache keys
    for anything computed from encodings (statistics), since it changes every sequence."""
    done = getattr(tok, DOCUMENT_START_ATTRIBUTE, None)
    return done if isinstance(done, str) else ""
