"""``triton_python_backend_utils`` for inferd: Triton's Python-backend API, so that a ``model.py``
written for Triton runs unchanged (``import triton_python_backend_utils as pb_utils``).

The objects live in objects.py; this module adds Triton's helper functions and ``ModelConfig``
(what ``auto_complete_config`` receives). Where inferd cannot honour a call (GPU DLPack, request
rescheduling) it raises a TritonError naming the call.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .objects import (  # noqa: F401 - re-exported: this module is the user-facing namespace
    TRITONSERVER_MEMORY_CPU,
    TRITONSERVER_MEMORY_CPU_PINNED,
    TRITONSERVER_MEMORY_GPU,
    TRITONSERVER_REQUEST_FLAG_SEQUENCE_END,
    TRITONSERVER_REQUEST_FLAG_SEQUENCE_START,
    TRITONSERVER_REQUEST_RELEASE_ALL,
    TRITONSERVER_REQUEST_RELEASE_RESCHEDULE,
    TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    InferenceRequest,
    InferenceResponse,
    InferenceResponseSender,
    Logger,
    LogLevel,
    MetricFamily,
    ResponseIterator,
    Tensor,
    TritonError,
    TritonModelException,
)
from . import runtime

TRITON_STRING_TO_NUMPY = {
    "TYPE_BOOL": bool, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}
_TRITON_NAMES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                 "FP16", "FP32", "FP64", "BYTES"]


class PreferredMemory:
    def __init__(self, preferred_memory_type: int = TRITONSERVER_MEMORY_CPU, preferred_device_id: int = 0) -> None:
        self.preferred_memory_type = preferred_memory_type
        self.preferred_device_id = preferred_device_id


def serialize_byte_tensor(input_tensor: np.ndarray) -> np.ndarray:
    """BYTES elements as Triton's length-prefixed buffer (a uint8 array); None for an empty tensor."""
    if input_tensor.size == 0:
        return None
    chunks = []
    for item in input_tensor.reshape(-1, order="C"):
        data = item if isinstance(item, bytes) else str(item).encode()
        chunks.append(len(data).to_bytes(4, "little") + data)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def deserialize_bytes_tensor(encoded_tensor: bytes) -> np.ndarray:
    out, offset, data = [], 0, bytes(encoded_tensor)
    while offset + 4 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "little")
        offset += 4
        if offset + size > len(data):
            raise TritonError("deserialize_bytes_tensor: an element runs past the end of the buffer",
                              TritonError.INVALID_ARG)
        out.append(data[offset:offset + size])
        offset += size
    array = np.empty(len(out), dtype=np.object_)
    array[:] = out
    return array


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in inference_request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in inference_response.output_tensors() if t.name() == name), None)


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((i for i in model_config.get("input", []) if i.get("name") == name), None)


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((o for o in model_config.get("output", []) if o.get("name") == name), None)


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def triton_to_numpy_type(data_type: int) -> Any:
    """Triton's DataType enum value (TYPE_BOOL = 1 ... TYPE_STRING = 13) -> numpy type."""
    if not 1 <= data_type <= len(_TRITON_NAMES):
        return None
    name = "TYPE_STRING" if _TRITON_NAMES[data_type - 1] == "BYTES" else "TYPE_" + _TRITON_NAMES[data_type - 1]
    return TRITON_STRING_TO_NUMPY[name]


def numpy_to_triton_type(data_type: Any) -> int | None:
    for index, name in enumerate(_TRITON_NAMES, start=1):
        key = "TYPE_STRING" if name == "BYTES" else "TYPE_" + name
        if np.dtype(TRITON_STRING_TO_NUMPY[key]) == np.dtype(data_type):
            return index
    if np.dtype(data_type).kind in "SU":
        return len(_TRITON_NAMES)
    return None


def triton_string_to_numpy(triton_type_string: str) -> Any:
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    return runtime.services().model_ready(model_name, str(model_version))


def load_model(model_name: str, config: str = "", files: dict | None = None) -> None:
    raise TritonError("load_model: loading models from a model's code is not supported by inferd; use the "
                      "repository API (explicit model control) instead", TritonError.UNSUPPORTED)


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    raise TritonError("unload_model: unloading models from a model's code is not supported by inferd; use the "
                      "repository API (explicit model control) instead", TritonError.UNSUPPORTED)


class ModelConfig:
    """The configuration ``auto_complete_config`` receives and returns (Triton's setters)."""

    def __init__(self, model_config: dict | str) -> None:
        self._config = json.loads(model_config) if isinstance(model_config, str) else model_config
        self._file_max_batch_size = int(self._config.get("max_batch_size", 0) or 0)

    def as_dict(self) -> dict:
        return self._config

    def set_max_batch_size(self, max_batch_size: int) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 0:
            raise ValueError("set_max_batch_size: max_batch_size must be a non-negative integer")
        current = self._file_max_batch_size
        if current and current != max_batch_size:
            raise ValueError(f"set_max_batch_size: configuration specified max_batch_size {current}, but "
                             f"the model sets {max_batch_size}")
        self._config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        self._config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        for key in transaction_policy_dict:
            if key != "decoupled":
                raise ValueError(f"set_model_transaction_policy: unknown key '{key}' (only 'decoupled')")
        self._config.setdefault("model_transaction_policy", {}).update(transaction_policy_dict)

    def add_input(self, input: dict) -> None:  # noqa: A002 - Triton's parameter name
        self._add("input", input)

    def add_output(self, output: dict) -> None:
        self._add("output", output)

    def _add(self, key: str, tensor: dict) -> None:
        for field in ("name", "data_type", "dims"):
            if field not in tensor:
                raise ValueError(f"add_{key}: the {key} {tensor!r} has no '{field}'")
        allowed = {"name", "data_type", "dims", "optional", "reshape", "is_shape_tensor"}
        unknown = set(tensor) - allowed
        if unknown:
            raise ValueError(f"add_{key}: unknown fields {sorted(unknown)} in {tensor.get('name')!r}")
        existing = next((t for t in self._config.setdefault(key, []) if t.get("name") == tensor["name"]), None)
        if existing is None:
            self._config[key].append(dict(tensor))
            return
        for field in ("data_type", "dims"):
            if field in existing and existing[field] != tensor[field] and existing[field] not in ("", "TYPE_INVALID", []):
                raise ValueError(f"add_{key}: {key} '{tensor['name']}' already has {field} {existing[field]!r}; "
                                 f"the model sets {tensor[field]!r}")
            existing[field] = tensor[field]
        if "optional" in tensor:
            existing["optional"] = tensor["optional"]
