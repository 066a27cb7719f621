"""The transport limits each frontend enforces (docs/limits.md): sizes, timeouts and connection caps.

Plain values, built by the app from the settings, so the frontends never read flags themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class HttpLimits:
    # the largest request body, before and after Content-Encoding is undone (Triton's flag and default)
    max_input_size: int = 64 * MiB
    # a request's head (request line + headers) must arrive within this many seconds of its first byte
    header_timeout: float = 10.0
    # an idle keep-alive connection (or a new one that sends nothing) is closed after this many seconds
    keepalive_timeout: float = 30.0
    # a request body that pauses longer than this between two reads is abandoned (408)
    read_timeout: float = 30.0
    # open connections at most; a connection beyond it is answered 503 and closed
    max_connections: int = 1000


@dataclass(frozen=True, slots=True)
class GrpcLimits:
    # the largest request message (responses are bounded by what the models produce)
    max_receive_bytes: int = 256 * MiB
    max_send_bytes: int = 2**31 - 1
    # concurrent calls (HTTP/2 streams) per connection; further ones wait in the client
    max_concurrent_streams: int = 128
    # server keepalive pings while calls are open; a peer that does not answer one within the timeout
    # (a client that stopped reading its socket) loses the connection and what it held
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    # a connection without any call for this long is closed (GOAWAY; clients reconnect on demand)
    max_connection_idle_ms: int = 300_000
