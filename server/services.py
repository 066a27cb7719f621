"""What the server offers a loaded model (core/backend.py ModelServices): calls into other models of
the repository from a model's own threads (Triton's BLS), and custom metric families.

The repository hands this object to every backend at load time; it is bound to the data plane and
its event loop once both exist (server/app.py). Calls block the calling thread, never the loop.
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any, Iterator, Sequence

from server.core.errors import ErrorCode, ServingError
from server.core.types import InferRequest, InferResponse

_END = object()


class LocalServices:
    def __init__(self) -> None:
        self._dataplane: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metrics: Any = None

    def bind(self, dataplane: Any, loop: asyncio.AbstractEventLoop, metrics: Any = None) -> None:
        self._dataplane, self._loop, self._metrics = dataplane, loop, metrics

    def _check(self) -> None:
        if self._loop is None:
            raise ServingError(ErrorCode.UNAVAILABLE, "the server is not serving yet")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise ServingError(ErrorCode.INTERNAL, "a blocking model call was made on the server's event loop")

    def infer(self, request: InferRequest, timeout: float | None = None) -> InferResponse:
        """Run ``request`` on a model of this server and wait for its one response."""
        self._check()
        future = asyncio.run_coroutine_threadsafe(self._dataplane.infer(request), self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise ServingError(ErrorCode.DEADLINE_EXCEEDED, f"request to model '{request.model_name}' timed out")

    def stream(self, request: InferRequest, timeout: float | None = None) -> Iterator[InferResponse]:
        """Run ``request`` on any model (decoupled ones too) and yield its responses as they come."""
        self._check()
        out: queue.SimpleQueue = queue.SimpleQueue()
        holder: dict[str, Any] = {}

        async def pump() -> None:
            try:
                stream = self._dataplane.stream(request)
                holder["stream"] = stream
                async for response in stream:
                    out.put(response)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                out.put(exc)
            finally:
                out.put(_END)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                try:
                    item = out.get(timeout=timeout)
                except queue.Empty:
                    raise ServingError(ErrorCode.DEADLINE_EXCEEDED,
                                       f"request to model '{request.model_name}' timed out") from None
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the caller stopped iterating early: cancel the request
            if not future.done():
                stream = holder.get("stream")
                if stream is not None:
                    self._loop.call_soon_threadsafe(stream.cancel)
                future.cancel()

    def metric_family(self, name: str, description: str, kind: str, buckets: Sequence[float] | None = None) -> Any:
        if self._metrics is None:
            raise ServingError(ErrorCode.UNAVAILABLE, "metrics are disabled on this server (--allow-metrics=false)")
        return self._metrics.custom_family(name, description, kind, buckets)

    def model_ready(self, name: str, version: str = "") -> bool:
        if self._dataplane is None:
            return False
        try:
            return self._dataplane.model_ready(name, version)
        except ServingError:
            return False
