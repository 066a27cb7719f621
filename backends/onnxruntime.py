"""ONNX Runtime backend: CPU by default, the CUDA provider for GPU instances when it is present.

Config ``parameters`` (Triton's names): ``intra_op_thread_count``, ``inter_op_thread_count``,
``execution_mode`` (0 sequential, 1 parallel), ``graph_optimization_level`` (0/1/2/99); and
``allow_spinning`` ("0" default, "1" lets idle intra-op threads spin as plain ORT does).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from server.core.backend import Backend, LoadContext
from server.core.errors import ServingError, ErrorCode, invalid
from server.core.types import TensorSpec

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}
_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16
_GRAPH_LEVELS = {
    "0": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "1": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "2": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "99": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _model_file(path: Path) -> Path:
    # Triton accepts model.onnx as a file, or as a directory holding model.onnx (external data)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"model file '{path}' does not exist")
    return path


def _providers(device: str, model: str) -> list:
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        log.warning(
            "model '%s' asks for %s but onnxruntime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu alone); running on the CPU",
            model,
            device,
        )
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    inline = True  # session.run is pure compute; the scheduler runs only batches it measured cheap inline
    def __init__(self, session: ort.InferenceSession, name: str) -> None:
        self._session = session
        self._name = name
        self._types = {a.name: _ORT_TYPES.get(a.type, a.type) for a in session.get_inputs()}
        self._types.update({a.name: _ORT_TYPES.get(a.type, a.type) for a in session.get_outputs()})
        self._bf16 = "BF16" in self._types.values()

    @classmethod
    def load(cls, ctx: LoadContext) -> "OnnxRuntimeBackend":
        params = ctx.config.parameters
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", ctx.cpu_threads))
        opts.inter_op_num_threads = int(params.get("inter_op_thread_count", 1))
        if params.get("execution_mode") == "1":
            opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        level = params.get("graph_optimization_level")
        if level in _GRAPH_LEVELS:
            opts.graph_optimization_level = _GRAPH_LEVELS[level]
        opts.log_severity_level = 3
        # Spinning intra-op threads burn the cores the event loop and the other instances need
        # between batches; a server on few cores gains more from sleeping workers.
        opts.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "0"))
        path = _model_file(ctx.model_file)
        try:
            session = ort.InferenceSession(str(path), opts, providers=_providers(ctx.device, ctx.model_name))
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise ServingError(
                ErrorCode.FAILED_PRECONDITION, f"onnxruntime could not load '{path}': {exc}"
            ) from exc
        return cls(session, ctx.model_name)

    def io_specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        def spec(arg) -> TensorSpec:
            shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
            return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)

        return [spec(a) for a in self._session.get_inputs()], [spec(a) for a in self._session.get_outputs()]

    def _feed(self, name: str, array: np.ndarray) -> np.ndarray:
        # onnxruntime's Python API takes string tensors only as text: it str()s each object and
        # encodes it as UTF-8 (bytes objects arrive as their repr, "S" arrays are decoded as UTF-8,
        # and OrtValue refuses string arrays), so bytes that are not UTF-8 cannot reach the model
        if self._types.get(name) == "BYTES" and array.dtype == np.object_:
            flat = array.reshape(-1)
            texts = np.empty(flat.size, dtype=np.object_)
            for i, item in enumerate(flat):
                try:
                    texts[i] = item.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise invalid(
                        f"input '{name}' holds bytes that are not UTF-8 ({exc.reason} at byte {exc.start} of "
                        "an element); onnxruntime's Python API carries string tensors only as UTF-8 text, so "
                        "an ONNX model cannot take arbitrary bytes: send UTF-8 text, or serve the model with "
                        "the python backend, which passes bytes unchanged"
                    ) from exc
            return texts.reshape(array.shape)
        return array

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        feed = {name: self._feed(name, array) for name, array in inputs.items()}
        names = list(outputs)
        if self._bf16:
            return self._execute_ort_values(feed, names)
        results = self._session.run(names, feed)
        return dict(zip(names, results))

    def _execute_ort_values(self, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        # numpy has no bfloat16: pass BF16 bit patterns as typed OrtValues and read results by address
        values = {
            name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(a), _BFLOAT16)
            if self._types.get(name) == "BF16"
            else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
            for name, a in feed.items()
        }
        results = self._session.run_with_ort_values(names, values)
        out: dict[str, np.ndarray] = {}
        for name, value in zip(names, results):
            if self._types.get(name) == "BF16":
                shape = value.shape()
                count = int(np.prod(shape)) if shape else 1
                buf = (ctypes.c_uint16 * count).from_address(value.data_ptr()) if count else []
                out[name] = np.array(buf, dtype=np.uint16).reshape(shape)
            else:
                out[name] = value.numpy()
        return out

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
