"""The engine's Prometheus families, named as vLLM names them (labels model, version, engine).

The engine thread records; a scrape (another thread) reads a consistent copy under one lock.
Buckets are vLLM's (vllm/v1/metrics/loggers.py), so vLLM dashboards read them unchanged.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class Histogram:
    __slots__ = ("bounds", "counts", "le", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.le = tuple(floatToGoString(b) for b in bounds) + ("+Inf",)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for le, count in zip(self.le, self.counts):
            running += count
            out.append((le, running))
        return out


# (family, help, attribute)
_HISTOGRAMS = (
    ("vllm:time_to_first_token_seconds", "Time from arrival to the first generated token", "ttft"),
    ("vllm:inter_token_latency_seconds", "Time between two successive generated tokens of one request", "itl"),
    ("vllm:e2e_request_latency_seconds", "Time from arrival to the last token of finished requests", "e2e"),
    ("vllm:request_queue_time_seconds", "Time requests spent waiting before their first prefill", "queue"),
    ("vllm:request_prompt_tokens", "Prompt tokens per finished request", "prompt_hist"),
    ("vllm:request_generation_tokens", "Generated tokens per finished request", "generation_hist"),
)


class EngineMetrics:
    """Counters, gauges and histograms of one engine (one model instance)."""

    def __init__(self, model: str, version: str, engine: str, max_model_len: int) -> None:
        self.labels = {"model": model, "version": version, "engine": engine}
        self.lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_BUCKETS)
        self.queue = Histogram(REQUEST_BUCKETS)
        self.prompt_hist = Histogram(buckets_1_2_5(max_model_len))
        self.generation_hist = Histogram(buckets_1_2_5(max_model_len))

    def collect(self) -> Iterator[Metric]:
        names, values = list(self.labels), list(self.labels.values())
        with self.lock:
            for name, doc, value in (
                ("vllm:num_requests_running", "Sequences in the running batch", self.running),
                ("vllm:num_requests_waiting", "Sequences waiting to be scheduled (new or preempted)", self.waiting),
                ("vllm:kv_cache_usage_perc", "Fraction of the KV-cache token budget in use (0..1)", self.kv_usage),
            ):
                gauge = GaugeMetricFamily(name, doc, labels=names)
                gauge.add_metric(values, value)
                yield gauge
            for name, doc, value in (
                ("vllm:prompt_tokens", "Prompt tokens processed (recomputation after preemption not counted)",
                 self.prompt_tokens),
                ("vllm:generation_tokens", "Tokens generated", self.generation_tokens),
                ("vllm:num_preemptions", "Sequences preempted (KV cache freed, recomputed later)", self.preemptions),
            ):
                counter = CounterMetricFamily(name, doc, labels=names)
                counter.add_metric(values, value)
                yield counter
            success = CounterMetricFamily("vllm:request_success", "Finished requests by finish reason",
                                          labels=names + ["finished_reason"])
            for reason, count in self.success.items():
                success.add_metric(values + [reason], count)
            yield success
            for name, doc, attr in _HISTOGRAMS:
                hist: Histogram = getattr(self, attr)
                family = HistogramMetricFamily(name, doc, labels=names)
                family.add_metric(values, hist.cumulative(), hist.sum)
                yield family
