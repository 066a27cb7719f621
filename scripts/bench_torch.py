"""Benchmark and check: the TorchScript mlp served by inferd with dynamic batching vs raw torch.

    .venv/bin/python scripts/bench_torch.py                        # CPU, 10 s per phase
    .venv/bin/python scripts/bench_torch.py --check --onnx         # + correctness, + the ONNX mlp
    PYTHONPATH=. python scripts/bench_torch.py --device cuda --check --onnx   # scripts/gpu_check.sh

The model is ``onnx_models.mlp`` as TorchScript (same seeded weights: FP32 [batch, 512] -> 2048 ->
2048 -> 2048 -> 16). "raw torch" is the same file run in this process under inference_mode at
batch 1..64, host numpy in and out (what a server must do too); the best batch is the reference.
The server is driven by scripts/loadgen.py (closed loop, one-row requests) at ``--concurrency``,
in ``--rounds`` phases each followed by raw torch at the best batch; the median per-round ratio
is the figure (robust to the load of a shared machine drifting during the run).
``--check`` first sends concurrent requests of 1-4 rows and compares every answer with the numpy
float32 reference. Needs torch, numpy, grpcio and inferd's server dependencies, not inferd itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

import grpc
import loadgen
import torch
import torch_models as tm

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc

BATCHES = (1, 8, 16, 32, 64)
CONFIG = """max_batch_size: {max_batch}
input [ {{ name: "{input}" data_type: TYPE_FP32 dims: [ 512 ] }} ]
output [ {{ name: "{output}" data_type: TYPE_FP32 dims: [ 16 ] }} ]
dynamic_batching {{ }}
instance_group [ {{ kind: {kind} count: {count} }} ]
{extra}"""
# model -> (input name, output name)
NAMES = {"mlp_torch": ("INPUT__0", "OUTPUT__0"), "mlp_onnx": ("INPUT", "OUTPUT")}


def build(repo: Path, device: str, with_onnx: bool, instances: int, threads: int) -> list[str]:
    kind = "KIND_GPU" if device == "cuda" else "KIND_CPU"
    tm.mlp(repo / "mlp_torch" / "1" / "model.pt")
    models = ["mlp_torch"]
    if with_onnx and device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            print("note: no ONNX mlp on the GPU: onnxruntime has no CUDAExecutionProvider "
                  "(onnxruntime-gpu provides it)")
            with_onnx = False
    if with_onnx:
        try:
            import onnx_models
        except ImportError as exc:
            print(f"note: no ONNX mlp ({exc}); the onnx package builds it")
        else:
            onnx_models.mlp(repo / "mlp_onnx" / "1" / "model.onnx")
            models.append("mlp_onnx")
    for model in models:
        i, o = NAMES[model]
        key = "INTRA_OP_THREAD_COUNT" if model == "mlp_torch" else "intra_op_thread_count"
        extra = f'parameters {{ key: "{key}" value: {{ string_value: "{threads}" }} }}\n' if threads else ""
        (repo / model / "config.pbtxt").write_text(
            CONFIG.format(max_batch=64, input=i, output=o, kind=kind, count=instances, extra=extra))
    return models


def raw_torch(path: Path, device: str, seconds: float, batches: tuple[int, ...] = BATCHES,
              threads: int = 0) -> dict[int, float]:
    """Inferences/s of the TorchScript file in this process, per batch size, host to host."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    module = torch.jit.load(str(path), map_location=device).eval()
    rng = np.random.default_rng(0)
    results = {}
    with torch.inference_mode():
        for batch in batches:
            x = rng.standard_normal((batch, 512)).astype(np.float32)
            n, start = -3, time.perf_counter()  # three untimed warm-up runs first
            while n < 0 or time.perf_counter() - start < seconds:
                module(torch.from_numpy(x).to(device)).cpu().numpy()
                n += 1
                if n == 0:
                    start = time.perf_counter()
            results[batch] = n * batch / (time.perf_counter() - start)
    del module
    torch.set_num_threads(saved)
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


class Server:
    """inferd as a subprocess (``python -m server.cli``), HTTP and metrics off."""

    def __init__(self, repo: Path, log_path: Path) -> None:
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        args = [sys.executable, "-m", "server.cli", "--model-repository", str(repo), "--host", "127.0.0.1",
                "--grpc-port", str(self.port), "--http-port", str(_free_port()),
                "--metrics-port", str(_free_port()), "--allow-http", "false", "--allow-metrics", "false"]
        self.log_path = log_path
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"127.0.0.1:{self.port}"

    def wait_ready(self, models: list[str], timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"inferd exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
                try:
                    if all(stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=2).ready for m in models):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        raise TimeoutError(f"models {models} not ready after {timeout}s:\n{self.log_path.read_text()}")

    def stats(self, model: str) -> tuple[int, int]:
        with grpc.insecure_channel(self.url) as channel:
            s = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name=model), timeout=10).model_stats[0]
        return s.inference_count, s.execution_count

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(url: str, model: str, requests: int = 256) -> float:
    """Concurrent requests of 1-4 rows; every answer must match the float32 reference. Max |error|."""
    name_in, name_out = NAMES[model]
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((1 + i % 4, 512)).astype(np.float32) for i in range(requests)]
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def one(x: np.ndarray) -> float:
            req = pb.ModelInferRequest(model_name=model)
            req.inputs.add(name=name_in, datatype="FP32", shape=list(x.shape))
            req.raw_input_contents.append(x.tobytes())
            resp = stub.ModelInfer(req, timeout=60)
            assert resp.outputs[0].name == name_out and list(resp.outputs[0].shape) == [len(x), 16]
            got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(len(x), 16)
            want = tm.dense_reference(tm.MLP_SIZES, tm.MLP_SEED, x)
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3, err_msg=f"{model}, {len(x)} rows")
            return float(np.abs(got - want).max())

        with ThreadPoolExecutor(32) as pool:
            return max(pool.map(one, xs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per served phase")
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="seconds per raw batch size")
    parser.add_argument("--rounds", type=int, default=3, help="served/raw alternations per model")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--processes", type=int, default=1, help="client processes sharing the concurrency")
    parser.add_argument("--instances", type=int, default=1, help="instances of each served model")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads per served instance (default: the server's share of the cores)")
    parser.add_argument("--check", action="store_true", help="compare served results with the CPU reference")
    parser.add_argument("--onnx", action="store_true", help="also serve the ONNX mlp (CUDA provider on GPU)")
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"# inferd TorchScript mlp benchmark on {where}; torch {torch.__version__}; "
          f"{args.seconds:g} s per served phase, concurrency {args.concurrency}\n")
    failed = False
    with tempfile.TemporaryDirectory(prefix="inferd-bench-torch-") as tmp:
        repo = Path(tmp) / "repo"
        models = build(repo, device, args.onnx, args.instances, args.threads)
        # the reference is raw torch at its best: every batch size, with every core and (on the
        # CPU) with one thread, which suffers least when other processes share the cores
        path = repo / "mlp_torch" / "1" / "model.pt"
        thread_counts = [torch.get_num_threads()] + ([1] if device == "cpu" and torch.get_num_threads() > 1 else [])
        print("| raw torch, inferences/s | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
        print("|---|" + "---|" * len(BATCHES))
        best, best_rate = (BATCHES[-1], thread_counts[0]), 0.0
        for threads in thread_counts:
            raw = raw_torch(path, device, args.raw_seconds, BATCHES, threads)
            print(f"| {threads} thread(s) | " + " | ".join(f"{v:,.0f}" for v in raw.values()) + " |")
            batch = max(raw, key=raw.get)
            if raw[batch] > best_rate:
                best, best_rate = (batch, threads), raw[batch]
        best_batch, best_threads = best
        print()
        server = Server(repo, Path(tmp) / "inferd.log")
        try:
            server.wait_ready(models)
            if args.check:
                for model in models:
                    error = check(server.url, model)
                    print(f"check {model} on {device}: 256 concurrent requests match the CPU reference "
                          f"(max |error| {error:.2e})")
                print()
            # each round: a served phase, then raw torch at the best batch right after it; the
            # ratio is taken per round and the median reported, so drift in the load of a shared
            # machine moves numerator and denominator together
            print("| served model | round | inferences/s | p50 ms | p99 ms | mean batch | raw torch "
                  f"b={best_batch} t={best_threads} | ratio |")
            print("|---|---|---|---|---|---|---|---|")
            medians = {}
            for model in models:
                name_in = NAMES[model][0]
                x = np.random.default_rng(1).standard_normal((1, 512)).astype(np.float32)
                payload = loadgen.make_request(model, {name_in: x}, {name_in: "FP32"})
                ratios = []
                for i in range(args.rounds):
                    before = server.stats(model)
                    r = loadgen.run(server.url, payload, args.concurrency, args.seconds / args.rounds,
                                    warmup=1.0, processes=args.processes)
                    after = server.stats(model)
                    reference = raw_torch(path, device, args.raw_seconds, (best_batch,), best_threads)[best_batch]
                    batches = after[1] - before[1]
                    mean_batch = (after[0] - before[0]) / batches if batches else 0.0
                    ratios.append(r.throughput / reference)
                    errs = f" ({r.errors} errors: {r.first_error})" if r.errors else ""
                    failed |= bool(r.errors)
                    print(f"| {model} c={args.concurrency} | {i + 1} | {r.throughput:,.0f} | {r.pct(50):.2f} | "
                          f"{r.pct(99):.2f} | {mean_batch:.1f} | {reference:,.0f} | {ratios[-1]:.2f} |{errs}",
                          flush=True)
                medians[model] = float(np.median(ratios))
            print()
            for model, ratio in medians.items():
                print(f"{model}: median served / raw torch best batch = {ratio:.2f}")
            target = 0.9 if device == "cuda" else 0.6
            ratio = medians["mlp_torch"]
            print(f"target: served TorchScript mlp >= {target} x raw torch best batch: {ratio:.2f}, "
                  f"{'met' if ratio >= target else 'NOT met'}")
        except Exception:
            failed = True
            raise
        finally:
            server.stop()
            if failed:
                print(server.log_path.read_text()[-4000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
