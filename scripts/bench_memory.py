"""Peak memory per request: how much a large FP32 identity round trip raises the server's RSS.

    .venv/bin/python scripts/bench_memory.py                     # 64 MiB and 256 MiB, gRPC and REST
    .venv/bin/python scripts/bench_memory.py --sizes 64 --repeat 3
    .venv/bin/python scripts/bench_memory.py --source /tmp/old   # the same against another checkout

Builds an identity model (FP32 [batch, n], ONNX Runtime) in a temporary folder, starts ``inferd``
from ``--source`` on free loopback ports with request limits raised to fit the tensors, and for each
(transport, size) sends one warm-up request, resets the server's peak RSS (``/proc/<pid>/clear_refs``
5, which sets VmHWM to the current RSS), sends ``--repeat`` requests one after the other and reads
VmHWM. It prints the peak growth over (request + response bytes); the target of docs/limits.md is
at most 2.5 for gRPC and REST binary. gRPC uses a raw ``raw_input_contents`` request; REST binary
the binary tensor extension with a binary output; REST JSON (smaller sizes: JSON text is bounded by
--http-max-input-size) JSON numbers both ways, its ratio is over the JSON text moved. Clients run in this process, so their own copies do not count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _grpc_call(stub, pb, data: np.ndarray) -> int:
    request = pb.ModelInferRequest(model_name="identity", raw_input_contents=[data.tobytes()])
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, data.size])
    response = stub.ModelInfer(request, timeout=120)
    assert len(response.raw_output_contents[0]) == data.nbytes
    return request.ByteSize() + response.ByteSize()


def _rest_call(port: int, data: np.ndarray) -> int:
    header = json.dumps({
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, data.size],
                    "parameters": {"binary_data_size": data.nbytes}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v2/models/identity/infer", body=header + data.tobytes(),
                      headers={"Inference-Header-Content-Length": str(len(header))})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body[:300]
    finally:
        conn.close()
    return len(header) + data.nbytes + len(body)


def _rest_json_call(port: int, data: np.ndarray) -> int:
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, data.size],
                                   "data": data.tolist()}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v2/models/identity/infer", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        reply = response.read()
        assert response.status == 200, reply[:300]
    finally:
        conn.close()
    return len(body) + len(reply)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="tensor sizes in MiB")
    parser.add_argument("--json-sizes", type=int, nargs="*", default=[4, 8],
                        help="tensor sizes in MiB for REST JSON (its text is ~5x the tensor)")
    parser.add_argument("--repeat", type=int, default=2, help="measured requests per case")
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout whose server to start")
    args = parser.parse_args()

    import onnx_models

    from server.protos import grpc_service_pb2 as pb
    from server.protos import grpc_service_pb2_grpc as pb_grpc

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        onnx_models.identity(repo / "identity" / "1" / "model.onnx", "FP32", ("batch", "n"))
        (repo / "identity" / "config.pbtxt").write_text("instance_group [ { kind: KIND_CPU count: 1 } ]\n")
        grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
        limit = str(max(args.sizes) * MiB + MiB)
        argv = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--model-repository", str(repo),
                "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                "--grpc-max-message-bytes", limit]
        usage = subprocess.run([sys.executable, "-m", "server.cli", "--help"], cwd=args.source,
                               capture_output=True, text=True).stdout
        if "--http-max-input-size" in usage:  # older checkouts bounded REST by the gRPC flag
            argv += ["--http-max-input-size", limit]
        log = open(Path(tmp) / "inferd.log", "wb")
        proc = subprocess.Popen(argv, cwd=args.source, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(args.source)})
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[
            ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit((Path(tmp) / "inferd.log").read_text())
                time.sleep(0.2)
            print(f"server: {args.source}  (RSS at start {_status(proc.pid, 'VmRSS') / MiB:.0f} MiB)")
            print(f"{'transport':<12}{'tensor':>8}{'req+resp':>10}{'peak growth':>13}{'ratio':>7}{'seconds':>9}")
            calls = {"gRPC": lambda d: _grpc_call(stub, pb, d), "REST binary": lambda d: _rest_call(http_port, d),
                     "REST JSON": lambda d: _rest_json_call(http_port, d)}
            for transport, call in calls.items():
                for size in args.json_sizes if transport == "REST JSON" else args.sizes:
                    data = np.random.default_rng(0).random(size * MiB // 4, dtype=np.float32)
                    send = lambda: call(data)  # noqa: E731
                    send()  # warm-up: allocator and session state of this size
                    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
                    base = _status(proc.pid, "VmRSS")
                    start = time.monotonic()
                    moved = max(send() for _ in range(args.repeat))
                    elapsed = (time.monotonic() - start) / args.repeat
                    grown = _status(proc.pid, "VmHWM") - base
                    print(f"{transport:<12}{size:>6}Mi{moved / MiB:>8.0f}Mi{grown / MiB:>11.0f}Mi"
                          f"{grown / moved:>7.2f}{elapsed:>9.2f}", flush=True)
        finally:
            channel.close()
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
