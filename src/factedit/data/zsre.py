"""zsRE question-answering edits in the MEND/ROME format (``subject, src, rephrase, alt, answers, loc, loc_ans``).

As in ROME/MEMIT (``dsets/zsre.py``): the rewrite prompt is ``src`` with the subject replaced by
``{}``, the new target is ``answers[0]`` (``target='alt'`` uses MEND's alternative answer instead),
the paraphrase is ``rephrase``, and the neighbourhood prompt is ``loc + "?"`` followed by
``" " + loc_ans``, scored token by token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

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

ZSRE_FILES = (
    "zsre/zsre_mem_eval.json",
    "zsre_mem_eval.json",
    "zsre/zsre_mend_eval.json",
    "zsre_mend_eval.json",
    "zsre/zsre_mend_train_1k.json",
)
ZsreTarget = Literal["answers", "alt"]


@dataclass(frozen=True)
class ZsRECase:
    """One zsRE edit; ``neighborhood`` holds (question, answer) pairs scored token by token."""

    case_id: int | str
    request: EditRequest
    paraphrase_prompts: tuple[str, ...]
    neighborhood: tuple[tuple[str, str], ...]
    answers: tuple[str, ...] = ()
    alt: str | None = None

    eval_request: EditRequest | None = None  # the request as evaluated, when its format differs from the edit's

    @property
    def scored_request(self) -> EditRequest:
        """The request whose prompt and targets the evaluation scores (the edited one unless formats differ)."""
        return self.eval_request if self.eval_request is not None else self.request

    def rewrite_prompts(self) -> list[str]:
        return [self.scored_request.text]

    def in_formats(self, edit: ChatFormat | None, evaluate: ChatFormat | None) -> ZsRECase:
        """This case with its edit request wrapped by ``edit`` and every evaluated question by ``evaluate``."""
        if edit is None and evaluate is None:
            return self
        wrap = (lambda text: text) if evaluate is None else evaluate.wrap
        return replace(
            self,
            request=self.request.in_format(edit),
            eval_request=None if edit == evaluate else self.request.in_format(evaluate),
            paraphrase_prompts=tuple(wrap(p) for p in self.paraphrase_prompts),
            neighborhood=tuple((wrap(q), a) for q, a in self.neighborhood),
        )


def _parse(record: dict, index: int, target: ZsreTarget) -> ZsRECase:
    subject, src = need_str(record, "subject"), need_str(record, "src")
    if subject not in src:
        raise ValueError(f"subject {subject!r} does not occur in question {src!r}")
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError("'answers' missing or not a list of non-empty strings")
    alt = record.get("alt")
    if target == "alt":
        alt = need_str(record, "alt")
    new = answers[0] if target == "answers" else alt
    rephrase = record.get("rephrase")
    paraphrases = [rephrase] if isinstance(rephrase, str) else rephrase
    if (
        not isinstance(paraphrases, list)
        or not paraphrases
        or not all(isinstance(p, str) and p.strip() for p in paraphrases)
    ):
        raise ValueError("'rephrase' missing or empty")
    paraphrases = list(need_str_list({"rephrase": paraphrases}, "rephrase"))  # bounded in number and length
    need_str_list({"answers": answers}, "answers")
    loc, loc_ans = need_str(record, "loc"), need_str(record, "loc_ans")
    request = EditRequest(
        prompt=as_template(src, subject), subject=subject, target_new=new, case_id=record.get("case_id", index)
    )
    return ZsRECase(
        case_id=request.case_id,
        request=request,
        paraphrase_prompts=tuple(paraphrases),
        neighborhood=((loc + "?", " " + loc_ans.strip()),),
        answers=tuple(answers),
        alt=alt if isinstance(alt, str) else None,
    )


def parse_zsre(records: list[Any], target: ZsreTarget = "answers") -> tuple[list[ZsRECase], list[tuple[str, str]]]:
    """Validate records (case id = ``case_id`` if present, else the record's index)."""
    if target not in ("answers", "alt"):
        raise FactEditError(f"zsRE target must be 'answers' or 'alt', not {target!r}")
    cases, skipped = parse_records(records, lambda record, index: _parse(record, index, target), str)
    return cases, skipped


def load_zsre(
    path: str | Path | None = None,
    *,
    n: int | None = None,
    start: int = 0,
    target: ZsreTarget = "answers",
    on_error: OnError = "skip",
    download: bool = False,
) -> EvalDataset[ZsRECase]:
    """zsRE cases ``start .. start+n`` (of the valid ones, in file order); see :func:`load_counterfact`."""
    p = find_data_file(path, ZSRE_FILES, download="zsre_mem_eval.json", allow_download=download, what="zsRE")
    records = read_json_records(p)
    cases, skipped = parse_zsre(records, target)
    report_malformed(p, skipped, on_error)
    return EvalDataset(
        name="zsre",
        path=p,
        sha256=file_sha256(p),
        source_format=f"mend/{target}",
        cases=select(cases, n, start),
        skipped=skipped,
        n_records=len(records),
    )
