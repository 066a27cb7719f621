"""The tenant an API key authenticated for the call being served (None: no key checked).

Set by the transport guards around the handler; the frontends' caller identity reads it, so an
authenticated tenant always wins over a self-declared ``x-inferd-tenant`` header.
"""

from __future__ import annotations

from contextvars import ContextVar

AUTHENTICATED: ContextVar[str | None] = ContextVar("inferd_authenticated_tenant", default=None)
