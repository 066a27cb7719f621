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

from server.core import sockets
from server.core.errors import ServingError, invalid
from server.dataplane import DataPlane
from server.limits import HttpLimits
from server.frontends.status import http_status

from . import connections, converters
from .openai import ROUTES as OPENAI_ROUTES
from .routes import ROUTES, Call, HttpError, Reply, Router

log = logging.getLogger(__name__)

# bodies larger than this are (de)compressed in a worker thread (zlib releases the GIL): the event
# loop keeps serving other requests meanwhile. Compressed bodies go to the thread from 64 KiB on:
# at deflate's ~1000:1 a small body can inflate to the whole --http-max-input-size
_THREAD_BYTES = 1 << 20
_INFLATE_THREAD_BYTES = 64 << 10
# a body up to this size that arrived whole is taken at once (the chunks joined: bounded by this)
_WHOLE_BYTES = 64 << 10
# replies larger than this are written part by part instead of joined into one buffer first
_STREAM_BYTES = 1 << 20
# stopping: a connection is closed once it was quiet this long (a client that just connected, or
# just got its answer, has its next request on the way), and all are closed after _CLOSE_GRACE
_QUIET_BEFORE_CLOSE = 0.25
_CLOSE_GRACE = 2.0
# deflate is zlib-wrapped (what tritonclient and Triton use); gzip adds its own header
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def too_large(what: str, limit: int) -> HttpError:
    return HttpError(413, f"{what} exceeds the maximum allowed input size of {limit} bytes; "
                          "use --http-max-input-size to increase the limit")


def _inflate(data: bytes | bytearray, wbits: int, limit: int) -> tuple[bytearray | None, bool]:
    """(output, complete); output None when it would exceed ``limit``. Inflated 1 MiB at a time into
    one growing buffer, so the peak is the output plus a step (zlib's own bounded ``max_length``
    output is assembled from blocks and joined at the end: twice the output for a moment)."""
    engine = zlib.decompressobj(wbits)
    out = bytearray()
    pending: bytes | bytearray = data
    while True:
        piece = engine.decompress(pending, 1 << 20)
        out += piece
        if len(out) > limit:
            return None, True
        pending = engine.unconsumed_tail
        if engine.eof or (not piece and not pending):
            return out, engine.eof


def _decompress(data: bytes | bytearray, encoding: str, limit: int) -> bytearray:
    # errors are raised here, outside the frame holding the output, and carry no reference to it
    try:
        out, complete = _inflate(data, _WBITS[encoding], limit)
    except zlib.error as exc:
        message = str(exc)
        if encoding != "deflate":
            raise invalid(f"the request body is not valid {encoding} data: {message}") from None
        try:  # some clients send raw deflate without the zlib wrapper
            out, complete = _inflate(data, -zlib.MAX_WBITS, limit)
        except zlib.error:
            raise invalid(f"the request body is not valid {encoding} data: {message}") from None
    if out is None:
        raise too_large(f"the decompressed ({encoding}) request body", limit)
    if not complete:
        raise invalid(f"the {encoding} request body is truncated")
    return out


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


class _Unread(Exception):
    """The reply is sent without reading the rest of the body: the connection closes after it."""

    def __init__(self, error: HttpError) -> None:
        self.error = error


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
    def __init__(self, dataplane: DataPlane, host: str, port: int, limits: HttpLimits, security=None,
                 reuse_port: bool = False) -> None:
        self.dataplane = dataplane
        self.reuse_port = reuse_port  # frontend workers share the port
        self.host = host
        self.port = port
        self.limits = limits
        self.router = Router(ROUTES + OPENAI_ROUTES)
        self._runner: web.ServerRunner | None = None
        self._site: web.BaseSite | None = None
        self._server: connections.LimitedServer | None = None
        self.security = security  # server.security.Security: TLS, and the checks before a route runs

    async def start(self) -> None:
        # auto_decompress off: Content-Encoding is handled here, with limits and clear errors;
        # read_bufsize 1 MiB: large tensors arrive with few flow-control pauses
        ssl_context, handle = (self.security.http_transport(self._handle, self.dataplane)
                               if self.security else (None, self._handle))
        server = self._server = connections.LimitedServer(
            handle,
            limits_=self.limits,
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
        try:
            sock = sockets.listen(self.host, self.port, reuse_port=self.reuse_port)
            site = self._site = web.SockSite(self._runner, sock, shutdown_timeout=1.0, ssl_context=ssl_context)
            await site.start()
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen for HTTP on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        sockets.quiet_accept_errors(asyncio.get_running_loop())
        self.port = self._runner.addresses[0][1]
        log.info("HTTP listening on %s:%d", self.host, self.port)

    async def state_changed(self) -> None:
        """Nothing to publish: readiness is read per probe, and while draining every answer carries
        Connection: close."""

    async def stop(self, grace: float = 1.0) -> None:
        """Stop listening, let each keep-alive connection finish the request it has (answered with
        ``Connection: close`` while the server drains), close the quiet ones, then clean up."""
        if self._site is not None:
            await self._site.stop()
        if self._server is not None:
            await connections.close_gracefully(self._server, _QUIET_BEFORE_CLOSE, _CLOSE_GRACE)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _read_body(self, request: web.BaseRequest) -> bytes | bytearray:
        limit = self.limits.max_input_size
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in _WBITS and encoding not in ("", "identity"):
            raise invalid(f"unsupported Content-Encoding '{encoding}': use gzip, deflate or identity")
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _Unread(too_large(f"the request body of {declared} bytes", limit))
        body = await self._receive(request, declared, limit)
        if encoding in ("", "identity"):
            return body
        if len(body) > _INFLATE_THREAD_BYTES:
            return await asyncio.to_thread(_decompress, body, encoding, limit)
        return _decompress(body, encoding, limit)

    async def _receive(self, request: web.BaseRequest, declared: int | None, limit: int) -> bytes | bytearray:
        """The body, grown chunk by chunk into one buffer (no list of chunks joined afterwards, which
        would hold the body twice). Never sized from Content-Length up front: a client that declares
        64 MiB and trickles bytes must not pin 64 MiB it has not sent."""
        timeout = self.limits.read_timeout
        content = request.content
        if declared is not None and declared <= _WHOLE_BYTES and content.is_eof():
            # the usual small request: aiohttp parsed the whole body before this handler ran, so it
            # is taken in one call, without the per-read timer (-4% of server CPU at add_sub c=16)
            try:
                body = content.read_nowait()
            except HttpProcessingError as exc:
                raise invalid(f"the request body could not be read: {exc.message}") from None
            if len(body) != declared:
                raise invalid(f"the request body ended after {len(body)} of its {declared} bytes")
            return body
        body = bytearray()
        size = 0
        try:
            while True:
                try:  # one timer moved per read (asyncio.timeout, not a task per read as wait_for)
                    async with asyncio.timeout(timeout):
                        chunk = await content.readany()
                except TimeoutError:
                    raise _Unread(HttpError(408, f"the request body stopped arriving for {timeout:g} s "
                                                 "(--http-read-timeout-secs)")) from None
                if not chunk:
                    break
                end = size + len(chunk)
                if end > limit:
                    raise _Unread(too_large("the request body", limit))
                body += chunk
                size = end
        except HttpProcessingError as exc:  # e.g. the body ended before its Content-Length
            raise invalid(f"the request body could not be read: {exc.message}") from None
        except ConnectionResetError:  # the client left mid-body: nobody to answer
            raise _ClientGone from None
        if declared and size != declared:
            raise invalid(f"the request body ended after {size} of its {declared} bytes")
        return body

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        connections.started(request)
        try:
            return await self._answer(request)
        finally:
            connections.finished(request)

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        close = False
        try:
            handler, groups = self.router.match(request.method, request.raw_path.partition("?")[0])
            body = await self._read_body(request) if request.method == "POST" else b""
            reply = await handler(self.dataplane, Call(groups, request.headers, body))
        except ServingError as exc:
            reply = error_reply(http_status(exc.code), exc.message)
        except HttpError as exc:
            reply = error_reply(exc.status, exc.message, exc.headers)
        except _Unread as exc:  # the rest of the body is not worth reading: answer, then close
            reply, close = error_reply(exc.error.status, exc.error.message), True
        except _ClientGone:
            return web.Response(status=400)  # aiohttp drops it: the connection is closed
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            reply = error_reply(500, f"internal error: {type(exc).__name__}: {exc}")
        response = await self._send(request, reply)
        if close or self.dataplane.draining:  # draining: the client must not send here again
            response.force_close()
        return response

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
