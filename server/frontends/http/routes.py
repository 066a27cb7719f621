"""The REST endpoints of protocol.md §4.1: the route table and one handler per endpoint, each a call
into the data plane whose answer is rendered as JSON (or JSON + binary blobs for inference)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from server.core.errors import ErrorCode, ServingError, invalid, unavailable
from server.dataplane import DECOUPLED_UNARY, DataPlane
from server.frontends.status import http_status
from server.frontends import identity
from server.shm import CUDA_UNSUPPORTED

from . import converters, generate

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"
DECOUPLED_HTTP = "HTTP end point doesn't support models with decoupled transaction policy"
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
    # a streamed body (server-sent events): chunks written as they come; ``close`` runs when the
    # stream ends or the client goes away (it cancels the request)
    events: AsyncIterator[bytes] | None = None
    close: Callable[[], None] | None = None


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
        raise unavailable(f"the server is not ready: {dp.not_ready_reason()}")
    return ok({"ready": True})


async def server_metadata(dp: DataPlane, call: Call) -> Reply:
    return ok(dp.metadata())


async def model_list(dp: DataPlane, call: Call) -> Reply:
    """KServe's GET /v2/models: the names of the models with a ready version."""
    return ok({"models": dp.model_names()})


async def model_metadata(dp: DataPlane, call: Call) -> Reply:
    meta = dp.model_metadata(call.group("model"), call.group("version"))

    def tensors(items) -> list[dict]:
        return [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in items]

    return ok({"name": meta.name, "versions": meta.versions, "platform": meta.platform,
               "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)})


async def model_ready(dp: DataPlane, call: Call) -> Reply:
    name, version = call.group("model"), call.group("version")
    if not dp.model_ready(name, version):
        raise unavailable(f"model '{name}'{f' version {version}' if version else ''} is not ready")
    return ok({"name": name, "ready": True})


async def model_config(dp: DataPlane, call: Call) -> Reply:
    return ok(dp.model_config_json(call.group("model"), call.group("version")))


async def statistics(dp: DataPlane, call: Call) -> Reply:
    return ok({"model_stats": dp.statistics(call.group("model"), call.group("version"))})


# ---------------------------------------------------------------- repository


async def repository_index(dp: DataPlane, call: Call) -> Reply:
    _no_repository_name(call)
    ready_only = _json_object(call, "repository index").get("ready", False)
    if not isinstance(ready_only, bool):
        raise invalid(f"repository index 'ready' must be a boolean, got {ready_only!r}")
    rows = []
    for entry in dp.repository_index(ready_only):
        row = {"name": entry.name}
        row.update({k: v for k, v in (("version", entry.version), ("state", entry.state),
                                      ("reason", entry.reason)) if v})
        rows.append(row)
    return ok(rows)


async def model_load(dp: DataPlane, call: Call) -> Reply:
    _no_repository_name(call)
    params = _json_object(call, "load").get("parameters", {})
    if not isinstance(params, dict):
        raise invalid("load 'parameters' must be a JSON object")
    decoded = dict(params)
    for key, value in params.items():
        if key.startswith("file:"):  # REST carries file contents in base64; the rules are the data plane's
            try:
                decoded[key] = base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise invalid(f"load parameter '{key}' must be base64-encoded file content") from None
    await dp.load(call.group("model"), decoded)
    return ok({})


async def model_unload(dp: DataPlane, call: Call) -> Reply:
    _no_repository_name(call)
    params = _json_object(call, "unload").get("parameters", {})
    if not isinstance(params, dict):
        raise invalid("unload 'parameters' must be a JSON object")
    await dp.unload(call.group("model"), params)
    return ok({})


# ---------------------------------------------------------------- inference


async def infer(dp: DataPlane, call: Call) -> Reply:
    request, fmt = await converters.parse_infer_async(
        call.group("model"), call.group("version"), call.body, call.headers.get(HEADER_LENGTH)
    )
    identity.tag(request, identity.http_lookup(call.headers))
    if dp.tracing_on:  # the caller's trace context (traceparent / tracestate headers)
        request.trace = dp.trace_http(call.headers)
    try:
        response = await dp.infer(request)
    except ServingError as exc:
        if exc.message == DECOUPLED_UNARY:  # Triton's REST wording for the same refusal
            raise ServingError(ErrorCode.UNIMPLEMENTED, DECOUPLED_HTTP) from None
        raise
    header, blobs = await converters.encode_infer_async(response, fmt)
    if not blobs:
        return Reply(200, [header])
    return Reply(200, [header, *blobs], BINARY, {HEADER_LENGTH: str(len(header))})


# ---------------------------------------------------------------- generate extension


def _generate_request(dp: DataPlane, call: Call):
    encoding = call.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise invalid(generate.BAD_ENCODING)
    meta = dp.model_metadata(call.group("model"), call.group("version"))
    request = generate.to_request(meta, call.group("version"), call.body)
    identity.tag(request, identity.http_lookup(call.headers))
    if dp.tracing_on:
        request.trace = dp.trace_http(call.headers)
    return dp.stream(request)


async def generate_one(dp: DataPlane, call: Call) -> Reply:
    """POST .../generate: exactly one response, as one JSON object."""
    stream = _generate_request(dp, call)
    responses = []
    try:
        async for response in stream:
            if response.error is not None:
                if not responses:
                    raise response.error
                return Reply(200, [converters.dumps({"error": response.error.message})])
            if response.outputs or response.parameters:
                responses.append(response)
    finally:
        stream.cancel()  # a no-op once the final arrived; cancels the request if the client went away
    if len(responses) != 1:
        return Reply(200, [converters.dumps({"error": generate.NOT_ONE})])
    return Reply(200, [generate.dumps(generate.to_event(responses[0]))])


async def generate_stream(dp: DataPlane, call: Call) -> Reply:
    """POST .../generate_stream: server-sent events, one per response. The status is decided by the
    first response (an error there gives its status, still as an event, as Triton answers); later
    errors are ``data: {"error": ...}`` events under 200. Refusals before the model runs are JSON."""
    stream = _generate_request(dp, call)
    first = None
    try:
        async for response in stream:
            if response.error is not None:
                body = generate.sse({"error": response.error.message})
                return Reply(http_status(response.error.code), [body], content_type=SSE)
            if response.outputs or response.parameters:
                first = response
                break
    except BaseException:
        stream.cancel()
        raise

    async def events() -> AsyncIterator[bytes]:
        if first is None:
            return
        yield generate.sse(generate.to_event(first))
        async for response in stream:
            if response.error is not None:
                yield generate.sse({"error": response.error.message})
            elif response.outputs or response.parameters:
                yield generate.sse(generate.to_event(response))

    return Reply(200, content_type=SSE, events=events(), close=stream.cancel)


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


# ---------------------------------------------------------------- system shared memory (server/shm.py)


async def shm_status(dp: DataPlane, call: Call) -> Reply:
    return ok(dp.shm_status(call.group("region")))


async def shm_register(dp: DataPlane, call: Call) -> Reply:
    doc = _json_object(call, "shared memory register")
    if "key" not in doc:
        raise invalid("Shared memory register request has no 'key' field")
    if "byte_size" not in doc:
        raise invalid("Shared memory register request has no 'byte_size' field")
    key = doc["key"]
    if not isinstance(key, str):
        raise invalid(f"'key' must be a string (the shared-memory object's name), got {key!r}")
    dp.shm_register(call.group("region"), key, doc.get("offset", 0), doc["byte_size"])
    return ok({})


async def shm_unregister(dp: DataPlane, call: Call) -> Reply:
    dp.shm_unregister(call.group("region"))
    return ok({})


# ---------------------------------------------------------------- CUDA shared memory: not offered


async def cuda_shm_unregister(dp: DataPlane, call: Call) -> Reply:
    # perf_analyzer unregisters "all regions" at start and exit: nothing is registered, so that
    # succeeds (as on gRPC); naming a region cannot
    if call.group("region"):
        raise ServingError(ErrorCode.UNIMPLEMENTED, f"{CUDA_UNSUPPORTED} (no region '{call.group('region')}' "
                           "can exist)")
    return ok({})


async def cuda_shm_unsupported(dp: DataPlane, call: Call) -> Reply:
    raise ServingError(ErrorCode.UNIMPLEMENTED, CUDA_UNSUPPORTED)


# ---------------------------------------------------------------- the table

_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_SHM = r"/v2/systemsharedmemory"
_CUDA = r"/v2/cudasharedmemory"
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
    (_MODEL + r"/generate", {"POST": generate_one}),
    (_MODEL + r"/generate_stream", {"POST": generate_stream}),
    (
        r"/v2/models/(?P<model>[^/]+)/trace/setting",
        {"GET": trace_get, "POST": trace_update},
    ),
    (r"/v2/trace/setting", {"GET": trace_get, "POST": trace_update}),
    (r"/v2/logging", {"GET": unsupported("logging"), "POST": unsupported("logging")}),
    (_SHM + r"(?:/region/(?P<region>[^/]+))?/status", {"GET": shm_status}),
    (_SHM + r"/region/(?P<region>[^/]+)/register", {"POST": shm_register}),
    (_SHM + r"(?:/region/(?P<region>[^/]+))?/unregister", {"POST": shm_unregister}),
    (_CUDA + r"(?:/region/(?P<region>[^/]+))?/status", {"GET": cuda_shm_unsupported}),
    (_CUDA + r"/region/(?P<region>[^/]+)/register", {"POST": cuda_shm_unsupported}),
    (_CUDA + r"(?:/region/(?P<region>[^/]+))?/unregister", {"POST": cuda_shm_unregister}),
    (_REPO + r"/index", {"POST": repository_index}),
    (_REPO + r"/models/(?P<model>[^/]+)/load", {"POST": model_load}),
    (_REPO + r"/models/(?P<model>[^/]+)/unload", {"POST": model_unload}),
]


class Router:
    """Matches a request line to its handler. Found routes are remembered per (method, path): the
    regular-expression walk down the table was 3-5% of the REST server's CPU at add_sub c=16
    (py-spy), and a client calls the same few paths over and over. The memory is bounded: at most
    ``_CACHED`` paths of at most ``_CACHED_PATH`` characters, emptied when full."""

    _CACHED = 1024
    _CACHED_PATH = 256

    def __init__(self, routes: list[tuple[str, dict[str, Handler]]] = ROUTES) -> None:
        self._routes = [(re.compile(pattern + "$"), methods) for pattern, methods in routes]
        self._found: dict[tuple[str, str], tuple[Handler, dict[str, str]]] = {}

    def match(self, method: str, raw_path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and the unquoted path groups; HttpError 404 / 405 when there is none."""
        found = self._found.get((method, raw_path))
        if found is not None:
            return found[0], dict(found[1])
        handler, groups = self._walk(method, raw_path)
        if len(raw_path) <= self._CACHED_PATH:
            if len(self._found) >= self._CACHED:
                self._found.clear()
            self._found[(method, raw_path)] = (handler, dict(groups))
        return handler, groups

    def _walk(self, method: str, raw_path: str) -> tuple[Handler, dict[str, str]]:
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
