"""The REST frontend: an aiohttp low-level server on the running event loop (the one grpc.aio uses).

Transport work lives here: routing, reading and decompressing bodies, compressing and sending
replies, mapping errors to ``{"error": ...}`` with the statuses of server/frontends/status.py.

Why aiohttp's low-level ``web.Server`` (measured, not assumed). Each stack served the same handler
(read the body, parse the JSON header by Inference-Header-Content-Length, answer JSON + a 128-byte
blob, i.e. add_sub's REST-binary shape) to a closed loop of 16 keep-alive connections, on this
2-core machine while other jobs ran; server CPU per request is the steadier number:

    stack                              req/s (2-4 runs)    server CPU / request
    aiohttp web.Application + router   1700-4600           ~270 us
    aiohttp low-level web.Server       1300-5200           ~215 us
    uvicorn (httptools) + starlette    1200-4400           ~225 us
    uvicorn (httptools), raw ASGI      1000-4700           ~175-210 us
    hand-written httptools protocol    1000-10300          ~95-120 us

The whole gRPC inference path of ``simple`` costs ~1000 us of server CPU per request here, so the
~100 us a bare httptools protocol saves is ~10% end to end, while it would make this project own an
HTTP/1.1 server (pipelining, Expect: 100-continue, chunked bodies, flow control, timeouts, graceful
shutdown). aiohttp's low-level server is the fastest complete one, needs no ASGI layer, starts on
the running loop, and is already a dependency (the metrics endpoint). On the full path
(scripts/bench_rest.py, concurrency 16) REST-binary costs the server ~430 us per add_sub request
against gRPC's ~935 us, and ~8.7 ms against ~19 ms per 4 MiB FP32 request (docs/rest.md).
"""

from __future__ import annotations

import asyncio
import logging
import zlib

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from server.core.errors import ServingError, invalid
from server.dataplane import DataPlane
from server.frontends.status import http_status

from . import converters
from .routes import Call, HttpError, Reply, Router

log = logging.getLogger(__name__)

# bodies larger than this are (de)compressed in a worker thread (zlib releases the GIL): the event
# loop keeps serving other requests meanwhile
_THREAD_BYTES = 1 << 20
# replies larger than this are written part by part instead of joined into one buffer first
_STREAM_BYTES = 1 << 20
# deflate is zlib-wrapped (what tritonclient and Triton use); gzip adds its own header
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _decompress(data: bytes, encoding: str, limit: int) -> bytes:
    def inflate(wbits: int) -> bytes:
        engine = zlib.decompressobj(wbits)
        out = engine.decompress(data, limit + 1)  # bounded: a small bomb cannot fill the memory
        if len(out) > limit:
            raise invalid(f"the decompressed request body exceeds the limit of {limit} bytes")
        if not engine.eof:
            raise invalid(f"the {encoding} request body is truncated")
        return out

    try:
        return inflate(_WBITS[encoding])
    except zlib.error as exc:
        if encoding == "deflate":  # some clients send raw deflate without the zlib wrapper
            try:
                return inflate(-zlib.MAX_WBITS)
            except zlib.error:
                pass
        raise invalid(f"the request body is not valid {encoding} data: {exc}") from None


def _compress(data: bytes, encoding: str) -> bytes:
    # level 1: tensors compress little more at higher levels and cost several times the CPU
    engine = zlib.compressobj(1, zlib.DEFLATED, _WBITS[encoding])
    return engine.compress(data) + engine.flush()


def _accepted_encoding(header: str | None) -> str | None:
    """gzip or deflate when the client accepts one (q > 0), gzip first; else None."""
    if not header:
        return None
    accepted = set()
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        q = params.strip()
        if q.startswith("q="):
            try:
                if float(q[2:]) <= 0:
                    continue
            except ValueError:
                continue
        accepted.add(name.strip().lower())
    for encoding in ("gzip", "deflate"):
        if encoding in accepted:
            return encoding
    return None


class _ClientGone(Exception):
    pass


class _ProtocolLogger:
    """aiohttp's per-connection logger. A request its parser rejects (aiohttp answers 400 itself) is
    the client's mistake: one warning line, not an error with a traceback."""

    def __init__(self) -> None:
        self._log = logging.getLogger(__name__ + ".protocol")

    def exception(self, msg: str, *args, exc_info=None, **kwargs) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self._log.warning("malformed HTTP request: %s", " ".join(str(exc_info.message).split()))
        else:
            self._log.error(msg, *args, exc_info=exc_info or True, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._log, name)


def error_reply(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, [converters.dumps({"error": message})], headers=headers or {})


class HttpFrontend:
    def __init__(self, dataplane: DataPlane, host: str, port: int, max_body_bytes: int,
                 reuse_port: bool = False) -> None:
        self.dataplane = dataplane
        self.reuse_port = reuse_port  # frontend workers share the port
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.router = Router()
        self._runner: web.ServerRunner | None = None

    async def start(self) -> None:
        # auto_decompress off: Content-Encoding is handled here, with limits and clear errors;
        # read_bufsize 1 MiB: large tensors arrive with few flow-control pauses
        server = web.Server(
            self._handle,
            auto_decompress=False,
            access_log=None,
            read_bufsize=1 << 20,
            logger=_ProtocolLogger(),
            # a client that disconnects cancels its handler: its queued request leaves the queue,
            # a running stream is cancelled in the backend
            handler_cancellation=True,
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, shutdown_timeout=1.0,
                           reuse_port=self.reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen for HTTP on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        self.port = self._runner.addresses[0][1]
        log.info("HTTP listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise invalid(
                f"the request body of {request.content_length} bytes exceeds the limit of {limit} bytes"
            )
        chunks, size = [], 0
        try:
            while chunk := await request.content.readany():
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise invalid(f"the request body exceeds the limit of {limit} bytes")
        except HttpProcessingError as exc:  # e.g. the body ended before its Content-Length
            raise invalid(f"the request body could not be read: {exc.message}") from None
        except ConnectionResetError:  # the client left mid-body: nobody to answer
            raise _ClientGone from None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in _WBITS:
            raise invalid(f"unsupported Content-Encoding '{encoding}': use gzip, deflate or identity")
        if len(body) > _THREAD_BYTES:
            return await asyncio.to_thread(_decompress, body, encoding, limit)
        return _decompress(body, encoding, limit)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            handler, groups = self.router.match(request.method, request.raw_path.partition("?")[0])
            body = await self._read_body(request) if request.method == "POST" else b""
            reply = await handler(self.dataplane, Call(groups, request.headers, body))
        except ServingError as exc:
            reply = error_reply(http_status(exc.code), exc.message)
        except HttpError as exc:
            reply = error_reply(exc.status, exc.message, exc.headers)
        except _ClientGone:
            return web.Response(status=400)  # aiohttp drops it: the connection is closed
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            reply = error_reply(500, f"internal error: {type(exc).__name__}: {exc}")
        return await self._send(request, reply)

    async def _send(self, request: web.BaseRequest, reply: Reply) -> web.StreamResponse:
        if reply.events is not None:
            return await self._send_events(request, reply)
        headers = {"Content-Type": reply.content_type, **reply.headers}
        parts = reply.parts
        size = sum(len(p) for p in parts)
        encoding = _accepted_encoding(request.headers.get("Accept-Encoding"))
        if encoding is not None:
            body = b"".join(parts)
            body = (
                await asyncio.to_thread(_compress, body, encoding)
                if size > _THREAD_BYTES
                else _compress(body, encoding)
            )
            headers["Content-Encoding"] = encoding
            return web.Response(status=reply.status, body=body, headers=headers)
        if len(parts) == 1 or size <= _STREAM_BYTES:
            return web.Response(status=reply.status, body=b"".join(parts), headers=headers)
        # large tensors: no joined copy of the whole reply, each blob goes out as it is
        response = web.StreamResponse(status=reply.status, headers=headers)
        response.content_length = size
        await response.prepare(request)
        for part in parts:
            await response.write(part)
        await response.write_eof()
        return response

    async def _send_events(self, request: web.BaseRequest, reply: Reply) -> web.StreamResponse:
        """A server-sent event stream: each chunk as it comes (chunked encoding, no compression).
        The handler is cancelled when the client disconnects; ``reply.close`` then cancels the request."""
        response = web.StreamResponse(status=reply.status, headers={"Content-Type": reply.content_type,
                                                                     "Cache-Control": "no-cache",
                                                                     **reply.headers})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            async for chunk in reply.events:
                await response.write(chunk)
            await response.write_eof()
        finally:
            if reply.close is not None:
                reply.close()
            await reply.events.aclose()
        return response
