"""Shared plumbing of the data loaders: finding files, hashing them, reporting bad records.

Data is looked for, in order, at an explicit path, in the data folder
(``$FACTEDIT_DATA_DIR`` or ``../shared/data``), in the cache, and finally
downloaded from the official URL when the caller allows it (users with
internet); tests and offline runs never download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from factedit.errors import FactEditError
from factedit.paths import atomic_write_bytes, cache_dir, data_dir
from factedit.text import MAX_TEXT_CHARS

MAX_PROMPTS = 1000  # prompts in one record's list (CounterFact has 2 to 10)

log = logging.getLogger(__name__)

ROME_DATA_URL = "https://rome.baulab.info/data/dsets"
URLS = {
    "counterfact.json": f"{ROME_DATA_URL}/counterfact.json",
    "zsre_mem_eval.json": f"{ROME_DATA_URL}/zsre_mem_eval.json",
    "known_1000.json": f"{ROME_DATA_URL}/known_1000.json",
}
OnError = Literal["skip", "raise"]
CaseT = TypeVar("CaseT")


class DatasetError(FactEditError):
    """A data file is missing, unreadable, or (with ``on_error='raise'``) holds malformed records."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_data_file(
    path: str | Path | None,
    candidates: Sequence[str],
    *,
    download: str | None = None,
    allow_download: bool = False,
    what: str = "data file",
) -> Path:
    """Resolve a data file: ``path``; else the first of ``candidates`` (relative names) in the data folder
    or the cache; else download ``download`` (a key of :data:`URLS`) into the cache if allowed."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            for name in candidates:
                if (p / name).is_file():
                    return p / name
            raise DatasetError(f"{what}: none of {', '.join(candidates)} found in {p}")
        if not p.is_file():
            raise DatasetError(f"{what} not found: {p}")
        return p
    roots = [r for r in (data_dir(), cache_dir("data", create=False)) if r is not None]
    for root in roots:
        for name in candidates:
            if (root / name).is_file():
                return root / name
    if download and allow_download:
        return download_file(download)
    looked = ", ".join(str(r / c) for r in roots for c in candidates)
    hint = f"; or pass --download to fetch {URLS[download]}" if download else ""
    raise DatasetError(f"{what} not found (looked at {looked}): set FACTEDIT_DATA_DIR or pass a path{hint}")


def download_file(name: str) -> Path:
    """Fetch one of the official files (:data:`URLS`) into the cache, atomically, checking it is JSON."""
    url = URLS[name]
    target = cache_dir("data") / name
    log.info("downloading %s to %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:  # noqa: S310 (fixed https URL)
            data = resp.read()
        json.loads(data)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"downloading {url} failed ({exc}); pass a local path instead") from exc
    atomic_write_bytes(target, data)
    return target


def read_json_records(path: Path) -> list[Any]:
    """A JSON list (or JSON-lines file) of records."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{path} is UTF-16 (or UTF-32) text: save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as first:
        try:  # JSON lines
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise DatasetError(f"{path} is not valid JSON ({first})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a list of records, found {type(data).__name__}")
    return data


@dataclass
class EvalDataset(Generic[CaseT]):
    """Validated cases of one file, plus what was skipped and what identifies the file."""

    name: str
    path: Path
    sha256: str
    source_format: str
    cases: list[CaseT]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record id, reason)
    n_records: int = 0

    def __len__(self) -> int:
        return len(self.cases)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "format": self.source_format,
            "n_records": self.n_records,
            "n_cases": len(self.cases),
            "n_skipped": len(self.skipped),
            "skipped": [{"id": i, "reason": r} for i, r in self.skipped],
        }


def parse_records(
    records: list[Any], parse: Callable[[dict, int], CaseT], record_id: Callable[[int], str]
) -> tuple[list[CaseT], list[tuple[str, str]]]:
    """Parse every record with ``parse(record, index)``; a record that is not an object, that ``parse``
    refuses, or whose ``case_id`` repeats an earlier one is skipped with its reason, never fatal."""
    cases: list[CaseT] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, record in enumerate(records):
        rid = str(record.get("case_id", record_id(i))) if isinstance(record, dict) else record_id(i)
        try:
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            case = parse(record, i)
            if str(case.case_id) in seen:
                raise ValueError("duplicate case_id")
        except (ValueError, TypeError, KeyError, FactEditError) as exc:
            skipped.append((rid, str(exc)))
            continue
        seen.add(str(case.case_id))
        cases.append(case)
    return cases, skipped


def report_malformed(path: Path, skipped: list[tuple[str, str]], on_error: OnError) -> None:
    """Raise (``on_error='raise'``) or warn once, naming every skipped record."""
    if not skipped:
        return
    listing = "; ".join(f"{i}: {r}" for i, r in skipped[:20])
    more = f" (and {len(skipped) - 20} more)" if len(skipped) > 20 else ""
    msg = f"{path.name}: {len(skipped)} malformed record(s): {listing}{more}"
    if on_error == "raise":
        raise DatasetError(msg)
    log.warning("%s; skipped", msg)


def select(items: list[Any], n: int | None, start: int) -> list[Any]:
    if start < 0 or (n is not None and n < 0):
        raise DatasetError("start and n must not be negative")
    return items[start:] if n is None else items[start : start + n]


def need_str(record: dict, key: str, *, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ValueError(f"'{key}' missing or not a non-empty string")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"'{key}' is {len(value):,} characters long: at most {MAX_TEXT_CHARS:,}")
    return value


def need_str_list(record: dict, key: str, *, required: bool = True, min_len: int = 1) -> tuple[str, ...]:
    value = record.get(key)
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"'{key}' missing or not a list of non-empty strings")
    if len(value) < min_len:
        raise ValueError(f"'{key}' is empty")
    if len(value) > MAX_PROMPTS:
        raise ValueError(f"'{key}' holds {len(value):,} prompts: at most {MAX_PROMPTS:,}")
    if any(len(v) > MAX_TEXT_CHARS for v in value):
        raise ValueError(f"'{key}' holds a prompt longer than {MAX_TEXT_CHARS:,} characters")
    return tuple(value)
