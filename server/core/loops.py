"""The event loop the server runs on: uvloop when it is installed, else asyncio's own.

uvloop (libuv under asyncio's API) cut the gRPC transport's own cost per request by about a fifth on
the development machine: a grpc.aio echo server answering add_sub at c=16 spent 278-295 us of CPU
per request on asyncio's loop and 217-234 us on uvloop (scripts/grpc_floor.py, two runs each).
``--event-loop asyncio`` keeps the standard loop (e.g. to rule the loop out when debugging).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine

CHOICES = ("auto", "uvloop", "asyncio")


def _uvloop():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def chosen(name: str) -> str:
    """The loop ``name`` (one of CHOICES) resolves to on this machine."""
    if name == "asyncio" or (name == "auto" and _uvloop() is None):
        return "asyncio"
    return "uvloop"


def runner(name: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """``asyncio.run`` on the chosen loop; ``uvloop`` asked for but not installed is an error."""
    if chosen(name) == "asyncio":
        return asyncio.run
    uvloop = _uvloop()
    if uvloop is None:
        raise SystemExit("inferd: --event-loop uvloop, but uvloop is not installed (pip install uvloop)")
    return uvloop.run
