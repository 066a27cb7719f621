"""The OpenTelemetry SDK internals inferd relies on are still there, as pinned in pyproject.toml.

server/telemetry/trace_export.py overrides ``_translate_data``, a private method of the OTLP/gRPC
exporter, so that spans encoded at once (otlp_encode.py) go out without the SDK's encoder. A new
SDK release may rename it, change its arguments or stop calling it; then these tests fail and say
what changed, instead of the server silently exporting nothing (or the SDK's encoding of bytes).
"""

from __future__ import annotations

import inspect
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from tests.harness import ROOT

_EXPORTER = "opentelemetry-exporter-otlp-proto-grpc"
_WHAT = ("server/telemetry/trace_export.FastOTLPSpanExporter overrides the private "
         "OTLPSpanExporter._translate_data")


def _pins() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    return {r.name: r for r in requirements if r.name.startswith("opentelemetry-")}


@pytest.mark.parametrize("package",
                         ["opentelemetry-sdk", _EXPORTER, "opentelemetry-exporter-otlp-proto-http"])
def test_installed_sdk_is_the_pinned_one(package):
    pin = _pins()[package]
    installed = metadata.version(package)
    assert pin.specifier and pin.specifier.contains(installed), (
        f"{package} {installed} is installed but pyproject.toml pins '{pin}': {_WHAT}; check that it "
        "still holds for this release (tests/test_otel_pins.py, tests/test_tracing.py) before moving the pin")
    # a tight pin: one minor release, so an untested SDK cannot arrive with an ordinary install
    assert any(s.operator in ("~=", "==") for s in pin.specifier), f"{package} is pinned loosely: '{pin}'"


def test_the_exporter_still_has_translate_data_and_calls_it():
    from opentelemetry.exporter.otlp.proto.grpc.exporter import OTLPExporterMixin
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    version = metadata.version(_EXPORTER)
    for owner in (OTLPExporterMixin, OTLPSpanExporter):
        method = owner.__dict__.get("_translate_data")
        assert method is not None, f"{_EXPORTER} {version}: {owner.__name__}._translate_data is gone; {_WHAT}"
        params = list(inspect.signature(method).parameters)
        assert params == ["self", "data"], (
            f"{_EXPORTER} {version}: {owner.__name__}._translate_data{inspect.signature(method)} changed "
            f"(was (self, data)); {_WHAT}")
    source = inspect.getsource(OTLPExporterMixin._export)
    assert "self._translate_data(data)" in source, (
        f"{_EXPORTER} {version}: OTLPExporterMixin._export no longer calls "
        f"self._translate_data(data); {_WHAT}")


def test_the_override_is_what_an_export_sends():
    """Through the SDK's own export path: the request handed to the gRPC stub is our encoding."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.trace import SpanKind

    from server.telemetry import otlp_encode
    from server.telemetry.trace_export import UNSET, Emitter, FastOTLPSpanExporter

    class Keep:
        def __init__(self) -> None:
            self.spans: list = []

        def on_end(self, span) -> None:
            self.spans.append(span)

    keep = Keep()
    emitter = Emitter(TracerProvider(), [keep], "9.9", fast=True)
    emitter.emit("span", SpanKind.INTERNAL, 0xA1, 0xB2, None, 0, False, {"k": "v"}, 10, 20, UNSET)
    assert len(keep.spans) == 1

    class Stub:
        def __init__(self) -> None:
            self.requests: list = []

        def Export(self, request, metadata=None, timeout=None):  # noqa: N802 - the gRPC method name
            self.requests.append(request)

    exporter = FastOTLPSpanExporter(endpoint="localhost:1", insecure=True)
    try:
        stub = exporter._client = Stub()
        assert exporter.export(keep.spans) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert len(stub.requests) == 1, f"the exporter did not call its gRPC client once: {_WHAT}"
    assert stub.requests[0] == otlp_encode.encode(keep.spans), (
        f"the exporter sent something other than otlp_encode's request: {_WHAT}")
    span = stub.requests[0].resource_spans[0].scope_spans[0].spans[0]
    assert (span.name, span.trace_id[-1], span.span_id[-1]) == ("span", 0xA1, 0xB2)
