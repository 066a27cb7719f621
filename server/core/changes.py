"""A change counter that coroutines can wait on: "something this state depends on changed".

Level-triggered through the count: a waiter passes the count it last acted on and returns at once
when it moved meanwhile, so no change between two waits is lost. Event-loop thread only.
"""

from __future__ import annotations

import asyncio


class Changes:
    def __init__(self) -> None:
        self.count = 0
        self._waiters: list[asyncio.Future[int]] = []

    def notify(self) -> None:
        self.count += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(self.count)

    async def wait(self, seen: int) -> int:
        """The count once it differs from ``seen`` (at once if it already does)."""
        if self.count != seen:
            return self.count
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        finally:
            if waiter in self._waiters:  # cancelled before a change
                self._waiters.remove(waiter)
