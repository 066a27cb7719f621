"""Builds what serves one loaded model version: its statistics, observer, scheduler and instances.

The repository manager receives this as its serving factory (injected by server/app.py), so the
repository decides *when* a version serves and this module decides *how*.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from server.core.backend import Backend
from server.core.config import ModelConfig
from server.telemetry.observer import ModelObserver
from server.telemetry.stats import ModelStats, StatsSink

from .batcher import Scheduler
from .instances import Instance


class ServingFactory:
    def __init__(self, sink: StatsSink | None = None) -> None:
        self.sink = sink

    def __call__(self, name: str, version: int, config: ModelConfig,
                 backends: Sequence[tuple[str, Backend]]) -> tuple[Scheduler, ModelStats]:
        """Start the instance threads of a loaded version (on the event loop)."""
        loop = asyncio.get_running_loop()
        stats = ModelStats(name, version, sink=self.sink)
        stats.collectors = [b.collect_metrics for _, b in backends if callable(getattr(b, "collect_metrics", None))]
        observer = ModelObserver(stats)
        scheduler = Scheduler(config, observer, loop)
        for instance_name, backend in backends:
            scheduler.add_instance(Instance(instance_name, backend, loop, scheduler.on_done, observer))
        return scheduler, stats
