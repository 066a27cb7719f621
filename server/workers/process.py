"""A frontend worker process: the unchanged gRPC and REST frontends over a RemoteDataPlane.

``main`` is the spawn target. The worker listens on the server's ports with SO_REUSEPORT (the
kernel spreads connections over the workers), tells the engine it is up, and runs until the
engine says STOP (after its drain) or goes away. Ctrl-C reaches the whole process group: workers
ignore SIGINT, because the engine decides when they stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from server.core import loops
from server.frontends.grpc.server import GrpcFrontend
from server.frontends.http.server import HttpFrontend
from server.security import Security

from . import wire
from .remote import RemoteDataPlane

log = logging.getLogger("inferd.worker")

LINGER = 2.0  # seconds a worker whose engine is gone keeps answering UNAVAILABLE before it exits


def main(config: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.DEBUG if config["settings"].log_verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s worker{config['slot']} %(name)s: %(message)s",
    )
    try:
        loops.runner(config["settings"].event_loop)(_serve(config))  # the engine's choice (--event-loop)
    except Exception as exc:  # noqa: BLE001 - reported once, the engine restarts this worker
        log.error("frontend worker %d failed: %s", config["slot"], exc)
        raise SystemExit(1) from None


async def _serve(config: dict[str, Any]) -> None:
    plane = RemoteDataPlane(config)
    await plane.connect()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, plane.stopped.set)
    s = config["settings"]
    # each worker enforces TLS, keys and restrictions itself; its quotas count the traffic it takes
    # (per worker, not global: docs/workers.md). Rejections are logged here, counted by the engine's
    # metrics only for the engine's own frontends.
    security = Security(s, None)
    grpc = http = None
    if s.allow_grpc:
        grpc = GrpcFrontend(plane, f"{s.host}:{s.grpc_port}", s.grpc_limits(), security, reuse_port=True)
        await grpc.start()
    if s.allow_http:
        http = HttpFrontend(plane, s.host, s.http_port, s.http_limits(), security, reuse_port=True)
        await http.start()
    plane._send(wire.UP, 0)
    await plane.stopped.wait()
    if plane.stop_reason == "engine gone":
        log.error("the inference engine is gone: answering UNAVAILABLE for %gs, then exiting", LINGER)
        await asyncio.sleep(LINGER)
    if grpc is not None:
        await grpc.health.enter_graceful_shutdown()
        await grpc.stop(grace=1.0)
    if http is not None:
        await http.stop()
    await plane.close()
