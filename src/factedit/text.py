"""Prompts, subjects and tokens: where is the subject, which tokens are the target.

Positions are found from the tokenizer's character offsets, so they are right
for any fast tokenizer (BPE with or without a BOS token, SentencePiece), not
only when tokenization happens to be compositional.

Rules for the texts factedit takes from a user (CLI, request and data files, the Python API):

* A prompt *template* holds exactly one ``{}`` (where the subject goes) and no other brace: ``{0}``,
  ``{name}``, ``{__class__}``, a lone ``{`` or ``}`` and the ``{{``/``}}`` escapes are all refused.
  The subject is put in by plain text replacement (:func:`fill`), never ``str.format``, so what is
  edited is exactly what is shown; refusing escapes means there is no second reading of a template
  (``{{x}}`` would be ``{x}`` to ``str.format`` but ``{{x}}`` to the tokenizer). A prompt that spells
  the subject out instead of ``{}`` (:func:`as_template`) follows the same rule once the subject is
  replaced. Subjects hold no braces either (a ``{}`` in a subject would be read as the placeholder).
* Texts used as they are (paraphrases, neighbour prompts, ``predict``/``generate`` text) may hold
  braces: nothing fills them.
* Every text is non-blank and at most :data:`MAX_TEXT_CHARS` characters (2,000, about 500 tokens:
  far above any fact prompt, far below the context of the supported models, and it keeps one request
  from asking for minutes of work or gigabytes of attention memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from factedit.errors import FactEditError

MAX_TEXT_CHARS = 2000  # longest prompt, subject, target or probe text accepted (see the module docstring)


def _short(text: str, limit: int = 60) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, for messages about very long inputs."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_text(text: str, what: str = "text") -> str:
    """A non-blank string of at most :data:`MAX_TEXT_CHARS` characters (``what`` names it in errors)."""
    if not isinstance(text, str):
        raise FactEditError(f"{what} must be a string, not {type(text).__name__}")
    if not text.strip():
        raise FactEditError(f"{what} is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise FactEditError(
            f"{what} is {len(text):,} characters long ({_short(text)}): at most {MAX_TEXT_CHARS:,} are accepted"
        )
    return text


def check_prompt(prompt: str) -> str:
    """A prompt template: exactly one ``{}`` for the subject and no other brace (module docstring)."""
    check_text(prompt, "prompt")
    count = prompt.count("{}")
    if count != 1:
        raise FactEditError(f"prompt must contain exactly one '{{}}' where the subject goes, found {count}: {prompt!r}")
    rest = prompt.replace("{}", "", 1)
    if "{" in rest or "}" in rest:
        raise FactEditError(
            f"prompt {prompt!r} has braces other than its one '{{}}' (such as {{0}}, {{name}}, {{{{ or a lone "
            "brace): remove them; the subject goes where '{}' is"
        )
    return prompt


def check_subject(subject: str) -> str:
    """A non-blank subject without braces, at most :data:`MAX_TEXT_CHARS` characters."""
    check_text(subject, "subject")
    if "{" in subject or "}" in subject:
        raise FactEditError(f"subject {subject!r} contains a brace: subjects are plain text")
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
    """Fill ``{}`` with the subject; return text and the subject's character span.

    Plain replacement, never ``str.format``: the text edited and the text shown are the same string.
    """
    start = template.index("{}")
    text = template[:start] + subject + template[start + 2 :]
    return text, start, start + len(subject)


def filled(template: str, subject: str) -> str:
    """``template`` with its ``{}`` replaced by ``subject`` (the text :func:`fill` makes)."""
    return fill(template, subject)[0]


def as_template(prompt: str, subject: str) -> str:
    """A prompt template with ``{}`` where the subject goes: ``prompt`` itself when it has one, else
    ``prompt`` with the subject's first occurrence replaced (users and data sets often spell it out)."""
    check_text(prompt, "prompt")
    check_subject(subject)
    if "{}" in prompt:
        return check_prompt(prompt)
    if subject not in prompt:
        raise FactEditError(f"subject {subject!r} does not occur in the prompt {prompt!r} (matching is case-sensitive)")
    return check_prompt(prompt.replace(subject, "{}", 1))


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
    check_text(target, "target")
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
