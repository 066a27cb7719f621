"""Python backend: a ``model.py`` in the version folder.

Two APIs, told apart by ``execute``'s signature (or forced by the config parameter
``INFERD_PYTHON_API``: ``triton`` / ``dict``):

- Triton's Python-backend API, unchanged: ``import triton_python_backend_utils as pb_utils``,
  ``TritonPythonModel.execute(self, requests)`` with ``pb_utils.InferenceRequest`` objects,
  default and decoupled modes, BLS, ``auto_complete_config``, custom metrics (triton_model.py,
  pb_utils.py). Runs on the request path.
- The shortcut: ``execute(self, inputs)`` with a dict of batch arrays, returning a dict
  (dict_model.py). Runs on the tensor path.

Models run inside the server process, one object per instance, each called from its own thread:
an exception fails only the batch it was raised for.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
import numpy as np

from server.core.backend import Backend, BackendRequest, LoadContext

from . import loading, pb_utils, runtime
from .dict_model import DictModel, config_dict
from .triton_model import TritonModel, triton_args

log = logging.getLogger(__name__)


class PythonBackend(Backend):
    """The shortcut API (tensor path)."""

    def __init__(self, module_name: str, model: DictModel) -> None:
        self._module_name = module_name
        self._model = model

    @classmethod
    def complete_config(cls, ctx: LoadContext, config: dict) -> dict:
        """Triton's ``auto_complete_config(pb_utils.ModelConfig)`` hook, when the model has one."""
        module_name, module = loading.import_model(ctx)
        try:
            model_cls = loading.model_class(ctx, module)
            hook = getattr(model_cls, "auto_complete_config", None)
            if not callable(hook):
                return config
            try:
                result = hook(pb_utils.ModelConfig(copy.deepcopy(config)))
            except BaseException as exc:
                raise loading.precondition(ctx.model_name, f"auto_complete_config raised {type(exc).__name__}: "
                                                           f"{exc}") from exc
            if not isinstance(result, pb_utils.ModelConfig):
                raise loading.precondition(ctx.model_name, "auto_complete_config must return the "
                                                           "pb_utils.ModelConfig it received")
            return result.as_dict()
        finally:
            loading.drop(module_name)

    @classmethod
    def load(cls, ctx: LoadContext) -> Backend:
        if not ctx.config.inputs or not ctx.config.outputs:
            # checked before importing so user code never runs with a half-made config
            raise loading.precondition(ctx.model_name, "a python model's config.pbtxt must list its inputs and "
                                                       "outputs (or its model must complete them in "
                                                       "auto_complete_config)")
        runtime.install(ctx.services)
        module_name, module = loading.import_model(ctx)
        try:
            model_cls = loading.model_class(ctx, module)
            if loading.speaks_dict_api(ctx, model_cls):
                model = loading.instantiate(ctx, model_cls, config_dict(ctx))
                return cls(module_name, DictModel(ctx, model))
            config_json = ctx.extra.get("model_config") or config_dict(ctx)
            model = loading.instantiate(ctx, model_cls, triton_args(ctx, config_json))
            return TritonPythonBackend(module_name, TritonModel(ctx, model, ctx.config.decoupled))
        except BaseException:
            loading.drop(module_name)
            raise

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

    @classmethod
    def load(cls, ctx: LoadContext) -> Backend:
        return PythonBackend.load(ctx)

    def execute_requests(self, requests: Sequence[BackendRequest]) -> None:
        self._model.execute(requests)

    def close(self) -> None:
        model, self._model = self._model, None
        try:
            if model is not None:
                model.finalize()
        finally:
            loading.drop(self._module_name)
