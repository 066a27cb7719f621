"""Sizes and shapes taken from a request are checked against what arrived before anything is
allocated from them, and malformed input is always INVALID_ARGUMENT / 400 with a message, never
an internal error: a BYTES input declaring 500 million elements with one in its payload, rank-65
shapes, negative and int64-overflowing dimensions, 100,000-level nested JSON."""

from __future__ import annotations

import json
import struct
import time

import grpc
import numpy as np
import pytest

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.http_helpers import HEADER_LENGTH, call
from tests.security.memory import MiB, peak, reset_peak

HUGE = [1, 500_000_000]
ONE_ELEMENT = struct.pack("<I", 4) + b"abcd"


@pytest.fixture(scope="module")
def srv(test_models, tmp_path_factory):
    from tests.harness import ServerProcess

    proc = ServerProcess([test_models])
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-malformed.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(srv):
    with grpc.insecure_channel(srv.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _grpc_error(stub, request: pb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    return info.value


def _rest(srv, model: str, doc: dict, blob: bytes = b"") -> tuple[int, str]:
    header = json.dumps(doc).encode()
    headers = {HEADER_LENGTH: str(len(header))} if blob else {"Content-Type": "application/json"}
    answer = call(srv.http_url, "POST", f"/v2/models/{model}/infer", header + blob, headers)
    return answer.status, answer.error


def _bounded(srv, send) -> None:
    """``send`` is refused at once (< 1 s) and the server's peak RSS grows by less than 32 MiB."""
    base = reset_peak(srv.proc.pid)
    start = time.monotonic()
    send()
    elapsed = time.monotonic() - start
    grown = peak(srv.proc.pid) - base
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert grown < 32 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB"


# ---------------------------------------------------------------- declared shape vs. payload


@pytest.mark.parametrize("model", ["identity_bytes", "no_such_model"])
def test_grpc_raw_bytes_huge_shape_is_refused_without_allocating(srv, stub, model):
    def send():
        request = pb.ModelInferRequest(model_name=model, raw_input_contents=[ONE_ELEMENT])
        request.inputs.add(name="INPUT0", datatype="BYTES", shape=HUGE)
        err = _grpc_error(stub, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "expected 500000000 elements" in err.details() and "INPUT0" in err.details()

    _bounded(srv, send)


def test_grpc_typed_bytes_huge_shape_is_refused_without_allocating(srv, stub):
    def send():
        request = pb.ModelInferRequest(model_name="identity_bytes")
        request.inputs.add(name="INPUT0", datatype="BYTES", shape=HUGE).contents.bytes_contents.append(b"abcd")
        err = _grpc_error(stub, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()

    _bounded(srv, send)


@pytest.mark.parametrize("model", ["identity_bytes", "no_such_model"])
def test_rest_binary_bytes_huge_shape_is_refused_without_allocating(srv, model):
    def send():
        doc = {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": HUGE,
                           "parameters": {"binary_data_size": len(ONE_ELEMENT)}}]}
        status, error = _rest(srv, model, doc, ONE_ELEMENT)
        assert status == 400 and "expected 500000000 elements" in error, (status, error)

    _bounded(srv, send)


def test_rest_json_bytes_huge_shape_is_refused_without_allocating(srv):
    def send():
        doc = {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": HUGE, "data": ["abcd"]}]}
        status, error = _rest(srv, "identity_bytes", doc)
        assert status == 400 and "INPUT0" in error, (status, error)

    _bounded(srv, send)


def test_valid_bytes_still_served(srv, stub):
    request = pb.ModelInferRequest(model_name="identity_bytes", raw_input_contents=[ONE_ELEMENT * 4])
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 4])
    response = stub.ModelInfer(request, timeout=30)
    assert response.raw_output_contents[0] == ONE_ELEMENT * 4


# ---------------------------------------------------------------- malformed shapes and JSON

BAD_SHAPES = {
    "rank 65": ([1] * 65, "at most 64 dimensions"),
    "negative": ([-2, -2], "negative dimension"),
    "int64 overflow": ([2**62, 2**62, 0], "exceeds the int64 range"),
    "int64 overflow, nonzero": ([2**40, 2**40], "exceeds the int64 range"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHAPES))
@pytest.mark.parametrize("how", ["raw", "typed"])
def test_grpc_bad_shapes_are_invalid_argument(stub, case, how):
    shape, text = BAD_SHAPES[case]
    request = pb.ModelInferRequest(model_name="identity_fp32")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=shape)
    if how == "raw":
        request.raw_input_contents.append(np.zeros(4, np.float32).tobytes())
    else:
        tensor.contents.fp32_contents.extend([0.0] * 4)
    err = _grpc_error(stub, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert text in err.details() and "INPUT0" in err.details()


@pytest.mark.parametrize("case", sorted(BAD_SHAPES))
@pytest.mark.parametrize("how", ["json", "binary"])
def test_rest_bad_shapes_are_400(srv, case, how):
    shape, text = BAD_SHAPES[case]
    entry = {"name": "INPUT0", "datatype": "FP32", "shape": shape}
    blob = b""
    if how == "json":
        entry["data"] = [0.0] * 4
    else:
        blob = np.zeros(4, np.float32).tobytes()
        entry["parameters"] = {"binary_data_size": len(blob)}
    status, error = _rest(srv, "identity_fp32", {"inputs": [entry]}, blob)
    assert status == 400 and text in error, (status, error)


def test_rest_shape_beyond_int64_is_400(srv):
    entry = {"name": "INPUT0", "datatype": "FP32", "shape": [2**70], "data": [0.0]}
    status, error = _rest(srv, "identity_fp32", {"inputs": [entry]})
    assert status == 400, (status, error)


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_rest_deeply_nested_json_is_400(srv, depth):
    body = b"[" * depth + b"]" * depth
    answer = call(srv.http_url, "POST", "/v2/models/identity_fp32/infer", body,
                  {"Content-Type": "application/json"})
    assert answer.status == 400 and answer.error, (answer.status, answer.body[:200])


def test_rest_deeply_nested_data_is_400(srv):
    nested = "[" * 1000 + '"a"' + "]" * 1000
    body = f'{{"inputs":[{{"name":"INPUT0","datatype":"BYTES","shape":[1,4],"data":{nested}}}]}}'
    answer = call(srv.http_url, "POST", "/v2/models/identity_bytes/infer", body,
                  {"Content-Type": "application/json"})
    assert answer.status == 400, (answer.status, answer.body[:200])


def test_rest_deeply_nested_numbers_is_400(srv):
    nested = "[" * 900 + "1" + "]" * 900
    body = f'{{"inputs":[{{"name":"INPUT0","datatype":"FP32","shape":[1,4],"data":{nested}}}]}}'
    answer = call(srv.http_url, "POST", "/v2/models/identity_fp32/infer", body,
                  {"Content-Type": "application/json"})
    assert answer.status == 400, (answer.status, answer.body[:200])
