"""REST JSON and the binary tensor extension <-> core InferRequest / InferResponse (protocol.md §4.2-4.4).

Translation only: names, datatypes, shapes and sizes against the model are checked by the data plane.
JSON ``data`` becomes an array with one ``np.asarray`` over the parsed list (nested or flat, row-major),
never a per-element Python loop except for BYTES; binary blobs become numpy views over the request
body (``dtypes.decode_raw``), without a copy.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import numpy as np
import orjson

from server.core import dtypes
from server.core.errors import ErrorCode, ServingError, invalid
from server.core.types import InferRequest, InferResponse, RequestedOutput, Tensor

# numbers in JSON cannot be half precision faithfully; Triton refuses them the same way
JSON_REFUSED = frozenset({"FP16", "BF16"})
_INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
_FLOAT_TYPES = frozenset({"FP32", "FP64"})
_DUMPS = orjson.OPT_SERIALIZE_NUMPY


_NON_FINITE = (b"NaN", b"Infinity", b"-Infinity")


def loads(data: bytes | bytearray | memoryview, what: str = "request body") -> object:
    """Parse JSON; NaN/Infinity literals (which tritonclient sends for non-finite floats) are accepted.

    Nothing of a failed parse outlives the call: only the error text is kept (an exception kept in a
    local would form a cycle, exception -> traceback -> this frame -> exception, holding the body
    until the garbage collector happened to run)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        message, position = str(exc), exc.pos
    # the stdlib parser takes NaN, Infinity and -Infinity; orjson is strict RFC 8259. Only worth a
    # second parse when orjson stopped at one of those literals
    view = memoryview(data)
    # orjson counts characters; the byte offset is the UTF-8 length of that many characters
    offset = len(str(view[: 4 * position], "utf-8", "ignore")[:position].encode()) if position else 0
    window = bytes(view[max(0, offset - 1) : offset + 9])
    if any(literal in window for literal in _NON_FINITE):
        try:
            return json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            pass
    raise invalid(f"malformed JSON in the {what}: {message}")


def dumps(value: object) -> bytes:
    return orjson.dumps(value, option=_DUMPS)


@dataclass(slots=True)
class OutputFormat:
    """Which outputs the response carries as binary blobs: per output ``binary_data``, else the
    request's ``binary_data_output`` (the extension doc's reading; both real clients set one or the other)."""

    default_binary: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.default_binary)


# ---------------------------------------------------------------- request


def _header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():
        raise invalid(
            f"Inference-Header-Content-Length must be a non-negative decimal integer, got '{value}'"
        )
    length = int(text)
    if length > body_length:
        raise invalid(
            f"Inference-Header-Content-Length is {length} but the request body has only {body_length} bytes"
        )
    if length == 0:  # Triton's "raw binary request" for single-input models
        raise ServingError(
            ErrorCode.UNIMPLEMENTED,
            "Inference-Header-Content-Length is 0 (a raw binary request without a JSON header), which "
            "this server does not support: send the JSON inference header before the binary data",
        )
    return length


_PARAM_TYPES = (str, int, float, bool)


def _param_dict(value: object, where: str) -> dict:
    """A ``parameters`` object (the parsed document's own dict: it is not shared with anything)."""
    if value is None:
        return {}
    if type(value) is not dict:
        raise invalid(f"{where} 'parameters' must be a JSON object, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, _PARAM_TYPES):
            raise invalid(
                f"{where} parameter '{key}' must be a string, number or boolean, got {type(item).__name__}"
            )
    return value


def _flag(params: dict, key: str, where: str, default: bool) -> bool:
    value = params.pop(key, default)
    if not isinstance(value, bool):
        raise invalid(f"{where} parameter '{key}' must be a boolean, got {value!r}")
    return value


def _shape(name: str, value: object) -> list[int]:
    if type(value) is list:
        for dim in value:
            if type(dim) is not int:  # (orjson gives plain ints; a bool or a fraction is refused)
                break
        else:
            dtypes.check_shape(name, value)
            return value
    raise invalid(f"input '{name}': 'shape' must be an array of integers, got {repr(value)[:200]}")


def _flat_strings(name: str, data: list, out: list) -> None:
    # iterative: nesting as deep as the JSON parser allows must not reach Python's recursion limit
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise invalid(f"input '{name}' of BYTES must hold JSON strings, found {type(item).__name__}")
            out.append(item)
        else:
            stack.pop()


def json_array(name: str, datatype: str, shape: list[int], data: object) -> np.ndarray:
    """A JSON ``data`` value (flat or nested, row-major) -> array of ``shape`` and ``datatype``."""
    if datatype in JSON_REFUSED:
        raise invalid(
            f"input '{name}' is {datatype}, which JSON cannot carry; send it as binary data "
            "(parameters.binary_data_size)"
        )
    if not isinstance(data, list):
        raise invalid(f"input '{name}': 'data' must be a JSON array, got {type(data).__name__}")
    count = dtypes.check_shape(name, shape)
    if datatype == "BYTES":
        items: list[str] = []
        _flat_strings(name, data, items)
        if len(items) != count:
            raise invalid(
                f"input '{name}' has {len(items)} elements in 'data' but shape {shape} needs {count}"
            )
        return dtypes.to_bytes_array(items, count).reshape(shape)
    target = dtypes.NUMPY_DTYPES[datatype]
    try:
        probe = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise invalid(
            f"input '{name}': 'data' is not a regular (rectangular) array of numbers: {exc}"
        ) from None
    if probe.size != count:
        raise invalid(f"input '{name}' has {probe.size} elements in 'data' but shape {shape} needs {count}")
    if count == 0:
        return np.empty(shape, dtype=target)
    kind = probe.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise invalid(f"input '{name}' of BOOL must hold JSON booleans (true/false)")
        return probe.reshape(shape)
    if kind in "iu" and datatype in _INT_TYPES:
        info = np.iinfo(target)
        if probe.min() < info.min or probe.max() > info.max:
            raise invalid(
                f"input '{name}' holds values outside the range of {datatype} [{info.min}, {info.max}]"
            )
        return probe.astype(target).reshape(shape)
    if kind in "iuf" and datatype in _FLOAT_TYPES:
        return probe.astype(target).reshape(shape)
    if datatype in _INT_TYPES and kind in "fO":
        # integers beyond int64 make numpy infer float64 or object: convert exactly, then make
        # sure nothing was a fraction
        try:
            exact = np.asarray(data, dtype=target)
        except (OverflowError, ValueError, TypeError):
            raise invalid(
                f"input '{name}' of {datatype} holds values that are not integers "
                f"in range [{np.iinfo(target).min}, {np.iinfo(target).max}]"
            ) from None
        if kind == "O" or np.array_equal(exact.astype(np.float64), probe.astype(np.float64)):
            return exact.reshape(shape)
        raise invalid(f"input '{name}' of {datatype} holds non-integer numbers")
    raise invalid(
        f"input '{name}' of {datatype} must hold JSON "
        f"{'numbers' if datatype in _FLOAT_TYPES else 'integers'}, found {_kind_name(kind)}"
    )


def _kind_name(kind: str) -> str:
    return {
        "b": "booleans",
        "U": "strings",
        "f": "fractional numbers",
        "O": "null, objects or mixed values",
    }.get(kind, "values of another type")


def parse_infer(
    model: str, version: str, body: bytes | bytearray, header_length: str | None
) -> tuple[InferRequest, OutputFormat]:
    """An infer request body (JSON, or JSON + binary blobs) -> InferRequest and the output format."""
    view = memoryview(body)
    length = _header_length(header_length, len(view))
    end = len(view) if length is None else length
    doc = loads(view[:end], "inference request header" if length is not None else "inference request")
    if not isinstance(doc, dict):
        raise invalid("the inference request must be a JSON object")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise invalid(f"'id' must be a string, got {request_id!r}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise invalid("the inference request needs 'inputs', an array of input tensors")
    offset = end
    inputs: list[Tensor] = []
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid(f"inputs[{i}] must be an object with a string 'name'")
        name = item["name"]
        datatype = item.get("datatype")
        if datatype not in dtypes.NUMPY_DTYPES:
            raise invalid(
                f"input '{name}' has unknown datatype '{datatype}'; expected one of "
                f"{', '.join(dtypes.DATATYPES)}"
            )
        shape = _shape(name, item.get("shape"))
        params = _param_dict(item.get("parameters"), f"input '{name}'")
        size = params.pop("binary_data_size", None)
        sources = ("data" in item) + (size is not None) + ("shared_memory_region" in params)
        if sources != 1:
            raise invalid(
                f"input '{name}' must have exactly one of 'data', parameters.binary_data_size "
                "or parameters.shared_memory_region"
            )
        if size is not None:
            if length is None:
                raise invalid(
                    f"input '{name}' has parameters.binary_data_size but the request has no valid "
                    "'Inference-Header-Content-Length' header giving the length of its JSON part"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise invalid(
                    f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}"
                )
            if offset + size > len(view):
                raise invalid(
                    f"input '{name}' has binary_data_size {size} but only {len(view) - offset} bytes "
                    "of binary data remain in the request body"
                )
            data = dtypes.decode_raw(name, datatype, shape, view[offset : offset + size])
            offset += size
        elif "data" in item:
            data = json_array(name, datatype, shape, item["data"])
        else:  # shared memory: the data plane maps the region (server/shm.py)
            data = np.empty(0, dtype=dtypes.NUMPY_DTYPES[datatype])
        inputs.append(Tensor(name, datatype, shape, data, params))
    if offset != len(view):
        raise invalid(
            f"unexpected additional input data: {len(view) - offset} bytes after the binary data "
            "of every input (the sum of binary_data_size does not cover the request body)"
        )
    request_params = _param_dict(doc.get("parameters"), "request")
    fmt = OutputFormat(_flag(request_params, "binary_data_output", "request", False))
    outputs: list[RequestedOutput] = []
    raw_outputs = doc.get("outputs") or []
    if not isinstance(raw_outputs, list):
        raise invalid("'outputs' must be an array of requested outputs")
    for i, item in enumerate(raw_outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid(f"outputs[{i}] must be an object with a string 'name'")
        params = _param_dict(item.get("parameters"), f"output '{item['name']}'")
        if "binary_data" in params:
            fmt.binary[item["name"]] = _flag(params, "binary_data", f"output '{item['name']}'", False)
            if fmt.binary[item["name"]] and "shared_memory_region" in params:
                raise invalid(f"output '{item['name']}': Output can't set both 'shared_memory_region' and "
                              "'binary_data'")
        outputs.append(RequestedOutput(item["name"], params))
    request = InferRequest(
        model_name=model,
        model_version=version,
        id=request_id,
        inputs=inputs,
        outputs=outputs,
        parameters=request_params,
    )
    return request, fmt


# JSON above this size is parsed or written in a worker thread: orjson holds the GIL, but the
# interpreter hands it back to the event loop between its allocations, so other requests keep
# being answered (a 77 MB body: the loop waited at most ~0.1 s at a time instead of the whole parse)
OFFLOOP_JSON_BYTES = 1 << 20
_OFFLOOP_JSON_ELEMENTS = 256 << 10


async def parse_infer_async(
    model: str, version: str, body: bytes | bytearray, header_length: str | None
) -> tuple[InferRequest, OutputFormat]:
    """``parse_infer``, off the event loop when the JSON part is large."""
    json_part = len(body)
    if header_length is not None and header_length.strip().isdigit():
        json_part = min(json_part, int(header_length.strip()))
    if json_part > OFFLOOP_JSON_BYTES:
        return await asyncio.to_thread(parse_infer, model, version, body, header_length)
    return parse_infer(model, version, body, header_length)


async def encode_infer_async(
    response: InferResponse, fmt: OutputFormat
) -> tuple[bytes, list[bytes | memoryview]]:
    """``encode_infer``, off the event loop when large outputs are written as JSON."""
    in_json = sum(t.data.size for t in response.outputs if not fmt.is_binary(t.name))
    if in_json > _OFFLOOP_JSON_ELEMENTS:
        return await asyncio.to_thread(encode_infer, response, fmt)
    return encode_infer(response, fmt)


# ---------------------------------------------------------------- response


def json_data(tensor: Tensor) -> object:
    """The output's flat JSON ``data`` (Triton emits flat arrays; clients reshape by ``shape``)."""
    name, datatype = tensor.name, tensor.datatype
    if datatype in JSON_REFUSED:
        raise invalid(
            f"output '{name}' is {datatype}, which JSON cannot carry; request it with "
            "parameters.binary_data: true"
        )
    flat = tensor.data.reshape(-1)
    if datatype == "BYTES":
        try:
            return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in flat]
        except UnicodeDecodeError:
            raise invalid(
                f"output '{name}' holds bytes that are not UTF-8 text, which JSON cannot carry; "
                "request it with parameters.binary_data: true"
            ) from None
    flat = np.ascontiguousarray(flat, dtype=dtypes.NUMPY_DTYPES[datatype])
    if datatype in _FLOAT_TYPES and not np.isfinite(flat).all():
        # orjson would write null; NaN/Infinity literals are what tritonclient reads back
        return orjson.Fragment(json.dumps(flat.tolist()))
    return flat


def encode_infer(response: InferResponse, fmt: OutputFormat) -> tuple[bytes, list[bytes | memoryview]]:
    """InferResponse -> (JSON header, binary blobs in output order); no blobs: a plain JSON response."""
    outputs = []
    blobs: list[bytes | memoryview] = []
    for tensor in response.outputs:
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.in_shm:  # written into the caller's shared memory: no data here (as Triton)
            pass
        elif fmt.is_binary(tensor.name):
            blob = dtypes.encode_raw(tensor.data, tensor.datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_data(tensor)
        outputs.append(entry)
    doc: dict = {}
    if response.id:
        doc["id"] = response.id
    doc["model_name"] = response.model_name
    doc["model_version"] = response.model_version
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = outputs
    return dumps(doc), blobs
