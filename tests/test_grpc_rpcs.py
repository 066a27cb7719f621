"""Every GRPCInferenceService RPC besides ModelInfer (tests/test_conformance.py) against a real inferd."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from server.protos import model_config_pb2 as mc

_MAX = 2**31 - 1


@pytest.fixture(scope="module")
def client(models_server):
    with grpcclient.InferenceServerClient(models_server.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def stub(models_server):
    options = [("grpc.max_send_message_length", _MAX), ("grpc.max_receive_message_length", _MAX)]
    with grpc.insecure_channel(models_server.grpc_url, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _status(call) -> tuple[str, str]:
    """(gRPC code name, details) of a call expected to fail."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code().name, info.value.details()


def _simple_inputs(batch: int = 1) -> tuple[list, np.ndarray, np.ndarray]:
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    b = np.full((batch, 16), 2, dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [batch, 16], "INT32"),
              grpcclient.InferInput("INPUT1", [batch, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a, b


# ---------------------------------------------------------------- server health and metadata


def test_server_live_ready_metadata(client, stub):
    assert client.is_server_live() and client.is_server_ready()
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = client.get_server_metadata()
    assert meta.name == "inferd" and meta.version
    # only extensions that work are listed; each one listed is exercised here or in the conformance table
    assert set(meta.extensions) <= {"model_configuration", "statistics", "schedule_policy",
                                    "model_repository", "binary_tensor_data", "classification",
                                    "sequence", "parameters", "trace", "system_shared_memory"}
    for unsupported in ("cuda_shared_memory", "logging"):  # system shared memory: tests/test_shared_memory.py
        assert unsupported not in meta.extensions
    if "model_configuration" in meta.extensions:
        assert client.get_model_config("simple").config.name == "simple"
    if "statistics" in meta.extensions:
        assert client.get_inference_statistics("simple").model_stats


def test_model_ready(client, stub):
    assert client.is_model_ready("simple") and client.is_model_ready("simple", "1")
    assert stub.ModelReady(pb.ModelReadyRequest(name="dense")).ready
    # as Triton: an unknown model or version is "not ready", not an error (REST answers an error)
    assert not stub.ModelReady(pb.ModelReadyRequest(name="no_such_model")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="simple", version="3")).ready
    assert not client.is_model_ready("no_such_model") and not client.is_model_ready("simple", "3")
    # a version that is not a number is still a bad request
    code, details = _status(lambda: stub.ModelReady(pb.ModelReadyRequest(name="simple", version="x1")))
    assert code == "INVALID_ARGUMENT" and "'x1'" in details


def test_model_metadata(client, stub):
    meta = client.get_model_metadata("simple")
    assert (meta.name, list(meta.versions), meta.platform) == ("simple", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("OUTPUT0", "INT32", [-1, 16]), ("OUTPUT1", "INT32", [-1, 16])]
    # no batching: no -1 batch dimension; BYTES reported as BYTES (config TYPE_STRING)
    fixed = stub.ModelMetadata(pb.ModelMetadataRequest(name="identity_fixed"))
    assert list(fixed.inputs[0].shape) == [2, 3]
    text = stub.ModelMetadata(pb.ModelMetadataRequest(name="simple_identity", version="1"))
    assert (text.inputs[0].datatype, list(text.inputs[0].shape)) == ("BYTES", [-1, 1])
    assert list(text.versions) == ["1"]
    code, details = _status(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")))
    assert code == "NOT_FOUND" and "'nope'" in details


def test_model_config_is_the_effective_config(client):
    # dense's config.pbtxt has max_batch_size and dynamic_batching only
    config = client.get_model_config("dense").config
    assert (config.name, config.platform, config.backend) == ("dense", "onnxruntime_onnx", "onnxruntime")
    assert config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 16
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("INPUT", mc.TYPE_FP32, [4])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("OUTPUT", mc.TYPE_FP32, [3])]
    assert list(config.dynamic_batching.preferred_batch_size) == [16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count > 0) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, True)]
    assert config.version_policy.latest.num_versions == 1
    # fully auto-completed (no inputs, outputs or max_batch_size in config.pbtxt): Triton's defaults
    auto = client.get_model_config("identity_bytes").config
    assert auto.max_batch_size == 4
    assert [(t.name, t.data_type, list(t.dims)) for t in auto.input] == [("INPUT0", mc.TYPE_STRING, [4])]
    assert auto.HasField("dynamic_batching") and list(auto.dynamic_batching.preferred_batch_size) == [4]
    assert [(g.kind, g.count) for g in auto.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]


def test_repository_index(client, stub):
    index = {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}
    for name in ("simple", "simple_identity", "dense", "identity_bf16", "identity_dyn", "identity_fixed"):
        assert index[(name, "1")] == ("READY", "")
    ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    ready_rows = {(m.name, m.version) for m in ready.models}
    assert ready_rows == {key for key, (state, _) in index.items() if state == "READY"}
    code, details = _status(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="other")))
    assert code == "UNIMPLEMENTED" and "repository_name" in details


def test_load_and_unload_refused_without_explicit_mode(stub):
    for call in (lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="simple")),
                 lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="simple"))):
        code, details = _status(call)
        assert code == "UNAVAILABLE" and "explicit" in details


# ---------------------------------------------------------------- statistics


def test_model_statistics_count_requests(client, stub):
    def counts():
        s = client.get_inference_statistics("identity_fixed", "1").model_stats[0]
        return s.inference_count, s.execution_count, s.inference_stats.success.count

    before = counts()
    data = np.ones((2, 3), dtype=np.float32)
    for _ in range(3):
        item = grpcclient.InferInput("INPUT0", [2, 3], "FP32")
        item.set_data_from_numpy(data)
        client.infer("identity_fixed", [item])
    after = counts()
    assert tuple(a - b for a, b in zip(after, before)) == (3, 3, 3)
    stats = client.get_inference_statistics("identity_fixed").model_stats[0]
    assert (stats.name, stats.version) == ("identity_fixed", "1") and stats.last_inference > 0
    assert stats.inference_stats.compute_infer.count >= 3 and stats.inference_stats.queue.ns > 0
    everything = {s.name for s in stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats}
    assert {"simple", "dense", "identity_fixed"} <= everything
    code, details = _status(lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="nope")))
    assert code == "NOT_FOUND" and "'nope'" in details
    code, details = _status(
        lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="simple", version="9")))
    assert code == "INVALID_ARGUMENT" and "version 9" in details


# ---------------------------------------------------------------- streaming


def test_stream_infer_answers_and_reports_errors_in_band(models_server):
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(models_server.grpc_url) as streaming:
        streaming.start_stream(callback=lambda result, error: answers.put((result, error)))
        expected = {}
        for i in range(4):
            inputs, a, b = _simple_inputs(batch=i + 1)
            streaming.async_stream_infer("simple", inputs, request_id=f"s{i}")
            expected[f"s{i}"] = (a + b, a - b)
        bad, _, _ = _simple_inputs()
        bad[1].set_shape([1, 8])  # wrong byte count for INPUT1: an in-band error, the stream goes on
        streaming.async_stream_infer("simple", bad, request_id="bad")
        inputs, a, b = _simple_inputs()
        streaming.async_stream_infer("simple", inputs, request_id="after")
        expected["after"] = (a + b, a - b)
        got = [answers.get(timeout=30) for _ in range(len(expected) + 1)]
        streaming.stop_stream()
    errors = [e for r, e in got if e is not None]
    assert len(errors) == 1 and "INPUT1" in errors[0].message()
    for result, error in got:
        if error is None:
            response = result.get_response()
            sum_, diff = expected.pop(response.id)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), sum_)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), diff)
            assert response.parameters["triton_final_response"].bool_param
    assert not expected


def test_stream_error_message_with_plain_stubs(stub):
    good = pb.ModelInferRequest(model_name="identity_fixed", id="ok")
    good.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 3])
    good.raw_input_contents.append(np.arange(6, dtype="<f4").tobytes())
    unknown = pb.ModelInferRequest(model_name="no_such_model", id="missing")
    replies = list(stub.ModelStreamInfer(iter([good, unknown]), timeout=30))
    by_id = {r.infer_response.id: r for r in replies}
    assert set(by_id) == {"ok", "missing"}
    assert "no_such_model" in by_id["missing"].error_message
    ok = by_id["ok"]
    assert ok.error_message == "" and len(ok.infer_response.raw_output_contents) == 1
    out = np.frombuffer(ok.infer_response.raw_output_contents[0], "<f4")
    np.testing.assert_array_equal(out, np.arange(6))


# ---------------------------------------------------------------- extensions not offered


@pytest.mark.parametrize("rpc, message, extension", [
    ("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest(), "cuda_shared_memory"),
    ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest(name="r", byte_size=8),
     "cuda_shared_memory"),
    ("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest(name="r"), "cuda_shared_memory"),
    ("LogSettings", pb.LogSettingsRequest(), "logging"),
])
def test_unimplemented_extensions(stub, rpc, message, extension):
    code, details = _status(lambda: getattr(stub, rpc)(message))
    assert code == "UNIMPLEMENTED" and extension in details


def test_unregister_all_shared_memory_succeeds(client, stub):
    # perf_analyzer unregisters "all regions" (empty name) at start and exit
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
    stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest())
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory()


# ---------------------------------------------------------------- message size


def test_64_mib_tensor_round_trip(client):
    count = 16 * 1024 * 1024  # 64 MiB of FP32, far above gRPC's 4 MiB default receive limit
    data = np.arange(count, dtype=np.float32).reshape(1, count)
    item = grpcclient.InferInput("INPUT0", [1, count], "FP32")
    item.set_data_from_numpy(data)
    result = client.infer("identity_dyn", [item], client_timeout=120)
    out = result.as_numpy("OUTPUT0")
    assert out.shape == (1, count)
    np.testing.assert_array_equal(out, data)
