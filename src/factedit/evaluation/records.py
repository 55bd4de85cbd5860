"""What a run folder holds, shared by the one-at-a-time runner and the batch/sequential driver.

``cases.jsonl`` is an append-only log, one JSON line per finished case; each line starts with the
case's header (:func:`case_header`) and, for an edited case, a few numbers about the edit
(:func:`edit_info`). Both drivers write it, so it lives here rather than in either of them.

A run started with torchrun writes one log per rank instead, ``cases.rank<r>.jsonl`` (each rank appends
only to its own); a run may mix them (started alone, resumed on two processes, or the other way round), so
whatever reads a run reads all its logs with :func:`read_cases`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CASES = "cases.jsonl"
RANK_CASES = "cases.rank{rank}.jsonl"
_RANK_LOG = re.compile(r"cases\.rank(\d+)\.jsonl")
# scores only the edited model gets (generation is slow and the unedited model's comes from a 'none' run)
GENERATION_KEYS = ("ngram_entropy", "reference_score", "text")
CAPABILITY = "capability.jsonl"  # general-capability measures of batch/sequential runs (evaluation/capability.py)


class CaseLog:
    """``cases.jsonl``: append-only, one line per case, fsynced; reading repairs a torn last line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, *, repair: bool = True) -> dict[str, dict[str, Any]]:
        """Finished cases by ``str(case_id)`` (first occurrence wins)."""
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning(
                "%s: discarding a torn last line (%d bytes, the run was interrupted mid-write); "
                "that case will be evaluated again",
                self.path,
                len(data) - keep,
            )
            if repair:
                with open(self.path, "r+b") as fh:
                    fh.truncate(keep)
                    fh.flush()
                    os.fsync(fh.fileno())
            data = data[:keep]
        done: dict[str, dict[str, Any]] = {}
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = str(record["case_id"])
            except (ValueError, KeyError, TypeError):
                log.warning(
                    "%s: line %d is unreadable and is ignored (its case will be evaluated again)", self.path, lineno
                )
                continue
            if key in done:
                log.warning("%s: case %s appears twice; keeping the first", self.path, key)
                continue
            done[key] = record
        return done

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with open(self.path, "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def case_log_name(rank: int | None = None) -> str:
    """The log a process appends to: ``cases.jsonl`` alone, ``cases.rank<r>.jsonl`` as rank ``r`` of several."""
    return CASES if rank is None else RANK_CASES.format(rank=rank)


def case_logs(folder: str | Path) -> list[Path]:
    """Every case log of a run folder: ``cases.jsonl`` first, then the rank logs by rank."""
    folder = Path(folder)
    ranked = sorted(
        (int(m.group(1)), p) for p in folder.glob("cases.rank*.jsonl") if (m := _RANK_LOG.fullmatch(p.name))
    )
    plain = [folder / CASES] if (folder / CASES).is_file() else []
    return plain + [p for _, p in ranked]


def read_cases(folder: str | Path, *, repair: bool = False) -> dict[str, dict[str, Any]]:
    """All finished cases of a run, merged over its logs (the first line of a case wins, as within a log).

    ``repair`` cuts a torn last line off each log (only for the process that owns the folder's logs)."""
    done: dict[str, dict[str, Any]] = {}
    for path in case_logs(folder):
        for key, record in CaseLog(path).load(repair=repair).items():
            if key in done:
                log.warning("%s: case %s is also in another log of the run; keeping the first", path, key)
                continue
            done[key] = record
    return done


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FactEditError(f"{folder} is not an evaluation run (cannot read {MANIFEST}: {exc})") from exc


def case_header(case) -> dict[str, Any]:
    """The first fields of a case's line: its id and the rewrite it asks for."""
    req = case.request
    return {
        "case_id": case.case_id,
        "requested_rewrite": {
            "prompt": req.prompt,
            "subject": req.subject,
            "target_new": req.target_new,
            "target_true": req.target_true,
        },
    }


def edit_info(patch) -> dict[str, Any]:
    """A few numbers about the edit worth keeping: size of the change, steps, final loss."""
    info: dict[str, Any] = {
        "method": patch.method,
        "delta_norm": float(sum(float(e.delta().norm()) for e in patch.entries)),
    }
    losses = patch.info.get("losses")
    last = losses[-1] if losses else None
    if isinstance(last, list):  # ROME: per layer, a list of per-step dicts
        last = last[-1] if last else None
    if last is not None:
        info["final_loss"] = last
    if "steps" in patch.info:
        info["steps"] = patch.info["steps"]
    return info


def read_capability(folder: str | Path) -> list[dict[str, Any]]:
    """The capability records of a run (``capability.jsonl``), the last one of each state; [] if none.
    An unreadable (torn) line is skipped: the run measures that state again when resumed."""
    path = Path(folder) / CAPABILITY
    if not path.is_file():
        return []
    latest: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            latest[str(record["case_id"])] = record
        except (ValueError, KeyError, TypeError):
            continue
    return list(latest.values())
