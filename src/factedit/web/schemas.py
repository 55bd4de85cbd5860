"""Request bodies of the REST API: strict types, bounded sizes, no field that names a file.

Strict mode means ``"5"`` is not an integer and ``1`` is not a string; ``extra="forbid"``
means a misspelt or unexpected field (``mom2_dataset``, ``path``...) is a 422, not
silently ignored. Lengths are bounded so that one request cannot ask for minutes of work.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from factedit.web.edits import edit_method_names

MAX_PROMPT_CHARS = 400
MAX_WORD_CHARS = 100
MAX_PARAPHRASES = 5
MAX_NEIGHBOURS = 10
MAX_TRACE_SAMPLES = 50
MAX_GENERATE_TOKENS = 100

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _plain(value: str) -> str:
    """No control characters and no braces: the core fills prompts with ``str.format``."""
    if _CONTROL.search(value):
        raise ValueError("control characters are not allowed")
    if "{" in value or "}" in value:
        raise ValueError("braces are not allowed here")
    return value


def _template(value: str) -> str:
    """At most one ``{}`` placeholder (where the subject goes) and no other braces."""
    if _CONTROL.search(value):
        raise ValueError("control characters are not allowed")
    if value.count("{}") > 1 or "{" in value.replace("{}", "") or "}" in value.replace("{}", ""):
        raise ValueError("only one {} placeholder is allowed, and no other braces")
    return value


def _known_method(value: str) -> str:
    """One of the registry's edit methods (the list is the registry's, never the app's own)."""
    names = edit_method_names()
    if value not in names:
        raise ValueError(f"unknown method {value[:40]!r}: choose one of {', '.join(names)}")
    return value


def _nonblank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Prompt = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS),
    AfterValidator(_nonblank),
    AfterValidator(_template),
]
PlainPrompt = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_nonblank), AfterValidator(_plain)
]
MethodName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=40),
    AfterValidator(_known_method),
    Field(json_schema_extra={"enum": edit_method_names()}),
]
Word = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_WORD_CHARS), AfterValidator(_nonblank), AfterValidator(_plain)
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictIn(Strict):
    """Top-k next tokens after ``prompt`` (with ``{}`` filled by ``subject`` when given)."""

    prompt: Prompt
    subject: Word | None = None
    k: int = Field(5, ge=1, le=20)
    chat: bool = Field(False, description="wrap the prompt in the model's chat template as a user turn")


class TraceIn(Strict):
    """A causal trace of the fact ``prompt`` (containing ``subject``, or ``{}``) → ``answer``."""

    prompt: Prompt
    subject: Word
    answer: Word | None = Field(None, description="token to trace; default: the model's top prediction")
    samples: int = Field(5, ge=1, le=MAX_TRACE_SAMPLES, description="noise samples per corrupted run")
    window: int = Field(10, ge=1, le=64, description="layers restored together for MLP/attention")
    chat: bool = Field(False, description="wrap the prompt in the model's chat template as a user turn")


class EditHyperParamsIn(Strict):
    """Advanced settings; anything left out keeps the method's default for the model. Each method takes
    those its hyper-parameter class has (``v_*``, clamp, KL: ROME/MEMIT/AlphaEdit; ``num_steps``, ``lr``,
    ``weight_decay``, ``norm_constraint``: FT/FT-L); the others are refused for it."""

    layers: list[Annotated[int, Field(ge=0, le=1000)]] | None = Field(None, min_length=1, max_length=8)
    v_num_grad_steps: int | None = Field(None, ge=1, le=100)
    v_lr: float | None = Field(None, gt=0, le=10)
    v_weight_decay: float | None = Field(None, ge=0, le=100)
    clamp_norm_factor: float | None = Field(None, gt=0, le=100)
    kl_factor: float | None = Field(None, ge=0, le=100)
    num_steps: int | None = Field(None, ge=1, le=200)
    lr: float | None = Field(None, gt=0, le=1)
    weight_decay: float | None = Field(None, ge=0, le=100)
    norm_constraint: float | None = Field(None, gt=0, le=10)


class EditIn(Strict):
    """Rewrite the fact ``prompt``/``subject`` to ``target``; check it on paraphrases and neighbours."""

    prompt: Prompt
    subject: Word
    target: Word
    target_true: Word | None = Field(None, description="the current answer; default: the model's top token")
    method: MethodName = "rome"
    paraphrases: list[PlainPrompt] = Field(default_factory=list, max_length=MAX_PARAPHRASES)
    neighbours: list[PlainPrompt] = Field(default_factory=list, max_length=MAX_NEIGHBOURS)
    generate_tokens: int = Field(20, ge=0, le=MAX_GENERATE_TOKENS)
    hparams: EditHyperParamsIn | None = None
    chat: bool = Field(False, description="wrap prompt, paraphrases and neighbours in the chat template")


class ModelIn(Strict):
    """A registered model name (never a path or a hub id)."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "done", "failed"]
    progress: float
    message: str
    error: str | None = None
    queue_position: int | None = None
