"""The data plane: the one seam between the transports and the engine.

Frontends call it with core types and get core types back (requests, response streams, metadata,
statistics documents, index entries); they never reach into the repository, the scheduler or
telemetry. It resolves the model version, validates the request against its configuration,
schedules it with a response sink, and renders what the backend produced into ``InferResponse``s
(checked against the configuration before they leave).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable, Mapping

import numpy as np

from server import __version__
from server.core.errors import ErrorCode, ServingError, invalid, unavailable
from server.core.names import check_model_name
from server.core.stream import Item, ResponseStream, UnaryCallback
from server.core.types import IndexEntry, InferRequest, InferResponse, ModelMetadata, Tensor, TensorMetadata
from server.protos import model_config_pb2 as mc
from server.repository import canary_spec
from server.repository import config as configs
from server.repository.manager import ModelVersion, RepositoryManager
from server.telemetry.cost import REQUEST_PARAMETER as COST, CostTicket
from server.shm import Binding, SharedMemoryRegistry
from server.telemetry.stats import to_dict
from server.telemetry.tracing import Tracing

from . import validation

log = logging.getLogger(__name__)

# extensions that really work; frontends list these in ServerMetadata
EXTENSIONS = ["model_configuration", "statistics", "schedule_policy", "model_repository", "binary_tensor_data",
              "trace", "system_shared_memory"]

DECOUPLED_UNARY = "ModelInfer RPC doesn't support models with decoupled transaction policy"


class DataPlane:
    def __init__(self, repository: RepositoryManager, tracing: Tracing | None = None, control_mode: str = "none",
                 strict_readiness: bool = False, allow_client_shm: bool = False) -> None:
        self._repository = repository
        self._tracing = tracing or Tracing()
        self.control_mode = control_mode
        self.strict_readiness = strict_readiness
        self.started = False  # initial model loading finished
        self.draining = False
        self.changes = repository.changes  # readiness may have changed (started/draining: the app says)
        # system shared-memory regions (server/shm.py); registering needs --allow-client-shm
        self._shm = SharedMemoryRegistry(allow_client_shm)
        # validation verdicts of requests built from one description (InferRequest.shape_key)
        self._checked = validation.CheckedShapes()

    # -- health and metadata -----------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if not self.started or self.draining:
            return False
        return self._repository.all_ready() if self.strict_readiness else True

    def not_ready_reason(self) -> str:
        return ("it is shutting down" if self.draining else "models are still loading" if not self.started
                else "not every model is ready")

    def metadata(self) -> dict:
        return {"name": "inferd", "version": __version__, "extensions": list(EXTENSIONS)}

    def _get(self, name: str, version: str = "") -> ModelVersion:
        return self._repository.get(name, version)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        mv = self._get(name, version)
        config = mv.config
        lead = [-1] if config.max_batch_size > 0 else []
        versions = [str(mv.version)] if version else [str(v.version) for v in self._repository.ready_versions(name)]
        return ModelMetadata(
            name=config.name, versions=versions, platform=config.platform or config.backend,
            inputs=[TensorMetadata(s.name, s.datatype, lead + list(s.dims)) for s in config.inputs],
            outputs=[TensorMetadata(s.name, s.datatype, lead + list(s.dims)) for s in config.outputs],
            decoupled=config.decoupled,
        )

    def model_ready(self, name: str, version: str = "") -> bool:
        """Raises NOT_FOUND / UNAVAILABLE for an unknown or unavailable model (REST answers 400 then)."""
        mv = self._get(name, version)
        return mv.state == "READY" and mv.scheduler.ready()

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        """The effective configuration document (the ModelConfig message)."""
        return self._get(name, version).proto

    def model_parameter(self, name: str, version: str, key: str) -> str | None:
        """One ``parameters`` entry of a model's configuration (None when it has none)."""
        return self._get(name, version).config.parameters.get(key)

    def model_config_json(self, name: str, version: str = "") -> dict:
        """The same configuration as Triton renders it in JSON."""
        return configs.to_json_dict(self._get(name, version).proto)

    def model_names(self) -> list[str]:
        """The names of the models with a ready version."""
        return sorted({mv.name for mv in self._repository.ready_versions()})

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        """The statistics extension's documents (one rendering; gRPC fills its message from it)."""
        return [to_dict(mv.stats) for mv in self._stat_versions(name, version)]

    def _stat_versions(self, name: str, version: str) -> list[ModelVersion]:
        if not name:
            return self._repository.ready_versions()
        if not self._repository.known(name):
            raise ServingError(ErrorCode.NOT_FOUND, f"requested model '{name}' is not found")
        if version:
            try:
                return [self._get(name, version)]
            except ServingError as exc:
                raise ServingError(ErrorCode.INVALID_ARGUMENT,
                                   f"requested model '{name}' version {version} is not available") from exc
        versions = self._repository.ready_versions(name)
        if not versions:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"requested model '{name}' is not available")
        return versions

    # -- model control -----------------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        rows = [IndexEntry(*row) for row in self._repository.index(ready_only)]
        return [row for row in map(self._composed, rows) if not ready_only or row.state == "READY"]

    def _composed(self, row: IndexEntry) -> IndexEntry:
        """An ensemble serves only while its composing models do: its row says which one does not."""
        if row.state != "READY":
            return row
        try:
            scheduler = self._get(row.name, row.version).scheduler
        except ServingError:
            return row
        reason = scheduler.not_ready_reason() if hasattr(scheduler, "not_ready_reason") else ""
        return IndexEntry(row.name, row.version, "UNAVAILABLE", reason) if reason else row

    def _check_control(self) -> None:
        if self.control_mode != "explicit":
            raise unavailable("explicit model load / unload is not allowed: the server runs with "
                              f"--model-control-mode={self.control_mode} (use explicit)")
        if self.draining:
            raise unavailable("the server is shutting down and accepts no model load / unload")

    async def load(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        """(Re)load ``name``. Parameters as Triton defines them: ``config`` (ModelConfig JSON, a str)
        replaces config.pbtxt for this load; ``file:<version>/<file>`` (bytes) replace the model folder."""
        self._check_control()
        check_model_name(name, "load")
        config, files = None, {}
        canary = {k: v for k, v in (parameters or {}).items() if k.startswith(canary_spec.LOAD_PREFIX)}
        if canary:  # start / change / promote / end a canary (docs/canary.md)
            settings, actions = canary_spec.load_settings(canary, name)
            if len(canary) == len(parameters or {}):
                await self._repository.canary(name, settings, actions)
                return
        for key, value in (parameters or {}).items():
            if key.startswith(canary_spec.LOAD_PREFIX):
                continue
            if key == "config":
                if not isinstance(value, str):
                    raise invalid("load parameter 'config' must be a string (the model configuration as JSON)")
                config = value
            elif key.startswith("file:"):
                if not isinstance(value, bytes):
                    raise invalid(f"load parameter '{key}' must carry bytes (the file's content)")
                files[key[5:]] = value
            else:
                raise invalid(f"unrecognized load parameter '{key}'")
        if files and config is None:
            raise ServingError(ErrorCode.INVALID_ARGUMENT,
                               f"failed to load '{name}': 'file:' load parameters need the 'config' parameter "
                               "too (the configuration of the model those files make up)")
        await self._repository.load(name, config, files or None,
                                    canary=(settings, actions) if canary else None)

    async def unload(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        self._check_control()
        check_model_name(name, "unload")
        for key, value in (parameters or {}).items():
            if key != "unload_dependents":
                raise invalid(f"unrecognized unload parameter '{key}'")
            if not isinstance(value, bool):
                raise invalid("unload parameter 'unload_dependents' must be a boolean")
        composing = ({s.model_name for mv in self._repository.ready_versions(name) for s in mv.config.ensemble}
                     if (parameters or {}).get("unload_dependents") else set())
        await self._repository.unload(name)
        # with unload_dependents, an ensemble's step models go too, unless another ensemble still runs them
        used = {s.model_name for mv in self._repository.ready_versions() for s in mv.config.ensemble}
        for model in sorted(composing - used):
            await self._repository.unload(model)

    # -- system shared memory extension (server/shm.py) --------------------------------------

    def shm_register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._shm.register(name, key, offset, byte_size)

    def shm_unregister(self, name: str = "") -> None:
        self._shm.unregister(name)

    def shm_status(self, name: str = "") -> list[dict]:
        """[{name, key, offset, byte_size}] of one region or of all (sorted by name)."""
        return self._shm.status(name)

    # -- trace extension ---------------------------------------------------------------------

    @property
    def tracing_on(self) -> bool:
        return self._tracing.on

    def trace_grpc(self, metadata, stream: bool = False) -> Any:
        """The caller's trace context from gRPC metadata (a StreamTrace for a stream)."""
        return self._tracing.from_grpc(metadata, stream)

    def trace_http(self, headers: Mapping[str, str]) -> Any:
        return self._tracing.from_http(headers)

    def trace_settings(self, model: str = "", changes: dict[str, list[str] | None] | None = None,
                       update: bool = False) -> dict[str, list[str]]:
        """Read (or with ``update``, change) the global or a model's trace settings; ``changes`` None
        with ``update`` drops the model's own settings."""
        if model and not self._repository.known(model):
            raise ServingError(ErrorCode.NOT_FOUND, f"trace setting for unknown model '{model}'")
        if not update:
            return self._tracing.get_settings(model)
        return self._tracing.update_settings(model, changes)

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """A unary inference: exactly one response. Decoupled models answer UNIMPLEMENTED (Triton)."""
        if request.trace is not None:  # traced: the same path inside the request's server span
            return await self._tracing.infer(self._infer, request)
        return await self._infer(request)

    def _admit(self, request: InferRequest) -> tuple[ModelVersion, dict[str, np.ndarray], list[str], bool,
                                                     CostTicket, Binding | None]:
        if self.draining:
            raise unavailable("the server is shutting down and accepts no new requests")
        # an unpinned request of a model with a canary may go to the candidate (repository/canary.py)
        mv = self._repository.route(request.model_name, request.model_version, request.routing_key)
        empty_final = validation.check_parameters(request)
        want = request.parameters.pop(COST, False)
        if not isinstance(want, bool):
            raise invalid(f"parameter '{COST}' must be a boolean (true returns the request's cost in the "
                          f"response parameters), got {want!r}")
        binding = self._shm.bind(request, mv.config.name)  # shared-memory inputs become views
        try:
            inputs, outputs = self._checked.check(mv.config, request)
        except BaseException:
            if binding is not None:
                binding.release()
            raise
        return mv, inputs, outputs, empty_final, CostTicket(request.caller, want), binding

    async def _infer(self, request: InferRequest) -> InferResponse:
        future = asyncio.get_running_loop().create_future()
        sink = self.submit(request, functools.partial(_settle, future))
        try:
            return await future
        except asyncio.CancelledError:
            sink.cancel()  # the caller is gone: the scheduler drops it (or ignores its result)
            raise

    def submit(self, request: InferRequest,
               on_done: Callable[[InferResponse | None, BaseException | None], None]) -> UnaryCallback:
        """A unary inference without a coroutine (``infer`` awaits it; a frontend worker's engine
        port calls it directly). Admission, validation and the scheduler's submit happen now: a
        refusal raises ServingError here. Later, on the loop, ``on_done(response, None)`` or
        ``on_done(None, error)`` is called exactly once, unless the returned sink's ``cancel()``
        came first (then never). ``on_done`` runs inside the scheduler's completion: it must be
        short and must not start requests. The request's server span is the caller's business
        (``infer`` opens it for a traced request)."""
        mv, inputs, outputs, _, cost, binding = self._admit(request)
        try:
            if mv.config.decoupled:
                raise ServingError(ErrorCode.UNIMPLEMENTED, DECOUPLED_UNARY)
            sink = UnaryCallback(asyncio.get_running_loop(),
                                 functools.partial(_complete, mv, request.id, outputs, cost, binding, on_done,
                                                   self._checked))
            # no await between lookup and enqueue: a swap cannot retire this version in between
            mv.scheduler.submit(request.id, inputs, outputs, request.parameters, request.deadline, request.trace,
                                sink, cost)
        except BaseException:
            if binding is not None:
                binding.release()
            raise
        if binding is not None:  # a cancelled request lets its regions go at once
            sink.on_cancel(binding.release)
        return sink

    def stream(self, request: InferRequest) -> ResponseStream:
        """Start a request on any model; iterate the returned stream for its responses (each with
        ``final`` and ``error``). Raises ServingError at once when the request is refused.
        ``stream.empty_final`` tells whether the caller asked for Triton's empty final response."""
        token = None
        if request.trace is not None:
            token = self._tracing.begin(request)
        try:
            mv, inputs, outputs, empty_final, cost, binding = self._admit(request)
            loop, checked = asyncio.get_running_loop(), self._checked
            render = lambda item: _costed(_render(mv, request.id, outputs, item, checked), cost)  # noqa: E731
            stream = ResponseStream(loop, mv.config.decoupled, render if binding is None else
                                    _writing_to_shm(render, binding))
            stream.empty_final = empty_final
            try:
                mv.scheduler.submit(request.id, inputs, outputs, request.parameters, request.deadline,
                                    request.trace, stream, cost)
            except BaseException:
                if binding is not None:
                    binding.release()
                raise
            if binding is not None:
                stream.on_cancel(binding.release)
            if request.trace is not None:
                _end_span_on_final(self._tracing, request, token, stream, str(mv.version))
        except ServingError as exc:
            if request.trace is not None:
                self._tracing.end(request, token, exc.code.name, exc.message)
            raise
        return stream


def _complete(mv: ModelVersion, request_id: str, outputs: list[str], cost: CostTicket, binding: Binding | None,
              on_done: Callable[[InferResponse | None, BaseException | None], None],
              checked: validation.CheckedShapes, item: Item) -> None:
    """A unary request's one final item as its response (outputs checked, shared-memory outputs
    written, cost figures added when asked), handed to ``on_done``; its regions are let go."""
    response: InferResponse | None = None
    error: BaseException | None = None
    try:
        response = _render(mv, request_id, outputs, item, checked)
        error = response.error  # an output the configuration does not allow, or the request's failure
        if error is None:
            if binding is not None:
                response.outputs = binding.write(response.outputs)
            if cost.want:
                response.parameters.update(cost.figures())
    except Exception as exc:  # noqa: BLE001 - the request's failure, reported to its caller
        error = exc
    finally:
        if binding is not None:
            binding.release()
    try:
        if error is not None:
            on_done(None, error)
        else:
            on_done(response, None)
    except Exception:  # noqa: BLE001 - a caller's bug must not break the scheduler's completion loop
        log.exception("the completion callback of request '%s' failed", request_id)


def _settle(future: asyncio.Future, response: InferResponse | None, error: BaseException | None) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(response)


def _writing_to_shm(render: Any, binding: Binding) -> Any:
    """A stream's renderer that writes shared-memory outputs in place and lets the regions go after
    the final response (a cancelled stream lets them go when it is cancelled)."""

    def write(item: Item) -> InferResponse:
        response = render(item)
        try:
            if response.error is None:
                response.outputs = binding.write(response.outputs)
        except ServingError as exc:
            response.error, response.outputs = exc, []
        finally:
            if response.final:
                binding.release()
        return response

    return write


def _end_span_on_final(tracing: Tracing, request: InferRequest, token: Any, stream: ResponseStream,
                       version: str) -> None:
    """Close a streamed request's server span when its final response is delivered or it is cancelled."""
    done = False

    def end(status: str, message: str = "") -> None:
        nonlocal done
        if not done:
            done = True
            tracing.end(request, token, status, message, version)

    inner = stream.on_final

    def on_final(error: ServingError | None) -> None:
        if inner is not None:
            inner(error)
        end(error.code.name if error is not None else "OK", error.message if error is not None else "")

    stream.on_final = on_final
    stream.on_cancel(lambda: end("CANCELLED", "the caller cancelled the request"))


def _costed(response: InferResponse, cost: CostTicket) -> InferResponse:
    """A stream's final response carries the request's cost figures when it asked for them."""
    if cost.want and response.final and response.error is None:
        response.parameters.update(cost.figures())
    return response


def _render(mv: ModelVersion, request_id: str, outputs: list[str], item: Item,
            checked: validation.CheckedShapes) -> InferResponse:
    """A backend's response as an InferResponse, outputs checked against the configuration."""
    arrays, parameters, final, error = item
    config = mv.config
    tensors: list[Tensor] = []
    if error is None and arrays is not None:
        try:
            for name in outputs:
                if name in arrays:
                    tensors.append(checked.output(config, name, arrays[name]))
        except ServingError as exc:
            log.error("model '%s' version %d: %s", config.name, mv.version, exc.message)
            error, tensors = exc, []
    return InferResponse(config.name, str(mv.version), request_id, tensors, dict(parameters or {}), final, error)
