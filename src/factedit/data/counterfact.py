"""CounterFact (Meng et al. 2022): counterfactual edits with paraphrase and neighbourhood prompts.

Two on-disk formats are read into the same :class:`CounterFactCase`:

* the original ROME schema (``counterfact.json``; ``requested_rewrite``, ``paraphrase_prompts``,
  ``neighborhood_prompts``, ``attribute_prompts``, ``generation_prompts``), and
* EasyEdit's flattened one (``prompt`` with the subject filled in, ``subject``, ``ground_truth``,
  ``target_new``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``), which has
  one paraphrase, one neighbour and no generation prompts.

Malformed records are skipped with one warning naming them (or raise, ``on_error='raise'``),
so a long run never dies half-way on a bad record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from factedit.data.common import (
    EvalDataset,
    OnError,
    file_sha256,
    find_data_file,
    need_str,
    need_str_list,
    parse_records,
    read_json_records,
    report_malformed,
    select,
)
from factedit.editing.requests import EditRequest
from factedit.errors import FactEditError
from factedit.models.chat import ChatFormat
from factedit.text import as_template

# Looked for in the data folder and the cache, in this order: the full official file first.
COUNTERFACT_FILES = ("counterfact/counterfact.json", "counterfact.json", "counterfact/counterfact_dev.json")


@dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact edit with everything its evaluation reads."""

    case_id: int | str
    request: EditRequest  # target_true is always set
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    eval_request: EditRequest | None = None  # the request as evaluated, when its format differs from the edit's

    @property
    def scored_request(self) -> EditRequest:
        """The request whose prompt and targets the evaluation scores (the edited one unless formats differ)."""
        return self.eval_request if self.eval_request is not None else self.request

    def rewrite_prompts(self) -> list[str]:
        return [self.scored_request.text]

    def in_formats(self, edit: ChatFormat | None, evaluate: ChatFormat | None) -> CounterFactCase:
        """This case with its edit request wrapped by ``edit`` and every evaluated prompt by ``evaluate``
        (``None``: raw text); raw/chat transfer runs edit in one format and evaluate in the other."""
        if edit is None and evaluate is None:
            return self

        def wrap(prompts: tuple[str, ...]) -> tuple[str, ...]:
            return prompts if evaluate is None else tuple(evaluate.wrap(p) for p in prompts)

        return replace(
            self,
            request=self.request.in_format(edit),
            eval_request=None if edit == evaluate else self.request.in_format(evaluate),
            paraphrase_prompts=wrap(self.paraphrase_prompts),
            neighborhood_prompts=wrap(self.neighborhood_prompts),
            attribute_prompts=wrap(self.attribute_prompts),
            generation_prompts=wrap(self.generation_prompts),
        )


def _target(value: Any, key: str) -> tuple[str, str | None]:
    if isinstance(value, dict):
        s = value.get("str")
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"'{key}.str' missing or empty")
        return s, (str(value["id"]) if value.get("id") is not None else None)
    if isinstance(value, str) and value.strip():
        return value, None
    raise ValueError(f"'{key}' missing or empty")


def _from_rome(record: dict, index: int) -> CounterFactCase:
    rw = record.get("requested_rewrite")
    if not isinstance(rw, dict):
        raise ValueError("'requested_rewrite' missing")
    new, new_id = _target(rw.get("target_new"), "target_new")
    true, true_id = _target(rw.get("target_true"), "target_true")
    request = EditRequest(
        prompt=need_str(rw, "prompt"),
        subject=need_str(rw, "subject"),
        target_new=new,
        target_true=true,
        case_id=record.get("case_id", index),
    )
    return CounterFactCase(
        case_id=request.case_id,
        request=request,
        paraphrase_prompts=need_str_list(record, "paraphrase_prompts"),
        neighborhood_prompts=need_str_list(record, "neighborhood_prompts"),
        attribute_prompts=need_str_list(record, "attribute_prompts", required=False, min_len=0),
        generation_prompts=need_str_list(record, "generation_prompts", required=False, min_len=0),
        relation_id=rw.get("relation_id"),
        target_new_id=new_id,
        target_true_id=true_id,
        extra={"pararel_idx": record.get("pararel_idx")},
    )


def _from_easyedit(record: dict, index: int) -> CounterFactCase:
    prompt, subject = need_str(record, "prompt"), need_str(record, "subject")
    prompt = as_template(prompt, subject)  # EasyEdit spells the subject out
    new, _ = _target(record.get("target_new"), "target_new")
    true, _ = _target(record.get("ground_truth"), "ground_truth")
    request = EditRequest(
        prompt=prompt, subject=subject, target_new=new, target_true=true, case_id=record.get("case_id", index)
    )
    rephrase = record.get("rephrase_prompt")
    paraphrases = [rephrase] if isinstance(rephrase, str) else rephrase
    locality = record.get("locality_prompt")
    neighbours = [locality] if isinstance(locality, str) else locality
    return CounterFactCase(
        case_id=request.case_id,
        request=request,
        paraphrase_prompts=need_str_list({"rephrase_prompt": paraphrases}, "rephrase_prompt"),
        neighborhood_prompts=need_str_list({"locality_prompt": neighbours}, "locality_prompt"),
        extra={"locality_ground_truth": record.get("locality_ground_truth")},
    )


def detect_format(record: Any) -> str:
    """``rome`` or ``easyedit`` from the keys of one record."""
    if isinstance(record, dict) and "requested_rewrite" in record:
        return "rome"
    if isinstance(record, dict) and "ground_truth" in record and "prompt" in record:
        return "easyedit"
    raise FactEditError(
        "unrecognised CounterFact record: expected 'requested_rewrite' (ROME) or 'prompt'/'ground_truth' (EasyEdit)"
    )


def parse_counterfact(
    records: list[Any], source_format: str | None = None
) -> tuple[list[CounterFactCase], list[tuple[str, str]], str]:
    """Validate records; returns (cases, skipped (id, reason), format). Duplicate case ids are skipped."""
    if not records:
        return [], [], source_format or "rome"
    fmt = source_format or detect_format(next((r for r in records if isinstance(r, dict)), records[0]))
    convert = _from_rome if fmt == "rome" else _from_easyedit

    def parse(record: dict, index: int) -> CounterFactCase:
        case = convert(record, index)
        if case.request.target_new.strip() == (case.request.target_true or "").strip():
            raise ValueError("target_new equals target_true")
        return case

    cases, skipped = parse_records(records, parse, lambda i: f"#{i}")
    return cases, skipped, fmt


def load_counterfact(
    path: str | Path | None = None,
    *,
    n: int | None = None,
    start: int = 0,
    on_error: OnError = "skip",
    download: bool = False,
) -> EvalDataset[CounterFactCase]:
    """CounterFact cases ``start .. start+n`` (of the valid ones, in file order).

    ``path``: a file or folder; default: the data folder (full ``counterfact.json`` if present,
    else ``counterfact/counterfact_dev.json``), else the cache, else (``download``) the official URL.
    """
    p = find_data_file(
        path, COUNTERFACT_FILES, download="counterfact.json", allow_download=download, what="CounterFact"
    )
    records = read_json_records(p)
    cases, skipped, fmt = parse_counterfact(records)
    report_malformed(p, skipped, on_error)
    return EvalDataset(
        name="counterfact",
        path=p,
        sha256=file_sha256(p),
        source_format=fmt,
        cases=select(cases, n, start),
        skipped=skipped,
        n_records=len(records),
    )
