"""Composition root: builds the repository, data plane and frontends, runs them on one event loop,
handles signals and drains on stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

from server.core.errors import ServingError
from server.dataplane import DataPlane
from server.ensemble import EnsembleServing
from server.frontends.base import Frontend
from server.frontends.grpc.server import GrpcFrontend
from server.frontends.http.server import HttpFrontend
from server.repository import single
from server.repository.loader import LoadOptions
from server.repository.manager import RepositoryManager
from server.repository.poller import RepositoryPoller
from server.scheduling.serving import ServingFactory
from server.services import LocalServices
from server.security import Security
from server.settings import Settings
from server.telemetry.canary_metrics import CanaryCollector
from server.telemetry.cost import CostBook
from server.telemetry.metrics import Metrics, MetricsServer
from server.core import loops
from server.telemetry.tracing import Tracing
from server.workers.supervisor import Supervisor

log = logging.getLogger("inferd")


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # model code reaches other models and custom metrics through this (bound in start())
        self.services = LocalServices()
        options = LoadOptions(default_max_batch_size=settings.default_max_batch_size,
                              auto_complete=settings.auto_complete_config, services=self.services)
        # the source is read at scrape time, so the lambda may name the repository built next
        self.metrics = (Metrics(lambda: [mv.stats for mv in self.repository.ready_versions()])
                        if settings.allow_metrics else None)
        try:  # a folder holding one model (KServe's /mnt/models) is served via a generated repository
            repositories = single.prepare(settings.model_repositories, settings.model_name,
                                          layout=settings.repository_layout)
        except ServingError as exc:
            raise SystemExit(f"inferd: {exc.message}") from None
        try:  # TLS files, key file and restriction rules are checked here, before any port opens
            self.security = Security(settings, self.metrics.rejected if self.metrics else None)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"inferd: {exc}") from None
        log.info("%s", self.security.summary())
        # built here (not at import), passed explicitly: no global OpenTelemetry provider is installed
        self.tracing = Tracing.from_flags(settings.trace_config)
        self.costs = CostBook()  # cost per request, per model, version and caller (docs/cost.md)
        # ensembles run their steps through the repository's other models (server/ensemble.py)
        serving = EnsembleServing(ServingFactory(self.metrics, self.costs), lambda: self.repository)
        self.repository = RepositoryManager(repositories, options, serving, self.tracing)
        if self.metrics is not None:
            self.metrics.registry.register(self.costs)
            self.metrics.registry.register(CanaryCollector(self.repository.canary_rows))
        self.metrics_server: MetricsServer | None = None
        self.dataplane = DataPlane(self.repository, self.tracing, settings.model_control_mode,
                                   settings.strict_readiness, allow_client_shm=settings.allow_client_shm)
        self.frontends: list[Frontend] = []  # started in order, stopped in order after the drain
        self.grpc: GrpcFrontend | None = None
        self.http: HttpFrontend | None = None
        self.poller: RepositoryPoller | None = None
        self.workers: Supervisor | None = None  # --frontend-workers: the frontends run in worker processes
        self._stop = asyncio.Event()
        self._signals = 0

    async def start(self) -> None:
        s = self.settings
        self.services.bind(self.dataplane, asyncio.get_running_loop(), self.metrics)
        if self.metrics is not None:
            self.metrics_server = MetricsServer(self.metrics, s.host, s.metrics_port, self.security)
            await self.metrics_server.start()
        if s.frontend_workers:  # this process is the engine; the workers answer probes while models load
            self.workers = Supervisor(self.dataplane, self.tracing, s)
            self.frontends.append(self.workers)
        if s.allow_grpc and not s.frontend_workers:
            self.grpc = GrpcFrontend(self.dataplane, f"{s.host}:{s.grpc_port}", s.grpc_limits(), self.security)
            self.frontends.append(self.grpc)
        if s.allow_http and not s.frontend_workers:  # same loop, same data plane; answers probes while loading
            self.http = HttpFrontend(self.dataplane, s.host, s.http_port, s.http_limits(), self.security)
            self.frontends.append(self.http)
        for frontend in self.frontends:
            await frontend.start()
        await self._initial_load()
        if s.model_control_mode == "poll":
            self.poller = RepositoryPoller(self.repository, s.repository_poll_secs)
            self.poller.start()
        self.dataplane.started = True
        for frontend in self.frontends:
            await frontend.state_changed()
        log.info("inferd ready (event loop: %s)", loops.chosen(s.event_loop))

    async def _initial_load(self) -> None:
        models = self.repository.scan()
        s = self.settings
        if s.model_control_mode == "explicit":
            names = list(models) if "*" in s.load_models else s.load_models
        else:
            names = list(models)
        for name in names:
            if self.repository.ready_versions(name):  # loaded already, as an ensemble's composing model
                continue
            try:
                await self.repository.load(name)
            except Exception as exc:  # noqa: BLE001 - reported in the index and the log; the others keep loading
                log.error("model '%s' is not serving: %s", name, getattr(exc, "message", exc))

    def request_stop(self) -> None:
        self._signals += 1
        if self._signals > 1:
            # the operator insists: no drain, no cleanup that could block on a busy instance thread
            log.warning("second signal: stopping now, abandoning in-flight requests")
            sys.stderr.flush()
            os._exit(1)
        # not ready and refusing new work from this moment; the drain itself runs in stop()
        self.dataplane.draining = True
        log.info("stopping: draining in-flight requests (up to %ss)", self.settings.exit_timeout_secs)
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        await self._stop.wait()
        await self.stop()

    async def stop(self) -> None:
        """Drain: refuse new work (UNAVAILABLE, not ready) while the frontends keep answering, let
        queued and in-flight requests finish, then close; all within --exit-timeout-secs."""
        deadline = time.monotonic() + self.settings.exit_timeout_secs
        self.dataplane.draining = True
        for frontend in self.frontends:
            await frontend.state_changed()
        if self.poller:
            await self.poller.stop()
        try:
            await asyncio.wait_for(self.repository.shutdown(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            log.warning("exit timeout reached with requests still in flight: they are cancelled")
        log.info("drained; closing the frontends")
        for frontend in self.frontends:  # the drained responses are written by now: a short grace flushes them
            await frontend.stop(grace=min(1.0, max(0.1, deadline - time.monotonic())))
        if self.metrics_server:  # last: the drain stays observable
            await self.metrics_server.stop()
        await asyncio.to_thread(self.tracing.shutdown)  # exports the spans still queued
        log.info("inferd stopped")


def run(settings: Settings) -> int:
    logging.basicConfig(
        level=logging.DEBUG if settings.log_verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    loops.runner(settings.event_loop)(App(settings).serve())
    return 0
