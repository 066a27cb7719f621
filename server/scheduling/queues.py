"""The scheduler's queues: one per priority level plus the DELAY list, and the timers that expire
queued requests (transport deadlines and queue-policy timeouts). Runs on the event loop."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from collections import deque
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

QUEUED, RUNNING, DONE = 0, 1, 2


class Pending:
    """One request from submission until its final response."""

    __slots__ = (
        "id", "inputs", "size", "key", "outputs", "parameters", "sink", "level", "arrived_ns", "started_ns",
        "last_ns", "deadline", "timeout_at", "state", "delayed", "trace", "cost", "__weakref__",
    )

    def __init__(self, id: str, inputs: Mapping[str, np.ndarray], size: int, key: Any, outputs: Sequence[str],
                 parameters: Mapping[str, Any], sink: Any, level: int, deadline: float | None,
                 timeout_at: float | None, trace: Any, cost: Any = None) -> None:
        self.id = id
        self.inputs = inputs
        self.size = size
        self.key = key
        self.outputs = outputs
        self.parameters = parameters
        self.sink = sink  # core/stream.py: UnaryResponse or ResponseStream
        self.level = level
        self.arrived_ns = time.perf_counter_ns()
        self.started_ns = 0  # when its batch went to an instance
        self.last_ns = 0  # when its latest response was delivered
        self.deadline = deadline  # transport deadline (monotonic s): DEADLINE_EXCEEDED when passed
        self.timeout_at = timeout_at  # queue-policy timeout (monotonic s)
        self.state = QUEUED
        self.delayed = False
        self.trace = trace
        self.cost = cost  # telemetry/cost.py CostTicket (None: not tracked)


class Queues:
    """Priority levels 1..n (index 0 unused), the DELAY list, and expiry timers."""

    def __init__(self, levels: int, loop: asyncio.AbstractEventLoop, on_expired: Callable[[Pending, float], None],
                 on_tick: Callable[[], None]) -> None:
        self._levels: list[deque[Pending]] = [deque() for _ in range(levels + 1)]
        self._delayed: deque[Pending] = deque()
        self._loop = loop
        self._timers: list[tuple[float, int, weakref.ref]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._counter = itertools.count()
        self._on_expired = on_expired  # (request, now): decide what an expired request becomes
        self._on_tick = on_tick  # after a round of expiries: the scheduler dispatches again
        self.count = 0

    def level_length(self, level: int) -> int:
        return len(self._levels[level])

    def push(self, item: Pending) -> None:
        self._levels[item.level].append(item)
        self.count += 1
        for when in (item.deadline, item.timeout_at):
            if when is not None:
                self._arm(when, item)

    def remove(self, item: Pending) -> None:
        (self._delayed if item.delayed else self._levels[item.level]).remove(item)
        self.count -= 1

    def delay(self, item: Pending) -> None:
        """Move a timed-out request to the DELAY list (served after every level's queue)."""
        self._levels[item.level].remove(item)
        item.delayed = True
        self._delayed.append(item)

    def __iter__(self) -> Iterator[Pending]:
        """Oldest first within a level, levels in priority order, delayed ones last."""
        for q in self._levels[1:]:
            yield from q
        yield from self._delayed

    def head(self) -> Pending | None:
        for q in self._levels[1:]:
            if q:
                return q[0]
        return self._delayed[0] if self._delayed else None

    def compatible(self, key: Any) -> list[Pending]:
        """The queued requests that can share a batch with key ``key``, in ``__iter__`` order."""
        if len(self._levels) == 2 and not self._delayed:  # one level, nothing delayed: the common case
            return [p for p in self._levels[1] if p.key == key]
        return [p for p in self if p.key == key]

    # -- timers ------------------------------------------------------------------------------

    def _arm(self, when: float, item: Pending) -> None:
        # a weak reference: a request that ran long before its deadline is not kept alive (with its
        # tensors) by a timer entry that is only dropped when that deadline comes
        count = next(self._counter)
        heapq.heappush(self._timers, (when, count, weakref.ref(item)))
        if self._timers[0][1] == count:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_later(max(0.0, when - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._handle = None
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, ref = heapq.heappop(self._timers)
            item = ref()
            if item is not None and item.state == QUEUED:
                self._on_expired(item, now)
        if self._timers:
            self._handle = self._loop.call_later(max(0.0, self._timers[0][0] - now), self._expire)
        self._on_tick()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
