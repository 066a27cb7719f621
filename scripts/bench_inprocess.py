"""inferd's own CPU per request, without any transport: the ModelInfer path's stages, in process.

    .venv/bin/python scripts/bench_inprocess.py [--requests 20000] [--profile]

Builds the benchmark repository (scripts/bench.py), starts the server's App with no frontends and
runs add_sub requests one after another through the same functions gRPC ModelInfer uses: the
request deserializer, ``converters.to_request``, ``DataPlane.infer`` (validation, scheduling, the
instance, statistics, rendering) and the response encoding. Prints microseconds of wall and CPU
time per request for each stage; ``--profile`` adds cProfile's top functions for the whole path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench  # noqa: E402
import loadgen  # noqa: E402

from server.app import App  # noqa: E402
from server.core import loops  # noqa: E402
from server.frontends.grpc import converters, wire  # noqa: E402
from server.settings import from_args  # noqa: E402


async def main(requests: int, profile: bool) -> None:
    bench.build_repository()
    settings = from_args(["--model-repository", str(bench.BENCH_REPO), "--allow-grpc", "false",
                          "--allow-http", "false", "--allow-metrics", "false", "--load-model", "add_sub",
                          "--model-control-mode", "explicit"])
    app = App(settings)
    await app.start()
    dp = app.dataplane
    feed, types = bench.inputs_for("add_sub")
    data = loadgen.make_request("add_sub", feed, types)  # the serialized ModelInferRequest
    parsed = wire.parse_infer_request(data)
    response = await dp.infer(converters.to_request(parsed))

    async def decode():
        converters.to_request(wire.parse_infer_request(data))

    async def infer():
        await dp.infer(converters.to_request(parsed))

    async def encode():
        wire.serialize_infer_response(converters.unary_response(response))

    async def whole():
        reply = await dp.infer(converters.to_request(wire.parse_infer_request(data)))
        wire.serialize_infer_response(converters.unary_response(reply))

    print(f"| stage (add_sub, {requests} requests in a row) | wall us/request | CPU us/request |")
    print("|---|---|---|")
    for label, stage in (("decode (deserializer + to_request)", decode), ("to_request + DataPlane.infer", infer),
                         ("encode (unary_response + serializer)", encode), ("the whole ModelInfer path", whole)):
        for _ in range(500):
            await stage()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(requests):
            await stage()
        print(f"| {label} | {(time.perf_counter() - wall) / requests * 1e6:.1f} | "
              f"{(time.process_time() - cpu) / requests * 1e6:.1f} |")
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(requests // 4):
            await whole()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    await app.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    loops.runner("auto")(main(args.requests, args.profile))  # the loop the server runs on
