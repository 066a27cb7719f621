"""Python backend: a ``model.py`` in the version folder.

Two APIs, told apart by ``execute``'s signature (or forced by the config parameter
``INFERD_PYTHON_API``: ``triton`` / ``dict``):

- Triton's Python-backend API, unchanged: ``import triton_python_backend_utils as pb_utils``,
  ``TritonPythonModel.execute(self, requests)`` with ``pb_utils.InferenceRequest`` objects,
  default and decoupled modes, BLS, ``auto_complete_config``, custom metrics (triton_model.py,
  pb_utils.py). Runs on the request path.
- The shortcut: ``execute(self, inputs)`` with a dict of batch arrays, returning a dict
  (dict_model.py). Runs on the tensor path.

Where it runs (config.pbtxt parameter ``INFERD_PYTHON_ISOLATION``, default from the environment
variable of the same name, else ``process``; see docs/python_models.md):

- ``process``: each instance in a process of its own (isolated.py, supervisor.py, stub.py), tensors
  through shared memory; a crash or hang ends only that instance's in-flight requests and the
  process is restarted.
- ``in_process``: inside the server, one object per instance, each called from its own thread (the
  classes below): faster per batch, but user code that ends the process ends the server.

Either way an exception fails only the batch it was raised for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
import numpy as np

from server.core.backend import Backend, BackendRequest, LoadContext

from . import loading, policy, runner, runtime
from .dict_model import DictModel
from .triton_model import TritonModel

log = logging.getLogger(__name__)


class PythonBackend(Backend):
    """The shortcut API (tensor path)."""

    def __init__(self, module_name: str, model: DictModel) -> None:
        self._module_name = module_name
        self._model = model

    @classmethod
    def complete_config(cls, ctx: LoadContext, config: dict) -> dict:
        """Triton's ``auto_complete_config(pb_utils.ModelConfig)`` hook, when the model has one."""
        if policy.isolation(ctx.model_name, ctx.config.parameters) == "process":
            from . import supervisor

            return supervisor.complete_config(ctx, config, policy.policy(ctx.model_name, ctx.config.parameters))
        return runner.auto_complete(ctx, config)

    @classmethod
    def load(cls, ctx: LoadContext) -> Backend:
        if not ctx.config.inputs or not ctx.config.outputs:
            # checked before importing so user code never runs with a half-made config
            raise loading.precondition(ctx.model_name, "a python model's config.pbtxt must list its inputs and "
                                                       "outputs (or its model must complete them in "
                                                       "auto_complete_config)")
        parameters = ctx.config.parameters
        if policy.isolation(ctx.model_name, parameters) == "process":
            from . import isolated

            return isolated.load(ctx, policy.policy(ctx.model_name, parameters))
        runtime.install(ctx.services)
        module_name, model = runner.create(ctx)
        if isinstance(model, DictModel):
            return cls(module_name, model)
        return TritonPythonBackend(module_name, model)

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        return self._model.execute(inputs, outputs)

    def close(self) -> None:
        model, self._model = self._model, None
        try:
            if model is not None:
                model.finalize()
        except Exception:
            log.exception("python model: finalize raised")
        finally:
            loading.drop(self._module_name)


class TritonPythonBackend(Backend):
    """Triton's API (request path; decoupled when the model's transaction policy says so)."""

    def __init__(self, module_name: str, model: TritonModel) -> None:
        self._module_name = module_name
        self._model = model
        self.decoupled = model.decoupled
        self.canary_checks = callable(getattr(model.model, "canary_check", None))

    @classmethod
    def load(cls, ctx: LoadContext) -> Backend:
        return PythonBackend.load(ctx)

    def execute_requests(self, requests: Sequence[BackendRequest]) -> None:
        self._model.execute(requests)

    def canary_check(self, stats: Mapping[str, float]) -> tuple[bool, str]:
        """The model's ``canary_check(stats) -> (ok, reason)`` (an inferd extension of Triton's API)."""
        verdict = self._model.model.canary_check(dict(stats))
        if (not isinstance(verdict, tuple) or len(verdict) != 2 or not isinstance(verdict[0], bool)
                or not isinstance(verdict[1], str)):
            raise TypeError(f"canary_check must return (ok: bool, reason: str), got {verdict!r}")
        return verdict

    def close(self) -> None:
        model, self._model = self._model, None
        try:
            if model is not None:
                model.finalize()
        finally:
            loading.drop(self._module_name)
