"""Outputs a Python model returns, cast to the configured datatypes (numpy's same-kind casts, so
float64 -> FP32 works and a float where INT32 is declared is an error naming the output)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from server.core.dtypes import NUMPY_DTYPES, float32_to_bf16
from server.core.errors import ErrorCode, ServingError


class OutputCaster:
    def __init__(self, model: str, types: Mapping[str, str]) -> None:
        self.model = model
        self.types = dict(types)

    def __call__(self, name: str, value: Any) -> np.ndarray:
        datatype = self.types.get(name)
        array = np.asarray(value)
        if datatype is None or datatype == "BYTES":
            if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
                return array if array.dtype == np.object_ else array.astype(np.object_)
            return array.astype(np.object_)
        if datatype == "BF16" and array.dtype.kind == "f":
            return float32_to_bf16(array.astype(np.float32))
        target = NUMPY_DTYPES[datatype]
        if array.dtype == target:
            return array
        if not np.can_cast(array.dtype, target, "same_kind"):
            raise ServingError(ErrorCode.INTERNAL, f"model '{self.model}' returned output '{name}' as "
                               f"{array.dtype}; config.pbtxt declares {datatype}")
        return array.astype(target)

    def all(self, outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {name: self(name, value) for name, value in outputs.items()}


class CastingSender:
    """A ResponseSender that casts outputs on their way out."""

    __slots__ = ("_sender", "_cast")

    def __init__(self, sender: Any, cast: OutputCaster) -> None:
        self._sender = sender
        self._cast = cast

    def send(self, outputs=None, *, final=False, error=None, parameters=None) -> None:
        if outputs is not None and error is None:
            try:
                outputs = self._cast.all(outputs)
            except ServingError as exc:
                outputs, error = None, exc
        self._sender.send(outputs, final=final, error=error, parameters=parameters)

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()

    @property
    def closed(self) -> bool:
        """The final was sent."""
        return self._sender.closed

    def on_cancel(self, callback) -> None:
        self._sender.on_cancel(callback)
