"""The repository registry: which models and versions exist, their states, and how a request
finds the version that serves it. The lifecycle (load, swap, drain, unload) is manager.py's.
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
from server.telemetry.stats import ModelStats

from . import layout
from .canary import Routing
from .fingerprint import ModelPrint

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
    routing: Routing | None = None  # canary routing (server/repository/canary.py); None: never had one
    policy: list[int] = field(default_factory=list)  # what the version policy selected at the latest load



class Registry:
    def __init__(self, repositories: list[Path]) -> None:
        self.repositories = repositories
        self._models: dict[str, ModelRecord] = {}
        self._duplicates: dict[str, str] = {}

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
            return record.serving[record.routing.unpinned(record.serving) if record.routing else max(record.serving)]
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
            note = record.routing.note if record.routing is not None else lambda v: ""
            versions.update({v: (READY, record.error or note(v)) for v in record.serving})
            versions.update({v: (UNAVAILABLE, why) for v, mv in record.serving.items()
                             if (why := getattr(mv.scheduler, "unavailable_reason", lambda: "")())})
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
