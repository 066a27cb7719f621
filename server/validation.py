"""Request validation against a model's configuration (used by the data plane only).

Every message names the input or output and what was expected, so a client can fix its call.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from server.core.config import ModelConfig, TensorConfig
from server.core.dtypes import NUMPY_DTYPES
from server.core.errors import ErrorCode, ServingError, invalid
from server.core.types import InferRequest, RequestedOutput, Tensor

# reserved names the server interprets itself; other triton_* keys are refused
_ACCEPTED_TRITON = {"triton_enable_empty_final_response"}


def _dims_match(expected: Sequence[int], got: Sequence[int]) -> bool:
    return len(expected) == len(got) and all(e == -1 or e == g for e, g in zip(expected, got))


def _shape_text(config: ModelConfig, spec: TensorConfig) -> str:
    dims = ([-1] if config.max_batch_size > 0 else []) + list(spec.dims)
    return str(dims)


def check_inputs(config: ModelConfig, request: InferRequest) -> dict[str, np.ndarray]:
    """Validate inputs; return name -> array shaped as the backend expects (reshape applied)."""
    model = config.name
    arrays: dict[str, np.ndarray] = {}
    batch: int | None = None
    for tensor in request.inputs:
        spec = config.input(tensor.name)
        if spec is None:
            known = ", ".join(f"'{i.name}'" for i in config.inputs)
            raise invalid(f"unexpected inference input '{tensor.name}' for model '{model}'; it expects {known}")
        if tensor.name in arrays:
            raise invalid(f"input '{tensor.name}' appears more than once in the request")
        if tensor.datatype != spec.datatype:
            raise invalid(
                f"inference input '{tensor.name}' data-type is '{tensor.datatype}', "
                f"but model '{model}' expects '{spec.datatype}'"
            )
        shape = list(tensor.shape)
        dims = shape
        rank = len(spec.dims) + (1 if config.max_batch_size > 0 else 0)
        if shape and len(shape) != rank:
            # before the batch check: a missing batch dimension would otherwise read as a batch size
            raise invalid(
                f"unexpected shape for input '{tensor.name}' for model '{model}'. "
                f"Expected {_shape_text(config, spec)}, got {shape}"
            )
        if config.max_batch_size > 0:
            if not shape:
                raise invalid(f"input '{tensor.name}' has an empty shape; model '{model}' expects "
                              f"{_shape_text(config, spec)} with the batch size first")
            size, dims = shape[0], shape[1:]
            if size < 1 or size > config.max_batch_size:
                raise invalid(
                    f"inference request batch-size must be <= {config.max_batch_size} for '{model}', "
                    f"got {size} for input '{tensor.name}'" if size > 0 else
                    f"input '{tensor.name}' has batch size {size}; it must be at least 1"
                )
            if batch is None:
                batch = size
            elif size != batch:
                raise invalid(f"input '{tensor.name}' has batch size {size} but another input has {batch}; "
                              "all inputs of a request share one batch size")
        if not _dims_match(spec.dims, dims):
            raise invalid(
                f"unexpected shape for input '{tensor.name}' for model '{model}'. "
                f"Expected {_shape_text(config, spec)}, got {shape}"
            )
        array = tensor.data
        if spec.reshape is not None:
            lead = shape[:1] if config.max_batch_size > 0 else []
            try:
                array = array.reshape(lead + list(spec.reshape))
            except ValueError:
                raise invalid(f"input '{tensor.name}' of shape {shape} cannot take the shape "
                              f"{lead + list(spec.reshape)} that model '{model}' reshapes it to") from None
        arrays[tensor.name] = array
    missing = [i.name for i in config.inputs if i.name not in arrays and not i.optional]
    if missing:
        raise invalid(
            f"expected {len(config.inputs)} inputs but got {len(request.inputs)} inputs for model '{model}'; "
            f"missing {', '.join(repr(m) for m in missing)}"
        )
    return arrays


def check_outputs(config: ModelConfig, requested: list[RequestedOutput]) -> list[str]:
    """The output names to return, in request order (all outputs, in config order, when none asked)."""
    if not requested:
        return [o.name for o in config.outputs]
    names = []
    for out in requested:
        if config.output(out.name) is None:
            known = ", ".join(f"'{o.name}'" for o in config.outputs)
            raise invalid(f"unexpected inference output '{out.name}' for model '{config.name}'; it has {known}")
        if out.name in names:
            raise invalid(f"output '{out.name}' is requested more than once")
        if "classification" in out.parameters:
            raise invalid(f"output '{out.name}': the classification extension is not supported")
        names.append(out.name)
    return names


class CheckedShapes:
    """``check_inputs`` + ``check_outputs`` done once per request shape and model configuration, and
``check_output`` once per output shape.

    A request whose ``shape_key`` is set was built from a fixed description (names, datatypes,
    shapes, requested outputs): once one such request passed the checks against a configuration,
    the next ones need only the same reshapes. Entries are keyed by the configuration's identity, so
    a reload (a new ModelVersion, a new configuration) checks again; a request that fails the checks
    leaves no entry and every later one fails them again with the same message. At most ``limit``
    entries, the oldest dropped first."""

    __slots__ = ("_plans", "_outputs", "limit")

    def __init__(self, limit: int = 4096) -> None:
        self._plans: dict[tuple[Any, int], tuple[ModelConfig, list, list[str]]] = {}
        # (output name, dtype, shape, id(config)) -> (config, datatype, shape, reshaped): check_output's
        # verdict depends on nothing else, so a backend's outputs of one shape are checked once
        self._outputs: dict[tuple, tuple[ModelConfig, str, tuple, bool]] = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self._plans)

    def check(self, config: ModelConfig, request: InferRequest) -> tuple[dict[str, np.ndarray], list[str]]:
        """(name -> array as the backend expects it, the output names to return)."""
        key = request.shape_key
        if key is None:
            return check_inputs(config, request), check_outputs(config, request.outputs)
        plan = self._plans.get((key, id(config)))
        if plan is not None and plan[0] is config:
            arrays = {}
            for tensor, reshape in zip(request.inputs, plan[1]):
                arrays[tensor.name] = tensor.data if reshape is None else tensor.data.reshape(reshape)
            return arrays, list(plan[2])
        arrays = check_inputs(config, request)
        outputs = check_outputs(config, request.outputs)
        reshapes = [None if config.input(t.name).reshape is None else arrays[t.name].shape for t in request.inputs]
        plans = self._plans
        if len(plans) >= self.limit:
            del plans[next(iter(plans))]
        plans[(key, id(config))] = (config, reshapes, list(outputs))  # the config is held: its id stays its own
        return arrays, outputs

    def output(self, config: ModelConfig, name: str, array: np.ndarray) -> Tensor:
        """``check_output``, its verdict remembered for the array's dtype and shape (a failure is
        never remembered: it raises again with the same message)."""
        key = (name, array.dtype, array.shape, id(config))
        known = self._outputs.get(key)
        if known is not None and known[0] is config:
            _, datatype, shape, reshaped = known
            return Tensor(name, datatype, list(shape), array.reshape(shape) if reshaped else array)
        tensor = check_output(config, name, array)
        memo = self._outputs
        if len(memo) >= self.limit:
            del memo[next(iter(memo))]
        memo[key] = (config, tensor.datatype, tuple(tensor.shape), tensor.data is not array)
        return tensor


EMPTY_FINAL = "triton_enable_empty_final_response"


def check_parameters(request: InferRequest) -> bool:
    """Refuse reserved ``triton_`` keys (Triton's texts); consume and return the empty-final flag."""
    for key in request.parameters:
        if key.startswith("triton_") and key not in _ACCEPTED_TRITON:
            raise invalid("parameter keys starting with 'triton_' are reserved for Triton usage. Only the "
                          "following keys starting with 'triton_' are allowed: " + ", ".join(sorted(_ACCEPTED_TRITON)))
    empty_final = False
    if EMPTY_FINAL in request.parameters:
        empty_final = request.parameters.pop(EMPTY_FINAL)
        if not isinstance(empty_final, bool):
            raise invalid(f"invalid value type for '{EMPTY_FINAL}' parameter, expected bool_param.")
    return empty_final  # shared-memory parameters: the data plane's registry consumes them (server/shm.py)


def check_output(config: ModelConfig, name: str, array: np.ndarray) -> Tensor:
    """A backend's output checked against the configuration (datatype, shape, reshape) as a Tensor;
    INTERNAL naming the output when the model broke its own contract."""
    spec = config.output(name)
    if spec is None:
        raise ServingError(ErrorCode.INTERNAL, f"model '{config.name}' returned unknown output '{name}'")
    expected = NUMPY_DTYPES.get(spec.datatype)
    if expected is not None and array.dtype != expected and not (spec.datatype == "BYTES" and array.dtype.kind in "OSU"):
        raise ServingError(ErrorCode.INTERNAL, f"model '{config.name}' returned output '{name}' as {array.dtype}; "
                           f"its configuration declares {spec.datatype}")
    shape = list(array.shape)
    lead = 1 if config.max_batch_size > 0 else 0
    if spec.reshape is not None:
        shape = shape[:lead] + list(spec.dims)
        if int(np.prod(shape)) != array.size:
            raise ServingError(ErrorCode.INTERNAL, f"model '{config.name}' returned output '{name}' with shape "
                               f"{list(array.shape)}, which cannot be reshaped to {shape}")
        array = array.reshape(shape)
    dims = list(spec.dims)
    if len(shape) != lead + len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape[lead:])):
        declared = (["-1"] if lead else []) + [str(d) for d in dims]
        raise ServingError(ErrorCode.INTERNAL, f"model '{config.name}' returned output '{name}' with shape "
                           f"{shape}; its configuration declares [{', '.join(declared)}]")
    return Tensor(name, spec.datatype, shape, array)
