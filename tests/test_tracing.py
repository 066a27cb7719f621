"""Tracing, end to end: a real OTLP/gRPC receiver in this process, real inferd servers exporting to it,
real clients sending W3C ``traceparent`` (gRPC metadata, HTTP headers); the received spans are checked."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from tritonclient.utils import InferenceServerException

from tests.harness import ROOT, ServerProcess

SERVER, INTERNAL = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_INTERNAL
STATUS_OK, STATUS_ERROR = trace_pb2.Status.STATUS_CODE_OK, trace_pb2.Status.STATUS_CODE_ERROR

FAULTY = """
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
FAULTY_PY = """
class TritonPythonModel:
    def execute(self, inputs):
        x = inputs["X"]
        if (x < 0).any():
            raise ValueError(f"negative input: {x.min()}")
        return {"Y": x * 2}
"""
# requests arriving within 300 ms share one batch
DENSE = "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 300000 }\n"


def _any(value) -> object:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class Receiver(ts_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector: keeps every span it is sent, with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.resources: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                self.resources.append({kv.key: _any(kv.value) for kv in rs.resource.attributes})
                for ss in rs.scope_spans:
                    self.spans.extend(ss.spans)
        return ts.ExportTraceServiceResponse()

    def wait(self, predicate, what: str, timeout: float = 15.0) -> list[trace_pb2.Span]:
        """Poll until ``predicate(spans)`` is true (spans arrive in batches every ~50 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({s.name for s in spans})
                raise AssertionError(f"timed out waiting for {what}; received {len(spans)} spans: {names}")
            time.sleep(0.05)

    def trace(self, trace_id: str, count: int, timeout: float = 15.0) -> list[trace_pb2.Span]:
        """The spans of one trace, once at least ``count`` arrived."""
        tid = bytes.fromhex(trace_id)
        spans = self.wait(lambda ss: sum(s.trace_id == tid for s in ss) >= count,
                          f"{count} spans of trace {trace_id}", timeout)
        return [s for s in spans if s.trace_id == tid]


def attrs(span) -> dict:
    return {kv.key: _any(kv.value) for kv in span.attributes}


def one(spans, name: str):
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"expected one '{name}' span, got {[s.name for s in spans]}"
    return found[0]


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def simple_inputs(module=grpcclient):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [module.InferInput("INPUT0", [1, 16], "INT32"), module.InferInput("INPUT1", [1, 16], "INT32")]
    for i in inputs:
        i.set_data_from_numpy(a)
    return inputs


def fp32_input(name: str, data: list[list[float]], module=grpcclient):
    x = module.InferInput(name, [len(data), len(data[0])], "FP32")
    x.set_data_from_numpy(np.array(data, dtype=np.float32))
    return [x]


@pytest.fixture(scope="module")
def receiver():
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    ts_grpc.add_TraceServiceServicer_to_server(collector, server)
    collector.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector
    server.stop(0)


def otel_env(port: int) -> dict:
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_SERVICE_NAME": "inferd-test"}


@pytest.fixture(scope="module")
def repo(example_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("trace_repo")
    shutil.copytree(example_repo / "simple", root / "simple")
    shutil.copytree(example_repo / "dense", root / "dense")
    (root / "dense" / "config.pbtxt").write_text(DENSE)
    (root / "faulty" / "1").mkdir(parents=True)
    (root / "faulty" / "config.pbtxt").write_text(FAULTY)
    (root / "faulty" / "1" / "model.py").write_text(FAULTY_PY)
    return root


@pytest.fixture(scope="module")
def traced(repo, receiver, tmp_path_factory):
    """inferd configured by the OTEL_* variables alone, exporting to the receiver."""
    proc = ServerProcess([repo], "--model-control-mode", "explicit", "--load-model", "*",
                         env=otel_env(receiver.port))
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-traced.log")
    yield proc
    proc.stop()


@pytest.fixture
def client(traced):
    with grpcclient.InferenceServerClient(traced.grpc_url) as c:
        yield c


# ---------------------------------------------------------------- spans and propagation


def test_grpc_request_is_a_child_of_the_callers_span(traced, client, receiver):
    header, trace_id, caller = traceparent()
    client.infer("simple", simple_inputs(), request_id="grpc-1", headers={"traceparent": header})
    spans = receiver.trace(trace_id, 4)
    server = one(spans, "inference.GRPCInferenceService/ModelInfer")
    assert server.kind == SERVER
    assert server.parent_span_id.hex() == caller
    assert server.status.code == STATUS_OK
    a = attrs(server)
    assert (a["model_name"], a["model_version"], a["request_id"]) == ("simple", "1", "grpc-1")
    assert a["status"] == "OK"
    assert a["rpc.system"] == "grpc"
    queue, batch, compute = one(spans, "queue"), one(spans, "batch"), one(spans, "compute")
    assert queue.parent_span_id == server.span_id and queue.kind == INTERNAL
    assert batch.parent_span_id == server.span_id
    assert [link.span_id for link in batch.links] == [server.span_id]
    assert attrs(batch)["batch_size"] == 1 and attrs(batch)["batch_requests"] == 1
    assert compute.parent_span_id == batch.span_id
    # the tree nests in time: the request covers the queue, the batch covers the compute
    assert server.start_time_unix_nano <= queue.start_time_unix_nano <= queue.end_time_unix_nano
    assert queue.end_time_unix_nano <= batch.start_time_unix_nano <= compute.start_time_unix_nano
    assert compute.end_time_unix_nano <= batch.end_time_unix_nano <= server.end_time_unix_nano
    assert any(r.get("service.name") == "inferd-test" for r in receiver.resources)


def test_rest_request_is_a_child_of_the_callers_span(traced, receiver):
    header, trace_id, caller = traceparent()
    with httpclient.InferenceServerClient(traced.http_url) as c:
        c.infer("simple", simple_inputs(httpclient), request_id="rest-1",
                headers={"traceparent": header, "tracestate": "vendor=abc"})
    spans = receiver.trace(trace_id, 4)
    server = one(spans, "POST /v2/models/{model}/infer")
    assert server.kind == SERVER and server.parent_span_id.hex() == caller
    assert server.trace_state == "vendor=abc"
    assert attrs(server)["request_id"] == "rest-1" and attrs(server)["http.request.method"] == "POST"


def test_a_batch_links_to_every_member_request(traced, client, receiver):
    callers = [traceparent() for _ in range(4)]
    with futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda c: client.infer("dense", fp32_input("INPUT", [[1, 2, 3, 4]]),
                                             headers={"traceparent": c[0]}), callers))
    servers = {}
    for _, trace_id, _ in callers:
        servers[trace_id] = one(receiver.trace(trace_id, 2), "inference.GRPCInferenceService/ModelInfer")
    request_spans = {s.span_id for s in servers.values()}
    spans = receiver.wait(lambda ss: any(s.name == "batch" and {k.span_id for k in s.links} & request_spans
                                         for s in ss), "the batch spans of the dense requests")
    batches = [s for s in spans if s.name == "batch" and {k.span_id for k in s.links} & request_spans]
    linked = [link.span_id for b in batches for link in b.links]
    assert sorted(linked) == sorted(request_spans)  # each request in exactly one batch
    biggest = max(batches, key=lambda b: len(b.links))
    assert len(biggest.links) >= 2, "the 300 ms queue delay should have batched concurrent requests"
    assert attrs(biggest)["batch_size"] == attrs(biggest)["batch_requests"] == len(biggest.links)
    for link in biggest.links:  # links carry each member's own trace
        assert link.trace_id in {bytes.fromhex(t) for _, t, _ in callers}


def test_failed_requests_have_error_status_and_message(traced, client, receiver):
    header, trace_id, _ = traceparent()
    with pytest.raises(InferenceServerException):
        client.infer("simple", simple_inputs()[:1], headers={"traceparent": header})
    server = one(receiver.trace(trace_id, 1), "inference.GRPCInferenceService/ModelInfer")
    assert server.status.code == STATUS_ERROR
    assert "INPUT1" in server.status.message
    assert attrs(server)["status"] == attrs(server)["error.type"] == "INVALID_ARGUMENT"


def test_backend_failure_marks_the_batch_and_logs_the_trace_id(traced, client, receiver):
    header, trace_id, _ = traceparent()
    with pytest.raises(InferenceServerException, match="negative input"):
        client.infer("faulty", fp32_input("X", [[1, -4, 2]]), headers={"traceparent": header})
    spans = receiver.trace(trace_id, 4)
    server, batch, compute = one(spans, "inference.GRPCInferenceService/ModelInfer"), one(spans, "batch"), \
        one(spans, "compute")
    for span in (server, batch, compute):
        assert span.status.code == STATUS_ERROR and "negative input: -4.0" in span.status.message
    assert attrs(server)["status"] == "INTERNAL"
    failure = [line for line in traced.log().splitlines() if "failed to execute a batch" in line]
    assert failure and failure[-1].endswith(f"trace_id={trace_id}"), failure


def test_unsampled_caller_is_not_traced_and_stream_gets_one_span(traced, client, receiver):
    unsampled, quiet_id, _ = traceparent(sampled=False)
    client.infer("simple", simple_inputs(), headers={"traceparent": unsampled})
    header, trace_id, caller = traceparent()
    answers: list = []
    client.start_stream(lambda result, error: answers.append((result, error)),
                        headers={"traceparent": header})
    for i in range(3):
        client.async_stream_infer("simple", simple_inputs(), request_id=f"s{i}")
    client.stop_stream()
    assert len(answers) == 3 and all(error is None for _, error in answers)
    spans = receiver.trace(trace_id, 4 + 3 * 3)
    stream = one(spans, "inference.GRPCInferenceService/ModelStreamInfer")
    assert stream.kind == SERVER and stream.parent_span_id.hex() == caller
    assert attrs(stream)["responses"] == 3 and [e.name for e in stream.events] == ["response"] * 3
    children = [s for s in spans if s.name == "infer"]
    assert sorted(attrs(s)["request_id"] for s in children) == ["s0", "s1", "s2"]
    assert all(s.parent_span_id == stream.span_id for s in children)
    assert not [s for s in receiver.spans if s.trace_id == bytes.fromhex(quiet_id)]


def test_model_load_and_unload_spans(traced, client, receiver):
    def loaded(spans) -> set:
        return {attrs(s)["model_name"] for s in spans if s.name == "model load"}

    spans = receiver.wait(lambda ss: {"simple", "dense", "faulty"} <= loaded(ss), "load spans")
    load = [s for s in spans if s.name == "model load" and attrs(s)["model_name"] == "dense"][0]
    assert attrs(load)["model_versions"] == ["1"] and load.status.code == STATUS_OK
    client.unload_model("faulty")
    client.load_model("faulty")
    spans = receiver.wait(lambda ss: any(s.name == "model unload" and attrs(s)["model_name"] == "faulty"
                                         for s in ss), "the unload span")
    unload = one([s for s in spans if attrs(s).get("model_name") == "faulty"], "model unload")
    assert attrs(unload)["model_versions"] == [] and unload.status.code == STATUS_OK


# ---------------------------------------------------------------- the trace extension


def test_trace_setting_changes_take_effect(traced, client, receiver):
    assert "trace" in client.get_server_metadata(as_json=True)["extensions"]
    settings = client.get_trace_settings(as_json=True)["settings"]
    assert settings["trace_level"]["value"] == ["TIMESTAMPS"]
    assert settings["trace_mode"]["value"] == ["opentelemetry"]
    off = client.update_trace_settings(settings={"trace_level": ["OFF"]}, as_json=True)["settings"]
    assert off["trace_level"]["value"] == ["OFF"]
    try:
        header, dark_id, _ = traceparent()
        client.infer("simple", simple_inputs(), headers={"traceparent": header})
    finally:
        client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    header, lit_id, _ = traceparent()
    client.infer("simple", simple_inputs(), headers={"traceparent": header})
    receiver.trace(lit_id, 4)  # exported after the dark request would have been
    assert not [s for s in receiver.spans if s.trace_id == bytes.fromhex(dark_id)]


def test_rest_model_settings_rate_and_count(traced, receiver):
    """Per-model settings over REST: rate 1-in-2 and a trace count for requests without caller context."""
    with httpclient.InferenceServerClient(traced.http_url) as c:
        got = c.update_trace_settings("simple", {"trace_rate": "2", "trace_count": "2"})
        assert got["trace_rate"] == "2" and got["trace_count"] == "2" and got["trace_level"] == ["TIMESTAMPS"]
        assert c.get_trace_settings()["trace_rate"] == "1"  # the global value is untouched
        ids = [f"rate-{i}" for i in range(6)]
        for request_id in ids:
            c.infer("simple", simple_inputs(httpclient), request_id=request_id)
        assert c.get_trace_settings("simple")["trace_count"] == "0"
        cleared = c.update_trace_settings("simple", {"trace_rate": None, "trace_count": None})
        assert cleared["trace_rate"] == "1" and cleared["trace_count"] == "-1"
        c.infer("simple", simple_inputs(httpclient), request_id="rate-after")
    spans = receiver.wait(lambda ss: any(attrs(s).get("request_id") == "rate-after" for s in ss),
                          "rate-after")
    traced_ids = sorted(attrs(s)["request_id"] for s in spans
                        if s.kind == SERVER and str(attrs(s).get("request_id", "")).startswith("rate-"))
    assert traced_ids == ["rate-0", "rate-2", "rate-after"]  # 1 in 2, then the count ran out


def test_trace_setting_errors_name_the_problem(traced, client):
    with httpclient.InferenceServerClient(traced.http_url) as c:
        for settings, text in [({"trace_level": ["LOUD"]}, "unknown trace level 'LOUD'"),
                               ({"trace_rate": "-1"}, "'trace_rate' must be >= 0"),
                               ({"trace_file": "/tmp/x.json"}, "trace_file"),
                               ({"bogus": "1"}, "unknown trace setting 'bogus'"),
                               ({"trace_rate": None}, "cannot be cleared")]:
            with pytest.raises(InferenceServerException, match=text) as err:
                c.update_trace_settings(settings=settings)
            assert err.value.status() == "400"
        with pytest.raises(InferenceServerException, match="unknown model 'nope'") as err:
            c.get_trace_settings("nope")
        assert err.value.status() == "404"
    with pytest.raises(InferenceServerException, match="TENSORS is not supported"):
        client.update_trace_settings(settings={"trace_level": ["TENSORS"]})


# ---------------------------------------------------------------- configuration


def test_off_by_default_then_enabled_at_run_time(repo, receiver, start_server):
    env = {k: v for k, v in otel_env(receiver.port).items() if k != "OTEL_TRACES_EXPORTER"}
    server = start_server([repo], env=env)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        assert c.get_trace_settings(as_json=True)["settings"]["trace_level"]["value"] == ["OFF"]
        header, dark_id, _ = traceparent()
        c.infer("simple", simple_inputs(), headers={"traceparent": header})
        c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
        header, lit_id, _ = traceparent()
        c.infer("simple", simple_inputs(), headers={"traceparent": header})
    receiver.trace(lit_id, 4)
    assert not [s for s in receiver.spans if s.trace_id == bytes.fromhex(dark_id)]
    assert "tracing on" in server.log()


def test_triton_trace_config_flags(repo, receiver, start_server):
    server = start_server([repo], "--trace-config", "mode=opentelemetry",
                          "--trace-config", f"opentelemetry,url=127.0.0.1:{receiver.port}",
                          "--trace-config", "opentelemetry,bsp_schedule_delay=50",
                          "--trace-config", "opentelemetry,resource=deployment=flags-test",
                          "--trace-config", "rate=1", "--trace-config", "level=TIMESTAMPS",
                          env={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    header, trace_id, caller = traceparent()
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        assert c.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] == ["1"]
        c.infer("simple", simple_inputs(), headers={"traceparent": header})
    server_span = one(receiver.trace(trace_id, 4), "inference.GRPCInferenceService/ModelInfer")
    assert server_span.parent_span_id.hex() == caller
    assert any(r.get("deployment") == "flags-test" and r.get("service.name") == "inferd"
               for r in receiver.resources)


def test_triton_style_http_url_exports_otlp_over_http(repo, start_server):
    """Triton's url form (http://host:4318/v1/traces) selects OTLP/HTTP; the spans then travel as SDK
    ReadableSpans through the stock exporter (the other pipeline shape)."""
    import http.server

    received: list[trace_pb2.Span] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
            request = ts.ExportTraceServiceRequest.FromString(body)
            received.extend(s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(ts.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/v1/traces"
        server = start_server([repo], "--trace-config", f"opentelemetry,url={url}",
                              "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1",
                              env={"OTEL_BSP_SCHEDULE_DELAY": "50"})
        header, trace_id, caller = traceparent()
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            c.infer("simple", simple_inputs(), headers={"traceparent": header})
        deadline = time.monotonic() + 15
        tid = bytes.fromhex(trace_id)
        while sum(s.trace_id == tid for s in received) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        spans = [s for s in received if s.trace_id == tid]
        assert sorted(s.name for s in spans) == ["batch", "compute",
                                                 "inference.GRPCInferenceService/ModelInfer", "queue"]
        assert one(spans, "inference.GRPCInferenceService/ModelInfer").parent_span_id.hex() == caller
        assert "(http/protobuf)" in server.log()
    finally:
        httpd.shutdown()


def test_bad_trace_config_stops_the_start_with_its_name():
    for flag, text in [("level=LOUD", "unknown trace level 'LOUD'"),
                       ("triton,file=/tmp/t.json", "triton trace mode"),
                       ("opentelemetry,colour=blue", "unknown opentelemetry setting 'colour'")]:
        result = subprocess.run([sys.executable, "-m", "server.cli", "--model-repository", str(ROOT),
                                 "--trace-config", flag], capture_output=True, text=True, cwd=ROOT,
                                timeout=60)
        assert result.returncode == 2 and text in result.stderr, result.stderr


# ---------------------------------------------------------------- the encoder


def test_fast_encoding_equals_the_sdk_encoding():
    """Pre-encoded spans (otlp_encode, what the server queues when its exporter is OTLP/gRPC) must make
    the request the SDK's own encoder makes from the same spans as ReadableSpans, for every span shape
    the server emits, plus an SDK-made span (events, a remote parent, a status) in the same export."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
    from opentelemetry.trace import TraceState, set_span_in_context

    from server.telemetry.otlp_encode import encode
    from server.telemetry.trace_export import UNSET, EncodedSpan, Emitter

    class Keep:
        def __init__(self):
            self.spans = []

        def on_end(self, span):
            self.spans.append(span)

    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    fast, full = Keep(), Keep()
    emitters = [Emitter(provider, [fast], "9.9", fast=True), Emitter(provider, [full], "9.9")]
    emitters[1].resource, emitters[1].scope = emitters[0].resource, emitters[0].scope
    remote = SpanContext(0xABC, 0xDEF, True, TraceFlags(1), TraceState([("k", "v")]))
    parent = set_span_in_context(NonRecordingSpan(remote))
    trace_id, server, state = emitters[0].root(parent, remote, "srv", SpanKind.SERVER, {})
    assert trace_id == 0xABC and state == remote.trace_state
    attributes = {"s": "x", "i": 3, "b": True, "f": 0.5, "l": ["a", "b"], "e": [], "empty": "", "neg": -5,
                  "big": 2**40}
    for em in emitters:
        em.emit("srv", SpanKind.SERVER, trace_id, server, state, 0xDEF, True, attributes, 10, 20,
                Status(StatusCode.ERROR, "boom"))
        em.emit_all([  # a batch's spans: one queued item
            ("queue", SpanKind.INTERNAL, trace_id, 0x11, state, server, False, None, 11, 12, UNSET, ()),
            ("batch", SpanKind.INTERNAL, trace_id, 0x12, state, server, False, {"batch_size": 2}, 12, 19,
             UNSET, [(trace_id, server), (0x123, 0x456)])])
        em.emit("stream", SpanKind.SERVER, 0x77, 0x78, None, 0, False, {"responses": 1}, 5, 30,
                events=[("response", 25, {"request_id": "r", "status": "OK"})])
    tracer = provider.get_tracer("sdk-made", "1.0")
    span = tracer.start_span("sdk", context=parent, attributes={"a": 1})
    span.add_event("e", {"n": 2})
    span.set_status(Status(StatusCode.OK))
    span.end()
    sdk_made = memory.get_finished_spans()[0]
    assert all(isinstance(s, EncodedSpan) for s in fast.spans)
    assert len(fast.spans) == 3 and len(full.spans) == 4
    assert encode(fast.spans + [sdk_made]) == encode_spans(full.spans + [sdk_made])
    assert encode(full.spans) == encode_spans(full.spans)  # the ReadableSpan path too


# ---------------------------------------------------------------- the log tag


def test_log_record_factory_is_installed_only_while_tracing_is_on(caplog):
    import logging

    from server.telemetry import tracing
    from server.telemetry.trace_config import TraceConfig

    before = logging.getLogRecordFactory()
    off = tracing.Tracing()
    assert logging.getLogRecordFactory() is before  # constructing a Tracing changes nothing global
    on = tracing.Tracing(TraceConfig(level=["TIMESTAMPS"], exporters=["none"]))
    also = tracing.Tracing(TraceConfig(level=["TIMESTAMPS"], exporters=["none"]))
    try:
        assert on.on and logging.getLogRecordFactory() is not before
        rt = tracing.RequestTrace.__new__(tracing.RequestTrace)
        rt.trace_id = 0xABC
        token = tracing._LOG_TAG.set(rt)
        try:
            with caplog.at_level(logging.INFO):
                logging.getLogger("inferd.test").info("handled %s", "it")
        finally:
            tracing._LOG_TAG.reset(token)
        assert caplog.records[-1].getMessage() == f"handled it trace_id={0xABC:032x}"
        on.shutdown()
        assert logging.getLogRecordFactory() is not before  # the other one still traces
    finally:
        also.shutdown()
        off.shutdown()
        on.shutdown()  # a second shutdown is harmless
    assert logging.getLogRecordFactory() is before
