"""The progress protocol: how long-running core code tells a front end what it is doing.

Core functions (statistics, templates, value optimisation, tracing, evaluation) take a
``progress`` argument and report *stages*: a named loop with an optional total. A front end
passes an adapter: :class:`TqdmProgress` draws bars on stderr (the CLI), the web app's job
adapter turns the same calls into a job's progress, :data:`SILENT` ignores them. Nothing is
monkeypatched: the core calls the object it was given.

    with progress.stage("second moments", total=100_000, unit="tok") as stage:
        for batch in batches:
            ...
            stage.advance(len(batch), loss=1.23)

``progress=True`` / ``False`` / ``None`` are accepted everywhere for convenience
(tqdm bars / silence), see :func:`as_progress`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

log = logging.getLogger(__name__)


class Stage:
    """One running stage; created by :meth:`Progress.stage`, ended by ``close`` or leaving ``with``."""

    def __init__(self, owner: Progress, name: str, total: float | None, unit: str) -> None:
        self.owner, self.name, self.total, self.unit = owner, name, total, unit
        self.done = 0.0
        self.closed = False

    def advance(self, n: float = 1, **info: Any) -> None:
        """``n`` more units done; ``info`` (e.g. ``loss=...``) is shown beside the count where possible."""
        self.done += n
        self.owner.on_advance(self, info)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner.on_end(self)

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """Base adapter: override the ``on_*`` hooks. The base class itself reports nothing."""

    def stage(self, name: str, total: float | None = None, unit: str = "it") -> Stage:
        stage = Stage(self, name, total, unit)
        self.on_start(stage)
        return stage

    def on_start(self, stage: Stage) -> None:  # noqa: B027 - optional hook
        pass

    def on_advance(self, stage: Stage, info: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    def on_end(self, stage: Stage) -> None:  # noqa: B027 - optional hook
        pass


SILENT = Progress()


class TqdmProgress(Progress):
    """tqdm bars on stderr (never on stdout, so ``--json`` output stays clean)."""

    def __init__(self, file: TextIO | None = None, leave: bool = False) -> None:
        self.file, self.leave = file, leave
        self._bars: dict[int, Any] = {}

    def on_start(self, stage: Stage) -> None:
        from tqdm.auto import tqdm

        self._bars[id(stage)] = tqdm(
            total=stage.total,
            desc=stage.name,
            unit=stage.unit,
            leave=self.leave,
            file=self.file or sys.stderr,
            dynamic_ncols=True,
        )

    def on_advance(self, stage: Stage, info: dict[str, Any]) -> None:
        bar = self._bars.get(id(stage))
        if bar is None:
            return
        if info:
            bar.set_postfix({k: f"{v:.3g}" if isinstance(v, float) else v for k, v in info.items()}, refresh=False)
        bar.update(stage.done - bar.n)

    def on_end(self, stage: Stage) -> None:
        bar = self._bars.pop(id(stage), None)
        if bar is not None:
            bar.close()


class LogProgress(Progress):
    """Progress as ``logging`` lines, at most one per ``every`` seconds per stage (for logs and CI)."""

    def __init__(self, logger: logging.Logger | None = None, every: float = 10.0) -> None:
        self.logger, self.every = logger or log, every
        self._last: dict[int, float] = {}

    def on_start(self, stage: Stage) -> None:
        self._last[id(stage)] = time.monotonic()
        self.logger.info("%s: started%s", stage.name, f" ({stage.total:,.0f} {stage.unit})" if stage.total else "")

    def on_advance(self, stage: Stage, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last.get(id(stage), 0.0) >= self.every:
            self._last[id(stage)] = now
            total = f"/{stage.total:,.0f}" if stage.total else ""
            self.logger.info("%s: %s%s %s %s", stage.name, f"{stage.done:,.0f}", total, stage.unit, info or "")

    def on_end(self, stage: Stage) -> None:
        self._last.pop(id(stage), None)
        self.logger.info("%s: done (%s %s)", stage.name, f"{stage.done:,.0f}", stage.unit)


def as_progress(progress: Progress | bool | None) -> Progress:
    """``True`` -> tqdm bars on stderr, ``False``/``None`` -> silent, an adapter -> itself."""
    if isinstance(progress, Progress):
        return progress
    return TqdmProgress() if progress else SILENT
