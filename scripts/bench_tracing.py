"""Tracing overhead: inferd with tracing on (every request sampled, OTLP/gRPC export) against off.

    .venv/bin/python scripts/bench_tracing.py                      # 3 rounds x 8 s, add_sub, c=16
    .venv/bin/python scripts/bench_tracing.py --rounds 5 --seconds 10

Two servers on the benchmark repository (scripts/bench.py: ``add_sub``, INT32 [1,16] x 2, dynamic
batching): one without any tracing configuration, one with ``OTEL_TRACES_EXPORTER=otlp`` exporting to
a local OTLP/gRPC receiver (a separate process that decodes and counts the spans). The same
closed-loop gRPC client (scripts/loadgen.py) drives them in alternating rounds (off/on, then on/off),
so both see the same machine conditions. Reported: the median round of each, and the median of the
per-round on/off ratios (each pair ran back to back, so drift of the machine's load cancels).
Server CPU per request (all threads, /proc/<pid>/stat) is printed too: on a shared machine it moves
much less than req/s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
import loadgen  # noqa: E402

MODEL = "add_sub"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _receiver(port: int, spans, ready) -> None:
    """An OTLP/gRPC trace receiver that decodes each export and counts its spans."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

    class Receiver(ts_grpc.TraceServiceServicer):
        def Export(self, request, context):
            n = sum(len(s.spans) for rs in request.resource_spans for s in rs.scope_spans)
            with spans.get_lock():
                spans.value += n
            return ts.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    ts_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    server.wait_for_termination()


def start_server(name: str, env: dict | None) -> bench.Server:
    port = bench.free_port()
    args = [sys.executable, "-m", "server.cli", "--model-repository", str(bench.BENCH_REPO),
            "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", str(bench.free_port()),
            "--allow-metrics", "false"]
    return bench.Server(name, args, port, env)


def measure(server: bench.Server, payload: bytes, args) -> dict:
    before = cpu_seconds(server.proc.pid)
    t0 = time.perf_counter()
    r = loadgen.run(server.url, payload, args.concurrency, args.seconds, warmup=args.warmup)
    # CPU over warm-up + measurement, divided by the requests sent in both (same closed loop)
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(server.proc.pid) - before
    sent = r.throughput * elapsed
    if r.errors:
        raise RuntimeError(f"{server.name}: {r.errors} errors, first: {r.first_error}")
    return {"rps": r.throughput, "p50": r.pct(50), "p99": r.pct(99), "cpu_us": cpu / max(sent, 1) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per round and mode")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    (ROOT / ".cache").mkdir(exist_ok=True)
    bench.build_repository()

    ctx = mp.get_context("spawn")
    spans, ready = ctx.Value("q", 0), ctx.Event()
    otlp_port = bench.free_port()
    receiver = ctx.Process(target=_receiver, args=(otlp_port, spans, ready), daemon=True)
    receiver.start()
    ready.wait(30)
    traced_env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                  "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                  "OTEL_TRACES_SAMPLER": "always_on", "OTEL_BSP_MAX_QUEUE_SIZE": "65536"}
    servers = {"off": start_server("tracing-off", None), "on": start_server("tracing-on", traced_env)}
    feed, types = bench.inputs_for(MODEL)
    payload = loadgen.make_request(MODEL, feed, types)
    rows: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for server in servers.values():
            bench.wait_ready(server.url, MODEL)
        print(f"# tracing overhead: {MODEL}, gRPC, concurrency {args.concurrency}, {args.rounds} rounds x "
              f"{args.seconds:g} s per mode, {os.cpu_count()} cores\n", flush=True)
        for i in range(args.rounds):
            for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                before = spans.value
                row = measure(servers[mode], payload, args)
                if mode == "on":
                    time.sleep(0.5)  # let the last export land before counting
                    row["spans"] = spans.value - before
                rows[mode].append(row)
                print(f"round {i + 1} {mode:>3}: {row['rps']:8,.0f} req/s  p50 {row['p50']:.2f} ms  "
                      f"p99 {row['p99']:.2f} ms  server {row['cpu_us']:5.0f} us/req", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        receiver.terminate()

    keys = ("rps", "p50", "p99", "cpu_us")
    med = {m: {k: statistics.median(r[k] for r in rows[m]) for k in keys} for m in rows}
    print("\n| tracing | req/s | p50 ms | p99 ms | server CPU us/req |")
    print("|---|---|---|---|---|")
    for mode in ("off", "on"):
        m = med[mode]
        print(f"| {mode} | {m['rps']:,.0f} | {m['p50']:.2f} | {m['p99']:.2f} | {m['cpu_us']:.0f} |")
    cost = 1 - med["on"]["rps"] / med["off"]["rps"]
    cpu = med["on"]["cpu_us"] / med["off"]["cpu_us"] - 1
    pairs = list(zip(rows["off"], rows["on"]))
    paired_cost = statistics.median(1 - on["rps"] / off["rps"] for off, on in pairs)
    paired_cpu = statistics.median(on["cpu_us"] / off["cpu_us"] - 1 for off, on in pairs)
    print(f"\nthroughput cost of tracing: {cost:.1%} (median rounds), {paired_cost:.1%} (median of "
          f"paired rounds); server CPU per request: {cpu:+.1%} / {paired_cpu:+.1%}")
    spans_total = sum(r["spans"] for r in rows["on"])
    sent_on = sum(r["rps"] * args.seconds for r in rows["on"])
    print(f"spans received: {spans_total:,} (~{spans_total / max(sent_on, 1):.2f} per measured request, "
          "warm-up included)")


if __name__ == "__main__":
    main()
