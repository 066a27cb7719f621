"""Per model-version inference statistics, in the statistics extension's terms.

Updated only from the event loop (the scheduler records on completion), so no locks.
Durations follow Triton: request-level counters (success, fail, queue, compute_*) count every
request once and add the duration its batch took; batch_stats count executions per batch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Why a request failed, in Triton's words (the ``reason`` label of nv_inference_request_failure):
# REJECTED timed out in the scheduler's queue, CANCELED was cancelled by its caller, BACKEND failed
# while its batch executed, OTHER anything else (e.g. still queued when its model was unloaded).
REJECTED, CANCELED, BACKEND, OTHER = "REJECTED", "CANCELED", "BACKEND", "OTHER"
FAILURE_REASONS = (REJECTED, CANCELED, BACKEND, OTHER)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class BatchTiming:
    """What an instance measured while executing one batch (nanoseconds)."""

    batch_size: int
    requests: int
    input_ns: int
    infer_ns: int
    output_ns: int




@dataclass(slots=True)
class ResponseStats:
    """One response index's statistics (Triton's InferResponseStatistics)."""

    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    empty_response: Duration = field(default_factory=Duration)
    cancel: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    name: str
    version: int
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    pending: int = 0  # requests waiting in the queue, not yet executing (Triton's pending count)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    # per response index ("0", "1", ...), for models that answer through response senders
    responses: dict[int, ResponseStats] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    sink: "StatsSink | None" = None
    # the sink's own per-version state (e.g. its histograms): it lives and dies with these
    # statistics, so a reloaded version starts afresh like every counter here
    sink_state: object = None
    # the version's own metric families (a backend's ``collect_metrics``, e.g. the llm backend's
    # vllm:* families), one callable per instance; collected with the rest at scrape time
    collectors: list = field(default_factory=list)

    def record_batch(self, timing: BatchTiming) -> None:
        self.execution_count += 1
        self.inference_count += timing.batch_size
        self.last_inference_ms = int(time.time() * 1000)
        per_size = self.batches.get(timing.batch_size)
        if per_size is None:
            per_size = self.batches[timing.batch_size] = BatchStats()
        per_size.compute_input.add(timing.input_ns)
        per_size.compute_infer.add(timing.infer_ns)
        per_size.compute_output.add(timing.output_ns)
        n = timing.requests
        self.compute_input.add(timing.input_ns * n, n)
        self.compute_infer.add(timing.infer_ns * n, n)
        self.compute_output.add(timing.output_ns * n, n)
        if self.sink is not None:
            self.sink.batch(self, timing)

    def record_success(self, total_ns: int, queue_ns: int) -> None:
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        if self.sink is not None:
            self.sink.request(self, True, total_ns, queue_ns)

    def record_first_response(self, ns: int) -> None:
        if self.sink is not None:
            self.sink.first_response(self, ns)

    def record_response(self, index: int, ns: int, failed: bool, empty: bool) -> None:
        """A response at ``index`` took ``ns`` since the previous one (or since execution started)."""
        per = self.responses.get(index)
        if per is None:
            per = self.responses[index] = ResponseStats()
        if empty:
            per.empty_response.add(ns)
        elif failed:
            per.fail.add(ns)
        else:
            per.success.add(ns)
            per.compute_infer.add(ns)
            per.compute_output.add(0)

    def record_cancel(self, index: int, ns: int) -> None:
        """A request was cancelled after ``index`` responses."""
        per = self.responses.get(index)
        if per is None:
            per = self.responses[index] = ResponseStats()
        per.cancel.add(ns)

    def record_failure(self, total_ns: int, queue_ns: int | None = None, reason: str = OTHER) -> None:
        self.fail.add(total_ns)
        self.failures[reason] += 1
        if self.sink is not None:
            self.sink.request(self, False, total_ns, queue_ns)


class StatsSink:
    """Receives every update as it happens (Prometheus histograms hang off this).

    Called on the event loop, once per executed batch and once per finished request: keep it cheap.
    """

    def batch(self, stats: ModelStats, timing: BatchTiming) -> None:  # pragma: no cover - interface
        pass

    def request(self, stats: ModelStats, ok: bool, total_ns: int, queue_ns: int | None) -> None:  # pragma: no cover
        pass

    def first_response(self, stats: ModelStats, ns: int) -> None:  # pragma: no cover - interface
        pass


def _duration_dict(d: Duration) -> dict:
    return {"count": d.count, "ns": d.ns}


def to_dict(stats: ModelStats) -> dict:
    """The statistics extension's JSON rendering of one model version (every key present)."""
    zero = _duration_dict(Duration())
    return {
        "name": stats.name,
        "version": str(stats.version),
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            "success": _duration_dict(stats.success),
            "fail": _duration_dict(stats.fail),
            "queue": _duration_dict(stats.queue),
            "compute_input": _duration_dict(stats.compute_input),
            "compute_infer": _duration_dict(stats.compute_infer),
            "compute_output": _duration_dict(stats.compute_output),
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "response_stats": {
            str(index): {
                "compute_infer": _duration_dict(r.compute_infer),
                "compute_output": _duration_dict(r.compute_output),
                "success": _duration_dict(r.success),
                "fail": _duration_dict(r.fail),
                "empty_response": _duration_dict(r.empty_response),
                "cancel": _duration_dict(r.cancel),
            }
            for index, r in sorted(stats.responses.items())
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration_dict(b.compute_input),
                "compute_infer": _duration_dict(b.compute_infer),
                "compute_output": _duration_dict(b.compute_output),
            }
            for size, b in sorted(stats.batches.items())
        ],
        "memory_usage": [],
    }
