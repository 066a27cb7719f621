"""Builders for the ONNX models inferd ships, tests and benchmarks (the onnx package, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

# protocol datatype -> ONNX element type
ONNX_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BF16": TensorProto.BFLOAT16, "BYTES": TensorProto.STRING,
}


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "inferd", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inferd")
    model.ir_version = 8  # readable by every onnxruntime since 1.10
    onnx.checker.check_model(model)
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def add_sub(path: Path, datatype: str = "INT32", width: int = 16) -> Path:
    """INPUT0, INPUT1 [batch, width] -> OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    t = ONNX_TYPES[datatype]
    io = lambda name: helper.make_tensor_value_info(name, t, ["batch", width])  # noqa: E731
    return _save(_model(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
         helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])],
        [io("INPUT0"), io("INPUT1")], [io("OUTPUT0"), io("OUTPUT1")]), path)


def identity(path: Path, datatype: str, dims: tuple = ("batch", 4), name: str = "") -> Path:
    """INPUT0 -> OUTPUT0 unchanged (any datatype)."""
    t = ONNX_TYPES[datatype]
    return _save(_model(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        [helper.make_tensor_value_info("INPUT0", t, list(dims))],
        [helper.make_tensor_value_info("OUTPUT0", t, list(dims))]), path)


def dense(path: Path, sizes: tuple[int, ...], seed: int = 0) -> Path:
    """FP32 INPUT [batch, sizes[0]] -> Gemm/Relu layers -> OUTPUT [batch, sizes[-1]] (no Relu last)."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "INPUT"
    layers = len(sizes) - 1
    for i in range(layers):
        w = (rng.standard_normal((sizes[i], sizes[i + 1])) / np.sqrt(sizes[i])).astype(np.float32)
        b = (rng.standard_normal(sizes[i + 1]) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        out = "OUTPUT" if i == layers - 1 else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [out]))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"]))
            current = f"relu{i}"
    return _save(_model(
        nodes,
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", sizes[-1]])], inits), path)


def mlp(path: Path) -> Path:
    """The benchmark model: FP32 [batch,512] -> 2048 -> 2048 -> 2048 -> 16, seeded weights."""
    return dense(path, (512, 2048, 2048, 2048, 16), seed=2024)


def dense_reference(sizes: tuple[int, ...], seed: int, x: np.ndarray) -> np.ndarray:
    """What ``dense`` computes, in numpy (for checking results)."""
    rng = np.random.default_rng(seed)
    for i in range(len(sizes) - 1):
        w = (rng.standard_normal((sizes[i], sizes[i + 1])) / np.sqrt(sizes[i])).astype(np.float32)
        b = (rng.standard_normal(sizes[i + 1]) * 0.01).astype(np.float32)
        x = x @ w + b
        if i < len(sizes) - 2:
            x = np.maximum(x, 0)
    return x
