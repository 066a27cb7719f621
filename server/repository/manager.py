"""The repository manager's lifecycle half: loading, swapping, draining and unloading versions
(which versions exist and how a request finds one is registry.py).

A (re)load builds the new versions completely (instances loaded and warmed, in a thread) before
they receive traffic, then swaps the serving set in one step on the event loop; the versions it
replaces drain their queued and in-flight requests before they are closed. A reload is
all-or-nothing: if any new version fails, nothing changes and the failure is reported (index, log,
the caller). With ``reuse`` (poll mode) a version whose files and model-level files are unchanged
keeps serving as it is instead of being loaded a second time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from server.core import config as core
from server.core.changes import Changes
from server.core.errors import ErrorCode, ServingError, not_found, unavailable
from server.scheduling.serving import ServingFactory
from server.telemetry.tracing import Tracing, model_span

from . import ensemble, pbtxt
from .canary_control import CanaryControl
from .fingerprint import ModelPrint, model_print
from .registry import LOADING, READY, UNAVAILABLE, UNLOADING, ModelRecord, ModelVersion, Registry  # noqa: F401
from .loader import LoadOptions, LoadResult, load_model, remove_override, write_override

log = logging.getLogger(__name__)

def _reasons(failed: dict[int, str]) -> str:
    return "; ".join(f"version {v}: {r}" for v, r in sorted(failed.items()))


class RepositoryManager(Registry, CanaryControl):
    """Lifecycle: loads, swaps, drains, unloads (lookup is the Registry's)."""

    def __init__(self, repositories: list[Path], options: LoadOptions | None = None,
                 serving: ServingFactory | None = None, tracing: Tracing | None = None) -> None:
        self.options = options or LoadOptions()
        self.serving = serving or ServingFactory()
        self.tracing = tracing  # load / unload spans when tracing is on
        Registry.__init__(self, repositories)
        self._closing: set[asyncio.Task] = set()
        self._shut = False
        self.changes = Changes()  # what all_ready() reads changed (gRPC health follows it)

    # -- load --------------------------------------------------------------------------------

    @model_span("load")
    async def load(self, name: str, config_override: str | None = None, files: dict[str, bytes] | None = None,
                   *, reuse: bool = False, seen: ModelPrint | None = None,
                   canary: tuple[dict[str, str], set[str]] | None = None,
                   ensembles: frozenset[str] = frozenset()) -> None:
        """(Re)load a model; the current versions serve until the new ones are ready.

        ``files`` (inline ``file:`` contents) replace the model folder for this load; ``reuse``
        keeps serving versions whose files did not change; ``seen`` is the fingerprint the caller
        decided on (the poller), recorded as what this attempt loaded. Raises ServingError when the
        load fails; the previous serving set then stays. An ensemble loads its composing models first
        (``ensembles``: the ensembles whose load led here, to refuse a cycle).
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
                await self._load_locked(record, override or path, config_override, override, reuse, seen, canary,
                                        ensembles)
            except BaseException:
                if override is not None and not any(mv.override == override for mv in record.serving.values()):
                    remove_override(override)
                raise

    async def _load_locked(self, record: ModelRecord, source: Path, config_override: str | None,
                           override: Path | None, reuse: bool, seen: ModelPrint | None,
                   canary: tuple[dict[str, str], set[str]] | None = None,
                   ensembles: frozenset[str] = frozenset()) -> None:
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
            plan = self._canary_plan(record, canary)
            result = await self._run(load_model, source, self.options, config_override, None, keep, planned, plan)
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
        if result.config is not None and result.config.platform == "ensemble":
            try:
                await self._prepare_ensemble(result, ensembles)
            except ServingError as exc:
                self._load_failed(record, exc.message)
                raise
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
            self._canary_apply(record, plan, canary)
            return
        stamps = {v: None if custom or printed is None else (str(source), *printed.stamp(v)) for v in result.loaded}
        self._swap(record, result, kept, stamps, override)
        if not record.serving:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"failed to load '{name}': {_reasons(result.failed)}")
        self._canary_apply(record, plan, canary)

    async def _prepare_ensemble(self, result: LoadResult, ensembles: frozenset[str]) -> None:
        """Load the composing models that do not serve yet, then check the steps against them."""
        config = result.config
        chain = ensembles | {config.name}
        cycle = self._ensemble_cycle(config.name, ensemble.composing_models(config))
        if cycle:  # found on disk before any lock is taken: two such loads at once cannot deadlock
            raise ServingError(ErrorCode.FAILED_PRECONDITION,
                               f"ensemble '{config.name}': a cycle of ensembles: {' -> '.join(cycle)}")
        for model in ensemble.composing_models(config):
            if model in chain:
                raise ServingError(ErrorCode.FAILED_PRECONDITION,
                                   f"ensemble '{config.name}': its step model '{model}' contains it in turn "
                                   f"(a cycle of ensembles: {' -> '.join([*ensembles, config.name, model])})")
            record = self._models.get(model)
            if record is not None and record.lock.locked():  # being loaded by someone else: wait for it
                async with record.lock:
                    pass
            if record is not None and record.serving:
                continue
            try:
                await self.load(model, ensembles=chain)
            except ServingError as exc:
                raise ServingError(ErrorCode.FAILED_PRECONDITION,
                                   f"ensemble '{config.name}': composing model '{model}' failed to load: "
                                   f"{exc.message}") from None

        def lookup(model: str, version: int) -> core.ModelConfig:
            return self.get(model, "" if version < 0 else str(version)).config

        if ensemble.check_steps(config, lookup) and not config.decoupled:
            # a decoupled step streams: so does the ensemble (ModelInfer refuses it, as for any such model)
            result.config = dataclasses.replace(config, decoupled=True)
            result.proto.model_transaction_policy.decoupled = True

    def _ensemble_cycle(self, name: str, steps: list[str]) -> list[str]:
        """A path of ensembles (by their config.pbtxt on disk) from ``name`` back to itself, or []."""
        def steps_of(model: str) -> list[str]:
            record = self._models.get(model)
            if record is None or record.path is None:
                return []
            try:
                proto, _ = pbtxt.read(record.path)
            except ServingError:
                return []
            return [s.model_name for s in proto.ensemble_scheduling.step] if proto.platform == "ensemble" else []

        stack, seen = [(model, [name, model]) for model in steps], set()
        while stack:
            model, path = stack.pop()
            if model == name:
                return path
            if model not in seen:
                seen.add(model)
                stack.extend((nxt, path + [nxt]) for nxt in steps_of(model))
        return []

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
            scheduler, stats = self.serving(record.name, version, result.config, loaded.backends, loaded.memory)
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
            if record.routing is not None:  # an unloaded model's canary is over; a new load starts afresh
                record.routing.close()
                record.routing = None
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
            if record.routing is not None:
                record.routing.close()
            old, record.serving = record.serving, {}
            for mv in old.values():
                self._retire(record, mv, "server shut down")
        self.changes.notify()
        await self.settle()

    # -- routing ---------------------------------------------------------------------------

    def route(self, name: str, version: str = "", key: str = "") -> ModelVersion:
        """Like ``get``, except that an unpinned request of a model with a canary may go to the candidate."""
        record = self._models.get(name)
        if version not in ("", "-1") or record is None or record.routing is None or not record.serving:
            return self.get(name, version)
        return record.serving[record.routing.route(record.serving, key)]
