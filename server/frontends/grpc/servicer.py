"""GRPCInferenceService: each RPC translates its message, calls the data plane, translates back.

Errors take one path (``_status``): a ServingError becomes its gRPC status (status.py), anything
else INTERNAL with its traceback logged. ModelStreamInfer is in stream.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc

from server.core.errors import ErrorCode, ServingError
from server.dataplane import DataPlane
from server.frontends import identity
from server.shm import CUDA_UNSUPPORTED
from server.frontends.status import grpc_status
from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc

from . import converters
from .stream import StreamInfer

log = logging.getLogger(__name__)


def status_of(exc: BaseException, where: str) -> tuple[grpc.StatusCode, str]:
    """The one mapping of an exception to a gRPC status and message."""
    if isinstance(exc, ServingError):
        return grpc_status(exc.code), exc.message
    log.error("%s failed", where, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def rpc(method):
    """Every unary RPC: map what it raises to its gRPC status."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await context.abort(*status_of(exc, method.__name__))

    return wrapper


def _unsupported(extension: str):
    async def method(self, request, context):
        if extension == "cuda_shared_memory":
            raise ServingError(ErrorCode.UNIMPLEMENTED, CUDA_UNSUPPORTED)
        raise ServingError(ErrorCode.UNIMPLEMENTED, f"the {extension} extension is not supported by this server")
    return method


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _no_repository_name(request) -> None:
    if request.repository_name:
        raise ServingError(ErrorCode.UNIMPLEMENTED, "'repository_name' specification is not supported")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane
        self._stream = StreamInfer(dataplane, status_of)

    # -- health and metadata -----------------------------------------------------------------

    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.dp.live())

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dp.ready())

    @rpc
    async def ServerMetadata(self, request, context):
        meta = self.dp.metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    @rpc
    async def ModelReady(self, request, context):
        try:  # Triton: an unknown, unavailable or failed model is "not ready", not an error
            return pb.ModelReadyResponse(ready=self.dp.model_ready(request.name, request.version))
        except ServingError as exc:
            if exc.code not in (ErrorCode.NOT_FOUND, ErrorCode.UNAVAILABLE):
                raise
            return pb.ModelReadyResponse(ready=False)

    @rpc
    async def ModelMetadata(self, request, context):
        meta = self.dp.model_metadata(request.name, request.version)
        response = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform)
        for target, tensors in ((response.inputs, meta.inputs), (response.outputs, meta.outputs)):
            for t in tensors:
                target.add(name=t.name, datatype=t.datatype, shape=t.shape)
        return response

    @rpc
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.dp.model_config(request.name, request.version))

    @rpc
    async def ModelStatistics(self, request, context):
        response = pb.ModelStatisticsResponse()
        converters.fill_statistics(response, self.dp.statistics(request.name, request.version))
        return response

    # -- repository --------------------------------------------------------------------------

    @rpc
    async def RepositoryIndex(self, request, context):
        _no_repository_name(request)
        response = pb.RepositoryIndexResponse()
        for row in self.dp.repository_index(request.ready):
            response.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return response

    @rpc
    async def RepositoryModelLoad(self, request, context):
        _no_repository_name(request)
        await self.dp.load(request.model_name, converters.params(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        _no_repository_name(request)
        await self.dp.unload(request.model_name, converters.params(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    # -- inference ---------------------------------------------------------------------------

    @rpc
    async def ModelInfer(self, request, context):
        infer_request = converters.to_request(request, _deadline(context))
        identity.tag(infer_request, identity.grpc_lookup(context.invocation_metadata()))
        if self.dp.tracing_on:  # the caller's trace context (traceparent / tracestate metadata)
            infer_request.trace = self.dp.trace_grpc(context.invocation_metadata())
        response = await self.dp.infer(infer_request)
        return converters.unary_response(response)

    async def ModelStreamInfer(self, request_iterator, context):
        async for message in self._stream(request_iterator, context):  # grpc.aio wants an async generator here
            yield message

    # -- trace extension ---------------------------------------------------------------------

    @rpc
    async def TraceSetting(self, request, context):
        """No settings in the request reads them; listed keys change (an empty value list clears a
        model's key back to the global value)."""
        if request.settings:
            changes = {key: list(value.value) for key, value in request.settings.items()}
            settings = self.dp.trace_settings(request.model_name, changes, update=True)
        else:
            settings = self.dp.trace_settings(request.model_name)
        response = pb.TraceSettingResponse()
        for key, values in settings.items():
            response.settings[key].value.extend(values)
        return response

    # -- system shared memory (server/shm.py); CUDA shared memory is not offered -----------

    @rpc
    async def SystemSharedMemoryRegister(self, request, context):
        self.dp.shm_register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(self, request, context):
        self.dp.shm_unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def SystemSharedMemoryStatus(self, request, context):
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.dp.shm_status(request.name):
            response.regions[region["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return response

    CudaSharedMemoryStatus = rpc(_unsupported("cuda_shared_memory"))
    CudaSharedMemoryRegister = rpc(_unsupported("cuda_shared_memory"))
    LogSettings = rpc(_unsupported("logging"))

    # perf_analyzer unregisters "all regions" (empty name) at start and exit: nothing is
    # registered here, so that succeeds; naming a region cannot.
    @rpc
    async def CudaSharedMemoryUnregister(self, request, context):
        if request.name:
            raise ServingError(ErrorCode.UNIMPLEMENTED, f"{CUDA_UNSUPPORTED} (no region '{request.name}' can exist)")
        return pb.CudaSharedMemoryUnregisterResponse()
