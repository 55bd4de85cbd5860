"""Prompts, subjects and tokens: where is the subject, which tokens are the target.

Positions are found from the tokenizer's character offsets, so they are right
for any fast tokenizer (BPE with or without a BOS token, SentencePiece), not
only when tokenization happens to be compositional.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from factedit.errors import FactEditError


def check_prompt(prompt: str) -> str:
    """A prompt template must contain exactly one ``{}`` for the subject."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise FactEditError("prompt is empty")
    count = prompt.count("{}")
    if count != 1:
        raise FactEditError(f"prompt must contain exactly one '{{}}' where the subject goes, found {count}: {prompt!r}")
    return prompt


def check_subject(subject: str) -> str:
    if not isinstance(subject, str) or not subject.strip():
        raise FactEditError("subject is empty")
    return subject


@dataclass(frozen=True)
class SubjectPrompt:
    """A prompt with its subject filled in, tokenized, and the subject's token span."""

    text: str
    ids: list[int]
    subject_first: int  # index of the subject's first token
    subject_last: int  # index of the subject's last token

    def __len__(self) -> int:
        return len(self.ids)


def fill(template: str, subject: str) -> tuple[str, int, int]:
    """Fill ``{}`` with the subject; return text and the subject's character span."""
    start = template.index("{}")
    text = template[:start] + subject + template[start + 2 :]
    return text, start, start + len(subject)


def as_template(prompt: str, subject: str) -> str:
    """A prompt template with ``{}`` where the subject goes: ``prompt`` itself when it has one, else
    ``prompt`` with the subject's first occurrence replaced (users and data sets often spell it out)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise FactEditError("prompt is empty")
    check_subject(subject)
    if "{}" in prompt:
        return prompt
    if subject not in prompt:
        raise FactEditError(f"subject {subject!r} does not occur in the prompt {prompt!r} (matching is case-sensitive)")
    return prompt.replace(subject, "{}", 1)


def encode_with_subject(tok: PreTrainedTokenizerBase, template: str, subject: str) -> SubjectPrompt:
    """Tokenize ``template.format(subject)`` and locate the subject's tokens."""
    check_prompt(template)
    check_subject(subject)
    text, start, end = fill(template, subject)
    stripped_start = start + (len(subject) - len(subject.lstrip()))
    stripped_end = end - (len(subject) - len(subject.rstrip()))
    if tok.is_fast:
        enc = tok(text, return_offsets_mapping=False)
        first = enc.char_to_token(stripped_start)
        last = enc.char_to_token(stripped_end - 1)
        ids = enc["input_ids"]
    else:  # slow tokenizers: count tokens of the prefix and of prefix+subject
        ids = tok(text)["input_ids"]
        first = len(tok(text[:stripped_start])["input_ids"]) if stripped_start else 0
        last = len(tok(text[:stripped_end])["input_ids"]) - 1
    if first is None or last is None or last < first:
        raise FactEditError(f"subject {subject!r} was not found in the tokenized prompt {text!r}")
    return SubjectPrompt(text=text, ids=list(ids), subject_first=first, subject_last=last)


def target_ids(tok: PreTrainedTokenizerBase, prompt_text: str, target: str) -> list[int]:
    """Token ids of ``target`` as it continues ``prompt_text``.

    Tokenizing the joined text and dropping the prompt's tokens gives the ids the
    model would actually see (SentencePiece merges the leading space differently
    when a word stands alone). Falls back to tokenizing the target alone.
    """
    if not isinstance(target, str) or not target.strip():
        raise FactEditError("target is empty")
    prompt_ids = tok(prompt_text)["input_ids"]
    joined = tok(prompt_text + target)["input_ids"]
    if len(joined) > len(prompt_ids) and joined[: len(prompt_ids)] == prompt_ids:
        ids = joined[len(prompt_ids) :]
    else:
        ids = tok(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise FactEditError(f"target {target!r} tokenizes to nothing")
    return list(ids)


def with_leading_space(target: str) -> str:
    """ROME's convention: a new target is a word that follows the prompt after a space."""
    return target if target.startswith(" ") else " " + target


def pad_right(
    seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pid) if pid is not None else 0
