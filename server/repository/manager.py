"""The repository manager: which model versions exist, their states, and swapping them safely.

A (re)load builds the new versions completely (instances loaded and warmed, in a thread) before
they receive traffic, then swaps the serving set in one step on the event loop; the versions it
replaces drain their queued and in-flight requests before they are closed. A reload is
all-or-nothing: if any new version fails, nothing changes and the failure is reported (index, log,
the caller). With ``reuse`` (poll mode) a version whose files and model-level files are unchanged
keeps serving as it is instead of being loaded a second time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from server.core import config as core
from server.core.changes import Changes
from server.core.errors import ErrorCode, ServingError, not_found, unavailable
from server.protos import model_config_pb2 as mc
from server.scheduling.batcher import Scheduler
from server.scheduling.serving import ServingFactory
from server.telemetry.stats import ModelStats
from server.telemetry.tracing import Tracing, model_span

from . import layout
from .fingerprint import ModelPrint, model_print
from .loader import LoadOptions, LoadResult, load_model, remove_override, write_override

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
    stamp: tuple | None = None  # (folder, files it was loaded from); None: loaded with an override
    override: Path | None = None  # private folder of inline files it was loaded from, removed after


@dataclass
class ModelRecord:
    name: str
    path: Path | None  # its folder in a repository; None when there is none (any more)
    serving: dict[int, ModelVersion] = field(default_factory=dict)
    # version -> (state, reason) for versions that are not serving (failed, unloaded, loading)
    status: dict[int, tuple[str, str]] = field(default_factory=dict)
    state: str = ""  # model-level state when no version is known (load error, unloaded)
    reason: str = ""
    error: str = ""  # why the latest reload failed while older versions still serve
    wanted: bool = False  # asked to serve (start, poll or API) and not unloaded since
    fingerprint: ModelPrint | None = None  # the folder as of the latest load attempt (for polling)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _reasons(failed: dict[int, str]) -> str:
    return "; ".join(f"version {v}: {r}" for v, r in sorted(failed.items()))


class RepositoryManager:
    def __init__(self, repositories: list[Path], options: LoadOptions | None = None,
                 serving: ServingFactory | None = None, tracing: Tracing | None = None) -> None:
        self.repositories = repositories
        self.options = options or LoadOptions()
        self.serving = serving or ServingFactory()
        self.tracing = tracing  # load / unload spans when tracing is on
        self._models: dict[str, ModelRecord] = {}
        self._closing: set[asyncio.Task] = set()
        self._shut = False
        self._duplicates: dict[str, str] = {}
        self.changes = Changes()  # what all_ready() reads changed (gRPC health follows it)

    # -- discovery ---------------------------------------------------------------------------

    def scan(self) -> dict[str, Path]:
        models, duplicates = layout.scan(self.repositories)
        self._duplicates = duplicates
        for name, reason in duplicates.items():
            record = self._record(name, None)
            record.path = None
            record.state, record.reason = UNAVAILABLE, reason
            log.error(reason)
        for name, path in models.items():
            self._record(name, path).path = path
        for name, record in list(self._models.items()):
            if name in models or name in duplicates:
                continue
            record.path = None
            if not (record.serving or record.status or record.state or record.lock.locked()):
                del self._models[name]  # gone from disk and never loaded: forget it
        return models

    def _record(self, name: str, path: Path | None) -> ModelRecord:
        record = self._models.get(name)
        if record is None:
            record = self._models[name] = ModelRecord(name, path)
        return record

    def fingerprint(self, name: str) -> ModelPrint | None:
        """The folder as the latest load attempt saw it (None: never tried, or unloaded)."""
        record = self._models.get(name)
        return record.fingerprint if record is not None else None

    def wanted(self) -> list[str]:
        return [name for name, record in self._models.items() if record.wanted]

    # -- load --------------------------------------------------------------------------------

    @model_span("load")
    async def load(self, name: str, config_override: str | None = None, files: dict[str, bytes] | None = None,
                   *, reuse: bool = False, seen: ModelPrint | None = None) -> None:
        """(Re)load a model; the current versions serve until the new ones are ready.

        ``files`` (inline ``file:`` contents) replace the model folder for this load; ``reuse``
        keeps serving versions whose files did not change; ``seen`` is the fingerprint the caller
        decided on (the poller), recorded as what this attempt loaded. Raises ServingError when the
        load fails; the previous serving set then stays.
        """
        if self._shut:
            raise unavailable(f"failed to load '{name}': the server is shutting down")
        models = self.scan()
        path = models.get(name)
        record = self._models.get(name)
        if path is None and not files:
            if name in self._duplicates:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, self._duplicates[name])
            raise ServingError(ErrorCode.NOT_FOUND,
                               f"failed to load '{name}': no model folder '{name}' in any model repository")
        record = self._record(name, path)
        async with record.lock:
            override = None
            if files:
                override = await asyncio.to_thread(write_override, name, files)
            try:
                await self._load_locked(record, override or path, config_override, override, reuse, seen)
            except BaseException:
                if override is not None and not any(mv.override == override for mv in record.serving.values()):
                    remove_override(override)
                raise

    async def _load_locked(self, record: ModelRecord, source: Path, config_override: str | None,
                           override: Path | None, reuse: bool, seen: ModelPrint | None) -> None:
        name = record.name
        printed = seen if seen is not None and override is None else await asyncio.to_thread(model_print, source)
        if override is None:
            record.fingerprint = printed
        custom = override is not None or config_override is not None
        keep: set[int] = set()
        if reuse and not custom and printed is not None:
            keep = {v for v, mv in record.serving.items() if mv.stamp == (str(source), *printed.stamp(v))}
        record.wanted = True
        self.changes.notify()
        first = not record.serving
        for v in [v for v, (state, _) in record.status.items() if state == LOADING]:
            del record.status[v]
        if first:
            record.state, record.reason = LOADING, ""
        loop = asyncio.get_running_loop()

        def planned(versions: list[int]) -> None:
            loop.call_soon_threadsafe(self._mark_loading, record, versions)

        try:
            result = await self._run(load_model, source, self.options, config_override, None, keep, planned)
        except ServingError as exc:
            self._load_failed(record, exc.message)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an unexpected library error: report, keep serving
            log.exception("loading model '%s' failed", name)
            self._load_failed(record, f"{type(exc).__name__}: {exc}")
            raise ServingError(ErrorCode.INTERNAL, f"failed to load '{name}': {exc}") from exc
        finally:
            for v in [v for v, (state, _) in record.status.items() if state == LOADING]:
                del record.status[v]
        if self._shut:
            await asyncio.to_thread(result.close)
            raise unavailable(f"failed to load '{name}': the server is shutting down")
        if result.failed and not first:
            # all-or-nothing: what serves now keeps serving; the index says why the new ones did not
            await asyncio.to_thread(result.close)
            for v, reason in result.failed.items():
                record.status[v] = (UNAVAILABLE, reason)
            record.error = f"the latest load failed ({_reasons(result.failed)}); older versions keep serving"
            log.error("reload of model '%s' failed, previous versions keep serving: %s",
                      name, _reasons(result.failed))
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"failed to load '{name}': {_reasons(result.failed)}")
        kept = {v: record.serving[v] for v in result.selected if v in keep}
        if not first and not result.loaded and set(kept) == set(record.serving):
            record.error = ""
            log.info("model '%s' unchanged: versions %s keep serving", name, sorted(kept))
            return
        stamps = {v: None if custom or printed is None else (str(source), *printed.stamp(v)) for v in result.loaded}
        self._swap(record, result, kept, stamps, override)
        if not record.serving:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"failed to load '{name}': {_reasons(result.failed)}")

    async def _run(self, fn, *args) -> LoadResult:
        """Run a load in a thread; if the caller is cancelled meanwhile, free what it produced."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().close())
            raise

    def _mark_loading(self, record: ModelRecord, versions: list[int]) -> None:
        for v in versions:
            if v not in record.serving:
                record.status[v] = (LOADING, "")

    def _load_failed(self, record: ModelRecord, reason: str) -> None:
        log.error("model '%s' failed to load: %s", record.name, reason)
        if record.serving:
            record.error = f"the latest load failed ({reason}); older versions keep serving"
        else:
            record.state, record.reason = UNAVAILABLE, reason

    def _swap(self, record: ModelRecord, result: LoadResult, kept: dict[int, ModelVersion],
              stamps: dict[int, tuple | None], override: Path | None) -> None:
        fresh: dict[int, ModelVersion] = dict(kept)
        for version, loaded in result.loaded.items():
            scheduler, stats = self.serving(record.name, version, result.config, loaded.backends)
            fresh[version] = ModelVersion(record.name, version, result.config, result.proto, scheduler, stats,
                                          stamp=stamps.get(version), override=override)
        old = record.serving
        record.serving = fresh  # the one step that moves traffic
        self.changes.notify()
        # versions still draining (or unloaded earlier) keep their rows; failures of this load replace theirs
        record.status = {v: s for v, s in record.status.items() if v not in fresh and s[0] != LOADING}
        record.status.update({v: (UNAVAILABLE, reason) for v, reason in result.failed.items()})
        record.state, record.reason, record.error = "", "", ""
        for version, mv in old.items():
            if fresh.get(version) is not mv:
                self._retire(record, mv, "replaced" if version in fresh else "unloaded")
        log.info("model '%s' serving versions %s (loaded %s)", record.name, sorted(fresh) or "none",
                 sorted(result.loaded) or "none")

    # -- unload and drain --------------------------------------------------------------------

    def _retire(self, record: ModelRecord, mv: ModelVersion, reason: str) -> asyncio.Task:
        """Stop routing to ``mv`` (the caller already did), let its requests finish, then close it."""
        mv.state = UNLOADING
        if mv.version not in record.serving:
            record.status[mv.version] = (UNLOADING, "draining queued and in-flight requests")

        async def drain_and_close() -> None:
            try:
                await mv.scheduler.drain()
                await mv.scheduler.close()
            finally:
                if mv.override is not None and not self._uses(mv.override):
                    await asyncio.to_thread(remove_override, mv.override)
            if mv.version not in record.serving and record.status.get(mv.version, ("",))[0] == UNLOADING:
                record.status[mv.version] = (UNAVAILABLE, reason)
            log.info("model '%s' version %d drained and closed (%s)", mv.name, mv.version, reason)

        task = asyncio.get_running_loop().create_task(drain_and_close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    def _uses(self, override: Path) -> bool:
        return any(mv.override == override for r in self._models.values() for mv in r.serving.values())

    @model_span("unload")
    async def unload(self, name: str, reason: str = "unloaded") -> None:
        """Stop serving every version of ``name``; returns once they drained and closed."""
        record = self._models.get(name)
        if record is None:
            raise not_found(f"failed to unload '{name}': no model named '{name}'")
        async with record.lock:
            old, record.serving = record.serving, {}
            record.wanted, record.error, record.fingerprint = False, "", None
            self.changes.notify()
            tasks = [self._retire(record, mv, reason) for mv in old.values()]
            if not old:
                record.state, record.reason = UNAVAILABLE, reason
            log.info("model '%s' unloading (%s)", name, reason)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def settle(self) -> None:
        """Wait for retired versions to finish draining and close."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    async def shutdown(self) -> None:
        """Refuse further loads, retire everything, and wait for the drains."""
        self._shut = True
        for record in self._models.values():
            old, record.serving = record.serving, {}
            for mv in old.values():
                self._retire(record, mv, "server shut down")
        self.changes.notify()
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
            why = f"{state.lower()}: {reason}" if reason else state.lower()
            raise unavailable(f"Request for unknown model: '{name}' version {number} is not at ready state "
                              f"({why}); ready versions: {ready}")
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
            versions.update({v: (READY, record.error) for v in record.serving})
            if versions:
                for v in sorted(versions):
                    state, reason = versions[v]
                    if not ready_only or state == READY:
                        rows.append((name, str(v), state, reason))
            elif not ready_only:
                rows.append((name, "", record.state, record.reason))
        return rows

    def all_ready(self) -> bool:
        """Every model asked to serve (at start, by polling or the API) has a serving version."""
        return all(r.serving for r in self._models.values() if r.wanted)
