"""Response sinks without a server: a consumer that stops taking responses cannot make a stream
buffer without bound; the producer is told to stop and the consumer gets an error at the end."""

from __future__ import annotations

import asyncio

from server.core.errors import ErrorCode
from server.core.stream import MAX_PENDING, ResponseStream


def test_a_stream_whose_consumer_stops_reading_cancels_its_producer():
    async def main():
        stream = ResponseStream(asyncio.get_running_loop(), decoupled=True, render=lambda item: item)
        told = []
        stream.on_cancel(lambda: told.append(True))
        for i in range(MAX_PENDING + 50):  # nobody reads
            if stream.is_cancelled():
                break
            stream.send({"OUT": i})
        await asyncio.sleep(0)
        assert stream.is_cancelled() and told == [True]
        stream.send(final=True)  # the producer still ends its request: dropped, nothing grows
        items = [item async for item in stream]
        assert len(items) == MAX_PENDING + 1
        outputs, _, final, error = items[-1]
        assert final and error.code == ErrorCode.UNAVAILABLE and "not reading" in error.message

    asyncio.run(main())
