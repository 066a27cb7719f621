"""How the dynamic batcher forms batches when nothing is tuned, and under a latency target.

Pure logic on the event loop: the scheduler (batcher.py) reports every completed batch and asks,
whenever an instance is idle, whether to dispatch now or wait until when. See docs/batching.md.

Without ``max_queue_delay_microseconds`` (and without preferred sizes of its own) the batcher is
work-conserving except when the recent traffic says a larger cohort is about to arrive. Closed-loop
clients send their next request as soon as they have their answer, so when a batch of ``k``
completes while ``q`` requests wait, ``k + q`` are expected; an idle instance waits for the queue
to reach that size, but at most ``WAIT_FRACTION`` times that batch's measured execution time after
it went idle. An expectation that is not met shrinks to what came. A lone client is never held (its
cohort is itself), and neither is a model whose batches execute in about the time the server
needs to hand a batch to its instance thread and back (add_sub's microseconds): for such a model
the server's per-request work, not the instance, limits throughput.

An optional latency target (config ``parameters`` key ``latency_target_ms``) caps the batch at the
largest whose predicted execution fits the target, and ends any wait (adaptive or configured) when
the oldest request would otherwise miss the target after its batch executes, unless the target is
out of reach at this load (most recent batches' oldest requests missed it anyway): then a fuller
batch is the quickest way back under it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from server.core.config import DynamicBatching, ModelConfig
from server.core.errors import ErrorCode, ServingError
from server.telemetry.stats import BatchTiming

LATENCY_TARGET_KEY = "latency_target_ms"

# the adaptive wait: at most this many times the expected batch's predicted execution time after the
# instance went idle. Measured on 2 cores (docs/batching.md): a 64-client cohort needs 2-5 execution
# times to come back through the server; 1x formed batches of ~36, 2x ~47, 3x ~59, 5x ~62 (and the
# fewer stragglers miss their cohort, the lower p99).
WAIT_FRACTION = 5.0
# the adaptive wait only for a model whose batches execute in more than this many times the
# server's own round trip to the instance thread and back
HOP_FACTOR = 4.0
# nor one whose batch executes in less than this, whatever the hop: a batch that runs on the event
# loop (scheduling/instances.py) has almost no hop, yet costs less than the server's own work for
# one request (~150-300 us of CPU here), so waiting for a fuller one cannot pay
MIN_WORTH_WAITING_NS = 200_000
# an execution time above this many times the prediction counts as only that much
OUTLIER = 2.0
# share of the latency target the scheduler plans with (the rest is left to the transport: decoding
# the request and sending the response, which the scheduler does not see)
TARGET_SHARE = 0.8
# forgetting factor of the execution-time fit, per completed batch (about the last 20 batches count)
DECAY = 0.95


def latency_target_ms(parameters: Mapping[str, str], model: str) -> float | None:
    """The model's latency target in milliseconds (None: not set). Raises FAILED_PRECONDITION on a
    value that is not a positive, finite number."""
    raw = parameters.get(LATENCY_TARGET_KEY)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION,
            f"model '{model}': parameter '{LATENCY_TARGET_KEY}' must be a positive number of milliseconds, "
            f"got '{raw}'",
        )
    return value


class ExecutionModel:
    """Predicts how long a batch of ``n`` takes to execute from the recent batches: a weighted
    least-squares line ``a + b*n`` with exponential forgetting. While every recent batch had about
    the same size the line is undetermined; then a smaller batch is predicted to cost as much as the
    typical one and a larger one proportionally more (both on the safe side)."""

    __slots__ = ("_n", "_nn", "_nt", "_t", "_w")

    def __init__(self) -> None:
        self._w = self._n = self._nn = self._t = self._nt = 0.0

    @property
    def known(self) -> bool:
        return self._w > 0.0

    def observe(self, size: int, ns: float) -> None:
        if self._w > 0.0:  # one stalled batch (preempted, a GC pause) moves the line only so far
            ns = min(ns, OUTLIER * self.predict(size))
        d = DECAY
        self._w = self._w * d + 1.0
        self._n = self._n * d + size
        self._nn = self._nn * d + size * size
        self._t = self._t * d + ns
        self._nt = self._nt * d + size * ns

    def predict(self, size: int, safe: bool = True) -> float:
        """Nanoseconds a batch of ``size`` is expected to take (0.0 before any batch completed).
        ``safe``: a larger batch than the recent ones is predicted to cost proportionally more (the
        bound a latency target needs); otherwise as much as they did (the bound a wait needs)."""
        w = self._w
        if w <= 0.0:
            return 0.0
        mean_n, mean_t = self._n / w, self._t / w
        var_n = self._nn / w - mean_n * mean_n
        if var_n < 0.25:  # one size only: no slope to fit
            return mean_t if size <= mean_n or not safe else mean_t * size / mean_n
        slope = max(0.0, (self._nt / w - mean_n * mean_t) / var_n)
        intercept = mean_t - slope * mean_n
        if intercept < 0.0:  # a line through the origin is the least that execution can cost
            slope, intercept = self._nt / self._nn, 0.0
        return intercept + slope * size

    def largest_within(self, budget_ns: float, limit: int) -> int:
        """The largest batch (1..limit) predicted to execute within ``budget_ns`` (1 when none does)."""
        if not self.known or self.predict(limit) <= budget_ns:
            return limit
        lo, hi = 1, limit  # predict is non-decreasing in n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(mid) <= budget_ns:
                lo = mid
            else:
                hi = mid - 1
        return lo


class BatchPolicy:
    """One model version's batch-formation state (used on the event loop only).

    ``adaptive``: no queue delay or preferred size was configured, so how long an idle instance
    waits is this policy's to choose; otherwise Triton's delay rule decides and a latency target
    only shortens it.
    """

    def __init__(self, max_batch: int, adaptive: bool, target_ms: float | None) -> None:
        self.max_batch = max_batch
        self.adaptive = adaptive
        self.budget_ns = target_ms * 1e6 * TARGET_SHARE if target_ms else None
        self.execution = ExecutionModel()
        self.expected = 0  # the next cohort's size: the batch that completed last plus what was waiting
        self.idle_since = 0  # perf_counter ns when an instance last became idle
        self.limit = max_batch  # the largest batch (a latency target lowers it)
        self.hop_ns = 0.0  # a batch's way to its instance thread and back, beyond its execution (EWMA)
        self.late = 0.0  # share of recent batches whose oldest request missed the target (EWMA)

    def completed(self, timing: BatchTiming | None, queued: int, head_arrived_ns: int, started_ns: int,
                  now_ns: int) -> None:
        """An instance finished a batch handed to it at ``started_ns``, whose oldest request arrived
        at ``head_arrived_ns`` (``timing`` None: it failed, nothing learnt), while ``queued``
        requests waited."""
        self.idle_since = now_ns
        if self.budget_ns is not None:
            missed = 1.0 if now_ns - head_arrived_ns > self.budget_ns else 0.0
            self.late = self.late * DECAY + missed * (1 - DECAY)
        if timing is None or timing.batch_size <= 0:
            return
        executed = timing.input_ns + timing.infer_ns + timing.output_ns
        self.execution.observe(timing.batch_size, executed)
        hop = max(0, now_ns - started_ns - executed)
        self.hop_ns = hop if not self.hop_ns else self.hop_ns * DECAY + hop * (1 - DECAY)
        # closed-loop clients send again as soon as they are answered: the batch just done comes
        # back to join those waiting. Kept while it is met, so a cohort split in two (part of it
        # still on its way when the other part completed) grows back together
        self.expected = min(self.max_batch, max(self.expected, timing.batch_size + queued))
        if self.budget_ns is not None:  # one batch's execution stays within the target
            self.limit = self.execution.largest_within(self.budget_ns, self.max_batch)

    def wait_until(self, queued: int, head_arrived_ns: int, now_ns: int, delay_until: int | None) -> int | None:
        """When an idle instance holding ``queued`` samples (compatible requests that fit ``limit``,
        oldest first; the oldest arrived at ``head_arrived_ns``) should dispatch at the latest,
        in perf_counter ns; None: now. ``delay_until``: the configured queue delay's end (Triton's
        rule), or None."""
        if queued >= self.limit:
            return None
        if delay_until is not None:
            until = delay_until
        elif not self.adaptive or not self.execution.known:
            return None
        else:
            want = min(self.expected, self.limit)
            predicted = self.execution.predict(want, safe=False)
            # a model that executes in not much more time than a batch takes to reach its thread
            # and come back is not what limits throughput (the server's per-request work is):
            # holding its requests back would only add latency
            if queued >= want or predicted <= max(HOP_FACTOR * self.hop_ns, MIN_WORTH_WAITING_NS):
                return None
            until = self.idle_since + int(predicted * WAIT_FRACTION)
            if until <= now_ns:  # the expectation was not met: it shrinks to what came
                self.expected = queued
        if self.budget_ns is not None and self.execution.known and self.late < 0.5:
            # the oldest request must still make the target after the wait and its batch. Once it
            # cannot any more, or when most recent batches missed it anyway (the load asks for more
            # than the target allows: Little's law), a fuller batch is the quickest way back under it
            latest = head_arrived_ns + int(self.budget_ns - self.execution.predict(max(queued, 1)))
            if latest > now_ns:
                until = min(until, latest)
        return until if until > now_ns else None


def policy_for(config: ModelConfig) -> BatchPolicy:
    """The batching policy of a model with dynamic batching. The wait is adaptive
    unless a queue delay or a preferred size other than max_batch_size (what an unset list becomes)
    is configured; a decoupled model's requests outlive their batch, so it never waits."""
    db = config.dynamic_batching or DynamicBatching()
    configured = db.max_queue_delay_us > 0 or set(db.preferred_batch_sizes) - {config.max_batch_size}
    return BatchPolicy(config.max_batch_size, adaptive=not configured and not config.decoupled,
                       target_ms=latency_target_ms(config.parameters, config.name))
