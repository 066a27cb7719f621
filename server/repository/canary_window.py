"""A sliding window of one version's finished requests: count, failures and latency percentiles."""

from __future__ import annotations

import math
import time
from collections import deque

# a window never holds more than this many requests (memory bound under very high rates); the
# oldest leave first, so the window then covers less time than configured
MAX_ENTRIES = 200_000


class Window:
    __slots__ = ("span_ns", "_entries", "failed")

    def __init__(self, span_s: float) -> None:
        self.span_ns = int(span_s * 1e9)
        self._entries: deque[tuple[int, bool, int]] = deque()  # (finished at ns, ok, latency ns)
        self.failed = 0

    def add(self, ok: bool, latency_ns: int, now_ns: int | None = None) -> None:
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        self._entries.append((now_ns, ok, latency_ns))
        if not ok:
            self.failed += 1
        if len(self._entries) > MAX_ENTRIES:
            self._pop()
        self.prune(now_ns)

    def prune(self, now_ns: int | None = None) -> None:
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        horizon = now_ns - self.span_ns
        entries = self._entries
        while entries and entries[0][0] < horizon:
            self._pop()

    def _pop(self) -> None:
        _, ok, _ = self._entries.popleft()
        if not ok:
            self.failed -= 1

    @property
    def count(self) -> int:
        return len(self._entries)

    @property
    def error_rate(self) -> float:
        return self.failed / len(self._entries) if self._entries else 0.0

    def p99_ms(self) -> float:
        """The 99th percentile latency in ms (nearest rank) of the successful requests; 0 when none."""
        latencies = sorted(lat for _, ok, lat in self._entries if ok)
        if not latencies:
            return 0.0
        rank = max(1, math.ceil(0.99 * len(latencies)))
        return latencies[rank - 1] / 1e6
