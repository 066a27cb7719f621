"""Builds the grpc.aio server: inference service, standard health (Check/Watch) and reflection."""

from __future__ import annotations

import asyncio
import logging
import traceback

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server.dataplane import DataPlane
from server.limits import GrpcLimits
from server.protos import grpc_service_pb2 as pb

from . import wire
from .servicer import InferenceServicer

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def channel_options(limits: GrpcLimits) -> list[tuple[str, int]]:
    """grpc core arguments bounding what one connection can hold (docs/limits.md)."""
    return [
        # a larger request is refused by grpc itself (RESOURCE_EXHAUSTED) before it is buffered whole
        ("grpc.max_receive_message_length", limits.max_receive_bytes),
        ("grpc.max_send_message_length", limits.max_send_bytes),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        # a peer that stops reading also stops answering pings: after keepalive_time + timeout its
        # connection is closed and the responses it pinned are freed
        ("grpc.keepalive_time_ms", limits.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", limits.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_idle_ms", limits.max_connection_idle_ms),
    ]


def _add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that ModelInfer uses wire.py's (de)serializers."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        deserialize, serialize = request.FromString, response.SerializeToString
        behaviour = getattr(servicer, method.name)
        if method.name == "ModelInfer":
            deserialize, serialize = wire.parse_infer_request, wire.serialize_infer_response
            behaviour = _releasing(behaviour)
        handlers[method.name] = make(behaviour, request_deserializer=deserialize, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _clear_frames(exc: BaseException | None) -> None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _releasing(method):
    """A failed call must not keep its request alive. grpc.aio keeps the exception a handler ends
    with (``context.abort`` raises one) in a reference cycle, and its traceback's frames hold the
    request, so each failed 64 MiB request stayed in memory until the garbage collector's rare
    full pass (measured: +80 MiB of RSS per failed request, indefinitely). The finished frames of
    the exception and of the errors it chains are cleared, and this frame lets go of the request."""

    async def call(request, context):
        try:
            return await method(request, context)
        except BaseException as exc:
            del request
            _clear_frames(exc)
            raise

    return call


class GrpcFrontend:
    def __init__(self, dataplane: DataPlane, address: str, limits: GrpcLimits, security=None,
                 reuse_port: bool = False) -> None:
        self.dataplane = dataplane
        self.address = address
        # server.security.Security: TLS credentials and the key/restriction/quota interceptor
        self.credentials, interceptors = security.grpc_transport(dataplane) if security else (None, [])
        options = channel_options(limits) + [("grpc.so_reuseport", 1 if reuse_port else 0)]  # workers share it
        self.server = grpc.aio.server(options=options, interceptors=interceptors or None)
        _add_inference_service(InferenceServicer(dataplane), self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME, _REFLECTION_V1]
        reflection.enable_server_reflection(names, self.server)
        self._add_reflection_v1(names)
        self._watch_task: asyncio.Task | None = None
        self.port = 0

    def _add_reflection_v1(self, names: list[str]) -> None:
        # grpcio-reflection ships only v1alpha; v1 is wire-identical, and grpcurl asks v1 first
        servicer = reflection.aio.ReflectionServicer(names)
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_REFLECTION_V1, {"ServerReflectionInfo": handler}),))

    async def start(self) -> None:
        self.port = (self.server.add_secure_port(self.address, self.credentials) if self.credentials
                     else self.server.add_insecure_port(self.address))
        if not self.port:
            raise OSError(f"cannot listen for gRPC on {self.address}")
        await self.server.start()
        await self.sync_health()
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())
        log.info("gRPC listening on %s", self.address.rsplit(":", 1)[0] + f":{self.port}")

    async def sync_health(self) -> None:
        ready = SERVING if self.dataplane.ready() else NOT_SERVING
        for service in ("", SERVICE, "readiness"):
            await self.health.set(service, ready)
        await self.health.set("liveness", SERVING if self.dataplane.live() else NOT_SERVING)

    async def _watch(self) -> None:
        # readiness can change without a request (loads and unloads under strict readiness): keep
        # health in step with each change; the app calls sync_health itself on start and drain
        changes = self.dataplane.changes
        seen = changes.count
        while True:
            seen = await changes.wait(seen)
            await self.sync_health()

    async def state_changed(self) -> None:
        if self.dataplane.draining:  # health answers NOT_SERVING from now on; calls still answer
            await self.health.enter_graceful_shutdown()
        else:
            await self.sync_health()

    async def stop(self, grace: float | None) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self.server.stop(grace)
