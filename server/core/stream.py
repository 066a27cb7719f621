"""Response sinks: where one request's responses go, and how cancellation flows back.

A sink is created on the event loop for every request. The producer side (the scheduler, or a
backend through the ``ResponseSender`` protocol of core/backend.py) may call ``send`` from any
thread; delivery always happens on the loop. Two kinds:

- ``UnaryCallback``: a unary call (gRPC ModelInfer, REST infer, a frontend worker's request). It
  hands the request's single response to one callback; ``UnaryResponse`` resolves a future with it
  instead (for a caller that awaits). The fast path (``finish``) costs one call.
- ``ResponseStream``: ModelStreamInfer, generate_stream, the OpenAI routes. An async iterator of
  ``InferResponse`` items, each with ``final`` and ``error``; ``cancel()`` tells the producer.

Both enforce Triton's sender rules (the exact texts of its Python backend): nothing after the
final, and a non-decoupled model sends exactly one response before its final.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Callable, Mapping

from .errors import ErrorCode, ServingError

CLOSED = "Unable to send response. Response sender has been closed."
# responses a stream holds for a consumer that does not take them, before it cancels the request
MAX_PENDING = 4096
MORE_THAN_ONE = "Unable to send response. Non-decoupled model cannot send more than one response."
FINAL_FIRST = "Unable to send response. Non-decoupled model cannot send complete final before sending a response."

# (outputs, parameters, final, error): one response as the producer sent it
Item = tuple[Mapping[str, Any] | None, Mapping[str, Any] | None, bool, ServingError | None]
Render = Callable[[Item], Any]  # -> InferResponse; supplied by the data plane


def cancelled_error() -> ServingError:
    return ServingError(ErrorCode.CANCELLED, "Request was cancelled")


class _Sink:
    __slots__ = ("_loop", "_thread", "_lock", "_closed", "_responses", "_cancelled", "_callbacks",
                 "decoupled", "on_final", "on_response")

    def __init__(self, loop: asyncio.AbstractEventLoop, decoupled: bool) -> None:
        self._loop = loop
        self._thread = threading.get_ident()  # sinks are made on the loop's thread
        self._lock = threading.Lock()
        self._closed = False
        self._responses = 0
        self._cancelled = False
        self._callbacks: list[Callable[[], None]] | None = None
        self.decoupled = decoupled
        # the scheduler's hooks, called on the loop: a response was delivered (index, item), and the
        # final was (error or None); set before the request can produce anything
        self.on_final: Callable[[ServingError | None], None] | None = None
        self.on_response: Callable[[int, Item], None] | None = None

    # -- producer side (ResponseSender) ------------------------------------------------------

    def send(self, outputs: Mapping[str, Any] | None = None, *, final: bool = False,
             error: ServingError | None = None, parameters: Mapping[str, Any] | None = None) -> None:
        has_response = outputs is not None or error is not None or bool(parameters)
        with self._lock:
            if self._closed:
                raise ServingError(ErrorCode.INTERNAL, CLOSED)
            if not self.decoupled:
                if has_response and self._responses:
                    raise ServingError(ErrorCode.INTERNAL, MORE_THAN_ONE)
                if final and not has_response and not self._responses:
                    raise ServingError(ErrorCode.INTERNAL, FINAL_FIRST)
            index = self._responses  # this response's index (a flags-only final: the next one)
            if has_response:
                self._responses += 1
            if final:
                self._closed = True
        item: Item = (outputs, parameters, final, error)
        if threading.get_ident() == self._thread:
            self._deliver(item, index)
        else:
            try:
                self._loop.call_soon_threadsafe(self._deliver, item, index)
            except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
                pass

    def finish(self, outputs: Mapping[str, Any] | None, error: ServingError | None = None) -> None:
        """The scheduler's one final response (on the loop): the unary fast path."""
        if self._closed:
            return
        self._closed = True
        self._responses += 1
        self._deliver((outputs, None, True, error), 0)

    @property
    def closed(self) -> bool:
        """The final was sent."""
        return self._closed

    @property
    def responded(self) -> int:
        return self._responses

    def is_cancelled(self) -> bool:
        return self._cancelled

    def on_cancel(self, callback: Callable[[], None]) -> None:
        if self._cancelled:
            self._loop.call_soon_threadsafe(callback)
            return
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)

    # -- loop side ---------------------------------------------------------------------------

    def cancel(self) -> None:
        """The caller is gone (on the loop): tell the producer; later responses are dropped."""
        if self._cancelled:
            return
        self._cancelled = True
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback()

    def _deliver(self, item: Item, index: int) -> None:
        raise NotImplementedError

    def _hooks(self, item: Item, index: int) -> None:
        if self.on_response is not None:
            self.on_response(index, item)
        if item[2]:
            if self.on_final is not None:
                self.on_final(item[3])
            # the request is over: nothing left to cancel. Dropping the hooks breaks the cycle
            # sink -> scheduler callback -> queued item -> sink, so the request's tensors are freed
            # now rather than at a later garbage collection (frontend workers reuse that memory)
            self._callbacks = None
            self.on_final = self.on_response = None


class UnaryCallback(_Sink):
    """The sink of a unary call completed by a callback: ``on_item(item)`` is called once, on the
    loop, with the request's one final item (an error item when the producer broke the sender
    rules), unless the request was cancelled first (then never). No future, no task: the data
    plane's synchronous entry (``DataPlane.submit``) uses it directly."""

    __slots__ = ("_item", "_on_item")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_item: Callable[[Item], None]) -> None:
        super().__init__(loop, decoupled=False)
        self._item: Item | None = None
        self._on_item: Callable[[Item], None] | None = on_item

    def _deliver(self, item: Item, index: int) -> None:
        if item[0] is not None or item[3] is not None or item[1]:
            self._item = item
        self._hooks(item, index)
        if item[2]:
            on_item, self._on_item = self._on_item, None
            if on_item is None:
                return
            if self._item is None:
                on_item((None, None, True, ServingError(ErrorCode.INTERNAL, FINAL_FIRST)))
            else:
                on_item(self._item)
            self._item = None

    def cancel(self) -> None:
        self._on_item = None  # a cancelled request is not answered
        super().cancel()


class UnaryResponse(UnaryCallback):
    """The sink of a unary call awaited on the loop: ``await result()`` gives the one response's
    item (raises its error)."""

    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, self._resolve)
        self._future: asyncio.Future = loop.create_future()
        self._future.add_done_callback(self._on_done)

    def _on_done(self, future: asyncio.Future) -> None:
        if future.cancelled():  # the awaiting caller was cancelled (client gone, deadline)
            self.cancel()

    def _resolve(self, item: Item) -> None:
        if not self._future.done():
            if item[3] is not None:
                self._future.set_exception(item[3])
            else:
                self._future.set_result(item)

    def result(self) -> asyncio.Future:
        return self._future

    cancel = _Sink.cancel  # its future says what became of it (a cancelled future: nothing more)


class ResponseStream(_Sink):
    """The sink of a streaming call, iterated on the loop: ``async for response in stream``."""

    __slots__ = ("_items", "_waiter", "_ended", "_render", "empty_final")

    def __init__(self, loop: asyncio.AbstractEventLoop, decoupled: bool, render: Render) -> None:
        super().__init__(loop, decoupled)
        self._items: deque[Item] = deque()
        self._waiter: asyncio.Future | None = None
        self._ended = False
        self._render = render
        self.empty_final = False  # the caller asked for Triton's empty final response (streams only)

    def _deliver(self, item: Item, index: int) -> None:
        self._hooks(item, index)
        if self._cancelled:
            return
        if len(self._items) >= MAX_PENDING and not item[2]:
            # the consumer (a client that stopped reading) is this far behind: stop the producer
            # rather than buffer without bound; the consumer still gets what is queued, then this error
            self.cancel()
            error = ServingError(ErrorCode.UNAVAILABLE, f"the client is not reading its responses: "
                                 f"{MAX_PENDING} responses are waiting; the request was cancelled")
            item = (None, None, True, error)
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> "ResponseStream":
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._ended or self._cancelled:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if item[2]:
            self._ended = True
        return self._render(item)
