"""Builds the grpc.aio server: inference service, standard health (Check/Watch) and reflection."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server.dataplane import DataPlane
from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc

from .servicer import InferenceServicer

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcFrontend:
    def __init__(self, dataplane: DataPlane, address: str, max_message_bytes: int, reuse_port: bool = False) -> None:
        self.dataplane = dataplane
        self.address = address
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),  # frontend workers share the port
        ]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane), self.server)
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
        self.port = self.server.add_insecure_port(self.address)
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

    async def stop(self, grace: float | None) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self.server.stop(grace)
