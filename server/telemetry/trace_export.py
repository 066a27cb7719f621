"""The span pipeline's fast path: finished spans handed straight to the span processors, and the
OTLP/gRPC exporter with the cheaper encoding of otlp_encode.py.

Why (measured on this 2-core machine, CPython 3.11, SDK 1.45): ``Tracer.start_span`` + ``end`` costs
~45 us per span and the SDK's OTLP encoding ~65 us per span; a request makes 2-4 spans (server,
queue, and its share of batch + compute), so the stock path added ~70% server CPU to an ``add_sub``
request (~1000 us). Every span here is complete when it is made (the queue, batch and compute spans
are recorded after the fact in the instance thread, the server span when the answer is ready), so
it is built directly as the SDK's finished-span type, ``ReadableSpan`` (a few us), and handed to the
provider's BatchSpanProcessors (``on_end``). Sampling still goes through the provider's sampler
(the two default samplers are decided inline) and ids come from its id generator.
"""

from __future__ import annotations

from typing import Any, Sequence

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from . import otlp_encode

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET = Status(StatusCode.UNSET)
OK = Status(StatusCode.OK)
otlp_encode.constant_status(UNSET)
otlp_encode.constant_status(OK)


class FinishedSpan(ReadableSpan):
    """A complete span made by the Emitter: an ordinary ReadableSpan for any exporter, plus ``encoded``,
    its OTLP bytes, written by the thread that made it while its objects are still in that core's
    cache (encoding the same span later in the export thread measured 2-3x slower)."""

    encoded: bytes | None = None


class Emitter:
    """Makes finished spans and hands them to the processors the pipeline was built with."""

    def __init__(self, provider: TracerProvider, processors: Sequence[Any], version: str,
                 encode: bool = False) -> None:
        self.resource = provider.resource
        self.scope = InstrumentationScope("inferd", version)
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.processors = tuple(processors)
        self.encode = encode  # pre-encode (FinishedSpan.encoded): a FastOTLPSpanExporter is in the pipeline
        # the default samplers decide without a call: always_on, and parentbased_always_on (the
        # caller's sampled flag decides when there is a caller; our parents are always remote)
        self._always = self.sampler is sampling.ALWAYS_ON
        self._parent_based = self.sampler is sampling.DEFAULT_ON

    def root(self, parent: Context | None, parent_span: SpanContext | None, name: str, kind: SpanKind,
             attributes: dict) -> SpanContext | None:
        """A new span's context under ``parent`` (the caller's), or None when the sampler drops it."""
        trace_id = parent_span.trace_id if parent_span is not None else self.ids.generate_trace_id()
        if self._always or self._parent_based:
            if parent_span is None:
                return SpanContext(trace_id, self.ids.generate_span_id(), False, SAMPLED)
            if self._always or parent_span.trace_flags.sampled:
                return SpanContext(trace_id, self.ids.generate_span_id(), False, SAMPLED, parent_span.trace_state)
            return None
        result = self.sampler.should_sample(parent, trace_id, name, kind, attributes)
        if not result.decision.is_sampled():
            return None
        if result.attributes:
            attributes.update(result.attributes)
        return SpanContext(trace_id, self.ids.generate_span_id(), False, SAMPLED, result.trace_state)

    def child(self, parent: SpanContext) -> SpanContext:
        return SpanContext(parent.trace_id, self.ids.generate_span_id(), False, SAMPLED, parent.trace_state)

    def emit(self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
             attributes: dict | None, start: int, end: int, status: Status = UNSET,
             links: Sequence[Link] = (), events: Sequence[Any] = ()) -> None:
        span = FinishedSpan(name, context, parent, self.resource, attributes, events, links, kind, None, status,
                            start, end, self.scope)
        if self.encode:
            span.encoded = otlp_encode.span((name, context, parent, kind, attributes, events, links, status, start,
                                             end))
        for processor in self.processors:
            processor.on_end(span)


def error(message: str) -> Status:
    return Status(StatusCode.ERROR, message)


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter (endpoint, headers, TLS, retries as configured by OTEL_EXPORTER_OTLP_*)
    with the cheaper encoding above."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return otlp_encode.encode(data)
