"""Listening sockets that stay quiet and cheap when the process runs out of file descriptors.

asyncio's accept loop (``selector_events._accept_connection``) reacts to EMFILE/ENFILE by reporting
the error, pausing the listener for a second and scheduling a retry, and then keeps calling
``accept()`` up to ``backlog`` times in the same tick: each call fails again, logs again (with a
traceback) and schedules another retry. At the open-files limit that is thousands of log lines a
second and an event loop busy with retries while established connections wait. A
``ListeningSocket`` answers those extra calls with BlockingIOError (asyncio's "nothing to accept"),
so each pause costs one report, and ``quiet_accept_errors`` turns the reports into one log line a
minute.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_MESSAGE = "socket.accept() out of system resource"

log = logging.getLogger(__name__)


class ListeningSocket(socket.socket):
    """After a failed accept for lack of resources, further accepts in the same burst report
    "nothing to accept" instead of failing again (asyncio retries about a second later)."""

    _quiet_until = 0.0

    def accept(self):
        if time.monotonic() < self._quiet_until:
            raise BlockingIOError(errno.EAGAIN, "accepting paused: out of file descriptors")
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                self._quiet_until = time.monotonic() + 0.5
            raise


def listen(host: str, port: int, backlog: int = 128, reuse_port: bool = False) -> ListeningSocket:
    """A bound, listening, non-blocking TCP socket for ``host:port`` (the first address it resolves to)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = ListeningSocket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # frontend worker processes share the port (docs/workers.md)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval: float = 60.0) -> None:
    """Report asyncio's accept errors as one warning line per ``interval`` (with the number
    skipped), without a traceback; every other report goes to the handler that was installed."""
    if getattr(loop, "_inferd_quiet_accept", False):
        return
    previous = loop.get_exception_handler()
    state = {"next": 0.0, "skipped": 0}

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") != _ACCEPT_MESSAGE:
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now < state["next"]:
            state["skipped"] += 1
            return
        skipped, state["skipped"], state["next"] = state["skipped"], 0, now + interval
        exc = context.get("exception")
        log.warning("cannot accept connections: %s (out of file descriptors: raise the open-files limit "
                    "or lower --http-max-connections)%s", exc,
                    f"; {skipped} more in the last {interval:.0f} s" if skipped else "")

    loop.set_exception_handler(handler)
    loop._inferd_quiet_accept = True  # type: ignore[attr-defined]
