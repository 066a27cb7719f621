"""Transport security: TLS with certificate reload, API keys, Triton's restricted APIs, and quotas.

The frontends install what is here only when a setting asks for it: with every security flag at its
default no interceptor, wrapper or SSL context is added to the request path (docs/security.md).
"""

from __future__ import annotations

from .policy import Security

__all__ = ["Security"]
