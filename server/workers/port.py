"""The engine's side of one worker process: its arenas, its two channels, its requests in flight.

Unary requests go through ``DataPlane.submit`` as their frame is read and are answered from its
completion callback (a traced one runs ``DataPlane.infer`` in a task: its spans use context
variables); streams are admitted on the call channel (``DataPlane.stream`` is synchronous) and
pumped to the data channel. Request tensors are numpy
views into the worker's request arena; when the last view of a request is gone (the scheduler and
the backend are done with it) the block goes back to the worker in a RELEASE frame. Responses are
written into this port's response arena and freed when the worker says so. When the worker dies,
``retire`` cancels everything it had in flight and unlinks both arenas.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
import weakref
from typing import Any

from server.core.errors import ErrorCode, ServingError

from . import arena, calls, codec, templates, wire

log = logging.getLogger(__name__)

EARLY_CANCELS = 1024  # CANCELs of unknown tags remembered per worker (oldest forgotten first)


class WorkerPort:
    def __init__(self, hub: Any, slot: int, generation: int, size: int) -> None:
        self.hub, self.slot, self.generation = hub, slot, generation
        prefix = f"inferd-w{os.getpid()}-{slot}"  # /dev/shm names say which engine and worker slot
        self.request_shm = arena.create(size, prefix)
        self.response_shm = arena.create(size, prefix)
        self.request_buf = self.request_shm.buf
        self.response_buf = self.response_shm.buf
        self.response_alloc = arena.Allocator(size)
        self.data = None  # EngineChannel (role data), once the worker connected
        self.call = None  # EngineChannel (role call)
        self.pid = 0
        self.up = False
        self.retired = False
        self.inflight: dict[int, Any] = {}  # tag -> unary task, or ResponseStream
        self.templates: dict[int, templates.Template] = {}  # request shapes this worker described
        # response shapes sent to it, per (model, version)
        self._response_templates: dict[tuple[str, str], list[templates.Template]] = {}
        self._response_template_count = 0
        self._pumps: set[asyncio.Task] = set()  # stream pumps: cancelled with the worker
        self._controls: set[asyncio.Task] = set()  # load/unload/...: run to their end (they change the server)
        self._cancelled_early: dict[int, None] = {}  # CANCELs of tags not (yet) in flight, oldest first
        self._stream_traces: dict[int, Any] = {}
        self._held: dict[int, tuple] = {}  # id(weakref to a request's root view) -> (ref, block)
        self._released: list[int] = []
        self._release_scheduled = False
        self.served = 0

    # -- frames ------------------------------------------------------------------------------

    def on_data(self, kind: int, tag: int, body: bytes) -> None:
        if kind == wire.INFER_FAST or kind == wire.INFER:
            self._infer(kind, tag, body)
        elif kind == wire.TEMPLATE:
            if len(self.templates) < templates.MAX_TEMPLATES:
                template = templates.Template.parse(body)
                self.templates[template.id] = template
        elif kind == wire.RELEASE:
            for block in wire.offsets(body):
                self.response_alloc.free(block)
        elif kind == wire.CANCEL:
            self._cancel(tag)
        elif kind == wire.PING:
            self.data.send(wire.PONG, 0, self.hub.state())
        elif kind == wire.CONTROL:
            self._spawn(self._control(self.data, tag, body), self._controls)
        elif kind == wire.TRACE_END:
            trace = self._stream_traces.pop(tag, None)
            if trace is not None:
                trace.end()
        elif kind == wire.UP:
            self.up = True
            self.hub.worker_up(self)

    def on_call(self, kind: int, tag: int, body: bytes) -> None:
        if kind == wire.INFER:
            self._admit_stream(tag, body)
        elif kind == wire.CONTROL:
            self._spawn(self._control(self.call, tag, body), self._controls)

    # -- inference ---------------------------------------------------------------------------

    def _decode(self, body: bytes, kind: int = wire.INFER):
        try:
            if kind == wire.INFER_FAST:
                decoded = templates.read_fast_request(body, self.templates, self.request_buf)
            else:
                decoded = codec.decode_request(body, self.request_buf)
        except Exception:
            # nothing here will read the request's block: the worker may have it back now
            block = (templates.fast_request_block if kind == wire.INFER_FAST else codec.request_block)(body)
            if block >= 0:
                self._release(block)
            raise
        views = decoded.views
        if views.block >= 0:
            ref = weakref.ref(views.root, self._views_gone)
            self._held[id(ref)] = (ref, views.block)
        request = decoded.request
        if decoded.trace_kind:
            request.trace = self._trace(decoded)
        return request

    def _infer(self, kind: int, tag: int, body: bytes) -> None:
        try:
            request = self._decode(body, kind)
        except Exception as exc:  # noqa: BLE001 - a malformed frame fails its request only
            if not isinstance(exc, ServingError):
                log.error("frontend worker %d: request %d could not be read: %s", self.slot, tag, exc)
            self.data.send(wire.ERROR, tag, wire.error_body(_malformed(exc)))
            return
        if request.trace is not None:  # its spans set context variables: it gets a task (a context) of its own
            self.inflight[tag] = asyncio.ensure_future(self._unary(tag, request))
            return
        # the data plane's synchronous entry: admission, validation and the scheduler's submit happen
        # while this frame is read, and the response comes back through a callback (no coroutine,
        # future or task per request)
        try:
            sink = self.hub.dataplane.submit(request, functools.partial(self._done, tag))
        except Exception as exc:  # noqa: BLE001 - a refusal is the request's answer
            self._failed(tag, exc)
            return
        if not sink.closed:  # (a final already sent is answered, or about to be, without it)
            self.inflight[tag] = sink

    def _done(self, tag: int, response, error: BaseException | None) -> None:
        self.inflight.pop(tag, None)
        if error is None:
            self._answer(tag, response)
        else:
            self._failed(tag, error)

    def _answer(self, tag: int, response) -> None:
        self._respond(tag, response)
        self.served += 1

    def _failed(self, tag: int, exc: BaseException) -> None:
        if not isinstance(exc, ServingError):
            log.error("inference for frontend worker %d failed", self.slot, exc_info=exc)
        self.data.send(wire.ERROR, tag, wire.error_body(exc))

    async def _unary(self, tag: int, request) -> None:
        try:
            response = await self.hub.dataplane.infer(request)
        except asyncio.CancelledError:
            self.inflight.pop(tag, None)
            return
        except Exception as exc:  # noqa: BLE001 - every failure goes back as the request's status
            if self.inflight.pop(tag, None) is not None:
                self._failed(tag, exc)
            return
        if self.inflight.pop(tag, None) is not None:
            self._answer(tag, response)

    def _respond(self, tag: int, response) -> None:
        """Send one response: its short form when its shape was sent before, else the full one."""
        template = self._response_template(response)
        if template is not None:
            block = template.write([t.data for t in response.outputs], self.response_buf, self.response_alloc)
            if block >= 0 or not template.size:
                self.data.send(wire.RESPONSE_FAST, tag, templates.fast_response(template, block, response))
                return
        body, _ = codec.encode_response(response, self.response_buf, self.response_alloc)
        self.data.send(wire.RESPONSE, tag, body)

    def _response_template(self, response) -> templates.Template | None:
        """The template that says this response (sent to the worker first when it is new), or None
        when only the full form can (parameters, an error, a non-final response, BYTES, ...)."""
        if response.parameters or response.error is not None or not response.final:
            return None
        key = (response.model_name, response.model_version)
        known = self._response_templates.get(key)
        if known is None:
            known = self._response_templates[key] = []
        outputs = response.outputs
        for template in known:
            if template.matches(outputs):
                return template
        if self._response_template_count >= templates.MAX_TEMPLATES or templates.response_key(response) is None:
            return None
        try:
            template = templates.new_response_template(self._response_template_count + 1, response)
        except ValueError:
            return None
        self._response_template_count += 1
        known.append(template)
        self.data.send(wire.RESPONSE_TEMPLATE, template.id, template.describe())
        return template

    def _admit_stream(self, tag: int, body: bytes) -> None:
        try:
            if len(body) < wire.ADMIT_BY.size:
                raise ValueError("a stream admission without its give-up time")
            (give_up,) = wire.ADMIT_BY.unpack_from(body)
            request = self._decode(body[wire.ADMIT_BY.size:])
            if tag in self._cancelled_early or time.monotonic() > give_up:
                self._cancelled_early.pop(tag, None)
                # the worker gave up on this admission (its call timed out; it says so on the data
                # channel, which the engine may read before or after this one): it must not start
                raise ServingError(ErrorCode.CANCELLED, "the caller cancelled the request before it was admitted")
            stream = self.hub.dataplane.stream(request)
        except Exception as exc:  # noqa: BLE001 - the refusal is the caller's answer
            if not isinstance(exc, ServingError):
                log.error("stream admission for frontend worker %d failed", self.slot, exc_info=exc)
                exc = _malformed(exc) if isinstance(exc, (ValueError, UnicodeDecodeError)) else exc
            self.call.send(wire.REPLY, tag, calls.reply_error(exc))
            return
        del request
        self.inflight[tag] = stream
        self._spawn(self._pump(tag, stream))
        self.call.send(wire.REPLY, tag, json.dumps({"decoupled": stream.decoupled,
                                                    "empty_final": bool(stream.empty_final)}).encode())

    async def _pump(self, tag: int, stream) -> None:
        try:
            async for response in stream:
                if self.inflight.get(tag) is not stream:
                    break
                self._respond(tag, response)
                if response.final:
                    break
        except Exception as exc:  # noqa: BLE001 - a rendering bug fails this request in-band
            log.error("stream for frontend worker %d failed", self.slot, exc_info=exc)
            if self.inflight.get(tag) is stream:
                self.data.send(wire.ERROR, tag, wire.error_body(exc))
        finally:
            if self.inflight.get(tag) is stream:
                del self.inflight[tag]
            self.served += 1

    def _cancel(self, tag: int) -> None:
        work = self.inflight.pop(tag, None)
        if work is None:
            # finished already (its answer crossed the CANCEL), or a stream admission still on its way
            # over the call channel: remember it, boundedly, so that admission does not start it
            early = self._cancelled_early
            early[tag] = None
            if len(early) > EARLY_CANCELS:
                del early[next(iter(early))]
            return
        # a traced unary request's task, a unary sink or a ResponseStream: the scheduler drops the
        # request (a unary sink is then never answered), or the backend is told
        work.cancel()

    def _trace(self, decoded) -> Any:
        tracing = self.hub.tracing
        if not tracing.on:
            return None
        carrier = decoded.carrier or {}
        if decoded.trace_kind == wire.TRACE_GRPC:
            incoming = tracing.from_grpc(list(carrier.items()))
        elif decoded.trace_kind == wire.TRACE_HTTP:
            incoming = tracing.from_http(carrier)
        else:
            stream_trace = self._stream_traces.get(decoded.stream_id)
            if stream_trace is None:
                stream_trace = tracing.from_grpc(list(carrier.items()), stream=True)
                stream_trace.start_ns = decoded.start_ns
                self._stream_traces[decoded.stream_id] = stream_trace
            incoming = stream_trace.child(decoded.request.model_name)
        if incoming is not None and decoded.start_ns:
            incoming.start_ns = decoded.start_ns  # the span starts when the worker received the call
        return incoming

    # -- control calls -----------------------------------------------------------------------

    async def _control(self, channel, tag: int, body: bytes) -> None:
        try:
            method, args = calls.parse_request(body)
            result = await calls.serve(self.hub.dataplane, method, args)
            if method == "trace_settings":
                self.hub.push_state()  # tracing may have been switched on or off: every worker hears
                reply = calls.reply_ok(result, tracing_on=self.hub.tracing.on)
            else:
                reply = calls.reply_ok(result)
        except Exception as exc:  # noqa: BLE001 - the error is the answer
            if not isinstance(exc, ServingError):
                log.error("engine call from frontend worker %d failed", self.slot, exc_info=exc)
            reply = calls.reply_error(exc)
        if channel is not None and not self.retired:  # a retired worker's caller is gone: the work is done anyway
            channel.send(wire.REPLY, tag, reply)

    def _spawn(self, coro, tasks: set | None = None) -> None:
        tasks = self._pumps if tasks is None else tasks
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # -- blocks ------------------------------------------------------------------------------

    def _views_gone(self, ref: weakref.ref) -> None:
        held = self._held.pop(id(ref), None)
        if held is None or self.retired:
            return
        self._release(held[1])

    def _release(self, block: int) -> None:
        if self.retired:
            return
        self._released.append(block)
        if not self._release_scheduled:
            self._release_scheduled = True
            # the RELEASE frame joins the data channel's next write (its before_flush), usually the
            # one that carries the responses of the batch that let these blocks go
            if threading.get_ident() == self.hub.loop_thread:  # the usual case: no self-pipe wake-up
                self._flush_soon()
            else:
                self.hub.loop.call_soon_threadsafe(self._flush_soon)

    def _flush_soon(self) -> None:
        data = self.data
        if data is None or data.closed:
            self.flush_released()
        else:
            data.flush_soon()

    def flush_released(self) -> None:
        """The data channel's ``before_flush``: the blocks freed since its last write, in one frame."""
        if not self._released:
            return
        self._release_scheduled = False
        blocks, self._released = self._released, []
        if self.data is not None:
            self.data.send(wire.RELEASE, 0, wire.release_body(blocks))

    # -- the end -----------------------------------------------------------------------------

    def retire(self) -> None:
        """The worker is gone: cancel what it had in flight, end its stream spans, drop its arenas."""
        if self.retired:
            return
        self.retired = True
        lost = len(self.inflight)
        for tag in list(self.inflight):
            self._cancel(tag)
        for task in list(self._pumps):
            task.cancel()
        for trace in self._stream_traces.values():
            trace.end()
        self._stream_traces.clear()
        for channel in (self.data, self.call):
            if channel is not None:
                channel.close()
        if lost:
            log.warning("frontend worker %d: cancelled its %d requests in flight", self.slot, lost)
        alloc = self.response_alloc
        log.info("frontend worker %d: %d requests served; response arena: %d blocks live, %d KiB carved; "
                 "%d request blocks still read here", self.slot, self.served, alloc.live, alloc.carved >> 10,
                 len(self._held))
        for shm in (self.request_shm, self.response_shm):
            try:
                shm.unlink()  # the name goes now; the memory when the last view of it is gone
            except FileNotFoundError:
                pass
        self.request_buf = self.response_buf = None
        self.hub.release_later([self.request_shm, self.response_shm])


def _malformed(exc: BaseException) -> ServingError:
    if isinstance(exc, ServingError):  # e.g. an unknown datatype: the caller's own mistake, said as such
        return exc
    return ServingError(ErrorCode.INTERNAL, f"malformed request frame from a frontend worker: {exc}")
