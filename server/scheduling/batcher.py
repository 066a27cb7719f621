"""The per model-version scheduler: admission, batch formation, dispatch to instances, completion.

Runs on the event loop. Requests wait in ``Queues`` (one per priority level); whenever an instance
is idle the scheduler forms the next batch (how long it may wait for a fuller one: policy.py) and
hands it to that instance's thread (or runs it on the loop when measured cheap: instances.py).
With dynamic batching the scheduler dispatches once per loop iteration, so that requests
arriving together (a frontend worker's frames of one read) share one batch and one hand-off, and
for an instance that runs its batches on the loop it gathers until the loop is quiet (core/loops.py ``when_quiet``);
without it every request is its own batch, dispatched at once. Every request carries a response sink
(core/stream.py): a tensor-path batch ends with one final response per member; a request-path
backend sends its own responses, and a decoupled model's request stays in flight until its final one.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Mapping, Sequence

import numpy as np

from server.core import loops
from server.core.backend import uses_requests
from server.core.config import DynamicBatching, ModelConfig, QueuePolicy
from server.core.errors import ErrorCode, ServingError, invalid
from server.core.stream import cancelled_error
from server.telemetry.observer import ModelObserver
from server.telemetry.stats import BACKEND, CANCELED, OTHER, REJECTED

from . import batching, policy
from .instances import Instance, Job
from .queues import DONE, QUEUED, RUNNING, Pending, Queues

_NO_POLICY = QueuePolicy()  # a model without dynamic batching: one level, no limits
# An inline instance's batch is dispatched once the loop is quiet (core/loops.py ``when_quiet``), or
# once its oldest request waited GATHER_MAX_NS
GATHER_MAX_NS = 2_000_000
NO_RESPONSE = "model '{}' finished a request without sending a response"


def _release(item: Pending) -> None:
    """A finished request keeps nothing large: its timer entry may outlive it until its deadline."""
    item.inputs = item.parameters = item.sink = None


class Scheduler:
    def __init__(self, config: ModelConfig, observer: ModelObserver, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.observer = observer
        self._loop = loop
        self._batched = config.max_batch_size > 0
        self._db: DynamicBatching | None = config.dynamic_batching if self._batched else None
        db = self._db
        levels = max(1, db.priority_levels) if db else 1
        self._default_level = (db.default_priority_level or 1) if db and db.priority_levels else 1
        self._queues = Queues(levels, loop, self._expired, self._dispatch)
        self._idle: list[Instance] = []
        self._instances: list[Instance] = []
        self._delay_handle: asyncio.TimerHandle | None = None
        self._delay_at = 0  # perf_counter ns the armed delay timer fires at
        self._policy = policy.policy_for(config) if db else None  # how long an idle instance waits
        self._running = 0  # requests handed to an instance and not yet finished (final response)
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        self._request_path = False  # the backend sends its own responses (execute_requests)
        # preserve_ordering: completions are released in batch-formation order
        self._ordered = bool(db and db.preserve_ordering)
        self._next_seq = 0
        self._release_seq = 0
        self._held: dict[int, Job] = {}
        self._dispatch_soon = False  # a dispatch (at once or when the loop is quiet) is scheduled
        budget = self._policy.budget_ns if self._policy is not None else None
        self._gather_ns = min(GATHER_MAX_NS, int(budget / 2)) if budget else GATHER_MAX_NS

    def ready(self) -> bool:
        """A model's scheduler is ready while it serves and some instance can run (an ensemble's also
        asks its steps' models)."""
        return not self.unavailable_reason()

    # -- instances ---------------------------------------------------------------------------

    def add_instance(self, instance: Instance) -> None:
        self._instances.append(instance)
        self._idle.append(instance)
        self._request_path = uses_requests(instance.backend)

    def unavailable_reason(self) -> str:
        """Why this version cannot serve although loaded ("" while it can): every instance says so."""
        reasons = [instance.backend.health() for instance in self._instances]
        if not reasons or not all(reasons):
            return ""
        return "; ".join(f"instance '{i.name}': {r}" for i, r in zip(self._instances, reasons))

    @property
    def backends(self) -> list:
        """The backends of this version's instances (e.g. for a model's own canary check)."""
        return [instance.backend for instance in self._instances]

    @property
    def on_done(self):
        """The completion callback an Instance of this scheduler calls (on the loop)."""
        return self._on_done

    # -- submission --------------------------------------------------------------------------

    def submit(self, request_id: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
               parameters: Mapping[str, object], deadline: float | None, trace: object, sink,
               cost: object = None) -> None:
        """Queue one validated request; its responses go to ``sink``. Raises ServingError when refused."""
        level, policy = self._level_and_policy(parameters)
        if policy.max_queue_size and self._queues.level_length(level) >= policy.max_queue_size:
            raise ServingError(
                ErrorCode.UNAVAILABLE,
                f"Exceeds maximum queue size: {policy.max_queue_size} requests already queued "
                f"for model '{self.config.name}' at priority level {level}",
            )
        timeout_us = self._timeout_us(policy, parameters) if parameters or policy.default_timeout_us else 0
        timeout_at = time.monotonic() + timeout_us / 1e6 if timeout_us else None
        size = next(iter(inputs.values())).shape[0] if self._batched and inputs else 1
        key = batching.batch_key(inputs) if self._db else None
        item = Pending(request_id, inputs, size, key, outputs, parameters, sink, level, deadline, timeout_at, trace,
                       cost)
        if self._request_path:
            sink.on_final = functools.partial(self._final, item)
            sink.on_response = functools.partial(self._responded, item)
        sink.on_cancel(functools.partial(self._cancelled, item))
        self._queues.push(item)
        self.observer.queued(item, self._queues.count)
        self._idle_event.clear()
        self._dispatch_or_gather()

    def _dispatch_or_gather(self) -> None:
        if not self._idle:
            return  # the next completion dispatches
        if self._idle[-1].inline and self._queues.count < self._gather_limit():
            # the idle instance runs cheap batches on the loop: gather while the loop has other work
            # (one gather at a time; see _gathered)
            if not self._dispatch_soon:
                self._dispatch_soon = True
                loops.when_quiet(self._loop, self._deferred_dispatch, self._gathered)
        elif self._db is not None:
            # first let the requests that arrive in this loop iteration (e.g. the frames of one read
            # from a frontend worker) join the batch: one dispatch per iteration, so requests that
            # arrive together share one hand-off to the instance thread
            if not self._dispatch_soon:
                self._dispatch_soon = True
                self._loop.call_soon(self._deferred_dispatch)
        else:
            self._dispatch()

    def _deferred_dispatch(self) -> None:
        self._dispatch_soon = False
        self._dispatch()

    def _gather_limit(self) -> int:
        return self._policy.limit if self._policy is not None else 1

    def _gathered(self, now: int) -> bool:
        """An inline batch stops waiting for companions (see ``when_quiet``) once its oldest request
        waited ``_gather_ns`` (half the latency target, when one is set) or a full batch waits."""
        head = self._queues.head()
        return (head is None or now - head.arrived_ns >= self._gather_ns
                or self._queues.count >= self._gather_limit())

    def _level_and_policy(self, parameters: Mapping[str, object]) -> tuple[int, QueuePolicy]:
        db = self._db
        if db is None:
            return 1, _NO_POLICY
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

    # -- leaving the queue without running ---------------------------------------------------

    def _expired(self, item: Pending, now: float) -> None:
        if item.deadline is not None and item.deadline <= now:
            self._drop(item, ServingError(ErrorCode.DEADLINE_EXCEEDED,
                                          "request deadline passed while it waited in the queue"), REJECTED)
        elif item.timeout_at is not None and item.timeout_at <= now and not item.delayed:
            policy = self._db.policy_for(item.level) if self._db else QueuePolicy()
            if policy.timeout_action == "DELAY":
                self._queues.delay(item)
            else:
                self._drop(item, ServingError(ErrorCode.UNAVAILABLE, "Request timeout expired"), REJECTED)

    def _cancelled(self, item: Pending) -> None:
        # a cancelled caller (client gone, stream cancelled) leaves the queue at once, never executed
        if item.state == QUEUED:
            self._drop(item, cancelled_error(), CANCELED)

    def _drop(self, item: Pending, error: ServingError, reason: str) -> None:
        self._queues.remove(item)
        item.state = DONE  # the sink's hooks ignore it from here
        self.observer.dropped(item, error, reason)
        item.sink.finish(None, error)
        _release(item)
        self._settle()

    def _settle(self) -> None:
        self.observer.pending(self._queues.count)
        if not self._queues.count and not self._running:
            self._idle_event.set()

    # -- batch formation and dispatch --------------------------------------------------------

    def _dispatch(self) -> None:
        while self._idle and self._queues.count:
            members = self._form_batch()
            if not members:
                return
            self._start(self._idle.pop(), members)

    def _form_batch(self) -> list[Pending] | None:
        head = self._queues.head()
        if head is None:
            return None
        if self._db is None:
            return [head]
        db, rule = self._db, self._policy
        same = self._queues.compatible(head.key)
        count = batching.cut_size([p.size for p in same], rule.limit, db.preferred_batch_sizes)
        members = same[: max(1, count)]
        total = sum(p.size for p in members)
        delay_until = None
        if db.max_queue_delay_us and total not in db.preferred_batch_sizes:
            delay_until = head.arrived_ns + db.max_queue_delay_us * 1000
        now = time.perf_counter_ns()
        wait_until = rule.wait_until(total, head.arrived_ns, now, delay_until)  # policy.py
        if wait_until is not None:
            if self._delay_handle is None or self._delay_handle.cancelled() or wait_until < self._delay_at:
                if self._delay_handle is not None:
                    self._delay_handle.cancel()
                self._delay_at = wait_until
                self._delay_handle = self._loop.call_later((wait_until - now) / 1e9, self._delay_expired)
            return None
        return members

    def _delay_expired(self) -> None:
        self._delay_handle = None
        self._dispatch()

    def _start(self, instance: Instance, members: list[Pending]) -> None:
        now = time.perf_counter_ns()
        for p in members:
            self._queues.remove(p)
            p.state = RUNNING
            p.started_ns = now
        self._running += len(members)
        self.observer.pending(self._queues.count)
        wanted = [p.outputs for p in members]
        union = wanted[0] if len(members) == 1 else self._union(wanted)
        traces = [p.trace for p in members if p.trace is not None] or None
        job = Job(members=members, wanted=wanted, outputs=union, batched=self._batched,
                  requests=self._request_path, seq=self._next_seq, traces=traces)
        self._next_seq += 1
        instance.submit(job)

    def _union(self, wanted: list[Sequence[str]]) -> list[str]:
        names = {n for w in wanted for n in w}
        return [o.name for o in self.config.outputs if o.name in names]

    # -- completion --------------------------------------------------------------------------

    def _on_done(self, instance: Instance, job: Job) -> None:
        self._idle.append(instance)
        if self._policy is not None:
            head = job.members[0]
            self._policy.completed(job.timing, self._queues.count, head.arrived_ns, head.started_ns,
                                   time.perf_counter_ns())
        if self._ordered:
            self._held[job.seq] = job
            while self._release_seq in self._held:
                self._finish(self._held.pop(self._release_seq))
                self._release_seq += 1
        else:
            self._finish(job)
        if self._queues.count:
            if instance.inline:
                self._dispatch_or_gather()  # gather the next inline batch too
            else:
                self._dispatch()

    def _finish(self, job: Job) -> None:
        self.observer.batch_done(job)
        if job.requests:
            self._finish_requests(job)
            return
        for i, p in enumerate(job.members):
            p.state = DONE
            error = job.error or (job.errors[i] if job.errors is not None else None)
            if p.sink.is_cancelled():  # caller went away while it ran
                self.observer.finished(p, cancelled_error(), CANCELED)
            elif error is not None:
                self.observer.finished(p, error, BACKEND)
                p.sink.finish(None, error)
            else:
                self.observer.finished(p, None, "")
                p.sink.finish(job.results[i])
            _release(p)
        self._running -= len(job.members)
        self._settle()

    def _finish_requests(self, job: Job) -> None:
        """After ``execute_requests`` returned: close what the backend left open (a decoupled
        model's requests stay open until it sends their final)."""
        for p in job.members:
            sink = p.sink
            if p.state == DONE or sink.closed:
                continue
            try:  # the backend may send the final from its own thread meanwhile: that one wins
                if job.error is not None and not (sink.responded and not sink.decoupled):
                    sink.send(error=job.error, final=True)
                elif not sink.decoupled:
                    if sink.responded:
                        sink.send(final=True)
                    else:
                        sink.send(error=ServingError(ErrorCode.INTERNAL, NO_RESPONSE.format(self.config.name)),
                                  final=True)
            except ServingError:
                pass

    def _responded(self, item: Pending, index: int, item_sent) -> None:
        if item.state == DONE:
            return
        outputs, parameters, final, error = item_sent
        self.observer.responded(item, index, final, error,
                                empty=outputs is None and error is None and not parameters, parameters=parameters)

    def _final(self, item: Pending, error: ServingError | None) -> None:
        """The final response of a request-path request was delivered (on the loop)."""
        if item.state == DONE:
            return
        item.state = DONE
        if item.sink.is_cancelled():
            self.observer.finished(item, error or cancelled_error(), CANCELED)
        else:
            self.observer.finished(item, error, BACKEND if error is not None else "")
        _release(item)
        self._running -= 1
        self._settle()

    # -- lifecycle ---------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until nothing is queued or running (a decoupled request runs until its final)."""
        await self._idle_event.wait()

    async def close(self) -> None:
        """Fail whatever is still queued, stop the instance threads and free the backends."""
        for item in list(self._queues):
            self._drop(item, ServingError(ErrorCode.UNAVAILABLE, f"model '{self.config.name}' was unloaded"), OTHER)
        self._queues.close()
        if self._delay_handle is not None:
            self._delay_handle.cancel()
        instances, self._instances, self._idle = self._instances, [], []
        await asyncio.to_thread(lambda: [instance.close() for instance in instances])
