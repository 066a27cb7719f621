"""Custom metric families that models create (Triton's ``pb_utils.MetricFamily``): counters,
gauges and histograms with labels chosen per metric, exposed on /metrics under their own names.

Updated from model threads, so each metric has its own lock; read at scrape time.
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_left
from typing import Iterator, Sequence

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from server.core.errors import invalid

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
KINDS = ("counter", "gauge", "histogram")


class CustomMetric:
    __slots__ = ("_lock", "_value", "_buckets", "_counts", "_sum", "_kind", "labels")

    def __init__(self, kind: str, labels: dict[str, str], buckets: Sequence[float] | None) -> None:
        self._lock = threading.Lock()
        self._kind = kind
        self._value = 0.0
        self.labels = labels
        self._buckets = tuple(sorted(float(b) for b in buckets)) if buckets else ()
        self._counts = [0] * (len(self._buckets) + 1)
        self._sum = 0.0

    def increment(self, value: float) -> None:
        if self._kind == "histogram":
            raise invalid("increment: a histogram metric takes observe()")
        if self._kind == "counter" and value < 0:
            raise invalid("increment: a counter cannot decrease (the value must be >= 0)")
        with self._lock:
            self._value += value

    def set(self, value: float) -> None:
        if self._kind != "gauge":
            raise invalid(f"set: only a gauge can be set, this metric is a {self._kind}")
        with self._lock:
            self._value = float(value)

    def observe(self, value: float) -> None:
        if self._kind != "histogram":
            raise invalid(f"observe: only a histogram observes values, this metric is a {self._kind}")
        with self._lock:
            self._counts[bisect_left(self._buckets, value)] += 1
            self._sum += value

    def value(self) -> float:
        if self._kind == "histogram":
            raise invalid("value: a histogram has no single value")
        return self._value

    def samples(self, name: str) -> list[tuple[str, dict[str, str], float]]:
        with self._lock:
            if self._kind != "histogram":
                return [(name, self.labels, self._value)]
            out, running = [], 0
            for bound, count in zip(self._buckets + (float("inf"),), self._counts):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append((name + "_bucket", {**self.labels, "le": le}, running))
            out.append((name + "_count", self.labels, running))
            out.append((name + "_sum", self.labels, self._sum))
            return out


class CustomFamily:
    def __init__(self, name: str, description: str, kind: str) -> None:
        if not _NAME.fullmatch(name):
            raise invalid(f"metric family name {name!r} is not a valid Prometheus metric name")
        if kind not in KINDS:
            raise invalid(f"metric family kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.name, self.description, self.kind = name, description, kind
        self._metrics: dict[tuple, CustomMetric] = {}
        self._lock = threading.Lock()

    def metric(self, labels: dict[str, str], buckets: Sequence[float] | None = None) -> CustomMetric:
        for key in labels:
            if not _NAME.fullmatch(key) or ":" in key:
                raise invalid(f"metric label name {key!r} is not valid")
        key = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
        with self._lock:
            found = self._metrics.get(key)
            if found is None:
                found = self._metrics[key] = CustomMetric(self.kind, dict(key), buckets)
            return found

    def collect(self) -> Metric:
        family = Metric(self.name, self.description, self.kind)
        with self._lock:
            metrics = list(self._metrics.values())
        for m in metrics:
            for sample_name, labels, value in m.samples(self.name):
                family.add_sample(sample_name, labels, value)
        return family


class CustomCollector(Collector):
    """Every custom family, one registry entry."""

    def __init__(self) -> None:
        self._families: dict[str, CustomFamily] = {}
        self._lock = threading.Lock()

    def family(self, name: str, description: str, kind: str) -> CustomFamily:
        with self._lock:
            found = self._families.get(name)
            if found is not None:
                if found.kind != kind:
                    raise invalid(f"metric family {name!r} already exists as a {found.kind}")
                return found
            if name.startswith(("nv_", "inferd_", "vllm:")):
                raise invalid(f"metric family name {name!r} uses a prefix reserved for the server's own metrics")
            created = self._families[name] = CustomFamily(name, description, kind)
            return created

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families = list(self._families.values())
        for family in families:
            yield family.collect()
