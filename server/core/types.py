"""The request and response types that flow between frontends, the data plane and the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ParamValue = bool | int | float | str


@dataclass(slots=True)
class Tensor:
    """A named tensor; ``data`` already has ``shape`` (see core/dtypes.py for BYTES and BF16)."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    # empty means every output of the model, in configuration order
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    # absolute time.monotonic() after which the caller no longer waits (transport deadline)
    deadline: float | None = None
    # opaque per-request context owned by telemetry (span, trace ids); None when tracing is off
    trace: Any = None


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a backend reports for one of its model's tensors; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]
