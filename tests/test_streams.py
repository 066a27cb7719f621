"""ModelStreamInfer, generate and generate_stream behave as Triton's (generative.md §1.3-§2):
request order for non-decoupled models, reserved parameters, triton_grpc_error, SSE framing byte
for byte, errors before and after the first event, cancellation by a client that disconnects,
response statistics and the first-response histogram."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request

import grpc
import numpy as np
import pytest

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.harness import ROOT, ServerProcess
from tests.http_helpers import call, post_json, sample, scrape


@pytest.fixture(scope="module")
def stream_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("streams") / "repo"
    shutil.copytree(ROOT / "tests" / "triton_models", repo)
    shutil.copytree(ROOT / "model_repository" / "count", repo / "count")
    shutil.copytree(ROOT / "model_repository" / "simple", repo / "simple")
    proc = ServerProcess([repo])
    proc.start(tmp_path_factory.mktemp("logs") / "inferd.log")
    yield proc
    proc.stop()


@pytest.fixture
def stub(stream_server):
    with grpc.insecure_channel(stream_server.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _int32(request: pb.ModelInferRequest, name: str, values) -> None:
    array = np.asarray(values, dtype=np.int32)
    request.inputs.add(name=name, datatype="INT32", shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())


def _slow(ms: int, rid: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow", id=rid)
    _int32(request, "MS", [ms])
    return request


def _count(n: int, rid: str, delay_ms: int = 0, **params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="count", id=rid)
    _int32(request, "COUNT", [n])
    _int32(request, "DELAY_MS", [delay_ms])
    for key, value in params.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].string_param = str(value)
    return request


def test_non_decoupled_responses_come_in_request_order(stub):
    # four instances: the later, quicker requests finish first, yet are written in request order
    requests = [_slow(400, "a"), _slow(200, "b"), _slow(10, "c"), _slow(100, "d")]
    replies = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert [r.infer_response.id for r in replies] == ["a", "b", "c", "d"]
    assert all(r.infer_response.parameters["triton_final_response"].bool_param for r in replies)


def test_reserved_and_empty_final_parameters(stub):
    bad_key = _count(1, "k", triton_foo=True)
    bad_type = _count(1, "t")
    bad_type.parameters["triton_enable_empty_final_response"].string_param = "yes"
    replies = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter([bad_key, bad_type]), timeout=30)}
    assert replies["k"].error_message == (
        "parameter keys starting with 'triton_' are reserved for Triton usage. Only the following keys starting "
        "with 'triton_' are allowed: triton_enable_empty_final_response")
    assert replies["t"].error_message == (
        "invalid value type for 'triton_enable_empty_final_response' parameter, expected bool_param.")
    # an error before issuing carries only the id
    assert replies["k"].infer_response.model_name == "" and not replies["k"].infer_response.parameters


def test_backend_error_in_band_keeps_the_stream(stub):
    replies = list(stub.ModelStreamInfer(iter([_count(-1, "bad"), _count(2, "good")]), timeout=30))
    bad = [r for r in replies if r.infer_response.id == "bad"]
    good = [r for r in replies if r.infer_response.id == "good"]
    assert len(bad) == 1 and bad[0].error_message == "COUNT must be in 0..10000"
    assert bad[0].infer_response.model_name == "count"  # a backend error names the model it came from
    assert bad[0].infer_response.parameters["triton_final_response"].bool_param is True
    assert [np.frombuffer(r.infer_response.raw_output_contents[0], "<i4")[0] for r in good] == [0, 1]


def test_triton_grpc_error_ends_the_stream_with_a_status(stub):
    requests = iter([_count(1, "ok"), _count(-1, "bad"), _count(3, "never")])
    with pytest.raises(grpc.RpcError) as error:
        list(stub.ModelStreamInfer(requests, timeout=30, metadata=[("triton_grpc_error", "true")]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "COUNT must be in 0..10000"


def test_generate_stream_sse_bytes(stream_server):
    answer = post_json(stream_server.http_url, "/v2/models/count/generate_stream", {"COUNT": 3, "id": "g1"})
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/event-stream; charset=utf-8"
    # Triton writes the keys in byte order (scripts/compare_triton_streams.py checked it against 2.51)
    expected = b"".join(
        b'data: {"OUT":%d,"TEXT":"tick %d","id":"g1","model_name":"count","model_version":"1"}\n\n' % (i, i)
        for i in range(3))
    assert answer.body == expected


def test_generate_stream_parameters_object_and_errors(stream_server):
    base = stream_server.http_url
    # keys inside "parameters" map to inputs just like top-level keys
    answer = post_json(base, "/v2/models/count/generate_stream", {"parameters": {"COUNT": 1, "DELAY_MS": 0}})
    assert answer.body == b'data: {"OUT":0,"TEXT":"tick 0","model_name":"count","model_version":"1"}\n\n'
    # the model's error as the first response: its status, still one event (as Triton answers)
    answer = post_json(base, "/v2/models/count/generate_stream", {"COUNT": -1})
    assert answer.status == 400 and answer.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert answer.body == b'data: {"error":"COUNT must be in 0..10000"}\n\n'
    # refused before the model runs: a plain JSON error
    answer = post_json(base, "/v2/models/count/generate", {"COUNT": -1})
    assert answer.status == 400 and json.loads(answer.body) == {"error": "COUNT must be in 0..10000"}
    answer = post_json(base, "/v2/models/nope/generate_stream", {"COUNT": 1})
    assert answer.status == 404 and "nope" in json.loads(answer.body)["error"]
    answer = post_json(base, "/v2/models/count/generate", {"COUNT": [1, 2, 3]})
    assert answer.status == 400
    assert json.loads(answer.body)["error"] == "The schema can not convert input 'COUNT' to tensor with proper shape"
    answer = post_json(base, "/v2/models/count/generate", {"COUNT": 1, "x": [1]})
    assert json.loads(answer.body)["error"] == (
        "parameter 'x' has invalid type. It should be either 'int', 'bool', or 'string'.")
    answer = call(base, "POST", "/v2/models/count/generate", json.dumps({"COUNT": 1}),
                  {"Content-Encoding": "gzip"})
    assert answer.status == 400


def test_generate_one_response(stream_server):
    base = stream_server.http_url
    answer = post_json(base, "/v2/models/count/generate", {"COUNT": 1})
    assert answer.status == 200
    assert json.loads(answer.body) == {"model_name": "count", "model_version": "1", "OUT": 0, "TEXT": "tick 0"}
    answer = post_json(base, "/v2/models/count/generate", {"COUNT": 2})
    assert json.loads(answer.body) == {"error": (
        "generate expects model to produce exactly 1 response, use generate stream for model that generates "
        "various number of responses")}
    # a non-decoupled model through generate: JSON values mapped onto its inputs by metadata
    answer = post_json(base, "/v2/models/add_sub/generate", {"INPUT0": [1, 2, 3, 4], "INPUT1": [1, 1, 1, 1]})
    doc = json.loads(answer.body)
    assert answer.status == 200 and doc["OUTPUT0"] == [2, 3, 4, 5] and doc["OUTPUT1"] == [0, 1, 2, 3]


def test_disconnecting_client_cancels_the_stream(stream_server):
    sent = 'repeat_sent{model="repeat"}'
    cancelled = 'repeat_cancelled{model="repeat"}'
    before = scrape(stream_server)
    host, port = stream_server.http_url.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    body = json.dumps({"IN": list(range(300)), "DELAY_MS": 20}).encode()
    sock.sendall(b"POST /v2/models/repeat/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 5
    while sample(scrape(stream_server), cancelled) < sample(before, cancelled) + 1:
        assert time.monotonic() < deadline, "the model never saw the cancellation"
        time.sleep(0.1)
    produced = sample(scrape(stream_server), sent) - sample(before, sent)
    assert produced < 50, produced  # it stopped, not ran to its 300 responses


def test_statistics_and_first_response_histogram(stream_server, stub):
    list(stub.ModelStreamInfer(iter([_count(3, "s1"), _count(2, "s2")]), timeout=30))
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="count"), timeout=10).model_stats[0]
    responses = stats.response_stats
    assert responses["0"].success.count >= 2 and responses["1"].success.count >= 2
    assert responses["2"].success.count >= 1
    assert responses["2"].empty_response.count + responses["3"].empty_response.count >= 1  # the flags-only finals
    assert stats.inference_stats.success.count >= 2
    with urllib.request.urlopen(f"http://{stream_server.http_url}/v2/models/count/stats", timeout=10) as reply:
        rest = json.loads(reply.read())["model_stats"][0]["response_stats"]
    assert rest["0"]["success"]["count"] == responses["0"].success.count
    text = scrape(stream_server)
    assert sample(text, 'nv_inference_first_response_histogram_ms_count{model="count",version="1"}') >= 2
    assert 'nv_inference_first_response_histogram_ms_bucket{le="100.0",model="count",version="1"}' in text or \
        'nv_inference_first_response_histogram_ms_bucket{le="100",model="count",version="1"}' in text


def test_half_close_ends_the_call_after_the_finals(stub):
    replies = list(stub.ModelStreamInfer(iter([_count(4, "h", delay_ms=30)]), timeout=30))
    assert [np.frombuffer(r.infer_response.raw_output_contents[0], "<i4")[0] for r in replies] == [0, 1, 2, 3]
