"""A single-worker job queue: long model work (traces, edits, reverts) runs off the request thread.

Why one worker: every job reads or writes the one loaded model, and the core installs
forward hooks and swaps modules while it works, so two jobs on the same model at once
would see each other's hooks. One thread executing jobs in submission order gives
"only one job touches the model at a time, the others wait in line" without any
locking inside the jobs themselves. HTTP handlers only enqueue and poll, so the server
stays responsive while a minute-long edit runs.

Cancelling is cooperative: :meth:`JobQueue.cancel` drops a queued job at once and flags a
running one; the job's :class:`Reporter` raises :class:`Cancelled` at its next progress report
(the core reports between steps), and the job's own cleanup (hooks are context managers, the
session pops a pushed patch) leaves the model as it was. A job that changes state calls
:meth:`Reporter.commit` just before it makes its change final; from then on it can no longer
be cancelled, so "cancelled" always means "changed nothing".
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from factedit.errors import FactEditError
from factedit.progress import Progress, Stage

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class QueueFull(Exception):
    """Too many jobs are waiting; the client should retry later."""


class Cancelled(Exception):  # noqa: N818 - reads as what happened to the job
    """Raised inside a job (by its reporter) once a client asked to cancel it."""


class NotCancellable(Exception):  # noqa: N818
    """The job has finished, or has started to make its change final (answered 409)."""


class Reporter:
    """What a running job reports: a fraction in [0, 1] and a short message.

    ``span(a, b)`` gives a reporter whose 0..1 maps onto ``a..b`` of this one, so a
    job can hand a phase (statistics, optimisation) its own 0..1 range.
    """

    def __init__(
        self,
        job: Job,
        lock: threading.Lock,
        start: float = 0.0,
        end: float = 1.0,
        listeners: list[Callable[[Job], None]] | None = None,
    ) -> None:
        self._job, self._lock, self._start, self._end = job, lock, start, end
        self._listeners = listeners if listeners is not None else []

    def __call__(self, fraction: float | None = None, message: str | None = None, *, check: bool = True) -> None:
        """Record progress; raise :class:`Cancelled` if the job was asked to stop (unless ``check`` is False)."""
        with self._lock:
            if fraction is not None:
                value = self._start + (self._end - self._start) * min(max(float(fraction), 0.0), 1.0)
                self._job.progress = max(self._job.progress, min(value, 1.0))  # never goes backwards
            if message is not None and not self._job.cancel_requested:
                self._job.message = message
        for listener in list(self._listeners):
            listener(self._job)
        if check:
            self.check()

    def check(self) -> None:
        """Raise :class:`Cancelled` if a client asked to cancel this job (and it has not committed)."""
        with self._lock:
            stop = self._job.cancel_requested and not self._job.committed
        if stop:
            raise Cancelled(f"{self._job.kind} job {self._job.id} cancelled")

    def commit(self) -> None:
        """The job is about to make its change final: refuse cancellation from now on (or stop now)."""
        with self._lock:
            if self._job.cancel_requested:
                stop = True
            else:
                stop, self._job.committed = False, True
        if stop:
            raise Cancelled(f"{self._job.kind} job {self._job.id} cancelled")

    def span(self, start: float, end: float) -> Reporter:
        width = self._end - self._start
        return Reporter(self._job, self._lock, self._start + width * start, self._start + width * end, self._listeners)


class JobProgress(Progress):
    """The core's progress protocol turned into a job's progress (the adapter core functions are given).

    The core announces stages one after another without saying how many will come, so each top-level
    stage takes ``share`` of what is left of the reporter's 0..1 (``share=1`` for a job with one stage)
    and moves through it with its own fraction done. A stage opened while another with a total is
    running (per-request optimisations inside MEMIT's "z vectors") maps onto the current step of that
    one. The message is ``"stage name: done / total unit"`` of the innermost stage.
    """

    def __init__(self, report: Reporter, share: float = 0.5) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.report, self.share = report, share
        self._cursor = 0.0  # where the next top-level stage starts
        self._spans: dict[int, tuple[float, float]] = {}
        self._open: list[Stage] = []

    def _position(self, stage: Stage, done: float) -> float:
        start, end = self._spans[id(stage)]
        if not stage.total:
            return start
        return start + (end - start) * min(max(done / stage.total, 0.0), 1.0)

    def on_start(self, stage: Stage) -> None:
        parent = next((s for s in reversed(self._open) if s.total), None)
        if parent is not None:
            span = (self._position(parent, parent.done), self._position(parent, parent.done + 1))
        else:
            span = (self._cursor, self._cursor + (1.0 - self._cursor) * self.share)
        self._spans[id(stage)] = span
        self._open.append(stage)
        self.report(span[0], stage_message(stage))

    def on_advance(self, stage: Stage, info: dict[str, Any]) -> None:
        if id(stage) in self._spans:
            self.report(self._position(stage, stage.done), stage_message(stage, info))

    def on_end(self, stage: Stage) -> None:
        span = self._spans.pop(id(stage), None)
        if stage in self._open:
            self._open.remove(stage)
        if span is None:
            return
        self.report(span[1], f"{stage.name}: done", check=False)  # never raise while a stage unwinds
        if not any(s for s in self._open if s.total):
            self._cursor = max(self._cursor, span[1])


def stage_message(stage: Stage, info: dict[str, Any] | None = None) -> str:
    """``"value optimisation: 12 / 20 step (loss 1.23)"``: what the page's status line shows."""
    if stage.total:
        count = f"{stage.done:,.0f} / {stage.total:,.0f}" + (f" {stage.unit}" if stage.unit != "it" else "")
    else:
        count = f"{stage.done:,.0f}" if stage.done else "working"
    extra = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in (info or {}).items())
    return f"{stage.name}: {count}" + (f" ({extra})" if extra else "")


@dataclass
class Job:
    """One unit of work and what the client may see of it."""

    id: str
    kind: str
    params: dict[str, Any]
    status: str = QUEUED
    progress: float = 0.0
    message: str = "waiting in the queue"
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    seq: int = 0
    cost: int | None = None  # estimated token-block passes (see factedit.web.limits)
    cancel_requested: bool = False
    committed: bool = False  # the job has started to make its change final: no longer cancellable

    def to_dict(self, *, with_result: bool = True, position: int | None = None) -> dict[str, Any]:
        d = {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": round(self.progress, 4),
            "message": self.message,
            "error": self.error,
            "params": self.params,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "queue_position": position,
            "cost": self.cost,
            "cancellable": self.status in (QUEUED, RUNNING) and not self.committed and not self.cancel_requested,
            "cancel_requested": self.cancel_requested,
        }
        if with_result:
            d["result"] = self.result
        return d


class JobQueue:
    """Runs submitted callables one after another on one daemon thread, keeping recent jobs for polling.

    ``listeners`` are called (on the worker thread) with the job after each progress report:
    for logging and for tests that act at a given stage.
    """

    def __init__(self, *, max_waiting: int = 16, keep_finished: int = 50, name: str = "factedit-jobs") -> None:
        self.max_waiting = max_waiting
        self.keep_finished = keep_finished
        self.listeners: list[Callable[[Job], None]] = []
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._fns: dict[str, Callable[[Reporter], Any]] = {}
        self._on_end: dict[str, Callable[[], None]] = {}
        self._rates: dict[str, float] = {}  # measured cost units per second, by job kind
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._seq = itertools.count(1)
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -- client side ------------------------------------------------------------------
    def submit(
        self,
        kind: str,
        fn: Callable[[Reporter], Any],
        params: dict[str, Any] | None = None,
        *,
        cost: int | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> Job:
        """Queue ``fn(report)`` (``report``: the job's :class:`Reporter`); its JSON-able return value
        becomes the job's result. ``on_end`` runs once when the job ends, however it ends (also when
        it is refused here): e.g. to give back the bytes an uploaded patch holds."""
        with self._lock:
            refusal = None
            if self._stopped:
                refusal = "the server is shutting down"
            waiting = sum(1 for j in self._jobs.values() if j.status == QUEUED)
            if refusal is None and waiting >= self.max_waiting:
                refusal = (
                    f"{waiting} jobs are already waiting, the most this server queues (factedit serve "
                    "--max-queued-jobs); try again when some have finished"
                )
            if refusal is None:
                job = Job(id=secrets.token_hex(8), kind=kind, params=params or {}, seq=next(self._seq), cost=cost)
                self._jobs[job.id] = job
                self._fns[job.id] = fn
                if on_end is not None:
                    self._on_end[job.id] = on_end
                self._prune()
        if refusal is not None:
            if on_end is not None:
                on_end()
            raise QueueFull(refusal)
        self._queue.put(job.id)
        log.info("queued %s job %s", kind, job.id)
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job (at once) or ask a running one to stop at its next progress report.

        Raises ``KeyError`` for an unknown job and :class:`NotCancellable` for one that has finished
        or is making its change final. Returns the job's snapshot.
        """
        end = None
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.status in FINISHED:
                raise NotCancellable(f"job {job_id} has already finished ({job.status}); there is nothing to cancel")
            if job.committed:
                raise NotCancellable(
                    f"{job.kind} job {job_id} is already making its change final and can no longer be cancelled"
                    + ("; revert the patch once it is listed" if job.kind in ("edit", "apply") else "")
                )
            job.cancel_requested = True
            if job.status == QUEUED:
                self._fns.pop(job_id, None)
                end = self._on_end.pop(job_id, None)
                job.status, job.finished = CANCELLED, time.time()
                job.message, job.error = "cancelled before it started", "cancelled by the client"
            else:
                job.message = "cancelling (stops at the next step)"
            snap = job.to_dict(position=self._position(job))
        if end is not None:
            end()
        log.info("cancel requested for %s job %s", job.kind, job_id)
        return snap

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def snapshot(self, job_id: str, *, with_result: bool = True) -> dict[str, Any] | None:
        """A consistent copy of a job's state (taken under the lock, so never half-updated)."""
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else job.to_dict(with_result=with_result, position=self._position(job))

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.to_dict(with_result=False, position=self._position(j)) for j in self._jobs.values()]

    def busy(self) -> bool:
        with self._lock:
            return any(j.status in (QUEUED, RUNNING) for j in self._jobs.values())

    def counts(self) -> dict[str, int]:
        """How many jobs are queued and running (what /api/info shows)."""
        with self._lock:
            return {
                "queued": sum(1 for j in self._jobs.values() if j.status == QUEUED),
                "running": sum(1 for j in self._jobs.values() if j.status == RUNNING),
                "max_queued": self.max_waiting,
            }

    def running(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.status == RUNNING), None)

    def rates(self) -> dict[str, float]:
        """Measured cost units per second of finished jobs, by kind (a running average)."""
        with self._lock:
            return dict(self._rates)

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until a job has finished (for tests and scripts; the web page polls instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            snap = self.snapshot(job_id)
            if snap is None:
                raise KeyError(job_id)
            if snap["status"] in FINISHED:
                return snap
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {snap['status']} after {timeout}s")
            time.sleep(0.05)

    def shutdown(self, wait: bool = False, timeout: float | None = None) -> None:
        with self._lock:
            self._stopped = True
        self._queue.put(None)
        if wait:
            self._thread.join(timeout)

    # -- worker side ------------------------------------------------------------------
    def _position(self, job: Job) -> int | None:
        if job.status != QUEUED:
            return None
        return sum(1 for j in self._jobs.values() if j.status in (QUEUED, RUNNING) and j.seq < job.seq)

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.status in FINISHED]
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._jobs[job.id]

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._lock:
                job = self._jobs.get(job_id)
                fn = self._fns.pop(job_id, None)
                if job is None or fn is None or job.status != QUEUED:  # cancelled while queued
                    continue
                job.status, job.started, job.message = RUNNING, time.time(), "started"
            report = Reporter(job, self._lock, listeners=self.listeners)
            try:
                report.check()
                result = fn(report)
            except Cancelled:
                self._finish(job, cancelled=True)
                log.info("%s job %s cancelled after %.1fs", job.kind, job.id, (job.finished or 0) - job.started)
            except FactEditError as exc:
                self._finish(job, error=str(exc))
                log.info("%s job %s failed: %s", job.kind, job.id, exc)
            except Exception as exc:  # noqa: BLE001 - a job must never kill the worker
                log.exception("%s job %s crashed", job.kind, job.id)
                self._finish(job, error=f"internal error ({type(exc).__name__}): {exc}")
            else:
                self._finish(job, result=result)
                log.info("%s job %s done in %.1fs", job.kind, job.id, (job.finished or 0) - (job.started or 0))

    def _finish(self, job: Job, *, result: Any = None, error: str | None = None, cancelled: bool = False) -> None:
        with self._lock:
            job.finished = time.time()
            job.result, job.error = result, error
            if cancelled:
                job.status, job.message = CANCELLED, "cancelled; nothing was changed"
                job.error = "cancelled by the client"
            elif error is not None:
                job.status, job.message = FAILED, "failed"
            else:
                job.status, job.progress, job.message = DONE, 1.0, "done"
                elapsed = job.finished - (job.started or job.finished)
                if job.cost and elapsed > 0.5:
                    rate = job.cost / elapsed
                    old = self._rates.get(job.kind)
                    self._rates[job.kind] = rate if old is None else 0.5 * (old + rate)
            end = self._on_end.pop(job.id, None)
        if end is not None:
            try:
                end()
            except Exception:  # noqa: BLE001 - bookkeeping must not kill the worker
                log.exception("cleanup of %s job %s failed", job.kind, job.id)
