"""Triton's generate extension (REST): a JSON body <-> one inference request, and each response as
one flat JSON object (reference: generative.md §2.2-§2.3, Triton's ConvertGenerateRequest and
ExactMappingInput / ExactMappingOutput)."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from server.core.dtypes import NUMPY_DTYPES
from server.core.errors import invalid
from server.core.types import InferRequest, InferResponse, ModelMetadata, TensorMetadata, Tensor

from . import converters

NOT_ONE = ("generate expects model to produce exactly 1 response, use generate stream for model that "
           "generates various number of responses")
BAD_ENCODING = "Unsupported content-encoding, only 'identity' is supported."


def to_request(meta: ModelMetadata, version: str, body: bytes | bytearray) -> InferRequest:
    doc = converters.loads(body) if body.strip() else {}
    if not isinstance(doc, dict):
        raise invalid("the generate request body must be a JSON object")
    inputs = {t.name: t for t in meta.inputs}
    request = InferRequest(model_name=meta.name, model_version=version)
    if "id" in doc:
        if not isinstance(doc["id"], str):
            raise invalid("Unable to parse 'id'")
        request.id = doc["id"]
    tensors: dict[str, Tensor] = {}
    for key, value in doc.items():
        if key == "id":
            continue
        if key == "parameters" and key not in inputs:
            if not isinstance(value, dict):
                raise invalid(f"Expected JSON object for keyword: 'parameters': got {type(value).__name__}")
            for inner, inner_value in value.items():
                try:
                    _assign(inner, inner_value, inputs, tensors, request)
                except Exception as exc:
                    raise invalid(f"Converting keyword: 'parameters': {getattr(exc, 'message', exc)}") from None
            continue
        if key == "parameters" and isinstance(value, dict):
            raise invalid("Keyword 'parameters' for nested schema also given as input tensor name")
        _assign(key, value, inputs, tensors, request)
    request.inputs = list(tensors.values())
    return request


def _assign(key: str, value: Any, inputs: dict[str, TensorMetadata], tensors: dict[str, Tensor],
            request: InferRequest) -> None:
    spec = inputs.get(key)
    if spec is not None:
        tensors[key] = _tensor(spec, value)
        return
    if isinstance(value, (bool, str)) or (isinstance(value, (int, float)) and value is not None):
        request.parameters[key] = value
        return
    raise invalid(f"parameter '{key}' has invalid type. It should be either 'int', 'bool', or 'string'.")


def _tensor(spec: TensorMetadata, value: Any) -> Tensor:
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, (list, dict)) for v in values):
        raise invalid(f"input '{spec.name}': the generate extension takes a scalar or a flat JSON array")
    datatype = spec.datatype
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise invalid(f"input '{spec.name}' is BYTES: its elements must be JSON strings")
        data = np.empty(len(values), dtype=np.object_)
        data[:] = [v.encode() for v in values]
    elif datatype == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise invalid(f"input '{spec.name}' is BOOL: its elements must be true or false")
        data = np.array(values, dtype=np.bool_)
    else:
        kind = NUMPY_DTYPES[datatype].kind
        ok = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if kind in "iu" else (
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
        if datatype in ("FP16", "BF16") or not all(ok(v) for v in values):
            raise invalid(f"input '{spec.name}' is {datatype}: its elements must be JSON numbers of that type")
        try:
            data = np.array(values, dtype=NUMPY_DTYPES[datatype])
        except OverflowError:
            raise invalid(f"input '{spec.name}': a value does not fit {datatype}") from None
    shape = _shape(spec, len(values))
    return Tensor(spec.name, datatype, shape, data.reshape(shape))


def _shape(spec: TensorMetadata, count: int) -> list[int]:
    """Fixed dims must divide the element count; the innermost -1 takes the rest, other -1s are 1."""
    shape = list(spec.shape)
    remaining = count
    for dim in reversed(shape):
        if dim != -1:
            if dim <= 0 or remaining % dim:
                raise invalid(f"The schema can not convert input '{spec.name}' to tensor with proper shape")
            remaining //= dim
    dynamic = [i for i, dim in enumerate(shape) if dim == -1]
    if not dynamic:
        if remaining != 1:
            raise invalid(f"The schema can not convert input '{spec.name}' to tensor with proper shape")
        return shape
    for i in dynamic:
        shape[i] = 1
    shape[dynamic[-1]] = remaining
    return shape


def to_event(response: InferResponse) -> dict[str, Any]:
    """One response as Triton's generate extension writes it."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    for key, value in response.parameters.items():
        if isinstance(value, (bytes, bytearray)):
            raise invalid(f"response parameter '{key}' holds bytes, which the generate extension cannot carry")
        doc[key] = value
    for tensor in response.outputs:
        flat = tensor.data.reshape(-1)
        if tensor.datatype == "BYTES":
            values = [v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v) for v in flat]
        elif tensor.datatype == "BF16":
            values = (flat.astype(np.uint32) << 16).view(np.float32).tolist()  # bit patterns -> floats
        else:
            values = flat.tolist()
        doc[tensor.name] = values[0] if len(values) == 1 else values
    return doc


def dumps(doc: dict[str, Any]) -> bytes:
    """Compact JSON with the keys sorted, as Triton writes generate responses (checked against Triton
    2.51 by scripts/compare_triton_streams.py: outputs, id, model_name, model_version in byte order)."""
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def sse(doc: dict[str, Any]) -> bytes:
    return b"data: " + dumps(doc) + b"\n\n"
