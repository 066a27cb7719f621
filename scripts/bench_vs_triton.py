"""Issue 13's table in one run: the transport floors, inferd and (when the anchor kit is set up) real
Triton on the same ONNX files, add_sub c=1 and c=16 over gRPC and REST and mlp c=64 over gRPC.

    .venv/bin/python scripts/bench_vs_triton.py [--seconds 5] [--client auto|perf_analyzer|python]
    (../shared/anchors/triton/setup.sh once, for the Triton rows)

The client is Triton's perf_analyzer (scripts/perf_analyzer.sh, a Debian 13 chroot; needs root) when
it can run, else the closed-loop Python gRPC client (scripts/loadgen.py; no REST rows then). The
floors answer add_sub with a prebuilt response: grpc.aio for gRPC, aiohttp for REST (both on the loop
inferd runs on; scripts/grpc_floor.py). Per case: throughput, p50/p99 latency, server CPU per request
(CPU time of the server's whole process tree, Triton's Python-backend stubs included, divided by the
requests it completed meanwhile) and the mean batch size (statistics extension), then the targets.
Servers run one at a time; inferd's mlp has plain ``dynamic_batching { }``, Triton's its tuned 20 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
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
CASES = [("add_sub", 1, "grpc"), ("add_sub", 16, "grpc"), ("add_sub", 1, "http"), ("add_sub", 16, "http"),
         ("mlp", 64, "grpc")]
LATENCY_MODEL = "mlp_latency"  # the bench repository's mlp with a 25 ms latency target, when built
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


def counts(grpc_url: str, model: str) -> tuple[int, int, int]:
    """(successful requests, inferences, executions) so far, from the statistics extension."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(grpc_url) as client:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    success = int(stats.get("inference_stats", {}).get("success", {}).get("count", 0))
    return success, int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def perf_analyzer_works() -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["bash", str(ROOT / "scripts" / "perf_analyzer.sh"), "--help"], capture_output=True)
    return done.returncode == 0


def drive(client: str, url: str, model: str, concurrency: int, protocol: str, seconds: float) -> dict:
    """Run the load; {rps, p50, p99} (ms)."""
    if client == "python":
        feed, types = bench.inputs_for(model)
        payload = loadgen.make_request(model, feed, types)
        loadgen.run(url, payload, concurrency, 1.0, warmup=0.5)
        result = loadgen.run(url, payload, concurrency, seconds, warmup=0.0)
        return {"rps": result.throughput, "p50": result.pct(50), "p99": result.pct(99), "errors": result.errors}
    args = ["bash", str(ROOT / "scripts" / "perf_analyzer.sh"), "-m", model, "-i", protocol, "-u", url,
            "--concurrency-range", str(concurrency), "--measurement-interval", str(int(seconds * 1000)),
            "--max-trials", "8", "--stability-percentage", "100"]  # a shared 2-core machine is noisy
    done = subprocess.run(args, capture_output=True, text=True)
    text = done.stdout + done.stderr
    found = {key: re.search(pattern, text) for key, pattern in
             (("rps", r"Throughput: ([\d.]+) infer/sec"), ("p50", r"p50 latency: (\d+) usec"),
              ("p99", r"p99 latency: (\d+) usec"))}
    if not all(found.values()):
        raise RuntimeError(f"perf_analyzer failed ({done.returncode}): {text[-600:]}")
    return {"rps": float(found["rps"][1]), "p50": int(found["p50"][1]) / 1000, "p99": int(found["p99"][1]) / 1000,
            "errors": 0}


def measure(client: str, grpc_url: str, http_url: str, pid: int, model: str, concurrency: int, protocol: str,
            seconds: float) -> dict | None:
    bench.wait_ready(grpc_url, model)
    before, cpu = counts(grpc_url, model), tree_cpu(pid)
    try:
        result = drive(client, grpc_url if protocol == "grpc" else http_url, model, concurrency, protocol, seconds)
    except RuntimeError as exc:
        print(f"{model} c={concurrency} {protocol} at {grpc_url}: {exc}", file=sys.stderr)
        return None
    cpu = tree_cpu(pid) - cpu
    after = counts(grpc_url, model)
    success, inferences, executions = (a - b for a, b in zip(after, before))
    return {**result, "cpu_us": cpu / max(1, success) * 1e6, "batch": inferences / executions if executions else 0.0}


def floor(client: str, cases: list, seconds: float) -> dict:
    """The echo servers (a fresh one per case), add_sub only."""
    out = {}
    for model, concurrency, protocol in cases:
        if model != "add_sub":
            continue
        port = bench.free_port()
        ctx = mp.get_context("spawn")
        ready, done, q = ctx.Event(), ctx.Event(), ctx.Queue()
        target, args = ((grpc_floor.serve, (port, False, ready, done, q)) if protocol == "grpc"
                        else (grpc_floor.serve_rest, (port, ready, done, q)))
        proc = ctx.Process(target=target, args=args)
        proc.start()
        ready.wait(30)
        try:
            result = drive(client, f"127.0.0.1:{port}", model, concurrency, protocol, seconds)
        except RuntimeError as exc:
            print(f"floor {model} c={concurrency} {protocol}: {exc}", file=sys.stderr)
            result = None
        finally:
            done.set()
            cpu, calls = q.get(timeout=60)
            proc.join()
        if result is not None:
            out[(model, concurrency, protocol)] = {**result, "cpu_us": cpu / max(1, calls) * 1e6, "batch": 1.0}
    return out


def triton(client: str, cases: list, seconds: float, kit: Path = ANCHOR) -> dict | None:
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
        found = {case: measure(client, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", pid, *case, seconds)
                 for case in cases}
        return {case: r for case, r in found.items() if r is not None}
    finally:
        subprocess.run(["kill", str(pid)])


def inferd(client: str, cases: list, seconds: float) -> dict:
    http_port = bench.free_port()
    server = bench.start_inferd(allow_http=True, http_port=http_port)
    try:
        found = {case: measure(client, server.url, f"127.0.0.1:{http_port}", server.proc.pid, *case, seconds)
                 for case in cases}
        return {case: r for case, r in found.items() if r is not None}
    finally:
        server.stop()


def targets(rows: dict) -> list[str]:
    mine, floor_rows, theirs = rows["inferd"], rows["floor"], rows.get("triton", {})
    lines = []

    def check(label: str, value: float | None, limit: float, at_most: bool) -> None:
        if value is None:
            lines.append(f"- {label}: not measured")
            return
        met = value <= limit if at_most else value >= limit
        lines.append(f"- {label}: {value:.2f} ({'<=' if at_most else '>='} {limit}: {'met' if met else 'MISSED'})")

    def ratio(a: dict, b: dict, case: tuple, key: str) -> float | None:
        return a[case][key] / b[case][key] if case in a and case in b and b[case][key] else None

    c16, c16r, c1, mlp = ("add_sub", 16, "grpc"), ("add_sub", 16, "http"), ("add_sub", 1, "grpc"), ("mlp", 64, "grpc")
    check("add_sub c=16 gRPC, inferd CPU/request over the gRPC floor's", ratio(mine, floor_rows, c16, "cpu_us"), 1.3,
          True)
    check("add_sub c=16 gRPC, inferd req/s over Triton's", ratio(mine, theirs, c16, "rps"), 0.7, False)
    check("add_sub c=16 REST, inferd req/s over Triton's", ratio(mine, theirs, c16r, "rps"), 0.9, False)
    check("add_sub c=1 gRPC, inferd p50 over Triton's", ratio(mine, theirs, c1, "p50"), 1.2, True)
    check("mlp c=64 (plain dynamic_batching), inferd req/s over Triton's (tuned 20 ms)",
          ratio(mine, theirs, mlp, "rps"), 0.95, False)
    check("mlp c=64, inferd p99 over Triton's", ratio(mine, theirs, mlp, "p99"), 1.2, True)
    check("mlp c=64, inferd mean batch", mine[mlp]["batch"] if mlp in mine else None, 48, False)
    latency = (LATENCY_MODEL, 64, "grpc")
    if latency in mine:
        check("mlp c=64 with latency_target_ms 25, inferd p99 (ms)", mine[latency]["p99"], 25, True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--client", choices=["auto", "perf_analyzer", "python"], default="auto")
    parser.add_argument("--triton-kit", type=Path, default=ANCHOR,
                        help="the Triton anchor kit's folder (default: %(default)s)")
    parser.add_argument("--only", action="append", default=[], metavar="MODEL:C:PROTOCOL",
                        help="run only this case (repeatable), e.g. --only add_sub:16:grpc")
    args = parser.parse_args()
    (ROOT / ".cache").mkdir(exist_ok=True)
    bench.build_repository()
    client = args.client
    if client == "auto":
        client = "perf_analyzer" if perf_analyzer_works() else "python"
    cases = CASES if client == "perf_analyzer" else [c for c in CASES if c[2] == "grpc"]
    # inferd only: mlp under a 25 ms latency target (docs/batching.md), at c=64, and at c=16 beside plain mlp
    extra = ([(LATENCY_MODEL, 64, "grpc"), ("mlp", 16, "grpc"), (LATENCY_MODEL, 16, "grpc")]
             if (bench.BENCH_REPO / LATENCY_MODEL).is_dir() else [])
    if args.only:
        chosen = {f"{m}:{c}:{p}" for m, c, p in cases + extra} & set(args.only)
        cases = [c for c in cases if f"{c[0]}:{c[1]}:{c[2]}" in chosen]
        extra = [c for c in extra if f"{c[0]}:{c[1]}:{c[2]}" in chosen]
    rows = {"floor": floor(client, cases, args.seconds), "inferd": inferd(client, cases + extra, args.seconds)}
    found = triton(client, cases, args.seconds, args.triton_kit)
    if found is not None:
        rows["triton"] = found
    print(f"# inferd vs the transport floors and Triton ({os.cpu_count()} cores, {args.seconds:.0f} s windows, "
          f"client: {client})\n")
    print("| case | server | req/s | p50 ms | p99 ms | server CPU us/req | mean batch | inferd / this |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases + extra:
        model, concurrency, protocol = case
        mine = rows["inferd"].get(case)
        if mine is None:
            print(f"| {model} c={concurrency} {protocol} | inferd | no stable measurement | | | | | |")
            continue
        for name, table in rows.items():
            r = table.get(case)
            if r is None:
                continue
            ratio = "" if name == "inferd" else f"{mine['rps'] / r['rps']:.2f}x req/s, {mine['cpu_us'] / r['cpu_us']:.2f}x CPU"
            errors = f" ({r['errors']} errors)" if r["errors"] else ""
            print(f"| {model} c={concurrency} {protocol} | {name} | {r['rps']:,.0f}{errors} | {r['p50']:.2f} | "
                  f"{r['p99']:.2f} | {r['cpu_us']:.0f} | {r['batch']:.1f} | {ratio} |")
    print("\nTargets (issue 13):")
    print("\n".join(targets(rows)))


if __name__ == "__main__":
    main()
