"""Benchmark inferd against the raw ONNX Runtime session and the Python peers, in one run.

    .venv/bin/python scripts/bench.py                       # inferd + raw ORT
    .venv/bin/python scripts/bench.py --peers               # + KServe 0.21 and MLServer 1.7
    .venv/bin/python scripts/bench.py --scenario mlp:64     # one scenario

Every figure comes from the same closed-loop gRPC client (scripts/loadgen.py) on this machine.
Peers need scripts/peers/setup.sh to have built their virtual environments.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import build_models  # noqa: E402
import loadgen  # noqa: E402

BENCH_REPO = ROOT / ".cache" / "bench_repository"
NO_BATCH = {"add_sub": "add_sub_nobatch", "mlp": "mlp_nobatch"}


def inputs_for(model: str, batch: int = 1) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    rng = np.random.default_rng(1)
    if model.startswith("add_sub"):
        a = rng.integers(-100, 100, (batch, 16)).astype(np.int32)
        b = rng.integers(-100, 100, (batch, 16)).astype(np.int32)
        return {"INPUT0": a, "INPUT1": b}, {"INPUT0": "INT32", "INPUT1": "INT32"}
    return {"INPUT": rng.standard_normal((batch, 512)).astype(np.float32)}, {"INPUT": "FP32"}


def build_repository() -> Path:
    build_models.bench_repository(BENCH_REPO)  # configs rewritten each run; model files kept
    return BENCH_REPO


def raw_ort(model: str, seconds: float) -> dict[int, float]:
    """In-process onnxruntime throughput (inferences/s) per batch size, default session options."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(BENCH_REPO / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    results = {}
    for batch in (1, 4, 8, 16, 32, 64):
        feed, _ = inputs_for(model, batch)
        for _ in range(3):
            session.run(None, feed)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, feed)
            n += 1
        results[batch] = n * batch / (time.perf_counter() - start)
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def wait_ready(url: str, model: str, timeout: float = 90.0) -> None:
    """Until one real inference on ``model`` succeeds."""
    feed, types = inputs_for(model)
    payload = loadgen.make_request(model, feed, types)
    import grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(loadgen.METHOD)
        while time.monotonic() < deadline:
            try:
                call(payload, timeout=2)
                return
            except grpc.RpcError:
                time.sleep(0.3)
    raise TimeoutError(f"{model} not ready at {url}")


class Server:
    def __init__(self, name: str, args: list[str], grpc_port: int, env: dict | None = None) -> None:
        self.name = name
        self.url = f"127.0.0.1:{grpc_port}"
        log = open(ROOT / ".cache" / f"bench-{name}.log", "wb")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        wait_port(grpc_port, self.proc)

    def stop(self) -> None:
        stop_group(self.proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server started in its own session (then SIGKILL after 30 s), children included."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_inferd(allow_http: bool = False, http_port: int = 0) -> Server:
    port = free_port()
    args = [sys.executable, "-m", "server.cli", "--model-repository", str(BENCH_REPO), "--host", "127.0.0.1",
            "--grpc-port", str(port), "--http-port", str(http_port or free_port()), "--metrics-port",
            str(free_port()), "--allow-http", "true" if allow_http else "false", "--allow-metrics", "false"]
    return Server("inferd", args, port)


def start_peer(kind: str, model: str) -> Server:
    venv = ROOT / ".bench" / f"{kind}-venv" / "bin" / "python"
    if not venv.exists():
        raise FileNotFoundError(f"{venv} missing: run scripts/peers/setup.sh")
    port = free_port()
    args = [str(venv), str(ROOT / "scripts" / "peers" / f"{kind}_onnx.py"), "--model_name", model,
            "--model_file", str(BENCH_REPO / model / "1" / "model.onnx"),
            "--http_port", str(free_port()), "--grpc_port", str(port)]
    return Server(kind, args, port)


def measure(server: Server, model: str, concurrency: int, seconds: float, processes: int) -> loadgen.Result:
    wait_ready(server.url, model)
    feed, types = inputs_for(model)
    payload = loadgen.make_request(model, feed, types)
    return loadgen.run(server.url, payload, concurrency, seconds, warmup=2.0, processes=processes)


def row(label: str, r: loadgen.Result, ref: float | None = None) -> str:
    ratio = f"{r.throughput / ref:.2f}" if ref else ""
    errs = f" ({r.errors} errors: {r.first_error})" if r.errors else ""
    return (f"| {label} | {r.throughput:,.0f} | {r.pct(50):.2f} | {r.pct(90):.2f} | {r.pct(99):.2f} | "
            f"{ratio} |{errs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=1, help="client processes sharing the concurrency")
    parser.add_argument("--peers", action="store_true", help="also measure KServe and MLServer")
    parser.add_argument("--scenario", action="append", metavar="MODEL:CONCURRENCY",
                        help="default: add_sub:1 add_sub:16 mlp:64 mlp_nobatch:64")
    args = parser.parse_args()
    (ROOT / ".cache").mkdir(exist_ok=True)
    build_repository()
    scenarios = [(s.split(":")[0], int(s.split(":")[1])) for s in args.scenario or
                 ["add_sub:1", "add_sub:16", "mlp:64", "mlp_nobatch:64"]]
    base_models = sorted({m.replace("_nobatch", "") for m, _ in scenarios})

    print(f"# inferd benchmark ({os.cpu_count()} cores, {args.seconds:.0f} s per scenario, "
          f"{args.processes} client process(es))\n")
    raw = {m: raw_ort(m, min(3.0, args.seconds / 3)) for m in base_models}
    print("| raw onnxruntime (in process) | " + " | ".join(f"batch {b}" for b in next(iter(raw.values()))) + " |")
    print("|---|" + "---|" * len(next(iter(raw.values()))))
    for m, per in raw.items():
        print(f"| {m} (inferences/s) | " + " | ".join(f"{v:,.0f}" for v in per.values()) + " |")
    print()

    print("| server / model / concurrency | inferences/s | p50 ms | p90 ms | p99 ms | x raw best batch |")
    print("|---|---|---|---|---|---|")
    results = {}
    server = start_inferd()
    try:
        for model, conc in scenarios:
            r = measure(server, model, conc, args.seconds, args.processes)
            results[("inferd", model, conc)] = r
            best = max(raw[model.replace("_nobatch", "")].values())
            print(row(f"inferd {model} c={conc}", r, best), flush=True)
    finally:
        server.stop()
    if args.peers:
        for kind in ("kserve", "mlserver"):
            for model, conc in scenarios:
                if model.endswith("_nobatch"):
                    continue
                peer = start_peer(kind, model)
                try:
                    r = measure(peer, model, conc, args.seconds, args.processes)
                finally:
                    peer.stop()
                results[(kind, model, conc)] = r
                print(row(f"{kind} {model} c={conc}", r, max(raw[model].values())), flush=True)
    print()
    for (server_name, model, conc), r in results.items():
        if server_name != "inferd":
            mine = results.get(("inferd", model, conc))
            if mine:
                print(f"inferd / {server_name} on {model} c={conc}: {mine.throughput / r.throughput:.2f}x")
        elif model in NO_BATCH.values():
            batched = results.get(("inferd", model.replace("_nobatch", ""), conc))
            if batched:
                print(f"inferd {model.replace('_nobatch', '')} c={conc}: batching on / off = "
                      f"{batched.throughput / r.throughput:.2f}x")


if __name__ == "__main__":
    main()
