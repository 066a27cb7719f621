"""KServe (kserve==0.21.0) Python model server serving one ONNX file through onnxruntime.

A peer for side-by-side benchmarks with inferd, speaking the KServe v2 protocol over gRPC
(and REST). Run it with the interpreter of .bench/kserve-venv (scripts/peers/setup.sh):

    .bench/kserve-venv/bin/python scripts/peers/kserve_onnx.py \\
        --model_name simple --model_file /tmp/simple.onnx --http_port 8080 --grpc_port 8081

Any other kserve.ModelServer option (--workers, --max_threads, --enable_latency_logging,
...) is accepted too: kserve parses sys.argv itself at import time (model_server.parser).
The number of REST workers is left at kserve's default of 1; gRPC is always served by the
main process.

Model: one onnxruntime.InferenceSession (CPU), intra-op threads from --intra_op_threads
(default 1), inter-op threads 1. Every input of the request is passed to the session by
name as numpy; every output of the session is returned (or only the requested ones when
the request lists outputs), as raw bytes (raw_output_contents over gRPC, like Triton),
whatever form the inputs came in (raw_input_contents or typed contents).

--triton_model_config adds Triton's ModelConfig gRPC method, which perf_analyzer needs and
KServe lacks (scripts/peers/mlserver_onnx/triton_config.py); --log_level WARNING drops
kserve's two log lines per request.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from importlib import metadata
from typing import Dict, List, Optional

import numpy as np
import onnxruntime as ort

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.errors import InvalidInput
from kserve.utils.utils import generate_uuid

logger = logging.getLogger("kserve.onnx")  # a child of kserve's configured logger

# onnxruntime type strings -> KServe v2 datatypes
_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_NP_TO_V2 = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.object_): "BYTES",
}


def _dims(shape) -> List[int]:
    # symbolic / unknown dimensions ("batch", None) are variable: -1
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


class OnnxModel(Model):
    def __init__(self, name: str, model_file: str, intra_op_threads: int = 1,
                 run_in_executor: bool = False):
        super().__init__(name)
        self.model_file = model_file
        self.intra_op_threads = intra_op_threads
        self.run_in_executor = run_in_executor
        self.session: Optional[ort.InferenceSession] = None
        self._input_types: List[Dict] = []
        self._output_types: List[Dict] = []
        self._output_names: List[str] = []

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(self.model_file, sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self._input_types = [
            {"name": i.name, "datatype": _ORT_TO_V2.get(i.type, i.type), "shape": _dims(i.shape)}
            for i in self.session.get_inputs()
        ]
        self._output_types = [
            {"name": o.name, "datatype": _ORT_TO_V2.get(o.type, o.type), "shape": _dims(o.shape)}
            for o in self.session.get_outputs()
        ]
        self._output_names = [o["name"] for o in self._output_types]
        logger.info("loaded %s: inputs %s outputs %s (intra_op_threads=%d)", self.model_file,
                    self._input_types, self._output_types, self.intra_op_threads)
        self.ready = True
        return self.ready

    # Used by ModelMetadata (REST and gRPC).
    def get_input_types(self) -> List[Dict]:
        return self._input_types

    def get_output_types(self) -> List[Dict]:
        return self._output_types

    def _run(self, payload: InferRequest) -> InferResponse:
        feeds = {inp.name: inp.as_numpy() for inp in payload.inputs}
        if payload.request_outputs:
            names = [o.name for o in payload.request_outputs]
            unknown = [n for n in names if n not in self._output_names]
            if unknown:
                raise InvalidInput(f"unknown output(s) {unknown} for model '{self.name}'")
        else:
            names = self._output_names
        try:
            results = self.session.run(names, feeds)
        except Exception as e:  # onnxruntime's errors: bad names, dtypes or shapes
            raise InvalidInput(f"onnxruntime: {e}") from e
        outputs = []
        for name, arr in zip(names, results):
            arr = np.asarray(arr)
            out = InferOutput(name=name, shape=list(arr.shape), datatype=_NP_TO_V2[arr.dtype])
            out.set_data_from_numpy(arr, binary_data=True)
            outputs.append(out)
        return InferResponse(
            response_id=payload.id or generate_uuid(),
            model_name=self.name,
            model_version=payload.model_version or None,
            infer_outputs=outputs,
            use_binary_outputs=True,
        )

    async def predict(self, payload: InferRequest, headers: Dict[str, str] = None,
                      response_headers: Dict[str, str] = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("this model speaks the v2 protocol only (InferRequest)")
        if self.run_in_executor:
            return await asyncio.get_running_loop().run_in_executor(None, self._run, payload)
        # Inline on the event loop, as kserve's own sklearn/xgboost runtimes do: for small
        # models the thread hop costs more than the inference.
        return self._run(payload)


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


def _add_triton_model_config(model: OnnxModel) -> None:
    import importlib.util

    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlserver_onnx", "triton_config.py")
    spec = importlib.util.spec_from_file_location("peers_triton_config", path)
    tc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tc)
    handler = tc.model_config_handler(
        lambda name: (model.get_input_types(), model.get_output_types()) if name == model.name else None)
    tc.patch_add_servicer(grpc_predict_v2_pb2_grpc, "add_GRPCInferenceServiceServicer_to_server", handler)


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser],
                                     description="KServe model server for one ONNX file")
    parser.add_argument("--model_file", required=True, help="path of the .onnx file")
    parser.add_argument("--intra_op_threads", type=int, default=1,
                        help="onnxruntime intra-op threads of the session")
    parser.add_argument("--run_in_executor", action="store_true",
                        help="run the session in kserve's thread pool instead of on the event loop")
    parser.add_argument("--triton_model_config", action="store_true",
                        help="also answer Triton's ModelConfig gRPC method (which perf_analyzer needs; "
                             "see scripts/peers/mlserver_onnx/triton_config.py)")
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="level of kserve's loggers (INFO: kserve's default, a log line per request)")
    args, _ = parser.parse_known_args()
    if not os.path.isfile(args.model_file):
        parser.error(f"--model_file {args.model_file}: no such file")
    require_free_ports(http_port=args.http_port, grpc_port=args.grpc_port)

    # http_port, grpc_port, workers (default 1), max_threads, ... come from kserve's own
    # parse of sys.argv (model_server.args), which is what ModelServer() defaults to. Its
    # constructor also sets up kserve's logging, so it comes first.
    server = ModelServer()
    model = OnnxModel(args.model_name, args.model_file, intra_op_threads=args.intra_op_threads,
                      run_in_executor=args.run_in_executor)
    model.load()
    logger.info("kserve %s serving model '%s' on gRPC :%d, HTTP :%d", metadata.version("kserve"),
                args.model_name, args.grpc_port, args.http_port)
    if args.triton_model_config:
        _add_triton_model_config(model)
    # kserve logs two INFO lines per request (the gRPC interceptor's "grpc method: ..." and,
    # unless --enable_latency_logging false, kserve.trace's latencies): WARNING drops both.
    logging.getLogger("kserve").setLevel(args.log_level)
    logging.getLogger("kserve.trace").setLevel(args.log_level)
    server.start([model])


if __name__ == "__main__":
    main()
