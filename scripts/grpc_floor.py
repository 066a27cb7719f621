"""The gRPC transport's own cost: a ModelInfer server that returns a prebuilt response.

    .venv/bin/python scripts/grpc_floor.py [--sync]     # drives itself with scripts/loadgen.py

Prints requests/s and the server's CPU per request, the floor under any Python gRPC server here.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import resource
import sys
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import grpc  # noqa: E402

from server.protos import grpc_service_pb2 as pb  # noqa: E402
from server.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402


def _response() -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="add_sub", model_version="1")
    for name in ("OUTPUT0", "OUTPUT1"):
        response.outputs.add(name=name, datatype="INT32", shape=[1, 16])
        response.raw_output_contents.append(bytes(64))
    return response


def serve(port: int, sync: bool, ready, done, out) -> None:
    response = _response()

    class Echo(pb_grpc.GRPCInferenceServiceServicer):
        if sync:
            def ModelInfer(self, request, context):  # noqa: N802
                return response
        else:
            async def ModelInfer(self, request, context):  # noqa: N802
                return response

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    if sync:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        start = cpu()
        ready.set()
        done.wait()
        out.put(cpu() - start)
        server.stop(0)
        return

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        start = cpu()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        out.put(cpu() - start)
        await server.stop(0)

    asyncio.run(main())


def main() -> None:
    import bench
    import loadgen

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sync", action="store_true", help="grpc's thread-pool server instead of grpc.aio")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    port = bench.free_port()
    ctx = mp.get_context("spawn")
    ready, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=serve, args=(port, args.sync, ready, done, out))
    proc.start()
    ready.wait(30)
    feed, types = bench.inputs_for("add_sub")
    result = loadgen.run(f"127.0.0.1:{port}", loadgen.make_request("add_sub", feed, types),
                         args.concurrency, args.seconds, warmup=0.0)
    done.set()
    cpu = out.get(timeout=30)
    proc.join()
    kind = "sync" if args.sync else "aio"
    print(f"grpc {kind} echo, c={args.concurrency}: {result.throughput:,.0f} requests/s, "
          f"server CPU {cpu / max(1, result.requests) * 1e6:.0f} us/request")


if __name__ == "__main__":
    main()
