"""Prometheus families for canaries: the candidate's current share and the rollbacks so far.

The numbers live on the repository's canary routing (server/repository/canary.py); this reads them
at scrape time through a source callable, so telemetry stays below the repository.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# (model, candidate version, current share 0..1, {(version, reason code): rollbacks})
CanaryRow = tuple[str, int, float, dict[tuple[int, str], int]]


class CanaryCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[CanaryRow]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        rows = list(self.source())
        if not rows:
            return
        share = GaugeMetricFamily("inferd_canary_share", "Share of unpinned requests a canary candidate gets "
                                  "now (0 after a rollback or promotion)", labels=["model", "version"])
        rollbacks = CounterMetricFamily("inferd_canary_rollbacks", "Automatic and manual canary rollbacks, "
                                        "by reason", labels=["model", "version", "reason"])
        for model, candidate, current, counts in rows:
            share.add_metric([model, str(candidate)], current)
            for (version, reason), count in sorted(counts.items()):
                rollbacks.add_metric([model, str(version), reason], count)
        yield share
        yield rollbacks
