"""The event loop the server runs on: uvloop when it is installed, else asyncio's own.

uvloop (libuv under asyncio's API) cut the gRPC transport's own cost per request by about a fifth on
the development machine: a grpc.aio echo server answering add_sub at c=16 spent 278-295 us of CPU
per request on asyncio's loop and 217-234 us on uvloop (scripts/grpc_floor.py, two runs each).
``--event-loop asyncio`` keeps the standard loop (e.g. to rule the loop out when debugging).
"""

from __future__ import annotations

import asyncio
import time
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


# A loop iteration that ran in at most this long had nothing else to do: an empty iteration takes
# ~1 us on uvloop, ~2 us on asyncio's loop; one request's step through the server, tens.
QUIET_NS = 10_000


def when_quiet(loop: asyncio.AbstractEventLoop, fire: Callable[[], None],
               enough: Callable[[int], bool]) -> None:
    """Call ``fire()`` in the first loop iteration after one that ran in at most QUIET_NS, or as soon
    as ``enough(perf_counter_ns)`` says to stop waiting.

    grpc.aio and aiohttp hand the server its requests one loop iteration at a time: work cut in the
    iteration its first request arrived in (a batch, a write to a frontend worker's engine) holds
    that request alone. While the loop keeps working more are on their way through it; a lone one
    finds the loop quiet at once and is not held."""
    last = time.perf_counter_ns()

    def probe() -> None:
        nonlocal last
        now = time.perf_counter_ns()
        if now - last <= QUIET_NS or enough(now):
            fire()
        else:
            last = now
            loop.call_soon(probe)

    loop.call_soon(probe)
