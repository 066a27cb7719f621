"""Instances: one worker thread per loaded backend instance, executing batches off the event loop."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from server.core.backend import Backend
from server.core.errors import ErrorCode, ServingError
from server.telemetry import tracing
from server.telemetry.stats import BatchTiming

from . import batching

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Job:
    """One batch to execute: the member requests' inputs, sizes and wanted outputs."""

    parts: Sequence[Mapping[str, np.ndarray]]
    sizes: Sequence[int]
    wanted: Sequence[Sequence[str]]
    outputs: Sequence[str]  # union of wanted, in configuration order
    batched: bool
    members: Any = None  # the scheduler's own bookkeeping, untouched here
    traces: list | None = None  # the traced members' RequestTraces (telemetry/tracing.py); None: none
    span_times: tuple | None = None  # (start ns, end ns, instance) of a traced batch, for its spans
    # filled by the instance
    results: list[dict[str, np.ndarray]] | None = None
    error: ServingError | None = None
    # per-member errors when a batch was re-run member by member (see run_job); None otherwise
    errors: list[ServingError | None] | None = None
    timing: BatchTiming | None = None


def run_job(backend: Backend, job: Job, model: str) -> None:
    """Execute ``job`` on ``backend``: concat, execute, split; never raises."""
    t0 = time.perf_counter_ns()
    try:
        inputs = batching.concat(job.parts)
        t1 = time.perf_counter_ns()
        outputs = backend.execute(inputs, job.outputs)
        t2 = time.perf_counter_ns()
        job.results = batching.split(outputs, job.sizes, job.wanted, job.batched)
        t3 = time.perf_counter_ns()
        job.timing = BatchTiming(sum(job.sizes), len(job.sizes), t1 - t0, t2 - t1, t3 - t2)
    except ServingError as exc:
        if exc.code == ErrorCode.INVALID_ARGUMENT and len(job.parts) > 1:
            # the backend refused one member's data (e.g. non-UTF-8 text for ONNX strings):
            # run the members alone so that only the bad request fails, not its batch mates
            _run_members_alone(backend, job, model)
        else:
            job.error = exc
    except Exception as exc:  # a backend failure fails this batch only
        log.exception("model '%s' failed to execute a batch of %d", model, sum(job.sizes))
        job.error = ServingError(ErrorCode.INTERNAL, f"model '{model}' failed: {type(exc).__name__}: {exc}")


def _run_members_alone(backend: Backend, job: Job, model: str) -> None:
    results: list = []
    errors: list[ServingError | None] = []
    start = time.perf_counter_ns()
    for part, size, wanted in zip(job.parts, job.sizes, job.wanted):
        try:
            outputs = backend.execute(part, wanted)
            results.append(batching.split(outputs, [size], [wanted], job.batched)[0])
            errors.append(None)
        except ServingError as exc:
            results.append(None)
            errors.append(exc)
        except Exception as exc:
            log.exception("model '%s' failed to execute a request of batch size %d", model, size)
            results.append(None)
            message = f"model '{model}' failed: {type(exc).__name__}: {exc}"
            errors.append(ServingError(ErrorCode.INTERNAL, message))
    job.results, job.errors = results, errors
    good = [size for size, error in zip(job.sizes, errors) if error is None]
    if good:  # the statistics count what was inferred
        job.timing = BatchTiming(sum(good), len(good), 0, time.perf_counter_ns() - start, 0)


class Instance:
    """A backend instance and the thread that owns it."""

    def __init__(
        self,
        name: str,
        model: str,
        backend: Backend,
        loop: asyncio.AbstractEventLoop,
        on_done: Callable[["Instance", Job], None],
    ) -> None:
        self.name = name
        self.model = model
        self.backend = backend
        self._loop = loop
        self._on_done = on_done
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"inferd:{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.traces is None:
                run_job(self.backend, job, self.model)
            else:  # times it for its spans (made on the loop) and tags its log lines
                tracing.run_batch(run_job, self.backend, job, self.model, self.name)
            try:
                self._loop.call_soon_threadsafe(self._on_done, self, job)
            except RuntimeError:  # loop closed during shutdown
                return

    def close(self) -> None:
        """Stop the thread after its current job, then free the backend."""
        self._jobs.put(None)
        self._thread.join()
        try:
            self.backend.close()
        except Exception:
            log.exception("closing instance %s failed", self.name)
