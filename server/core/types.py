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
    # an output the server wrote into the caller's shared-memory region: the response names it but
    # carries no data for it (gRPC: an empty raw entry; REST: neither data nor binary_data_size)
    in_shm: bool = False


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
    # sticky canary routing: requests with one key always see one version (x-inferd-routing-key)
    routing_key: str = ""
    # who is asking, for cost accounting (frontends/identity.py); "" when unknown
    caller: str = ""
    # set by a frontend that built this request from a fixed description (a frontend worker's request
    # template): every request with the same key has the same input names, datatypes and shapes and
    # asks for the same outputs, so the data plane validates that shape once per model configuration.
    # Hashed by identity; None (the usual case): validated request by request
    shape_key: Any = None


@dataclass(slots=True)
class InferResponse:
    """One response of a request's stream. A unary request has exactly one, ``final``; a decoupled
    model's request has 0..N, the last ``final`` (a flags-only final has no outputs). ``error`` set:
    this response reports a failure of its request (Triton sends those in-band on streams)."""

    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    final: bool = True
    error: Any = None  # ServingError | None (typed loosely: core/types stays free of core/errors)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a backend reports for one of its model's tensors; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]  # -1 for a dynamic dimension, the batch dimension first when the model batches


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What ModelMetadata / GET /v2/models/{m} report."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    decoupled: bool = False


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of the repository index (a model version, or a model with no version known)."""

    name: str
    version: str
    state: str
    reason: str
