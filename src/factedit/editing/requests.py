"""An edit request: (subject, relation prompt) should now complete to a new target.

Requests are checked when they are made (:mod:`factedit.text` has the prompt and length rules): a
new target equal to the true one is refused (there is nothing to edit), and so are request records
with keys this module does not know (a misspelt ``"taget"`` must not be dropped silently).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError
from factedit.models.chat import ChatFormat
from factedit.paths import read_json_file
from factedit.text import check_prompt, check_subject, check_text, filled, with_leading_space

# keys a request record may have: the simple form, and a CounterFact record (whose evaluation prompts are
# allowed so that data-set records can be passed as they are; an edit uses only requested_rewrite)
# relation_id (CounterFact's relation, e.g. P17) is accepted and not used by the edit
SIMPLE_KEYS = frozenset({"prompt", "subject", "target", "target_new", "target_true", "case_id", "relation_id"})
COUNTERFACT_KEYS = frozenset(
    {
        "case_id",
        "pararel_idx",
        "requested_rewrite",
        "paraphrase_prompts",
        "neighborhood_prompts",
        "attribute_prompts",
        "generation_prompts",
    }
)
REWRITE_KEYS = frozenset({"prompt", "subject", "target_new", "target_true", "relation_id"})
MAX_LISTED_PROBLEMS = 10  # bad records named in one error line; the count says how many in all


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
        check_text(self.target_new, "target")
        if self.target_true is not None:
            if isinstance(self.target_true, str) and not self.target_true.strip():
                raise FactEditError("true target is empty (leave it out instead)")
            check_text(self.target_true, "true target")
            if self.target_true.strip() == self.target_new.strip():
                raise FactEditError(
                    f"the new target {self.target_new.strip()!r} is the true target already: nothing to edit "
                    "(choose another target)"
                )
        if self.case_id is not None and (isinstance(self.case_id, bool) or not isinstance(self.case_id, (int, str))):
            raise FactEditError(f"case_id must be a number or a string, not {type(self.case_id).__name__}")

    @property
    def text(self) -> str:
        """The prompt with the subject in its ``{}`` (plain replacement: the text that is edited)."""
        return filled(self.prompt, self.subject)

    @property
    def new_text(self) -> str:
        """The new target as it follows the prompt (:meth:`continuation`)."""
        return self.continuation(self.target_new)

    @property
    def true_text(self) -> str | None:
        return self.continuation(self.target_true) if self.target_true else None

    def continuation(self, target: str) -> str:
        """``target`` as the text after the prompt: with ROME's leading space when it continues the prompt's
        sentence, without one when the prompt ends in whitespace (a chat template's assistant prefix ends
        in a newline, and a reply's first word carries no space)."""
        target = target.strip()
        return target if self.prompt[-1:].isspace() else with_leading_space(target)

    def in_format(self, fmt: ChatFormat | None) -> EditRequest:
        """This request with its prompt wrapped by ``fmt`` (a chat template's user turn); itself for ``None``."""
        if fmt is None:
            return self
        return EditRequest(fmt.wrap(self.prompt), self.subject, self.target_new, self.target_true, self.case_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        """Accept the simple form ``{prompt, subject, target[_new], target_true}`` or a CounterFact record;
        unknown keys are refused."""
        if not isinstance(data, dict):
            raise FactEditError(f"a request must be a JSON object, not {_json_type(data)}")
        if "requested_rewrite" in data:
            _no_unknown_keys(data, COUNTERFACT_KEYS, "a CounterFact record")
            rw = data["requested_rewrite"]
            if not isinstance(rw, dict):
                raise FactEditError(f"'requested_rewrite' must be an object, not {_json_type(rw)}")
            _no_unknown_keys(rw, REWRITE_KEYS, "'requested_rewrite'")
            missing = [k for k in ("prompt", "subject", "target_new") if k not in rw]
            if missing:
                raise FactEditError(f"'requested_rewrite' has no {', '.join(repr(k) for k in missing)}")
            return cls(
                prompt=rw["prompt"],
                subject=rw["subject"],
                target_new=_target_str(rw["target_new"], "target_new"),
                target_true=None if rw.get("target_true") is None else _target_str(rw["target_true"], "target_true"),
                case_id=data.get("case_id"),
            )
        _no_unknown_keys(data, SIMPLE_KEYS, "a request")
        if "prompt" in data and "subject" in data:
            prompt, subject = data["prompt"], data["subject"]
            if isinstance(prompt, str) and "{}" not in prompt and isinstance(subject, str) and subject.strip():
                if subject not in prompt:
                    raise FactEditError(f"subject {subject!r} not found in prompt {prompt!r}")
                prompt = prompt.replace(subject, "{}", 1)  # a prompt may spell the subject out instead of {}
            data = {**data, "prompt": prompt}
            if "target" in data and "target_new" in data and data["target"] != data["target_new"]:
                raise FactEditError("give the new target once ('target' or 'target_new'), not two different ones")
            new = data.get("target_new", data.get("target"))
            if new is None:
                raise FactEditError("request has no 'target' / 'target_new'")
            new = _target_str(new, "target")
            true = data.get("target_true")
            true = _target_str(true, "target_true") if true is not None else None
            return cls(
                prompt=data["prompt"],
                subject=data["subject"],
                target_new=new,
                target_true=true,
                case_id=data.get("case_id"),
            )
        raise FactEditError("a request needs 'prompt', 'subject' and 'target' (or a CounterFact 'requested_rewrite')")


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _no_unknown_keys(data: dict, allowed: frozenset[str], what: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise FactEditError(
            f"{what} has unknown key(s) {', '.join(repr(k) for k in unknown)}: allowed are {', '.join(sorted(allowed))}"
        )


def _target_str(value: Any, key: str) -> str:
    """A target given as a string or as CounterFact's ``{"str": ..., "id": ...}``."""
    if isinstance(value, dict):
        value = value.get("str")
    if not isinstance(value, str):
        raise FactEditError(f"'{key}' must be a string (or an object with a 'str'), not {_json_type(value)}")
    return value


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read a JSON list of requests (simple ``{prompt, subject, target}`` or CounterFact records).

    Every record is validated first; if any is bad the whole file is refused with one line naming
    the bad records (the first :data:`MAX_LISTED_PROBLEMS`, and how many there are), so a batch is
    never half-applied.
    """
    path = Path(path)
    data = read_json_file(path, "requests file")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        found = "an empty list" if isinstance(data, list) else _json_type(data)
        raise FactEditError(f"requests file {path}: expected a non-empty JSON list of request objects, found {found}")
    requests, problems = [], []
    for i, record in enumerate(data):
        try:
            requests.append(EditRequest.from_dict(record))
        except FactEditError as exc:
            problems.append(f"request {i}: {exc}")
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise FactEditError(f"{path}: {len(problems)} bad request(s), nothing edited: {listed}{more}")
    return requests
