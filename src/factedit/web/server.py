"""The HTTP server around the app: uvicorn with connection-level limits that uvicorn lacks.

uvicorn has a keep-alive timeout, a cap on incomplete request size (``h11_max_incomplete_event_size``),
``limit_concurrency`` and the listen ``backlog``, but no timeout for request *headers*: a client that
sends one byte a minute holds its connection (and a file descriptor) forever, and enough of them
exhaust the process's descriptors. :class:`GuardedH11Protocol` adds, on top of uvicorn's h11 protocol:

- a header timeout: the request line and headers must arrive within ``header_timeout`` seconds of
  the connection (or of the previous response); otherwise a JSON 408 and the connection is closed;
- a connection cap: at ``max_connections`` a new connection closes the one that has waited longest
  for its headers (an idle keep-alive connection first), so slow clients cannot lock out a
  client that sends its request at once; when every connection is busy with a request, the new
  one gets a JSON 503 and is closed;
- malformed HTTP answered in the app's JSON shape (``{"detail": ...}``, 400, or 431 for headers
  over the limit) instead of uvicorn's plain-text 400.

uvicorn's ``limit_concurrency`` is set one above the cap, so its plain-text 503 is never reached.
What stays uvicorn's: a connection closed without a response when the peer resets it; TLS is not
used (the server binds loopback by default).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections import OrderedDict
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from factedit.web.app import SECURITY_HEADERS
from factedit.web.limits import WebLimits

log = logging.getLogger(__name__)

FD_RESERVE = 256  # descriptors kept for model files, the statistics cache, logs and the listening socket


def raw_json_response(status: int, reason: str, detail: str, extra: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response with a JSON body, written outside h11's state machine (closes)."""
    body = json.dumps({"detail": detail}).encode()
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "connection": "close",
        **{k.lower(): v for k, v in SECURITY_HEADERS.items()},
        **(extra or {}),
    }
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + body


class ConnectionBook:
    """The connections of one server that are waiting for request headers, oldest first."""

    def __init__(self) -> None:
        self.waiting: OrderedDict[int, GuardedH11Protocol] = OrderedDict()
        self.evicted = 0
        self.refused = 0
        self.header_timeouts = 0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a connection cap and JSON protocol errors.

    Subclasses made by :func:`protocol_class` carry the limits and the :class:`ConnectionBook`.
    """

    limits: WebLimits = WebLimits()
    book: ConnectionBook = ConnectionBook()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._closed_by_us = False

    # -- state ------------------------------------------------------------------------
    def _awaiting_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _mark_waiting(self) -> None:
        self.book.waiting[id(self)] = self
        self.book.waiting.move_to_end(id(self))
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_too_slow)

    def _mark_busy(self) -> None:
        self.book.waiting.pop(id(self), None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _close_with(self, status: int, reason: str, detail: str, extra: dict[str, str] | None = None) -> None:
        self._mark_busy()
        self._unset_keepalive_if_required()
        if self.transport is not None and not self.transport.is_closing():
            self._closed_by_us = True
            try:
                self.transport.write(raw_json_response(status, reason, detail, extra))
            finally:
                self.transport.close()

    # -- protocol interface -------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            oldest = next(iter(self.book.waiting.values()), None)
            if oldest is not None and oldest is not self:
                self.book.evicted += 1
                oldest._close_with(
                    503,
                    "Service Unavailable",
                    f"the server is at its limit of {self.limits.max_connections} connections and this one had "
                    "waited longest without sending a request",
                    {"retry-after": "1"},
                )
            else:
                self.book.refused += 1
                self._close_with(
                    503,
                    "Service Unavailable",
                    f"the server is at its limit of {self.limits.max_connections} connections, all busy with "
                    "requests (factedit serve --max-connections); retry in a moment",
                    {"retry-after": "1"},
                )
                return
        self._mark_waiting()

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_busy()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers() and self._header_timer is None:
            self._mark_waiting()  # a new request begins on a kept-alive connection: its headers are timed
        super().data_received(data)
        if not self._awaiting_headers():
            self._mark_busy()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Idle keep-alive: uvicorn's keep-alive timer runs; it is also first in line to be closed at the cap.
        if not self.transport.is_closing() and self._awaiting_headers():
            self.book.waiting[id(self)] = self
            self.book.waiting.move_to_end(id(self))

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            self.book.header_timeouts += 1
            received = len(self.conn.trailing_data[0])
            self._close_with(
                408,
                "Request Timeout",
                f"the request line and headers did not arrive within {self.limits.header_timeout:g} s "
                f"({received:,} bytes received)",
            )

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (h11 refused it): the app's JSON shape, 431 when the headers are too large."""
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.transport.close()  # a response is under way (e.g. a broken chunked body): it cannot be replaced
            return
        buffered = len(self.conn.trailing_data[0])
        if buffered > self.limits.max_header_bytes:
            self._close_with(
                431,
                "Request Header Fields Too Large",
                f"the request line and headers exceed {self.limits.max_header_bytes:,} bytes",
            )
        else:
            self._close_with(400, "Bad Request", "malformed HTTP request: this server speaks HTTP/1.1 (RFC 9112)")


def protocol_class(limits: WebLimits) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass bound to ``limits`` and its own connection book."""
    return type("FacteditH11Protocol", (GuardedH11Protocol,), {"limits": limits, "book": ConnectionBook()})


def raise_fd_limit(limits: WebLimits) -> WebLimits:
    """Raise the soft descriptor limit so that the connection cap fits under it (lower the cap if not)."""
    need = limits.max_connections + limits.backlog + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        cap = max(16, soft - limits.backlog - FD_RESERVE)
        log.warning(
            "only %d file descriptors available: serving at most %d connections (not %d)",
            soft,
            cap,
            limits.max_connections,
        )
        return limits.with_changes(max_connections=cap)
    return limits


def server_config(app: Any, host: str, port: int, limits: WebLimits, **extra: Any) -> uvicorn.Config:
    """uvicorn's configuration with every limit set (see the module docstring)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(limits),
        ws="none",  # the app has no WebSocket routes: an upgrade request is an ordinary (refused) request
        lifespan="on",
        timeout_keep_alive=max(1, round(limits.keep_alive_timeout)),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        limit_concurrency=limits.max_connections + 1,  # the protocol's cap answers first, in JSON
        backlog=limits.backlog,
        **{"log_level": "warning", **extra},
    )


def make_server(app: Any, host: str, port: int, limits: WebLimits | None = None, **extra: Any) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the limits (the descriptor limit raised to fit them)."""
    limits = raise_fd_limit(limits or getattr(app.state, "limits", None) or WebLimits())
    return uvicorn.Server(server_config(app, host, port, limits, **extra))


def book_of(server: uvicorn.Server) -> ConnectionBook:
    """The connection counters of a server made by :func:`make_server` (for tests and the bench)."""
    return server.config.http.book  # type: ignore[union-attr]


def wait_started(server: uvicorn.Server, timeout: float = 30.0) -> None:
    """Block until a server started in another thread is listening."""
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("the web server did not start")
        time.sleep(0.02)
