"""One connection from a worker to the engine's socket: its HELLO says which worker and which
channel (data or call) it is; every later frame goes to that worker's port. Until the HELLO has
been checked a frame may not be longer than a HELLO needs; after it, no longer than the largest
request a frontend accepts can make (``hub.max_request_frame``)."""

from __future__ import annotations

import json
import logging

from . import wire
from .link import FrameProtocol

log = logging.getLogger(__name__)


class EngineChannel(FrameProtocol):
    def __init__(self, hub) -> None:
        super().__init__(wire.HELLO_MAX)
        self.hub = hub
        self.port = None
        self.role = ""

    def on_frame(self, kind: int, tag: int, body: bytes) -> None:
        port = self.port
        if port is None:
            if kind != wire.HELLO:
                self.close()
                return
            try:
                hello = json.loads(body)
                self.role = str(hello.get("role", ""))
            except (ValueError, AttributeError):
                log.warning("engine socket: a connection whose HELLO is not a JSON object was refused")
                self.close()
                return
            self.port = self.hub.attach(self, hello)
            if self.port is None:
                self.close()
            else:
                self.max_frame = self.hub.max_request_frame
            return
        if port.retired:
            return
        if self.role == "call":
            port.on_call(kind, tag, body)
        else:
            port.on_data(kind, tag, body)

    def on_lost(self) -> None:
        port = self.port
        if port is not None and self.role == "data" and not port.retired:
            # the worker closed its data channel: it is exiting (or crashed); its process sentinel
            # restarts it, and nothing it had in flight has anyone to answer to any more
            port.retire()
