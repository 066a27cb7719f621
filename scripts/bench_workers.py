"""Frontend workers on this machine: throughput, p99 and the engine's CPU per request, 0/1/2 workers.

    .venv/bin/python scripts/bench_workers.py                    # add_sub c=16 and mlp c=64
    .venv/bin/python scripts/bench_workers.py --seconds 8 --workers 0 1 2 4
    .venv/bin/python scripts/bench_workers.py --growth 100000  # RSS and /dev/shm over 100k requests
    .venv/bin/python scripts/bench_workers.py --engine-only     # the engine saturated, without gRPC

Every point starts a fresh inferd on the benchmark repository (scripts/build_models.py) with
``--frontend-workers N`` and drives it with the closed-loop gRPC client (scripts/loadgen.py).
The engine's CPU per request is the CPU time (user + system, all threads) of the engine process
alone over the run, divided by the requests it completed (ModelStatistics), and next to it the
share of its event-loop thread (the rest: model instance threads, ONNX Runtime's pool): with workers it is
what bounds the whole server once the frontends scale out; with 0 workers the one process is
both frontend and engine. The targets of issue 15 are printed with the measured values,
and with them its projection to 8 workers: the lower of 8 / (a worker's CPU per request) and the
engine's rate saturated at add_sub c=64 (``--engine-only``), over the single process's req/s.

``--engine-only`` measures what the engine can do when it, not the transports, is the bottleneck
(on this 2-core machine the gRPC client and the workers take most of the CPU): the engine runs in
this process and its one worker is a driver without frontends that keeps ``c`` requests in flight
through the real worker channel (RemoteDataPlane: arena, frames, templates), so the engine is
saturated and batches form as they would behind many workers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
import loadgen  # noqa: E402

from server.protos import grpc_service_pb2 as pb  # noqa: E402
from server.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads, not its children)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def loop_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process's main thread (the engine's event loop) alone."""
    fields = open(f"/proc/{pid}/task/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def worker_pids(engine: int) -> list[int]:
    """The frontend worker processes: the engine's children started by multiprocessing's spawn."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            if int(stat[1]) == engine and b"spawn_main" in open(f"/proc/{entry}/cmdline", "rb").read():
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def served(url: str, model: str) -> tuple[int, int]:
    """Requests completed and batches executed so far."""
    with grpc.insecure_channel(url) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10).model_stats[0]
        return stats.inference_stats.success.count, stats.execution_count


def start(workers: int) -> bench.Server:
    port = bench.free_port()
    args = [sys.executable, "-m", "server.cli", "--model-repository", str(bench.BENCH_REPO),
            "--host", "127.0.0.1", "--grpc-port", str(port), "--http-port", str(bench.free_port()),
            "--metrics-port", str(bench.free_port()), "--allow-http", "false", "--allow-metrics", "false",
            "--frontend-workers", str(workers)]
    return bench.Server(f"inferd-w{workers}", args, port)


def point(model: str, concurrency: int, workers: int, seconds: float, warmup: float, processes: int) -> dict:
    server = start(workers)
    try:
        bench.wait_ready(server.url, model)
        feed, types = bench.inputs_for(model)
        payload = loadgen.make_request(model, feed, types)
        workers_now = worker_pids(server.proc.pid)
        (count0, batches0), cpu0 = served(server.url, model), cpu_seconds(server.proc.pid)
        loop0 = loop_cpu_seconds(server.proc.pid)
        wcpu0 = sum(cpu_seconds(p) for p in workers_now)
        result = loadgen.run(server.url, payload, concurrency, seconds, warmup=warmup, processes=processes)
        cpu1, loop1 = cpu_seconds(server.proc.pid), loop_cpu_seconds(server.proc.pid)
        count1, batches1 = served(server.url, model)
        wcpu1 = sum(cpu_seconds(p) for p in workers_now)
    finally:
        server.stop()
    done = max(1, count1 - count0)
    return {"model": model, "c": concurrency, "workers": workers, "rps": result.throughput,
            "p50": result.pct(50), "p99": result.pct(99), "errors": result.errors,
            "batch": done / max(1, batches1 - batches0),
            "engine_us": (cpu1 - cpu0) / done * 1e6, "loop_us": (loop1 - loop0) / done * 1e6,
            "workers_us": (wcpu1 - wcpu0) / done * 1e6,
            "first_error": result.first_error}


async def _send(url: str, payload: bytes, total: int, concurrency: int = 32) -> int:
    channels = [grpc.aio.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(4)]
    calls = [c.unary_unary(loadgen.METHOD) for c in channels]
    left, errors = [total], [0]

    async def loop(i: int) -> None:
        call = calls[i % len(calls)]
        while left[0] > 0:
            left[0] -= 1
            try:
                await call(payload, timeout=30)
            except grpc.RpcError:
                errors[0] += 1

    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    for c in channels:
        await c.close()
    return errors[0]


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def footprint(engine: int) -> tuple[int, int, int]:
    """RSS of the engine and of its workers (KiB), and the shared memory they really use (bytes)."""
    workers = sum(_rss_kib(pid) for pid in worker_pids(engine))
    shm = sum(p.stat().st_blocks * 512 for p in Path("/dev/shm").glob(f"inferd-w{engine}-*"))
    return _rss_kib(engine), workers, shm


def growth(total: int, workers: int) -> None:
    """Send ``total`` add_sub requests through ``workers`` workers; print RSS and /dev/shm before/after."""
    server = start(workers)
    try:
        bench.wait_ready(server.url, "add_sub")
        feed, types = bench.inputs_for("add_sub")
        payload = loadgen.make_request("add_sub", feed, types)
        asyncio.run(_send(server.url, payload, 5000))  # warm: caches filled, arena blocks carved
        engine0, workers0, shm0 = footprint(server.proc.pid)
        start_at = time.monotonic()
        errors = asyncio.run(_send(server.url, payload, total))
        elapsed = time.monotonic() - start_at
        engine1, workers1, shm1 = footprint(server.proc.pid)
    finally:
        server.stop()
    def change(before: int, after: int, unit: int, text: str) -> str:
        return f"{before / unit:.1f} -> {after / unit:.1f} {text} ({(after - before) / unit:+.1f})"

    rate = total / elapsed
    print(f"growth over {total:,} requests ({workers} workers, {rate:,.0f} req/s, {errors} errors):")
    print(f"  engine RSS {change(engine0, engine1, 1024, 'MiB')}")
    print(f"  workers RSS {change(workers0, workers1, 1024, 'MiB')}")
    print(f"  /dev/shm in use {change(shm0, shm1, 1024, 'KiB')}")


DRIVE = "INFERD_BENCH_DRIVE"  # the driver's model and concurrency, for the spawned process


def _drive(config: dict) -> None:
    """Spawn target in place of the worker's main: no frontends, ``c`` closed loops of inference."""
    import json
    import logging

    logging.basicConfig(level=logging.WARNING)
    model, concurrency = json.loads(os.environ[DRIVE])
    asyncio.run(_drive_loops(config, model, concurrency))


async def _drive_loops(config: dict, model: str, concurrency: int) -> None:
    from server.core.errors import ServingError
    from server.core.types import InferRequest, Tensor
    from server.workers import wire
    from server.workers.remote import RemoteDataPlane

    plane = RemoteDataPlane(config)
    await plane.connect()
    plane._send(wire.UP, 0)
    while not plane.ready() and not plane.stopped.is_set():
        await asyncio.sleep(0.05)
    feed, types = bench.inputs_for(model)

    async def loop() -> None:
        while not plane.stopped.is_set() and not plane.draining:
            request = InferRequest(model, "", "", [Tensor(n, types[n], list(a.shape), a) for n, a in feed.items()],
                                   [])
            try:
                await plane.infer(request)
            except ServingError:
                await asyncio.sleep(0.01)

    loops = [asyncio.ensure_future(loop()) for _ in range(concurrency)]
    await plane.stopped.wait()
    for task in loops:
        task.cancel()
    await plane.close()


def engine_only(model: str, concurrency: int, seconds: float, warmup: float) -> dict:
    """The engine in this process, saturated by one driver process through the worker channel."""
    import json

    from server import app as app_module, settings as settings_module
    from server.workers import supervisor

    os.environ[DRIVE] = json.dumps([model, concurrency])
    supervisor.process.main = _drive  # the spawned "worker" is the driver (pickled by reference)
    settings = settings_module.from_args([
        "--model-repository", str(bench.BENCH_REPO), "--host", "127.0.0.1", "--grpc-port", str(bench.free_port()),
        "--http-port", str(bench.free_port()), "--allow-http", "false", "--allow-metrics", "false",
        "--frontend-workers", "1"])

    def counts(app) -> tuple[int, int]:
        [stats] = app.dataplane.statistics(model)
        return stats["inference_stats"]["success"]["count"], stats["execution_count"]

    async def run() -> dict:
        app = app_module.App(settings)
        await app.start()
        try:
            await asyncio.sleep(warmup)
            (n0, b0), cpu0, loop0 = counts(app), cpu_seconds(os.getpid()), loop_cpu_seconds(os.getpid())
            start = time.monotonic()
            await asyncio.sleep(seconds)
            (n1, b1), cpu1, loop1 = counts(app), cpu_seconds(os.getpid()), loop_cpu_seconds(os.getpid())
            elapsed = time.monotonic() - start
        finally:
            app.dataplane.draining = True
            await app.stop()
        done = max(1, n1 - n0)
        return {"model": model, "c": concurrency, "rps": done / elapsed, "batch": done / max(1, b1 - b0),
                "engine_us": (cpu1 - cpu0) / done * 1e6, "loop_us": (loop1 - loop0) / done * 1e6}

    from server.core import loops

    return loops.runner(settings.event_loop)(run())  # the engine's own loop (uvloop when installed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--processes", type=int, default=1, help="client processes sharing the concurrency")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every point this many times, in turns, and print the median run "
                             "(this machine's figures vary by 20-30%% from run to run)")
    parser.add_argument("--scenario", action="append", metavar="MODEL:CONCURRENCY",
                        help="default: add_sub:16 and mlp:64")
    parser.add_argument("--growth", type=int, default=0, metavar="N",
                        help="instead: send N add_sub requests through max(--workers) workers and print "
                             "how RSS and /dev/shm changed (issue 15 asks for 100000)")
    parser.add_argument("--engine-only", action="store_true",
                        help="instead: the engine alone, saturated by a driver without gRPC (see above)")
    args = parser.parse_args()
    bench.build_repository()
    if args.growth:
        growth(args.growth, max(args.workers))
        return
    if args.engine_only:
        print("| model | c | engine req/s | mean batch | engine CPU us/req | of which its event loop |")
        print("|---|---|---|---|---|---|")
        for scenario in args.scenario or ["add_sub:16", "add_sub:64", "mlp:64"]:
            model, concurrency = scenario.split(":")[0], int(scenario.split(":")[1])
            r = engine_only(model, concurrency, args.seconds, args.warmup)
            print(f"| {model} | {concurrency} | {r['rps']:,.0f} | {r['batch']:.1f} | {r['engine_us']:.0f} | "
                  f"{r['loop_us']:.0f} |", flush=True)
            if model == "add_sub" and concurrency == 16:
                print(f"target add_sub c=16, engine saturated: engine CPU per request <= 50 us: "
                      f"{r['engine_us']:.0f} us -> {'met' if r['engine_us'] <= 50 else 'NOT met'}", flush=True)
        return
    scenarios = [(s.split(":")[0], int(s.split(":")[1])) for s in (args.scenario or ["add_sub:16", "mlp:64"])]
    print(f"# frontend workers on {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
          f"{args.seconds:g}s per point, median of {args.repeat} run(s) in turns, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| model | c | workers | req/s | ratio to 0 | p50 ms | p99 ms | mean batch | engine CPU us/req "
          "| of which its event loop | workers CPU us/req |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows: dict[tuple[str, int], dict] = {}
    for model, concurrency in scenarios:
        runs: dict[int, list[dict]] = {w: [] for w in args.workers}
        for _ in range(args.repeat):  # the worker counts take turns, so a slow spell hits them alike
            for workers in args.workers:
                runs[workers].append(point(model, concurrency, workers, args.seconds, args.warmup, args.processes))
        for workers in args.workers:
            r = sorted(runs[workers], key=lambda r: r["rps"])[len(runs[workers]) // 2]  # the median run
            rows[(model, workers)] = r
            base = rows.get((model, 0))
            ratio = f"{r['rps'] / base['rps']:.2f}" if base else ""
            errors = f" ({r['errors']} errors: {r['first_error']})" if r["errors"] else ""
            print(f"| {model} | {concurrency} | {workers} | {r['rps']:,.0f} | {ratio} | {r['p50']:.2f} | "
                  f"{r['p99']:.2f} | {r['batch']:.1f} | {r['engine_us']:.0f} | {r['loop_us']:.0f} | "
                  f"{r['workers_us']:.0f} |"
                  f"{errors}", flush=True)
    print()
    for model, _ in scenarios:
        w0, w1, w2 = rows.get((model, 0)), rows.get((model, 1)), rows.get((model, 2))
        if w0 and w1:
            ratio = w1["rps"] / w0["rps"]
            print(f"target {model}: 1 worker >= 0.9x single process: {ratio:.2f}x -> "
                  f"{'met' if ratio >= 0.9 else 'NOT met'}")
        if w1 and w2:
            ratio = w2["rps"] / w1["rps"]
            verdict = "met" if ratio >= 1.0 else "NOT met"
            print(f"target {model}: 2 workers not slower than 1: {ratio:.3f}x -> {verdict}")
    with_workers = [r for (m, w), r in rows.items() if m == "add_sub" and w]
    if with_workers:
        best = min(with_workers, key=lambda r: r["engine_us"])
        print(f"target add_sub c={best['c']}: engine CPU per request <= 50 us: {best['engine_us']:.0f} us "
              f"({best['workers']} workers) -> {'met' if best['engine_us'] <= 50 else 'NOT met'}")
        project(rows[("add_sub", 0)] if ("add_sub", 0) in rows else None, best, args.seconds, args.warmup)


def project(single: dict | None, workers: dict, seconds: float, warmup: float, n: int = 8) -> None:
    """Issue 15's projection: n workers on a machine with cores for all of them serve n / (a worker's
    CPU per request) requests per second, unless the engine, saturated (its batches full, as behind
    many workers), serves fewer: 1 / (its CPU per request at saturation)."""
    if single is None:
        return
    saturated = engine_only("add_sub", 64, seconds, warmup)
    by_workers = n / (workers["workers_us"] / 1e6)
    by_engine = 1 / (saturated["engine_us"] / 1e6)
    ratio = min(by_workers, by_engine) / single["rps"]
    print(f"projection add_sub, {n} workers with a core each: workers {by_workers:,.0f} req/s "
          f"({workers['workers_us']:.0f} us CPU per request each), engine saturated at c=64 {by_engine:,.0f} "
          f"req/s ({saturated['engine_us']:.0f} us, batch {saturated['batch']:.1f}) -> {ratio:.2f}x the single "
          f"process's {single['rps']:,.0f} req/s (c={single['c']}); target >= 6x: "
          f"{'met' if ratio >= 6 else 'NOT met'} (scripts/scale_check.sh measures it on a machine with the cores)")


if __name__ == "__main__":
    main()
