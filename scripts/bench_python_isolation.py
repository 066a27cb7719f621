"""The cost of running a Python model in its own process: the same small models in_process vs
process, per batch, at a tiny tensor and at larger ones.

    .venv/bin/python scripts/bench_python_isolation.py               # both levels, ~3 s a point
    .venv/bin/python scripts/bench_python_isolation.py --seconds 1   # quicker
    .venv/bin/python scripts/bench_python_isolation.py --level backend

Two levels:
- backend: ``Backend.execute`` called directly on a loaded instance (no server, no network): the
  process hop alone (shared-memory segment out and back, two control messages, two thread wakeups).
- grpc: one closed-loop tritonclient gRPC client against a real server, both APIs (the shortcut dict
  API on the tensor path, Triton's API on the request path): what a client sees.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DICT = """
class TritonPythonModel:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"]}
"""
TRITON = """
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]) for r in requests]
"""
CONFIG = """
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "INFERD_PYTHON_ISOLATION" value: { string_value: "MODE" } }
"""
SIZES = {"16 B": 4, "64 KiB": 16 * 1024, "4 MiB": 1024 * 1024}
MODES = ("in_process", "process")


def build(repo: Path) -> None:
    for api, code in (("dict", DICT), ("triton", TRITON)):
        for mode in MODES:
            folder = repo / f"{api}_{mode}"
            (folder / "1").mkdir(parents=True)
            (folder / "1" / "model.py").write_text(code)
            (folder / "config.pbtxt").write_text(CONFIG.replace("MODE", mode))


def timed(fn, seconds: float) -> list[float]:
    for _ in range(20):
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e3)
    return times


def backend_level(repo: Path, seconds: float) -> None:
    from server.repository.loader import LoadOptions, load_model

    print("backend level: Backend.execute on one instance, dict API (tensor path), batch 1")
    print(f"{'tensor':>8} {'mode':>10} {'batches/s':>10} {'p50 us':>8} {'p90 us':>8} {'added p50 us':>13}")
    loaded = {}
    try:
        for mode in MODES:
            result = load_model(repo / f"dict_{mode}", LoadOptions(auto_complete=False))
            loaded[mode] = result
        for label, n in SIZES.items():
            x = np.random.default_rng(0).random((1, n), dtype=np.float32)
            base = None
            for mode in MODES:
                backend = loaded[mode].loaded[1].backends[0][1]
                times = timed(lambda: backend.execute({"INPUT0": x}, ["OUTPUT0"]), seconds)
                p50 = statistics.median(times)
                p90 = statistics.quantiles(times, n=10)[-1]
                base = p50 if base is None else base
                added = "" if mode == "in_process" else f"{p50 - base:13.0f}"
                print(f"{label:>8} {mode:>10} {len(times) / sum(times) * 1e6:10.0f} {p50:8.0f} {p90:8.0f} {added}")
    finally:
        for result in loaded.values():
            result.close()


def grpc_level(repo: Path, seconds: float) -> None:
    import tritonclient.grpc as grpcclient

    sys.path.insert(0, str(ROOT / "tests"))
    from tests.harness import ServerProcess

    server = ServerProcess([repo])
    with tempfile.TemporaryDirectory() as logs:
        server.start(Path(logs) / "inferd.log", timeout=120)
        try:
            print("\ngrpc level: one closed-loop tritonclient gRPC client, batch 1")
            print(f"{'api':>6} {'tensor':>8} {'mode':>10} {'req/s':>8} {'p50 us':>8} {'p90 us':>8} {'added p50 us':>13}")
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                for api in ("dict", "triton"):
                    for label, n in SIZES.items():
                        x = np.random.default_rng(0).random((1, n), dtype=np.float32)
                        tensor = grpcclient.InferInput("INPUT0", [1, n], "FP32")
                        tensor.set_data_from_numpy(x)
                        base = None
                        for mode in MODES:
                            model = f"{api}_{mode}"
                            times = timed(lambda: client.infer(model, [tensor]), seconds)
                            p50 = statistics.median(times)
                            p90 = statistics.quantiles(times, n=10)[-1]
                            base = p50 if base is None else base
                            added = "" if mode == "in_process" else f"{p50 - base:13.0f}"
                            print(f"{api:>6} {label:>8} {mode:>10} {len(times) / sum(times) * 1e6:8.0f} {p50:8.0f} "
                                  f"{p90:8.0f} {added}")
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per point")
    parser.add_argument("--level", choices=["backend", "grpc", "both"], default="both")
    args = parser.parse_args()
    print(subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=commit %h"], capture_output=True,
                         text=True).stdout.strip(), f"| python {sys.version.split()[0]} | {args.seconds:g} s a point")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build(repo)
        if args.level in ("backend", "both"):
            backend_level(repo, args.seconds)
        if args.level in ("grpc", "both"):
            grpc_level(repo, args.seconds)


if __name__ == "__main__":
    main()
