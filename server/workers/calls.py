"""Control-plane calls between a worker and the engine: JSON in, JSON out (off the hot path).

The engine side (``serve``) calls the real DataPlane and renders its answer as JSON; the worker side
(``decode``) turns that JSON back into what the DataPlane method returns, so the frontends see the
same types in either process.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

from server.core.errors import ErrorCode, ServingError
from server.core.types import IndexEntry, ModelMetadata, TensorMetadata
from server.protos import model_config_pb2 as mc

SYNC = frozenset({"model_metadata", "model_ready", "model_config", "model_config_json", "model_names",
                  "statistics", "repository_index", "trace_settings", "model_parameter",
                  "shm_register", "shm_unregister", "shm_status"})
ASYNC = frozenset({"load", "unload"})
_BYTES = "$bytes"


def _pack(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_BYTES: base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES in value:
            return base64.b64decode(value[_BYTES])
        return {k: _unpack(v) for k, v in value.items()}
    return value


def request(method: str, *args: Any) -> bytes:
    return json.dumps({"method": method, "args": [_pack(a) for a in args]}).encode()


def reply_ok(value: Any, **extra: Any) -> bytes:
    return json.dumps({"ok": value, **extra}).encode()


def reply_error(exc: BaseException) -> bytes:
    if isinstance(exc, ServingError):
        return json.dumps({"error": [exc.code.name, exc.message]}).encode()
    return json.dumps({"error": ["INTERNAL", f"internal error: {type(exc).__name__}: {exc}"]}).encode()


def parse_request(body: bytes) -> tuple[str, list]:
    doc = json.loads(body)
    method, args = doc.get("method"), doc.get("args", [])
    if method not in SYNC and method not in ASYNC:
        raise ServingError(ErrorCode.UNIMPLEMENTED, f"unknown engine call '{method}'")
    return method, [_unpack(a) for a in args]


async def serve(dp, method: str, args: list) -> Any:
    """Run one call against the engine's DataPlane; the JSON form of its answer."""
    if method == "load":
        await dp.load(*args)
        return None
    if method == "unload":
        await dp.unload(*args)
        return None
    result = getattr(dp, method)(*args)
    if method == "model_metadata":
        return dataclasses.asdict(result)
    if method == "model_config":
        return base64.b64encode(result.SerializeToString()).decode()
    if method == "repository_index":
        return [dataclasses.astuple(row) for row in result]
    return result


def decode(method: str, body: bytes) -> Any:
    """The worker side: the DataPlane method's return value, or its ServingError raised."""
    doc = json.loads(body)
    if "error" in doc:
        code, message = doc["error"]
        try:
            raise ServingError(ErrorCode[code], message)
        except KeyError:
            raise ServingError(ErrorCode.INTERNAL, message) from None
    value = doc.get("ok")
    if method == "model_metadata":
        return ModelMetadata(value["name"], value["versions"], value["platform"],
                             [TensorMetadata(**t) for t in value["inputs"]],
                             [TensorMetadata(**t) for t in value["outputs"]], value["decoupled"])
    if method == "model_config":
        return mc.ModelConfig.FromString(base64.b64decode(value))
    if method == "repository_index":
        return [IndexEntry(*row) for row in value]
    return value
