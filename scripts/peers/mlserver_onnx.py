"""Seldon MLServer (mlserver==1.7.1) serving one ONNX file through onnxruntime.

A peer for side-by-side benchmarks with inferd, speaking the KServe v2 protocol over gRPC
(and REST). Run it with the interpreter of .bench/mlserver-venv (scripts/peers/setup.sh):

    .bench/mlserver-venv/bin/python scripts/peers/mlserver_onnx.py \\
        --model_name simple --model_file /tmp/simple.onnx --http_port 8080 --grpc_port 8081

It writes settings.json and <model>/model-settings.json into a temporary folder (removed
on exit) and serves it as `mlserver start <folder>` does (same code path: load_settings +
MLServer.start, in this process), with the runtime of scripts/peers/mlserver_onnx/
(mlserver_onnx.OnnxModel). Server settings:
  - parallel_workers: 0 - inference runs in the server process (the default, 1+ workers
    in separate processes, does not work on this machine);
  - metrics off (metrics_endpoint null) unless --metrics_port is given;
  - debug (MLServer's default true: DEBUG logging plus a gRPC access-log line per request)
    off unless --debug.
--triton_model_config adds Triton's ModelConfig gRPC method, which perf_analyzer needs and
MLServer lacks (scripts/peers/mlserver_onnx/triton_config.py).
--keep_settings DIR writes the folder to DIR instead and keeps it (to rerun it with
`mlserver start DIR`, with scripts/peers on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def write_settings(folder: str, args: argparse.Namespace) -> None:
    settings = {
        "debug": args.debug,
        "parallel_workers": 0,
        "host": args.host,
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "metrics_endpoint": "/metrics" if args.metrics_port else None,
        "metrics_port": args.metrics_port or 0,
        "load_models_at_startup": True,
        "model_repository_root": folder,
    }
    model_settings = {
        "name": args.model_name,
        "implementation": "mlserver_onnx.OnnxModel",
        "parameters": {
            "uri": os.path.abspath(args.model_file),
            "extra": {"intra_op_threads": args.intra_op_threads},
        },
    }
    if args.model_version:
        model_settings["parameters"]["version"] = args.model_version
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump(settings, f, indent=2)
    model_dir = os.path.join(folder, args.model_name)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "model-settings.json"), "w") as f:
        json.dump(model_settings, f, indent=2)


def require_free_ports(**ports: int) -> None:
    """Exits if a port is taken. gRPC servers bind with SO_REUSEPORT, so a second server on
    a busy gRPC port starts without error and the two silently share the traffic."""
    import socket

    for what, port in ports.items():
        if not port:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError as e:
                sys.exit(f"{what} {port} is not free: {e}")


async def serve(folder: str) -> None:
    # What `mlserver start <folder>` runs.
    from mlserver.cli.serve import load_settings
    from mlserver.server import MLServer

    settings, models_settings = await load_settings(folder)
    server = MLServer(settings)
    await server.start(models_settings)


def main() -> None:
    p = argparse.ArgumentParser(description="MLServer serving one ONNX file (onnxruntime)")
    p.add_argument("--model_name", required=True)
    p.add_argument("--model_file", required=True, help="path of the .onnx file")
    p.add_argument("--http_port", type=int, default=8080)
    p.add_argument("--grpc_port", type=int, default=8081)
    p.add_argument("--host", default="0.0.0.0", help="address the HTTP and gRPC servers listen on")
    p.add_argument("--metrics_port", type=int, default=0,
                   help="serve Prometheus metrics on this port (default: metrics off)")
    p.add_argument("--intra_op_threads", type=int, default=1,
                   help="onnxruntime intra-op threads of the session")
    p.add_argument("--model_version", default="",
                   help="version to declare for the model (default none: requests must leave "
                        "model_version empty)")
    p.add_argument("--debug", action="store_true",
                   help="MLServer debug mode: DEBUG logs and a log line per gRPC request")
    p.add_argument("--triton_model_config", action="store_true",
                   help="also answer Triton's ModelConfig gRPC method (which perf_analyzer needs; "
                        "see scripts/peers/mlserver_onnx/triton_config.py)")
    p.add_argument("--keep_settings", metavar="DIR", help="write the settings folder here and keep it")
    args = p.parse_args()
    if not os.path.isfile(args.model_file):
        p.error(f"--model_file {args.model_file}: no such file")
    require_free_ports(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)

    # The runtime package scripts/peers/mlserver_onnx must be importable.
    sys.path.insert(0, HERE)
    os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")

    if args.keep_settings:
        folder = os.path.abspath(args.keep_settings)
        os.makedirs(folder, exist_ok=True)
    else:
        folder = tempfile.mkdtemp(prefix=f"mlserver-{args.model_name}-")
    try:
        write_settings(folder, args)
        from mlserver.logging import configure_logger
        from mlserver.utils import install_uvloop_event_loop

        if args.triton_model_config:
            import mlserver.grpc.server as mlserver_grpc_server

            from mlserver_onnx import triton_config

            tensors = triton_config.onnx_tensors(args.model_file)
            handler = triton_config.model_config_handler(
                lambda name: tensors if name == args.model_name else None)
            triton_config.patch_add_servicer(
                mlserver_grpc_server, "add_GRPCInferenceServiceServicer_to_server", handler)
        configure_logger()
        install_uvloop_event_loop()  # as mlserver's CLI does
        asyncio.run(serve(folder))
    except KeyboardInterrupt:
        pass
    finally:
        if not args.keep_settings:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
