"""Quotas, decided before any work: per-tenant (or per-address) request rate and concurrency, and a
per-model limit of requests in flight. gRPC answers RESOURCE_EXHAUSTED with grpc-retry-pushback-ms,
REST 429 with Retry-After; rejections are counted by reason and tenant."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.security.helpers import repository, simple_inputs, wait_started

ALICE = "alice-0123456789abcdef-secret"
BOB = "bob-fedcba9876543210-secret"


def _keys(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    return f"--api-key-file={path}"


def _simple_request(model: str = "simple") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(np.ones(16, dtype=np.int32).tobytes())
    return request


def _slow_request(delay_ms: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="DELAY_MS", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.array([delay_ms], dtype=np.float32).tobytes())
    return request


def _infer(stub, request, key: str | None = None):
    """(status code, details, trailing metadata as a dict)."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    try:
        _, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=30)
        return call.code(), "", dict(call.trailing_metadata() or ())
    except grpc.RpcError as err:
        return err.code(), err.details(), dict(err.trailing_metadata() or ())


def _rest(proc, path: str, body: bytes, key: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", proc.http_port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), data


SIMPLE_JSON = json.dumps({"inputs": [
    {"name": n, "datatype": "INT32", "shape": [1, 16], "data": [1] * 16} for n in ("INPUT0", "INPUT1")
]}).encode()


def _metric(proc, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("inferd_rejected_requests_total{") and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_rate_limit_per_tenant(tmp_path, start_server):
    # 1 token per 5 s, 3 in the bucket: the 4th request inside the test is refused whatever the load
    proc = start_server([repository(tmp_path / "repo")], _keys(tmp_path),
                        "--tenant-request-rate=0.2", "--tenant-request-burst=3")
    with grpc.insecure_channel(proc.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            assert _infer(stub, _simple_request(), ALICE)[0] == grpc.StatusCode.OK
        code, details, trailer = _infer(stub, _simple_request(), ALICE)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == "tenant 'alice' exceeds its request rate of 0.2/s"
        assert 0 < int(trailer["grpc-retry-pushback-ms"]) <= 5000  # the time to the next token
        # another tenant has its own bucket; health is never limited
        assert _infer(stub, _simple_request(), BOB)[0] == grpc.StatusCode.OK
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
    # the bucket is the tenant's, whatever the transport
    status, headers, body = _rest(proc, "/v2/models/simple/infer", SIMPLE_JSON, ALICE)
    assert status == 429
    assert json.loads(body) == {"error": "tenant 'alice' exceeds its request rate of 0.2/s"}
    assert 1 <= int(headers["Retry-After"]) <= 5 and 0 < int(headers["retry-after-ms"]) <= 5000
    assert _rest(proc, "/v2/models/simple/infer", SIMPLE_JSON, BOB)[0] == 200
    # refused before the body is read: a malformed body still gets 429, not 400
    assert _rest(proc, "/v2/models/simple/infer", b"{not json", ALICE)[0] == 429
    # tritonclient sees the same
    client = httpclient.InferenceServerClient(proc.http_url)
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", simple_inputs(httpclient), headers={"Authorization": f"Bearer {ALICE}"})
    assert "exceeds its request rate" in str(err.value)
    client.close()
    assert _metric(proc, reason="rate", tenant="alice") == 4
    assert _metric(proc, reason="rate", tenant="bob") == 0


def test_rate_limit_by_address_without_keys(tmp_path, start_server):
    proc = start_server([repository(tmp_path / "repo")], "--tenant-request-rate=0.2",
                        "--tenant-request-burst=2")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    client.infer("simple", simple_inputs())
    client.get_model_metadata("simple")  # every non-health call takes a token
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", simple_inputs())
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert err.value.message() == "client 127.0.0.1 exceeds its request rate of 0.2/s"
    assert client.is_server_ready() and client.is_model_ready("simple")
    client.close()
    # the label is "anonymous", never the address: one series however many clients there are
    assert _metric(proc, reason="rate", tenant="anonymous") == 1
    assert "127.0.0.1" not in [line for line in urllib.request.urlopen(
        f"http://127.0.0.1:{proc.metrics_port}/metrics").read().decode().splitlines()
        if line.startswith("inferd_rejected")][0]


def _in_background(fn):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=fn()))
    thread.start()
    return thread, box


def test_concurrency_limit_per_tenant(tmp_path, start_server):
    repo = repository(tmp_path / "repo", slow="")
    proc = start_server([repo], _keys(tmp_path), "--tenant-max-concurrent=1")
    with grpc.insecure_channel(proc.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        thread, box = _in_background(lambda: _infer(stub, _slow_request(4000), ALICE))
        wait_started(repo, 1)  # the slow request is admitted and running
        code, details, trailer = _infer(stub, _simple_request(), ALICE)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == "tenant 'alice' already has 1 requests in flight, the most allowed"
        assert int(trailer["grpc-retry-pushback-ms"]) == 100
        status, headers, _ = _rest(proc, "/v2/models/simple/infer", SIMPLE_JSON, ALICE)
        assert status == 429 and headers["Retry-After"] == "1"
        assert _infer(stub, _simple_request(), BOB)[0] == grpc.StatusCode.OK
        thread.join()
        assert box["result"][0] == grpc.StatusCode.OK
        assert _infer(stub, _simple_request(), ALICE)[0] == grpc.StatusCode.OK  # the slot came back
    assert _metric(proc, reason="concurrency", tenant="alice") == 2


def test_per_model_inflight_limit(tmp_path, start_server):
    slow = 'parameters { key: "inferd_max_inflight_requests" value: { string_value: "2" } }\n'
    repo = repository(tmp_path / "repo", slow=slow)
    proc = start_server([repo], "--model-max-inflight=50")
    with grpc.insecure_channel(proc.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        running = [_in_background(lambda: _infer(stub, _slow_request(4000))) for _ in range(2)]
        wait_started(repo, 2)
        code, details, trailer = _infer(stub, _slow_request(10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == "model 'slow' already has 2 requests queued or running, the most allowed"
        assert trailer["grpc-retry-pushback-ms"] == "100"
        # decided on the model name before the tensors are decoded: a malformed request is refused
        # for the limit, not for its contents
        bad = _slow_request(10)
        bad.raw_input_contents[0] = b"\x00"
        assert _infer(stub, bad)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        status, headers, body = _rest(proc, "/v2/models/slow/infer", b"{broken", None)
        assert status == 429 and headers["Retry-After"] == "1"
        assert json.loads(body)["error"].startswith("model 'slow' already has 2 requests")
        assert _rest(proc, "/v2/models/slow/versions/1/infer", b"{broken", None)[0] == 429
        # other models are not affected
        assert _infer(stub, _simple_request())[0] == grpc.StatusCode.OK
        for thread, box in running:
            thread.join()
            assert box["result"][0] == grpc.StatusCode.OK
        assert _infer(stub, _slow_request(10))[0] == grpc.StatusCode.OK
        assert _infer(stub, bad)[0] == grpc.StatusCode.INVALID_ARGUMENT  # under the limit: decoded
    assert _metric(proc, reason="model_inflight", tenant="anonymous") == 4


def test_queue_full_stays_tritons(tmp_path, start_server):
    """The server's own queue limit is not a quota: UNAVAILABLE / 503 'Exceeds maximum queue size'."""
    queue = ("max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 1 } }\n")
    repo = repository(tmp_path / "repo", slow="")
    config = (repo / "slow" / "config.pbtxt").read_text()
    config = config.replace("max_batch_size: 0\n", "").replace("count: 4", "count: 1")
    (repo / "slow" / "config.pbtxt").write_text(config + queue)
    proc = start_server([repo], "--tenant-max-concurrent=100")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    d = grpcclient.InferInput("DELAY_MS", [1, 1], "FP32")
    d.set_data_from_numpy(np.array([[1500]], dtype=np.float32))
    threads = [_in_background(lambda: _try(lambda: client.infer("slow", [d]))) for _ in range(4)]
    for thread, _ in threads:
        thread.join()
    outcomes = sorted(str(box["result"]) for _, box in threads)
    assert any("Exceeds maximum queue size" in o and "UNAVAILABLE" in o for o in outcomes), outcomes
    assert not any("RESOURCE_EXHAUSTED" in o for o in outcomes)
    client.close()


def _try(fn):
    try:
        fn()
        return "ok"
    except InferenceServerException as exc:
        return f"{exc.status()} {exc.message()}"


def test_stream_counts_as_one_call_in_flight(tmp_path, start_server):
    proc = start_server([repository(tmp_path / "repo")], _keys(tmp_path), "--tenant-max-concurrent=1")
    results: list = []
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    client.start_stream(callback=lambda result, error: results.append((result, error)),
                        headers={"authorization": f"Bearer {ALICE}"})
    for _ in range(3):  # requests inside the stream are not separate calls
        client.async_stream_infer("simple", simple_inputs())
    deadline = time.monotonic() + 10
    while len(results) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [error for _, error in results] == [None, None, None]
    other = grpcclient.InferenceServerClient(proc.grpc_url)
    with pytest.raises(InferenceServerException) as err:  # the open stream holds alice's one slot
        other.infer("simple", simple_inputs(), headers={"authorization": f"Bearer {ALICE}"})
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    client.stop_stream()
    time.sleep(0.3)
    assert other.infer("simple", simple_inputs(), headers={"authorization": f"Bearer {ALICE}"})
    other.close()
    client.close()
