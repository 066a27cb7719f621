"""ModelStreamInfer as Triton answers it (reference: generative.md §1.3-§1.4).

Every request read from the stream is issued at once. A non-decoupled model's responses are
written in the order the requests were read; a decoupled model's as they are produced,
interleaved, correlated by ``id``. Every written response carries ``triton_final_response``. A
flags-only final is written only when the request asked for it (``triton_enable_empty_final_response``).
Errors are in-band and the stream goes on, unless the client opened the stream with the metadata
``triton_grpc_error: true``: then the first error ends the call with its status. Cancelling the
call cancels every request of the stream in the backend; a half-close ends the call with OK once
every request has its final response.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable

import grpc

from server.core.errors import unavailable
from server.core.stream import MAX_PENDING
from server.core.types import InferResponse
from server.dataplane import DataPlane
from server.frontends import identity
from server.protos import grpc_service_pb2 as pb

from . import converters

log = logging.getLogger(__name__)

SHUTTING_DOWN = "GRPC server is shutting down and has stopped accepting new requests."
_END = object()


class _Slot:
    """A non-decoupled request's place in the write order."""

    __slots__ = ("done", "messages")

    def __init__(self) -> None:
        self.done = False
        self.messages: list[pb.ModelStreamInferResponse] = []


def _grpc_error_mode(context) -> bool:
    for key, value in context.invocation_metadata() or ():
        if key == "triton_grpc_error" and isinstance(value, str):
            return value.lower() == "true"
    return False


def _final_flag(response: pb.ModelInferResponse, final: bool) -> None:
    response.parameters["triton_final_response"].bool_param = final


class StreamInfer:
    def __init__(self, dataplane: DataPlane, status_of: Callable[[BaseException, str], tuple]) -> None:
        self.dp = dataplane
        self._status_of = status_of

    async def __call__(self, request_iterator, context):
        call = _Call(self.dp, self._status_of, _grpc_error_mode(context))
        call.lookup = identity.grpc_lookup(context.invocation_metadata())  # routing key and caller
        stream_trace = self.dp.trace_grpc(context.invocation_metadata(), stream=True) if self.dp.tracing_on else None
        reader = asyncio.ensure_future(call.read(request_iterator, stream_trace))
        try:
            while True:
                item = await call.out.get()
                if item is _END:
                    break
                if isinstance(item, tuple):  # triton_grpc_error: the first error ends the call
                    await context.abort(*item)
                yield item
            await reader
        finally:
            reader.cancel()
            call.cancel_all()
            if stream_trace is not None:
                stream_trace.end()


class _Call:
    """One ModelStreamInfer call's state."""

    def __init__(self, dp: DataPlane, status_of, grpc_error: bool) -> None:
        self.dp = dp
        self.status_of = status_of
        self.grpc_error = grpc_error
        self.out: asyncio.Queue = asyncio.Queue()
        self.ordered: deque[_Slot] = deque()
        self.streams: set = set()
        self.pumps: set[asyncio.Task] = set()
        self.failed = False
        self.lookup: identity.Lookup = lambda _key: None

    async def read(self, request_iterator, stream_trace) -> None:
        try:
            async for message in request_iterator:
                if self.failed:
                    break
                self.issue(message, stream_trace)
            if self.pumps:
                await asyncio.gather(*list(self.pumps), return_exceptions=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the transport failed while reading: end the call with its status
            self.fail(self.status_of(exc, "ModelStreamInfer"))
            return
        self.out.put_nowait(_END)

    def issue(self, message: pb.ModelInferRequest, stream_trace) -> None:
        try:
            request = converters.to_request(message)
            identity.tag(request, self.lookup)
            if self.dp.draining:
                raise unavailable(SHUTTING_DOWN)
            if stream_trace is not None:
                request.trace = stream_trace.child(request.model_name)
            stream = self.dp.stream(request)
        except Exception as exc:
            code, text = self.status_of(exc, "ModelStreamInfer")
            if self.grpc_error:
                self.fail((code, text))
            else:  # an error before the request was issued: only its id comes back
                self.out.put_nowait(pb.ModelStreamInferResponse(error_message=text,
                                                                infer_response=pb.ModelInferResponse(id=message.id)))
            return
        slot = None
        if not stream.decoupled:
            slot = _Slot()
            self.ordered.append(slot)
        self.streams.add(stream)
        task = asyncio.ensure_future(self.pump(stream, message, slot))
        self.pumps.add(task)
        task.add_done_callback(self.pumps.discard)

    async def pump(self, stream, message: pb.ModelInferRequest, slot: _Slot | None) -> None:
        try:
            async for response in stream:
                written = self.render(response, message, stream)
                if written is None:
                    continue
                if slot is None:
                    if self.out.qsize() >= MAX_PENDING:  # the client stopped reading: end the call
                        self.fail((grpc.StatusCode.RESOURCE_EXHAUSTED, "the client is not reading its "
                                   f"responses: {MAX_PENDING} are waiting; the stream's requests were cancelled"))
                        return
                    self.out.put_nowait(written)
                else:
                    slot.messages.append(written)
        except Exception as exc:  # a bug while rendering: this request fails in-band, the stream goes on
            code, text = self.status_of(exc, "ModelStreamInfer response")
            if self.grpc_error:
                self.fail((code, text))
            else:
                failed = pb.ModelStreamInferResponse(error_message=text,
                                                     infer_response=pb.ModelInferResponse(id=message.id))
                (slot.messages.append if slot is not None else self.out.put_nowait)(failed)
        finally:
            self.streams.discard(stream)
            if slot is not None:
                slot.done = True
                while self.ordered and self.ordered[0].done:
                    for written in self.ordered.popleft().messages:
                        self.out.put_nowait(written)

    def render(self, response: InferResponse, message: pb.ModelInferRequest, stream) -> Any:
        # a non-decoupled model has one response, final by definition
        final = response.final or not stream.decoupled
        if response.error is not None:
            code, text = self.status_of(response.error, "ModelStreamInfer")
            if self.grpc_error:
                self.fail((code, text))
                return None
            infer = pb.ModelInferResponse(id=message.id, model_name=message.model_name,
                                          model_version=message.model_version)
            _final_flag(infer, response.final)
            return pb.ModelStreamInferResponse(error_message=text, infer_response=infer)
        if not response.outputs and not response.parameters and response.final:
            if not stream.decoupled or not stream.empty_final:
                return None  # a flags-only final is written only on request
            infer = pb.ModelInferResponse(id=message.id, model_name=message.model_name,
                                          model_version=message.model_version)
            _final_flag(infer, True)
            return pb.ModelStreamInferResponse(infer_response=infer)
        infer = converters.from_response(response)
        _final_flag(infer, final)
        return pb.ModelStreamInferResponse(infer_response=infer)

    def fail(self, status: tuple[grpc.StatusCode, str]) -> None:
        if not self.failed:
            self.failed = True
            self.cancel_all()
            self.out.put_nowait(status)

    def cancel_all(self) -> None:
        for stream in list(self.streams):
            stream.cancel()
        for task in list(self.pumps):
            task.cancel()
