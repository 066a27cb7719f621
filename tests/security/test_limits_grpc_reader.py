"""gRPC memory held per connection and per request: a client that stops reading (a client process
frozen with SIGSTOP while its large responses are on the way) loses its connection to the server's
keepalive and what it held is freed; refused requests are not kept; answered ones should not be
kept until their deadline (the scheduler releases a finished request's data)."""

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
    channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.max_receive_message_length", -1)])
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    calls = []
    for _ in range(4):  # tiny requests, 64 MiB answers: only the answers are in flight
        request = pb.ModelInferRequest(model_name="fill", raw_input_contents=[
            np.array([1, 16 * 2**20], np.int64).tobytes()])
        request.inputs.add(name="SHAPE", datatype="INT64", shape=[2])
        calls.append(stub.ModelInfer.future(request))  # no deadline: see the last test
    print("sent", flush=True)
    time.sleep(600)
""")


def _fill_model(repo) -> None:
    """``fill``: SHAPE (INT64 [2]) -> OUTPUT0, FP32 ones of that shape (ConstantOfShape)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ConstantOfShape", ["SHAPE"], ["OUTPUT0"],
                            value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    graph = helper.make_graph([node], "fill", [helper.make_tensor_value_info("SHAPE", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["a", "b"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (repo / "fill" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "fill" / "1" / "model.onnx"))
    (repo / "fill" / "config.pbtxt").write_text(
        'backend: "onnxruntime"\nmax_batch_size: 0\n'
        'input [ { name: "SHAPE" data_type: TYPE_INT64 dims: [ 2 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]\n'
        'instance_group [ { kind: KIND_CPU count: 1 } ]\n')



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


def test_client_that_stops_reading_does_not_pin_memory(tmp_path, start_server):
    _fill_model(tmp_path)
    srv = start_server([tmp_path], "--grpc-keepalive-time=1000", "--grpc-keepalive-timeout=1000")
    base = rss(srv.proc.pid)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, srv.grpc_url], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert client.stdout.readline().strip() == b"sent"
        deadline = time.monotonic() + 30
        while rss(srv.proc.pid) - base < 48 * MiB:  # the first answer is being made
            assert time.monotonic() < deadline, "the server never made the answers"
            time.sleep(0.002)
        client.send_signal(signal.SIGSTOP)  # alive, connected, reading nothing, answering no ping
        while rss(srv.proc.pid) - base < 160 * MiB:  # the others are made and wait to be sent
            assert time.monotonic() < deadline, "the server did not hold the answers"
            time.sleep(0.05)
        time.sleep(0.5)
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


def _send(srv, count: int, input_name: str, timeout: float | None) -> None:
    import grpc
    import numpy as np

    from server.protos import grpc_service_pb2 as pb
    from server.protos import grpc_service_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    data = np.ones(8 * 2**20, np.float32).tobytes()  # 32 MiB
    with grpc.insecure_channel(srv.grpc_url, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(count):
            request = pb.ModelInferRequest(model_name="identity_dyn", raw_input_contents=[data])
            request.inputs.add(name=input_name, datatype="FP32", shape=[1, 8 * 2**20])
            try:
                stub.ModelInfer(request, timeout=timeout)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()


def test_failed_requests_are_not_kept(test_models, start_server):
    """Each refused 32 MiB request used to stay in memory (grpc.aio keeps the handler's exception in
    a reference cycle whose frames hold the request): +80 MiB per request."""
    srv = start_server([test_models])
    _send(srv, 2, "WRONG", 60)
    base = rss(srv.proc.pid)
    _send(srv, 10, "WRONG", 60)
    grown = rss(srv.proc.pid) - base
    assert grown < 100 * MiB, f"RSS grew by {grown / MiB:.0f} MiB over 10 refused 32 MiB requests"


def test_answered_requests_are_not_kept_until_their_deadline(test_models, start_server):
    srv = start_server([test_models])
    _send(srv, 2, "INPUT0", 120)
    base = rss(srv.proc.pid)
    _send(srv, 10, "INPUT0", 120)
    grown = rss(srv.proc.pid) - base
    assert grown < 150 * MiB, f"RSS grew by {grown / MiB:.0f} MiB over 10 answered 32 MiB requests"
