"""Admission limits, decided before any work: per-caller request rate (token bucket) and concurrency,
and per-model requests in flight (admitted and not yet answered).

A caller is its tenant when it sent an API key, else its client address. Everything runs on the
event loop, so plain dicts and counters suffice.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

# callers without a key are tracked by address: the table is bounded so that many addresses cannot
# grow it without limit (idle full buckets are dropped first)
_MAX_CALLERS = 10_000
# the retry hint for concurrency limits: no refill time to compute, a slot frees when a request ends
CONCURRENCY_RETRY_S = 0.1
MODEL_PARAMETER = "inferd_max_inflight_requests"


@dataclass(slots=True)
class Rejection:
    reason: str  # "rate", "concurrency" or "model_inflight": the metric's reason label
    message: str
    retry_after_s: float

    @property
    def retry_after_ms(self) -> int:
        return max(1, math.ceil(self.retry_after_s * 1000))

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))  # Retry-After: whole seconds


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class Ticket:
    """What an admitted request holds; ``release()`` once when it is answered."""

    __slots__ = ("_caller", "_model", "_quotas")

    def __init__(self, quotas: Quotas, caller: str | None, model: str | None) -> None:
        self._quotas, self._caller, self._model = quotas, caller, model

    def release(self) -> None:
        q = self._quotas
        if q is None:
            return
        self._quotas = None
        if self._caller is not None:
            left = q.active[self._caller] - 1
            if left:
                q.active[self._caller] = left
            else:
                del q.active[self._caller]
        if self._model is not None:
            left = q.model_inflight[self._model] - 1
            if left:
                q.model_inflight[self._model] = left
            else:
                del q.model_inflight[self._model]


class Quotas:
    def __init__(self, rate: float = 0.0, burst: float = 0.0, concurrency: int = 0,
                 model_inflight: int = 0) -> None:
        self.rate = rate
        self.burst = burst if burst > 0 else max(1.0, rate)
        self.concurrency = concurrency
        self.default_model_inflight = model_inflight
        self.buckets: dict[str, _Bucket] = {}
        self.active: dict[str, int] = {}
        self.model_inflight: dict[str, int] = {}

    @property
    def per_caller(self) -> bool:
        return self.rate > 0 or self.concurrency > 0

    def admit(self, caller: str, label: str, model: str | None = None,
              model_limit: int | None = None, now: float | None = None) -> Ticket | Rejection:
        """Take a token and a concurrency slot for ``caller`` and, for an inference request, a slot
        of ``model``; nothing is taken unless everything is granted."""
        if self.rate > 0:
            now = time.monotonic() if now is None else now
            bucket = self.buckets.get(caller)
            if bucket is None:
                if len(self.buckets) >= _MAX_CALLERS:
                    self._prune(now)
                bucket = self.buckets[caller] = _Bucket(self.burst, now)
            tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if tokens < 1.0:
                bucket.tokens = tokens
                return Rejection("rate", f"{label} exceeds its request rate of {self.rate:g}/s",
                                 (1.0 - tokens) / self.rate)
        else:
            tokens = 0.0
        if self.concurrency > 0 and self.active.get(caller, 0) >= self.concurrency:
            if self.rate > 0:
                bucket.tokens = tokens
            return Rejection("concurrency", f"{label} already has {self.concurrency} requests in "
                             "flight, the most allowed", CONCURRENCY_RETRY_S)
        limit = self.default_model_inflight if model_limit is None else model_limit
        if model is not None and limit > 0 and self.model_inflight.get(model, 0) >= limit:
            if self.rate > 0:
                bucket.tokens = tokens
            return Rejection("model_inflight", f"model '{model}' already has {limit} requests queued "
                             "or running, the most allowed", CONCURRENCY_RETRY_S)
        if self.rate > 0:
            bucket.tokens = tokens - 1.0
        if self.concurrency > 0:
            self.active[caller] = self.active.get(caller, 0) + 1
        else:
            caller = None
        if model is not None and limit > 0:
            self.model_inflight[model] = self.model_inflight.get(model, 0) + 1
        else:
            model = None
        return Ticket(self, caller, model)

    def _prune(self, now: float) -> None:
        full = [k for k, b in self.buckets.items()
                if b.tokens + (now - b.stamp) * self.rate >= self.burst and k not in self.active]
        for key in full:
            del self.buckets[key]
        if len(self.buckets) >= _MAX_CALLERS:  # all busy: drop the oldest half rather than grow
            for key in sorted(self.buckets, key=lambda k: self.buckets[k].stamp)[: _MAX_CALLERS // 2]:
                del self.buckets[key]
