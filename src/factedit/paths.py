"""Where factedit keeps caches and finds data.

Everything user-specific goes under one home folder so a user can inspect or
delete it: ``$FACTEDIT_HOME``, else ``$XDG_CACHE_HOME/factedit``, else
``~/.cache/factedit``. Evaluation data (CounterFact, zsRE, known facts, corpora) is read from
one data folder, resolved by :func:`data_dir` and never from the current working directory.

Checks a command runs before it does any work, so a mistake costs nothing and leaves nothing
behind: :func:`check_output_path` (an output folder or file can be written where it is asked for),
:func:`check_home_writable` (the caches a command will write), :func:`read_json_file` (a user's
JSON file, decoded strictly, every failure one line naming the file). None of them creates anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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


def cache_dir(kind: str, *, create: bool = True) -> Path:
    """A sub-folder of the home folder, created on demand (``create=False``: only its path, for lookups
    that must not create folders)."""
    path = factedit_home() / kind
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FactEditError(f"cannot create the cache folder {path} ({exc.strerror or exc}): {_HOME_HINT}") from exc
    return path


# -- checks before any work ------------------------------------------------------------------------------------------
_HOME_HINT = "make it writable, or set FACTEDIT_HOME to a writable folder"


def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest existing ancestor (the folder a write would start in)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _writable(folder: Path) -> str | None:
    """Why files cannot be created in the existing folder ``folder``, or ``None`` if they can.

    Permission bits are asked first; then an anonymous temporary file is made and dropped (Linux's
    ``O_TMPFILE``: no name ever appears in the folder), which also catches read-only mounts. A folder
    without any write bit is refused even for root, who could write to it anyway: somebody made it
    read-only on purpose.
    """
    try:
        mode = folder.stat().st_mode
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(folder, os.W_OK | os.X_OK) or not mode & 0o222:
        return "permission denied"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Refuse ``path`` unless it is a folder (or can be created as one) that files can be written to.

    ``what`` names it in the message (``"--out"``, ``"the statistics cache"``). Nothing is created.
    """
    path = Path(path).expanduser()
    existing = _nearest_existing(path)
    if existing.exists() and not existing.is_dir():
        if existing == path:
            raise FactEditError(f"{what} {path} is a file, not a folder: give a folder")
        raise FactEditError(f"{what} {path} is inside {existing}, which is a file, not a folder")
    reason = _writable(existing)
    if reason is not None:
        where = "" if existing == path else f" (its nearest existing folder {existing})"
        raise FactEditError(f"{what} {path} is not writable{where}: {reason}")
    return path


def check_output_path(path: str | Path, what: str, *, folder: bool = True, empty: bool = False) -> Path:
    """Refuse an output path before any work is done, so a computed result is never lost at the end.

    ``folder=True``: ``path`` is (or will be created as) a folder, ``empty``: an existing one must be
    empty. ``folder=False``: ``path`` is a file to create or replace, in a folder that can be written.
    """
    path = Path(path).expanduser()
    if folder:
        check_writable_dir(path, what)
        if empty and path.is_dir() and any(path.iterdir()):
            raise FactEditError(f"{what} {path} is not empty: give a new or empty folder")
        return path
    if path.is_dir():
        raise FactEditError(f"{what} {path} is a folder: give a file name")
    check_writable_dir(path.parent, f"{what} {path}: its folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise FactEditError(f"{what} {path} exists and is not writable")
    return path


def check_home_writable(kinds: Iterable[str] = ()) -> Path:
    """Refuse a home folder (or one of the cache sub-folders ``kinds``) that cannot be written, at the
    start of a command instead of after minutes of work when its result is cached."""
    home = factedit_home()
    source = "FACTEDIT_HOME" if os.environ.get("FACTEDIT_HOME") else "the cache folder (FACTEDIT_HOME unset)"
    for where in (home, *(home / kind for kind in kinds)):
        try:
            check_writable_dir(where, f"{source} {home}" if where == home else f"the cache folder {where}")
        except FactEditError as exc:
            raise FactEditError(f"{exc}; factedit caches models and statistics there: {_HOME_HINT}") from None
    return home


def read_json_file(path: str | Path, what: str) -> Any:
    """Read a user's JSON file: a missing file, a folder, text that is not UTF-8 (UTF-16 with a BOM,
    binary data) or invalid JSON is one clear error naming the file. A UTF-8 BOM is accepted."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FactEditError(f"{what} {path} is a folder, not a JSON file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FactEditError(f"{what} {path} not found") from None
    except OSError as exc:
        raise FactEditError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FactEditError(f"{what} {path} is UTF-16 (or UTF-32) text: save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FactEditError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
            "give a UTF-8 JSON file"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise FactEditError(f"{what} {path} is not valid JSON: {exc.msg} at {where}") from None


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
    """Write a file so that readers never see a half-written version.

    The temporary name is unique per process *and* per call (pid + a random uuid), so concurrent
    writers (processes or threads) never write into the same temporary file; the last rename wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def compute_lock(paths: Iterable[Path], what: str) -> Iterator[None]:
    """Hold exclusive locks for cache files while computing them, so that a second process needing
    the same files waits and then reads them instead of computing them again.

    One lock file per cache file, ``$FACTEDIT_HOME/locks/<hash of its absolute path>.lock``, never
    deleted (deleting a held lock file would let a third process lock a new one), taken in name order
    so that two processes asking for overlapping sets cannot deadlock. Not on POSIX, or where the
    home is read-only, nothing is locked: the atomic writes keep the cache correct and only the work
    may be done twice.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    names = sorted({hashlib.sha256(str(Path(p).resolve()).encode()).hexdigest()[:24]: Path(p) for p in paths}.items())
    with contextlib.ExitStack() as stack:
        for digest, path in names:
            try:
                fh = stack.enter_context(open(cache_dir("locks") / f"{digest}.lock", "a+"))
            except (OSError, FactEditError):
                continue
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.info("waiting for another process computing %s (%s)", what, path.name)
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
