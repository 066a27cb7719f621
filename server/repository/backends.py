"""Backends by name: the built-in table plus the ``inferd.backends`` entry-point group."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from server.core.backend import Backend
from server.core.errors import ErrorCode, ServingError

BUILTIN = {
    "onnxruntime": "backends.onnxruntime:OnnxRuntimeBackend",
    "pytorch": "backends.pytorch:PyTorchBackend",
    "python": "backends.python:PythonBackend",
    "llm": "backends.llm.backend:LLMBackend",
}
_INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu, never both)",
    "pytorch": "pip install 'inferd[torch]' (or pip install torch)",
    "llm": "pip install 'inferd[llm]' (torch and transformers)",
}


def _import(target: str) -> type[Backend]:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def find(name: str) -> type[Backend]:
    """The Backend class registered under ``name``; FAILED_PRECONDITION with a hint if unusable."""
    plugins = {ep.name: ep for ep in entry_points(group="inferd.backends")}
    try:
        if name in plugins:
            cls = plugins[name].load()
        elif name in BUILTIN:
            cls = _import(BUILTIN[name])
        else:
            known = sorted(set(BUILTIN) | set(plugins))
            raise ServingError(
                ErrorCode.FAILED_PRECONDITION,
                f"no backend named '{name}'; known backends: {', '.join(known)} "
                "(third-party backends register under the 'inferd.backends' entry-point group)",
            )
    except ImportError as exc:
        hint = _INSTALL_HINTS.get(name, "install the package that provides it")
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION, f"backend '{name}' cannot be imported ({exc}); {hint}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"backend '{name}' does not implement server.core.backend.Backend")
    return cls
