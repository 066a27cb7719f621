"""Importing a ``model.py``: one fresh module per model, version, instance and load, with
``triton_python_backend_utils`` importable; finding its class and which API it speaks."""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import re
import sys
from types import ModuleType
from typing import Any

from server.core.backend import LoadContext
from server.core.errors import ErrorCode, ServingError

from . import pb_utils

CLASS_NAMES = ("TritonPythonModel", "Model")
PB_UTILS = "triton_python_backend_utils"
# config.pbtxt parameters key that forces the API: "triton" or "dict" (otherwise told by execute's signature)
API_PARAMETER = "INFERD_PYTHON_API"
_counter = itertools.count()


def precondition(model: str, message: str) -> ServingError:
    return ServingError(ErrorCode.FAILED_PRECONDITION, f"model '{model}': {message}")


def import_model(ctx: LoadContext) -> tuple[str, ModuleType]:
    path = ctx.model_file
    if not path.is_file():
        raise precondition(ctx.model_name, f"model file '{path.name}' does not exist in version {ctx.version}")
    sys.modules.setdefault(PB_UTILS, pb_utils)  # Triton's stub makes the same module importable
    safe = re.sub(r"\W", "_", ctx.model_name)
    module_name = f"inferd_python_model_{safe}_v{ctx.version}_i{ctx.instance_index}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise precondition(ctx.model_name, f"cannot import '{path.name}'")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses, pickle and typing look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        raise precondition(ctx.model_name, f"importing '{path.name}' raised {type(exc).__name__}: {exc}") from exc
    return module_name, module


def model_class(ctx: LoadContext, module: ModuleType) -> type:
    cls = next((getattr(module, n) for n in CLASS_NAMES if isinstance(getattr(module, n, None), type)), None)
    if cls is None:
        raise precondition(ctx.model_name, f"'{ctx.model_file.name}' defines no class named {' or '.join(CLASS_NAMES)}")
    if not callable(getattr(cls, "execute", None)):
        raise precondition(ctx.model_name, f"{cls.__name__} has no execute method")
    return cls


def speaks_dict_api(ctx: LoadContext, cls: type) -> bool:
    """The documented shortcut API is ``execute(self, inputs)`` returning a dict; Triton's is
    ``execute(self, requests)``. The config parameter ``INFERD_PYTHON_API`` settles any doubt."""
    forced = ctx.config.parameters.get(API_PARAMETER, "").strip().lower()
    if forced in ("triton", "dict"):
        return forced == "dict"
    if forced:
        raise precondition(ctx.model_name, f"parameter {API_PARAMETER} must be 'triton' or 'dict', got {forced!r}")
    try:
        params = [p for p in inspect.signature(cls.execute).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].name == "inputs"


def drop(module_name: str) -> None:
    sys.modules.pop(module_name, None)


def instantiate(ctx: LoadContext, cls: type, argument: Any) -> Any:
    try:
        model = cls()
        if callable(getattr(model, "initialize", None)):
            model.initialize(argument)
    except BaseException as exc:
        raise precondition(ctx.model_name, f"{cls.__name__}.initialize raised {type(exc).__name__}: {exc}") from exc
    return model
