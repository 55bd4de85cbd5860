"""The result of tracing one fact: score matrices plus what produced them; JSON/NPZ round trips.

An estimated trace (``method="attribution"``) also holds the estimates everywhere (``estimates``), the
cells re-patched exactly (``exact_cells``; ``scores`` holds the exact values there, the estimates
elsewhere) and the agreement at those cells (``certificate``, per kind).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from factedit.errors import FactEditError
from factedit.paths import atomic_write_bytes


@dataclass
class TraceResult:
    """Scores of one fact: ``scores[kind][token, layer]`` is the mean answer probability after restoring
    (estimated, for ``method="attribution"``, except at ``exact_cells``)."""

    prompt: str
    subject: str
    tokens: list[str]
    token_ids: list[int]
    subject_range: tuple[int, int]  # [first, last + 1), as the official code
    answer: str
    answer_id: int
    predicted: str
    predicted_id: int
    answer_is_prediction: bool
    clean_prob: float  # official "high_score"
    low_prob: float  # official "low_score": corrupted, nothing restored
    scores: dict[str, np.ndarray]
    samples: int
    noise: float
    window: int
    seed: int
    method: str
    sever_all_tokens: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    estimates: dict[str, np.ndarray] = field(default_factory=dict)  # attribution: the estimated scores
    exact_cells: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # (token, layer) re-patched
    certificate: dict[str, dict[str, Any]] = field(default_factory=dict)  # per kind: agreement at those cells

    @property
    def estimated(self) -> bool:
        """Whether the scores are first-order estimates (exact only at ``exact_cells``)."""
        return self.method == "attribution"

    def exact_mask(self, kind: str) -> np.ndarray:
        """Boolean (tokens, layers): where ``scores[kind]`` is exact (everywhere for an exact trace)."""
        shape = self.scores[kind].shape
        if not self.estimated:
            return np.ones(shape, dtype=bool)
        mask = np.zeros(shape, dtype=bool)
        for t, layer in self.exact_cells.get(kind, []):
            mask[t, layer] = True
        return mask

    @property
    def kinds(self) -> list[str]:
        return list(self.scores)

    @property
    def num_layers(self) -> int:
        return next(iter(self.scores.values())).shape[1] if self.scores else 0

    def effects(self, kind: str) -> np.ndarray:
        """Indirect effects: restored probability minus the corrupted one."""
        return self.scores[kind] - self.low_prob

    def peak(self, kind: str) -> tuple[int, int, float]:
        """(token, layer, score) of the highest score of one kind."""
        m = self.scores[kind]
        t, layer = np.unravel_index(np.nanargmax(m), m.shape)
        return int(t), int(layer), float(m[t, layer])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; the estimate fields only for an estimated trace (exact ones keep their shape)."""
        d = asdict(self)
        d["subject_range"] = list(self.subject_range)
        d["scores"] = {k: _nan_to_none(v) for k, v in self.scores.items()}
        if self.estimated:
            d["estimates"] = {k: _nan_to_none(v) for k, v in self.estimates.items()}
            d["exact_cells"] = {k: [list(c) for c in cells] for k, cells in self.exact_cells.items()}
        else:
            for key in ("estimates", "exact_cells", "certificate"):
                d.pop(key)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TraceResult:
        d = dict(d)
        d["subject_range"] = tuple(d["subject_range"])
        d["scores"] = {k: _matrix(v) for k, v in d["scores"].items()}
        d["estimates"] = {k: _matrix(v) for k, v in (d.get("estimates") or {}).items()}
        d["exact_cells"] = {
            k: [(int(t), int(layer)) for t, layer in v] for k, v in (d.get("exact_cells") or {}).items()
        }
        d["certificate"] = dict(d.get("certificate") or {})
        return cls(**d)

    def save(self, out_dir: str | Path, stem: str = "trace") -> list[Path]:
        """Write ``<stem>.json`` (everything) and ``<stem>.npz`` (score matrices), each atomically."""
        out = Path(out_dir)
        json_path, npz_path = out / f"{stem}.json", out / f"{stem}.npz"
        atomic_write_bytes(json_path, json.dumps(self.to_dict(), indent=1).encode())
        buf = io.BytesIO()
        np.savez(
            buf,
            clean_prob=np.float64(self.clean_prob),
            low_prob=np.float64(self.low_prob),
            subject_range=np.array(self.subject_range),
            token_ids=np.array(self.token_ids),
            **{f"scores_{k}": v for k, v in self.scores.items()},
            **{f"estimates_{k}": v for k, v in self.estimates.items()},
            **{f"exact_{k}": self.exact_mask(k) for k in self.exact_cells},
        )
        atomic_write_bytes(npz_path, buf.getvalue())
        return [json_path, npz_path]

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        path = Path(path)
        if path.is_dir():
            path = path / "trace.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FactEditError(f"cannot read a trace result from {path}: {exc}") from exc


def _matrix(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if x is None else x for x in row] for row in rows], dtype=np.float64)


def _nan_to_none(m: np.ndarray) -> list[list[float | None]]:
    return [[None if not math.isfinite(x) else round(float(x), 7) for x in row] for row in m]
