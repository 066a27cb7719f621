"""The span pipeline's emitting end: spans are made complete, with explicit ids and parents, and handed
to the provider's BatchSpanProcessors; the OTLP/gRPC exporter with the encoding of otlp_encode.py.

Why not ``Tracer.start_span``: measured on this 2-core machine (CPython 3.11, SDK 1.45), a span
through the tracer cost ~45 us and its stock OTLP encoding ~65 us, and a request makes 2-4 spans
(server, queue, its share of batch + compute): tracing added ~70% server CPU to an ``add_sub``
request (~800 us). Every span here is complete when it is made (queue, batch and compute are
recorded after the batch ran, the server span when the answer is ready), so nothing needs a live
span object. When the only exporter is OTLP/gRPC (``fast``), a span is encoded at once, by the thread
that made it, and queued as ``EncodedSpan`` (a ``bytes``: no object graph for the garbage collector
to walk while it waits for export); otherwise it is an SDK ``ReadableSpan`` that any exporter takes.
Sampling goes through the provider's sampler (the two default samplers are decided inline) and ids
come from its id generator.
"""

from __future__ import annotations

from typing import Any, Sequence

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from . import otlp_encode

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET = Status(StatusCode.UNSET)
OK = Status(StatusCode.OK)
otlp_encode.constant_status(UNSET)
otlp_encode.constant_status(OK)


class EncodedSpan(bytes):
    """One or more spans as encoded ``ScopeSpans.spans`` fields (each framed: tag, length, Span). The
    spans of one batch (its queue spans, batch and compute) travel as one item, so the processor
    queues one object for them. ``context`` is what BatchSpanProcessor.on_end reads (sampled); the
    per-pipeline subclass made by the Emitter carries the resource and scope."""

    __slots__ = ()
    context = SpanContext(1, 1, False, SAMPLED)
    resource: Any = None
    instrumentation_scope: Any = None


def error(message: str) -> Status:
    return Status(StatusCode.ERROR, message)


class Emitter:
    """Makes finished spans from ids and times and hands them to the pipeline's processors."""

    def __init__(self, provider: TracerProvider, processors: Sequence[Any], version: str,
                 fast: bool = False) -> None:
        self.resource = provider.resource
        self.scope = InstrumentationScope("inferd", version)
        self.sampler = provider.sampler
        self.new_span_id = provider.id_generator.generate_span_id
        self.new_trace_id = provider.id_generator.generate_trace_id
        self.processors = tuple(processors)
        self.fast = fast
        self._record = type("EncodedSpan", (EncodedSpan,), {
            "__slots__": (), "resource": self.resource, "instrumentation_scope": self.scope})
        # the default samplers decide without a call: always_on, and parentbased_always_on (the
        # caller's sampled flag decides when there is a caller; callers are always remote here)
        self._always = self.sampler is sampling.ALWAYS_ON
        self._parent_based = self.sampler is sampling.DEFAULT_ON

    def root(self, parent: Context | None, parent_span: SpanContext | None, name: str, kind: SpanKind,
             attributes: dict) -> tuple[int, int, Any] | None:
        """(trace id, span id, trace state) of a new span under the caller's ``parent`` (or a new
        trace), or None when the sampler drops it."""
        trace_id = parent_span.trace_id if parent_span is not None else self.new_trace_id()
        if self._always or self._parent_based:
            if parent_span is None:
                return trace_id, self.new_span_id(), DEFAULT_TRACE_STATE
            if self._always or parent_span.trace_flags.sampled:
                return trace_id, self.new_span_id(), parent_span.trace_state
            return None
        result = self.sampler.should_sample(parent, trace_id, name, kind, attributes)
        if not result.decision.is_sampled():
            return None
        if result.attributes:
            attributes.update(result.attributes)
        return trace_id, self.new_span_id(), result.trace_state or DEFAULT_TRACE_STATE

    def emit(self, name: str, kind: SpanKind, trace_id: int, span_id: int, trace_state: Any, parent_id: int,
             parent_remote: bool, attributes: dict | None, start: int, end: int, status: Status = UNSET,
             links: Sequence[tuple[int, int]] = (), events: Sequence[tuple[str, int, dict]] = ()) -> None:
        """One finished span; ``parent_id`` 0 for a root; ``links`` (trace id, span id) of local
        spans; ``events`` (name, time, attributes)."""
        if self.fast:
            record = self._record(otlp_encode.framed(
                trace_id, span_id, trace_state, parent_id, parent_remote, name, kind, attributes,
                events, [(t, s, False, None) for t, s in links] if links else (), status, start, end))
            for processor in self.processors:
                processor.on_end(record)
        else:
            self._emit_readable(name, kind, trace_id, span_id, trace_state, parent_id, parent_remote,
                                attributes, start, end, status, links, events)

    def emit_all(self, spans: Sequence[tuple]) -> None:
        """Several finished spans, each ``emit``'s first twelve arguments (no events), queued as one
        item when they are pre-encoded."""
        if not self.fast:
            for args in spans:
                self._emit_readable(*args, ())
            return
        framed = otlp_encode.framed
        record = self._record(b"".join(
            framed(t, s, ts, p, remote, name, kind, attributes, (),
                   [(lt, ls, False, None) for lt, ls in links] if links else (), status, start, end)
            for name, kind, t, s, ts, p, remote, attributes, start, end, status, links in spans))
        for processor in self.processors:
            processor.on_end(record)

    def _emit_readable(self, name, kind, trace_id, span_id, trace_state, parent_id, parent_remote, attributes,
                       start, end, status, links, events) -> None:
        context = SpanContext(trace_id, span_id, False, SAMPLED, trace_state)
        parent = SpanContext(trace_id, parent_id, parent_remote, SAMPLED, trace_state) if parent_id else None
        span = ReadableSpan(name, context, parent, self.resource, attributes,
                            tuple(Event(n, a, t) for n, t, a in events),
                            [Link(SpanContext(t, s, False, SAMPLED)) for t, s in links], kind, None,
                            status, start, end, self.scope)
        for processor in self.processors:
            processor.on_end(span)


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter (endpoint, headers, TLS, retries as configured by OTEL_EXPORTER_OTLP_*)
    with otlp_encode's encoding; it takes EncodedSpans and any ReadableSpan."""

    def _translate_data(self, data: Sequence[Any]) -> ExportTraceServiceRequest:
        return otlp_encode.encode(data)
