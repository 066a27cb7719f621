"""Builders for the PyTorch models inferd ships, tests and benchmarks: TorchScript and torch.export.

Needs only torch and numpy (the GPU check runs where the onnx package may be missing). The mlp
weights come from the same seeded generator as ``onnx_models.dense``, so the TorchScript and
ONNX benchmark models compute the same function.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

MLP_SIZES = (512, 2048, 2048, 2048, 16)
MLP_SEED = 2024


def dense_weights(sizes: tuple[int, ...], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W [in, out], b [out]) per layer, drawn exactly as ``onnx_models.dense`` draws them."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(len(sizes) - 1):
        w = (rng.standard_normal((sizes[i], sizes[i + 1])) / np.sqrt(sizes[i])).astype(np.float32)
        b = (rng.standard_normal(sizes[i + 1]) * 0.01).astype(np.float32)
        layers.append((w, b))
    return layers


def dense_reference(sizes: tuple[int, ...], seed: int, x: np.ndarray) -> np.ndarray:
    """What the dense/mlp models compute, in numpy float32 (the CPU reference for checks)."""
    layers = dense_weights(sizes, seed)
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def dense_module(sizes: tuple[int, ...], seed: int) -> torch.nn.Module:
    """Linear/ReLU stack holding ``dense_weights`` (torch stores W transposed: [out, in])."""
    modules: list[torch.nn.Module] = []
    layers = dense_weights(sizes, seed)
    for i, (w, b) in enumerate(layers):
        linear = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            linear.bias.copy_(torch.from_numpy(b))
        modules.append(linear)
        if i < len(layers) - 1:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules).eval()


def _save_script(module: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch 2.10+ marks TorchScript deprecated; it is still the format Triton's libtorch serves
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def mlp(path: Path) -> Path:
    """The benchmark model as TorchScript: FP32 [batch, 512] -> 2048 -> 2048 -> 2048 -> 16."""
    return _save_script(dense_module(MLP_SIZES, MLP_SEED), path)


class AddSubNamed(torch.nn.Module):
    """forward(INPUT0, INPUT1) -> {"OUTPUT0": sum, "OUTPUT1": difference}: binds by name."""

    def forward(self, INPUT0: torch.Tensor, INPUT1: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"OUTPUT0": INPUT0 + INPUT1, "OUTPUT1": INPUT0 - INPUT1}


class AddSubIndexed(torch.nn.Module):
    """forward(a, b) -> (a + b, a - b): Triton's INPUT__0/OUTPUT__0 positional convention."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a - b


class Scale(torch.nn.Module):
    """forward(x) -> x * factor in x's own dtype (FP16/BF16 round trips)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def add_sub_named(path: Path) -> Path:
    """The example ``simple_torch``: the ``simple`` model's interface, as TorchScript."""
    return _save_script(AddSubNamed(), path)


def add_sub_indexed(path: Path) -> Path:
    return _save_script(AddSubIndexed(), path)


def scale(path: Path, factor: float = 2.0) -> Path:
    return _save_script(Scale(factor), path)


def add_sub_export(path: Path, datatype: torch.dtype = torch.int32, width: int = 16,
                   max_batch: int = 1024) -> Path:
    """torch.export program of AddSubNamed with a dynamic batch dimension (``model.pt2``)."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example = (torch.zeros(2, width, dtype=datatype), torch.zeros(2, width, dtype=datatype))
    program = torch.export.export(AddSubNamed(), example,
                                  dynamic_shapes={"INPUT0": {0: batch}, "INPUT1": {0: batch}})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path
