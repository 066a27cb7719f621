"""The per model-version scheduler: queues, priorities, timeouts, dynamic batching, dispatch.

Runs on the event loop. Requests wait in one queue per priority level; whenever an instance is
idle the scheduler forms the next batch (work-conserving unless ``max_queue_delay_us`` asks it
to wait for a fuller batch) and hands it to that instance's thread. Without dynamic batching
every request is its own batch.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from typing import Mapping, Sequence

import numpy as np

from server.core.config import DynamicBatching, ModelConfig, QueuePolicy
from server.core.errors import ErrorCode, ServingError, invalid
from server.telemetry import tracing
from server.telemetry.stats import BACKEND, CANCELED, OTHER, REJECTED, ModelStats

from . import batching
from .instances import Instance, Job

_QUEUED, _RUNNING, _DONE = 0, 1, 2


class Pending:
    """One queued request."""

    __slots__ = (
        "inputs", "size", "key", "outputs", "future", "level", "arrived_ns",
        "deadline", "timeout_at", "state", "delayed", "trace",
    )

    def __init__(self, inputs, size, key, outputs, future, level, deadline, timeout_at, trace):
        self.inputs = inputs
        self.size = size
        self.key = key
        self.outputs = outputs
        self.future = future
        self.level = level
        self.arrived_ns = time.perf_counter_ns()
        self.deadline = deadline  # transport deadline (monotonic s), DEADLINE_EXCEEDED when passed
        self.timeout_at = timeout_at  # queue-policy timeout (monotonic s)
        self.state = _QUEUED
        self.delayed = False
        self.trace = trace


class Scheduler:
    def __init__(self, config: ModelConfig, stats: ModelStats, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.stats = stats
        self._loop = loop
        self._batched = config.max_batch_size > 0
        self._db: DynamicBatching | None = config.dynamic_batching if self._batched else None
        db = self._db
        self._max_batch = config.max_batch_size if db else 0
        self._levels = max(1, db.priority_levels) if db else 1
        self._default_level = (db.default_priority_level or 1) if db and db.priority_levels else 1
        self._queues: list[deque[Pending]] = [deque() for _ in range(self._levels + 1)]  # index 0 unused
        self._delayed: deque[Pending] = deque()
        self._idle: list[Instance] = []
        self._instances: list[Instance] = []
        self._timers: list[tuple[float, int, Pending]] = []
        self._timer_handle: asyncio.TimerHandle | None = None
        self._delay_handle: asyncio.TimerHandle | None = None
        self._counter = itertools.count()
        self._queued = 0
        self._running = 0
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        # preserve_ordering: completions are released in batch-formation order
        self._ordered = bool(db and db.preserve_ordering)
        self._next_seq = 0
        self._release_seq = 0
        self._held: dict[int, Job] = {}

    # -- instances ---------------------------------------------------------------------------

    def add_instance(self, instance: Instance) -> None:
        self._instances.append(instance)
        self._idle.append(instance)

    @property
    def on_done(self):
        """The completion callback an Instance of this scheduler calls (on the loop)."""
        return self._on_done

    # -- submission --------------------------------------------------------------------------

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        parameters: Mapping[str, object],
        deadline: float | None = None,
        trace: object = None,
    ) -> dict[str, np.ndarray]:
        """Queue one validated request; resolves to its own outputs."""
        level, policy = self._level_and_policy(parameters)
        if policy.max_queue_size and len(self._queues[level]) >= policy.max_queue_size:
            raise ServingError(
                ErrorCode.UNAVAILABLE,
                f"Exceeds maximum queue size: {policy.max_queue_size} requests already queued "
                f"for model '{self.config.name}' at priority level {level}",
            )
        timeout_us = self._timeout_us(policy, parameters)
        now = time.monotonic()
        timeout_at = now + timeout_us / 1e6 if timeout_us else None
        size = next(iter(inputs.values())).shape[0] if self._batched and inputs else 1
        key = batching.batch_key(inputs) if self._db else None
        future = self._loop.create_future()
        item = Pending(inputs, size, key, outputs, future, level, deadline, timeout_at, trace)
        if trace is not None:  # the queue span starts here (wall clock, as OpenTelemetry wants)
            trace.queued_ns = time.time_ns()
        self._queues[level].append(item)
        self._queued += 1
        self.stats.pending += 1
        self._idle_event.clear()
        future.add_done_callback(lambda f, item=item: self._on_future_done(item))
        for when in (deadline, timeout_at):
            if when is not None:
                self._arm_timer(when, item)
        self._dispatch()
        return await future

    def _level_and_policy(self, parameters: Mapping[str, object]) -> tuple[int, QueuePolicy]:
        db = self._db
        if db is None:
            return 1, QueuePolicy()
        level = self._default_level
        priority = parameters.get("priority")
        if priority not in (None, 0):
            if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
                raise invalid(f"parameter 'priority' must be a non-negative integer, got {priority!r}")
            if not db.priority_levels:
                level = 1  # priorities are off for this model: one level
            elif priority > db.priority_levels:
                raise invalid(
                    f"priority {priority} is out of range for model '{self.config.name}': "
                    f"it has priority levels 1..{db.priority_levels}"
                )
            else:
                level = priority
        return level, db.policy_for(level)

    @staticmethod
    def _timeout_us(policy: QueuePolicy, parameters: Mapping[str, object]) -> int:
        timeout = parameters.get("timeout")
        if timeout is not None:
            if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
                raise invalid(f"parameter 'timeout' must be a non-negative integer (microseconds), got {timeout!r}")
            default = policy.default_timeout_us
            if policy.allow_timeout_override and timeout and (not default or timeout < default):
                return timeout
        return policy.default_timeout_us

    # -- timeouts and cancellation -----------------------------------------------------------

    def _arm_timer(self, when: float, item: Pending) -> None:
        heapq.heappush(self._timers, (when, next(self._counter), item))
        if self._timers[0][2] is item:
            if self._timer_handle is not None:
                self._timer_handle.cancel()
            delay = max(0.0, when - time.monotonic())
            self._timer_handle = self._loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer_handle = None
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, item = heapq.heappop(self._timers)
            if item.state != _QUEUED or item.future.done():
                continue
            if item.deadline is not None and item.deadline <= now:
                error = ServingError(ErrorCode.DEADLINE_EXCEEDED,
                                     "request deadline passed while it waited in the queue")
                self._fail_queued(item, error, REJECTED)
            elif item.timeout_at is not None and item.timeout_at <= now and not item.delayed:
                policy = self._db.policy_for(item.level) if self._db else QueuePolicy()
                if policy.timeout_action == "DELAY":
                    self._queues[item.level].remove(item)
                    item.delayed = True
                    self._delayed.append(item)
                else:
                    error = ServingError(ErrorCode.UNAVAILABLE, "Request timeout expired")
                    self._fail_queued(item, error, REJECTED)
        if self._timers:
            self._timer_handle = self._loop.call_later(max(0.0, self._timers[0][0] - now), self._expire)
        self._dispatch()

    def _fail_queued(self, item: Pending, error: ServingError, reason: str) -> None:
        self._unqueue(item)
        self.stats.record_failure(time.perf_counter_ns() - item.arrived_ns, None, reason)
        if item.trace is not None:
            tracing.queue_failed(item.trace, error)
        item.future.set_exception(error)

    def _unqueue(self, item: Pending) -> None:
        (self._delayed if item.delayed else self._queues[item.level]).remove(item)
        item.state = _DONE
        self._queued -= 1
        self._settle()

    def _on_future_done(self, item: Pending) -> None:
        # a cancelled caller (client gone) leaves the queue at once and is never executed
        if item.future.cancelled() and item.state == _QUEUED:
            self._unqueue(item)
            self.stats.record_failure(time.perf_counter_ns() - item.arrived_ns, None, CANCELED)

    def _settle(self) -> None:
        self.stats.pending = self._queued
        if not self._queued and not self._running:
            self._idle_event.set()

    # -- batch formation and dispatch --------------------------------------------------------

    def _dispatch(self) -> None:
        while self._idle and self._queued:
            members = self._form_batch()
            if not members:
                return
            self._start(self._idle.pop(), members)

    def _candidates(self):
        for q in self._queues[1:]:
            yield from q
        yield from self._delayed

    def _form_batch(self) -> list[Pending] | None:
        head = next(self._candidates(), None)
        if head is None:
            return None
        if self._db is None:
            return [head]
        db = self._db
        same = [p for p in self._candidates() if p.key == head.key]
        count = batching.cut_size([p.size for p in same], self._max_batch, db.preferred_batch_sizes)
        members = same[: max(1, count)]
        total = sum(p.size for p in members)
        if db.max_queue_delay_us and total < self._max_batch and total not in db.preferred_batch_sizes:
            wait_until = head.arrived_ns + db.max_queue_delay_us * 1000
            remaining = (wait_until - time.perf_counter_ns()) / 1e9
            if remaining > 0:
                if self._delay_handle is None or self._delay_handle.cancelled():
                    self._delay_handle = self._loop.call_later(remaining, self._delay_expired)
                return None
        return members

    def _delay_expired(self) -> None:
        self._delay_handle = None
        self._dispatch()

    def _start(self, instance: Instance, members: list[Pending]) -> None:
        now = time.perf_counter_ns()
        for p in members:
            (self._delayed if p.delayed else self._queues[p.level]).remove(p)
            p.state = _RUNNING
        self._queued -= len(members)
        self._running += len(members)
        self.stats.pending = self._queued
        wanted = [p.outputs for p in members]
        union = wanted[0] if len(members) == 1 else self._union(wanted)
        job = Job(
            parts=[p.inputs for p in members],
            sizes=[p.size for p in members],
            wanted=wanted,
            outputs=union,
            batched=self._batched,
            members=(members, now, self._next_seq),
            traces=[p.trace for p in members if p.trace is not None] or None,
        )
        self._next_seq += 1
        instance.submit(job)

    def _union(self, wanted: list[Sequence[str]]) -> list[str]:
        names = {n for w in wanted for n in w}
        return [o.name for o in self.config.outputs if o.name in names]

    # -- completion --------------------------------------------------------------------------

    def _on_done(self, instance: Instance, job: Job) -> None:
        self._idle.append(instance)
        if self._ordered:
            self._held[job.members[2]] = job
            while self._release_seq in self._held:
                self._finish(self._held.pop(self._release_seq))
                self._release_seq += 1
        else:
            self._finish(job)
        self._dispatch()

    def _finish(self, job: Job) -> None:
        members, started_ns, _ = job.members
        end = time.perf_counter_ns()
        if job.traces is not None:
            tracing.batch_spans(job, self.config.name)
        if job.timing is not None:
            self.stats.record_batch(job.timing)
        for i, p in enumerate(members):
            p.state = _DONE
            total, queued = end - p.arrived_ns, started_ns - p.arrived_ns
            if p.future.done():  # caller went away while it ran
                self.stats.record_failure(total, queued, CANCELED)
            elif job.error is not None or (job.errors is not None and job.errors[i] is not None):
                self.stats.record_failure(total, queued, BACKEND)
                p.future.set_exception(job.error or job.errors[i])
            else:
                self.stats.record_success(total, queued)
                p.future.set_result(job.results[i])
        self._running -= len(members)
        self._settle()

    # -- lifecycle ---------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until nothing is queued or running."""
        await self._idle_event.wait()

    async def close(self) -> None:
        """Fail whatever is still queued, stop the instance threads and free the backends."""
        for item in list(self._candidates()):
            if not item.future.done():
                self._fail_queued(item, ServingError(ErrorCode.UNAVAILABLE,
                                                     f"model '{self.config.name}' was unloaded"), OTHER)
        for handle in (self._timer_handle, self._delay_handle):
            if handle is not None:
                handle.cancel()
        instances, self._instances, self._idle = self._instances, [], []
        await asyncio.to_thread(lambda: [instance.close() for instance in instances])
