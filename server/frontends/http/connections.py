"""Connection-level limits of the REST frontend: a cap on open connections and a deadline for each
request's head (slowloris), on top of aiohttp's keep-alive timeout.

aiohttp's low-level ``web.Server`` is the protocol factory: ``LimitedServer`` hands out one
``_Connection`` per accepted socket while fewer than ``max_connections`` are open, and answers the
others with a fixed 503 and closes them, before any parsing or buffering is spent on them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from server import limits

log = logging.getLogger(__name__)

_REFUSED_BODY = b'{"error":"too many open connections: the server is at its --http-max-connections limit"}'
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Retry-After: 1\r\nContent-Length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY
)


class RateLimitedLog:
    """One log line per ``interval`` seconds for a repeating event, with the count of the ones skipped."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._next = 0.0
        self._skipped = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            message += f" ({self._skipped} more like this in the last {self.interval:.0f} s)"
        self._skipped = 0
        self._next = now + self.interval
        self.logger.warning(message, *args)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_REFUSED)  # type: ignore[attr-defined]
        transport.close()


class _Connection(RequestHandler):
    """aiohttp's request handler plus a deadline for each request head: it starts at the first byte
    that arrives while no request is being handled and ends when the handler starts.

    One timer per connection, armed when a head starts while none is armed and re-armed from its own
    callback while heads keep arriving in time: a keep-alive connection does not create and cancel a
    timer per request (that was ~2% of the server's CPU at add_sub c=16 REST)."""

    def __init__(self, manager: "LimitedServer", *, head_timeout: float, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_since: float | None = None  # when the head now arriving started
        self._head_timer: asyncio.TimerHandle | None = None
        self._busy = False
        self.last_activity = time.monotonic()

    @property
    def quiet(self) -> bool:
        """No request being handled and none arriving (a head that started is one arriving)."""
        return not self._busy and self._head_since is None

    def data_received(self, data: bytes) -> None:
        now = self.last_activity = time.monotonic()
        if data and not self._busy and self._head_since is None:
            self._head_since = now
            if self._head_timer is None:
                self._head_timer = self._loop.call_at(self._loop.time() + self._head_timeout, self._head_check)
        super().data_received(data)

    def _head_check(self) -> None:
        self._head_timer = None
        since = self._head_since
        if since is None or self._busy:
            return
        left = since + self._head_timeout - time.monotonic()
        if left > 0:  # a later head, still in time: look again when its deadline comes
            self._head_timer = self._loop.call_at(self._loop.time() + left, self._head_check)
            return
        log.debug("closing a connection whose request headers did not arrive in %.1f s", self._head_timeout)
        self.force_close()

    def request_started(self) -> None:
        self._busy = True
        self._head_since = None

    def request_finished(self) -> None:
        self._busy = False
        self.last_activity = time.monotonic()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class LimitedServer(web.Server):
    def __init__(self, handler, *, limits_: limits.HttpLimits, **kwargs) -> None:
        super().__init__(handler, keepalive_timeout=limits_.keepalive_timeout, **kwargs)
        self.limits = limits_
        self._refusals = RateLimitedLog(log)

    def __call__(self):  # a protocol for one accepted socket
        if len(self.connections) >= self.limits.max_connections:
            self._refusals.warning("refusing a REST connection: %d are open (--http-max-connections)",
                                   len(self.connections))
            return _Refused()
        return _Connection(self, head_timeout=self.limits.header_timeout, loop=self._loop, **self._kwargs)


async def close_gracefully(server: LimitedServer, quiet_for: float, limit: float) -> None:
    """Close every connection once it is quiet (no request handled or arriving) and has been for
    ``quiet_for`` seconds, so a request a client sent just before is answered (503 while draining)
    rather than cut off; after ``limit`` seconds the rest are left to aiohttp's shutdown."""
    deadline = time.monotonic() + limit
    while server.connections and time.monotonic() < deadline:
        now = time.monotonic()
        for handler in list(server.connections):
            if isinstance(handler, _Connection) and handler.quiet and now - handler.last_activity >= quiet_for:
                handler.force_close()
        await asyncio.sleep(0.02)


def started(request: web.BaseRequest) -> None:
    protocol = request.protocol
    if isinstance(protocol, _Connection):
        protocol.request_started()


def finished(request: web.BaseRequest) -> None:
    protocol = request.protocol
    if isinstance(protocol, _Connection):
        protocol.request_finished()
