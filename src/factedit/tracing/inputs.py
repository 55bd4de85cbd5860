"""Checked inputs of a causal trace: the prompt template, the answer token, token and layer selections."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from factedit.errors import FactEditError
from factedit.text import as_template, target_ids


def split_prompt(prompt: str, subject: str) -> str:
    """A template with ``{}`` for the subject: given as is, or made from a full prompt containing it."""
    return as_template(prompt, subject)


def answer_token(tok: PreTrainedTokenizerBase, prompt_text: str, answer: str) -> int:
    """First token of ``answer`` as it would follow the prompt (a space is added after a word, as ROME does)."""
    if not isinstance(answer, str) or not answer.strip():
        raise FactEditError(f"answer {answer!r} is empty: it tokenizes to nothing; give a word such as ' Paris'")
    if not answer[0].isspace() and prompt_text and not prompt_text[-1].isspace():
        answer = " " + answer
    try:
        ids = target_ids(tok, prompt_text, answer)
    except FactEditError as exc:
        raise FactEditError(f"answer {answer!r} tokenizes to nothing with this tokenizer") from exc
    return int(ids[0])


def token_positions(
    tokens: Sequence[int] | Mapping[str, Sequence[int]] | None, kinds: list[str], n_tokens: int
) -> dict[str, list[int]]:
    """Token positions to trace per kind (negative positions count from the end); all of them when ``None``."""

    def check(ts: Sequence[int]) -> list[int]:
        out = sorted({int(t) + n_tokens if int(t) < 0 else int(t) for t in ts})
        if any(not 0 <= t < n_tokens for t in out):
            raise FactEditError(f"token positions {list(ts)} out of range for a {n_tokens}-token prompt")
        return out

    if tokens is None:
        return {k: list(range(n_tokens)) for k in kinds}
    if isinstance(tokens, Mapping):
        return {k: check(tokens[k]) if k in tokens else list(range(n_tokens)) for k in kinds}
    ts = check(tokens)
    return {k: ts for k in kinds}


def layer_positions(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """(Centre) layers to trace, sorted (negative ones count from the top); all of them when ``None``."""
    if layers is None:
        return list(range(n_layers))
    out = sorted({int(x) + n_layers if int(x) < 0 else int(x) for x in layers})
    if not out or any(not 0 <= x < n_layers for x in out):
        raise FactEditError(f"layers {list(layers)} out of range: this model has layers 0..{n_layers - 1}")
    return out
