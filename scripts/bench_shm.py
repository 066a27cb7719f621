"""System shared memory vs. tensors in the request body, with tritonclient, in one run.

    .venv/bin/python scripts/bench_shm.py                 # grpc and http, c=4, 4 s a point
    .venv/bin/python scripts/bench_shm.py --seconds 8 --concurrency 4 --mib 16

The model is an ONNX Identity on a 16 MiB FP32 tensor ([4194304], no batching). Each of the
``--concurrency`` client threads has its own tritonclient and, for the shared-memory points, its own
input and output regions (registered once, as a real client would). Per request a shared-memory
client writes its input into its region (``set_shared_memory_region``) and reads the output from
its output region (``get_contents_as_numpy``); the other clients send the tensor in the request
and read it from the response (``as_numpy``). Throughput is requests/s over the window; server CPU
is the inferd process's user+system time over the window (/proc/<pid>/stat) per request.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import onnx_models  # noqa: E402
from bench import free_port  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Server:
    def __init__(self, repo: Path, log: Path) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        args = [sys.executable, "-m", "server.cli", "--model-repository", str(repo), "--host", "127.0.0.1",
                "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                "--metrics-port", str(free_port()), "--allow-client-shm=true"]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def wait(self) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("inferd exited; see its log")
            try:
                with httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}") as c:
                    if c.is_model_ready("identity"):
                        return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)
        raise SystemExit("inferd not ready after 60 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def worker(module, url: str, use_shm: bool, x: np.ndarray, stop: threading.Event, counts: list, index: int,
           ready: threading.Barrier) -> None:
    import tritonclient.utils.shared_memory as shm

    nbytes = x.nbytes
    client = module.InferenceServerClient(url)
    handles = []
    try:
        inp = module.InferInput("INPUT0", list(x.shape), "FP32")
        out = module.InferRequestedOutput("OUTPUT0") if module.__name__.endswith("grpc") else \
            module.InferRequestedOutput("OUTPUT0", binary_data=True)
        if use_shm:
            tag = uuid.uuid4().hex[:8]
            h_in = shm.create_shared_memory_region(f"in{index}_{tag}", f"/bench_in_{tag}", nbytes)
            h_out = shm.create_shared_memory_region(f"out{index}_{tag}", f"/bench_out_{tag}", nbytes)
            handles = [h_in, h_out]
            client.register_system_shared_memory(f"in{index}_{tag}", f"/bench_in_{tag}", nbytes)
            client.register_system_shared_memory(f"out{index}_{tag}", f"/bench_out_{tag}", nbytes)
            inp.set_shared_memory(f"in{index}_{tag}", nbytes)
            out = module.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory(f"out{index}_{tag}", nbytes)

        def once() -> np.ndarray:
            if use_shm:
                shm.set_shared_memory_region(handles[0], [x])
                client.infer("identity", [inp], outputs=[out])
                return shm.get_contents_as_numpy(handles[1], np.float32, x.shape)
            inp.set_data_from_numpy(x, **({} if module.__name__.endswith("grpc") else {"binary_data": True}))
            return client.infer("identity", [inp], outputs=[out]).as_numpy("OUTPUT0")

        got = once()
        if not np.array_equal(got[:1024], x[:1024]) or got[-1] != x[-1]:
            raise SystemExit("wrong output")
        ready.wait()
        n = 0
        while not stop.is_set():
            once()
            n += 1
        counts[index] = n
    finally:
        if use_shm:
            client.unregister_system_shared_memory()
            for h in handles:
                shm.destroy_shared_memory_region(h)
        client.close()


def point(server: Server, protocol: str, use_shm: bool, x: np.ndarray, concurrency: int, seconds: float) -> dict:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = grpcclient if protocol == "grpc" else httpclient
    url = f"127.0.0.1:{server.grpc_port if protocol == 'grpc' else server.http_port}"
    stop = threading.Event()
    counts = [0] * concurrency
    ready = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=worker, args=(module, url, use_shm, x, stop, counts, i, ready))
               for i in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait(60)
    cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
    time.sleep(seconds)
    stop.set()
    cpu1 = cpu_seconds(server.proc.pid)
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - t0  # includes the requests in flight at the stop
    n = sum(counts)
    return {"rps": n / elapsed, "cpu_ms": 1000 * (cpu1 - cpu0) / max(n, 1), "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--protocols", default="grpc,http")
    args = parser.parse_args()
    elements = args.mib * 1024 * 1024 // 4
    with tempfile.TemporaryDirectory(prefix="bench-shm-") as tmp:
        repo = Path(tmp) / "repo"
        onnx_models.identity(repo / "identity" / "1" / "model.onnx", "FP32", (elements,))
        (repo / "identity" / "config.pbtxt").write_text(
            "max_batch_size: 0\ninstance_group [ { kind: KIND_CPU count: 2 } ]\n")
        server = Server(repo, Path(tmp) / "inferd.log")
        try:
            server.wait()
            x = np.random.default_rng(0).standard_normal(elements).astype(np.float32)
            print(f"{args.mib} MiB FP32 identity, c={args.concurrency}, {args.seconds:g} s a point, "
                  f"{os.cpu_count()} cores")
            print(f"{'protocol':<8} {'data path':<14} {'req/s':>8} {'MiB/s in':>9} {'server CPU ms/req':>18}")
            for protocol in args.protocols.split(","):
                rows = {}
                for use_shm in (False, True):
                    r = point(server, protocol, use_shm, x, args.concurrency, args.seconds)
                    rows[use_shm] = r
                    path = "system shm" if use_shm else "request body"
                    print(f"{protocol:<8} {path:<14} {r['rps']:>8.1f} {r['rps'] * args.mib:>9.0f} "
                          f"{r['cpu_ms']:>18.2f}")
                ratio = rows[True]["rps"] / max(rows[False]["rps"], 1e-9)
                cpu = rows[False]["cpu_ms"] / max(rows[True]["cpu_ms"], 1e-9)
                print(f"{protocol:<8} shm / body: throughput x{ratio:.2f}, server CPU per request /{cpu:.2f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
