"""Inside a model's own process: the server's services and response senders as proxies over the
control channel. Every call a model makes (BLS, custom metrics, readiness) is a question the server
answers; responses a model sends go to the server's response sink of that request."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

from server.core.errors import ErrorCode, ServingError
from server.core.stream import CLOSED, FINAL_FIRST, MORE_THAN_ONE
from server.core.types import InferRequest, InferResponse, Tensor

from . import ipc

log = logging.getLogger(__name__)


def request_desc(request: InferRequest, prefix: str) -> tuple:
    packed = ipc.pack([(t.name, t.datatype, t.data) for t in request.inputs], prefix)
    return (request.model_name, request.model_version, request.id, packed, [o.name for o in request.outputs],
            dict(request.parameters))


def response_from(desc: tuple, prefix: str) -> InferResponse:
    model, version, rid, packed, parameters, final, error = desc
    outputs = [Tensor(name, datatype, list(array.shape), array) for name, datatype, array in ipc.unpack(packed, prefix)]
    return InferResponse(model, version, rid, outputs, dict(parameters or {}), bool(final),
                         ipc.error_from(error) if error else None)


def discard(desc: Any) -> None:
    """Unlink the segment of a response that will never be read."""
    if isinstance(desc, tuple) and len(desc) == 7 and isinstance(desc[3], tuple) and desc[3][0]:
        try:
            (ipc.shm_dir() / str(desc[3][0]).replace("/", "")).unlink()
        except FileNotFoundError:
            pass


class _Asking:
    """Questions to the server and their answers (one queue per question: streams get items)."""

    def __init__(self, channel: ipc.Channel) -> None:
        self._channel = channel
        self._ids = itertools.count(1)
        self._open: dict[int, queue.SimpleQueue] = {}

    def start(self, what: str, *args: Any) -> tuple[int, queue.SimpleQueue]:
        ask_id = next(self._ids)
        answers: queue.SimpleQueue = queue.SimpleQueue()
        self._open[ask_id] = answers
        try:
            self._channel.send(("ask", ask_id, what, args))
        except ipc.PeerGone:
            self._open.pop(ask_id, None)
            raise ServingError(ErrorCode.UNAVAILABLE, "the server went away") from None
        return ask_id, answers

    def ask(self, what: str, *args: Any) -> Any:
        ask_id, answers = self.start(what, *args)
        kind, ok, payload = answers.get()
        self._open.pop(ask_id, None)
        if not ok:
            raise ipc.error_from(payload)
        return payload

    def deliver(self, message: tuple) -> None:
        """An answer or a stream item from the server (on the reader thread)."""
        kind, ask_id = message[0], message[1]
        answers = self._open.get(ask_id)
        if answers is None:  # asked and no longer waited for (a stream stopped early)
            discard(message[2] if kind == "item" else message[3] if message[2] else None)
            return
        if kind == "item":
            answers.put(("item", True, message[2]))
        else:
            self._open.pop(ask_id, None)
            answers.put(("answer", message[2], message[3]))

    def cancel(self, ask_id: int, answers: queue.SimpleQueue) -> None:
        if self._open.pop(ask_id, None) is not None:
            try:
                self._channel.send(("ask_cancel", ask_id))
            except ipc.PeerGone:
                pass
        while not answers.empty():  # responses that came and will not be read: free their segments
            kind, ok, payload = answers.get()
            discard(payload if ok else None)

    def fail_all(self) -> None:
        for ask_id in list(self._open):
            answers = self._open.pop(ask_id, None)
            if answers is not None:
                answers.put(("answer", False, ("UNAVAILABLE", "the server went away")))


class RemoteServices:
    """core.backend.ModelServices, answered by the server."""

    def __init__(self, channel: ipc.Channel, prefix: str, peer_prefix: str) -> None:
        self.asking = _Asking(channel)
        self._prefix = prefix  # segments this process writes
        self._peer = peer_prefix  # segments it may read

    def infer(self, request: InferRequest, timeout: float | None = None) -> InferResponse:
        return response_from(self.asking.ask("infer", request_desc(request, self._prefix), timeout), self._peer)

    def stream(self, request: InferRequest, timeout: float | None = None) -> Iterator[InferResponse]:
        ask_id, answers = self.asking.start("stream", request_desc(request, self._prefix), timeout)
        ended = False
        try:
            while True:
                kind, ok, payload = answers.get()
                if kind == "item":
                    yield response_from(payload, self._peer)
                    continue
                ended = True
                if not ok:
                    raise ipc.error_from(payload)
                return
        finally:
            if not ended:  # the model stopped iterating early: cancel the request in the server
                self.asking.cancel(ask_id, answers)

    def metric_family(self, name: str, description: str, kind: str, buckets: Sequence[float] | None = None) -> Any:
        return _Family(self.asking, self.asking.ask("family", str(name), str(description), str(kind)))

    def model_ready(self, name: str, version: str = "") -> bool:
        return bool(self.asking.ask("ready", str(name), str(version)))


class _Family:
    def __init__(self, asking: _Asking, family_id: int) -> None:
        self._asking, self._id = asking, family_id

    def metric(self, labels: dict[str, str], buckets: Sequence[float] | None = None) -> "_Metric":
        labels = {str(k): str(v) for k, v in labels.items()}
        return _Metric(self._asking, self._asking.ask("metric", self._id, labels,
                                                      [float(b) for b in buckets] if buckets else None))


class _Metric:
    def __init__(self, asking: _Asking, metric_id: int) -> None:
        self._asking, self._id = asking, metric_id

    def increment(self, value: float) -> None:
        self._asking.ask("metric_op", self._id, "increment", float(value))

    def set(self, value: float) -> None:
        self._asking.ask("metric_op", self._id, "set", float(value))

    def observe(self, value: float) -> None:
        self._asking.ask("metric_op", self._id, "observe", float(value))

    def value(self) -> float:
        return float(self._asking.ask("metric_op", self._id, "value", 0.0))


class RemoteSender:
    """core.backend.ResponseSender for one request, its responses going to the server's sink.

    It applies the sink's rules itself (core/stream.py, same texts), so a rule broken in the model
    raises in the model's own thread just as it does in the server process."""

    def __init__(self, channel: ipc.Channel, key: int, decoupled: bool, prefix: str,
                 on_final: Callable[[int], None]) -> None:
        self._channel = channel
        self._key = key
        self._decoupled = decoupled
        self._prefix = prefix
        self._on_final = on_final
        self._lock = threading.Lock()
        self._closed = False
        self._responses = 0
        self._cancelled = False
        self._callbacks: list[Callable[[], None]] = []

    def send(self, outputs: Mapping[str, Any] | None = None, *, final: bool = False, error: Any = None,
             parameters: Mapping[str, Any] | None = None) -> None:
        has_response = outputs is not None or error is not None or bool(parameters)
        with self._lock:
            if self._closed:
                raise ServingError(ErrorCode.INTERNAL, CLOSED)
            if not self._decoupled:
                if has_response and self._responses:
                    raise ServingError(ErrorCode.INTERNAL, MORE_THAN_ONE)
                if final and not has_response and not self._responses:
                    raise ServingError(ErrorCode.INTERNAL, FINAL_FIRST)
            if has_response:
                self._responses += 1
            if final:
                self._closed = True
        packed = None
        if outputs is not None and error is None:
            packed = ipc.pack([(name, "", array) for name, array in outputs.items()], self._prefix)
        wire_error = ipc.error_tuple(error) if isinstance(error, ServingError) else \
            ("INTERNAL", str(error)) if error is not None else None
        try:
            self._channel.send(("send", self._key, packed, final, wire_error, dict(parameters) if parameters else None))
        except ipc.PeerGone:
            raise ServingError(ErrorCode.UNAVAILABLE, "the server went away") from None
        finally:
            if final:
                self._on_final(self._key)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """The server ended this request itself (its batch failed, or a default-mode batch returned)."""
        with self._lock:
            self._closed = True

    def is_cancelled(self) -> bool:
        return self._cancelled

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)
                return
        callback()

    def cancel(self) -> None:
        """The server says the caller cancelled (on the reader thread)."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("an on_cancel callback raised")
