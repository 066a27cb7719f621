"""Ensembles (``platform: "ensemble"``): the step graph runner that stands in for a scheduler.

An ensemble version's "scheduler" is an ``EnsembleScheduler``: the data plane admits a request
against the ensemble's own configuration and submits it here as it would to any model. Each step
becomes an internal request to its model's own scheduler (so dynamic batching, priorities and queue
policies apply per step), and runs as soon as the ensemble tensors it reads exist: independent steps
run in parallel. The step models are resolved when the request arrives; one that does not serve
refuses the request at once (UNAVAILABLE, naming the model). A decoupled last step streams: each of
its responses becomes a response of the ensemble. Backends see tensors only; the ensemble is not a
backend and has no instances.

Statistics follow Triton: the ensemble counts its requests (success, fail, inference and execution
counts, batch statistics by request batch size); its compute input / infer / output times are the
sums of its steps' (each step's batch timing), its queue time its own (it starts at once). Each
composing model reports its own statistics as usual. When the request is traced, each step has a
span (``ensemble step``) that parents the step's queue and batch spans.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from server.core.config import ModelConfig
from server.core.errors import ErrorCode, ServingError, unavailable
from server.core.stream import ResponseStream, UnaryResponse
from server.core.types import InferRequest, RequestedOutput, Tensor
from server.repository.ensemble import order
from server.repository.manager import ModelVersion, RepositoryManager
from server.scheduling.serving import ServingFactory
from server.telemetry.stats import BACKEND, CANCELED, BatchTiming, ModelStats

from . import validation

log = logging.getLogger(__name__)


class _StepSink(UnaryResponse):
    """A non-decoupled step's sink; the step model's observer reports the compute (input, infer,
    output) ns of the batch that ran it here."""

    __slots__ = ("times",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.times: list[tuple[int, int, int]] = []


class _StepStream(ResponseStream):
    """A decoupled step's sink: the raw items, in order."""

    __slots__ = ("times",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, True, lambda item: item)
        self.times: list[tuple[int, int, int]] = []


class EnsembleScheduler:
    """Runs one ensemble version's requests (the ``scheduler`` of its ModelVersion)."""

    def __init__(self, config: ModelConfig, stats: ModelStats, repository: RepositoryManager,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.stats = stats
        self._repository = repository
        self._loop = loop
        self._order = order(config)
        self._tasks: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- readiness ---------------------------------------------------------------------------

    def _resolve(self) -> list[ModelVersion]:
        versions = []
        for step in self.config.ensemble:
            version = "" if step.model_version < 0 else str(step.model_version)
            try:
                versions.append(self._repository.get(step.model_name, version))
            except ServingError as exc:
                raise unavailable(f"ensemble '{self.config.name}': composing model '{step.model_name}' is not "
                                  f"available ({exc.message})") from None
        return versions

    def not_ready_reason(self) -> str:
        """Empty when every composing model serves; else why the ensemble cannot run."""
        try:
            self._resolve()
        except ServingError as exc:
            return exc.message
        return ""

    def ready(self) -> bool:
        return not self.not_ready_reason()

    # -- the scheduler interface the data plane and the repository use ------------------------

    def submit(self, request_id: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
               parameters: Mapping[str, object], deadline: float | None, trace: object, sink,
               cost: object = None) -> None:
        """``cost`` is not split for ensembles: each step's model accounts its own compute."""
        models = self._resolve()  # refused now when a composing model does not serve
        task = self._loop.create_task(self._run(models, request_id, inputs, outputs, parameters, deadline,
                                                trace, sink))
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._finished)
        sink.on_cancel(task.cancel)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def drain(self) -> None:
        await self._idle.wait()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # -- one request -------------------------------------------------------------------------

    async def _run(self, models: list[ModelVersion], request_id: str, inputs: Mapping[str, np.ndarray],
                   outputs: Sequence[str], parameters: Mapping[str, object], deadline: float | None,
                   trace: Any, sink) -> None:
        start = time.perf_counter_ns()
        values: dict[str, np.ndarray] = dict(inputs)
        times: list[tuple[int, int, int]] = []
        wanted = set(outputs)
        sent: set[str] = set()

        def emit(arrays: dict[str, np.ndarray]) -> None:
            """A decoupled step's response: an ensemble response with its outputs (and, the first
            time, the outputs other steps have produced so far)."""
            out = {name: values[name] for name in wanted - sent if name in values}
            out.update({name: array for name, array in arrays.items() if name in wanted})
            sent.update(out)
            sink.send(out, final=False)

        pending = list(self._order)
        running: dict[asyncio.Task, int] = {}
        try:
            while pending or running:
                for index in list(pending):
                    step = self.config.ensemble[index]
                    if all(tensor in values for tensor in step.input_map.values()):
                        pending.remove(index)
                        job = self._step(index, models[index], values, request_id, parameters, deadline,
                                         trace, times, emit)
                        running[self._loop.create_task(job)] = index
                if not running:  # check_graph makes this impossible; say so rather than hang
                    raise ServingError(ErrorCode.INTERNAL, f"ensemble '{self.config.name}': steps {pending} "
                                       "wait for tensors no step produced")
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index = running.pop(task)
                    try:
                        values.update(task.result())
                    except ServingError as exc:
                        step = self.config.ensemble[index]
                        raise ServingError(exc.code, f"in ensemble '{self.config.name}', step {index} (model "
                                           f"'{step.model_name}'): {exc.message}") from None
        except asyncio.CancelledError:
            for task in running:
                task.cancel()
            self._failed(start, CANCELED)
            if not sink.is_cancelled() and not sink.closed:  # unloaded under it: the caller still gets an end
                sink.send(error=unavailable(f"ensemble '{self.config.name}' was unloaded"), final=True)
            raise
        except ServingError as exc:
            for task in running:
                task.cancel()
            self._failed(start, BACKEND)
            sink.send(error=exc, final=True)
            return
        except Exception as exc:  # a bug: report it on the request, log the traceback
            log.exception("ensemble '%s' failed", self.config.name)
            for task in running:
                task.cancel()
            self._failed(start, BACKEND)
            sink.send(error=ServingError(ErrorCode.INTERNAL, f"ensemble '{self.config.name}': {exc}"), final=True)
            return
        rest = {name: values[name] for name in outputs if name not in sent}
        self._succeeded(start, times, inputs)
        if rest or not sent:
            sink.send(rest, final=True)
        else:  # a decoupled ensemble whose responses carried everything: a flags-only final
            sink.send(None, final=True)

    async def _step(self, index: int, mv: ModelVersion, values: dict[str, np.ndarray], request_id: str,
                    parameters: Mapping[str, object], deadline: float | None, trace: Any,
                    times: list[tuple[int, int, int]], emit) -> dict[str, np.ndarray]:
        """Run one step through its model's scheduler; returns its outputs by ensemble tensor name."""
        step = self.config.ensemble[index]
        config = mv.config
        tensors = []
        for model_input, tensor in step.input_map.items():
            array = values[tensor]
            spec = config.input(model_input)
            datatype = spec.datatype if spec is not None else "FP32"
            tensors.append(Tensor(model_input, datatype, list(array.shape), array))
        request = InferRequest(config.name, str(mv.version), request_id, tensors,
                               [RequestedOutput(name) for name in step.output_map], dict(parameters),
                               deadline)
        arrays = validation.check_inputs(config, request)  # the composing model's own rules
        names = validation.check_outputs(config, request.outputs)
        step_trace = None
        if trace is not None:
            step_trace = trace.sub("ensemble step", {"model_name": config.name, "model_version": str(mv.version),
                                                      "step": index, "request_id": request_id})
        status, message = "OK", ""
        try:
            if config.decoupled:
                stream = _StepStream(self._loop)
                mv.scheduler.submit(request_id, arrays, names, parameters, deadline, step_trace, stream)
                try:
                    async for item in stream:
                        produced, _, _, error = item
                        if error is not None:
                            raise error
                        if produced:
                            emit(self._mapped(mv, index, produced))
                finally:
                    stream.cancel()  # nothing more is read (a no-op once the final arrived)
                    times.extend(stream.times)
                return {}
            sink = _StepSink(self._loop)
            mv.scheduler.submit(request_id, arrays, names, parameters, deadline, step_trace, sink)
            try:
                produced = (await sink.result())[0]
            finally:
                times.extend(sink.times)
            return self._mapped(mv, index, produced or {})
        except ServingError as exc:
            status, message = exc.code.name, exc.message
            raise
        except asyncio.CancelledError:
            status, message = "CANCELLED", "the ensemble request ended"
            raise
        finally:
            if step_trace is not None:
                step_trace.finish(status, message)

    def _mapped(self, mv: ModelVersion, index: int, produced: Mapping[str, Any]) -> dict[str, np.ndarray]:
        step = self.config.ensemble[index]
        out = {}
        for model_output, tensor in step.output_map.items():
            if model_output not in produced:
                if mv.config.decoupled:
                    continue  # a streamed response may carry some outputs only
                raise ServingError(ErrorCode.INTERNAL, f"model '{mv.config.name}' returned no output "
                                   f"'{model_output}'")
            out[tensor] = validation.check_output(mv.config, model_output, np.asarray(produced[model_output])).data
        return out

    # -- statistics --------------------------------------------------------------------------

    def _succeeded(self, start: int, times: list[tuple[int, int, int]], inputs: Mapping[str, np.ndarray]) -> None:
        """As Triton: one "execution" of the request's batch size whose compute times are the sums
        of its steps' (batch statistics included); its queue time is its own (none: it starts at once)."""
        batch = 1
        if self.config.max_batch_size > 0 and inputs:
            batch = int(next(iter(inputs.values())).shape[0])
        self.stats.record_batch(BatchTiming(batch, 1, sum(t[0] for t in times), sum(t[1] for t in times),
                                            sum(t[2] for t in times)))
        self.stats.record_success(time.perf_counter_ns() - start, 0)

    def _failed(self, start: int, reason: str) -> None:
        self.stats.record_failure(time.perf_counter_ns() - start, None, reason)


class EnsembleServing:
    """The repository's serving factory: an ensemble version gets an EnsembleScheduler, any other
    model what ``inner`` builds. ``repository`` gives the manager that calls this factory (the two
    are built together: server/app.py passes a function so neither is assigned after the fact)."""

    def __init__(self, inner: ServingFactory, repository: Callable[[], RepositoryManager]) -> None:
        self.inner = inner
        self._repository = repository

    @property
    def repository(self) -> RepositoryManager | None:
        return self._repository()

    def __call__(self, name: str, version: int, config: ModelConfig, backends,
                 memory=None) -> tuple[Any, ModelStats]:
        if config.platform != "ensemble":
            return self.inner(name, version, config, backends, memory)
        if self.repository is None:
            raise ServingError(ErrorCode.INTERNAL, "the ensemble runner has no repository to find its steps in")
        stats = ModelStats(name, version, sink=self.inner.sink)
        return EnsembleScheduler(config, stats, self.repository, asyncio.get_running_loop()), stats
