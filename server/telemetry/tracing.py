"""OpenTelemetry tracing of the request path: server, queue, batch and compute spans, model load spans.

Off by default. When off, each hook is one attribute or ``None`` check (``tracing.on`` in the
frontends, ``request.trace is None`` past them) and the SDK is never imported. When on:

    frontend    Incoming: the caller's W3C context (traceparent/tracestate), the span's start time
    data plane  server span (model_name, model_version, request_id, status; error status + message),
                the child of the caller's span; RequestTrace travels with the request
    scheduler   queue span per request (enqueue -> an instance picks the batch up); one batch span
                per executed batch (batch_size, links to every member's server span) with the
                backend's compute span inside; all made in the instance thread from explicit
                contexts: nothing relies on an implicit current span, across threads or otherwise
    repository  a span per model load / unload

Log lines emitted while a traced request is handled (on the loop, or by the instance thread that
runs its batch) end with ``trace_id=<32 hex>``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from typing import Any, Awaitable, Callable, Mapping, Sequence

from server import __version__
from server.core.errors import ErrorCode, ServingError

from . import trace_config
from .trace_settings import TraceSettings

log = logging.getLogger(__name__)

_PROPAGATED = ("traceparent", "tracestate")
# "trace_id=..." of the request (or batch) being handled in this task / thread; None: untraced
_LOG_TAG: contextvars.ContextVar[str | None] = contextvars.ContextVar("inferd_trace", default=None)
_otel: Any = None  # the OpenTelemetry API names, imported when a pipeline is first built


def _load_otel() -> Any:
    global _otel
    if _otel is None:
        from types import SimpleNamespace

        from opentelemetry import trace as api
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _otel = SimpleNamespace(
            api=api, SERVER=api.SpanKind.SERVER, INTERNAL=api.SpanKind.INTERNAL, Link=api.Link,
            ERROR=api.Status(api.StatusCode.ERROR), OK=api.Status(api.StatusCode.OK),
            Status=api.Status, StatusCode=api.StatusCode, in_context=api.set_span_in_context,
            propagator=TraceContextTextMapPropagator(),
        )
    return _otel


# ---------------------------------------------------------------- log correlation


def _install_log_tag() -> None:
    """Append the handled request's trace id to every log record made while it is handled."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_inferd_trace", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        tag = _LOG_TAG.get()
        if tag is not None:
            try:
                record.msg, record.args = f"{record.getMessage()} {tag}", None
            except Exception:  # a malformed call: logging reports it when the record is emitted
                return record
            record.trace_id = tag  # for formatters that want it as a field
        return record

    factory._inferd_trace = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


# ---------------------------------------------------------------- per-request objects


class Incoming:
    """What a frontend hands the data plane in ``InferRequest.trace``: the caller's context."""

    __slots__ = ("parent", "remote", "name", "kind", "attributes", "start_ns", "stream")

    def __init__(self, parent, remote: bool, name: str, kind, attributes: Mapping[str, Any],
                 stream: "StreamTrace | None" = None) -> None:
        self.parent = parent
        self.remote = remote
        self.name = name
        self.kind = kind
        self.attributes = attributes
        self.start_ns = time.time_ns()
        self.stream = stream


class RequestTrace:
    """A traced request past the data plane: its server span and the context its children hang from."""

    __slots__ = ("tracer", "span", "context", "queued_ns", "tag")

    def __init__(self, tracer, span) -> None:
        self.tracer = tracer
        self.span = span
        self.context = _otel.in_context(span)
        self.queued_ns = 0
        self.tag = f"trace_id={span.get_span_context().trace_id:032x}"


class StreamTrace:
    """One span over a whole ModelStreamInfer stream; its requests' spans are its children. Traced
    or not is decided once, at the first request, by that request's model settings."""

    def __init__(self, tracing: "Tracing", parent, remote: bool) -> None:
        self.tracing = tracing
        self.parent, self.remote = parent, remote
        self.start_ns = time.time_ns()
        self.decided = False
        self.span = None
        self.context = None
        self.responses = self.failures = 0

    def child(self, model: str) -> Incoming | None:
        if not self.decided:
            self.decided = True
            tracing = self.tracing
            if tracing.on and tracing.settings.gate_for(model).admit(self.remote):
                span = tracing.tracer.start_span(
                    "inference.GRPCInferenceService/ModelStreamInfer", context=self.parent, kind=_otel.SERVER,
                    start_time=self.start_ns, attributes=_GRPC_STREAM)
                if span.is_recording():
                    self.span, self.context = span, _otel.in_context(span)
        if self.span is None:
            return None
        return Incoming(self.context, True, "infer", _otel.INTERNAL, {}, stream=self)

    def responded(self, request_id: str, status: str) -> None:
        self.responses += 1
        self.failures += status != "OK"
        self.span.add_event("response", {"request_id": request_id, "status": status})

    def end(self) -> None:
        if self.span is not None:
            self.span.set_attribute("responses", self.responses)
            self.span.set_attribute("failed_responses", self.failures)
            self.span.end()


_GRPC = {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer"}
_GRPC_STREAM = {**_GRPC, "rpc.method": "ModelStreamInfer"}
_HTTP = {"http.request.method": "POST", "http.route": "/v2/models/{model}[/versions/{version}]/infer"}


# ---------------------------------------------------------------- the facade


class Tracing:
    """Trace settings, the SDK pipeline (built when tracing is first on), and the request hooks."""

    def __init__(self, config: trace_config.TraceConfig | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config or trace_config.TraceConfig()
        self.env = env
        self.settings = TraceSettings(self.config)
        self.provider: Any = None
        self.tracer: Any = None
        self.on = False  # the hot-path check: some setting traces and the pipeline exists
        _install_log_tag()
        if self.settings.any_on():
            self._build()
        self.on = self.tracer is not None and self.settings.any_on()

    @classmethod
    def from_flags(cls, items: Sequence[str]) -> "Tracing":
        try:
            return cls(trace_config.parse(list(items)))
        except ValueError as exc:
            raise SystemExit(f"inferd: {exc}") from None

    def _build(self) -> None:
        if self.tracer is not None:
            return
        _load_otel()
        self.provider = trace_config.build_provider(self.config, __version__, self.env)
        self.tracer = self.provider.get_tracer("inferd", __version__)
        log.info("tracing on: %s exporter(s) %s, level %s, rate %s", self.config.protocol,
                 ",".join(self.config.exporters), self.settings.values["trace_level"],
                 self.settings.values["trace_rate"])

    def shutdown(self) -> None:
        """Flush what is queued to the exporters (blocking: call it in a thread)."""
        self.on = False
        if self.provider is not None:
            self.provider.shutdown()

    # -- the trace extension ----------------------------------------------------------------

    def get_settings(self, model: str = "") -> dict[str, list[str]]:
        return self.settings.get(model)

    def update_settings(self, model: str, changes: dict[str, list[str] | None] | None) -> dict[str, list[str]]:
        """Change settings (None: clear all of ``model``'s overrides); returns the new values."""
        if changes is None:
            self.settings.clear(model)
        else:
            self.settings.update(model, changes)
        if self.settings.any_on() and self.tracer is None:
            try:
                self._build()
            except ValueError as exc:  # e.g. OTLP/HTTP asked for but not installed
                raise ServingError(ErrorCode.UNAVAILABLE, f"tracing cannot start: {exc}") from None
        self.on = self.tracer is not None and self.settings.any_on()
        return self.settings.get(model)

    # -- frontends: extract the caller's context --------------------------------------------

    def _extract(self, carrier: dict[str, str]) -> tuple[Any, bool]:
        if not carrier:
            return None, False
        context = _otel.propagator.extract(carrier)
        remote = _otel.api.get_current_span(context).get_span_context().is_valid
        return (context, True) if remote else (None, False)

    def from_grpc(self, metadata: Sequence[tuple[str, Any]] | None, stream: bool = False):
        """An Incoming (or, for a stream, a StreamTrace) from gRPC invocation metadata."""
        carrier = {k: v for k, v in metadata or () if k in _PROPAGATED and isinstance(v, str)}
        parent, remote = self._extract(carrier)
        if stream:
            return StreamTrace(self, parent, remote)
        return Incoming(parent, remote, "inference.GRPCInferenceService/ModelInfer", _otel.SERVER, _GRPC)

    def from_http(self, headers: Mapping[str, str]) -> Incoming:
        carrier = {k: headers[k] for k in _PROPAGATED if k in headers}
        parent, remote = self._extract(carrier)
        return Incoming(parent, remote, "POST /v2/models/{model}/infer", _otel.SERVER, _HTTP)

    # -- data plane: the server span ---------------------------------------------------------

    def start(self, incoming: Incoming, model: str, request_id: str) -> RequestTrace | None:
        """The request's server span, or None when its settings do not trace it."""
        if not self.on:
            return None
        if incoming.stream is None and not self.settings.gate_for(model).admit(incoming.remote):
            return None
        attributes = dict(incoming.attributes)
        attributes["model_name"] = model
        attributes["request_id"] = request_id
        span = self.tracer.start_span(incoming.name, context=incoming.parent, kind=incoming.kind,
                                      attributes=attributes, start_time=incoming.start_ns)
        if not span.is_recording():  # the sampler (OTEL_TRACES_SAMPLER or the caller's flag) said no
            return None
        return RequestTrace(self.tracer, span)

    async def infer(self, call: Callable[[Any], Awaitable[Any]], request) -> Any:
        """Run ``call(request)`` (the data plane's inference) inside the request's server span."""
        incoming, request.trace = request.trace, None
        rt = self.start(incoming, request.model_name, request.id)
        if rt is None:
            return await call(request)
        request.trace = rt
        span = rt.span
        token = _LOG_TAG.set(rt.tag)
        status = "OK"
        try:
            response = await call(request)
            span.set_attribute("model_version", response.model_version)
            span.set_status(_otel.OK)
            return response
        except ServingError as exc:
            status = exc.code.name
            _fail(span, status, exc.message)
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            _fail(span, status, "the caller cancelled the request")
            raise
        except Exception as exc:
            status = "INTERNAL"
            _fail(span, status, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            _LOG_TAG.reset(token)
            span.set_attribute("status", status)
            if status != "OK" and request.model_version:  # the version asked for, when none answered
                span.set_attribute("model_version", request.model_version)
            span.end()
            if incoming.stream is not None:
                incoming.stream.responded(request.id, status)


def _fail(span, status: str, message: str) -> None:
    span.set_status(_otel.Status(_otel.StatusCode.ERROR, message))
    span.set_attribute("error.type", status)


# ---------------------------------------------------------------- scheduler: queue and batch spans


def queue_failed(rt: RequestTrace, error: ServingError) -> None:
    """The queue span of a request that left the queue without running (timeout, unload)."""
    span = rt.tracer.start_span("queue", context=rt.context, start_time=rt.queued_ns)
    _fail(span, error.code.name, error.message)
    span.end()


def run_batch(run: Callable[..., None], backend, job, model: str, instance: str) -> None:
    """``run(backend, job, model)`` (the instance thread's batch execution) with its spans: each
    member's queue span, the batch span linked to every member's server span, compute inside it."""
    traces: list[RequestTrace] = job.traces
    head = traces[0]
    tracer = head.tracer
    picked = time.time_ns()
    for rt in traces:
        tracer.start_span("queue", context=rt.context, start_time=rt.queued_ns or picked).end(picked)
    links = [_otel.Link(rt.span.get_span_context()) for rt in traces]
    batch = tracer.start_span("batch", context=head.context, links=links, start_time=picked, attributes={
        "model_name": model, "instance": instance, "batch_size": sum(job.sizes), "batch_requests": len(job.sizes)})
    token = _LOG_TAG.set(head.tag if len(traces) == 1 else "trace_id=" + ",".join(
        dict.fromkeys(rt.tag[9:] for rt in traces)))
    try:
        run(backend, job, model)
    finally:
        _LOG_TAG.reset(token)
    end = time.time_ns()
    timing = job.timing
    start, stop = (picked + timing.input_ns, picked + timing.input_ns + timing.infer_ns) if timing else (picked, end)
    compute = tracer.start_span("compute", context=_otel.in_context(batch), start_time=start,
                                attributes={"model_name": model, "batch_size": timing.batch_size if timing else 0})
    if job.error is not None:
        for span in (compute, batch):
            _fail(span, job.error.code.name, job.error.message)
    elif job.errors is not None:
        failed = sum(e is not None for e in job.errors)
        batch.set_attribute("failed_requests", failed)
    compute.end(stop)
    batch.end(end)


# ---------------------------------------------------------------- repository: load / unload spans


def model_span(operation: str):
    """Decorate a RepositoryManager coroutine ``(self, name, ...)`` with a ``model <operation>`` span
    when ``self.tracing`` is on; the span ends with the versions that serve afterwards."""

    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self, name: str, *args, **kwargs):
            tracing: Tracing | None = self.tracing
            if tracing is None or not tracing.on or not tracing.settings.gate.on:
                return await method(self, name, *args, **kwargs)
            span = tracing.tracer.start_span(f"model {operation}", attributes={"model_name": name})
            try:
                result = await method(self, name, *args, **kwargs)
                span.set_status(_otel.OK)
                return result
            except ServingError as exc:
                _fail(span, exc.code.name, exc.message)
                raise
            except BaseException as exc:
                _fail(span, type(exc).__name__, str(exc))
                raise
            finally:
                versions = [str(mv.version) for mv in self.ready_versions(name)]
                span.set_attribute("model_versions", versions)
                span.end()

        return wrapper

    return decorate
