"""Top-k predictions served from one thread, in batches, without holding up the rest of the server.

Before: every ``/api/predict`` took a thread of the server's pool and waited for the model lock,
so 200 at once filled the pool (``/api/info`` waited 20 s for a thread) and those that waited
longer than the busy timeout answered "busy" although no job was running. Now a request only
puts its prompt in a bounded queue and awaits the answer on the event loop; one thread takes up
to ``batch`` prompts at a time, runs one forward pass for them and answers them all. "Busy" is
said only when it is true: the queue is full (503, with the queue's size), or a *job* (trace,
edit...) holds the model longer than the busy timeout (503, naming the job).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from factedit.errors import FactEditError

log = logging.getLogger(__name__)


class PredictionsFull(Exception):  # noqa: N818 - reads as the state of the queue
    """The prediction queue is full; the client should retry in a moment (answered 503)."""


@dataclass
class _Item:
    text: str
    k: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.monotonic)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Predictor:
    """One worker thread answering queued predictions in batches under the session's model lock.

    ``run(texts, k)`` computes predictions (called with the model lock held; a list per text);
    ``acquire()``/``release()`` take and give back the model (``acquire`` raises the session's
    ``Busy`` when a job holds it too long).
    """

    def __init__(
        self,
        run: Callable[[list[str], int], list[list[tuple[str, float]]]],
        acquire: Callable[[], None],
        release: Callable[[], None],
        *,
        max_pending: int = 256,
        batch: int = 16,
        name: str = "factedit-predict",
    ) -> None:
        self._run, self._acquire, self._release = run, acquire, release
        self.max_pending, self.batch = max_pending, batch
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.served = 0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    async def predict(self, text: str, k: int) -> list[tuple[str, float]]:
        """The top-``k`` next tokens after ``text``; waits in the queue, never in a thread."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._stopped:
                raise PredictionsFull("the server is shutting down")
            if len(self._pending) >= self.max_pending:
                raise PredictionsFull(
                    f"{len(self._pending)} predictions are already waiting, the most this server queues "
                    "(factedit serve --max-pending-predictions); retry in a moment"
                )
            self._pending.append(_Item(text, k, future, loop))
            self._cond.notify()
        return await future

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- worker side ------------------------------------------------------------------
    def _take(self) -> list[_Item] | None:
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                items, self._pending = list(self._pending), deque()
                for item in items:
                    item.loop.call_soon_threadsafe(_resolve, item.future, None, PredictionsFull("shutting down"))
                return None
            n = min(self.batch, len(self._pending))
            return [self._pending.popleft() for _ in range(n)]

    def _fail_waiting(self) -> list[_Item]:
        """Everything still queued waits behind the same job: answer it now rather than one by one."""
        with self._cond:
            items, self._pending = list(self._pending), deque()
        return items

    def _work(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            items = [i for i in items if not i.future.done()]
            if not items:
                continue
            outcome: dict[int, tuple[Any, BaseException | None]]
            try:
                self._acquire()
            except Exception as exc:  # noqa: BLE001 - Busy: tell these and every waiting request
                items += self._fail_waiting()
                outcome = {id(i): (None, exc) for i in items}
            else:
                try:
                    outcome = self._answer(items)
                finally:
                    self._release()
            for item in items:
                result, error = outcome[id(item)]
                try:
                    item.loop.call_soon_threadsafe(_resolve, item.future, result, error)
                except RuntimeError:  # the client's event loop is gone (server shutting down)
                    pass

    def _answer(self, items: list[_Item]) -> dict[int, tuple[Any, BaseException | None]]:
        """``(answer, error)`` by item id. A batch that fails is retried one prompt at a time, so that
        one bad prompt does not fail the others."""
        texts = list(dict.fromkeys(i.text for i in items))  # identical prompts run once
        k = max(i.k for i in items)
        results: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        try:
            results = dict(zip(texts, self._run(texts, k), strict=True))
        except Exception as exc:  # noqa: BLE001 - retried one by one below
            if len(texts) == 1:
                errors[texts[0]] = exc
            else:
                for text in texts:
                    try:
                        results[text] = self._run([text], k)[0]
                    except Exception as one:  # noqa: BLE001 - its items get the error
                        errors[text] = one
        for text, exc in errors.items():
            if not isinstance(exc, FactEditError):
                log.error("prediction of %r failed: %s: %s", text[:80], type(exc).__name__, exc)
        self.served += sum(1 for i in items if i.text in results)
        return {id(i): (results[i.text][: i.k], None) if i.text in results else (None, errors[i.text]) for i in items}
