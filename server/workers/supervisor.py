"""The engine side of frontend workers: starts N worker processes, serves their channels, restarts
the ones that die, pushes readiness to them, and stops them after the drain.

Workers are started with the ``spawn`` context (a fresh interpreter: no forked event loop, threads
or model state) and connect back over a Unix socket in a private folder; each slot gets a new pair
of arenas per process generation. A worker that exits without being told is restarted (with a
back-off when it keeps dying); the others never notice.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import tempfile
import threading
import time
from typing import Any

from . import process, wire
from .engine_channel import EngineChannel
from .port import WorkerPort

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0


class Supervisor:
    def __init__(self, dataplane, tracing, settings) -> None:
        self.dataplane = dataplane
        self.tracing = tracing
        self.settings = settings
        self.count: int = settings.frontend_workers
        # the longest frame a worker may send (a longer one closes its channel: wire.request_frame_limit)
        self.max_request_frame = wire.request_frame_limit(settings.grpc_max_message_bytes,
                                                          settings.http_max_input_size)
        self.token = secrets.token_hex(16)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ports: dict[int, WorkerPort] = {}
        self.procs: dict[int, Any] = {}
        self._generation = 0
        self._dir = ""
        self.path = ""
        self._server: asyncio.AbstractServer | None = None
        self._stopping = False
        self._restarts: dict[int, list[float]] = {}
        self._retired_shm: list = []
        self._up = asyncio.Event()
        self._ctx = multiprocessing.get_context("spawn")
        self._housekeeping: asyncio.Task | None = None
        self._starting = True  # a worker that exits before every worker listens stops the start
        self._start_failure = ""
        self.restarted = 0

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self._dir = tempfile.mkdtemp(prefix="inferd-engine-")  # 0700: only this user reaches the socket
        self.path = os.path.join(self._dir, "engine.sock")
        self._server = await self.loop.create_unix_server(lambda: EngineChannel(self), self.path)
        log.info("engine socket for frontend workers: %s", self.path)
        for slot in range(self.count):
            try:
                self._spawn(slot)
            except Exception as exc:  # noqa: BLE001 - e.g. out of processes or memory: the start fails
                await self.stop(0)
                raise SystemExit(f"inferd: frontend worker {slot} could not be started: {exc}") from None
        self._housekeeping = self.loop.create_task(self._tidy())
        deadline = time.monotonic() + START_TIMEOUT
        while not all(p.up for p in self.ports.values()):
            if self._start_failure:
                await self.stop(0)
                raise SystemExit(f"inferd: {self._start_failure} before it was listening (its error is "
                                 "logged above)")
            if time.monotonic() > deadline:
                await self.stop(0)
                raise SystemExit(f"inferd: frontend workers not listening after {START_TIMEOUT:g}s")
            self._up.clear()
            try:
                await asyncio.wait_for(self._up.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
        self._starting = False
        log.info("%d frontend worker processes listening (gRPC %s, HTTP %s)", self.count,
                 self.settings.grpc_port if self.settings.allow_grpc else "off",
                 self.settings.http_port if self.settings.allow_http else "off")

    def _spawn(self, slot: int) -> None:
        self._generation += 1
        s = self.settings
        port = WorkerPort(self, slot, self._generation, s.frontend_worker_shm_mb << 20)
        self.ports[slot] = port
        config = {
            "slot": slot, "generation": self._generation, "token": self.token, "path": self.path,
            "request_arena": port.request_shm.name, "response_arena": port.response_shm.name,
            "engine_timeout": s.frontend_worker_engine_timeout_secs,
            "max_inflight": s.frontend_worker_max_inflight,
            # the whole Settings (a dataclass, pickled once by spawn): the frontends read theirs from it
            "settings": s,
        }
        try:
            proc = self._ctx.Process(target=process.main, args=(config,), name=f"inferd-worker-{slot}",
                                     daemon=True)
            proc.start()
        except BaseException:
            # no process will ever map this generation's arenas: unlink them now, not at exit
            del self.ports[slot]
            port.retire()
            raise
        port.pid = proc.pid
        self.procs[slot] = proc
        self.loop.add_reader(proc.sentinel, functools.partial(self._exited, slot, proc))
        log.info("frontend worker %d started (pid %d)", slot, proc.pid)

    # -- channels ----------------------------------------------------------------------------

    def attach(self, channel: EngineChannel, hello: dict) -> WorkerPort | None:
        if hello.get("token") != self.token:
            log.warning("engine socket: a connection with a wrong token was refused")
            return None
        port = self.ports.get(hello.get("slot"))
        if port is None or port.retired or port.pid != hello.get("pid"):
            return None
        if hello.get("role") == "call":
            port.call = channel
        else:
            port.data = channel
            channel.before_flush = port.flush_released
            channel.send(wire.STATE, 0, self.state())
        return port

    def worker_up(self, port: WorkerPort) -> None:
        log.info("frontend worker %d (pid %d) is listening", port.slot, port.pid)
        self._up.set()

    def state(self) -> bytes:
        dp = self.dataplane
        return json.dumps({
            "ready": dp.ready(), "started": dp.started, "draining": dp.draining or self._stopping,
            "reason": dp.not_ready_reason(), "tracing_on": self.tracing.on, "metadata": dp.metadata(),
            "changes": dp.changes.count, "control_mode": dp.control_mode,
        }).encode()

    async def state_changed(self) -> None:
        self.push_state()

    def push_state(self) -> None:
        state = self.state()
        for port in self.ports.values():
            if port.data is not None and not port.retired:
                port.data.send(wire.STATE, 0, state)

    async def _watch_changes(self) -> None:
        changes = self.dataplane.changes
        seen = changes.count
        while True:
            seen = await changes.wait(seen)
            self.push_state()

    # -- faults ------------------------------------------------------------------------------

    def _exited(self, slot: int, proc) -> None:
        self.loop.remove_reader(proc.sentinel)
        proc.join(1.0)  # its sentinel closes as it exits: reaping it takes a moment at most
        port = self.ports.get(slot)
        if port is not None and port.pid == proc.pid:
            port.retire()
        if self._stopping:
            return
        if self._starting:  # e.g. its port is taken: restarting it would fail the same way
            self._start_failure = f"frontend worker {slot} (pid {proc.pid}) exited with {proc.exitcode}"
            self._up.set()
            return
        log.error("frontend worker %d (pid %d) exited with %s; restarting it", slot, proc.pid, proc.exitcode)
        self._schedule_respawn(slot)

    def _schedule_respawn(self, slot: int) -> None:
        recent = [t for t in self._restarts.get(slot, []) if time.monotonic() - t < 30.0]
        recent.append(time.monotonic())
        self._restarts[slot] = recent
        delay = 0.0 if len(recent) <= 2 else min(10.0, 0.5 * 2 ** (len(recent) - 3))
        self.restarted += 1
        self.loop.call_later(delay, self._respawn, slot)

    def _respawn(self, slot: int) -> None:
        if self._stopping:
            return
        try:
            self._spawn(slot)
        except Exception as exc:  # noqa: BLE001 - e.g. out of processes: try again after the back-off
            log.error("frontend worker %d could not be restarted: %s; trying again", slot, exc)
            self._schedule_respawn(slot)

    def release_later(self, segments: list) -> None:
        self._retired_shm.extend(segments)
        self._close_retired()

    def _close_retired(self) -> None:
        kept = []
        for shm in self._retired_shm:
            try:
                shm.close()
            except BufferError:  # a request of the dead worker is still being computed: later
                kept.append(shm)
        self._retired_shm = kept

    async def _tidy(self) -> None:
        watcher = self.loop.create_task(self._watch_changes())
        try:
            while True:
                await asyncio.sleep(1.0)
                self._close_retired()
        finally:
            watcher.cancel()

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """After the engine drained: tell every worker to close its frontends, wait, then clean up."""
        self._stopping = True
        for port in self.ports.values():
            if port.data is not None and not port.retired:
                port.data.send(wire.STOP, 0)
        deadline = time.monotonic() + grace + 3.0
        for proc in self.procs.values():
            while proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.is_alive():
                log.warning("frontend worker pid %d did not stop; killing it", proc.pid)
                proc.kill()
                await asyncio.to_thread(proc.join, 2.0)
        for proc in self.procs.values():
            try:
                self.loop.remove_reader(proc.sentinel)
            except (ValueError, OSError):
                pass
        for port in self.ports.values():
            port.retire()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._server is not None:
            self._server.close()
        self._close_retired()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- what tests and the benchmark read ---------------------------------------------------

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.is_alive()]
