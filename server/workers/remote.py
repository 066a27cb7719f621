"""The worker side: ``RemoteDataPlane``, the DataPlane the frontends of a worker process call.

It has the DataPlane's methods and forwards each to the engine: inference over the data channel
(an asyncio Unix-socket connection; tensors written once into this worker's request arena), control
calls (metadata, config, statistics, index, trace settings, stream admission) over a blocking call
channel (they are synchronous methods for the frontends). Readiness, draining and whether tracing is
on come from state the engine pushes (and returns with every heartbeat). An engine that is gone or
does not answer heartbeats makes every call fail with UNAVAILABLE at once: a worker never hangs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Mapping

from server.core.changes import Changes
from server.core.errors import ServingError, unavailable
from server.core.types import InferRequest, InferResponse

from . import arena, calls, codec, templates, wire
from .call_client import CallClient
from .link import FrameProtocol
from .remote_stream import RemoteStream, RemoteStreamTrace, RemoteTrace

log = logging.getLogger(__name__)

PROPAGATED = ("traceparent", "tracestate")
ENGINE_GONE = "the inference engine process is unreachable (frontend worker {slot})"
GATHER_NS = 1_000_000  # a request frame waits at most this long for others to join its write (link.py)


class _DataChannel(FrameProtocol):
    def __init__(self, plane: "RemoteDataPlane") -> None:
        super().__init__()
        self.plane = plane
        self.gather_ns = GATHER_NS  # requests that arrive over a few busy iterations leave together

    def on_frame(self, kind: int, tag: int, body: bytes) -> None:
        self.plane._on_frame(kind, tag, body)

    def on_lost(self) -> None:
        self.plane._engine_lost("the connection to the engine closed")


class RemoteDataPlane:
    def __init__(self, config: Mapping[str, Any]) -> None:
        self.slot: int = config["slot"]
        self._config = config
        self._req_shm = arena.attach(config["request_arena"])
        self._req_buf = self._req_shm.buf
        self._req_alloc = arena.Allocator(self._req_shm.size)
        self._resp_shm = arena.attach(config["response_arena"])
        self._resp_buf = self._resp_shm.buf
        self._timeout: float = config["engine_timeout"]
        self._max_inflight: int = config["max_inflight"]
        self._tags = itertools.count(1)
        self._trace_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future | RemoteStream | _Submitted] = {}
        self._controls: dict[int, asyncio.Future] = {}
        self._templates: dict[tuple, templates.Template] = {}  # request shapes sent to the engine
        self._response_templates: dict[int, templates.Template] = {}  # response shapes the engine sent
        self._views: dict[int, tuple] = {}  # id(weakref to a response's root view) -> (ref, block)
        self._released: list[int] = []
        self._release_scheduled = False
        self._state: dict[str, Any] = {"ready": False, "started": False, "draining": False,
                                       "tracing_on": False,
                                       "reason": "the engine has not reported yet", "metadata": {}}
        self._down: str | None = "the engine is not connected yet"
        self._last_pong = time.monotonic()
        self._data: _DataChannel | None = None
        self._calls: CallClient | None = None
        self._heartbeat: asyncio.Task | None = None
        self._first_state: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self.changes = Changes()
        self.stopped = asyncio.Event()  # the engine said STOP, or it is gone
        self.stop_reason = ""

    # -- connection --------------------------------------------------------------------------

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        hello = {"slot": self.slot, "token": self._config["token"], "pid": os.getpid()}
        self._first_state = self._loop.create_future()
        path = self._config["path"]
        _, self._data = await self._loop.create_unix_connection(lambda: _DataChannel(self), path)
        self._data.send(wire.HELLO, 0, json.dumps({**hello, "role": "data"}).encode())
        self._calls = CallClient(path, json.dumps({**hello, "role": "call"}).encode(), self._timeout)
        await asyncio.wait_for(self._first_state, self._timeout)
        self._heartbeat = self._loop.create_task(self._beat())

    async def close(self) -> None:
        log.info("request arena: %d blocks live, %d KiB carved; %d response blocks still read here",
                 self._req_alloc.live, self._req_alloc.carved >> 10, len(self._views))
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._data is not None:
            self._data.close()
        if self._calls is not None:
            self._calls.close()
        # unmap the arenas (the engine unlinks them); a view a frontend still holds keeps its mapping
        self._resp_buf = self._req_buf = None
        for shm in (self._req_shm, self._resp_shm):
            try:
                shm.close()
            except BufferError:
                pass

    async def _beat(self) -> None:
        interval = min(0.5, self._timeout / 4)
        while True:
            slept = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            self._send(wire.PING, 0)
            if now - slept > 2 * interval:
                # this worker's own loop was held up (a long blocking call, a starved CPU): the
                # engine's answers may be waiting unread in the socket, so judge it next round
                continue
            silent = now - self._last_pong
            if silent > self._timeout and self._down is None:
                self._set_down(f"the inference engine has not answered for {silent:.1f}s (frontend worker "
                               f"{self.slot})")

    def _set_down(self, reason: str | None) -> None:
        if reason == self._down:
            return
        self._down = reason
        if reason is not None:
            log.warning("%s: failing %d requests in flight with UNAVAILABLE", reason, len(self._pending))
            error = unavailable(reason)
            for tag, waiter in list(self._pending.items()):
                self._forget(tag, cancel=True, error=error)
            for future in self._controls.values():
                if not future.done():
                    future.set_exception(unavailable(reason))
            self._controls.clear()
        else:
            log.info("the inference engine answers again (frontend worker %d)", self.slot)
        self.changes.notify()

    def _engine_lost(self, why: str) -> None:
        if self.stopped.is_set():
            return
        self._set_down(ENGINE_GONE.format(slot=self.slot) + f": {why}")
        self.stop_reason = "engine gone"
        self.stopped.set()

    # -- frames from the engine --------------------------------------------------------------

    def _on_frame(self, kind: int, tag: int, body: bytes) -> None:
        if kind == wire.RESPONSE_FAST or kind == wire.RESPONSE:
            if kind == wire.RESPONSE_FAST:
                response, views = templates.read_fast_response(body, self._response_templates, self._resp_buf)
            else:
                response, views = codec.decode_response(body, self._resp_buf)
            if views is not None and views.block >= 0:
                ref = weakref.ref(views.root, self._freed)
                self._views[id(ref)] = (ref, views.block)
            del views
            waiter = self._pending.get(tag)
            if waiter is None:
                return  # cancelled meanwhile: dropping the response frees its block
            if isinstance(waiter, RemoteStream):
                if response.final:
                    del self._pending[tag]
                waiter.push(response)
            else:
                del self._pending[tag]
                if not waiter.done():
                    if response.error is not None:
                        waiter.set_exception(response.error)
                    else:
                        waiter.set_result(response)
        elif kind == wire.ERROR:
            self._forget(tag, cancel=False, error=wire.decode_error(body))
        elif kind == wire.RESPONSE_TEMPLATE:
            if len(self._response_templates) < templates.MAX_TEMPLATES:
                template = templates.Template.parse(body)
                self._response_templates[template.id] = template
        elif kind == wire.RELEASE:
            for block in wire.offsets(body):
                self._req_alloc.free(block)
        elif kind in (wire.PONG, wire.STATE):
            self._last_pong = time.monotonic()
            self._apply_state(json.loads(body))
            if self._down is not None and not self.stopped.is_set():
                self._set_down(None)
        elif kind == wire.REPLY:
            future = self._controls.pop(tag, None)
            if future is not None and not future.done():
                future.set_result(body)
        elif kind == wire.STOP:
            self.stop_reason = "engine stop"
            self._state["draining"] = True
            self.changes.notify()
            self.stopped.set()

    def _apply_state(self, state: dict) -> None:
        old = self._state
        self._state = state
        if self._first_state is not None and not self._first_state.done():
            self._first_state.set_result(None)
        if (old.get("ready"), old.get("draining"), old.get("changes")) != (
                state.get("ready"), state.get("draining"), state.get("changes")):
            self.changes.notify()

    def _freed(self, ref: weakref.ref) -> None:
        held = self._views.pop(id(ref), None)
        if held is None:
            return
        block = held[1]
        self._released.append(block)
        if not self._release_scheduled:
            self._release_scheduled = True
            if threading.get_ident() == self._thread:
                self._loop.call_soon(self._flush_released)
            else:
                self._loop.call_soon_threadsafe(self._flush_released)

    def _flush_released(self) -> None:
        self._release_scheduled = False
        blocks, self._released = self._released, []
        if blocks:
            self._send(wire.RELEASE, 0, wire.release_body(blocks))

    def _send(self, kind: int, tag: int, body: bytes = b"") -> None:
        if self._data is not None:
            self._data.send(kind, tag, body)

    def _forget(self, tag: int, cancel: bool, error: ServingError | None = None) -> None:
        waiter = self._pending.pop(tag, None)
        if cancel and waiter is not None:
            self._send(wire.CANCEL, tag)
        if error is None or waiter is None:
            return
        if isinstance(waiter, RemoteStream):
            waiter.push(InferResponse("", "", "", [], {}, True, error))
        elif not waiter.done():
            waiter.set_exception(error)

    def _admit(self) -> None:
        if self._down is not None:
            raise unavailable(self._down)
        if len(self._pending) >= self._max_inflight or (self._data is not None and self._data.paused):
            raise unavailable(f"the inference engine is full: {len(self._pending)} requests of frontend "
                              f"worker {self.slot} are in flight")

    def _call(self, method: str, *args: Any) -> Any:
        if self._down is not None:
            raise unavailable(self._down)
        reply = self._calls.call(wire.CONTROL, next(self._tags), calls.request(method, *args))
        return calls.decode(method, reply)

    # -- the DataPlane interface: health and metadata ----------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._down is None and bool(self._state.get("ready"))

    def not_ready_reason(self) -> str:
        return self._down or self._state.get("reason", "")

    @property
    def started(self) -> bool:
        return bool(self._state.get("started"))

    @property
    def draining(self) -> bool:
        return bool(self._state.get("draining"))

    @property
    def control_mode(self) -> str:
        return self._state.get("control_mode", "none")

    def metadata(self) -> dict:
        return dict(self._state.get("metadata") or {})

    def model_metadata(self, name: str, version: str = ""):
        return self._call("model_metadata", name, version)

    def model_ready(self, name: str, version: str = "") -> bool:
        return self._call("model_ready", name, version)

    def model_config(self, name: str, version: str = ""):
        return self._call("model_config", name, version)

    def model_config_json(self, name: str, version: str = "") -> dict:
        return self._call("model_config_json", name, version)

    def model_names(self) -> list[str]:
        return self._call("model_names")

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        return self._call("statistics", name, version)

    def repository_index(self, ready_only: bool = False) -> list:
        return self._call("repository_index", ready_only)

    def model_parameter(self, name: str, version: str, key: str) -> str | None:
        return self._call("model_parameter", name, version, key)

    # system shared memory: the regions live in the engine, which maps them for every worker
    def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        return self._call("shm_register", name, key, offset, byte_size)

    def shm_unregister(self, name: str = "") -> None:
        return self._call("shm_unregister", name)

    def shm_status(self, name: str = "") -> list[dict]:
        return self._call("shm_status", name)

    def trace_settings(self, model: str = "", changes: dict | None = None, update: bool = False) -> dict:
        if self._down is not None:
            raise unavailable(self._down)
        reply = self._calls.call(wire.CONTROL, next(self._tags),
                                 calls.request("trace_settings", model, changes, update))
        tracing_on = json.loads(reply).get("tracing_on")
        if tracing_on is not None:  # this worker's next request already sees the change
            self._state = {**self._state, "tracing_on": tracing_on}
        return calls.decode("trace_settings", reply)

    # -- model control (async: a load may take long; the worker's loop keeps serving) ---------

    async def _control(self, method: str, *args: Any) -> Any:
        if self._down is not None:
            raise unavailable(self._down)
        tag = next(self._tags)
        future = self._loop.create_future()
        self._controls[tag] = future
        self._send(wire.CONTROL, tag, calls.request(method, *args))
        try:
            body = await future
        finally:
            self._controls.pop(tag, None)
        return calls.decode(method, body)

    async def load(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        await self._control("load", name, dict(parameters or {}))

    async def unload(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        await self._control("unload", name, dict(parameters or {}))

    # -- trace extension ---------------------------------------------------------------------

    @property
    def tracing_on(self) -> bool:
        return bool(self._state.get("tracing_on"))

    def trace_grpc(self, metadata, stream: bool = False) -> Any:
        carrier = {k: v for k, v in metadata or () if k in PROPAGATED and isinstance(v, str)}
        return RemoteStreamTrace(self, carrier) if stream else RemoteTrace(wire.TRACE_GRPC, carrier)

    def trace_http(self, headers: Mapping[str, str]) -> Any:
        return RemoteTrace(wire.TRACE_HTTP, {k: headers[k] for k in PROPAGATED if k in headers})

    # -- inference ---------------------------------------------------------------------------

    def _encode_fast(self, request: InferRequest) -> bytes | None:
        """The short form of a request whose shape was seen before (None: use the full one)."""
        key = templates.request_key(request)
        if key is None:
            return None
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= templates.MAX_TEMPLATES:
                return None
            try:
                template = templates.new_request_template(len(self._templates) + 1, request)
            except ValueError:
                return None
            self._templates[key] = template
            self._send(wire.TEMPLATE, template.id, template.describe())  # before its first use
        block = template.write([t.data for t in request.inputs], self._req_buf, self._req_alloc)
        if block < 0 and template.size:
            return None  # no room in the arena: the full form goes inline
        return templates.fast_request(template, block, request)

    def _encode(self, request: InferRequest) -> bytes:
        trace = request.trace
        buf, alloc = self._req_buf, self._req_alloc
        if trace is None:
            return codec.encode_request(request, buf, alloc, wire.TRACE_NONE, None, 0, 0)[0]
        return codec.encode_request(request, buf, alloc, trace.kind, trace.carrier, trace.start_ns,
                                   trace.stream_id)[0]

    def _send_infer(self, request: InferRequest, waiter: Callable[[int], Any]) -> tuple[int, Any]:
        """Admit and send one unary request; ``waiter(tag)`` makes what its answer is delivered to."""
        self._admit()
        tag = next(self._tags)
        body = self._encode_fast(request)
        kind = wire.INFER_FAST
        if body is None:
            body, kind = self._encode(request), wire.INFER
        waiting = self._pending[tag] = waiter(tag)
        self._data.send(kind, tag, body)
        return tag, waiting

    async def infer(self, request: InferRequest) -> InferResponse:
        tag, future = self._send_infer(request, lambda _tag: self._loop.create_future())
        try:
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(tag, None) is not None:  # the caller went away: the engine drops it too
                self._send(wire.CANCEL, tag)
            raise

    def submit(self, request: InferRequest,
               on_done: Callable[[InferResponse | None, BaseException | None], None]) -> _Submitted:
        """The DataPlane's synchronous unary entry, through the engine: ``on_done(response, None)`` or
        ``on_done(None, error)`` once the engine answered, never after the handle's ``cancel()``.
        Refusals this side can tell at once (engine down or full) raise here; the engine's own come
        back through ``on_done``."""
        return self._send_infer(request, lambda tag: _Submitted(self, tag, on_done))[1]

    def stream(self, request: InferRequest) -> RemoteStream:
        """Admission is synchronous, as in the DataPlane (a refusal raises here); the responses then
        arrive over the data channel."""
        self._admit()
        tag = next(self._tags)
        body = self._encode(request)
        stream = RemoteStream(self, tag)
        self._pending[tag] = stream
        try:
            give_up = wire.ADMIT_BY.pack(time.monotonic() + self._timeout)
            reply = json.loads(self._calls.call(wire.INFER, tag, give_up + body))
        except ServingError:
            self._forget(tag, cancel=True)
            raise
        if "error" in reply:
            self._pending.pop(tag, None)
            raise wire.error_from(*reply["error"])
        stream.decoupled = reply["decoupled"]
        stream.empty_final = reply["empty_final"]
        return stream

    # -- what tests and the process main read ------------------------------------------------

    def arena_usage(self) -> dict[str, int]:
        return {"live": self._req_alloc.live, "used": self._req_alloc.used, "carved": self._req_alloc.carved}




class _Submitted:
    """A request sent by ``RemoteDataPlane.submit``: waits in ``_pending`` like a future (``done``,
    ``set_result``, ``set_exception``) and hands its answer to the caller's callback."""

    __slots__ = ("plane", "tag", "on_done")

    def __init__(self, plane: RemoteDataPlane, tag: int,
                 on_done: Callable[[InferResponse | None, BaseException | None], None]) -> None:
        self.plane, self.tag = plane, tag
        self.on_done: Callable[[InferResponse | None, BaseException | None], None] | None = on_done

    def done(self) -> bool:
        return self.on_done is None

    def set_result(self, response: InferResponse) -> None:
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(response, None)

    def set_exception(self, error: BaseException) -> None:
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(None, error)

    def cancel(self) -> None:
        """The caller is gone: not answered, and the engine drops the request."""
        self.on_done = None
        if self.plane._pending.pop(self.tag, None) is not None:
            self.plane._send(wire.CANCEL, self.tag)
