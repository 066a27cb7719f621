"""Instances: one worker thread per loaded backend instance, executing batches off the event loop."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from server.core.backend import Backend, BackendRequest
from server.core.errors import ErrorCode, ServingError
from server.telemetry.stats import BatchTiming

from . import batching

if TYPE_CHECKING:
    from server.telemetry.observer import ModelObserver

    from .queues import Pending

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Job:
    """One batch to execute: its member requests and the outputs they want."""

    members: Sequence["Pending"]
    wanted: Sequence[Sequence[str]]  # per member
    outputs: Sequence[str]  # union of wanted, in configuration order
    batched: bool
    requests: bool  # the request path (execute_requests) instead of the tensor path
    seq: int  # formation order (preserve_ordering releases completions in this order)
    traces: list | None = None  # the traced members' RequestTraces (telemetry/tracing.py); None: none
    span_times: tuple | None = None  # (start ns, end ns, instance) of a traced batch, for its spans
    # filled by the instance
    results: list[dict[str, np.ndarray]] | None = None
    error: ServingError | None = None
    # per-member errors when a batch was re-run member by member (see run_job); None otherwise
    errors: list[ServingError | None] | None = None
    timing: BatchTiming | None = None

    @property
    def sizes(self) -> list[int]:
        return [p.size for p in self.members]


def _failure(model: str, exc: Exception, what: str) -> ServingError:
    log.exception("model '%s' failed to execute %s", model, what)
    return ServingError(ErrorCode.INTERNAL, f"model '{model}' failed: {type(exc).__name__}: {exc}")


def run_job(backend: Backend, job: Job, model: str) -> None:
    """Execute ``job`` on ``backend``; never raises."""
    if job.requests:
        _run_requests(backend, job, model)
        return
    t0 = time.perf_counter_ns()
    sizes = job.sizes
    try:
        inputs = batching.concat([p.inputs for p in job.members])
        t1 = time.perf_counter_ns()
        outputs = backend.execute(inputs, job.outputs)
        t2 = time.perf_counter_ns()
        job.results = batching.split(outputs, sizes, job.wanted, job.batched)
        t3 = time.perf_counter_ns()
        job.timing = BatchTiming(sum(sizes), len(sizes), t1 - t0, t2 - t1, t3 - t2)
    except ServingError as exc:
        if exc.code == ErrorCode.INVALID_ARGUMENT and len(sizes) > 1:
            # the backend refused one member's data (e.g. non-UTF-8 text for ONNX strings):
            # run the members alone so that only the bad request fails, not its batch mates
            _run_members_alone(backend, job, model)
        else:
            job.error = exc
    except Exception as exc:  # a backend failure fails this batch only
        job.error = _failure(model, exc, f"a batch of {sum(sizes)}")


def _run_requests(backend: Backend, job: Job, model: str) -> None:
    start = time.perf_counter_ns()
    requests = [BackendRequest(p.id, p.inputs, wanted, p.parameters, p.sink, p.trace)
                for p, wanted in zip(job.members, job.wanted)]
    try:
        backend.execute_requests(requests)
    except ServingError as exc:
        job.error = exc
    except Exception as exc:
        job.error = _failure(model, exc, f"{len(requests)} requests")
    sizes = job.sizes
    job.timing = BatchTiming(sum(sizes), len(sizes), 0, time.perf_counter_ns() - start, 0)


def _run_members_alone(backend: Backend, job: Job, model: str) -> None:
    results: list = []
    errors: list[ServingError | None] = []
    start = time.perf_counter_ns()
    for p, wanted in zip(job.members, job.wanted):
        try:
            outputs = backend.execute(p.inputs, wanted)
            results.append(batching.split(outputs, [p.size], [wanted], job.batched)[0])
            errors.append(None)
        except ServingError as exc:
            results.append(None)
            errors.append(exc)
        except Exception as exc:
            results.append(None)
            errors.append(_failure(model, exc, f"a request of batch size {p.size}"))
    job.results, job.errors = results, errors
    good = [p.size for p, error in zip(job.members, errors) if error is None]
    if good:  # the statistics count what was inferred
        job.timing = BatchTiming(sum(good), len(good), 0, time.perf_counter_ns() - start, 0)


class Instance:
    """A backend instance and the thread that owns it."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        loop: asyncio.AbstractEventLoop,
        on_done: Callable[["Instance", Job], None],
        observer: "ModelObserver",
    ) -> None:
        self.name = name
        self.backend = backend
        self._loop = loop
        self._on_done = on_done
        self._observer = observer
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
            self._observer.execute(run_job, self.backend, job, self.name)
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
