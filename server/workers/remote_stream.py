"""What a worker's frontends hold while a request is with the engine: its response stream, and the
caller's trace context (rebuilt by the engine, where the spans are made)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

from server.core.types import InferResponse

from . import wire

if TYPE_CHECKING:
    from .remote import RemoteDataPlane


class RemoteTrace:
    """The caller's trace context as a worker hands it over; the engine rebuilds the real one."""

    __slots__ = ("kind", "carrier", "start_ns", "stream_id")

    def __init__(self, kind: int, carrier: dict[str, str], stream_id: int = 0) -> None:
        self.kind, self.carrier, self.stream_id = kind, carrier, stream_id
        self.start_ns = time.time_ns()


class RemoteStreamTrace:
    """A ModelStreamInfer stream's trace: its span lives in the engine, keyed by this id."""

    def __init__(self, plane: "RemoteDataPlane", carrier: dict[str, str]) -> None:
        self.plane, self.carrier = plane, carrier
        self.id = next(plane._trace_ids)
        self.used = False

    def child(self, model: str) -> RemoteTrace:
        self.used = True
        return RemoteTrace(wire.TRACE_STREAM, self.carrier, self.id)

    def end(self) -> None:
        if self.used:
            self.plane._send(wire.TRACE_END, self.id)


class RemoteStream:
    """A request's responses as they arrive from the engine (core.stream.ResponseStream's interface)."""

    __slots__ = ("_plane", "_tag", "_items", "_waiter", "_ended", "_cancelled", "decoupled", "empty_final")

    def __init__(self, plane: "RemoteDataPlane", tag: int) -> None:
        self._plane, self._tag = plane, tag
        self._items: deque[InferResponse] = deque()
        self._waiter: asyncio.Future | None = None
        self._ended = False  # the final response was delivered to us
        self._cancelled = False
        self.decoupled = False
        self.empty_final = False

    def push(self, response: InferResponse) -> None:
        if self._cancelled:
            return
        self._items.append(response)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self._plane._forget(self._tag, cancel=True)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def is_cancelled(self) -> bool:
        return self._cancelled

    def __aiter__(self) -> "RemoteStream":
        return self

    async def __anext__(self) -> InferResponse:
        while not self._items:
            if self._ended or self._cancelled:
                raise StopAsyncIteration
            self._waiter = self._plane._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        response = self._items.popleft()
        if response.final:
            self._ended = True
        return response
