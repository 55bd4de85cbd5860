"""Where factedit keeps caches and finds data.

Everything user-specific goes under one home folder so a user can inspect or
delete it: ``$FACTEDIT_HOME``, else ``$XDG_CACHE_HOME/factedit``, else
``~/.cache/factedit``. Evaluation data (CounterFact, zsRE, known facts, corpora) is read from
one data folder, resolved by :func:`data_dir` and never from the current working directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from factedit.errors import FactEditError

log = logging.getLogger(__name__)

_data_dir_override: Path | None = None
_logged_data_dir: tuple[Path | None, str] | None = None


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


def set_data_dir(path: str | Path | None) -> None:
    """Use ``path`` as the data folder (the CLI's ``--data-dir``); ``None`` goes back to the defaults.

    A folder that does not exist is refused here, so a typo fails at once instead of silently
    falling back to another copy of the data.
    """
    global _data_dir_override
    if path is None:
        _data_dir_override = None
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FactEditError(f"data folder {folder} does not exist")
    _data_dir_override = folder.resolve()


def development_data_dir() -> Path | None:
    """``shared/data`` beside a development checkout (``<checkout>/../shared/data``), found from this
    file's location so that it does not depend on the current working directory."""
    candidate = Path(__file__).resolve().parents[3] / "shared" / "data"
    return candidate if candidate.is_dir() else None


def data_dir() -> Path | None:
    """The evaluation-data folder (CounterFact, zsRE, known facts, corpora), or ``None`` if there is none.

    Order: :func:`set_data_dir` (the CLI's ``--data-dir``); ``$FACTEDIT_DATA_DIR``; the development
    checkout's ``shared/data`` (:func:`development_data_dir`). The folder used is logged (INFO) once.
    """
    if _data_dir_override is not None:
        folder, source = _data_dir_override, "--data-dir"
    elif env := os.environ.get("FACTEDIT_DATA_DIR"):
        folder, source = Path(env).expanduser(), "$FACTEDIT_DATA_DIR"
    else:
        folder, source = development_data_dir(), "the development checkout"
    _log_data_dir(folder, source)
    return folder


def _log_data_dir(folder: Path | None, source: str) -> None:
    global _logged_data_dir
    if _logged_data_dir == (folder, source):
        return
    _logged_data_dir = (folder, source)
    if folder is None:
        log.info("no data folder: set FACTEDIT_DATA_DIR or pass --data-dir")
    else:
        log.info("data folder: %s (from %s)", folder, source)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers never see a half-written version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
