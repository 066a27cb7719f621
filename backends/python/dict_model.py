"""The documented shortcut API: ``execute(self, inputs)`` gets the batch as a dict of arrays and
returns a dict of arrays (the tensor path; see docs/backends.md).

``initialize(config)`` receives the configuration as a JSON-style dict (Triton's field names) plus
``model_name``, ``model_version``, ``model_repository``, ``model_version_path``,
``model_instance_name`` and ``device``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server.core.backend import LoadContext
from server.core.config import ModelConfig
from server.core.dtypes import config_name
from server.core.errors import ErrorCode, ServingError

from .convert import OutputCaster


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



class DictModel:
    def __init__(self, ctx: LoadContext, model: Any) -> None:
        self.name = ctx.model_name
        self.model = model
        self.cast = OutputCaster(ctx.model_name, {s.name: s.datatype for s in ctx.config.outputs})

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            result = self.model.execute(dict(inputs))
        except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
            # these would end the instance thread; make them an ordinary failure of this batch
            raise RuntimeError(f"execute raised {type(exc).__name__}({exc})") from exc
        if not isinstance(result, Mapping):
            raise ServingError(ErrorCode.INTERNAL, f"model '{self.name}': execute returned "
                               f"{type(result).__name__}; it must return a dict of output name -> array")
        missing = [n for n in outputs if n not in result]
        if missing:
            raise ServingError(ErrorCode.INTERNAL, f"model '{self.name}': execute returned no "
                               f"{', '.join(repr(n) for n in missing)}; it returned {sorted(result)}")
        return {n: self.cast(n, result[n]) for n in outputs}

    def finalize(self) -> None:
        if callable(getattr(self.model, "finalize", None)):
            self.model.finalize()
