"""The repository manager's canary duties: wiring server/repository/canary.py to loads and versions.

A mixin of ``RepositoryManager`` (kept apart so the manager stays about loading and swapping): it
parses a model's canary settings during a load and adds the versions the canary needs, hands the
routing its settings after the swap, points each serving version's observer at the routing,
applies canary changes from the load API in place when it can, and retires the version a
promotion kept once its time is up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from server.core.errors import ErrorCode, ServingError
from server.protos import model_config_pb2 as mc

from . import canary_spec, layout
from .canary import Routing

if TYPE_CHECKING:
    from .manager import ModelRecord

log = logging.getLogger(__name__)


class CanaryControl:
    _models: dict[str, "ModelRecord"]
    changes: Any

    def _routing(self, record: ModelRecord) -> Routing:
        if record.routing is None:
            loop = asyncio.get_running_loop()
            record.routing = Routing(record.name, loop.call_later,
                                     lambda v: loop.create_task(self._release(record, v)),
                                     functools.partial(self._canary_check, record),
                                     lambda v: v in record.serving and bool(record.serving[v].scheduler.backends)
                                     and all(b.canary_checks for b in record.serving[v].scheduler.backends))
        return record.routing

    async def _canary_check(self, record: ModelRecord, version: int, stats: dict) -> tuple[bool, str]:
        """The candidate model's own verdict (its first instance's canary_check, in a thread)."""
        mv = record.serving.get(version)
        if mv is None or not mv.scheduler.backends:
            raise RuntimeError(f"version {version} is not serving")
        return await asyncio.to_thread(mv.scheduler.backends[0].canary_check, stats)

    def _canary_plan(self, record: ModelRecord, canary: tuple[dict[str, str], set[str]] | None) -> dict:
        """The loader's hook (run in its thread): parse the canary settings of the configuration it
        read plus the operator's, and add the versions the canary needs to what the policy selects."""
        routing = record.routing if record.routing is not None or canary is None else self._routing(record)
        overlay = {**(routing.overlay if routing else {}), **(canary[0] if canary else {})}
        plan: dict = {"overlay": overlay}

        def extend(proto: mc.ModelConfig, available: list[int], selected: list[int]) -> list[int]:
            settings = {**canary_spec.config_settings(proto.parameters), **overlay}
            spec = canary_spec.parse(settings, record.name)
            plan.update(spec=spec, policy=list(selected))
            if spec is not None and spec.candidate not in available:
                raise ServingError(ErrorCode.FAILED_PRECONDITION, f"model '{record.name}': canary version "
                                   f"{spec.candidate} has no version folder (versions: {available})")
            if routing is None and spec is None:
                return selected
            extra = (routing or Routing(record.name, lambda *_: None, lambda _: None)).required(
                spec, selected, available)
            return sorted(set(selected) | extra, reverse=True)

        plan["extend"] = extend
        return plan

    def _canary_apply(self, record: ModelRecord, plan: dict, canary: tuple[dict[str, str], set[str]] | None) -> None:
        """After a load: the routing takes the new settings and watches the serving versions."""
        if "policy" in plan:
            record.policy = plan["policy"]
        spec = plan.get("spec")
        if record.routing is None and spec is None:
            return
        routing = self._routing(record)
        actions = canary[1] if canary else set()
        try:
            routing.configure(spec, record.serving, record.policy, actions, operator=bool(canary and canary[0]))
        finally:
            self._watch(record)
        routing.overlay = plan["overlay"]

    def _watch(self, record: ModelRecord) -> None:
        routing = record.routing
        for version, mv in record.serving.items():
            mv.scheduler.observer.watch = functools.partial(routing.observe, version) if routing else None

    async def canary(self, name: str, settings: dict[str, str], actions: set[str]) -> None:
        """Start, change, promote, roll back or end a model's canary from the load API: in place when
        the versions it needs already serve, else through a load that keeps unchanged versions."""
        record = self._models.get(name)
        if record is not None and record.serving and record.path is not None:
            async with record.lock:
                routing = self._routing(record)
                overlay = {**routing.overlay, **settings}
                current = record.serving[routing.unpinned(record.serving)].config.parameters
                spec = canary_spec.parse({**canary_spec.config_settings(current), **overlay}, name,
                                         ErrorCode.INVALID_ARGUMENT)
                available = sorted(await asyncio.to_thread(layout.versions, record.path))
                if spec is not None and spec.candidate not in available:
                    raise ServingError(ErrorCode.INVALID_ARGUMENT, f"model '{name}': canary version "
                                       f"{spec.candidate} has no version folder (versions: {available})")
                if spec is None or routing.required(spec, record.policy, available) <= set(record.serving):
                    try:
                        routing.configure(spec, record.serving, record.policy, actions, operator=bool(settings))
                    finally:
                        self._watch(record)
                    routing.overlay = overlay
                    self.changes.notify()
                    return
        await self.load(name, canary=(settings, actions), reuse=True)

    async def _release(self, record: ModelRecord, version: int) -> None:
        """A version kept after a promotion is no longer needed: retire it unless the policy wants it."""
        async with record.lock:
            mv = record.serving.get(version)
            routing = record.routing
            if mv is None or version in record.policy or (routing is not None and version == routing.default):
                return
            record.serving = {v: m for v, m in record.serving.items() if v != version}
            self.changes.notify()
            self._retire(record, mv, "no longer needed after a canary promotion")

    def canary_rows(self) -> list[tuple[str, int, float, dict[tuple[int, str], int]]]:
        """(model, candidate, current share, rollback counts) for every model that ran a canary."""
        return [(r.name, r.routing.spec.candidate, r.routing.share, r.routing.rollbacks)
                for r in self._models.values() if r.routing is not None and r.routing.spec is not None]
