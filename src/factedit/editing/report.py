"""Edit and compare: the before/after report every front end shows.

``edit_and_compare`` probes the model on each request's prompt (and, for one request, on the
paraphrases and neighbouring prompts given), computes the edit with a registered method, applies
it, probes again and returns an :class:`EditReport`. The CLI renders it as a table or JSON, the web
app serialises it; neither builds its own before/after logic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from factedit.editing.hparams import HyperParams
from factedit.editing.methods import EditMethod, HParamsSource, get_method
from factedit.editing.patch import AppliedPatch, PatchStack
from factedit.editing.requests import EditRequest
from factedit.editing.resources import EditResources
from factedit.editing.result import EditResult
from factedit.editing.sequential import SequentialEditor, edits_holding
from factedit.errors import FactEditError
from factedit.models.chat import ChatFormat
from factedit.predict import MAX_NEW_TOKENS, generate, probe, top_next_tokens
from factedit.progress import Progress, as_progress
from factedit.text import check_text, target_ids

MAX_PROBES = 100  # paraphrases + neighbours probed around one edit


@dataclass
class CompareRow:
    """One probed prompt: its kind (prompt / paraphrase / neighbour), text and the probes before and after
    (``{"top": [[token, p], ...], "p_target_new": p, "p_target_true": p | None}``)."""

    request: int
    kind: str
    text: str
    before: dict[str, Any]
    after: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "request": self.request,
            "kind": self.kind,
            "text": self.text,
            "before": self.before,
            "after": self.after,
        }


@dataclass
class EditReport:
    """What an edit did. ``landed[i]``: request i's new target is the top next token on its prompt after the
    edit; ``converged[i]``: its optimisation reached its goal; ``applied``: the handles of the patches now
    on the model (``handle.revert()``); ``drift``: for sequences, earlier edits still holding per step."""

    method: str
    hparams: HyperParams | None
    requests: list[EditRequest]
    rows: list[CompareRow]
    results: list[EditResult] = field(default_factory=list)
    applied: list[AppliedPatch] = field(default_factory=list)
    landed: list[bool] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    edit_seconds: float = 0.0
    seconds: float = 0.0
    drift: list[dict[str, Any]] | None = None
    stack: PatchStack | None = None  # sequences: the stack holding every step (``stack.revert_all()``)

    @property
    def layers(self) -> list[int] | None:
        return list(self.hparams.layers) if self.hparams is not None and hasattr(self.hparams, "layers") else None

    @property
    def patches(self):
        return [handle.patch for handle in self.applied]

    def rows_of(self, request: int) -> list[CompareRow]:
        return [row for row in self.rows if row.request == request]

    def summary_line(self) -> str:
        """One line: did the edits converge and land?"""
        n = len(self.requests)
        if not self.results:
            return f"{self.method}: no edit made"
        conv, landed = sum(self.converged), sum(self.landed)
        if n == 1:
            return (
                f"{self.method}: optimisation {'converged' if conv else 'did NOT converge'}; the new target "
                f"{self.requests[0].new_text!r} {'is now' if landed else 'is NOT'} the top prediction"
            )
        return (
            f"{self.method}: {conv}/{n} optimisations converged; the new target is the top prediction "
            f"for {landed}/{n} prompts"
        )

    def to_dict(self) -> dict[str, Any]:
        single = len(self.requests) == 1
        return {
            "method": self.method,
            "layers": self.layers,
            "request": self.requests[0].to_dict() if single else None,
            "requests": [r.to_dict() for r in self.requests],
            "rows": [row.to_dict() for row in self.rows],
            "before": [{"kind": r.kind, "text": r.text, **r.before} for r in self.rows],
            "after": [{"kind": r.kind, "text": r.text, **(r.after or {})} for r in self.rows],
            "landed": self.landed,
            "converged": self.converged,
            "summary": self.summary_line(),
            "generations": self.generations,
            "timings": self.timings,
            "edit_seconds": self.edit_seconds,
            "seconds": self.seconds,
            "drift": self.drift,
            "hparams": self.hparams.model_dump(mode="json") if self.hparams is not None else None,
        }


def check_probe_texts(paraphrases: Sequence[str], neighbours: Sequence[str]) -> None:
    """Paraphrase and neighbour prompts are plain texts (used as they are): non-blank, bounded in length and
    number. Checked before any forward pass."""
    if len(paraphrases) + len(neighbours) > MAX_PROBES:
        raise FactEditError(f"at most {MAX_PROBES} paraphrase and neighbour prompts are probed around one edit")
    for text in paraphrases:
        check_text(text, "paraphrase")
    for text in neighbours:
        check_text(text, "neighbour prompt")


def fill_true_targets(
    model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
) -> list[EditRequest]:
    """Requests without a true target get the model's current top next token as theirs (one forward pass)."""
    missing = [r for r in requests if r.target_true is None]
    tops = iter(top_next_tokens(model, tok, [r.text for r in missing], 1) if missing else [])
    out = []
    for r in requests:
        if r.target_true is None:
            top = next(tops)[0][0]
            true = top.strip() or top
            if true == r.target_new.strip():
                raise FactEditError(
                    f"the new target {r.target_new.strip()!r} is already the model's top prediction after "
                    f"{r.text!r}: nothing to edit (choose another target)"
                )
            r = EditRequest(r.prompt, r.subject, r.target_new, target_true=true, case_id=r.case_id)
        out.append(r)
    return out


def is_top_prediction(
    model: nn.Module, tok: PreTrainedTokenizerBase, request: EditRequest, top: list[list[Any]] | None = None
) -> bool:
    """Whether the first token of the new target is the most likely next token after the prompt."""
    first = target_ids(tok, request.text, request.new_text)[0]
    best = top[0][0] if top else top_next_tokens(model, tok, [request.text], 1)[0][0][0]
    return tok.decode([first]) == best


def edit_and_compare(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: EditRequest | Sequence[EditRequest],
    method: str | EditMethod = "rome",
    hparams: HParamsSource = None,
    *,
    overrides: dict[str, Any] | None = None,
    resources: EditResources | None = None,
    paraphrases: Sequence[str] = (),
    neighbours: Sequence[str] = (),
    generate_tokens: int = 0,
    sequential: bool = False,
    batch_size: int = 1,
    stack: PatchStack | None = None,
    prompt_format: ChatFormat | None = None,
    progress: Progress | bool | None = None,
    **options: Any,
) -> EditReport:
    """Probe, edit (and apply), probe again. Everything is validated before the first forward pass.

    ``prompt_format``: a chat format (:func:`factedit.models.chat.chat_format`) that wraps every request's
    prompt and every probe text as a user turn; ``None`` uses the texts as they are.

    ``stack``: push the patch(es) on this stack instead of applying them alone (the web app's patch list).
    ``options`` go to the method's compute function (e.g. ``second_moment``, ``templates``).
    """
    started = time.perf_counter()
    progress = as_progress(progress)
    edit_method = get_method(method) if isinstance(method, str) else method
    paraphrases, neighbours = list(paraphrases), list(neighbours)
    check_probe_texts(paraphrases, neighbours)
    if isinstance(generate_tokens, bool) or not isinstance(generate_tokens, int):
        raise FactEditError(f"the number of generated tokens must be a whole number (got {generate_tokens!r})")
    if not 0 <= generate_tokens <= MAX_NEW_TOKENS:
        raise FactEditError(f"the number of generated tokens must be 0 to {MAX_NEW_TOKENS} (got {generate_tokens})")
    hp = edit_method.hparams(model, hparams, overrides)
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    if prompt_format is not None:
        requests = [r.in_format(prompt_format) for r in requests]
        paraphrases = [prompt_format.wrap(p) for p in paraphrases]
        neighbours = [prompt_format.wrap(p) for p in neighbours]
    if sequential:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FactEditError(f"batch size must be a whole number of at least 1 (got {batch_size!r})")
        for start in range(0, len(requests), batch_size):
            edit_method.check_requests(requests[start : start + batch_size], hp)
    else:
        requests = edit_method.check_requests(requests, hp)
    resources = resources or EditResources(model, tok)
    requests = fill_true_targets(model, tok, requests)
    single = len(requests) == 1
    rows: list[CompareRow] = []
    for i, r in enumerate(requests):
        checks = [("prompt", r.text)]
        if single:
            checks += [("paraphrase", p) for p in paraphrases] + [("neighbour", p) for p in neighbours]
        for row in probe(model, tok, checks, r.new_text, r.true_text):
            rows.append(
                CompareRow(
                    request=i,
                    kind=row["kind"],
                    text=row["text"],
                    before={k: row[k] for k in ("top", "p_target_new", "p_target_true")},
                )
            )
    generations = (
        [{"prompt": r.text, "before": generate(model, tok, r.text, max_new_tokens=generate_tokens)} for r in requests]
        if generate_tokens
        else []
    )

    t_edit = time.perf_counter()
    drift = None
    if sequential:
        editor = SequentialEditor(
            model,
            tok,
            edit_method,
            hp,
            resources=resources,
            progress=progress,
            templates=options.pop("templates", None),
            second_moment=options.pop("second_moment", None),
        )
        if stack is not None:
            editor.stack = stack
        drift = editor.run(
            requests, batch_size=batch_size, after_step=lambda step, done: edits_holding(model, tok, done)
        )
        results, applied, stack = editor.results, list(editor.stack.handles), editor.stack
    else:
        result = edit_method.compute(model, tok, requests, hp, resources=resources, progress=progress, **options)
        results = [result] if result is not None else []
        applied = [stack.push(result.patch) if stack is not None else result.patch.apply(model)] if result else []
    edit_seconds = time.perf_counter() - t_edit

    for i, r in enumerate(requests):
        texts = [row for row in rows if row.request == i]
        for row, after in zip(
            texts, probe(model, tok, [(row.kind, row.text) for row in texts], r.new_text, r.true_text)
        ):
            row.after = {k: after[k] for k in ("top", "p_target_new", "p_target_true")}
    for g, r in zip(generations, requests):
        g["after"] = generate(model, tok, r.text, max_new_tokens=generate_tokens)
    landed = [
        is_top_prediction(model, tok, r, rows_of_prompt.after["top"])
        for r, rows_of_prompt in zip(requests, [row for row in rows if row.kind == "prompt"])
    ]
    by_request = {id(req): ok for res in results for req, ok in zip(res.requests, res.converged)}
    converged = [by_request.get(id(r), all(c for res in results for c in res.converged)) for r in requests]
    timings: dict[str, float] = {}
    for res in results:
        for key, value in res.timings.items():
            timings[key] = timings.get(key, 0.0) + float(value)
    return EditReport(
        method=edit_method.name,
        hparams=hp,
        requests=requests,
        rows=rows,
        results=results,
        applied=applied,
        landed=landed,
        converged=converged if results else [],
        generations=generations,
        timings=timings,
        edit_seconds=edit_seconds,
        seconds=time.perf_counter() - started,
        drift=drift,
        stack=stack,
    )
