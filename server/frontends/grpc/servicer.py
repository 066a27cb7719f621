"""GRPCInferenceService: each RPC translates its message, calls the data plane, translates back."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc

from server.core.errors import ErrorCode, ServingError
from server.dataplane import DataPlane
from server.frontends.status import grpc_status
from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc

from . import converters

log = logging.getLogger(__name__)


def rpc(method):
    """Map ServingError to its gRPC status; anything else is INTERNAL and logged with its traceback."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ServingError as exc:
            await context.abort(grpc_status(exc.code), exc.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper


def _unsupported(extension: str):
    async def method(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"the {extension} extension is not supported by this server")
    return method


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane

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
        return pb.ModelReadyResponse(ready=self.dp.model_ready(request.name, request.version))

    @rpc
    async def ModelMetadata(self, request, context):
        mv = self.dp.model(request.name, request.version)
        config = mv.config
        lead = [-1] if config.max_batch_size > 0 else []
        response = pb.ModelMetadataResponse(
            name=config.name,
            versions=self.dp.model_versions(request.name, request.version),
            platform=config.platform or config.backend,
        )
        for target, specs in ((response.inputs, config.inputs), (response.outputs, config.outputs)):
            for spec in specs:
                target.add(name=spec.name, datatype=spec.datatype, shape=lead + list(spec.dims))
        return response

    @rpc
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.dp.model(request.name, request.version).proto)

    @rpc
    async def ModelStatistics(self, request, context):
        response = pb.ModelStatisticsResponse()
        for mv in self.dp.statistics(request.name, request.version):
            converters.fill_statistics(response.model_stats.add(), mv.stats)
        return response

    # -- repository --------------------------------------------------------------------------

    @rpc
    async def RepositoryIndex(self, request, context):
        if request.repository_name:
            raise ServingError(ErrorCode.UNIMPLEMENTED, "'repository_name' specification is not supported")
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.dp.repository.index(request.ready):
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    @rpc
    async def RepositoryModelLoad(self, request, context):
        if request.repository_name:
            raise ServingError(ErrorCode.UNIMPLEMENTED, "'repository_name' specification is not supported")
        config, files = None, {}
        for key, value in request.parameters.items():
            choice = value.WhichOneof("parameter_choice")
            if key == "config":
                if choice != "string_param":
                    raise ServingError(ErrorCode.INVALID_ARGUMENT, "load parameter 'config' must be a string_param")
                config = value.string_param
            elif key.startswith("file:"):
                if choice != "bytes_param":
                    raise ServingError(ErrorCode.INVALID_ARGUMENT, f"load parameter '{key}' must be a bytes_param")
                files[key[5:]] = value.bytes_param
            else:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, f"unrecognized load parameter '{key}'")
        await self.dp.load(request.model_name, config, files)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        if request.repository_name:
            raise ServingError(ErrorCode.UNIMPLEMENTED, "'repository_name' specification is not supported")
        for key, value in request.parameters.items():
            if key != "unload_dependents":
                raise ServingError(ErrorCode.INVALID_ARGUMENT, f"unrecognized unload parameter '{key}'")
            if value.WhichOneof("parameter_choice") != "bool_param":
                raise ServingError(ErrorCode.INVALID_ARGUMENT, "unload parameter 'unload_dependents' must be a bool_param")
        await self.dp.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference ---------------------------------------------------------------------------

    @rpc
    async def ModelInfer(self, request, context):
        infer_request = converters.to_request(request, _deadline(context))
        if self.dp.tracing.on:  # the caller's trace context (traceparent / tracestate metadata)
            infer_request.trace = self.dp.tracing.from_grpc(context.invocation_metadata())
        response = await self.dp.infer(infer_request)
        return converters.unary_response(response)

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request is answered on the stream (in completion order, correlated by id);
        a failed request gets an in-band error_message and the stream goes on."""
        results: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        # one span over the whole stream, its requests' spans inside it
        stream = None
        if self.dp.tracing.on:
            stream = self.dp.tracing.from_grpc(context.invocation_metadata(), stream=True)

        async def one(message) -> None:
            try:
                infer_request = converters.to_request(message)
                if stream is not None:
                    infer_request.trace = stream.child(infer_request.model_name)
                response = converters.from_response(await self.dp.infer(infer_request))
                response.parameters["triton_final_response"].bool_param = True
                await results.put(pb.ModelStreamInferResponse(infer_response=response))
            except ServingError as exc:
                await results.put(self._stream_error(message, exc.message))
            except Exception as exc:
                log.exception("stream request failed")
                await results.put(self._stream_error(message, f"internal error: {exc}"))

        async def read() -> None:
            async for message in request_iterator:
                task = asyncio.ensure_future(one(message))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*list(pending))
            await results.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await results.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()
            if stream is not None:
                stream.end()

    @staticmethod
    def _stream_error(message, text: str) -> pb.ModelStreamInferResponse:
        response = pb.ModelInferResponse(id=message.id, model_name=message.model_name,
                                         model_version=message.model_version)
        return pb.ModelStreamInferResponse(error_message=text, infer_response=response)

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

    # -- extensions not offered --------------------------------------------------------------

    SystemSharedMemoryStatus = rpc(_unsupported("system_shared_memory"))
    SystemSharedMemoryRegister = rpc(_unsupported("system_shared_memory"))
    CudaSharedMemoryStatus = rpc(_unsupported("cuda_shared_memory"))
    CudaSharedMemoryRegister = rpc(_unsupported("cuda_shared_memory"))
    LogSettings = rpc(_unsupported("logging"))

    # perf_analyzer unregisters "all regions" (empty name) at start and exit: nothing is
    # registered here, so that succeeds; naming a region cannot.
    @rpc
    async def SystemSharedMemoryUnregister(self, request, context):
        if request.name:
            raise ServingError(ErrorCode.UNIMPLEMENTED, "the system_shared_memory extension is not supported "
                               f"(no region '{request.name}' can exist)")
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryUnregister(self, request, context):
        if request.name:
            raise ServingError(ErrorCode.UNIMPLEMENTED, "the cuda_shared_memory extension is not supported "
                               f"(no region '{request.name}' can exist)")
        return pb.CudaSharedMemoryUnregisterResponse()
