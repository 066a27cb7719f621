"""ModelInferRequest <-> InferRequest and InferResponse -> ModelInferResponse."""

from __future__ import annotations

import numpy as np
from google.protobuf import json_format

from server.core import dtypes
from server.core.errors import invalid
from server.core.types import InferRequest, InferResponse, RequestedOutput, Tensor
from server.protos import grpc_service_pb2 as pb

from .wire import RawInferRequest, UnaryReply

# datatype -> the typed contents field that may carry it
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_FIELDS = sorted(set(_CONTENTS_FIELD.values()))


def param_value(p: pb.InferParameter):
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def params(mapping) -> dict:
    if not mapping:  # the common case: no parameters (saves the items() view per tensor)
        return {}
    return {k: param_value(v) for k, v in mapping.items()}


def _typed(tensor, shape: list[int]) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    contents = tensor.contents
    used = [f for f in _ALL_FIELDS if len(getattr(contents, f))]
    expected = _CONTENTS_FIELD.get(datatype)
    if expected is None:
        raise invalid(f"input '{name}' of {datatype} must be sent in raw_input_contents (no typed field carries it)")
    if any(f != expected for f in used):
        raise invalid(f"input '{name}' of {datatype} carries {', '.join(used)}; expected {expected}")
    values = getattr(contents, expected)
    count = dtypes.check_shape(name, shape)
    if len(values) != count:
        raise invalid(f"input '{name}' has {len(values)} elements in {expected} but shape {shape} needs {count}")
    if datatype == "BYTES":
        return dtypes.to_bytes_array(values, count).reshape(shape)
    return np.array(values, dtype=dtypes.NUMPY_DTYPES[datatype]).reshape(shape)


def to_request(msg: pb.ModelInferRequest | RawInferRequest, deadline: float | None = None) -> InferRequest:
    if isinstance(msg, RawInferRequest):  # ModelInfer: raw contents are views over the message
        raw, msg = msg.raw, msg.msg
    else:
        raw = msg.raw_input_contents
    available = len(raw)
    inputs: list[Tensor] = []
    next_raw = 0
    for tensor in msg.inputs:  # each protobuf field is read once: an access costs a conversion
        name, datatype, shape, tensor_params = tensor.name, tensor.datatype, list(tensor.shape), tensor.parameters
        if datatype not in dtypes.NUMPY_DTYPES:
            raise invalid(f"input '{name}' has unknown datatype '{datatype}'; expected one of "
                          f"{', '.join(dtypes.DATATYPES)}")
        if tensor_params and "shared_memory_region" in tensor_params:  # the data plane maps it; no raw entry
            if tensor.HasField("contents"):
                raise invalid(f"input '{name}' has both contents and shared_memory_region; send one")
            data = np.empty(0, dtype=dtypes.NUMPY_DTYPES[datatype])
        elif tensor.HasField("contents"):
            data = _typed(tensor, shape)
        elif next_raw < available:
            data = dtypes.decode_raw(name, datatype, shape, raw[next_raw])
            next_raw += 1
        else:
            raise invalid(f"unable to find data for input tensor '{name}': it has no contents and "
                          f"raw_input_contents has {available} entries for the inputs before it")
        inputs.append(Tensor(name, datatype, shape, data, params(tensor_params) if tensor_params else {}))
    if next_raw != available:
        raise invalid(f"raw_input_contents has {available} entries but only {next_raw} inputs take their data "
                      "from it (one entry per input without typed contents, in input order)")
    wanted = msg.outputs
    request_params = msg.parameters
    return InferRequest(
        msg.model_name, msg.model_version, msg.id, inputs,
        [RequestedOutput(o.name, params(o.parameters)) for o in wanted] if wanted else [],
        params(request_params) if request_params else {},
        deadline,
    )


def unary_response(response: InferResponse) -> UnaryReply:
    """The ModelInfer reply: the protobuf header and the outputs' bytes, serialized together once
    by wire.serialize_infer_response. An output written to shared memory has an empty raw entry
    (Triton: one entry per output)."""
    header = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                   id=response.id)
    blobs = []
    for tensor in response.outputs:
        header.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        blobs.append(b"" if tensor.in_shm else dtypes.encode_raw(tensor.data, tensor.datatype))
    for key, value in response.parameters.items():
        set_param(header.parameters[key], value)
    return UnaryReply(header, blobs)


def from_response(response: InferResponse) -> pb.ModelInferResponse:
    """The full message (for streams): the same header and bytes as ``unary_response``."""
    reply = unary_response(response)
    reply.header.raw_output_contents.extend(bytes(blob) for blob in reply.blobs)
    return reply.header


def set_param(p: pb.InferParameter, value) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def fill_statistics(target: pb.ModelStatisticsResponse, documents: list[dict]) -> None:
    """The statistics extension's documents (the data plane renders them once) as the gRPC message."""
    json_format.ParseDict({"model_stats": documents}, target)
