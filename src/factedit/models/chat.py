"""Chat-wrapped prompts: a relation prompt as the user turn of the tokenizer's chat template.

Instruct models are used through their chat template, so an edit made on raw text (``"The Eiffel
Tower is located in"``) may not be what a chat user reaches. :class:`ChatFormat` renders the template
once around a sentinel and keeps the text before and after it, so wrapping is plain concatenation:

    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n{} is located in<|im_end|>\\n<|im_start|>assistant\\n

The prompt keeps its ``{}``, so the subject's token span is found inside the template by the same
character offsets as on raw text (:func:`factedit.text.encode_with_subject`), and the continuation
(the target) is read right after the assistant prefix. Choices, and why:

* Targets keep ROME's leading space (``" Paris"``) in both formats, so raw and chat runs score the
  same token ids and their numbers compare directly.
* ROME's context templates (``"<sampled text>. {}"``) are put before the wrapped prompt, as earlier
  text of a conversation would be; the bare template ``"{}"`` is the wrapped prompt itself.
* A template that starts with the BOS text the tokenizer adds anyway has it removed (no double BOS).
* A template whose fixed text holds a brace is refused: prompts allow exactly one ``{}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from factedit.errors import FactEditError

_SENTINEL = "\u2063FACTEDIT-USER-TURN\u2063"  # invisible separator: cannot clash with a template's own text
PROMPT_FORMATS = ("raw", "chat")


@dataclass(frozen=True)
class ChatFormat:
    """The fixed text a chat template puts before and after the user's message."""

    before: str
    after: str

    def wrap(self, prompt: str) -> str:
        """``prompt`` (a template with ``{}``, or plain text) as the user turn, ending at the assistant prefix."""
        return f"{self.before}{prompt}{self.after}"

    def unwrap(self, text: str) -> str:
        """The user's message of a wrapped text (``text`` itself when it is not wrapped by this format)."""
        if text.startswith(self.before) and text.endswith(self.after) and len(text) >= len(self.before + self.after):
            return text[len(self.before) : len(text) - len(self.after)]
        return text


def has_chat_template(tok: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tok, "chat_template", None))


def chat_format(tok: PreTrainedTokenizerBase, model_label: str = "this model") -> ChatFormat:
    """The chat format of ``tok``'s template (a user turn, then the generation prompt).

    Refused, in one line, when the tokenizer has no chat template (a pretrained, not instruct, model)
    or when the template's fixed text contains a brace.
    """
    if not has_chat_template(tok):
        raise FactEditError(
            f"{model_label} has no chat template (its tokenizer defines none: a pretrained, not an instruct, model): "
            "leave out --chat"
        )
    try:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # a template may raise anything (jinja errors, missing variables)
        raise FactEditError(f"the chat template of {model_label} could not be rendered: {exc}") from None
    if not isinstance(rendered, str) or rendered.count(_SENTINEL) != 1:
        raise FactEditError(f"the chat template of {model_label} does not put the user's message in its output once")
    before, after = rendered.split(_SENTINEL)
    bos = tok.bos_token
    if bos and before.startswith(bos) and _adds_bos(tok):
        before = before[len(bos) :]
    if any(brace in before + after for brace in "{}"):
        raise FactEditError(f"the chat template of {model_label} writes braces around the message: not supported")
    return ChatFormat(before=before, after=after)


def _adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    ids = tok("a")["input_ids"]
    return bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id


def prompt_format(tok: PreTrainedTokenizerBase, name: str, model_label: str = "this model") -> ChatFormat | None:
    """``None`` for ``"raw"``, the tokenizer's :class:`ChatFormat` for ``"chat"``."""
    if name == "raw":
        return None
    if name == "chat":
        return chat_format(tok, model_label)
    raise FactEditError(f"unknown prompt format {name!r}: choose one of {', '.join(PROMPT_FORMATS)}")
