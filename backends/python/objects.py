"""The objects of Triton's Python-backend API (``triton_python_backend_utils``), written for inferd.

Behaviour and names follow Triton's python_backend README; the exact error texts of its response
sender are those of core/stream.py. Tensors wrap numpy arrays (BYTES: object arrays of bytes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, Iterator

import numpy as np

from server.core.errors import ErrorCode, ServingError
from server.core.types import InferRequest, RequestedOutput, Tensor as CoreTensor

from . import runtime

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2
TRITONSERVER_MEMORY_CPU = 0
TRITONSERVER_MEMORY_CPU_PINNED = 1
TRITONSERVER_MEMORY_GPU = 2


class TritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    """Raised by a model to fail its requests (Triton's name)."""


# TritonError code <-> inferd ErrorCode
_TO_CODE = {
    TritonError.UNKNOWN: ErrorCode.INTERNAL, TritonError.INTERNAL: ErrorCode.INTERNAL,
    TritonError.NOT_FOUND: ErrorCode.NOT_FOUND, TritonError.INVALID_ARG: ErrorCode.INVALID_ARGUMENT,
    TritonError.UNAVAILABLE: ErrorCode.UNAVAILABLE, TritonError.UNSUPPORTED: ErrorCode.UNIMPLEMENTED,
    TritonError.ALREADY_EXISTS: ErrorCode.INVALID_ARGUMENT, TritonError.CANCELLED: ErrorCode.CANCELLED,
}
_FROM_CODE = {ErrorCode.INTERNAL: TritonError.INTERNAL, ErrorCode.NOT_FOUND: TritonError.NOT_FOUND,
              ErrorCode.INVALID_ARGUMENT: TritonError.INVALID_ARG, ErrorCode.UNAVAILABLE: TritonError.UNAVAILABLE,
              ErrorCode.UNIMPLEMENTED: TritonError.UNSUPPORTED, ErrorCode.CANCELLED: TritonError.CANCELLED,
              ErrorCode.DEADLINE_EXCEEDED: TritonError.UNAVAILABLE,
              ErrorCode.FAILED_PRECONDITION: TritonError.INVALID_ARG}


def to_serving_error(error: TritonError) -> ServingError:
    if not isinstance(error, TritonError):
        return ServingError(ErrorCode.INTERNAL, str(error))
    return ServingError(_TO_CODE.get(error.code(), ErrorCode.INTERNAL), error.message())


def from_serving_error(error: ServingError) -> TritonError:
    return TritonError(error.message, _FROM_CODE.get(error.code, TritonError.INTERNAL))


class Tensor:
    """A named tensor over a numpy array."""

    def __init__(self, name: str, data: Any, datatype: str | None = None) -> None:
        array = np.asarray(data)
        if array.dtype.kind in "SU":  # Triton stores string arrays as BYTES (object of bytes)
            array = array.astype(np.object_)
        if array.dtype == np.object_:
            array = _bytes_objects(array)
        self._name = name
        self._array = array
        self._datatype = datatype

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        if self._array.dtype == np.object_:
            raise TritonError("to_dlpack: a BYTES tensor has no DLPack form", TritonError.UNSUPPORTED)
        return self._array.__dlpack__()

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> "Tensor":
        """From a DLPack capsule (torch.utils.dlpack.to_dlpack) or any object with ``__dlpack__``."""
        if hasattr(capsule, "__dlpack__"):
            device = capsule.__dlpack_device__()[0] if hasattr(capsule, "__dlpack_device__") else 1
            if device != 1:
                raise TritonError("from_dlpack: the tensor is on a GPU; inferd's Python models run on CPU "
                                  "memory (copy it to the CPU first)", TritonError.UNSUPPORTED)
            return cls(name, np.from_dlpack(capsule))
        try:
            from torch.utils import dlpack as torch_dlpack
        except ImportError:
            raise TritonError("from_dlpack with a raw DLPack capsule needs torch installed",
                              TritonError.UNSUPPORTED) from None
        tensor = torch_dlpack.from_dlpack(capsule)
        if tensor.device.type != "cpu":
            raise TritonError("from_dlpack: the tensor is on a GPU; inferd's Python models run on CPU "
                              "memory (copy it to the CPU first)", TritonError.UNSUPPORTED)
        return cls(name, tensor.numpy())

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={list(self._array.shape)}, dtype={self._array.dtype})"


def _bytes_objects(array: np.ndarray) -> np.ndarray:
    """Object arrays leave as bytes (str elements are UTF-8 encoded, as Triton serializes them)."""
    flat = array.reshape(-1)
    if all(isinstance(v, bytes) for v in flat):
        return array
    out = np.empty(flat.shape, dtype=np.object_)
    for i, v in enumerate(flat):
        out[i] = v if isinstance(v, bytes) else v.encode() if isinstance(v, str) else str(v).encode()
    return out.reshape(array.shape)


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None,
                 parameters: dict | str | None = None) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error
        if isinstance(parameters, str):
            parameters = json.loads(parameters)
        for key, value in (parameters or {}).items():
            if not isinstance(value, (bool, int, str)):
                raise TritonError(f"Expect parameters values to have type bool/int/str, found type "
                                  f"{type(value).__name__} for key '{key}'", TritonError.INVALID_ARG)
        self._parameters = dict(parameters or {})

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters)


class InferenceResponseSender:
    """Sends a request's responses (any thread, also after execute returned)."""

    def __init__(self, sender: Any, names: list[str]) -> None:
        self._sender = sender
        self._names = names

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        try:
            if response is None:
                self._sender.send(final=final)
            elif response.has_error():
                self._sender.send(error=to_serving_error(response.error()), final=final,
                                  parameters=response._parameters or None)
            else:
                outputs = {t.name(): t.as_numpy() for t in response.output_tensors() if t.name() in self._names}
                self._sender.send(outputs, final=final, parameters=response._parameters or None)
        except ServingError as exc:
            raise TritonError(exc.message, TritonError.INTERNAL) from None

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()


class InferenceRequest:
    """A request as ``execute`` receives it, or (constructed by the model) a BLS request."""

    def __init__(self, model_name: str = "", inputs: list[Tensor] | None = None,
                 requested_output_names: list[str] | None = None, request_id: str = "",
                 correlation_id: int | str = 0, model_version: int = -1, flags: int = 0, timeout: int = 0,
                 preferred_memory: Any = None, parameters: dict | str | None = None, trace: Any = None) -> None:
        self.model_name = model_name
        self._inputs = list(inputs or [])
        self._outputs = list(requested_output_names or [])
        self._id = request_id
        self._correlation_id = correlation_id
        self.model_version = model_version
        self._flags = flags
        self._timeout = timeout
        if isinstance(parameters, str):
            parameters = json.loads(parameters)
        self._parameters = dict(parameters or {})
        self._sender: Any = None  # set for a request that execute received
        self._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL

    @classmethod
    def received(cls, model_name: str, model_version: int, request_id: str, inputs: dict[str, np.ndarray],
                 outputs: list[str], parameters: dict, sender: Any) -> "InferenceRequest":
        request = cls(model_name, [Tensor(n, a) for n, a in inputs.items()], outputs, request_id,
                      model_version=model_version, parameters=parameters)
        request._sender = sender
        return request

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._outputs

    def request_id(self) -> str:
        return self._id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    def is_cancelled(self) -> bool:
        return self._sender is not None and self._sender.is_cancelled()

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            raise TritonError("get_response_sender: only a request that execute received has a response sender")
        return InferenceResponseSender(self._sender, self._outputs)

    def set_release_flags(self, flags: int) -> None:
        if flags & TRITONSERVER_REQUEST_RELEASE_RESCHEDULE:
            raise TritonError("set_release_flags: request rescheduling (TRITONSERVER_REQUEST_RELEASE_RESCHEDULE) "
                              "is not supported by inferd", TritonError.UNSUPPORTED)
        self._release_flags = flags

    # -- BLS: this request sent to another model of the server ---------------------------------

    def _core(self) -> InferRequest:
        if self._sender is not None:
            raise TritonError("exec: a request that execute received cannot be sent again; build a new "
                              "pb_utils.InferenceRequest")
        tensors = []
        for t in self._inputs:
            array = t.as_numpy()
            tensors.append(CoreTensor(t.name(), runtime.datatype_of(array), list(array.shape), array))
        version = "" if self.model_version in (-1, "", None) else str(self.model_version)
        parameters = dict(self._parameters)
        if self._timeout:
            parameters["timeout"] = int(self._timeout)
        return InferRequest(model_name=self.model_name, model_version=version, id=self._id, inputs=tensors,
                            outputs=[RequestedOutput(n) for n in self._outputs], parameters=parameters)

    def exec(self, decoupled: bool = False) -> Any:
        """Run on the named model and wait: one InferenceResponse, or with ``decoupled`` an iterator."""
        request = self._core()
        if decoupled:
            return ResponseIterator(runtime.services().stream(request))
        try:
            return _response(runtime.services().infer(request))
        except ServingError as exc:
            return InferenceResponse(error=from_serving_error(exc))

    def async_exec(self, decoupled: bool = False) -> Any:
        """The awaitable form of ``exec`` (for ``async def execute``)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(runtime.bls_pool(), self.exec, decoupled)


def _response(core: Any) -> InferenceResponse:
    if core.error is not None:
        return InferenceResponse(error=from_serving_error(core.error))
    return InferenceResponse([Tensor(t.name, t.data) for t in core.outputs], parameters=dict(core.parameters))


class ResponseIterator:
    """The responses of a decoupled BLS request; the last one carries the final flag."""

    def __init__(self, responses: Iterator[Any]) -> None:
        self._responses = responses
        self._lock = threading.Lock()

    def __iter__(self) -> "ResponseIterator":
        return self

    def __next__(self) -> InferenceResponse:
        try:
            with self._lock:
                core = next(self._responses)
        except ServingError as exc:
            return InferenceResponse(error=from_serving_error(exc))
        return _response(core)

    def __aiter__(self) -> "ResponseIterator":
        return self

    async def __anext__(self) -> InferenceResponse:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(runtime.bls_pool(), self.__next__)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        close = getattr(self._responses, "close", None)
        if close is not None:
            close()


class LogLevel:
    INFO, WARNING, ERROR, VERBOSE = 0, 1, 2, 3


class Logger:
    """Triton's model logger: lines go to the server's log under the model's logger."""

    _logger = logging.getLogger("inferd.model")

    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        level_of = {LogLevel.INFO: logging.INFO, LogLevel.WARNING: logging.WARNING, LogLevel.ERROR: logging.ERROR,
                    LogLevel.VERBOSE: logging.DEBUG}
        Logger._logger.log(level_of.get(level, logging.INFO), "%s", message)

    @staticmethod
    def log_info(message: str) -> None:
        Logger.log(message, LogLevel.INFO)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger.log(message, LogLevel.WARNING)

    @staticmethod
    def log_error(message: str) -> None:
        Logger.log(message, LogLevel.ERROR)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger.log(message, LogLevel.VERBOSE)


class MetricFamily:
    """A custom metric family on the server's /metrics (kind COUNTER, GAUGE or HISTOGRAM)."""

    COUNTER, GAUGE, HISTOGRAM = "COUNTER", "GAUGE", "HISTOGRAM"

    def __init__(self, name: str, description: str, kind: str) -> None:
        if kind not in (self.COUNTER, self.GAUGE, self.HISTOGRAM):
            raise TritonError(f"MetricFamily kind must be COUNTER, GAUGE or HISTOGRAM, got {kind!r}",
                              TritonError.INVALID_ARG)
        self._family = runtime.services().metric_family(name, description, kind.lower())
        self.kind = kind

    def Metric(self, labels: dict[str, str] | None = None, buckets: list[float] | None = None) -> Any:  # noqa: N802
        if self.kind == self.HISTOGRAM and not buckets:
            raise TritonError("a HISTOGRAM metric needs buckets", TritonError.INVALID_ARG)
        return self._family.metric(dict(labels or {}), buckets)
