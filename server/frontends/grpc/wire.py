"""ModelInfer's messages without the protobuf copies of their tensor bytes.

A request's ``raw_input_contents`` are handed to the converters as memoryviews over the received
message (protobuf would copy each into its arena on parse and again into a Python ``bytes`` on
access); a response's ``raw_output_contents`` are written once, straight from the output arrays,
after the protobuf-serialized rest of the message. Field order does not matter on the protobuf wire,
and repeated fields keep their order, so both are byte-for-byte valid messages for any client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.protos import grpc_service_pb2 as pb

_RAW_INPUT = 7  # ModelInferRequest.raw_input_contents
_RAW_OUTPUT_KEY = bytes([(6 << 3) | 2])  # ModelInferResponse.raw_output_contents, length-delimited
# a message of more top-level fields than this is parsed by protobuf as a whole: its raw contents
# are small by construction, and a Python scan of millions of tiny fields would be slow
_MAX_SCANNED_FIELDS = 4096
# a smaller message is parsed by protobuf (upb) as a whole: copying its few raw bytes costs less
# than the Python field scan (add_sub's 170-byte request: 1 us against 6 us)
_MIN_SCANNED_BYTES = 64 * 1024


@dataclass(slots=True)
class RawInferRequest:
    """A ModelInferRequest whose raw_input_contents are views over the received bytes."""

    msg: pb.ModelInferRequest
    raw: list[memoryview] = field(default_factory=list)

    @property
    def raw_input_contents(self) -> list[memoryview]:
        return self.raw

    def __getattr__(self, name: str):  # model_name, inputs, parameters ... as on the message
        return getattr(self.msg, name)


@dataclass(slots=True)
class UnaryReply:
    """A ModelInferResponse as its protobuf header (no raw_output_contents) plus the raw blobs."""

    header: pb.ModelInferResponse
    blobs: list = field(default_factory=list)  # bytes-like, one per output, in output order


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _split(data: bytes) -> tuple[list[memoryview], list[memoryview]] | None:
    """(raw_input_contents views, the other fields' spans) or None when it is not worth scanning."""
    view = memoryview(data)
    end = len(view)
    pos = 0
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    fields = 0
    while pos < end:
        fields += 1
        if fields > _MAX_SCANNED_FIELDS:
            return None
        start = pos
        key, pos = _varint(view, pos, end)
        number, kind = key >> 3, key & 7
        if kind == 2:
            length, pos = _varint(view, pos, end)
            if pos + length > end:
                raise ValueError("truncated length-delimited field")
            if number == _RAW_INPUT:
                raw.append(view[pos : pos + length])
                pos += length
                continue
            pos += length
        elif kind == 0:
            _, pos = _varint(view, pos, end)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        else:  # groups are not used by this message: let protobuf report it
            return None
        if pos > end:
            raise ValueError("truncated field")
        rest.append(view[start:pos])
    return raw, rest


def parse_infer_request(data: bytes) -> RawInferRequest | pb.ModelInferRequest:
    """The request_deserializer of ModelInfer."""
    if len(data) < _MIN_SCANNED_BYTES:
        return pb.ModelInferRequest.FromString(data)
    try:
        split = _split(data)
    except ValueError:
        split = None  # malformed: protobuf's own parse raises its usual error
    if split is None:
        return pb.ModelInferRequest.FromString(data)
    raw, rest = split
    return RawInferRequest(pb.ModelInferRequest.FromString(b"".join(rest)), raw)


def serialize_infer_response(reply: UnaryReply | pb.ModelInferResponse) -> bytes:
    """The response_serializer of ModelInfer: the header, then each blob as raw_output_contents,
    joined into the one buffer grpc needs (the only copy of the tensor bytes made here)."""
    if not isinstance(reply, UnaryReply):
        return reply.SerializeToString()
    parts: list = [reply.header.SerializeToString()]
    for blob in reply.blobs:
        parts += (_RAW_OUTPUT_KEY, _encode_varint(len(blob)), blob)
    return b"".join(parts)
