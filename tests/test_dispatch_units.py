"""One dispatch per loop iteration (scheduling/batcher.py): requests that reach a dynamically
batched model in the same event-loop iteration (a frontend worker's frames of one read, one
client's burst) share one batch, even when its instance runs on its thread."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from server.core.backend import Backend
from server.core.config import DynamicBatching, ModelConfig, TensorConfig
from server.core.stream import UnaryResponse
from server.scheduling.batcher import Scheduler
from server.scheduling.instances import Instance
from server.telemetry.observer import ModelObserver
from server.telemetry.stats import ModelStats


class _Counting(Backend):
    """Adds one; records each batch's size and the thread it ran on."""

    inline = False  # always on its thread: the hand-off is what one dispatch per iteration saves

    def __init__(self) -> None:
        self.batches: list[tuple[int, str]] = []

    @classmethod
    def load(cls, ctx):  # pragma: no cover - not loaded from files here
        return cls()

    def execute(self, inputs, outputs):
        self.batches.append((len(inputs["IN"]), threading.current_thread().name))
        return {"OUT": inputs["IN"] + 1}


def _config(db: DynamicBatching | None) -> ModelConfig:
    return ModelConfig(name="m", max_batch_size=8, inputs=(TensorConfig("IN", "FP32", (4,)),),
                       outputs=(TensorConfig("OUT", "FP32", (4,)),), dynamic_batching=db)


async def _burst(db: DynamicBatching | None, count: int) -> list[tuple[int, str]]:
    loop = asyncio.get_running_loop()
    scheduler = Scheduler(_config(db), ModelObserver(ModelStats("m", 1)), loop)
    backend = _Counting()
    scheduler.add_instance(Instance("m_0", backend, loop, scheduler.on_done, scheduler.observer))
    try:
        sinks = []
        for i in range(count):  # all in this one iteration of the loop
            sink = UnaryResponse(loop)
            scheduler.submit(f"r{i}", {"IN": np.full((1, 4), i, np.float32)}, ["OUT"], {}, None, None, sink)
            sinks.append(sink)
        results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in sinks)), 10)
        for i, (outputs, _, final, error) in enumerate(results):  # each its own slice
            assert final and error is None
            np.testing.assert_array_equal(outputs["OUT"], np.full((1, 4), i + 1, np.float32))
        return backend.batches
    finally:
        await scheduler.close()


def test_requests_of_one_loop_iteration_share_one_batch_on_the_instance_thread():
    batches = asyncio.run(_burst(DynamicBatching(), 5))
    assert batches == [(5, "inferd:m_0")]


def test_the_batch_size_limit_still_cuts_a_burst():
    batches = asyncio.run(_burst(DynamicBatching(), 11))
    assert [size for size, _ in batches] == [8, 3]


def test_without_dynamic_batching_each_request_is_dispatched_at_once():
    batches = asyncio.run(_burst(None, 3))
    assert [size for size, _ in batches] == [1, 1, 1]
