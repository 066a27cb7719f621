"""Cheap batches run on the event loop, others on the instance thread (scheduling/instances.py)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from types import SimpleNamespace

import numpy as np

from server.core.backend import Backend
from server.scheduling import instances
from server.scheduling.instances import Instance, Job


class _Recorder(Backend):
    """Adds one; records the thread each batch ran on; computes ``delay`` seconds more when asked to."""

    inline = True

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.delay = 0.0
        self.wait = 0.0

    @classmethod
    def load(cls, ctx):  # pragma: no cover - not loaded from files here
        return cls()

    def execute(self, inputs, outputs):
        self.threads.append(threading.current_thread().name)
        if self.delay:  # computes (the scheduler measures the CPU time a batch costs)
            end = time.thread_time() + self.delay
            while time.thread_time() < end:
                pass
        if self.wait:  # waits without computing (a lock, a device)
            time.sleep(self.wait)
        return {"OUT": inputs["IN"] + 1}


class _Observer:
    def execute(self, run, backend, job, instance):
        run(backend, job, "m")


def _job(rows: int = 1) -> Job:
    member = SimpleNamespace(inputs={"IN": np.zeros((rows, 4), np.float32)}, size=rows)
    return Job(members=[member], wanted=[["OUT"]], outputs=["OUT"], batched=True, requests=False, seq=0)


async def _run(instance: Instance, done: asyncio.Queue, job: Job) -> Job:
    instance.submit(job)
    finished = await asyncio.wait_for(done.get(), 10)
    assert finished.results is not None and finished.error is None
    return finished


def _instance(backend: Backend, loop, done: asyncio.Queue) -> Instance:
    return Instance("m_0", backend, loop, lambda _instance, job: done.put_nowait(job), _Observer())


async def _until_inline(instance: Instance, done: asyncio.Queue) -> None:
    """Cheap batches until the instance runs them on the loop (measured on its thread first; a
    first call may be slow, so a few more may be needed)."""
    for _ in range(200):
        await _run(instance, done, _job())
        if instance.inline:
            return
    raise AssertionError("200 cheap batches did not move the instance onto the loop")


def _drive(backend: Backend, scenario) -> None:
    """``await scenario(instance, done)`` on a fresh instance of ``backend``, closed afterwards."""
    async def main():
        loop, done = asyncio.get_running_loop(), asyncio.Queue()
        instance = _instance(backend, loop, done)
        try:
            await scenario(instance, done)
        finally:
            await asyncio.to_thread(instance.close)

    asyncio.run(main())


def test_cheap_batches_move_to_the_loop_and_a_slow_one_moves_them_back():
    backend = _Recorder()

    async def scenario(instance: Instance, done: asyncio.Queue) -> None:
        await _until_inline(instance, done)
        assert len(backend.threads) >= instances._FAST_RUNS
        assert set(backend.threads) == {"inferd:m_0"}
        await _run(instance, done, _job())
        assert backend.threads[-1] == threading.current_thread().name  # now on the loop
        # a batch with more input bytes than any measured cheap one goes to the thread
        await _run(instance, done, _job(rows=8))
        assert backend.threads[-1] == "inferd:m_0"
        # one batch over the budget (run inline: it was cheap until now) sends the next ones back
        backend.delay = instances.INLINE_BUDGET_NS / 1e9 * 2
        await _run(instance, done, _job())
        backend.delay = 0.0
        assert not instance.inline
        await _run(instance, done, _job())
        assert backend.threads[-1] == "inferd:m_0"

    _drive(backend, scenario)


def test_a_batch_that_waits_long_without_computing_sends_the_model_back_to_its_thread():
    backend = _Recorder()

    async def scenario(instance: Instance, done: asyncio.Queue) -> None:
        await _until_inline(instance, done)
        backend.wait = instances.WALL_LIMIT_NS / 1e9 * 2  # cheap in CPU, long on the loop
        await _run(instance, done, _job())
        backend.wait = 0.0
        assert not instance.inline
        await _run(instance, done, _job())
        assert backend.threads[-1] == "inferd:m_0"

    _drive(backend, scenario)


def test_a_backend_that_does_not_declare_inline_always_runs_on_its_thread():
    class Plain(_Recorder):
        inline = False

    backend = Plain()

    async def scenario(instance: Instance, done: asyncio.Queue) -> None:
        for _ in range(instances._FAST_RUNS * 2):
            await _run(instance, done, _job())
        assert set(backend.threads) == {"inferd:m_0"}
        assert not instance.inline

    _drive(backend, scenario)


def test_a_model_that_keeps_overrunning_on_the_loop_stays_on_its_thread():
    backend = _Recorder()

    async def scenario(instance: Instance, done: asyncio.Queue) -> None:
        overruns_on_loop = 0
        for _ in range(instances._MAX_STRIKES):
            for _ in range(2000):  # cheap again until it runs inline (a longer run each strike)
                await _run(instance, done, _job())
                if instance.inline:
                    break
            assert instance.inline
            backend.delay = instances.INLINE_BUDGET_NS / 1e9 * 2
            await _run(instance, done, _job())  # runs on the loop and overruns
            backend.delay = 0.0
            overruns_on_loop += backend.threads[-1] == threading.current_thread().name
        assert overruns_on_loop == instances._MAX_STRIKES
        for _ in range(instances._FAST_RUNS << instances._MAX_STRIKES):
            await _run(instance, done, _job())
        assert not instance.inline
        assert set(backend.threads[-10:]) == {"inferd:m_0"}

    _drive(backend, scenario)


def test_a_batch_the_garbage_collector_interrupted_is_not_an_overrun():
    class Collecting(_Recorder):
        collect = False

        def execute(self, inputs, outputs):
            if self.collect:  # a full pass (whatever it costs) plus work over the budget
                gc.collect()
            return super().execute(inputs, outputs)

    backend = Collecting()

    async def scenario(instance: Instance, done: asyncio.Queue) -> None:
        await _until_inline(instance, done)
        backend.collect, backend.delay = True, instances.INLINE_BUDGET_NS / 1e9 * 2
        await _run(instance, done, _job())
        backend.collect, backend.delay = False, 0.0
        assert backend.threads[-1] == threading.current_thread().name
        assert instance.inline  # no measurement: still on the loop

    _drive(backend, scenario)


def test_a_long_run_of_cheap_batches_forgives_an_overrun():
    backend = _Recorder()

    async def scenario(instance: Instance, done: asyncio.Queue) -> None:
        await _until_inline(instance, done)
        backend.delay = instances.INLINE_BUDGET_NS / 1e9 * 2
        await _run(instance, done, _job())  # an overrun on the loop: one strike
        backend.delay = 0.0
        assert not instance.inline and instance._strikes == 1
        for _ in range(4000):
            await _run(instance, done, _job())
            if instance._strikes == 0:
                break
        assert instance._strikes == 0 and instance.inline
        assert backend.threads[-1] == threading.current_thread().name

    _drive(backend, scenario)
