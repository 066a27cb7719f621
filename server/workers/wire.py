"""The worker <-> engine frames: the header, the message kinds, and the small bodies (errors,
released blocks, parameters) every other module reads and writes with ``Writer`` / ``Reader``.

A frame is a 13-byte header (body length u32, kind u8, tag u64) and a body. Inference requests and
responses are encoded by codec.py (full form) and templates.py (short form of a repeated shape);
nothing is pickled. Control calls (load, unload, metadata, statistics, ...) carry JSON (calls.py).
"""

from __future__ import annotations

import struct
from typing import Any

from server.core.errors import ErrorCode, ServingError

HEAD = struct.Struct("<IBQ")  # body length, kind, tag
# the largest frame body a reader accepts unless told otherwise: a response may carry up to gRPC's
# largest message (2 GiB - 1) of outputs inline, plus its descriptors; the engine reads its workers'
# frames with a limit derived from the frontends' request limits (request_frame_limit)
MAX_FRAME = (2**31 - 1) + (16 << 20)
HELLO_MAX = 64 << 10  # before a connection said who it is: a HELLO is a few hundred bytes

# worker -> engine
INFER, CANCEL, RELEASE, CONTROL, PING, TRACE_END, HELLO, UP = 1, 2, 3, 4, 5, 6, 7, 8
TEMPLATE, INFER_FAST = 9, 10
# engine -> worker (RELEASE too: each side frees blocks of its own arena)
RESPONSE, ERROR, STATE, REPLY, PONG, STOP = 20, 21, 22, 23, 24, 25
RESPONSE_TEMPLATE, RESPONSE_FAST = 26, 27

U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
FINAL, FAILED = 1, 2
# a stream admission on the call channel starts with the worker's give-up time (time.monotonic(),
# one clock for every process of the machine): the engine refuses one it reads later, so a stream
# the worker already told its caller had failed never starts, whichever channel the engine reads first
ADMIT_BY = _F64

# trace kinds: how the engine rebuilds the caller's context (Tracing.from_grpc / from_http / a stream's)
TRACE_NONE, TRACE_GRPC, TRACE_HTTP, TRACE_STREAM = 0, 1, 2, 3


def request_frame_limit(grpc_max_message: int, http_max_input: int) -> int:
    """The largest frame a worker can have a reason to send: a request decoded from the largest
    message a frontend accepts (REST JSON can grow up to 4x: "0," becomes an 8-byte FP64), written
    inline, or a load call's ``file:`` contents in base64 (4/3), plus room for the descriptors."""
    return min(2 * max(grpc_max_message, 4 * http_max_input) + (16 << 20), 2**32 - 1)


def frame(kind: int, tag: int, body: bytes = b"") -> bytes:
    return HEAD.pack(len(body), kind, tag) + body


class Writer:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def str(self, text: str) -> None:
        raw = text.encode()
        self.parts.append(U32.pack(len(raw)))
        self.parts.append(raw)

    def params(self, params: dict) -> None:
        for key, value in params.items():
            self.str(key)
            if isinstance(value, bool):
                self.parts.append(b"b\x01" if value else b"b\x00")
            elif isinstance(value, int):
                if -(1 << 63) <= value < (1 << 63):
                    self.parts.append(b"i" + _I64.pack(value))
                else:  # a uint64 parameter past int64: its decimal text
                    self.parts.append(b"I")
                    self.str(str(value))
            elif isinstance(value, float):
                self.parts.append(b"f" + _F64.pack(value))
            else:
                self.parts.append(b"s")
                self.str(str(value))


class Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, st: struct.Struct) -> tuple:
        values = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return values

    def str(self) -> str:
        (n,) = U32.unpack_from(self.data, self.pos)
        start = self.pos + 4
        self.pos = start + n
        if self.pos > len(self.data):
            raise ValueError("string past the end of the frame")
        return self.data[start:self.pos].decode()

    def params(self, count: int) -> dict:
        out: dict[str, Any] = {}
        data = self.data
        for _ in range(count):
            key = self.str()
            tag = data[self.pos:self.pos + 1]
            self.pos += 1
            if tag == b"b":
                out[key] = data[self.pos] != 0
                self.pos += 1
            elif tag == b"i":
                out[key] = _I64.unpack_from(data, self.pos)[0]
                self.pos += 8
            elif tag == b"f":
                out[key] = _F64.unpack_from(data, self.pos)[0]
                self.pos += 8
            elif tag == b"I":
                out[key] = int(self.str())
            elif tag == b"s":
                out[key] = self.str()
            else:
                raise ValueError(f"unknown parameter tag {tag!r}")
        return out


def error_body(error: BaseException) -> bytes:
    w = Writer()
    if isinstance(error, ServingError):
        w.str(error.code.name)
        w.str(error.message)
    else:
        w.str("INTERNAL")
        w.str(f"internal error: {type(error).__name__}: {error}")
    return b"".join(w.parts)


def error_from(code: str, message: str) -> ServingError:
    try:
        return ServingError(ErrorCode[code], message)
    except KeyError:
        return ServingError(ErrorCode.INTERNAL, message)


def decode_error(body: bytes) -> ServingError:
    r = Reader(body)
    return error_from(r.str(), r.str())


def offsets(body: bytes) -> list[int]:
    """A RELEASE body: the freed block offsets."""
    return list(struct.unpack(f"<{len(body) // 8}q", body))


def release_body(blocks: list[int]) -> bytes:
    return struct.pack(f"<{len(blocks)}q", *blocks)
