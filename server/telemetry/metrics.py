"""Prometheus metrics: Triton's per-model counters, latency and batch-size histograms, GPU gauges,
and the ``/metrics`` endpoint that serves them.

Where the numbers come from:

- Triton's counters (``nv_inference_*``) are read from each serving version's ``ModelStats`` at
  scrape time, so they cost nothing per request and always equal what the statistics extension
  (ModelStatistics) reports. They are exposed under Triton's exact names, without the ``_total``
  suffix prometheus_client would add, so existing Triton dashboards and alerts work unchanged.
- The histograms are fed through the ``StatsSink`` hook on the event loop. Their buckets live on the
  ``ModelStats`` they describe (``sink_state``): one attribute read and one bisect per observation,
  no lock (everything runs on the loop), and a reloaded version starts afresh together with its
  counters, so ``_count`` always matches the counter it shadows.
- The scrape is rendered on the event loop too, so it is one consistent snapshot: within a scrape,
  ``inferd_request_duration_seconds_count`` equals ``nv_inference_request_success`` exactly.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                            Metric)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .custom_metrics import CustomCollector, CustomFamily
from .gpu import GpuCollector
from .stats import FAILURE_REASONS, BatchTiming, ModelStats, StatsSink

log = logging.getLogger(__name__)

# the text format generate_latest writes (prometheus_client >= 0.21 names 1.0.0 as "latest")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds: 100 us .. 60 s, roughly x2.5 apart; fine where CPU and GPU inference usually lands
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LATENCY_NS = tuple(round(b * 1e9) for b in LATENCY_BUCKETS)  # observed in ns: no float math
_LATENCY_LE = tuple(floatToGoString(b) for b in LATENCY_BUCKETS) + ("+Inf",)
_BATCH_LE = tuple(floatToGoString(b) for b in BATCH_BUCKETS) + ("+Inf",)

StatsSource = Callable[[], Iterable[ModelStats]]

# Triton's counter families: name -> (help, ModelStats reader); durations are cumulative microseconds
_COUNTERS: dict[str, tuple[str, Callable[[ModelStats], int]]] = {
    "nv_inference_request_success": ("Number of successful inference requests, all batch sizes",
                                     lambda s: s.success.count),
    "nv_inference_count": ("Number of inferences performed (a batch of n counts as n)",
                           lambda s: s.inference_count),
    "nv_inference_exec_count": ("Number of model executions performed (batches)",
                                lambda s: s.execution_count),
    "nv_inference_request_duration_us": ("Cumulative inference request duration in microseconds",
                                         lambda s: s.success.ns // 1000),
    "nv_inference_queue_duration_us": ("Cumulative inference queuing duration in microseconds",
                                       lambda s: s.queue.ns // 1000),
    "nv_inference_compute_input_duration_us": ("Cumulative compute input duration in microseconds",
                                               lambda s: s.compute_input.ns // 1000),
    "nv_inference_compute_infer_duration_us": ("Cumulative compute inference duration in microseconds",
                                               lambda s: s.compute_infer.ns // 1000),
    "nv_inference_compute_output_duration_us": ("Cumulative compute output duration in microseconds",
                                                lambda s: s.compute_output.ns // 1000),
}
_FAILURE = "nv_inference_request_failure"
_PENDING = "nv_inference_pending_request_count"


class _Buckets:
    """One histogram's state: per-bucket (not cumulative) counts, the last slot being +Inf."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[int, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0

    def observe(self, value: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bounds[i-1] < value <= bounds[i]: "le"
        self.total += value

    def cumulative(self, labels: tuple[str, ...]) -> list[tuple[str, float]]:
        out, running = [], 0
        for label, count in zip(labels, self.counts):
            running += count
            out.append((label, running))
        return out


# Triton's nv_inference_first_response_histogram_ms default buckets (milliseconds)
_FIRST_MS = (100, 500, 2000, 5000)
_FIRST_NS = tuple(ms * 1_000_000 for ms in _FIRST_MS)
_FIRST_LE = tuple(str(ms) for ms in _FIRST_MS) + ("+Inf",)


class _VersionHistograms:
    __slots__ = ("batch", "compute", "first", "queue", "request")

    def __init__(self) -> None:
        self.request = _Buckets(_LATENCY_NS)
        self.queue = _Buckets(_LATENCY_NS)
        self.compute = _Buckets(_LATENCY_NS)
        self.batch = _Buckets(BATCH_BUCKETS)
        self.first = _Buckets(_FIRST_NS)


# (family, help, attribute, le labels, scale of the sum)
_HISTOGRAMS = (
    ("inferd_request_duration_seconds", "End-to-end duration of successful requests (arrival to response)",
     "request", _LATENCY_LE, 1e-9),
    ("inferd_queue_duration_seconds", "Time successful requests waited in the scheduler's queue",
     "queue", _LATENCY_LE, 1e-9),
    ("inferd_compute_duration_seconds", "Duration of one batch execution (input + infer + output)",
     "compute", _LATENCY_LE, 1e-9),
    ("inferd_batch_size", "Size of each executed batch (sum of its requests' batch sizes)",
     "batch", _BATCH_LE, 1),
    # Triton's name and unit: time from arrival to a request's first response (its only one when unary)
    ("nv_inference_first_response_histogram_ms", "Duration from request arrival to its first response in "
     "milliseconds", "first", _FIRST_LE, 1e-6),
)


class _ModelCollector(Collector):
    """Triton's per-model counters and gauge, and the histograms, for every serving version."""

    def __init__(self, source: StatsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        versions = [(s, [s.name, str(s.version)]) for s in self.source()]
        if not versions:
            return
        for name, (doc, read) in _COUNTERS.items():
            # a plain Metric: CounterMetricFamily would name every sample "<name>_total"
            family = Metric(name, doc, "counter")
            for stats, (model, version) in versions:
                family.add_sample(name, {"model": model, "version": version}, read(stats))
            yield family
        failure = Metric(_FAILURE, "Number of failed inference requests, all batch sizes", "counter")
        for stats, (model, version) in versions:
            for reason in FAILURE_REASONS:
                labels = {"model": model, "reason": reason, "version": version}
                failure.add_sample(_FAILURE, labels, stats.failures.get(reason, 0))
        yield failure
        pending = GaugeMetricFamily(_PENDING, "Instantaneous number of pending requests awaiting execution",
                                    labels=["model", "version"])
        for stats, labels in versions:
            pending.add_metric(labels, stats.pending)
        yield pending
        for name, doc, attr, le, scale in _HISTOGRAMS:
            family = HistogramMetricFamily(name, doc, labels=["model", "version"])
            for stats, labels in versions:
                state = stats.sink_state
                if isinstance(state, _VersionHistograms):
                    buckets = getattr(state, attr)
                    family.add_metric(labels, buckets.cumulative(le), buckets.total * scale)
                else:  # no traffic yet: every bucket at zero, so the series exist from the start
                    family.add_metric(labels, [(bound, 0) for bound in le], 0)
            yield family
        yield from _backend_families(stats for stats, _ in versions)


def _backend_families(versions: Iterable[ModelStats]) -> Iterator[Metric]:
    """The families backends export (``ModelStats.collectors``), merged by name across instances and
    versions so each family is declared once; a failing collector costs only its own samples."""
    merged: dict[str, Metric] = {}
    for stats in versions:
        for collect in stats.collectors:
            try:
                families = list(collect())
            except Exception:
                log.exception("metrics of model '%s' version %d could not be collected", stats.name, stats.version)
                continue
            for family in families:
                into = merged.get(family.name)
                if into is None:
                    merged[family.name] = family
                elif into.type == family.type:
                    into.samples.extend(family.samples)
    yield from merged.values()


class _RejectionCollector(Collector):
    """``inferd_rejected_requests_total{reason,tenant}``: requests the admission checks refused
    (server/security). The tenant is a key-file name or "anonymous", never a client address, so the
    series stay as few as the tenants."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("inferd_rejected_requests",
                                     "Requests refused before any work, by reason and tenant",
                                     labels=["reason", "tenant"])
        for (reason, tenant), count in sorted(self.counts.items()):
            family.add_metric([reason, tenant], count)
        yield family


class Metrics(StatsSink):
    """The server's metrics: a private registry (nothing global), fed by the StatsSink hook."""

    def __init__(self, source: StatsSource, gpu: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ModelCollector(source))
        self.custom = CustomCollector()
        self.registry.register(self.custom)
        self.rejections = _RejectionCollector()
        self.registry.register(self.rejections)
        self.gpu = GpuCollector() if gpu else None
        if self.gpu is not None:
            self.registry.register(self.gpu)

    # -- StatsSink: called on the event loop for every finished request and executed batch ----

    def request(self, stats: ModelStats, ok: bool, total_ns: int, queue_ns: int | None) -> None:
        if not ok:  # the latency histograms shadow Triton's duration counters, which count successes
            return
        h = stats.sink_state
        if h is None:
            h = stats.sink_state = _VersionHistograms()
        h.request.observe(total_ns)
        h.queue.observe(queue_ns)
        if not stats.responses:  # a unary model: its one response is its first (senders report their own)
            h.first.observe(total_ns)

    def first_response(self, stats: ModelStats, ns: int) -> None:
        h = stats.sink_state
        if h is None:
            h = stats.sink_state = _VersionHistograms()
        h.first.observe(ns)

    def batch(self, stats: ModelStats, timing: BatchTiming) -> None:
        h = stats.sink_state
        if h is None:
            h = stats.sink_state = _VersionHistograms()
        h.compute.observe(timing.input_ns + timing.infer_ns + timing.output_ns)
        h.batch.observe(timing.batch_size)

    def custom_family(self, name: str, description: str, kind: str, buckets=None) -> CustomFamily:
        """A model's own metric family (pb_utils.MetricFamily)."""
        return self.custom.family(name, description, kind)

    def rejected(self, reason: str, tenant: str) -> None:
        """One request refused by the admission checks (on the event loop)."""
        key = (reason, tenant)
        self.rejections.counts[key] = self.rejections.counts.get(key, 0) + 1

    # -- exposition ---------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Sample what must be read off the loop (GPUs) before a scrape."""
        if self.gpu is not None and self.gpu.enabled:
            await asyncio.to_thread(self.gpu.refresh)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in the registry."""
        return render(self.registry)


class _One:
    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> list[Metric]:
        return [self.metric]


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(registry: CollectorRegistry) -> bytes:
    """``generate_latest``, except that a counter whose samples carry the family's own name (Triton's
    style) is written as is: ``generate_latest`` would declare it as ``<name>_total``, a family its
    samples are not part of."""
    parts: list[bytes] = []
    for metric in registry.collect():
        if metric.type == "counter" and all(s.name == metric.name for s in metric.samples):
            doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            lines = [f"# HELP {metric.name} {doc}\n# TYPE {metric.name} counter\n"]
            for s in metric.samples:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
                lines.append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}\n")
            parts.append("".join(lines).encode())
        else:
            parts.append(generate_latest(_One(metric)))
    return b"".join(parts)


class MetricsServer:
    """Serves ``GET /metrics`` (and nothing else: 404) on the server's event loop."""

    def __init__(self, metrics: Metrics, host: str, port: int, security=None) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self.security = security  # server.security.Security: TLS and API keys for this port

    async def start(self) -> None:
        ssl_context, middlewares = None, []
        if self.security is not None:
            ssl_context, middlewares = self.security.metrics_transport()
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/metrics", self._scrape)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port, ssl_context=ssl_context).start()
        except OSError as exc:
            await self._runner.cleanup()
            where = f"{self.host}:{self.port}"
            raise OSError(exc.errno, f"cannot serve metrics on {where}: {exc.strerror}") from exc
        log.info("metrics at http%s://%s:%d/metrics", "s" if ssl_context else "", self.host, self.port)

    async def _scrape(self, request: web.Request) -> web.Response:
        await self.metrics.refresh()
        response = web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
        response.enable_compression()  # gzip when the scraper accepts it (Prometheus does)
        return response

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
