"""The observer of one model version: request, queue, batch and response events, in one place.

The scheduler and the instances report what happens; this turns it into statistics (and through
their sink, Prometheus metrics) and spans. Nothing else in the request path knows about telemetry.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from server.core.errors import ServingError

from . import tracing
from .stats import CANCELED, ModelStats


class ModelObserver:
    __slots__ = ("stats", "model")

    def __init__(self, stats: ModelStats) -> None:
        self.stats = stats
        self.model = stats.name

    # -- queue -------------------------------------------------------------------------------

    def queued(self, request: Any, pending: int) -> None:
        self.stats.pending = pending
        if request.trace is not None:  # the queue span starts here (wall clock, as OpenTelemetry wants)
            request.trace.queued_ns = time.time_ns()

    def pending(self, pending: int) -> None:
        self.stats.pending = pending

    def dropped(self, request: Any, error: ServingError, reason: str) -> None:
        """A request left the queue without running (timeout, deadline, cancellation, unload)."""
        self.stats.record_failure(time.perf_counter_ns() - request.arrived_ns, None, reason)
        if request.trace is not None:
            tracing.queue_failed(request.trace, error)

    # -- execution ---------------------------------------------------------------------------

    def execute(self, run: Callable[..., None], backend: Any, job: Any, instance: str) -> None:
        """Run ``run(backend, job, model)`` in the instance thread (timed for spans when traced)."""
        if job.traces is None:
            run(backend, job, self.model)
        else:
            tracing.run_batch(run, backend, job, self.model, instance)

    def batch_done(self, job: Any) -> None:
        if job.traces is not None:
            tracing.batch_spans(job, self.model)
        if job.timing is not None:
            self.stats.record_batch(job.timing)

    # -- responses and completion ------------------------------------------------------------

    def responded(self, request: Any, index: int, final: bool, error: ServingError | None, empty: bool) -> None:
        """A response of a request-path model was delivered (index 0 is the first)."""
        now = time.perf_counter_ns()
        since = now - (request.last_ns or request.started_ns or request.arrived_ns)
        request.last_ns = now
        if index == 0 and not empty:
            self.stats.record_first_response(now - request.arrived_ns)
        self.stats.record_response(index, since, error is not None, empty)
        if request.trace is not None:
            wall = time.time_ns()
            attributes = {"response_index": index, "final": final}
            if error is not None:
                attributes["error.type"] = error.code.name
            request.trace.child("response", attributes, wall, wall)

    def finished(self, request: Any, error: ServingError | None, reason: str) -> None:
        end = time.perf_counter_ns()
        total = end - request.arrived_ns
        queued = (request.started_ns or end) - request.arrived_ns
        if error is None:
            self.stats.record_success(total, queued)
        else:
            if reason == CANCELED and request.sink.responded:
                self.stats.record_cancel(request.sink.responded, end - (request.last_ns or end))
            self.stats.record_failure(total, queued, reason)
