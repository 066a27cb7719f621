"""Builds what serves one loaded model version: its statistics, observer, scheduler and instances.

The repository manager receives this as its serving factory (injected by server/app.py), so the
repository decides *when* a version serves and this module decides *how*.
"""

from __future__ import annotations

import asyncio
from typing import Mapping, Sequence

from server.core.backend import Backend, uses_own_metrics
from server.core.config import ModelConfig
from server.telemetry.cost import CostBook
from server.telemetry.observer import ModelObserver
from server.telemetry.stats import ModelStats, StatsSink

from .batcher import Scheduler
from .instances import Instance


class ServingFactory:
    def __init__(self, sink: StatsSink | None = None, costs: CostBook | None = None) -> None:
        self.sink = sink
        self.costs = costs

    def __call__(self, name: str, version: int, config: ModelConfig,
                 backends: Sequence[tuple[str, Backend]], memory: Mapping[str, int] | None = None
                 ) -> tuple[Scheduler, ModelStats]:
        """Start the instance threads of a loaded version (on the event loop)."""
        loop = asyncio.get_running_loop()
        stats = ModelStats(name, version, sink=self.sink)
        # a backend's own metric families (the LLM engine's vLLM-named ones) join the scrape
        stats.collectors = [b.collect_metrics for _, b in backends if uses_own_metrics(b)]
        observer = ModelObserver(stats, self.costs)
        scheduler = Scheduler(config, observer, loop)
        for instance_name, backend in backends:
            scheduler.add_instance(Instance(instance_name, backend, loop, scheduler.on_done, observer,
                                            (memory or {}).get(instance_name, 0)))
        return scheduler, stats
