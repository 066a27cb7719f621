"""From a ``model.py`` to a running model: the steps the in-process backend and a model's own process
(stub.py) share, so both run user code the same way."""

from __future__ import annotations

import copy
from typing import Union

from server.core.backend import LoadContext

from . import loading, pb_utils
from .dict_model import DictModel, config_dict
from .triton_model import TritonModel, triton_args

Runner = Union[DictModel, TritonModel]


def create(ctx: LoadContext) -> tuple[str, Runner]:
    """Import the model (a fresh module), instantiate its class and run ``initialize``.

    Returns the module name (for ``loading.drop``) and the runner: a DictModel for the shortcut
    API (tensor path) or a TritonModel for Triton's API (request path)."""
    module_name, module = loading.import_model(ctx)
    try:
        model_cls = loading.model_class(ctx, module)
        if loading.speaks_dict_api(ctx, model_cls):
            model = loading.instantiate(ctx, model_cls, config_dict(ctx))
            return module_name, DictModel(ctx, model)
        config_json = ctx.extra.get("model_config") or config_dict(ctx)
        model = loading.instantiate(ctx, model_cls, triton_args(ctx, config_json))
        return module_name, TritonModel(ctx, model, ctx.config.decoupled)
    except BaseException:
        loading.drop(module_name)
        raise


def auto_complete(ctx: LoadContext, config: dict) -> dict:
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
