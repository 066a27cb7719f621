"""OTLP trace encoding straight to protobuf wire bytes (opentelemetry/proto/trace/v1/trace.proto).

The exporter's stock encoder builds one protobuf object per span, attribute and value through
Python calls (~65 us per span here); writing the wire format directly costs a few us, and the
repeated parts (attribute key/value pairs such as ``model_name``, the resource, the scope) are
encoded once and reused. ``encode`` returns the same message as the SDK's ``encode_spans``
(tests/test_tracing.py compares them field for field).
"""

from __future__ import annotations

import struct
from typing import Any, Mapping, Sequence

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import SpanKind
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4,
         SpanKind.CONSUMER: 5}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # SpanFlags, as the SDK's encoder sets them
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_TIMES = struct.Struct("<BQBQ").pack  # start_time_unix_nano (7) and end_time_unix_nano (8), fixed64
_NO_DROPS = (0, 0, 0)
_CACHE_LIMIT = 4096  # encoded key/value pairs kept (request ids make new ones; constants repeat)
_kv_cache: dict[tuple, bytes] = {}


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag + _varint(len(payload)) + payload


def _any(value: Any) -> bytes:
    """An AnyValue body (the oneof is always set, even to an empty string, as the SDK does)."""
    if value is None:
        return b""
    if isinstance(value, str):
        return _ld(b"\x0a", value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _ld(b"\x3a", value)
    if isinstance(value, Mapping):
        return _ld(b"\x32", b"".join(_ld(b"\x0a", _kv(str(k), v)) for k, v in value.items()))
    if isinstance(value, Sequence):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any(v)) for v in value))
    raise TypeError(f"invalid attribute value type {type(value).__name__}: {value!r}")


def _kv(key: str, value: Any) -> bytes:
    """A KeyValue body, cached for hashable values."""
    hashable = isinstance(value, (str, int, float, bytes)) or value is None
    if hashable:
        found = _kv_cache.get((key, type(value), value))
        if found is not None:
            return found
    body = _ld(b"\x0a", key.encode()) + _ld(b"\x12", _any(value))
    if hashable:
        if len(_kv_cache) >= _CACHE_LIMIT:
            _kv_cache.clear()
        _kv_cache[(key, type(value), value)] = body
    return body


def _attributes(tag: bytes, attributes) -> list[bytes]:
    return [_ld(tag, _kv(k, v)) for k, v in attributes.items()] if attributes else []


def _state(trace_state) -> str:
    return ",".join(f"{k}={v}" for k, v in trace_state.items())


# the pieces every span repeats, encoded once (keyed by identity where enum hashing is slow)
_KINDS = {id(kind): b"\x30" + _varint(code) for kind, code in _KIND.items()}
_FLAG_VALUES = {False: _FIXED32(_HAS_IS_REMOTE), True: _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)}
_FLAGS = {remote: b"\x85\x01" + value for remote, value in _FLAG_VALUES.items()}  # Span.flags (16)
_LINK_FLAGS = {remote: b"\x35" + value for remote, value in _FLAG_VALUES.items()}  # Link.flags (6)
_names: dict[str, bytes] = {}
_str_attrs: dict[tuple, bytes] = {}
_int_attrs: dict[tuple, bytes] = {}
_statuses: dict[int, bytes] = {}


def constant_status(status) -> None:
    """Remember the encoding of a Status object that lives as long as the process (UNSET, OK)."""
    _statuses[id(status)] = _status(status)


def _status(status) -> bytes:
    code = status.status_code.value
    body = (_ld(b"\x12", status.description.encode()) if status.description else b"") + \
        (b"\x18" + _varint(code) if code else b"")
    return _ld(b"\x7a", body)  # present even when UNSET, as the SDK's encoder has it


def _span_attr(key: str, value: Any) -> bytes:
    """A span attribute field; str and int values are cached, one cache per type (True == 1), and a
    request id adds one entry."""
    cache = _str_attrs if value.__class__ is str else _int_attrs if value.__class__ is int else None
    if cache is None:
        return _ld(b"\x4a", _kv(key, value))
    found = cache.get((key, value))
    if found is None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        found = cache[(key, value)] = _ld(b"\x4a", _kv(key, value))
    return found


def span(trace_id: int, span_id: int, trace_state: Any, parent_id: int, parent_remote: bool, name: str,
         kind: SpanKind, attributes: Any, events: Sequence[tuple], links: Sequence[tuple], status: Any,
         start: int, end: int, dropped: tuple[int, int, int] = _NO_DROPS) -> bytes:
    """A Span body. ``parent_id`` 0: a root; ``events`` (name, time, attributes); ``links``
    (trace id, span id, remote, attributes)."""
    parts = [b"\x0a\x10", trace_id.to_bytes(16, "big"), b"\x12\x08", span_id.to_bytes(8, "big")]
    if trace_state is not DEFAULT_TRACE_STATE and trace_state:
        parts.append(_ld(b"\x1a", _state(trace_state).encode()))
    if parent_id:
        parts += (b"\x22\x08", parent_id.to_bytes(8, "big"))
    encoded_name = _names.get(name)
    if encoded_name is None:
        if len(_names) >= _CACHE_LIMIT:
            _names.clear()
        encoded_name = _names[name] = _ld(b"\x2a", name.encode())
    parts += (encoded_name, _KINDS[id(kind)], _TIMES(0x39, start, 0x41, end))
    if attributes:
        for key, value in attributes.items():
            found = _str_attrs.get((key, value)) if value.__class__ is str else None
            parts.append(found if found is not None else _span_attr(key, value))
    for event_name, timestamp, event_attributes in events:
        body = b"\x09" + _FIXED64(timestamp) + _ld(b"\x12", event_name.encode())
        parts.append(_ld(b"\x5a", body + b"".join(_attributes(b"\x1a", event_attributes))))
    for link_trace, link_span, remote, link_attributes in links:
        # (no trace_state on links: the SDK's encoder leaves it out too)
        body = [b"\x0a\x10", link_trace.to_bytes(16, "big"), b"\x12\x08", link_span.to_bytes(8, "big")]
        body += _attributes(b"\x22", link_attributes)
        body.append(_LINK_FLAGS[remote])
        parts.append(_ld(b"\x6a", b"".join(body)))
    parts.append(_statuses.get(id(status)) or _status(status))
    if dropped is not _NO_DROPS:
        for tag, count in zip((b"\x50", b"\x60", b"\x70"), dropped):
            if count:
                parts += (tag, _varint(count))
    parts.append(_FLAGS[parent_remote])
    return b"".join(parts)


def framed(*args) -> bytes:
    """``span(*args)`` as a ``ScopeSpans.spans`` field (tag and length in front)."""
    return _ld(b"\x12", span(*args))


def _readable(s) -> bytes:
    """Any SDK ReadableSpan (console + OTLP pipelines, or spans from a tracer)."""
    ctx, parent = s.context, s.parent
    return span(ctx.trace_id, ctx.span_id, ctx.trace_state, parent.span_id if parent is not None else 0,
                parent is not None and parent.is_remote, s.name, s.kind, s.attributes,
                [(e.name, e.timestamp, e.attributes) for e in s.events],
                [(k.context.trace_id, k.context.span_id, k.context.is_remote, k.attributes) for k in s.links],
                s.status, s.start_time, s.end_time, (s.dropped_attributes, s.dropped_events, s.dropped_links))


def _resource(resource) -> bytes:
    return b"".join(_attributes(b"\x0a", resource.attributes))


def _scope(scope) -> bytes:
    body = _ld(b"\x0a", scope.name.encode())
    if scope.version:
        body += _ld(b"\x12", scope.version.encode())
    return body + b"".join(_attributes(b"\x1a", scope.attributes))


def encode_bytes(spans: Sequence[Any]) -> bytes:
    """An ExportTraceServiceRequest, serialized: spans (EncodedSpans or ReadableSpans) grouped by
    resource, then scope (by identity: this server's spans share one of each)."""
    resources: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    for s in spans:
        resource, scope = s.resource, s.instrumentation_scope
        entry = resources.get(id(resource))
        if entry is None:
            entry = resources[id(resource)] = (resource, {})
        group = entry[1].get(id(scope))
        if group is None:
            group = entry[1][id(scope)] = (scope, [])
        # an EncodedSpan (trace_export.py) is already one or more framed spans
        group[1].append(s if isinstance(s, bytes) else _ld(b"\x12", _readable(s)))
    out = []
    for resource, scopes in resources.values():
        body = [_ld(b"\x0a", _resource(resource))]
        for scope, encoded in scopes.values():
            scope_body = [_ld(b"\x0a", _scope(scope) if scope is not None else b"")] + encoded
            if scope is not None and scope.schema_url:
                scope_body.append(_ld(b"\x1a", scope.schema_url.encode()))
            body.append(_ld(b"\x12", b"".join(scope_body)))
        if resource.schema_url:
            body.append(_ld(b"\x1a", resource.schema_url.encode()))
        out.append(_ld(b"\x0a", b"".join(body)))
    return b"".join(out)


def encode(spans: Sequence[Any]) -> ExportTraceServiceRequest:
    """The request message for the exporter (parsed back from the bytes: C code, cheap)."""
    return ExportTraceServiceRequest.FromString(encode_bytes(spans))
