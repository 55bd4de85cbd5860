"""Evaluation data sets: CounterFact (ROME and EasyEdit formats), zsRE (MEND/ROME format), known facts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factedit.data.common import URLS, DatasetError, EvalDataset, download_file, file_sha256
from factedit.data.counterfact import CounterFactCase, load_counterfact, parse_counterfact
from factedit.data.knowns import KnownFact, load_known_facts
from factedit.data.zsre import ZsRECase, load_zsre, parse_zsre

DATASETS = ("counterfact", "zsre")


def load_dataset(name: str, path: str | Path | None = None, **kwargs: Any) -> EvalDataset:
    """``counterfact`` or ``zsre`` by name (keyword arguments go to the loader)."""
    if name == "counterfact":
        kwargs.pop("target", None)
        return load_counterfact(path, **kwargs)
    if name == "zsre":
        return load_zsre(path, **kwargs)
    raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


__all__ = [
    "DATASETS",
    "URLS",
    "CounterFactCase",
    "DatasetError",
    "EvalDataset",
    "KnownFact",
    "ZsRECase",
    "download_file",
    "file_sha256",
    "load_counterfact",
    "load_dataset",
    "load_known_facts",
    "load_zsre",
    "parse_counterfact",
    "parse_zsre",
]
