"""A gRPC client that stops reading (here: a client process frozen with SIGSTOP while its large
responses are on the way) cannot pin the server's memory: the server's keepalive ping goes
unanswered, the connection is closed and what it held is freed."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from tests.harness import ROOT
from tests.security.memory import MiB, rss

CLIENT = textwrap.dedent("""
    import sys, time
    import grpc, numpy as np
    from server.protos import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
    channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.max_receive_message_length", -1),
                                                          ("grpc.max_send_message_length", -1)])
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    data = np.ones(16 * 2**20, np.float32).tobytes()  # 64 MiB
    calls = []
    for _ in range(4):
        request = pb.ModelInferRequest(model_name="identity_dyn", raw_input_contents=[data])
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16 * 2**20])
        calls.append(stub.ModelInfer.future(request))  # no deadline: see test_deadline_retention
    print("sent", flush=True)
    time.sleep(600)
""")


def _warm_up(srv) -> None:
    import grpc
    import numpy as np

    from server.protos import grpc_service_pb2 as pb
    from server.protos import grpc_service_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(srv.grpc_url, options=options) as channel:
        request = pb.ModelInferRequest(model_name="identity_dyn",
                                       raw_input_contents=[np.ones(16 * 2**20, np.float32).tobytes()])
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16 * 2**20])
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)


def _established(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def test_client_that_stops_reading_does_not_pin_memory(test_models, start_server):
    srv = start_server([test_models], "--grpc-keepalive-time=1000", "--grpc-keepalive-timeout=1000",
                       "--grpc-max-message-bytes=100000000")
    _warm_up(srv)  # onnxruntime keeps an arena sized for the largest tensor it has seen
    base = rss(srv.proc.pid)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, srv.grpc_url], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert client.stdout.readline().strip() == b"sent"
        deadline = time.monotonic() + 30
        while rss(srv.proc.pid) - base < 128 * MiB:  # requests arriving, responses on their way
            assert time.monotonic() < deadline, "the server never received the requests"
            time.sleep(0.01)
        time.sleep(0.5)
        client.send_signal(signal.SIGSTOP)  # alive, connected, reading nothing, answering no ping
        held = rss(srv.proc.pid) - base
        assert _established(srv.grpc_port) == 1
        deadline = time.monotonic() + 20
        while _established(srv.grpc_port):  # keepalive ping unanswered -> the server closes it
            assert time.monotonic() < deadline, "the server kept the frozen client's connection"
            time.sleep(0.1)
        time.sleep(1)
        left = rss(srv.proc.pid) - base
        assert left < held - 16 * MiB, f"{left / MiB:.0f} MiB still held ({held / MiB:.0f} MiB when it froze)"
    finally:
        client.send_signal(signal.SIGCONT)
        client.kill()
        client.wait()
    assert srv.proc.poll() is None
