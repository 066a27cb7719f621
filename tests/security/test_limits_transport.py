"""Transport limits through real clients: the REST and gRPC request size limits, gzip bombs, failed
parses that must not keep their bodies, slowloris connections, the REST connection cap, and
accept errors at the open-files limit that must neither stop established connections nor flood
the log."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import zlib

import grpc
import numpy as np
import pytest

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.http_helpers import HEADER_LENGTH, call
from tests.security.memory import MiB, peak, reset_peak, rss

INFER = "/v2/models/identity_dyn/infer"


def _fp32_request(count: int) -> tuple[bytes, dict]:
    blob = np.zeros(count, np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, count],
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return header + blob, {HEADER_LENGTH: str(len(header))}


def _bomb(size: int, fill: bytes = b"\0", head: bytes = b"") -> bytes:
    """gzip data that inflates to ``head`` and then ``size`` bytes of ``fill``."""
    engine = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = fill * (1 * MiB)
    parts = [engine.compress(head)] + [engine.compress(chunk) for _ in range(size // MiB)]
    return b"".join(parts) + engine.flush()


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


# ---------------------------------------------------------------- sizes


def test_rest_body_over_the_limit_is_413_without_reading_it(test_models, start_server):
    srv = start_server([test_models], "--http-max-input-size=1048576")
    body, headers = _fp32_request(300_000)  # 1.2 MB
    start = time.monotonic()
    answer = call(srv.http_url, "POST", INFER, body, headers)
    assert answer.status == 413, answer.body
    assert "1048576" in answer.error and "--http-max-input-size" in answer.error
    assert time.monotonic() - start < 2
    body, headers = _fp32_request(200_000)  # 800 KB: under it, served
    assert call(srv.http_url, "POST", INFER, body, headers).status == 200


def test_rest_chunked_body_over_the_limit_is_413(test_models, start_server):
    srv = start_server([test_models], "--http-max-input-size=1048576")
    host, port = srv.http_url.split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     f"{HEADER_LENGTH}: 10\r\n\r\n".encode())
        chunk = b"\0" * 65536
        try:
            for _ in range(40):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(5)
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"--http-max-input-size" in head


def test_grpc_message_over_the_limit_is_resource_exhausted(test_models, start_server):
    srv = start_server([test_models], "--grpc-max-message-bytes=1048576")
    with grpc.insecure_channel(srv.grpc_url, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="identity_dyn",
                                       raw_input_contents=[np.zeros(300_000, np.float32).tobytes()])
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 300_000])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        del request.raw_input_contents[:]
        request.raw_input_contents.append(np.zeros(1000, np.float32).tobytes())
        request.inputs[0].shape[:] = [1, 1000]
        assert len(stub.ModelInfer(request, timeout=10).raw_output_contents[0]) == 4000


def test_default_limits_are_safe(test_models, start_server):
    """Without flags: 64 MiB for REST (Triton's default), 256 MiB for gRPC."""
    srv = start_server([test_models])
    body, headers = _fp32_request(17 * MiB)  # 68 MiB > 64 MiB
    answer = call(srv.http_url, "POST", INFER, body, headers)
    assert answer.status == 413 and str(64 * MiB) in answer.error


# ---------------------------------------------------------------- gzip bombs and failed parses


def test_gzip_bomb_is_refused_quickly_with_bounded_memory(test_models, start_server):
    srv = start_server([test_models])
    bomb = _bomb(1024 * MiB)  # ~1 MiB that inflates to 1 GiB
    assert len(bomb) < 2 * MiB
    base = reset_peak(srv.proc.pid)
    start = time.monotonic()
    answer = call(srv.http_url, "POST", INFER, bomb, {"Content-Encoding": "gzip", HEADER_LENGTH: "10"})
    elapsed = time.monotonic() - start
    grown = peak(srv.proc.pid) - base
    assert answer.status == 413 and "decompressed" in answer.error, answer.body
    assert elapsed < 2, elapsed
    assert grown < 64 * MiB + 48 * MiB, f"peak grew by {grown / MiB:.0f} MiB"


def test_failed_parses_keep_nothing(test_models, start_server):
    """20 small gzip bodies that inflate to 60 MB of non-JSON each: answered 400, and the server's
    RSS afterwards is what it was (a kept body per failed parse would be +1.2 GB)."""
    srv = start_server([test_models])
    bomb = _bomb(60 * MiB, b"x")
    warm = call(srv.http_url, "POST", INFER, bomb, {"Content-Encoding": "gzip"})
    assert warm.status == 400 and "malformed JSON" in warm.error
    base = rss(srv.proc.pid)
    for _ in range(20):
        answer = call(srv.http_url, "POST", INFER, bomb, {"Content-Encoding": "gzip"})
        assert answer.status == 400 and "malformed JSON" in answer.error
    grown = rss(srv.proc.pid) - base
    assert grown < 100 * MiB, f"RSS grew by {grown / MiB:.0f} MiB after 20 failed parses"


def test_event_loop_keeps_answering_during_a_bomb(test_models, start_server):
    """Inflating runs in a worker thread: health answers while 60 MB bodies are inflated (a small
    JSON header and binary zeros, refused once inflated: no JSON parse in the way)."""
    srv = start_server([test_models])
    header, _ = _fp32_request(4)
    header = header[: -16]
    bomb = _bomb(60 * MiB, b"\0", header)
    headers = {"Content-Encoding": "gzip", HEADER_LENGTH: str(len(header))}
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            start = time.monotonic()
            assert call(srv.http_url, "GET", "/v2/health/live").status == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.01)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        for _ in range(3):
            answer = call(srv.http_url, "POST", INFER, bomb, headers)
            assert answer.status == 400 and "additional input data" in answer.error, answer.body
    finally:
        done.set()
        thread.join()
    assert max(latencies) < 1.5, f"health waited {max(latencies):.2f} s"


# ---------------------------------------------------------------- slow and idle connections


def _connect(srv) -> socket.socket:
    host, port = srv.http_url.split(":")
    return socket.create_connection((host, int(port)))


def test_slowloris_connections_are_closed(test_models, start_server):
    srv = start_server([test_models], "--http-header-timeout-secs=1", "--http-keepalive-timeout-secs=30")
    socks = []
    for _ in range(500):
        sock = _connect(srv)
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\n".encode())
        socks.append(sock)
    for _ in range(3):  # keep trickling header bytes: activity must not extend the deadline
        time.sleep(0.3)
        for sock in socks:
            try:
                sock.sendall(b"X")
            except OSError:
                pass
    time.sleep(1.0)
    closed = sum(_closed_by_server(sock, 0.05) for sock in socks)
    for sock in socks:
        sock.close()
    assert closed == 500
    assert call(srv.http_url, "GET", "/v2/health/ready").status == 200


def test_each_request_head_on_a_keepalive_connection_gets_its_own_deadline(test_models, start_server):
    """The head deadline runs from the first byte of each head: a second head that starts 0.6 s after
    the first request is not cut off at the first one's deadline, and is cut off at its own."""
    srv = start_server([test_models], "--http-header-timeout-secs=1", "--http-keepalive-timeout-secs=30")
    with _connect(srv) as sock:
        sock.settimeout(5)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.6)
        started = time.monotonic()
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")  # a head that never ends
        assert not _closed_by_server(sock, 0.7)  # 1.3 s after the first head: still in its own second
        assert _closed_by_server(sock, 3)
        assert 0.9 < time.monotonic() - started < 3


def test_slow_body_is_408(test_models, start_server):
    srv = start_server([test_models], "--http-read-timeout-secs=1")
    with _connect(srv) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
        sock.settimeout(5)
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 408"), head[:200]


def test_idle_keepalive_connection_is_closed(test_models, start_server):
    srv = start_server([test_models], "--http-keepalive-timeout-secs=1")
    with _connect(srv) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert _closed_by_server(sock, 3)


def test_connection_cap(test_models, start_server):
    srv = start_server([test_models], "--http-max-connections=50", "--http-keepalive-timeout-secs=2")
    idle = [_connect(srv) for _ in range(50)]
    time.sleep(0.3)
    extra = [_connect(srv) for _ in range(10)]
    for sock in extra:  # over the cap: a 503 and the connection closed at once
        sock.settimeout(2)
        assert sock.recv(65536).startswith(b"HTTP/1.1 503")
        sock.close()
    # established gRPC connections keep answering health meanwhile
    with grpc.insecure_channel(srv.grpc_url) as channel:
        assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5).live
    time.sleep(2.5)  # the idle ones time out ...
    for sock in idle:
        assert _closed_by_server(sock, 1)
        sock.close()
    assert call(srv.http_url, "GET", "/v2/health/ready").status == 200  # ... and a client is served
    assert srv.log().count("refusing a REST connection") == 1  # rate-limited: one line, not ten


def test_open_files_limit_keeps_established_connections_and_a_quiet_log(test_models, start_server):
    srv = start_server([test_models])
    keep = _connect(srv)
    channel = grpc.insecure_channel(srv.grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    subprocess.run(["prlimit", "--pid", str(srv.proc.pid), "--nofile=256:256"], check=True)
    socks = []
    try:
        host, port = srv.http_url.split(":")
        for _ in range(400):  # more than the server can accept (non-blocking: the backlog fills up)
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((host, int(port)))
            socks.append(sock)
        time.sleep(3)
        log_before = len(srv.log())
        keep.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        keep.settimeout(5)
        reply = keep.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200"), (reply, srv.log()[-3000:])
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        time.sleep(3)
        grown = len(srv.log()) - log_before
        assert grown < 2000, srv.log()[-3000:]
    finally:
        for sock in socks:
            sock.close()
        keep.close()
        channel.close()
    assert srv.log().count("out of system resource") <= 2, srv.log()[-3000:]
