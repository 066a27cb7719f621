"""server/core/changes.py: waiters wake on the next change, and no change between two waits is lost."""

from __future__ import annotations

import asyncio

from server.core.changes import Changes


def test_wait_returns_on_change_and_never_misses_one():
    async def scenario() -> None:
        changes = Changes()
        assert await changes.wait(-1) == 0  # already different: at once
        waiting = [asyncio.ensure_future(changes.wait(0)) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiting)
        changes.notify()
        assert await asyncio.gather(*waiting) == [1, 1, 1]
        changes.notify()  # a change while nobody waits is seen by the next wait
        assert await asyncio.wait_for(changes.wait(1), 1) == 2
        cancelled = asyncio.ensure_future(changes.wait(2))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert changes._waiters == []  # a cancelled waiter leaves nothing behind

    asyncio.run(scenario())
