"""Closed-loop benchmark: REST with the binary tensor extension vs gRPC, on one inferd.

    .venv/bin/python scripts/bench_rest.py                  # 10 s per run, concurrency 16
    .venv/bin/python scripts/bench_rest.py --seconds 5 --rounds 3

Builds a repository in a temporary folder (``add_sub``: INT32 [1,16] x 2, dynamic batching, as in
build_models.py; ``identity_4m``: FP32 [1, 1048576] = 4 MiB in and out), starts ``inferd`` on free
loopback ports, checks one answer per transport, then runs each (model, transport) pair for
``--seconds`` with ``--concurrency`` requests always in flight, interleaved over ``--rounds`` (the
median round is reported). Server and client CPU per request are printed too: unlike req/s they
hardly move when other jobs share the machine. Clients are async and run in one process separate
from the server: grpc.aio stubs for gRPC; for REST a minimal keep-alive HTTP/1.1 client with
pre-encoded requests (``--rest-client aiohttp`` uses aiohttp's client instead), so that neither
client is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import onnx_models  # noqa: E402
from build_models import BENCH_CONFIGS  # noqa: E402

from server.protos import grpc_service_pb2 as pb  # noqa: E402
from server.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

WIDTH_4M = 1 << 20  # FP32 elements: 4 MiB
IDENTITY_CONFIG = f"""platform: "onnxruntime_onnx"
max_batch_size: 1
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {WIDTH_4M} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {WIDTH_4M} ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""
_MAX = 2**31 - 1


def build(repo: Path) -> None:
    onnx_models.add_sub(repo / "add_sub" / "1" / "model.onnx")
    (repo / "add_sub" / "config.pbtxt").write_text(BENCH_CONFIGS["add_sub"])
    onnx_models.identity(repo / "identity_4m" / "1" / "model.onnx", "FP32", ("batch", WIDTH_4M))
    (repo / "identity_4m" / "config.pbtxt").write_text(IDENTITY_CONFIG)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workload:
    """One model's request, in both wire forms, and a check of the answer."""

    def __init__(self, model: str, inputs: dict[str, np.ndarray], expect: dict[str, np.ndarray]) -> None:
        self.model = model
        self.expect = expect
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": n,
                        "datatype": _dt(a),
                        "shape": list(a.shape),
                        "parameters": {"binary_data_size": a.nbytes},
                    }
                    for n, a in inputs.items()
                ],
                "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in expect],
            }
        )
        self.rest_body = header + b"".join(a.tobytes() for a in inputs.values())
        self.rest_headers = {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
            "Accept-Encoding": "identity",
        }
        self.grpc_request = pb.ModelInferRequest(model_name=model)
        for n, a in inputs.items():
            self.grpc_request.inputs.add(name=n, datatype=_dt(a), shape=list(a.shape))
            self.grpc_request.raw_input_contents.append(a.tobytes())
        for n in expect:
            self.grpc_request.outputs.add(name=n)

    def check_rest(self, body: bytes, header_length: int) -> None:
        doc = orjson.loads(body[:header_length])
        offset = header_length
        for out in doc["outputs"]:
            size = out["parameters"]["binary_data_size"]
            want = self.expect[out["name"]]
            got = np.frombuffer(body, want.dtype, size // want.itemsize, offset)
            np.testing.assert_array_equal(got.reshape(out["shape"]), want)
            offset += size

    def check_grpc(self, response: pb.ModelInferResponse) -> None:
        for out, raw in zip(response.outputs, response.raw_output_contents):
            want = self.expect[out.name]
            np.testing.assert_array_equal(np.frombuffer(raw, want.dtype).reshape(list(out.shape)), want)


def _dt(a: np.ndarray) -> str:
    return {np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}[a.dtype]


def workloads() -> list[Workload]:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    x = np.random.default_rng(0).standard_normal((1, WIDTH_4M), dtype=np.float32)
    return [
        Workload("add_sub", {"INPUT0": a, "INPUT1": b}, {"OUTPUT0": a + b, "OUTPUT1": a - b}),
        Workload("identity_4m", {"INPUT0": x}, {"OUTPUT0": x}),
    ]


async def closed_loop(call, seconds: float, concurrency: int) -> tuple[int, np.ndarray]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), np.array(latencies) * 1e3


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client (one connection per worker, requests pre-encoded): like
    wrk, it costs the client as little CPU as possible, so the server is what gets measured."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in head[1:] if line)
        headers = {k.lower(): v for k, v in headers.items()}
        body = await reader.readexactly(int(headers["content-length"]))
        self.idle.append((reader, writer))
        return int(head[0].split()[1]), headers, body

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def bench(http_port: int, grpc_port: int, server_pid: int, args) -> list[dict]:
    rows: dict[tuple[str, str], list[dict]] = {}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    options = [("grpc.max_send_message_length", _MAX), ("grpc.max_receive_message_length", _MAX)]
    raw = RawHttp(http_port)
    async with (
        aiohttp.ClientSession(connector=connector, auto_decompress=False) as session,
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}", options=options) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for w in workloads():
            path = f"/v2/models/{w.model}/infer"
            wire = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(w.rest_body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in w.rest_headers.items())
                + "\r\n"
            ).encode() + w.rest_body
            url = f"http://127.0.0.1:{http_port}{path}"

            async def rest(w=w, url=url, wire=wire, check=False) -> None:
                if args.rest_client == "raw":
                    status, headers, body = await raw.post(wire)
                else:
                    async with session.post(url, data=w.rest_body, headers=w.rest_headers) as r:
                        status, headers, body = r.status, r.headers, await r.read()
                if status != 200:
                    raise RuntimeError(f"REST {status}: {body[:300]!r}")
                if check:
                    w.check_rest(body, int(headers["inference-header-content-length"]))

            async def grpc_call(w=w, check=False) -> None:
                response = await stub.ModelInfer(w.grpc_request)
                if check:
                    w.check_grpc(response)

            await rest(check=True)
            await grpc_call(check=True)
            for _ in range(args.rounds):
                for transport, call in (("rest-binary", rest), ("grpc", grpc_call)):
                    await closed_loop(call, min(1.0, args.seconds), args.concurrency)  # warm up
                    cpu, mine = cpu_seconds(server_pid), time.process_time()
                    count, lat = await closed_loop(call, args.seconds, args.concurrency)
                    cpu, mine = cpu_seconds(server_pid) - cpu, time.process_time() - mine
                    rows.setdefault((w.model, transport), []).append(
                        {
                            "model": w.model,
                            "transport": transport,
                            "rps": count / args.seconds,
                            "p50": float(np.percentile(lat, 50)),
                            "p99": float(np.percentile(lat, 99)),
                            "mib": count * len(w.rest_body) / args.seconds / 2**20,
                            "cpu_us": cpu / max(count, 1) * 1e6,
                            "client_us": mine / max(count, 1) * 1e6,
                        }
                    )
                    row = rows[(w.model, transport)][-1]
                    print(
                        f"  {w.model:12s} {transport:12s} {row['rps']:8.1f} req/s  "
                        f"server {row['cpu_us']:6.0f} us/req  client {row['client_us']:6.0f} us/req",
                        flush=True,
                    )
    raw.close()
    return [sorted(runs, key=lambda r: r["rps"])[len(runs) // 2] for runs in rows.values()]


def report(rows: list[dict]) -> str:
    lines = [
        "| model | transport | req/s | MiB/s in | p50 ms | p99 ms | server CPU us/req | client CPU us/req "
        "| REST-binary / gRPC |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["model"], r["transport"]): r for r in rows}
    for r in rows:
        ratio = ""
        if r["transport"] == "rest-binary":
            ratio = f"{r['rps'] / by[(r['model'], 'grpc')]['rps']:.2f}"
        lines.append(
            f"| {r['model']} | {r['transport']} | {r['rps']:.0f} | {r['mib']:.1f} | {r['p50']:.2f} | "
            f"{r['p99']:.2f} | {r['cpu_us']:.0f} | {r['client_us']:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"inferd exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"inferd not ready after {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median is reported")
    parser.add_argument(
        "--rest-client",
        choices=["raw", "aiohttp"],
        default="raw",
        help="REST client: a minimal keep-alive HTTP/1.1 client (default) or aiohttp's",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build(repo)
        http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        log = Path(tmp) / "inferd.log"
        cmd = [
            sys.executable,
            "-m",
            "server.cli",
            "--host",
            "127.0.0.1",
            "--model-repository",
            str(repo),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics_port),
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            wait_ready(proc, http_port, log)
            print(
                f"inferd on http :{http_port} grpc :{grpc_port}; {args.seconds:g} s per run, "
                f"concurrency {args.concurrency}, {args.rounds} round(s)",
                flush=True,
            )
            rows = asyncio.run(bench(http_port, grpc_port, proc.pid, args))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(report(rows))


if __name__ == "__main__":
    main()
