"""The repository manager: which model versions exist, their states, and swapping them safely.

A (re)load builds the new versions completely (instances loaded and warmed, in a thread) before
they receive traffic, then swaps the serving set in one step on the event loop; the versions it
replaces drain their queued and in-flight requests before they are closed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from server.core import config as core
from server.core.errors import ErrorCode, ServingError, not_found, unavailable
from server.protos import model_config_pb2 as mc
from server.scheduling.batcher import Scheduler
from server.scheduling.instances import Instance
from server.telemetry.stats import ModelStats, StatsSink

from . import layout
from .loader import LoadOptions, LoadResult, load_model

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class ModelVersion:
    """A loaded version that can serve: its config, scheduler (with instances) and statistics."""

    name: str
    version: int
    config: core.ModelConfig
    proto: mc.ModelConfig
    scheduler: Scheduler
    stats: ModelStats
    state: str = READY


@dataclass
class ModelRecord:
    name: str
    path: Path | None
    serving: dict[int, ModelVersion] = field(default_factory=dict)
    # version -> (state, reason) for versions that are not serving (failed, unloaded, loading)
    status: dict[int, tuple[str, str]] = field(default_factory=dict)
    state: str = ""  # model-level state when no version is known (load error, unloaded)
    reason: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RepositoryManager:
    def __init__(self, repositories: list[Path], options: LoadOptions | None = None,
                 sink: StatsSink | None = None) -> None:
        self.repositories = repositories
        self.options = options or LoadOptions()
        self.sink = sink
        self._models: dict[str, ModelRecord] = {}
        self._closing: set[asyncio.Task] = set()

    # -- discovery ---------------------------------------------------------------------------

    def scan(self) -> dict[str, Path]:
        models, duplicates = layout.scan(self.repositories)
        for name, reason in duplicates.items():
            record = self._record(name, None)
            record.state, record.reason = UNAVAILABLE, reason
            log.error(reason)
        for name, path in models.items():
            self._record(name, path).path = path
        return models

    def _record(self, name: str, path: Path | None) -> ModelRecord:
        record = self._models.get(name)
        if record is None:
            record = self._models[name] = ModelRecord(name, path)
        return record

    # -- load / unload -----------------------------------------------------------------------

    async def load(self, name: str, config_override: str | None = None) -> None:
        """(Re)load a model from the repository; the current versions serve until the new ones are ready.

        Raises ServingError when nothing could be loaded; the previous serving set then stays.
        """
        models = self.scan()
        path = models.get(name)
        record = self._models.get(name)
        if path is None:
            if record is not None and record.reason and record.path is None:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, record.reason)
            raise ServingError(ErrorCode.NOT_FOUND,
                               f"failed to load '{name}': no model folder '{name}' in any model repository")
        async with record.lock:
            first = not record.serving
            for v in list(record.status):
                if record.status[v][0] == LOADING:
                    del record.status[v]
            if first:
                record.state, record.reason = LOADING, ""
            try:
                result = await asyncio.to_thread(load_model, path, self.options, config_override)
            except ServingError as exc:
                self._load_failed(record, exc.message)
                raise
            except Exception as exc:  # a bug or an unexpected library error: report, keep serving
                log.exception("loading model '%s' failed", name)
                self._load_failed(record, f"{type(exc).__name__}: {exc}")
                raise ServingError(ErrorCode.INTERNAL, f"failed to load '{name}': {exc}") from exc
            if result.failed and not first:
                # a reload is all-or-nothing: keep what serves now
                await self._close_loaded(result)
                reasons = "; ".join(f"version {v}: {r}" for v, r in sorted(result.failed.items()))
                log.error("reload of model '%s' failed, previous versions keep serving: %s", name, reasons)
                raise ServingError(ErrorCode.INVALID_ARGUMENT, f"failed to load '{name}': {reasons}")
            self._swap(record, result)
            if not result.loaded:
                reasons = "; ".join(f"version {v}: {r}" for v, r in sorted(result.failed.items()))
                raise ServingError(ErrorCode.INVALID_ARGUMENT, f"failed to load '{name}': {reasons}")

    def _load_failed(self, record: ModelRecord, reason: str) -> None:
        log.error("model '%s' failed to load: %s", record.name, reason)
        if not record.serving:
            record.state, record.reason = UNAVAILABLE, reason

    def _swap(self, record: ModelRecord, result: LoadResult) -> None:
        loop = asyncio.get_running_loop()
        fresh: dict[int, ModelVersion] = {}
        for version, loaded in result.loaded.items():
            stats = ModelStats(record.name, version, sink=self.sink)
            scheduler = Scheduler(result.config, stats, loop)
            for iname, backend in loaded.backends:
                scheduler.add_instance(Instance(iname, record.name, backend, loop, scheduler.on_done))
            fresh[version] = ModelVersion(record.name, version, result.config, result.proto, scheduler, stats)
        old = record.serving
        record.serving = fresh
        record.status = {v: (UNAVAILABLE, reason) for v, reason in result.failed.items()}
        record.state, record.reason = "", ""
        for version, mv in old.items():
            if version not in fresh:
                record.status.setdefault(version, (UNAVAILABLE, "unloaded"))
            self._retire(mv)
        log.info("model '%s' serving versions %s", record.name, sorted(fresh) or "none")

    def _retire(self, mv: ModelVersion) -> None:
        mv.state = UNLOADING

        async def drain_and_close() -> None:
            await mv.scheduler.drain()
            await mv.scheduler.close()
            log.info("model '%s' version %d unloaded", mv.name, mv.version)

        task = asyncio.get_running_loop().create_task(drain_and_close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_loaded(self, result: LoadResult) -> None:
        def close_all() -> None:
            for loaded in result.loaded.values():
                for _, backend in loaded.backends:
                    backend.close()
        await asyncio.to_thread(close_all)

    async def unload(self, name: str) -> None:
        record = self._models.get(name)
        if record is None:
            raise not_found(f"failed to unload '{name}': no model named '{name}'")
        async with record.lock:
            old, record.serving = record.serving, {}
            for version, mv in old.items():
                record.status[version] = (UNAVAILABLE, "unloaded")
                self._retire(mv)
            if not old:
                record.state, record.reason = UNAVAILABLE, "unloaded"
        await self.settle()

    async def settle(self) -> None:
        """Wait for retired versions to finish draining and close."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    async def shutdown(self) -> None:
        for record in self._models.values():
            for mv in record.serving.values():
                self._retire(mv)
            record.serving = {}
        await self.settle()

    # -- lookup ------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """Route a request: empty version -> highest ready version; else exactly that one."""
        record = self._models.get(name)
        if record is None:
            raise not_found(f"Request for unknown model: '{name}' is not found")
        if version in ("", "-1"):
            if not record.serving:
                # the model-level reason, or why each version failed (e.g. its model file is missing)
                failed = sorted(record.status.items())
                reason = record.reason or "; ".join(f"version {v}: {why}" for v, (_, why) in failed)
                detail = f": {reason}" if reason else ""
                raise not_found(f"Request for unknown model: '{name}' has no available versions{detail}")
            return record.serving[max(record.serving)]
        if not version.isdigit():
            raise ServingError(ErrorCode.INVALID_ARGUMENT,
                               f"failed to get model version from specified version string '{version}' "
                               "(use a non-negative integer, or empty for the latest ready version)")
        number = int(version)
        mv = record.serving.get(number)
        if mv is not None:
            return mv
        ready = ", ".join(str(v) for v in sorted(record.serving)) or "none"
        if number in record.status:
            state, reason = record.status[number]
            raise unavailable(f"Request for unknown model: '{name}' version {number} is not at ready state "
                              f"({state.lower()}: {reason}); ready versions: {ready}")
        raise not_found(f"Request for unknown model: '{name}' version {number} is not found; ready versions: {ready}")

    def ready_versions(self, name: str | None = None) -> list[ModelVersion]:
        records = [self._models[name]] if name in self._models else [] if name else self._models.values()
        return [mv for r in records for _, mv in sorted(r.serving.items())]

    def known(self, name: str) -> bool:
        return name in self._models

    def index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) rows, as RepositoryIndex reports them."""
        self.scan()
        rows = []
        for name in sorted(self._models):
            record = self._models[name]
            versions: dict[int, tuple[str, str]] = dict(record.status)
            versions.update({v: (READY, "") for v in record.serving})
            if versions:
                for v in sorted(versions):
                    state, reason = versions[v]
                    if not ready_only or state == READY:
                        rows.append((name, str(v), state, reason))
            elif not ready_only:
                rows.append((name, "", record.state, record.reason))
        return rows

    def all_ready(self) -> bool:
        """Every model found in the repository has at least one serving version."""
        return all(r.serving for r in self._models.values() if r.path is not None)
