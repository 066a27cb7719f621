"""API keys (Authorization: Bearer, tenants from a file and the environment, never logged) and Triton's
restricted APIs (--grpc-restricted-protocol / --http-restricted-api with Triton's codes and texts),
driven with tritonclient, grpc stubs and http.client."""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.request

import grpc
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.security.helpers import repository, simple_inputs, wait_exit

ALICE = "alice-0123456789abcdef-secret"
BOB = "bob-fedcba9876543210-secret"
CAROL = "carol-from-the-environment-key"  # from INFERD_API_KEYS
ADMIN = "s3cret-admin-value"


def _request(proc, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
             port: int | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port or proc.http_port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), data


def _metric(proc, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def keyed(tmp_path, start_server):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# tenants\nalice:{ALICE}\n\nbob: {BOB}\n")
    proc = start_server([repository(tmp_path / "repo")], f"--api-key-file={keys}", "--log-verbose=1",
                        env={"INFERD_API_KEYS": f"carol:{CAROL}"})
    return proc, keys


def test_grpc_api_keys(keyed):
    proc, _ = keyed
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    assert client.is_server_ready()  # health needs no key: probes keep working
    assert client.is_model_ready("simple")
    for headers in ({}, {"authorization": "Bearer wrong-key-0123456789"}, {"authorization": ALICE},
                    {"authorization": f"Basic {ALICE}"}):
        with pytest.raises(InferenceServerException) as err:
            client.infer("simple", simple_inputs(), headers=headers)
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        assert "missing or invalid API key" in err.value.message()
    for key in (ALICE, BOB, CAROL):
        result = client.infer("simple", simple_inputs(), headers={"authorization": f"Bearer {key}"})
        assert result.as_numpy("OUTPUT0")[0, 15] == 16
    # the scheme is case-insensitive; metadata RPCs need a key too
    assert client.get_model_metadata("simple", headers={"authorization": f"bearer {ALICE}"}).name == "simple"
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("simple")
    # a stream without a key is refused before any request is read
    with grpc.insecure_channel(proc.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="simple")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client.close()
    assert _metric(proc, "inferd_rejected_requests_total", reason="unauthenticated", tenant="anonymous") == 6


def test_rest_api_keys(keyed):
    proc, _ = keyed
    assert _request(proc, "GET", "/v2/health/ready")[0] == 200
    assert _request(proc, "GET", "/v2/models/simple/ready")[0] == 200
    status, headers, body = _request(proc, "GET", "/v2/models/simple")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(body) == {"error": "missing or invalid API key: send the header "
                                         "'Authorization: Bearer <key>'"}
    wrong = {"Authorization": "Bearer nope-nope-nope-nope"}
    assert _request(proc, "GET", "/v2/models/simple", wrong)[0] == 401
    assert _request(proc, "GET", "/v2/models/simple", {"Authorization": f"Bearer {BOB}"})[0] == 200
    # an inference request without a key is refused before its body is read
    status, _, _ = _request(proc, "POST", "/v2/models/simple/infer", body=b"{" * 1000)
    assert status == 401
    client = httpclient.InferenceServerClient(proc.http_url)
    result = client.infer("simple", simple_inputs(httpclient), headers={"Authorization": f"Bearer {CAROL}"})
    assert result.as_numpy("OUTPUT1")[0, 0] == -1
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", simple_inputs(httpclient))
    assert "401" in str(err.value.status()) or "API key" in str(err.value)
    client.close()
    # the metrics port stays open without --metrics-require-api-key
    assert _metric(proc, "inferd_rejected_requests_total", reason="unauthenticated") >= 4


def test_key_file_reload_and_no_key_in_logs(keyed):
    proc, keys = keyed
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    dave = "dave-added-while-running-0001"
    keys.write_text(f"alice:{ALICE}\ndave:{dave}\n")  # bob removed, dave added
    time.sleep(1.1)  # the file is checked at most once a second
    client.infer("simple", simple_inputs(), headers={"authorization": f"Bearer {dave}"})
    with pytest.raises(InferenceServerException):
        client.infer("simple", simple_inputs(), headers={"authorization": f"Bearer {BOB}"})
    _request(proc, "GET", "/v2/models/simple", {"Authorization": f"Bearer {ALICE}"})
    _request(proc, "GET", "/v2/models/simple", {"Authorization": "Bearer almost-" + ALICE})
    client.close()
    log = proc.log()
    assert "API key file reloaded" in log and "alice" in log  # tenants may be named, keys never
    for key in (ALICE, BOB, CAROL, dave):
        assert key not in log
        assert key[-14:] not in log  # no fragment either


def test_metrics_port_can_require_a_key(tmp_path, start_server):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"prometheus:{ALICE}\n")
    proc = start_server([repository(tmp_path / "repo")], f"--api-key-file={keys}",
                        "--metrics-require-api-key")
    status, headers, _ = _request(proc, "GET", "/metrics", port=proc.metrics_port)
    assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
    status, _, body = _request(proc, "GET", "/metrics", {"Authorization": f"Bearer {ALICE}"},
                               port=proc.metrics_port)
    assert status == 200
    assert b'inferd_rejected_requests_total{reason="unauthenticated",tenant="anonymous"} 1.0' in body


@pytest.mark.parametrize("text, message", [
    ("alice\n", "line 1: expected 'tenant:key'"),
    ("alice:short\n", "the key of tenant 'alice' must be at least 16 characters"),
    (f"al ice:{ALICE}\n", "line 1: the tenant name must be"),
    (f"a:{ALICE}\nb:{ALICE}\n", "line 2: the key of tenant 'b' is listed twice"),
    ("# nothing\n", "no API keys in"),
])
def test_bad_key_file_stops_the_start(tmp_path, start_server, text, message):
    keys = tmp_path / "keys.txt"
    keys.write_text(text)
    proc = start_server([repository(tmp_path / "repo")], f"--api-key-file={keys}", wait_ready=False)
    assert wait_exit(proc) != 0
    assert message in proc.log()


# ---------------------------------------------------------------- restricted APIs (Triton's)

@pytest.fixture
def restricted(tmp_path, start_server):
    return start_server([repository(tmp_path / "repo")], "--log-verbose=1", "--model-control-mode=explicit",
                        "--load-model=*",
                        f"--grpc-restricted-protocol=model-repository,trace:admin-key={ADMIN}",
                        "--grpc-restricted-protocol=statistics:stats-key=stats-value",
                        f"--http-restricted-api=model-repository,trace,logging:admin-key={ADMIN}")


def test_grpc_restricted_protocol(restricted):
    proc = restricted
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    _check = "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"
    for call in (lambda h: client.get_model_repository_index(headers=h),
                 lambda h: client.get_trace_settings(headers=h),
                 lambda h: client.load_model("simple", headers=h)):
        for headers in ({}, {"triton-grpc-protocol-admin-key": "wrong"}, {"admin-key": ADMIN}):
            with pytest.raises(InferenceServerException) as err:
                call(headers)
            assert err.value.status() == "StatusCode.UNAVAILABLE"
            assert err.value.message() == _check
        call({"triton-grpc-protocol-admin-key": ADMIN})
    with pytest.raises(InferenceServerException) as err:
        client.get_inference_statistics("simple")
    assert "expecting header 'triton-grpc-protocol-stats-key'" in err.value.message()
    stats = client.get_inference_statistics("simple",
                                            headers={"triton-grpc-protocol-stats-key": "stats-value"})
    assert stats.model_stats[0].name == "simple"
    # groups not listed stay open
    assert client.infer("simple", simple_inputs()).as_numpy("OUTPUT0")[0, 0] == 1
    assert client.get_model_metadata("simple").name == "simple"
    client.close()
    assert ADMIN not in proc.log()


def test_grpc_restricted_stream_refused_before_reading(tmp_path, start_server):
    proc = start_server([repository(tmp_path / "repo")], "--grpc-restricted-protocol=inference:k=v")
    with grpc.insecure_channel(proc.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="simple")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "This protocol is restricted, expecting header 'triton-grpc-protocol-k'"
        metadata = (("triton-grpc-protocol-k", "v"),)
        replies = list(stub.ModelStreamInfer(iter([]), metadata=metadata, timeout=10))
        assert replies == []


def test_http_restricted_api(restricted):
    proc = restricted
    expected = {"error": "This API is restricted, expecting header 'admin-key'"}
    for method, path in (("POST", "/v2/repository/index"), ("GET", "/v2/trace/setting"),
                         ("POST", "/v2/trace/setting"), ("GET", "/v2/models/simple/trace/setting"),
                         ("GET", "/v2/logging"), ("POST", "/v2/repository/models/simple/load")):
        body = b'{"trace_rate": "1"}' if method == "POST" else None
        status, _, body = _request(proc, method, path, body=body)
        assert (status, json.loads(body)) == (403, expected), path
        status, _, _ = _request(proc, method, path, {"admin-key": "wrong"})
        assert status == 403
    # the attack of issue 14: 100% tracing for everyone without a credential is refused
    status, _, _ = _request(proc, "POST", "/v2/trace/setting", body=b'{"trace_rate": "1"}')
    assert status == 403
    status, _, body = _request(proc, "POST", "/v2/repository/index", {"Admin-Key": ADMIN})
    assert status == 200 and json.loads(body)[0]["name"] == "simple"
    status, _, _ = _request(proc, "GET", "/v2/trace/setting", {"admin-key": ADMIN})
    assert status == 200
    # statistics is restricted on gRPC only; inference and metadata are open on both
    assert _request(proc, "GET", "/v2/models/simple/stats")[0] == 200
    client = httpclient.InferenceServerClient(proc.http_url)
    assert client.infer("simple", simple_inputs(httpclient)).as_numpy("OUTPUT0")[0, 0] == 1
    with pytest.raises(InferenceServerException) as err:
        client.get_model_repository_index()
    assert "This API is restricted, expecting header 'admin-key'" in str(err.value)
    assert client.get_model_repository_index(headers={"admin-key": ADMIN})[0]["name"] == "simple"
    client.close()
    assert ADMIN not in proc.log()
    assert _metric(proc, "inferd_rejected_requests_total", reason="restricted", tenant="anonymous") >= 13


@pytest.mark.parametrize("flag, message", [
    ("--grpc-restricted-protocol=bogus:k=v", "unknown restricted protocol 'bogus'"),
    ("--http-restricted-api=bogus:k=v", "unknown restricted api 'bogus'"),
    ("--http-restricted-api=trace:k", "expects <group>[,<group>...]:<key>=<value>"),
])
def test_bad_restriction_flags(tmp_path, start_server, flag, message):
    proc = start_server([repository(tmp_path / "repo")], flag, wait_ready=False)
    assert wait_exit(proc) != 0
    assert message in proc.log()


def test_group_in_two_rules_is_refused(tmp_path, start_server):
    proc = start_server([repository(tmp_path / "repo")], "--http-restricted-api=trace:a=1",
                        "--http-restricted-api=trace,logging:b=2", wait_ready=False)
    assert wait_exit(proc) != 0
    assert re.search(r"restricted api 'trace' can not be specified in multiple config groups", proc.log())


def test_health_can_be_restricted_and_needs_no_key(tmp_path, start_server):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{ALICE}\n")
    proc = start_server([repository(tmp_path / "repo")], f"--api-key-file={keys}",
                        "--http-restricted-api=health:probe-token=kubelet")
    status, _, body = _request(proc, "GET", "/v2/health/ready")
    expected = {"error": "This API is restricted, expecting header 'probe-token'"}
    assert (status, json.loads(body)) == (403, expected)
    assert _request(proc, "GET", "/v2/health/ready", {"probe-token": "kubelet"})[0] == 200  # no key needed
    assert _request(proc, "GET", "/v2/models/simple/ready", {"probe-token": "kubelet"})[0] == 200
    assert _request(proc, "GET", "/v2/models/simple", {"probe-token": "kubelet"})[0] == 401


def test_refused_before_the_body_is_sent(keyed):
    """A 1 GB upload without a key is answered from its headers alone, while its body is not sent."""
    import socket

    proc, _ = keyed
    with socket.create_connection(("127.0.0.1", proc.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n" + b"{" * 1000)
        started = time.monotonic()
        reply = b""
        while b"API key" not in reply:
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
        assert time.monotonic() - started < 5
    assert reply.startswith(b"HTTP/1.1 401 ")
