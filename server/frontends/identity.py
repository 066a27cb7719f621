"""Who is asking and how to route them: the request headers / gRPC metadata both frontends read.

- ``x-inferd-routing-key``: a canary's sticky key. Requests with the same key always see the same
  version while a canary runs (docs/canary.md); without it an unpinned request is routed at random.
- ``x-inferd-tenant``: the caller, the ``caller`` label of the cost metrics (docs/cost.md).

``caller`` is the one place that decides the caller's identity: with API keys on, the tenant the key
authenticated (server/security/tenant.py) wins over the header.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from server.core.types import InferRequest
from server.security.tenant import AUTHENTICATED

ROUTING_KEY_HEADER = "x-inferd-routing-key"
TENANT_HEADER = "x-inferd-tenant"
MAX_VALUE = 256  # longer values are cut: they become metric labels and hash input

Lookup = Callable[[str], str | None]


def caller(lookup: Lookup) -> str:
    """The caller's identity for cost accounting: the tenant an API key authenticated when keys are
    on (a client cannot bill another tenant by sending the header), else the ``x-inferd-tenant``
    header ("" when the request does not say)."""
    authenticated = AUTHENTICATED.get()
    if authenticated is not None:
        return authenticated
    return _clean(lookup(TENANT_HEADER))


def routing_key(lookup: Lookup) -> str:
    return _clean(lookup(ROUTING_KEY_HEADER))


def _clean(value: str | bytes | None) -> str:
    if not value:
        return ""
    if isinstance(value, bytes):  # gRPC binary metadata ("-bin" keys) is not what we read
        return ""
    return value.strip()[:MAX_VALUE]


def tag(request: InferRequest, lookup: Lookup) -> None:
    """Fill the request's routing key and caller from its headers."""
    request.routing_key = routing_key(lookup)
    request.caller = caller(lookup)


def http_lookup(headers: Mapping[str, str]) -> Lookup:
    return headers.get  # aiohttp's headers are case-insensitive


def grpc_lookup(metadata: Iterable[tuple[str, str | bytes]] | None) -> Lookup:
    wanted = {}
    for key, value in metadata or ():
        if key in (ROUTING_KEY_HEADER, TENANT_HEADER):  # gRPC metadata keys arrive lowercase
            wanted[key] = value
    return wanted.get
