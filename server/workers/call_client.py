"""The worker's blocking call channel to the engine: one request, one reply, with a time limit.

The frontends call some DataPlane methods synchronously (metadata, config, statistics, stream
admission); in a worker those become a round trip on this separate socket, so the data channel's
asyncio reader never sees a reply it did not ask for. A reply that does not come within the time
limit is UNAVAILABLE; a late one is recognised by its tag and skipped.
"""

from __future__ import annotations

import logging
import socket
import threading

from server.core.errors import unavailable

from . import wire

log = logging.getLogger(__name__)


class OversizedFrame(ConnectionError):
    """The peer announced a frame longer than this side accepts: the channel is closed, not read."""


class CallClient:
    def __init__(self, path: str, hello: bytes, timeout: float) -> None:
        self._timeout = timeout
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(path)
        self._sock.sendall(wire.frame(wire.HELLO, 0, hello))
        self._buf = bytearray()
        self._broken = False

    def call(self, kind: int, tag: int, body: bytes) -> bytes:
        """Send one frame; the body of the engine's reply with the same tag."""
        with self._lock:
            if self._broken:
                raise unavailable("the inference engine's call channel is closed")
            sent = False
            try:
                self._sock.sendall(wire.frame(kind, tag, body))
                sent = True
                while True:
                    reply_kind, reply_tag, reply = self._read()
                    if reply_kind == wire.REPLY and reply_tag == tag:
                        return reply
            except socket.timeout:
                if not sent:  # part of the frame may have left: the channel's framing is lost
                    self._break()
                raise unavailable(f"the inference engine did not answer within {self._timeout:g}s") from None
            except OSError as exc:
                if isinstance(exc, OversizedFrame):
                    log.error("call channel: %s; closing it", exc)
                self._break()
                raise unavailable(f"the inference engine is unreachable: {exc}") from None

    def _break(self) -> None:
        self._broken = True
        self._sock.close()

    def _read(self) -> tuple[int, int, bytes]:
        head = wire.HEAD.size
        while True:
            if len(self._buf) >= head:
                length, kind, tag = wire.HEAD.unpack_from(self._buf)
                if length > wire.MAX_FRAME:
                    raise OversizedFrame(f"the engine sent a frame of {length} bytes, over the limit of "
                                          f"{wire.MAX_FRAME}")
                if len(self._buf) >= head + length:
                    body = bytes(self._buf[head:head + length])
                    del self._buf[:head + length]
                    return kind, tag, body
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError("the engine closed the call channel")
            self._buf += chunk

    def close(self) -> None:
        self._broken = True
        self._sock.close()
