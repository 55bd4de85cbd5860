"""Where factedit keeps caches and finds data.

Everything user-specific goes under one home folder so a user can inspect or
delete it: ``$FACTEDIT_HOME``, else ``$XDG_CACHE_HOME/factedit``, else
``~/.cache/factedit``. Evaluation data is looked up through ``$FACTEDIT_DATA_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path


def factedit_home() -> Path:
    """Root of factedit's on-disk caches (models, statistics, templates)."""
    if env := os.environ.get("FACTEDIT_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "factedit"


def cache_dir(kind: str) -> Path:
    """A sub-folder of the home folder, created on demand."""
    path = factedit_home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path | None:
    """The evaluation-data folder (CounterFact, zsRE, corpora) if one is configured or found.

    Order: ``$FACTEDIT_DATA_DIR``; then ``../shared/data`` next to the current
    working directory (the layout of a development checkout).
    """
    if env := os.environ.get("FACTEDIT_DATA_DIR"):
        return Path(env).expanduser()
    candidate = Path.cwd().parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers never see a half-written version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
