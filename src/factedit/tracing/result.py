"""The result of tracing one fact: score matrices plus what produced them; JSON/NPZ round trips."""

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
    """Scores of one fact: ``scores[kind][token, layer]`` is the mean answer probability after restoring."""

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
        d = asdict(self)
        d["subject_range"] = list(self.subject_range)
        d["scores"] = {k: _nan_to_none(v) for k, v in self.scores.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TraceResult:
        d = dict(d)
        d["subject_range"] = tuple(d["subject_range"])
        d["scores"] = {
            k: np.array([[np.nan if x is None else x for x in row] for row in v], dtype=np.float64)
            for k, v in d["scores"].items()
        }
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


def _nan_to_none(m: np.ndarray) -> list[list[float | None]]:
    return [[None if not math.isfinite(x) else round(float(x), 7) for x in row] for row in m]
