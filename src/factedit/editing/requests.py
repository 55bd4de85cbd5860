"""An edit request: (subject, relation prompt) should now complete to a new target."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError
from factedit.text import check_prompt, check_subject, with_leading_space


@dataclass(frozen=True, init=False)
class EditRequest:
    """``prompt`` holds ``{}`` where ``subject`` goes, e.g. ``"The {} is located in the city of"``.

    The new target is ``target_new`` (CounterFact's and ROME's name, kept in patch and run files);
    ``target=`` is accepted as the same thing, as the CLI's ``--target`` and request files' ``"target"``.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None

    def __init__(
        self,
        prompt: str,
        subject: str,
        target_new: str | None = None,
        target_true: str | None = None,
        case_id: int | str | None = None,
        *,
        target: str | None = None,
    ) -> None:
        if target is not None and target_new is not None and target != target_new:
            raise FactEditError("give the new target once (target or target_new), not two different ones")
        new = target_new if target_new is not None else target
        if new is None:
            raise FactEditError("an edit request needs a new target (target=...)")
        for name, value in (
            ("prompt", prompt),
            ("subject", subject),
            ("target_new", new),
            ("target_true", target_true),
            ("case_id", case_id),
        ):
            object.__setattr__(self, name, value)
        self.__post_init__()

    @property
    def target(self) -> str:
        return self.target_new

    def __post_init__(self) -> None:
        check_prompt(self.prompt)
        check_subject(self.subject)
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise FactEditError("target is empty")
        if self.target_true is not None and not str(self.target_true).strip():
            raise FactEditError("true target is empty (leave it out instead)")

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject) if "{}" in self.prompt else self.prompt

    @property
    def new_text(self) -> str:
        """The new target as it follows the prompt (with ROME's leading space)."""
        return with_leading_space(self.target_new.strip())

    @property
    def true_text(self) -> str | None:
        return with_leading_space(self.target_true.strip()) if self.target_true else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        """Accept the simple form ``{prompt, subject, target[_new], target_true}`` or a CounterFact record."""
        if "requested_rewrite" in data:
            rw = data["requested_rewrite"]
            return cls(
                prompt=rw["prompt"],
                subject=rw["subject"],
                target_new=rw["target_new"]["str"],
                target_true=rw["target_true"]["str"],
                case_id=data.get("case_id"),
            )
        if "prompt" in data and "subject" in data:
            prompt, subject = data["prompt"], data["subject"]
            if isinstance(prompt, str) and "{}" not in prompt and isinstance(subject, str) and subject.strip():
                if subject not in prompt:
                    raise FactEditError(f"subject {subject!r} not found in prompt {prompt!r}")
                prompt = prompt.replace(subject, "{}", 1)  # a prompt may spell the subject out instead of {}
            data = {**data, "prompt": prompt}
            new = data.get("target_new", data.get("target"))
            if isinstance(new, dict):
                new = new.get("str")
            true = data.get("target_true")
            if isinstance(true, dict):
                true = true.get("str")
            if new is None:
                raise FactEditError("request has no 'target' / 'target_new'")
            return cls(
                prompt=data["prompt"],
                subject=data["subject"],
                target_new=new,
                target_true=true,
                case_id=data.get("case_id"),
            )
        raise FactEditError("a request needs 'prompt', 'subject' and 'target' (or a CounterFact 'requested_rewrite')")


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read a JSON list of requests (simple ``{prompt, subject, target}`` or CounterFact records).

    Every record is validated first; if any is bad the whole file is refused with one line
    per bad record, so a batch is never half-applied.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FactEditError(f"cannot read requests from {path}: {exc}") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise FactEditError(f"{path}: expected a non-empty JSON list of requests")
    requests, problems = [], []
    for i, record in enumerate(data):
        try:
            if not isinstance(record, dict):
                raise FactEditError("not a JSON object")
            requests.append(EditRequest.from_dict(record))
        except (FactEditError, KeyError, TypeError) as exc:
            problems.append(f"  request {i}: {exc}")
    if problems:
        raise FactEditError(f"{path}: {len(problems)} bad request(s), nothing edited:\n" + "\n".join(problems))
    return requests
