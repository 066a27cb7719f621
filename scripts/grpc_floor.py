"""The transports' own cost: a ModelInfer server that returns a prebuilt response (and a REST twin).

    .venv/bin/python scripts/grpc_floor.py [--sync]     # drives itself with scripts/loadgen.py

Prints requests/s and the server's CPU per request, the floor under any Python gRPC server here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import resource
import sys
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from server.core import loops  # noqa: E402

from server.protos import grpc_service_pb2 as pb  # noqa: E402
from server.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402


def _response() -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="add_sub", model_version="1")
    for name in ("OUTPUT0", "OUTPUT1"):
        response.outputs.add(name=name, datatype="INT32", shape=[1, 16])
        response.raw_output_contents.append(bytes(64))
    return response


def _metadata() -> pb.ModelMetadataResponse:
    meta = pb.ModelMetadataResponse(name="add_sub", versions=["1"], platform="onnxruntime_onnx")
    for target, names in ((meta.inputs, ("INPUT0", "INPUT1")), (meta.outputs, ("OUTPUT0", "OUTPUT1"))):
        for name in names:
            target.add(name=name, datatype="INT32", shape=[-1, 16])
    return meta


def _config() -> pb.ModelConfigResponse:
    from server.protos import model_config_pb2 as mc

    config = mc.ModelConfig(name="add_sub", platform="onnxruntime_onnx", max_batch_size=8)
    for target, names in ((config.input, ("INPUT0", "INPUT1")), (config.output, ("OUTPUT0", "OUTPUT1"))):
        for name in names:
            target.add(name=name, data_type=mc.TYPE_INT32, dims=[16])
    return pb.ModelConfigResponse(config=config)


def serve(port: int, sync: bool, ready, done, out) -> None:
    """The echo server; ``out`` gets (CPU seconds, ModelInfer calls answered) when ``done`` is set.
    Model metadata, config and (empty) statistics answer too, so that perf_analyzer can drive it."""
    response, metadata, config = _response(), _metadata(), _config()
    calls = [0]

    class Echo(pb_grpc.GRPCInferenceServiceServicer):
        if sync:
            def ModelInfer(self, request, context):  # noqa: N802
                calls[0] += 1
                return response
        else:
            async def ModelInfer(self, request, context):  # noqa: N802
                calls[0] += 1
                return response

        async def ModelMetadata(self, request, context):  # noqa: N802
            return metadata

        async def ModelConfig(self, request, context):  # noqa: N802
            return config

        async def ModelStatistics(self, request, context):  # noqa: N802
            return pb.ModelStatisticsResponse()

        async def ServerMetadata(self, request, context):  # noqa: N802
            return pb.ServerMetadataResponse(name="floor", version="0")

        async def ServerLive(self, request, context):  # noqa: N802
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):  # noqa: N802
            return pb.ServerReadyResponse(ready=True)

    if sync:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        start = _cpu()
        ready.set()
        done.wait()
        out.put((_cpu() - start, calls[0]))
        server.stop(0)
        return

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        start = _cpu()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        out.put((_cpu() - start, calls[0]))
        await server.stop(0)

    loops.runner("auto")(main())  # the loop inferd runs on


def serve_rest(port: int, ready, done, out) -> None:
    """The REST floor: aiohttp answering add_sub's infer with a prebuilt binary-extension response
    (and its metadata and config, for perf_analyzer); ``out`` gets (CPU seconds, infer calls)."""
    from aiohttp import web

    header = json.dumps({"model_name": "add_sub", "model_version": "1", "outputs": [
        {"name": name, "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}}
        for name in ("OUTPUT0", "OUTPUT1")]}).encode()
    body = header + bytes(128)
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    metadata = json_format.MessageToDict(_metadata())
    config = json_format.MessageToDict(_config().config, preserving_proto_field_name=True)
    calls = [0]

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        calls[0] += 1
        return web.Response(body=body, headers=headers)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v2/models/add_sub/infer", infer)
        app.router.add_post("/v2/models/add_sub/versions/{version}/infer", infer)
        app.router.add_get("/v2/models/add_sub", lambda request: web.json_response(metadata))
        app.router.add_get("/v2/models/add_sub/config", lambda request: web.json_response(config))
        app.router.add_get("/v2/health/ready", lambda request: web.Response())
        app.router.add_get("/v2", lambda request: web.json_response({"name": "floor", "version": "0",
                                                                     "extensions": []}))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        start = _cpu()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        out.put((_cpu() - start, calls[0]))
        await runner.cleanup()

    loops.runner("auto")(main())


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


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
    cpu, _ = out.get(timeout=30)
    proc.join()
    kind = "sync" if args.sync else "aio"
    print(f"grpc {kind} echo, c={args.concurrency}: {result.throughput:,.0f} requests/s, "
          f"server CPU {cpu / max(1, result.requests) * 1e6:.0f} us/request")


if __name__ == "__main__":
    main()
