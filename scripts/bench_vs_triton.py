"""Issue 13's table in one run: the grpc.aio echo floor, inferd and (when the anchor kit is set up)
real Triton on the same ONNX files, with the same closed-loop Python gRPC client (scripts/loadgen.py).

    .venv/bin/python scripts/bench_vs_triton.py [--seconds 8]
    (../shared/anchors/triton/setup.sh once, for the Triton rows)

Per case: throughput, p50/p99 latency, server CPU per request (CPU time of the server's whole process
tree, Triton's Python-backend stubs included, over the measured seconds) and the mean batch size
(inference_count / execution_count from the statistics extension). REST is not measured here
(scripts/bench_rest.py). Servers run one at a time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
import grpc_floor  # noqa: E402
import loadgen  # noqa: E402

ANCHOR = ROOT.parent / "shared" / "anchors" / "triton"
CASES = [("add_sub", 1), ("add_sub", 16), ("mlp", 64)]
# inferd only: mlp under a 25 ms latency target (docs/batching.md), at c=64 and at c=16 beside plain mlp
INFERD_CASES = CASES + [("mlp_latency", 64), ("mlp", 16), ("mlp_latency", 16)]
TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` and all its descendants."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    wanted, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in wanted]
        wanted.update(children)
        frontier.extend(children)
    return sum(times.get(p, 0.0) for p in wanted)


def batch_counts(url: str, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) from the statistics extension."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def measure(url: str, pid: int, model: str, concurrency: int, seconds: float, stats: bool = True) -> dict:
    bench.wait_ready(url, model)
    feed, types = bench.inputs_for(model)
    payload = loadgen.make_request(model, feed, types)
    loadgen.run(url, payload, concurrency, 1.0, warmup=0.5)  # warm, then measure
    counts = batch_counts(url, model) if stats else (0, 0)
    before = tree_cpu(pid)
    result = loadgen.run(url, payload, concurrency, seconds, warmup=0.0)
    cpu = tree_cpu(pid) - before
    inferences, executions = (a - b for a, b in zip(batch_counts(url, model), counts)) if stats else (0, 0)
    return {"rps": result.throughput, "p50": result.pct(50), "p99": result.pct(99),
            "cpu_us": cpu / max(1, result.requests) * 1e6, "errors": result.errors,
            "batch": inferences / executions if executions else 0.0}  # over the measured seconds


def floor(seconds: float) -> dict:
    """The grpc.aio echo server answering a prebuilt add_sub response."""
    out = {}
    for concurrency in (1, 16):
        port = bench.free_port()
        ctx = mp.get_context("spawn")
        ready, done, q = ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=grpc_floor.serve, args=(port, False, ready, done, q))
        proc.start()
        ready.wait(30)
        feed, types = bench.inputs_for("add_sub")
        payload = loadgen.make_request("add_sub", feed, types)
        url = f"127.0.0.1:{port}"
        before = tree_cpu(proc.pid)
        result = loadgen.run(url, payload, concurrency, seconds, warmup=0.0)
        cpu = tree_cpu(proc.pid) - before
        done.set()
        q.get(timeout=30)
        proc.join()
        out[("add_sub", concurrency)] = {"rps": result.throughput, "p50": result.pct(50), "p99": result.pct(99),
                                         "cpu_us": cpu / max(1, result.requests) * 1e6, "errors": 0, "batch": 1.0}
    return out


def triton(seconds: float, kit: Path = ANCHOR) -> dict | None:
    if not (kit / "start.sh").exists():
        print(f"no Triton kit at {kit} (--triton-kit): Triton rows skipped")
        return None
    repo = ROOT / ".cache" / "triton_bench_repo"
    made = subprocess.run([sys.executable, str(kit / "make_repo.py"), str(repo)], capture_output=True, text=True,
                          env={**os.environ, "BENCH_REPO": str(bench.BENCH_REPO)})
    if made.returncode != 0:
        print("Triton repository not built:", made.stderr[-500:])
        return None
    ports = [bench.free_port() for _ in range(3)]
    started = subprocess.run(["bash", str(kit / "start.sh"), str(repo), *map(str, ports)],
                             capture_output=True, text=True)
    if started.returncode != 0:
        print("Triton did not start (run ../shared/anchors/triton/setup.sh):", started.stderr[-500:])
        return None
    pid = int(started.stdout.strip().splitlines()[-1])
    try:
        return {(m, c): measure(f"127.0.0.1:{ports[0]}", pid, m, c, seconds) for m, c in CASES}
    finally:
        subprocess.run(["kill", str(pid)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--triton-kit", type=Path, default=ANCHOR,
                        help="the Triton anchor kit's folder (default: %(default)s)")
    args = parser.parse_args()
    (ROOT / ".cache").mkdir(exist_ok=True)
    bench.build_repository()
    rows = {"echo floor": floor(args.seconds)}
    server = bench.start_inferd()
    try:
        rows["inferd"] = {(m, c): measure(server.url, server.proc.pid, m, c, args.seconds) for m, c in INFERD_CASES}
    finally:
        server.stop()
    found = triton(args.seconds, args.triton_kit)
    if found is not None:
        rows["triton"] = found
    print(f"# inferd vs the echo floor and Triton ({os.cpu_count()} cores, {args.seconds:.0f} s a case, "
          "Python gRPC client)\n")
    print("| case | server | req/s | p50 ms | p99 ms | server CPU us/req | mean batch | inferd / this |")
    print("|---|---|---|---|---|---|---|---|")
    for model, concurrency in INFERD_CASES:
        mine = rows["inferd"][(model, concurrency)]
        for name, table in rows.items():
            r = table.get((model, concurrency))
            if r is None:
                continue
            ratio = "" if name == "inferd" else f"{mine['rps'] / r['rps']:.2f}x req/s, {mine['cpu_us'] / r['cpu_us']:.2f}x CPU"
            tuned = rows.get("triton", {}).get(("mlp", concurrency)) if model == "mlp_latency" else None
            if tuned is not None:  # against Triton's tuned mlp
                ratio = f"vs Triton mlp: {mine['rps'] / tuned['rps']:.2f}x req/s, {mine['p99'] / tuned['p99']:.2f}x p99"
            errors = f" ({r['errors']} errors)" if r["errors"] else ""
            print(f"| {model} c={concurrency} | {name} | {r['rps']:,.0f}{errors} | {r['p50']:.2f} | {r['p99']:.2f} | "
                  f"{r['cpu_us']:.0f} | {r['batch']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
