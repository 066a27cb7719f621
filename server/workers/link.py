"""A framed message connection over a Unix stream socket (asyncio protocol, both sides).

Incoming bytes are cut into frames (wire.HEAD + body) and handed to ``on_frame``. Outgoing frames
are coalesced: everything sent during one event-loop iteration leaves in one write, so a burst of
responses costs one system call, not one each; ``before_flush`` adds frames that are gathered up
to that write (a worker port's freed blocks) without a write, or a loop iteration, of their own.

With ``gather_ns`` set (a frontend worker's data channel) the write waits, like an inline batch in
the scheduler, until the loop is quiet (core/loops.py ``when_quiet``) or the first queued frame
waited ``gather_ns``: grpc.aio hands a
worker its requests one loop iteration at a time, and frames written per iteration reached the
engine one by one, so its batches held 1.8 requests at add_sub c=16 against 6.7 in one process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from server.core import loops

from . import wire

log = logging.getLogger(__name__)

HIGH_WATER = 64 << 20  # bytes queued for the peer before "full"


class FrameProtocol(asyncio.Protocol):
    """``max_frame``: the largest frame body this side accepts; a longer one closes the connection
    with a logged error before any of it is buffered (its length comes from the peer)."""

    def __init__(self, max_frame: int = wire.MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.paused = False  # the peer reads slower than we write
        self.before_flush: Callable[[], None] | None = None  # called first by each write (may send)
        self.closed = False
        self.gather_ns = 0  # hold writes until the loop is quiet, at most this long (0: per iteration)
        self._first_ns = 0

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, size, head = 0, len(buf), wire.HEAD.size
        while size - pos >= head:
            length, kind, tag = wire.HEAD.unpack_from(buf, pos)
            if length > self.max_frame:
                self._oversized(length, kind)
                return
            end = pos + head + length
            if end > size:
                break
            body = bytes(buf[pos + head:end])
            pos = end
            try:
                self.on_frame(kind, tag, body)
            except Exception:  # noqa: BLE001 - one bad frame must not end the connection's other requests
                log.exception("worker channel: frame kind %d failed", kind)
        if pos:
            del buf[:pos]

    def _oversized(self, length: int, kind: int) -> None:
        log.error("worker channel: a frame of %d bytes (kind %d) is over this channel's limit of %d bytes; "
                  "closing the channel", length, kind, self.max_frame)
        self._buf = bytearray()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows (on_lost: the port is retired)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.on_lost()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # -- ours --------------------------------------------------------------------------------

    def on_frame(self, kind: int, tag: int, body: bytes) -> None:
        raise NotImplementedError

    def on_lost(self) -> None:
        pass

    def send(self, kind: int, tag: int, body: bytes = b"") -> None:
        if self.closed or self.transport is None:
            return
        self._out.append(wire.HEAD.pack(len(body), kind, tag))
        if body:
            self._out.append(body)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self.gather_ns:
                self._first_ns = time.perf_counter_ns()
                loops.when_quiet(self._loop, self._flush, self._waited)
            else:
                self._loop.call_soon(self._flush)

    def _waited(self, now: int) -> bool:
        return now - self._first_ns >= self.gather_ns

    def flush_soon(self) -> None:
        """Have the next write happen in this loop iteration even when nothing is queued yet (for
        ``before_flush``)."""
        if not self._flush_scheduled and not self.closed and self.transport is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self.before_flush is not None:
            self.before_flush()  # (still marked scheduled: what it sends joins this write)
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and not self.closed and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()
