"""Opt-in shim: Triton's ``ModelConfig`` gRPC method for the peer servers, for perf_analyzer.

perf_analyzer (service kind "triton") asks for ModelMetadata *and* ModelConfig before it
sends any request, and stops with "failed to get model config: Method not found!" on a
server that has only the KServe v2 core protocol, as KServe's and MLServer's servers do.
This module adds a ModelConfig method, answered from the ONNX model's inputs and outputs,
to their grpc.aio server; the ModelInfer path is not touched. The response is a
``inference.ModelConfigResponse`` of Triton's model_config.proto, hand-encoded here so that
the peers need neither tritonclient nor generated stubs:

    name, platform "onnxruntime_onnx", backend "onnxruntime", max_batch_size 0 (the peers
    do not batch: dims are the full shapes, -1 for variable dimensions, so perf_analyzer
    needs --shape NAME:dims for those), one input / output entry per tensor.

Only stdlib and grpc: importable from both peers' virtualenvs (kserve_onnx.py loads this
file by path, so that the mlserver_onnx package itself, which needs mlserver, is not
imported there).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import grpc

SERVICE = "inference.GRPCInferenceService"

# KServe v2 datatype -> Triton DataType enum value (model_config.proto)
_TRITON_TYPES = {
    "BOOL": 1, "UINT8": 2, "UINT16": 3, "UINT32": 4, "UINT64": 5, "INT8": 6, "INT16": 7,
    "INT32": 8, "INT64": 9, "FP16": 10, "FP32": 11, "FP64": 12, "BYTES": 13, "BF16": 14,
}

# A tensor as {"name": str, "datatype": v2 datatype, "shape": [int, ...] (-1: variable)}
Tensor = Dict[str, object]


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 negatives: 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _str_field(field: int, s: str) -> bytes:
    return _bytes_field(field, s.encode()) if s else b""


def _int_field(field: int, v: int) -> bytes:
    return _key(field, 0) + _varint(v) if v else b""


def _packed_int64(field: int, values: Sequence[int]) -> bytes:
    return _bytes_field(field, b"".join(_varint(int(v)) for v in values)) if values else b""


def encode_model_config_response(name: str, inputs: List[Tensor], outputs: List[Tensor],
                                 platform: str = "onnxruntime_onnx", backend: str = "onnxruntime",
                                 max_batch_size: int = 0) -> bytes:
    cfg = _str_field(1, name) + _str_field(2, platform) + _int_field(4, max_batch_size)
    for field, dims_field, tensors in ((5, 4, inputs), (6, 3, outputs)):
        # ModelInput (5): name 1, data_type 2, dims 4; ModelOutput (6): name 1, data_type 2, dims 3
        for t in tensors:
            cfg += _bytes_field(field, _str_field(1, str(t["name"]))
                                + _int_field(2, _TRITON_TYPES[str(t["datatype"])])
                                + _packed_int64(dims_field, t["shape"]))  # type: ignore[arg-type]
    cfg += _str_field(17, backend)
    return _bytes_field(1, cfg)  # ModelConfigResponse.config


def decode_model_config_request(data: bytes) -> Tuple[str, str]:
    """ModelConfigRequest{name = 1, version = 2} -> (name, version)."""
    fields = {1: "", 2: ""}
    i = 0
    while i < len(data):
        key = shift = 0
        while True:
            b = data[i]; i += 1
            key |= (b & 0x7F) << shift; shift += 7
            if not b & 0x80:
                break
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            while data[i] & 0x80:
                i += 1
            i += 1
        elif wire_type == 2:
            n = shift = 0
            while True:
                b = data[i]; i += 1
                n |= (b & 0x7F) << shift; shift += 7
                if not b & 0x80:
                    break
            if field in fields:
                fields[field] = data[i:i + n].decode()
            i += n
        elif wire_type == 5:
            i += 4
        elif wire_type == 1:
            i += 8
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    return fields[1], fields[2]


def onnx_tensors(model_file: str) -> Tuple[List[Tensor], List[Tensor]]:
    """(inputs, outputs) of an ONNX file, read with onnxruntime."""
    import onnxruntime as ort

    types = {"tensor(bool)": "BOOL", "tensor(int8)": "INT8", "tensor(int16)": "INT16",
             "tensor(int32)": "INT32", "tensor(int64)": "INT64", "tensor(uint8)": "UINT8",
             "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
             "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
             "tensor(string)": "BYTES"}
    sess = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])

    def conv(args) -> List[Tensor]:
        return [{"name": a.name, "datatype": types[a.type],
                 "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in a.shape]} for a in args]

    return conv(sess.get_inputs()), conv(sess.get_outputs())


def model_config_handler(models: Callable[[str], Optional[Tuple[List[Tensor], List[Tensor]]]]
                         ) -> grpc.GenericRpcHandler:
    """A generic handler serving ModelConfig; models(name) gives (inputs, outputs) or None."""

    async def model_config(request: Tuple[str, str], context) -> bytes:
        name, _version = request
        found = models(name)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"Request for unknown model: '{name}' is not found")
        return encode_model_config_response(name, found[0], found[1])

    return grpc.method_handlers_generic_handler(SERVICE, {
        "ModelConfig": grpc.unary_unary_rpc_method_handler(
            model_config, request_deserializer=decode_model_config_request,
            response_serializer=lambda b: b),
    })


def patch_add_servicer(module, attr: str, handler: grpc.GenericRpcHandler) -> None:
    """Wrap module.attr (a generated add_GRPCInferenceServiceServicer_to_server) so that the
    server it registers the v2 servicer on also gets `handler`; the generated code's own
    handler answers None for methods it does not know, so gRPC falls through to this one."""
    original = getattr(module, attr)

    def add_servicer(servicer, server):
        original(servicer, server)
        server.add_generic_rpc_handlers((handler,))

    setattr(module, attr, add_servicer)
