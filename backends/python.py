"""Python backend: a ``model.py`` in the version folder, for pre/post-processing or any library.

The file defines a class ``TritonPythonModel`` (Triton's name) or ``Model``::

    class TritonPythonModel:
        def initialize(self, config: dict) -> None: ...            # optional
        def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
        def finalize(self) -> None: ...                            # optional

``config`` is the model configuration as JSON-style dict (Triton's field names: ``name``,
``max_batch_size``, ``input``, ``output``, ``parameters`` ...) plus ``model_name``,
``model_version``, ``model_repository`` (the model's folder), ``model_version_path``,
``model_instance_name`` and ``device`` (``"cpu"`` or ``"cuda:N"``).

``execute`` gets the whole batch: one array per input with the batch dimension first (when
max_batch_size > 0); BYTES inputs are object arrays of ``bytes``, BF16 inputs uint16 bit
patterns. Input arrays are read-only. It returns every requested output with the same batch
size; BYTES outputs may hold ``str`` or ``bytes``, numeric outputs are cast to the configured
type when numpy calls that a same-kind cast (float64 -> FP32), BF16 outputs may be float32.

Models run inside the server process, one object per instance, each called from its own
thread: an exception fails only the batch it was raised for (INTERNAL, with its message).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server.core.backend import Backend, LoadContext
from server.core.config import ModelConfig
from server.core.dtypes import NUMPY_DTYPES, config_name, float32_to_bf16
from server.core.errors import ErrorCode, ServingError

log = logging.getLogger(__name__)

CLASS_NAMES = ("TritonPythonModel", "Model")
_counter = itertools.count()


def _precondition(model: str, message: str) -> ServingError:
    return ServingError(ErrorCode.FAILED_PRECONDITION, f"model '{model}': {message}")


def config_dict(ctx: LoadContext) -> dict[str, Any]:
    """The configuration handed to ``initialize``: Triton's JSON field names plus load facts."""
    config: ModelConfig = ctx.config

    def tensors(specs) -> list[dict[str, Any]]:
        out = []
        for s in specs:
            entry: dict[str, Any] = {"name": s.name, "data_type": config_name(s.datatype), "dims": list(s.dims)}
            if s.reshape is not None:
                entry["reshape"] = {"shape": list(s.reshape)}
            if s.optional:
                entry["optional"] = True
            out.append(entry)
        return out

    result: dict[str, Any] = {
        "name": config.name,
        "backend": config.backend,
        "max_batch_size": config.max_batch_size,
        "input": tensors(config.inputs),
        "output": tensors(config.outputs),
        "parameters": {k: {"string_value": v} for k, v in config.parameters.items()},
        "instance_group": [{"name": g.name, "kind": g.kind, "count": g.count, "gpus": list(g.gpus)}
                           for g in config.instance_groups],
    }
    if config.dynamic_batching is not None:
        db = config.dynamic_batching
        result["dynamic_batching"] = {"preferred_batch_size": list(db.preferred_batch_sizes),
                                      "max_queue_delay_microseconds": db.max_queue_delay_us}
    result.update(model_name=ctx.model_name, model_version=str(ctx.version),
                  model_repository=str(ctx.model_path), model_version_path=str(ctx.version_path),
                  model_instance_name=ctx.instance_name, device=ctx.device)
    return result


def _import(ctx: LoadContext):
    path = ctx.model_file
    if not path.is_file():
        raise _precondition(ctx.model_name, f"model file '{path}' does not exist")
    # one module per model/version/instance/load, so versions and reloads never share state
    safe = re.sub(r"\W", "_", ctx.model_name)
    module_name = f"inferd_python_model_{safe}_v{ctx.version}_i{ctx.instance_index}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise _precondition(ctx.model_name, f"cannot import '{path}'")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses, pickle and typing look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        raise _precondition(ctx.model_name, f"importing '{path}' raised {type(exc).__name__}: {exc}") from exc
    return module_name, module


class PythonBackend(Backend):
    def __init__(self, ctx: LoadContext, module_name: str, model: Any) -> None:
        self._name = ctx.model_name
        self._module_name = module_name
        self._model = model
        self._types = {s.name: s.datatype for s in ctx.config.outputs}

    @classmethod
    def load(cls, ctx: LoadContext) -> PythonBackend:
        if not ctx.config.inputs or not ctx.config.outputs:
            # checked before importing so user code never runs with a half-made config
            raise _precondition(ctx.model_name, "a python model's config.pbtxt must list its inputs and outputs")
        module_name, module = _import(ctx)
        try:
            model_cls = next((getattr(module, n) for n in CLASS_NAMES if isinstance(getattr(module, n, None), type)),
                             None)
            if model_cls is None:
                raise _precondition(ctx.model_name, f"'{ctx.model_file}' defines no class named "
                                                    f"{' or '.join(CLASS_NAMES)}")
            if not callable(getattr(model_cls, "execute", None)):
                raise _precondition(ctx.model_name, f"{model_cls.__name__} has no execute(inputs) method")
            try:
                model = model_cls()
                if callable(getattr(model, "initialize", None)):
                    model.initialize(config_dict(ctx))
            except BaseException as exc:
                raise _precondition(ctx.model_name, f"{model_cls.__name__}.initialize raised "
                                                    f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return cls(ctx, module_name, model)

    def _convert(self, name: str, value: Any) -> np.ndarray:
        datatype = self._types.get(name)
        array = np.asarray(value)
        if datatype is None or datatype == "BYTES":
            return array if array.dtype == np.object_ or array.dtype.kind in ("S", "U") else array.astype(np.object_)
        if datatype == "BF16" and array.dtype.kind == "f":
            return float32_to_bf16(array.astype(np.float32))
        target = NUMPY_DTYPES[datatype]
        if array.dtype == target:
            return array
        if not np.can_cast(array.dtype, target, "same_kind"):
            raise ServingError(ErrorCode.INTERNAL, f"model '{self._name}' returned output '{name}' as "
                               f"{array.dtype}; config.pbtxt declares {datatype}")
        return array.astype(target)

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            result = self._model.execute(dict(inputs))
        except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
            # these would end the instance thread; make them an ordinary failure of this batch
            raise RuntimeError(f"execute raised {type(exc).__name__}({exc})") from exc
        if not isinstance(result, Mapping):
            raise ServingError(ErrorCode.INTERNAL, f"model '{self._name}': execute returned "
                               f"{type(result).__name__}; it must return a dict of output name -> array")
        missing = [n for n in outputs if n not in result]
        if missing:
            raise ServingError(ErrorCode.INTERNAL, f"model '{self._name}': execute returned no "
                               f"{', '.join(repr(n) for n in missing)}; it returned {sorted(result)}")
        return {n: self._convert(n, result[n]) for n in outputs}

    def close(self) -> None:
        model, self._model = self._model, None
        try:
            if model is not None and callable(getattr(model, "finalize", None)):
                model.finalize()
        except Exception:
            log.exception("model '%s': finalize raised", self._name)
        finally:
            sys.modules.pop(self._module_name, None)
