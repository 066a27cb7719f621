"""OpenTelemetry tracing of the request path: server, queue, batch and compute spans, model load spans.

Off by default. When off, each hook is one attribute or ``None`` check (``tracing.on`` in the
frontends, ``request.trace is None`` past them) and the SDK is never imported. When on:

    frontend    Incoming: the caller's W3C context (traceparent/tracestate) and the start time
    data plane  server span (model_name, model_version, request_id, status; error status + message),
                the child of the caller's span; a RequestTrace travels with the request
    scheduler   queue span per request (enqueued -> an instance picks its batch up); one batch span
                per executed batch (batch_size, links to every member's server span) with the
                backend's compute span inside; the instance thread times the batch, the spans are
                made on the loop once it is done, from the ids the requests carry: nothing relies on
                an implicit "current span", across threads or not
    repository  a span per model load / unload
    stream      one server span over a whole ModelStreamInfer stream, one event per response; its
                requests' spans are its children

Spans are made finished, with explicit ids and parents (trace_export.Emitter). Log lines emitted
while a traced request is handled (on the loop, or by the instance thread running its batch) end
with ``trace_id=<32 hex>``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
from typing import Any, Awaitable, Callable, Mapping, Sequence

from server import __version__
from server.core.errors import ErrorCode, ServingError

from . import trace_config
from .trace_settings import TraceSettings

log = logging.getLogger(__name__)

_PROPAGATED = ("traceparent", "tracestate")
# the RequestTrace (or a batch's list of them) being handled in this task / thread; None: untraced
_LOG_TAG: contextvars.ContextVar[Any] = contextvars.ContextVar("inferd_trace", default=None)
_x: Any = None  # trace_export and the OpenTelemetry names, imported when a pipeline is first built


def _load() -> Any:
    global _x
    if _x is None:
        from types import SimpleNamespace

        from opentelemetry.trace import SpanKind, get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from . import trace_export

        _x = SimpleNamespace(SERVER=SpanKind.SERVER, INTERNAL=SpanKind.INTERNAL, span_of=get_current_span,
                             propagator=TraceContextTextMapPropagator(),
                             OK=trace_export.OK, UNSET=trace_export.UNSET, error=trace_export.error,
                             Emitter=trace_export.Emitter)
    return _x


class _LogTag:
    """Appends the handled request's trace id to every log record made while it is handled.

    A process-wide ``logging`` record factory: installed only while tracing is on (a pipeline was
    built), by the first Tracing that turns on, and taken out again when the last one shuts down,
    leaving whatever factory was there before.
    """

    def __init__(self) -> None:
        self.users = 0
        self.previous: Callable[..., logging.LogRecord] | None = None

    def acquire(self) -> None:
        self.users += 1
        if self.users == 1:
            self.previous = logging.getLogRecordFactory()
            logging.setLogRecordFactory(self.factory)

    def release(self) -> None:
        if self.users == 0:
            return
        self.users -= 1
        if self.users == 0 and self.previous is not None:
            if logging.getLogRecordFactory() == self.factory:  # nobody installed one on top of ours
                logging.setLogRecordFactory(self.previous)
            self.previous = None

    def factory(self, *args, **kwargs) -> logging.LogRecord:
        record = (self.previous or logging.LogRecord)(*args, **kwargs)
        traced = _LOG_TAG.get()
        if traced is not None:  # formatted only when something is logged
            ids = [traced] if isinstance(traced, RequestTrace) else traced
            tag = "trace_id=" + ",".join(dict.fromkeys(f"{rt.trace_id:032x}" for rt in ids))
            try:
                record.msg, record.args = f"{record.getMessage()} {tag}", None
            except Exception:  # a malformed call: logging reports it when the record is emitted
                return record
            record.trace_id = tag  # for formatters that want it as a field
        return record


_log_tag = _LogTag()


# service and method are in the span name; every attribute is encoded and sent for every request
_GRPC = {"rpc.system": "grpc"}
_HTTP = {"http.request.method": "POST", "http.route": "/v2/models/{model}[/versions/{version}]/infer"}


# ---------------------------------------------------------------- per-request objects


class Incoming:
    """What a frontend hands the data plane in ``InferRequest.trace``: the caller's context."""

    __slots__ = ("parent", "parent_span", "name", "kind", "attributes", "start_ns", "stream")

    def __init__(self, parent, parent_span, name: str, kind, attributes: Mapping[str, Any],
                 stream: "StreamTrace | None" = None) -> None:
        self.parent = parent  # the extracted Context (what the sampler reads), or None
        self.parent_span = parent_span  # its SpanContext, or None when the caller sent none
        self.name = name
        self.kind = kind
        self.attributes = attributes
        self.start_ns = time.time_ns()
        self.stream = stream  # set for a request on a traced stream: the stream span is its parent


class RequestTrace:
    """A traced request past the data plane: its server span's ids, finished when the answer is ready.
    The queue and batch spans hang from ``span_id``."""

    __slots__ = ("emitter", "trace_id", "span_id", "trace_state", "parent_id", "parent_remote", "name",
                 "kind", "attributes", "start_ns", "queued_ns", "stream")

    def __init__(self, emitter, ids: tuple, parent_id: int, parent_remote: bool, incoming: Incoming,
                 attributes: dict) -> None:
        self.emitter = emitter
        self.trace_id, self.span_id, self.trace_state = ids
        self.parent_id, self.parent_remote = parent_id, parent_remote
        self.name, self.kind = incoming.name, incoming.kind
        self.attributes = attributes
        self.start_ns = incoming.start_ns
        self.queued_ns = 0
        self.stream = incoming.stream

    def child(self, name: str, attributes: dict | None, start: int, end: int, status=None) -> None:
        self.emitter.emit(name, _x.INTERNAL, self.trace_id, self.emitter.new_span_id(), self.trace_state,
                          self.span_id, False, attributes, start, end, status or _x.UNSET)

    def finish(self, status_code: str, message: str = "") -> None:
        attributes = self.attributes
        attributes["status"] = status_code
        if status_code == "OK":
            status = _x.OK
        else:
            status = _x.error(message)
            attributes["error.type"] = status_code
        self.emitter.emit(self.name, self.kind, self.trace_id, self.span_id, self.trace_state, self.parent_id,
                          self.parent_remote, attributes, self.start_ns, time.time_ns(), status)


class StreamTrace:
    """One span over a ModelStreamInfer stream. Traced or not is decided at its first request, by
    that request's model settings; then every request on it is traced, as the stream's children."""

    NAME = "inference.GRPCInferenceService/ModelStreamInfer"

    def __init__(self, tracing: "Tracing", parent, parent_span) -> None:
        self.tracing = tracing
        self.parent, self.parent_span = parent, parent_span
        self.start_ns = time.time_ns()
        self.decided = False
        self.ids: tuple | None = None  # (trace id, span id, trace state) once traced
        self.events: list = []
        self.failures = 0
        self.ended = False

    def child(self, model: str) -> Incoming | None:
        if not self.decided:
            self.decided = True
            tracing = self.tracing
            if tracing.on and tracing.settings.gate_for(model).admit(self.parent_span is not None):
                self.ids = tracing.emitter.root(self.parent, self.parent_span, self.NAME, _x.SERVER,
                                                dict(_GRPC))
        if self.ids is None:
            return None
        return Incoming(None, None, "infer", _x.INTERNAL, {}, stream=self)

    def responded(self, request_id: str, status: str) -> None:
        if self.ended:  # a request cancelled with its stream finished after it
            return
        self.failures += status != "OK"
        self.events.append(("response", time.time_ns(), {"request_id": request_id, "status": status}))

    def end(self) -> None:
        if self.ids is not None and not self.ended:
            trace_id, span_id, trace_state = self.ids
            parent = self.parent_span
            attributes = dict(_GRPC, responses=len(self.events), failed_responses=self.failures)
            self.tracing.emitter.emit(self.NAME, _x.SERVER, trace_id, span_id, trace_state,
                                      parent.span_id if parent is not None else 0, parent is not None,
                                      attributes, self.start_ns, time.time_ns(), _x.OK, events=self.events)
        self.ended = True


# ---------------------------------------------------------------- the facade


class Tracing:
    """Trace settings, the SDK pipeline (built when tracing is first on), and the request hooks."""

    def __init__(self, config: trace_config.TraceConfig | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config or trace_config.TraceConfig()
        self.env = env
        self.settings = TraceSettings(self.config)
        self.provider: Any = None
        self.emitter: Any = None
        self.on = False  # the hot-path check: some setting traces and the pipeline exists
        self._tagging = False  # this one holds the log tag (tracing.py's record factory)
        if self.settings.any_on():
            self._build()
        self.on = self.emitter is not None and self.settings.any_on()

    @classmethod
    def from_flags(cls, items: Sequence[str]) -> "Tracing":
        try:
            return cls(trace_config.parse(list(items)))
        except ValueError as exc:
            raise SystemExit(f"inferd: {exc}") from None

    def _build(self) -> None:
        if self.emitter is not None:
            return
        _load()
        self.provider, processors = trace_config.build_provider(self.config, __version__, self.env)
        # spans go out pre-encoded when the one exporter is inferd's OTLP/gRPC one (trace_export.py)
        fast = self.config.exporters == ["otlp"] and self.config.protocol == "grpc"
        self.emitter = _x.Emitter(self.provider, processors, __version__, fast=fast)
        _log_tag.acquire()
        self._tagging = True
        env = os.environ if self.env is None else self.env
        where = (self.config.url or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                 or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4317")
        if "otlp" not in self.config.exporters:
            where = "stdout"
        values = self.settings.values
        log.info("tracing on: %s via %s (%s), level %s, rate %s", ",".join(self.config.exporters), where,
                 self.config.protocol, values["trace_level"], values["trace_rate"])

    def shutdown(self) -> None:
        """Flush what is queued to the exporters (blocking: call it in a thread)."""
        self.on = False
        if self.provider is not None:
            self.provider.shutdown()
        if self._tagging:
            self._tagging = False
            _log_tag.release()

    # -- the trace extension ----------------------------------------------------------------

    def get_settings(self, model: str = "") -> dict[str, list[str]]:
        return self.settings.get(model)

    def update_settings(self, model: str,
                        changes: dict[str, list[str] | None] | None) -> dict[str, list[str]]:
        """Change settings (None: clear all of ``model``'s overrides); returns the new values."""
        if changes is None:
            self.settings.clear(model)
        else:
            self.settings.update(model, changes)
        if self.settings.any_on() and self.emitter is None:
            try:
                self._build()
            except ValueError as exc:  # e.g. OTLP/HTTP asked for but not installed
                raise ServingError(ErrorCode.UNAVAILABLE, f"tracing cannot start: {exc}") from None
        self.on = self.emitter is not None and self.settings.any_on()
        return self.settings.get(model)

    # -- frontends: extract the caller's context --------------------------------------------

    def _extract(self, carrier: dict[str, str]) -> tuple[Any, Any]:
        if not carrier:
            return None, None
        context = _x.propagator.extract(carrier)
        span = _x.span_of(context).get_span_context()
        return (context, span) if span.is_valid else (None, None)

    def from_grpc(self, metadata: Sequence[tuple[str, Any]] | None, stream: bool = False):
        """An Incoming (or, for a stream, a StreamTrace) from gRPC invocation metadata."""
        carrier = {k: v for k, v in metadata or () if k in _PROPAGATED and isinstance(v, str)}
        parent, span = self._extract(carrier)
        if stream:
            return StreamTrace(self, parent, span)
        return Incoming(parent, span, "inference.GRPCInferenceService/ModelInfer", _x.SERVER, _GRPC)

    def from_http(self, headers: Mapping[str, str]) -> Incoming:
        carrier = {k: headers[k] for k in _PROPAGATED if k in headers}
        parent, span = self._extract(carrier)
        return Incoming(parent, span, "POST /v2/models/{model}/infer", _x.SERVER, _HTTP)

    # -- data plane: the server span ---------------------------------------------------------

    def start(self, incoming: Incoming, model: str, request_id: str) -> RequestTrace | None:
        """The request's server span (open), or None when its settings or the sampler do not trace it."""
        if not self.on:
            return None
        attributes = {**incoming.attributes, "model_name": model, "request_id": request_id}
        stream = incoming.stream
        if stream is not None:  # inside a traced stream: always, as its child
            trace_id, parent_id, trace_state = stream.ids
            return RequestTrace(self.emitter, (trace_id, self.emitter.new_span_id(), trace_state), parent_id,
                                False, incoming, attributes)
        caller = incoming.parent_span
        if not self.settings.gate_for(model).admit(caller is not None):
            return None
        ids = self.emitter.root(incoming.parent, caller, incoming.name, incoming.kind, attributes)
        if ids is None:  # the sampler (OTEL_TRACES_SAMPLER, or the caller's flag) said no
            return None
        parent_id = caller.span_id if caller is not None else 0
        return RequestTrace(self.emitter, ids, parent_id, caller is not None, incoming, attributes)

    def begin(self, request) -> Any:
        """Open the request's server span: ``request.trace`` (an Incoming) becomes its RequestTrace, or
        None when it is not traced. Returns the log-tag token to hand to ``end``."""
        incoming, request.trace = request.trace, None
        rt = self.start(incoming, request.model_name, request.id)
        if rt is None:
            return None
        request.trace = rt
        return _LOG_TAG.set(rt)

    def end(self, request, token: Any, status: str = "OK", message: str = "", version: str = "") -> None:
        """Close the server span ``begin`` opened (when the request's final response is out)."""
        rt: RequestTrace = request.trace
        if token is not None:
            try:
                _LOG_TAG.reset(token)
            except ValueError:  # ended in another context (a stream's final arrives from a callback)
                pass
        if version:
            rt.attributes["model_version"] = version
        elif status != "OK" and request.model_version:  # the version asked for, when none answered
            rt.attributes["model_version"] = request.model_version
        rt.finish(status, message)
        stream = rt.stream
        if stream is not None:
            stream.responded(request.id, status)

    async def infer(self, call: Callable[[Any], Awaitable[Any]], request) -> Any:
        """Run ``call(request)`` (the data plane's unary inference) inside the request's server span."""
        token = self.begin(request)
        if request.trace is None:
            return await call(request)
        status, message, version = "OK", "", ""
        try:
            response = await call(request)
            version = response.model_version
            return response
        except ServingError as exc:
            status, message = exc.code.name, exc.message
            raise
        except asyncio.CancelledError:
            status, message = "CANCELLED", "the caller cancelled the request"
            raise
        except Exception as exc:
            status, message = "INTERNAL", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.end(request, token, status, message, version)


# ---------------------------------------------------------------- scheduler: queue and batch spans


def queue_failed(rt: RequestTrace, error: ServingError) -> None:
    """The queue span of a request that left the queue without running (timeout, unload)."""
    rt.child("queue", {"error.type": error.code.name}, rt.queued_ns, time.time_ns(), _x.error(error.message))


def run_batch(run: Callable[..., None], backend, job, model: str, instance: str) -> None:
    """``run(backend, job, model)`` in the instance thread, for a batch with traced members: its log
    lines name their trace ids, and when it started and ended is kept for ``batch_spans``."""
    traces: list[RequestTrace] = job.traces
    token = _LOG_TAG.set(traces)
    picked = time.time_ns()
    try:
        run(backend, job, model)
    finally:
        _LOG_TAG.reset(token)
        job.span_times = (picked, time.time_ns(), instance)


def batch_spans(job, model: str) -> None:
    """On the event loop, once a traced batch is done: each member's queue span, the batch span (a
    child of the first member's server span, linked to every member's), and compute inside it.

    Made here rather than in the instance thread: on this 2-core machine the same Python work ran
    several times slower in a second thread (the objects it touches live in the loop core's cache)."""
    traces: list[RequestTrace] = job.traces
    head = traces[0]
    em = head.emitter
    picked, end, instance = job.span_times
    internal, trace_id, state = _x.INTERNAL, head.trace_id, head.trace_state
    new_id, unset = em.new_span_id, _x.UNSET
    spans = [("queue", internal, rt.trace_id, new_id(), rt.trace_state, rt.span_id, False, None,
              rt.queued_ns or picked, picked, unset, ()) for rt in traces]
    timing = job.timing
    if timing is not None:
        start = picked + timing.input_ns
        stop = start + timing.infer_ns
    else:  # failed: no breakdown was measured
        start, stop = picked, end
    status = _x.UNSET
    attributes = {"model_name": model, "instance": instance, "batch_size": sum(job.sizes),
                  "batch_requests": len(job.sizes)}
    if job.error is not None:
        status = _x.error(job.error.message)
        attributes["error.type"] = job.error.code.name
    elif job.errors is not None:
        attributes["failed_requests"] = sum(e is not None for e in job.errors)
    batch = new_id()
    links = [(rt.trace_id, rt.span_id) for rt in traces]
    spans.append(("compute", internal, trace_id, new_id(), state, batch, False, None, start, stop, status,
                  ()))
    spans.append(("batch", internal, trace_id, batch, state, head.span_id, False, attributes, picked, end,
                  status, links))
    em.emit_all(spans)  # one queued item for the batch's spans


# ---------------------------------------------------------------- repository: load / unload spans


def model_span(operation: str):
    """Decorate a RepositoryManager coroutine ``(self, name, ...)`` with a ``model <operation>`` span
    when ``self.tracing`` traces (global level not OFF); it ends with the versions serving after."""

    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self, name: str, *args, **kwargs):
            tracing: Tracing | None = self.tracing
            if tracing is None or not tracing.on or not tracing.settings.gate.on:
                return await method(self, name, *args, **kwargs)
            em = tracing.emitter
            attributes: dict[str, Any] = {"model_name": name}
            ids = em.root(None, None, f"model {operation}", _x.INTERNAL, attributes)
            if ids is None:
                return await method(self, name, *args, **kwargs)
            start, status = time.time_ns(), _x.OK
            try:
                return await method(self, name, *args, **kwargs)
            except ServingError as exc:
                status = _x.error(exc.message)
                attributes["error.type"] = exc.code.name
                raise
            except BaseException as exc:
                status = _x.error(f"{type(exc).__name__}: {exc}")
                attributes["error.type"] = type(exc).__name__
                raise
            finally:
                attributes["model_versions"] = [str(mv.version) for mv in self.ready_versions(name)]
                em.emit(f"model {operation}", _x.INTERNAL, *ids, 0, False, attributes, start, time.time_ns(),
                        status)

        return wrapper

    return decorate
