"""The REST and metrics side: a wrapper around the aiohttp handler that decides from the request line
and headers alone, before the body is read: API key, restricted API, quotas (the model name of an
inference request comes from its path)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import unquote

import orjson
from aiohttp import web

from .access import http_category
from .policy import ANONYMOUS, Caller, Security
from .quotas import Rejection
from .tenant import AUTHENTICATED

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
UNAUTHORIZED = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}),
                        headers={"Content-Type": "application/json", **(headers or {})})


def _unauthorized() -> web.Response:
    return _error(401, UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="inferd"'})


def guard_rest(handle: Handler, security: Security, dataplane) -> Handler:
    """The REST frontend's handler behind the checks; health paths need no key and take no quota."""
    s = security

    async def guarded(request: web.BaseRequest) -> web.StreamResponse:
        group, model = http_category(request.raw_path.partition("?")[0])
        tenant = None
        if group != "health":  # probes need no key (a health restriction still applies, below)
            allowed, tenant = s.authenticate(request.headers.get("Authorization"))
            if not allowed:
                s.rejected("unauthenticated", ANONYMOUS)
                return _unauthorized()
        header = s.http_rules.denied(group, request.headers.get)
        if header is not None:
            s.rejected("restricted", tenant or ANONYMOUS)
            return _error(403, f"This API is restricted, expecting header '{header}'")
        token = AUTHENTICATED.set(tenant)  # the caller identity of cost and metrics (frontends/identity.py)
        try:
            return await _admitted(request, group, model, tenant)
        finally:
            AUTHENTICATED.reset(token)

    async def _admitted(request: web.BaseRequest, group: str | None, model: str | None,
                        tenant: str | None) -> web.StreamResponse:
        # an unknown path is the router's 404; health takes no quota
        if group is None or group == "health" or not (s.quotas.per_caller or model is not None):
            return await handle(request)
        caller = Caller(tenant, request.remote or "unknown")
        if model is not None:
            name = unquote(model)
            version = request.raw_path.partition("/versions/")[2].partition("/")[0]
            decision = s.admit(caller, dataplane, name, unquote(version))
        else:
            decision = s.admit(caller)
        if isinstance(decision, Rejection):
            return _error(429, decision.message, {"Retry-After": decision.retry_after_header,
                                                  "retry-after-ms": str(decision.retry_after_ms)})
        try:
            return await handle(request)
        finally:
            decision.release()

    return guarded


def guard_metrics(security: Security) -> Callable:
    """aiohttp middleware for the metrics port: a listed API key when --metrics-require-api-key."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        allowed, _ = security.authenticate(request.headers.get("Authorization"))
        if not allowed:
            security.rejected("unauthenticated", ANONYMOUS)
            return _unauthorized()
        return await handler(request)

    return middleware
