"""The REST endpoints of protocol.md §4.1: the route table and one handler per endpoint, each a call
into the data plane whose answer is rendered as JSON (or JSON + binary blobs for inference)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from server.core.errors import ErrorCode, ServingError, invalid, unavailable
from server.dataplane import DataPlane
from server.telemetry.stats import to_dict

from . import converters

JSON = "application/json"
BINARY = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(slots=True)
class Call:
    """One request as the handlers see it: path groups (unquoted), headers and the decoded body."""

    groups: dict[str, str]
    headers: Mapping[str, str]
    body: bytes | bytearray = b""

    def group(self, key: str) -> str:
        return self.groups.get(key) or ""


@dataclass(slots=True)
class Reply:
    status: int = 200
    parts: list = field(default_factory=list)  # body parts, sent in order
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    """A routing answer that is not a data-plane error: unknown path (404), wrong method (405)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


Handler = Callable[[DataPlane, Call], Awaitable[Reply]]


def ok(value: object) -> Reply:
    return Reply(200, [converters.dumps(value)])


def _json_object(call: Call, what: str) -> dict:
    """The optional JSON object body of a control request ({} when the body is empty)."""
    if not call.body.strip():
        return {}
    doc = converters.loads(call.body, f"{what} request body")
    if not isinstance(doc, dict):
        raise invalid(f"the {what} request body must be a JSON object")
    return doc


def _no_repository_name(call: Call) -> None:
    if call.group("repository"):
        raise ServingError(
            ErrorCode.UNIMPLEMENTED,
            "'repository_name' specification is not supported "
            f"(got '{call.group('repository')}'); use /v2/repository/...",
        )


def unsupported(extension: str) -> Handler:
    async def handler(dp: DataPlane, call: Call) -> Reply:
        raise ServingError(
            ErrorCode.UNIMPLEMENTED, f"the {extension} extension is not supported by this server"
        )

    return handler


# ---------------------------------------------------------------- health and metadata


async def live(dp: DataPlane, call: Call) -> Reply:
    if not dp.live():
        raise unavailable("the server is not live")
    return ok({"live": True})


async def ready(dp: DataPlane, call: Call) -> Reply:
    # KServe's convention (protocol.md §4.6): a body clients can parse when true, 503 when not, so
    # Kubernetes probes and both client libraries read the same answer
    if not dp.ready():
        reason = (
            "it is shutting down"
            if dp.draining
            else "models are still loading"
            if not dp.started
            else "not every model is ready"
        )
        raise unavailable(f"the server is not ready: {reason}")
    return ok({"ready": True})


async def server_metadata(dp: DataPlane, call: Call) -> Reply:
    return ok(dp.metadata())


async def model_list(dp: DataPlane, call: Call) -> Reply:
    """KServe's GET /v2/models: the names of the models with a ready version."""
    names = sorted({name for name, _, _, _ in dp.repository.index(ready_only=True)})
    return ok({"models": names})


async def model_metadata(dp: DataPlane, call: Call) -> Reply:
    name, version = call.group("model"), call.group("version")
    config = dp.model(name, version).config
    lead = [-1] if config.max_batch_size > 0 else []
    return ok(
        {
            "name": config.name,
            "versions": dp.model_versions(name, version),
            "platform": config.platform or config.backend,
            "inputs": [
                {"name": s.name, "datatype": s.datatype, "shape": lead + list(s.dims)} for s in config.inputs
            ],
            "outputs": [
                {"name": s.name, "datatype": s.datatype, "shape": lead + list(s.dims)} for s in config.outputs
            ],
        }
    )


async def model_ready(dp: DataPlane, call: Call) -> Reply:
    name, version = call.group("model"), call.group("version")
    if not dp.model_ready(name, version):
        raise unavailable(f"model '{name}'{f' version {version}' if version else ''} is not ready")
    return ok({"name": name, "ready": True})


async def model_config(dp: DataPlane, call: Call) -> Reply:
    return ok(dp.model_config(call.group("model"), call.group("version")))


async def statistics(dp: DataPlane, call: Call) -> Reply:
    versions = dp.statistics(call.group("model"), call.group("version"))
    return ok({"model_stats": [to_dict(mv.stats) for mv in versions]})


# ---------------------------------------------------------------- repository


async def repository_index(dp: DataPlane, call: Call) -> Reply:
    _no_repository_name(call)
    ready_only = _json_object(call, "repository index").get("ready", False)
    if not isinstance(ready_only, bool):
        raise invalid(f"repository index 'ready' must be a boolean, got {ready_only!r}")
    rows = []
    for name, version, state, reason in dp.repository.index(ready_only):
        row = {"name": name}
        row.update({k: v for k, v in (("version", version), ("state", state), ("reason", reason)) if v})
        rows.append(row)
    return ok(rows)


async def model_load(dp: DataPlane, call: Call) -> Reply:
    _no_repository_name(call)
    params = _json_object(call, "load").get("parameters", {})
    if not isinstance(params, dict):
        raise invalid("load 'parameters' must be a JSON object")
    config, files = None, {}
    for key, value in params.items():
        if key == "config":
            if not isinstance(value, str):
                raise invalid("load parameter 'config' must be a string holding the model configuration JSON")
            config = value
        elif key.startswith("file:"):
            try:
                files[key[5:]] = base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise invalid(f"load parameter '{key}' must be base64-encoded file content") from None
        else:
            raise invalid(f"unrecognized load parameter '{key}'")
    await dp.load(call.group("model"), config, files)
    return ok({})


async def model_unload(dp: DataPlane, call: Call) -> Reply:
    _no_repository_name(call)
    params = _json_object(call, "unload").get("parameters", {})
    if not isinstance(params, dict) or not isinstance(params.get("unload_dependents", False), bool):
        raise invalid("unload 'parameters' must be a JSON object; 'unload_dependents' a boolean")
    await dp.unload(call.group("model"))
    return ok({})


# ---------------------------------------------------------------- inference


async def infer(dp: DataPlane, call: Call) -> Reply:
    request, fmt = await converters.parse_infer_async(
        call.group("model"), call.group("version"), call.body, call.headers.get(HEADER_LENGTH)
    )
    if dp.tracing.on:  # the caller's trace context (traceparent / tracestate headers)
        request.trace = dp.tracing.from_http(call.headers)
    response = await dp.infer(request)
    header, blobs = await converters.encode_infer_async(response, fmt)
    if not blobs:
        return Reply(200, [header])
    return Reply(200, [header, *blobs], BINARY, {HEADER_LENGTH: str(len(header))})


# ---------------------------------------------------------------- trace extension


def _trace_json(settings: dict[str, list[str]]) -> dict:
    return {k: v if k == "trace_level" else v[0] for k, v in settings.items()}


async def trace_get(dp: DataPlane, call: Call) -> Reply:
    return ok(_trace_json(dp.trace_settings(call.group("model"))))


async def trace_update(dp: DataPlane, call: Call) -> Reply:
    """Listed keys change; ``null`` (or ``[]``) clears a model's key; an empty object for a model
    drops all its settings (protocol: "a request to remove the specification")."""
    model = call.group("model")
    doc = _json_object(call, "trace setting")
    if not doc:
        settings = dp.trace_settings(model, None, update=True) if model else dp.trace_settings()
        return ok(_trace_json(settings))
    changes: dict[str, list[str] | None] = {}
    for key, value in doc.items():
        if value is None:
            changes[key] = None
        elif isinstance(value, str):
            changes[key] = [value]
        elif isinstance(value, int) and not isinstance(value, bool):
            changes[key] = [str(value)]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            changes[key] = value
        else:
            raise invalid(f"trace setting '{key}' must be a string, a list of strings or null, got {value!r}")
    return ok(_trace_json(dp.trace_settings(model, changes, update=True)))


# ---------------------------------------------------------------- extensions not offered


async def shm_unregister(dp: DataPlane, call: Call) -> Reply:
    # perf_analyzer unregisters "all regions" at start and exit: nothing is registered, so that
    # succeeds (as on gRPC); naming a region cannot
    if call.group("region"):
        raise ServingError(
            ErrorCode.UNIMPLEMENTED,
            f"the {call.group('kind')}_shared_memory extension is not "
            f"supported (no region '{call.group('region')}' can exist)",
        )
    return ok({})


async def shm_unsupported(dp: DataPlane, call: Call) -> Reply:
    raise ServingError(
        ErrorCode.UNIMPLEMENTED,
        f"the {call.group('kind')}_shared_memory extension is not supported by this server",
    )


# ---------------------------------------------------------------- the table

_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_SHM = r"/v2/(?P<kind>system|cuda)sharedmemory"
_REPO = r"/v2/repository(?:/(?P<repository>[^/]+))?"

# order matters: /v2/models/stats before the model pattern (Triton does the same)
ROUTES: list[tuple[str, dict[str, Handler]]] = [
    (r"/v2/health/live", {"GET": live}),
    (r"/v2/health/ready", {"GET": ready}),
    (r"/v2/?", {"GET": server_metadata}),
    (r"/v2/models/?", {"GET": model_list}),
    (r"/v2/models/stats", {"GET": statistics}),
    (_MODEL, {"GET": model_metadata}),
    (_MODEL + r"/ready", {"GET": model_ready}),
    (_MODEL + r"/config", {"GET": model_config}),
    (_MODEL + r"/stats", {"GET": statistics}),
    (_MODEL + r"/infer", {"POST": infer}),
    (_MODEL + r"/generate(?:_stream)?", {"POST": unsupported("generate")}),
    (
        r"/v2/models/(?P<model>[^/]+)/trace/setting",
        {"GET": trace_get, "POST": trace_update},
    ),
    (r"/v2/trace/setting", {"GET": trace_get, "POST": trace_update}),
    (r"/v2/logging", {"GET": unsupported("logging"), "POST": unsupported("logging")}),
    (_SHM + r"(?:/region/(?P<region>[^/]+))?/status", {"GET": shm_unsupported}),
    (_SHM + r"/region/(?P<region>[^/]+)/register", {"POST": shm_unsupported}),
    (_SHM + r"(?:/region/(?P<region>[^/]+))?/unregister", {"POST": shm_unregister}),
    (_REPO + r"/index", {"POST": repository_index}),
    (_REPO + r"/models/(?P<model>[^/]+)/load", {"POST": model_load}),
    (_REPO + r"/models/(?P<model>[^/]+)/unload", {"POST": model_unload}),
]


class Router:
    def __init__(self, routes: list[tuple[str, dict[str, Handler]]] = ROUTES) -> None:
        self._routes = [(re.compile(pattern + "$"), methods) for pattern, methods in routes]

    def match(self, method: str, raw_path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and the unquoted path groups; HttpError 404 / 405 when there is none."""
        for pattern, methods in self._routes:
            found = pattern.match(raw_path)
            if found is None:
                continue
            handler = methods.get(method)
            if handler is None:
                allowed = ", ".join(sorted(methods))
                raise HttpError(
                    405, f"Method Not Allowed: {method} {raw_path} (allowed: {allowed})", {"Allow": allowed}
                )
            groups = {k: unquote(v) for k, v in found.groupdict().items() if v is not None}
            return handler, groups
        raise HttpError(404, f"Not Found: no endpoint at {raw_path}")
