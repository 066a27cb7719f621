"""REST inference against a real inferd: JSON and binary tensors, nested data, compression both
ways, and every way a request body can be malformed (each answered 400 with a clear message)."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.http_helpers import HEADER_LENGTH, binary_body, call, post_json, split_binary

A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)
SIMPLE = "/v2/models/simple/infer"


@pytest.fixture(scope="module")
def base(models_server) -> str:
    return models_server.http_url


@pytest.fixture(scope="module")
def client(models_server):
    with httpclient.InferenceServerClient(models_server.http_url) as c:
        yield c


def _simple_inputs(binary: bool, a=A, b=B):
    inputs = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        item = httpclient.InferInput(name, list(value.shape), "INT32")
        item.set_data_from_numpy(value, binary_data=binary)
        inputs.append(item)
    return inputs


def _json_input(name, datatype, shape, data):
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


# ---------------------------------------------------------------- tritonclient.http


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_tritonclient_add_sub(client, binary_in, binary_out):
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("OUTPUT0", "OUTPUT1")]
    result = client.infer("simple", _simple_inputs(binary_in), outputs=outputs, request_id="r-1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_version"] == "1"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compression_both_ways(client, algorithm):
    a = np.random.default_rng(1).integers(-100, 100, (8, 16), dtype=np.int32)
    result = client.infer(
        "simple",
        _simple_inputs(True, a, a),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)


def test_tritonclient_bytes_json_and_binary(client):
    text = np.array([["h\u00e9llo".encode()], [b""]], dtype=np.object_)
    for binary in (True, False):
        item = httpclient.InferInput("INPUT0", [2, 1], "BYTES")
        item.set_data_from_numpy(text, binary_data=binary)
        result = client.infer(
            "simple_identity",
            [item],
            outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)],
        )
        got = result.as_numpy("OUTPUT0").tolist()
        # tritonclient hands JSON BYTES back as str, binary ones as bytes
        assert got == (text.tolist() if binary else [[t[0].decode()] for t in text.tolist()])


def test_tritonclient_error_status(client):
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", _simple_inputs(True)[:1])
    assert info.value.status() == "400"
    assert "missing 'INPUT1'" in info.value.message()


# ---------------------------------------------------------------- JSON tensors


def test_json_nested_and_flat_data_agree(base):
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    nested = post_json(
        base,
        SIMPLE,
        {
            "inputs": [
                _json_input("INPUT0", "INT32", [2, 16], a.tolist()),
                _json_input("INPUT1", "INT32", [2, 16], a.reshape(-1).tolist()),
            ]
        },
    )
    assert nested.status == 200, nested.body
    assert nested.headers["content-type"] == "application/json"
    assert HEADER_LENGTH.lower() not in nested.headers
    doc = nested.json()
    assert doc["model_name"] == "simple" and doc["model_version"] == "1" and "id" not in doc
    out0 = doc["outputs"][0]
    assert out0 == {
        "name": "OUTPUT0",
        "datatype": "INT32",
        "shape": [2, 16],
        "data": (a + a).reshape(-1).tolist(),
    }


@pytest.mark.parametrize(
    "datatype, values",
    [
        ("BOOL", [[True, False, True, False]]),
        ("UINT64", [[0, 1, 2**64 - 1, 2**63]]),
        ("INT64", [[-(2**63), -1, 0, 2**63 - 1]]),
        ("INT8", [[-128, 0, 5, 127]]),
        ("FP64", [[0.5, -1e300, 1e-300, 3.0]]),
        ("FP32", [[1, 2, 3.5, -4]]),  # JSON integers are fine for floats
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_json_datatypes_round_trip(base, datatype, values):
    answer = post_json(
        base,
        f"/v2/models/identity_{datatype.lower()}/infer",
        {"inputs": [_json_input("INPUT0", datatype, [1, 4], values)]},
    )
    assert answer.status == 200, answer.body
    assert answer.json()["outputs"][0]["data"] == [float(v) if datatype == "FP32" else v for v in values[0]]


def test_json_non_finite_floats_use_the_literals_tritonclient_sends(base, client):
    values = np.array([[np.nan, np.inf, -np.inf, 1.5]], dtype=np.float32)
    body = (
        '{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,4],"data":[NaN,Infinity,-Infinity,1.5]}]}'
    )
    answer = call(base, "POST", "/v2/models/identity_fp32/infer", body)
    assert answer.status == 200, answer.body
    assert b"[NaN,Infinity,-Infinity,1.5]" in answer.body.replace(b" ", b"")
    item = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    item.set_data_from_numpy(values, binary_data=False)
    result = client.infer(
        "identity_fp32", [item], outputs=[httpclient.InferRequestedOutput("OUTPUT0", False)]
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values)


@pytest.mark.parametrize(
    "model, datatype, shape, data, says",
    [
        ("simple", "INT32", [1, 16], list(range(15)), ["'INPUT0'", "15 elements", "needs 16"]),
        ("simple", "INT32", [2, 16], [list(range(16)), list(range(8))], ["'INPUT0'", "regular"]),
        ("simple", "INT32", [1, 16], [0.5] * 16, ["'INPUT0'", "non-integer"]),
        ("simple", "INT32", [1, 16], ["1"] * 16, ["'INPUT0'", "strings"]),
        ("simple", "INT32", [1, 16], [True] * 16, ["'INPUT0'", "booleans"]),
        ("simple", "INT32", [1, 16], 7, ["'INPUT0'", "JSON array"]),
        ("identity_int8", "INT8", [1, 4], [1, 2, 3, 300], ["'INPUT0'", "outside the range of INT8"]),
        ("identity_uint8", "UINT8", [1, 4], [1, 2, 3, -1], ["'INPUT0'", "outside the range of UINT8"]),
        ("identity_bool", "BOOL", [1, 4], [1, 0, 1, 0], ["'INPUT0'", "JSON booleans"]),
        ("identity_bytes", "BYTES", [1, 4], ["a", "b", 3, "d"], ["'INPUT0'", "JSON strings"]),
        ("identity_fp16", "FP16", [1, 4], [1.0, 2.0, 3.0, 4.0], ["'INPUT0'", "FP16", "binary"]),
        ("identity_bf16", "BF16", [1, 4], [1.0, 2.0, 3.0, 4.0], ["'INPUT0'", "BF16", "binary"]),
        ("identity_fp32", "FP33", [1, 4], [1.0, 2.0, 3.0, 4.0], ["'INPUT0'", "unknown datatype 'FP33'"]),
        ("identity_fp32", "FP32", [1, -4], [1.0, 2.0, 3.0, 4.0], ["'INPUT0'", "negative dimension"]),
        ("identity_fp32", "FP32", "1x4", [1.0, 2.0, 3.0, 4.0], ["'INPUT0'", "'shape'"]),
        ("identity_fp32", "INT32", [1, 4], [1, 2, 3, 4], ["'INPUT0'", "'INT32'", "expects 'FP32'"]),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("identity") is False and len(v) < 12 else None,
)
def test_json_tensor_errors(base, model, datatype, shape, data, says):
    inputs = [_json_input("INPUT0", datatype, shape, data)]
    if model == "simple":
        inputs.append(_json_input("INPUT1", "INT32", [1, 16], [0] * 16))
    answer = post_json(base, f"/v2/models/{model}/infer", {"inputs": inputs})
    assert answer.status == 400, answer.body
    for text in says:
        assert text in answer.error


def test_half_precision_outputs_are_refused_as_json_but_sent_binary(base):
    x = np.array([[1.0, 2.5, -3.0, 0.5]], dtype=np.float16)
    body, headers = binary_body([("INPUT0", "FP16", x)], outputs=[{"name": "OUTPUT0"}])
    answer = call(base, "POST", "/v2/models/identity_fp16/infer", body, headers)
    assert answer.status == 400 and "FP16" in answer.error and "binary_data" in answer.error
    body, headers = binary_body(
        [("INPUT0", "FP16", x)], outputs=[{"name": "OUTPUT0", "parameters": {"binary_data": True}}]
    )
    answer = call(base, "POST", "/v2/models/identity_fp16/infer", body, headers)
    assert answer.status == 200, answer.body
    _, blobs = split_binary(answer)
    np.testing.assert_array_equal(np.frombuffer(blobs["OUTPUT0"], np.float16).reshape(1, 4), x)


# ---------------------------------------------------------------- binary tensors


def test_binary_response_framing(base):
    body, headers = binary_body(
        [("INPUT0", "INT32", A), ("INPUT1", "INT32", B)],
        outputs=[
            {"name": "OUTPUT1", "parameters": {"binary_data": True}},
            {"name": "OUTPUT0", "parameters": {"binary_data": False}},
        ],
    )
    answer = call(base, "POST", SIMPLE, body, headers)
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"] == "application/octet-stream"
    doc, blobs = split_binary(answer)
    assert [o["name"] for o in doc["outputs"]] == ["OUTPUT1", "OUTPUT0"]
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 64}
    assert doc["outputs"][1]["data"] == (A + B).reshape(-1).tolist()
    np.testing.assert_array_equal(np.frombuffer(blobs["OUTPUT1"], np.int32).reshape(1, 16), A - B)


def test_binary_data_output_applies_to_unlisted_outputs(base):
    body, headers = binary_body(
        [("INPUT0", "INT32", A), ("INPUT1", "INT32", B)], parameters={"binary_data_output": True}
    )
    answer = call(base, "POST", SIMPLE, body, headers)
    _, blobs = split_binary(answer)
    assert list(blobs) == ["OUTPUT0", "OUTPUT1"]
    np.testing.assert_array_equal(np.frombuffer(blobs["OUTPUT0"], np.int32), (A + B).reshape(-1))


def test_mixed_json_and_binary_inputs(base):
    header = json.dumps(
        {
            "inputs": [
                _json_input("INPUT0", "INT32", [1, 16], A.tolist()),
                {
                    "name": "INPUT1",
                    "datatype": "INT32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": 64},
                },
            ]
        }
    ).encode()
    answer = call(base, "POST", SIMPLE, header + B.tobytes(), {HEADER_LENGTH: str(len(header))})
    assert answer.status == 200, answer.body
    assert answer.json()["outputs"][1]["data"] == (A - B).reshape(-1).tolist()


def test_large_tensor_streams_out_and_compresses(base):
    x = np.random.default_rng(3).standard_normal((1, 400_000), dtype=np.float32)  # 1.6 MB each way
    body, headers = binary_body([("INPUT0", "FP32", x)], parameters={"binary_data_output": True})
    for extra in ({}, {"Accept-Encoding": "gzip"}, {"Content-Encoding": "gzip"}):
        sent = gzip.compress(body, 1) if extra.get("Content-Encoding") else body
        answer = call(base, "POST", "/v2/models/identity_dyn/infer", sent, {**headers, **extra})
        assert answer.status == 200, answer.body[:300]
        assert answer.headers.get("content-encoding") == extra.get("Accept-Encoding")
        _, blobs = split_binary(answer)
        np.testing.assert_array_equal(np.frombuffer(blobs["OUTPUT0"], np.float32).reshape(x.shape), x)


def test_chunked_request_body(models_server):
    import http.client

    body, headers = binary_body(
        [("INPUT0", "INT32", A), ("INPUT1", "INT32", B)], outputs=[{"name": "OUTPUT0"}]
    )
    conn = http.client.HTTPConnection("127.0.0.1", models_server.http_port, timeout=30)
    conn.request(
        "POST", SIMPLE, body=iter([body[:10], body[10:100], body[100:]]), headers=headers, encode_chunked=True
    )
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["outputs"][0]["data"] == (A + B).reshape(-1).tolist()
    conn.close()


@pytest.mark.parametrize(
    "encoding, compress",
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, without the zlib wrapper
    ],
)
def test_compressed_request_bodies(base, encoding, compress):
    body, headers = binary_body(
        [("INPUT0", "INT32", A), ("INPUT1", "INT32", B)], outputs=[{"name": "OUTPUT0"}]
    )
    answer = call(base, "POST", SIMPLE, compress(body), {**headers, "Content-Encoding": encoding})
    assert answer.status == 200, answer.body
    assert answer.json()["outputs"][0]["data"] == (A + B).reshape(-1).tolist()


@pytest.mark.parametrize(
    "accept, expected",
    [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("br;q=1.0, deflate;q=0.5", "deflate"),
        ("gzip;q=0, deflate", "deflate"),
        ("br", None),
        ("identity", None),
    ],
)
def test_compressed_responses(base, accept, expected):
    answer = post_json(
        base,
        SIMPLE,
        {
            "inputs": [
                _json_input("INPUT0", "INT32", [1, 16], A.tolist()),
                _json_input("INPUT1", "INT32", [1, 16], B.tolist()),
            ]
        },
        {"Accept-Encoding": accept},
    )
    assert answer.status == 200
    assert answer.headers.get("content-encoding") == expected
    assert json.loads(answer.decoded())["outputs"][1]["data"] == (A - B).reshape(-1).tolist()


# ---------------------------------------------------------------- malformed bodies


def _good_binary():
    return binary_body([("INPUT0", "INT32", A), ("INPUT1", "INT32", B)])


@pytest.mark.parametrize(
    "case, says",
    [
        ("not-json", "malformed JSON"),
        ("json-array", "must be a JSON object"),
        ("no-inputs", "'inputs'"),
        ("header-length-text", "Inference-Header-Content-Length must be a non-negative decimal integer"),
        ("header-length-negative", "Inference-Header-Content-Length must be a non-negative decimal integer"),
        ("header-length-too-big", "but the request body has only"),
        ("header-length-cuts-json", "malformed JSON in the inference request header"),
        ("leftover-bytes", "unexpected additional input data: 3 bytes"),
        ("short-blob", "'INPUT1' has binary_data_size 64 but only 60 bytes"),
        ("binary-without-header", "no valid 'Inference-Header-Content-Length'"),
        ("data-and-binary", "exactly one of"),
        ("no-data", "exactly one of"),
        ("size-not-int", "binary_data_size must be a non-negative integer"),
        ("shared-memory-and-binary", "exactly one of"),
        ("binary-data-not-bool", "'binary_data' must be a boolean"),
        ("bad-parameter-value", "must be a string, number or boolean"),
        ("id-not-string", "'id' must be a string"),
        ("bad-gzip", "not valid gzip"),
        ("unknown-encoding", "unsupported Content-Encoding 'br'"),
        ("truncated-gzip", "truncated"),
    ],
)
def test_malformed_request_bodies(base, case, says):
    body, headers = _good_binary()
    length = int(headers[HEADER_LENGTH])
    doc = json.loads(body[:length])
    blobs = body[length:]

    def rebuild(d):
        header = json.dumps(d).encode()
        return header + blobs, {HEADER_LENGTH: str(len(header))}

    if case == "not-json":
        body, headers = b"{inputs:", {}
    elif case == "json-array":
        body, headers = b"[1, 2]", {}
    elif case == "no-inputs":
        body, headers = b'{"outputs": []}', {}
    elif case == "header-length-text":
        headers[HEADER_LENGTH] = "12a"
    elif case == "header-length-negative":
        headers[HEADER_LENGTH] = "-5"
    elif case == "header-length-too-big":
        headers[HEADER_LENGTH] = str(len(body) + 1)
    elif case == "header-length-cuts-json":
        headers[HEADER_LENGTH] = str(length - 5)
    elif case == "leftover-bytes":
        body += b"xyz"
    elif case == "short-blob":
        body = body[:-4]
    elif case == "binary-without-header":
        del headers[HEADER_LENGTH]
        body = body[:length]
    elif case == "data-and-binary":
        doc["inputs"][0]["data"] = A.tolist()
        body, headers = rebuild(doc)
    elif case == "no-data":
        del doc["inputs"][0]["parameters"]
        body, headers = rebuild(doc)
    elif case == "size-not-int":
        doc["inputs"][0]["parameters"]["binary_data_size"] = "64"
        body, headers = rebuild(doc)
    elif case == "shared-memory-and-binary":  # an input takes its data from one place
        doc["inputs"][0]["parameters"].update({"shared_memory_region": "r", "shared_memory_byte_size": 64})
        body, headers = rebuild(doc)
    elif case == "binary-data-not-bool":
        doc["outputs"] = [{"name": "OUTPUT0", "parameters": {"binary_data": "yes"}}]
        body, headers = rebuild(doc)
    elif case == "bad-parameter-value":
        doc["parameters"] = {"tag": [1, 2]}
        body, headers = rebuild(doc)
    elif case == "id-not-string":
        doc["id"] = 5
        body, headers = rebuild(doc)
    elif case == "bad-gzip":
        headers["Content-Encoding"] = "gzip"
    elif case == "unknown-encoding":
        headers["Content-Encoding"] = "br"
    elif case == "truncated-gzip":
        body, headers["Content-Encoding"] = gzip.compress(body)[:-12], "gzip"
    answer = call(base, "POST", SIMPLE, body, headers)
    assert answer.status == 400, (answer.status, answer.body)
    assert says in answer.error, answer.error


def test_raw_binary_request_is_not_implemented(base):
    answer = call(base, "POST", SIMPLE, A.tobytes() + B.tobytes(), {HEADER_LENGTH: "0"})
    assert answer.status == 501 and "raw binary request" in answer.error


def test_unknown_model_and_version(base):
    body, headers = _good_binary()
    answer = call(base, "POST", "/v2/models/no_such_model/infer", body, headers)
    assert answer.status == 404 and "no_such_model" in answer.error
    answer = call(base, "POST", "/v2/models/simple/versions/9/infer", body, headers)
    assert answer.status == 404 and "'simple' version 9" in answer.error
    answer = call(base, "POST", "/v2/models/simple/versions/1/infer", body, headers)
    assert answer.status == 200


def test_server_still_serves_after_bad_requests(base, models_server):
    body, headers = _good_binary()
    answer = call(base, "POST", SIMPLE, body, headers)
    assert answer.status == 200
    assert "Traceback" not in models_server.log()


def test_client_leaving_mid_body_harms_nothing(models_server):
    import socket

    body, headers = _good_binary()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", models_server.http_port), timeout=10) as sock:
        sock.sendall(
            f"POST {SIMPLE} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
            + body[:20]
        )
    with socket.create_connection(("127.0.0.1", models_server.http_port), timeout=10) as sock:
        sock.sendall(
            f"POST {SIMPLE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{head}\r\nzz\r\n".encode()
        )
        assert sock.recv(100).split(b" ")[1] == b"400"  # aiohttp's own parser answers this one
    answer = call(models_server.http_url, "POST", SIMPLE, body, headers)
    assert answer.status == 200
    assert "Traceback" not in models_server.log()
