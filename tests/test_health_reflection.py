"""Standard gRPC health (Check, Watch) and server reflection (v1alpha and v1) on the inference port."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICE = "inference.GRPCInferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def channel(models_server):
    with grpc.insecure_channel(models_server.grpc_url) as ch:
        yield ch


# ---------------------------------------------------------------- health


@pytest.mark.parametrize("service", ["", SERVICE, "readiness", "liveness"])
def test_health_check_serving_when_ready(channel, service):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING


def test_health_check_unknown_service_is_not_found(channel):
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_reports_not_serving_on_sigterm(start_server, test_models, tmp_path):
    # a small repository of its own: this server is stopped by the test
    repo = tmp_path / "repo"
    (repo / "identity_fixed").mkdir(parents=True)
    (repo / "identity_fixed" / "1").symlink_to(test_models / "identity_fixed" / "1")
    server = start_server([repo])
    seen: queue.Queue = queue.Queue()
    with grpc.insecure_channel(server.grpc_url) as ch:
        calls = [health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=s), timeout=60)
                 for s in ("", SERVICE)]

        def follow(name, call):
            try:
                for reply in call:
                    seen.put((name, reply.status))
            except grpc.RpcError:
                pass  # the server went away after the last status

        pairs = zip(("", SERVICE), calls)
        threads = [threading.Thread(target=follow, args=pair, daemon=True) for pair in pairs]
        for t in threads:
            t.start()
        first = {seen.get(timeout=10) for _ in calls}
        assert first == {("", SERVING), (SERVICE, SERVING)}
        server.signal()  # SIGTERM: the server drains, and health must say so before it goes
        after = {seen.get(timeout=20) for _ in calls}
        assert after == {("", NOT_SERVING), (SERVICE, NOT_SERVING)}
        for call in calls:
            call.cancel()
    assert server.proc.wait(30) == 0


def test_health_watch_follows_model_loads_under_strict_readiness(start_server, test_models, tmp_path):
    """With --strict-readiness the server is ready only while every model asked for serves: a load
    that fails makes health NOT_SERVING and unloading that model makes it SERVING again, pushed to
    the Watch as the change happens (health waits on the repository's changes; it does not poll)."""
    repo = tmp_path / "repo"
    (repo / "identity_fixed").mkdir(parents=True)
    (repo / "identity_fixed" / "1").symlink_to(test_models / "identity_fixed" / "1")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an ONNX protobuf")
    server = start_server([repo], "--model-control-mode=explicit", "--load-model=identity_fixed",
                          "--strict-readiness=true")
    seen: queue.Queue = queue.Queue()
    with grpc.insecure_channel(server.grpc_url) as ch:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)

        def follow():
            try:
                for reply in call:
                    seen.put((time.monotonic(), reply.status))
            except grpc.RpcError:
                pass

        threading.Thread(target=follow, daemon=True).start()
        assert seen.get(timeout=10)[1] == SERVING
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            with pytest.raises(InferenceServerException):
                client.load_model("broken")
            done = time.monotonic()
            at, status = seen.get(timeout=10)
            assert status == NOT_SERVING and not client.is_server_ready()
            client.unload_model("broken")
            unloaded = time.monotonic()
            at2, status2 = seen.get(timeout=10)
            assert status2 == SERVING and client.is_server_ready()
        call.cancel()
    # the NOT_SERVING came while the load ran (before the RPC answered), SERVING right after the unload
    assert at <= done + 0.25 and at2 - unloaded < 0.25, (at - done, at2 - unloaded)


# ---------------------------------------------------------------- reflection


def _reflect(channel, method: str, requests) -> list:
    """Call ServerReflectionInfo at ``method`` with the (wire-identical) v1alpha messages."""
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=10))


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
def test_reflection_lists_services_and_resolves_the_inference_service(channel, version):
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    listing, symbol = _reflect(channel, method, [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ])
    names = {s.name for s in listing.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in symbol.file_descriptor_response.file_descriptor_proto]
    main = next(f for f in files if any(s.name == "GRPCInferenceService" for s in f.service))
    assert main.package == "inference"
    methods = {m.name for m in main.service[0].method}
    assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata", "RepositoryIndex"} <= methods
    # the dependency (model_config.proto) resolves too, so a client can decode ModelConfig
    deps = [d for d in main.dependency if "model_config" in d]
    assert deps
    (by_name,) = _reflect(channel, method, [reflection_pb2.ServerReflectionRequest(file_by_filename=deps[0])])
    config_file = descriptor_pb2.FileDescriptorProto.FromString(
        by_name.file_descriptor_response.file_descriptor_proto[0])
    assert "ModelConfig" in {m.name for m in config_file.message_type}


def test_reflection_v1alpha_stub_unknown_symbol(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such")]), timeout=10))
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
