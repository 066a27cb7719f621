"""The Python backend's default: each instance's model runs in a process of its own (supervisor.py),
so a crash, ``os._exit`` or a hang in user code ends only that instance's in-flight requests.

Two Backend classes, as in process: the shortcut API takes the tensor path, Triton's API the
request path (decoupled when the model's transaction policy says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from server.core.backend import Backend, BackendRequest, LoadContext

from .policy import Policy
from .supervisor import ProcessInstance


def load(ctx: LoadContext, policy: Policy) -> Backend:
    instance = ProcessInstance(ctx, policy)
    instance.start()
    if instance.api == "dict":
        return ProcessDictBackend(instance)
    return ProcessTritonBackend(instance)


class _Isolated(Backend):
    def __init__(self, instance: ProcessInstance) -> None:
        self._instance = instance

    @classmethod
    def load(cls, ctx: LoadContext) -> Backend:
        from . import PythonBackend  # the one entry point: it reads the isolation parameter

        return PythonBackend.load(ctx)

    def health(self) -> str | None:
        return self._instance.unavailable

    def close(self) -> None:
        self._instance.close()


class ProcessDictBackend(_Isolated):
    """The shortcut API in its own process (tensor path)."""

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        return self._instance.execute(inputs, outputs)


class ProcessTritonBackend(_Isolated):
    """Triton's API in its own process (request path)."""

    def __init__(self, instance: ProcessInstance) -> None:
        super().__init__(instance)
        self.decoupled = instance.decoupled

    def execute_requests(self, requests: Sequence[BackendRequest]) -> None:
        self._instance.execute_requests(requests)
