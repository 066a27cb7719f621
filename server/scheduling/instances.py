"""Instances: one worker thread per loaded backend instance, executing batches off the event loop.

The exception, on purpose (docs/architecture.md): a batch measured to cost less than the hand-off
to the thread runs on the event loop itself. The hand-off and the completion's way back (a queue
put, the thread's wake-up, ``call_soon_threadsafe``, the loop's wake-up, the GIL passed twice) cost
more than add_sub's whole execution (~25 us alone, 50-150 us of CPU in the loaded server). With
cheap batches inline (and uvloop, server/core/loops.py) inferd's whole ModelInfer path in process
went from 317 to 198 us of CPU per request (scripts/bench_inprocess.py, before/after on the same
machine). Only a backend that declares ``inline`` (pure in-process compute on the calling thread)
qualifies, and only after ``_FAST_RUNS`` batches in a row cost at most ``INLINE_BUDGET_NS`` of CPU
(``Instance._execute`` says why CPU and not wall time); one batch over it sends the next ones back
to the thread, so a model that turns slow holds the loop for one batch at most. Each such overrun
on the loop doubles the run of cheap batches needed before the next inline one, and after
``_MAX_STRIKES`` the instance stays on its thread: inputs that make a model slow now and then
(data-dependent control flow) cannot keep stalling the loop. Noise is not a strike: a batch the
garbage collector interrupted is not measured, and ``_FORGIVE_RUNS`` cheap inline batches in a row
forgive one overrun (in the loaded server about one add_sub batch in a few hundred cost 2-4x the
usual, which ended inlining within seconds when every overrun counted). A batch with more input
bytes than the largest one measured cheap goes to the thread too. While an instance runs inline,
the scheduler gathers its batch until the loop has nothing else to do (core/loops.py ``when_quiet``), so
that requests arriving over several loop iterations share it; any other dynamically batched model is
dispatched once per loop iteration.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from server.core.backend import Backend, BackendRequest, uses_requests
from server.core.errors import ErrorCode, ServingError
from server.telemetry.stats import BatchTiming

from . import batching

if TYPE_CHECKING:
    from server.telemetry.observer import ModelObserver

    from .queues import Pending

log = logging.getLogger(__name__)

INLINE_BUDGET_NS = 300_000  # a batch measured to cost at most this (CPU) may run on the event loop
_FAST_RUNS = 8  # consecutive cheap batches before batches run inline (doubled per strike)
_MAX_STRIKES = 4  # inline batches over the budget before an instance stays on its thread
_FORGIVE_RUNS = 256  # cheap inline batches in a row that forgive one overrun
# a batch that held its thread this long (wall time) is not cheap whatever its CPU time says: a
# backend that waits (for a lock, a device, its own pool's threads) would hold the loop as long
WALL_LIMIT_NS = 8 * INLINE_BUDGET_NS


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
    memory: int = 0  # bytes the executing instance held (for the cost of its members)

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


_collections = [0]  # garbage collector passes so far (counted once _count_collections is hooked)


def _count_collections(phase: str, info: dict) -> None:
    if phase == "start":
        _collections[0] += 1


def _hook_collections() -> None:
    """Count the collector's passes (a process-wide hook, added once): a batch that a pass
    interrupted says nothing about the model (measured here: 200-450 us passes on add_sub's loop)."""
    if _count_collections not in gc.callbacks:
        gc.callbacks.append(_count_collections)


def _input_bytes(job: Job) -> int:
    return sum(array.nbytes for member in job.members for array in member.inputs.values())


class Instance:
    """A backend instance and the thread that owns it."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        loop: asyncio.AbstractEventLoop,
        on_done: Callable[["Instance", Job], None],
        observer: "ModelObserver",
        memory: int = 0,
    ) -> None:
        self.name = name
        self.backend = backend
        self._loop = loop
        self._on_done = on_done
        self._observer = observer
        self.loaded_memory = memory  # process RSS growth while this instance loaded and warmed up
        self._jobs: queue.SimpleQueue[tuple[Job, int] | None] = queue.SimpleQueue()  # (job, input bytes)
        self._may_inline = backend.inline and not uses_requests(backend)
        self._fast = 0  # batches in a row that took at most INLINE_BUDGET_NS
        self._fast_bytes = 0  # input bytes of the largest of those
        self._strikes = 0  # inline batches that took longer than INLINE_BUDGET_NS (less those forgiven)
        self._clean = 0  # cheap inline batches since the last overrun or forgiven one
        if self._may_inline:
            _hook_collections()
        self._thread = threading.Thread(target=self._run, name=f"inferd:{name}", daemon=True)
        self._thread.start()

    @property
    def inline(self) -> bool:
        """Cheap batches of this instance run on the event loop (see the module docstring)."""
        return self._may_inline and self._fast >= _FAST_RUNS << self._strikes

    def submit(self, job: Job) -> None:
        if not self._may_inline:
            self._jobs.put((job, 0))
            return
        size = _input_bytes(job)
        if self.inline and size <= self._fast_bytes:
            if self._execute(job, size):
                self._clean += 1
                if self._clean >= _FORGIVE_RUNS and self._strikes:  # that overrun was noise
                    self._strikes -= 1
                    self._clean = 0
            else:
                self._clean = 0
                self._strikes += 1
                if self._strikes >= _MAX_STRIKES:
                    self._may_inline = False
                    log.warning("instance %s: %d batches on the event loop took over %d us; its batches "
                                "run on its thread from now on", self.name, self._strikes, INLINE_BUDGET_NS // 1000)
            self._loop.call_soon(self._on_done, self, job)
        else:
            self._jobs.put((job, size))

    def _execute(self, job: Job, size: int = 0) -> bool:
        """Run ``job``; whether it cost at most INLINE_BUDGET_NS (counted towards running inline).

        The cost is the CPU time of the thread that ran it, not its wall time: on the instance
        thread a batch also waits for the GIL and for a core while the loop works, and on the loop
        it waits for the GIL while another instance's thread holds it (a backend releases it while
        it computes), waits that say nothing about the model. An inline backend computes on the
        calling thread (ONNX Runtime's and PyTorch's intra-op pools include it), so its CPU time
        is what it holds the loop for. A batch that took over WALL_LIMIT_NS of wall time is not
        cheap either way (a backend that waits rather than computes)."""
        job.memory = self.memory()
        if not self._may_inline:
            self._observer.execute(run_job, self.backend, job, self.name)
            return True
        passes, start, began = _collections[0], time.thread_time_ns(), time.perf_counter_ns()
        self._observer.execute(run_job, self.backend, job, self.name)
        cost = time.thread_time_ns() - start
        held = time.perf_counter_ns() - began
        if _collections[0] != passes:  # the collector ran meanwhile: no measurement
            return True
        if cost <= INLINE_BUDGET_NS and held <= WALL_LIMIT_NS:
            self._fast += 1
            self._fast_bytes = max(self._fast_bytes, size)
            return True
        self._fast = self._fast_bytes = 0
        return False

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, size = item
            self._execute(job, size)
            try:
                self._loop.call_soon_threadsafe(self._on_done, self, job)
            except RuntimeError:  # loop closed during shutdown
                return
            # not kept while waiting for the next one: its tensors (maybe views of a client's shared
            # memory that is waiting to be unmapped) go with its request
            job = item = None

    def memory(self) -> int:
        """Bytes this instance holds: what its backend reports (device memory), else the RSS growth
        measured while it loaded (see docs/cost.md)."""
        reported = self.backend.memory_bytes()
        return self.loaded_memory if reported is None else reported

    def close(self) -> None:
        """Stop the thread after its current job, then free the backend."""
        self._jobs.put(None)
        self._thread.join()
        try:
            self.backend.close()
        except Exception:
            log.exception("closing instance %s failed", self.name)
