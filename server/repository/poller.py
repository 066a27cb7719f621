"""Poll mode: rescan the repositories every few seconds and apply what changed on disk.

A model folder is acted on only when it looked the same in two consecutive scans and differs from
what its latest load attempt saw: a folder still being copied keeps changing (sizes, mtimes,
names), so a half-written version is never loaded. New folder -> load; folder gone -> unload after
the drain; anything else changed -> reload, reusing versions whose files did not change. A failed
load is not retried until the folder changes again; the versions serving before keep serving.
"""

from __future__ import annotations

import asyncio
import logging

from . import layout
from .fingerprint import ModelPrint, model_print
from .manager import RepositoryManager

log = logging.getLogger(__name__)


class RepositoryPoller:
    def __init__(self, manager: RepositoryManager, interval: float) -> None:
        self.manager = manager
        self.interval = interval
        self._previous: dict[str, ModelPrint | None] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="repository-poller")

    async def stop(self) -> None:
        """Stop polling; a load in progress is abandoned (the manager frees what it built)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad scan must not end polling
                log.exception("polling the model repository failed")

    def _snapshot(self) -> dict[str, ModelPrint | None]:
        models, _ = layout.scan(self.manager.repositories)
        return {name: model_print(path) for name, path in models.items()}

    async def poll(self) -> None:
        """One scan: act on every model folder that changed and has settled."""
        current = await asyncio.to_thread(self._snapshot)
        previous, self._previous = self._previous, current
        if previous is None:  # the first scan only sets the baseline
            return
        names = sorted(set(current) | set(previous) | set(self.manager.wanted()))
        for name in names:
            seen = current.get(name)
            if previous.get(name) != seen:  # absent in both counts as unchanged
                log.info("model '%s' is changing on disk; waiting for it to settle", name)
                continue
            if seen == self.manager.fingerprint(name):
                continue
            await self._apply(name, seen)

    async def _apply(self, name: str, seen: ModelPrint | None) -> None:
        try:
            if seen is None:
                log.info("model '%s' left the repository: unloading it", name)
                await self.manager.unload(name, "removed from the model repository")
            else:
                log.info("model '%s' changed on disk: loading it", name)
                await self.manager.load(name, reuse=True, seen=seen)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported by the manager (index, log); keep polling the others
            log.error("poll: model '%s' not changed: %s", name, getattr(exc, "message", exc))
