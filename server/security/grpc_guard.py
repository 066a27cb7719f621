"""The gRPC side: one server interceptor that checks the API key and the restricted protocols from the
call's metadata (before the request message is even parsed), then wraps the handler so that quotas
are taken before the servicer runs: for ModelInfer on the parsed message's ``model_name``, before
any tensor is decoded."""

from __future__ import annotations

import grpc

from .access import GRPC_CATEGORY
from .policy import Caller, Security
from .quotas import Rejection
from .tenant import AUTHENTICATED

_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
PUSHBACK = "grpc-retry-pushback-ms"
UNAUTHENTICATED = "missing or invalid API key: send the metadata 'authorization: Bearer <key>'"


def _address(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' / 'ipv6:[::1]:5000' -> the address without the port."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return host.strip("[]")
    return peer


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in details.invocation_metadata or ():
        if isinstance(value, str):  # "-bin" keys carry bytes: no header of ours ends in -bin
            out.setdefault(key, value)
    return out


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
             trailer: tuple | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind that only answers ``code``: the request is never parsed, a stream
    never read."""

    async def refuse(request, context):
        del request  # the abort's exception keeps this frame alive: it must not hold the request's bytes
        if trailer:
            context.set_trailing_metadata(trailer)
        await context.abort(code, message)

    async def refuse_stream(request, context):
        del request
        if trailer:
            context.set_trailing_metadata(trailer)
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as stream handlers are

    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(refuse_stream if handler.response_streaming else refuse,
                response_serializer=handler.response_serializer)


class _NoTicket:
    def release(self) -> None:
        pass


_NO_TICKET = _NoTicket()


class _Admitted:
    """Wraps a handler's behaviour: quotas taken first, released when the call ends."""

    def __init__(self, security: Security, dataplane, tenant: str | None, model_infer: bool,
                 quota: bool = True) -> None:
        self.security = security
        self.dataplane = dataplane
        self.tenant = tenant
        self.model_infer = model_infer
        self.quota = quota  # False: only the authenticated tenant is passed on

    def _decide(self, request, context):
        if not self.quota:
            return _NO_TICKET
        caller = Caller(self.tenant, _address(context.peer()))
        if self.model_infer:
            return self.security.admit(caller, self.dataplane, request.model_name, request.model_version)
        return self.security.admit(caller)

    @staticmethod
    async def _refuse(decision: Rejection, context) -> None:
        context.set_trailing_metadata(((PUSHBACK, str(decision.retry_after_ms)),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, decision.message)

    def unary(self, behavior):
        async def call(request, context):
            ticket = self._decide(request, context)
            if isinstance(ticket, Rejection):
                del request  # the abort's exception keeps this frame: it must not hold the request
                await self._refuse(ticket, context)
            token = AUTHENTICATED.set(self.tenant)  # the caller identity of cost and metrics
            try:
                return await behavior(request, context)
            finally:
                AUTHENTICATED.reset(token)
                ticket.release()
        return call

    def streaming(self, behavior):
        async def call(request, context):
            ticket = self._decide(request, context)
            if isinstance(ticket, Rejection):
                await self._refuse(ticket, context)
            AUTHENTICATED.set(self.tenant)  # this async generator runs in the call's own task
            try:
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:  # a coroutine that writes with context.write
                    await result
            finally:
                ticket.release()
        return call


def _wrap(handler: grpc.RpcMethodHandler, admitted: _Admitted) -> grpc.RpcMethodHandler:
    common = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(admitted.unary(handler.unary_unary), **common)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(admitted.unary(handler.stream_unary), **common)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(admitted.streaming(handler.unary_stream), **common)
    return grpc.stream_stream_rpc_method_handler(admitted.streaming(handler.stream_stream), **common)


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    """Health RPCs (Triton's "health" group) need no key and take no quota, so probes always work;
    every other RPC, reflection included, does."""

    def __init__(self, security: Security, dataplane) -> None:
        self.security = security
        self.dataplane = dataplane

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        group = GRPC_CATEGORY.get(method)
        s = self.security
        metadata = _metadata(details)
        tenant = None
        if group != "health":
            allowed, tenant = s.authenticate(metadata.get("authorization"))
            if not allowed:
                s.rejected("unauthenticated", "anonymous")
                return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        header = s.grpc_rules.denied(group, metadata.get)
        if header is not None:
            s.rejected("restricted", tenant or "anonymous")
            return _refusal(handler, grpc.StatusCode.UNAVAILABLE,
                            f"This protocol is restricted, expecting header '{header}'")
        model_infer = method == _MODEL_INFER  # a model's own limit (config parameter) applies too
        quota = group != "health" and (s.quotas.per_caller or model_infer)
        if not quota and tenant is None:
            return handler
        return _wrap(handler, _Admitted(s, self.dataplane, tenant, model_infer, quota))
