"""The worker <-> engine wire format: frames, and the binary codec of requests and responses.

A frame is a 13-byte header (body length u32, kind u8, tag u64) and a body. Inference requests and
responses are encoded by hand (struct) - nothing is pickled; tensor bytes are not in the frame but
in the sender's shared-memory arena, one block per message, described by (offset, size) per tensor.
A tensor that does not fit in the arena travels inline at the end of the body instead. Control
calls (load, unload, metadata, statistics, ...) carry JSON, off the hot path.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from server.core import dtypes
from server.core.errors import ErrorCode, ServingError
from server.core.types import InferRequest, InferResponse, RequestedOutput, Tensor

from .arena import Allocator, align

HEAD = struct.Struct("<IBQ")  # body length, kind, tag
MAX_BODY = 1 << 31

# worker -> engine
INFER, CANCEL, RELEASE, CONTROL, PING, TRACE_END, HELLO, UP = 1, 2, 3, 4, 5, 6, 7, 8
TEMPLATE, INFER_FAST = 9, 10
# engine -> worker (RELEASE too: each side frees blocks of its own arena)
RESPONSE, ERROR, STATE, REPLY, PONG, STOP = 20, 21, 22, 23, 24, 25
RESPONSE_TEMPLATE, RESPONSE_FAST = 26, 27

_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
FINAL, FAILED = 1, 2

# trace kinds: how the engine rebuilds the caller's context (Tracing.from_grpc / from_http / a stream's)
TRACE_NONE, TRACE_GRPC, TRACE_HTTP, TRACE_STREAM = 0, 1, 2, 3


def frame(kind: int, tag: int, body: bytes = b"") -> bytes:
    return HEAD.pack(len(body), kind, tag) + body


class _Writer:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def str(self, text: str) -> None:
        raw = text.encode()
        self.parts.append(_U32.pack(len(raw)))
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
        (n,) = _U32.unpack_from(self.data, self.pos)
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


# ---------------------------------------------------------------- tensor payloads


def _payload(tensor: Tensor) -> np.ndarray | bytes:
    if tensor.datatype == "BYTES":
        return dtypes.serialize_bytes(np.asarray(tensor.data, dtype=object))
    target = dtypes.NUMPY_DTYPES.get(tensor.datatype)
    data = np.asarray(tensor.data)
    if target is not None and data.dtype != target:
        data = data.astype(target)
    return data


def _nbytes(payload: np.ndarray | bytes) -> int:
    return payload.nbytes if isinstance(payload, np.ndarray) else len(payload)


def place(payloads: list, buf: memoryview, allocator: Allocator) -> tuple[int, int, list[int], list[bytes]]:
    """Write ``payloads`` into one arena block (offset, size, offsets within it); when they do not
    fit, lay them out for the inline tail instead (offset -1, tail parts)."""
    rels, total = [], 0
    for p in payloads:
        rels.append(total)
        total += align(_nbytes(p))
    if not payloads or total == 0:
        return -1, 0, rels, []
    block = allocator.alloc(total)
    if block < 0:
        tail: list[bytes] = []
        rels, pos = [], 0
        for p in payloads:
            raw = p if isinstance(p, bytes) else np.ascontiguousarray(p).tobytes()
            rels.append(pos)
            tail.append(raw)
            pos += len(raw)
        return -1, 0, rels, tail
    for p, rel in zip(payloads, rels):
        start = block + rel
        if isinstance(p, bytes):
            buf[start:start + len(p)] = p
        elif p.nbytes:
            if not p.flags.c_contiguous:
                p = np.ascontiguousarray(p)
            buf[start:start + p.nbytes] = memoryview(p).cast("B")  # the one copy of these bytes
    return block, total, rels, []


class Views:
    """Reads one message's tensors in place: from the peer's arena block, or the frame's inline tail.
    ``root`` is the one array every tensor view hangs from: when it is collected, the block is free."""

    __slots__ = ("root", "block", "__weakref__")

    def __init__(self, buf: memoryview, block: int, size: int, tail: bytes, tail_start: int) -> None:
        self.block = block
        if block >= 0:
            if size <= 0 or block + size > len(buf):
                raise ValueError(f"block [{block}, {block + size}) is outside the arena")
            self.root = np.frombuffer(buf, dtype=np.uint8, count=size, offset=block)
        elif tail_start < len(tail):
            self.root = np.frombuffer(tail, dtype=np.uint8, offset=tail_start)
        else:
            self.root = np.empty(0, dtype=np.uint8)

    def array(self, name: str, datatype: str, shape: list[int], rel: int, nbytes: int) -> np.ndarray:
        if rel < 0 or nbytes < 0 or rel + nbytes > len(self.root):
            raise ValueError(f"tensor '{name}' [{rel}, {rel + nbytes}) is outside its message")
        if datatype == "BYTES":
            raw = self.root[rel:rel + nbytes]
            return dtypes.deserialize_bytes(name, raw.data, dtypes.num_elements(shape)).reshape(shape)
        dtype = dtypes.NUMPY_DTYPES.get(datatype)
        if dtype is None:
            raise ServingError(ErrorCode.INVALID_ARGUMENT,
                               f"input '{name}' has unknown datatype '{datatype}'")
        if nbytes != dtypes.num_elements(shape) * dtype.itemsize:
            raise ValueError(f"tensor '{name}': {nbytes} bytes for shape {shape} of {datatype}")
        return np.ndarray(shape, dtype, buffer=self.root, offset=rel)  # a view: its base is the root


# ---------------------------------------------------------------- descriptors

# name length, datatype length, rank, data rank (or SAME), offset in the block, byte size, parameters
_TENSOR_DESC = struct.Struct("<IIIIqqI")
SAME = 0xFFFFFFFF  # the data has the declared shape (the usual case): it is not repeated
_DIMS = [struct.Struct(f"<{n}q") for n in range(9)]
_ENCODED: dict[str, bytes] = {}


def _utf8(text: str) -> bytes:
    """UTF-8, cached for the few texts that repeat on every request (model, tensor and type names)."""
    raw = _ENCODED.get(text)
    if raw is None:
        raw = text.encode()
        if len(_ENCODED) < 4096 and len(raw) <= 256:
            _ENCODED[text] = raw
    return raw


def _dims(shape) -> bytes:
    n = len(shape)
    return (_DIMS[n] if n < len(_DIMS) else struct.Struct(f"<{n}q")).pack(*shape)


def _tensor(w: _Writer, name: str, datatype: str, shape, data_shape, rel: int, nbytes: int,
            params: dict) -> None:
    raw_name, raw_type = _utf8(name), _utf8(datatype)
    same = tuple(shape) == tuple(data_shape)
    data_rank = SAME if same else len(data_shape)
    w.parts.append(_TENSOR_DESC.pack(len(raw_name), len(raw_type), len(shape), data_rank, rel, nbytes,
                                     len(params)))
    w.parts.append(raw_name)
    w.parts.append(raw_type)
    w.parts.append(_dims(shape))
    if not same:
        w.parts.append(_dims(data_shape))
    if params:
        w.params(params)


def _read_tensor(r: Reader) -> tuple:
    data = r.data
    len_name, len_type, rank, data_rank, rel, nbytes, n_params = _TENSOR_DESC.unpack_from(data, r.pos)
    pos = r.pos + _TENSOR_DESC.size
    if rank > 64 or (data_rank != SAME and data_rank > 64):
        raise ValueError("a tensor of rank above 64")
    name = data[pos:pos + len_name].decode()
    pos += len_name
    datatype = data[pos:pos + len_type].decode()
    pos += len_type
    shape = list(struct.unpack_from(f"<{rank}q", data, pos))
    pos += 8 * rank
    if data_rank == SAME:
        data_shape = shape
    else:
        data_shape = list(struct.unpack_from(f"<{data_rank}q", data, pos))
        pos += 8 * data_rank
    if pos > len(data):
        raise ValueError("tensor descriptor past the end of the frame")
    r.pos = pos
    return name, datatype, shape, data_shape, rel, nbytes, (r.params(n_params) if n_params else {})


def _texts(r: Reader, *lengths: int) -> list[str]:
    data, pos, out = r.data, r.pos, []
    for n in lengths:
        out.append(data[pos:pos + n].decode())
        pos += n
    if pos > len(data):
        raise ValueError("text past the end of the frame")
    r.pos = pos
    return out


# ---------------------------------------------------------------- requests (worker -> engine)

# deadline, start_ns, block offset, block size, inputs, outputs, trace kind, params, model/version/id lengths
_REQUEST = struct.Struct("<dqqqIIBIIII")


def encode_request(request: InferRequest, buf: memoryview, allocator: Allocator, trace_kind: int,
                   carrier: dict[str, str] | None, start_ns: int, stream_id: int) -> tuple[bytes, int]:
    """The INFER body and the arena block it uses (-1: none)."""
    payloads = [_payload(t) for t in request.inputs]
    block, size, rels, tail = place(payloads, buf, allocator)
    deadline = math.nan if request.deadline is None else request.deadline
    model, version, rid = _utf8(request.model_name), _utf8(request.model_version), request.id.encode()
    w = _Writer()
    w.parts.append(_REQUEST.pack(deadline, start_ns, block, size, len(request.inputs), len(request.outputs),
                                 trace_kind, len(request.parameters), len(model), len(version), len(rid)))
    w.parts.append(model)
    w.parts.append(version)
    w.parts.append(rid)
    if request.parameters:
        w.params(request.parameters)
    if trace_kind:
        w.parts.append(_U32.pack(len(carrier or {})))
        for key, value in (carrier or {}).items():
            w.str(key)
            w.str(value)
        w.parts.append(_U32.pack(stream_id))
    for tensor, payload, rel in zip(request.inputs, payloads, rels):
        data_shape = payload.shape if isinstance(payload, np.ndarray) else np.shape(tensor.data)
        _tensor(w, tensor.name, tensor.datatype, tensor.shape, data_shape, rel, _nbytes(payload),
                tensor.parameters)
    for out in request.outputs:
        w.str(out.name)
        w.parts.append(_U32.pack(len(out.parameters)))
        w.params(out.parameters)
    w.parts.extend(tail)
    return b"".join(w.parts), block


class DecodedRequest:
    __slots__ = ("request", "views", "trace_kind", "carrier", "start_ns", "stream_id")


def decode_request(body: bytes, buf: memoryview) -> DecodedRequest:
    r = Reader(body)
    (deadline, start_ns, block, size, n_in, n_out, trace_kind, n_params, len_model, len_version,
     len_id) = r.unpack(_REQUEST)
    out = DecodedRequest()
    req = InferRequest(*_texts(r, len_model, len_version, len_id))
    if n_params:
        req.parameters = r.params(n_params)
    req.deadline = None if math.isnan(deadline) else deadline
    out.trace_kind, out.carrier, out.start_ns, out.stream_id = trace_kind, None, start_ns, 0
    if trace_kind:
        (n,) = r.unpack(_U32)
        out.carrier = {r.str(): r.str() for _ in range(n)}
        (out.stream_id,) = r.unpack(_U32)
    specs = [_read_tensor(r) for _ in range(n_in)]
    for _ in range(n_out):
        name = r.str()
        (count,) = r.unpack(_U32)
        req.outputs.append(RequestedOutput(name, r.params(count)))
    views = Views(buf, block, size, body, r.pos)
    req.inputs = [Tensor(name, dt, shape, views.array(name, dt, data_shape, rel, nbytes), params)
                  for name, dt, shape, data_shape, rel, nbytes, params in specs]
    out.request, out.views = req, views
    return out


# ---------------------------------------------------------------- responses (engine -> worker)

# flags, block offset, block size, outputs, parameters, model / version / id lengths
_RESPONSE = struct.Struct("<BqqIIIII")


def encode_response(response: InferResponse, buf: memoryview, allocator: Allocator) -> tuple[bytes, int]:
    payloads = [_payload(t) for t in response.outputs]
    block, size, rels, tail = place(payloads, buf, allocator)
    error = response.error
    flags = (FINAL if response.final else 0) | (FAILED if error is not None else 0)
    model, version, rid = _utf8(response.model_name), _utf8(response.model_version), response.id.encode()
    w = _Writer()
    w.parts.append(_RESPONSE.pack(flags, block, size, len(response.outputs), len(response.parameters),
                                  len(model), len(version), len(rid)))
    w.parts.append(model)
    w.parts.append(version)
    w.parts.append(rid)
    if response.parameters:
        w.params(response.parameters)
    if error is not None:
        w.str(getattr(getattr(error, "code", None), "name", "INTERNAL"))
        w.str(getattr(error, "message", str(error)))
    for tensor, payload, rel in zip(response.outputs, payloads, rels):
        data_shape = payload.shape if isinstance(payload, np.ndarray) else np.shape(tensor.data)
        _tensor(w, tensor.name, tensor.datatype, tensor.shape, data_shape, rel, _nbytes(payload), {})
    w.parts.extend(tail)
    return b"".join(w.parts), block


def decode_response(body: bytes, buf: memoryview) -> tuple[InferResponse, Views | None]:
    r = Reader(body)
    flags, block, size, n_out, n_params, len_model, len_version, len_id = r.unpack(_RESPONSE)
    response = InferResponse(*_texts(r, len_model, len_version, len_id), [], {}, bool(flags & FINAL))
    if n_params:
        response.parameters = r.params(n_params)
    if flags & FAILED:
        response.error = error_from(r.str(), r.str())
    specs = [_read_tensor(r) for _ in range(n_out)]
    views = Views(buf, block, size, body, r.pos) if (specs or block >= 0) else None
    for name, datatype, shape, data_shape, rel, nbytes, _ in specs:
        data = views.array(name, datatype, data_shape, rel, nbytes)
        response.outputs.append(Tensor(name, datatype, shape, data))
    return response, views


def error_body(error: BaseException) -> bytes:
    w = _Writer()
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



# ---------------------------------------------------------------- templates: the repeated shape of a message

# Steady traffic repeats the same model, tensor names, types and shapes in every message. The writer
# sends that description once (TEMPLATE / RESPONSE_TEMPLATE, JSON, keyed by a number) and then only
# what changes per message (FAST frames): the deadline, the arena block and the request id. Anything
# a template cannot say (parameters, trace context, BYTES, errors, non-final responses) takes the full
# encoding above.

_FAST_REQUEST = struct.Struct("<Idqqq")  # template, deadline, block offset, block size, id length
_FAST_RESPONSE = struct.Struct("<Iqqq")  # template, block offset, block size, id length
MAX_TEMPLATES = 1024  # per direction and worker; past it every message is fully encoded


class Template:
    """One message shape: its model, its tensors' (name, datatype, shape, dtype, offset, bytes), the
    outputs asked for, and the block size its tensors need."""

    __slots__ = ("id", "model", "version", "tensors", "outputs", "size")

    def __init__(self, tid: int, model: str, version: str, tensors: list, outputs: list[str]) -> None:
        self.id, self.model, self.version, self.outputs = tid, model, version, outputs
        self.tensors, pos = [], 0
        for name, datatype, shape in tensors:
            dtype = dtypes.NUMPY_DTYPES.get(datatype)
            if dtype is None or datatype == "BYTES" or len(shape) > 64 or any(d < 0 for d in shape):
                raise ValueError(f"a template cannot describe tensor '{name}' of {datatype} {shape}")
            nbytes = dtypes.num_elements(shape) * dtype.itemsize
            self.tensors.append((name, datatype, tuple(shape), dtype, pos, nbytes))
            pos += align(nbytes)
        self.size = pos

    def describe(self) -> bytes:
        tensors = [[n, dt, list(shape)] for n, dt, shape, _, _, _ in self.tensors]
        return json.dumps({"id": self.id, "model": self.model, "version": self.version,
                           "outputs": self.outputs, "tensors": tensors}).encode()

    @classmethod
    def parse(cls, body: bytes) -> "Template":
        doc = json.loads(body)
        return cls(int(doc["id"]), str(doc["model"]), str(doc["version"]),
                   [(str(n), str(dt), [int(d) for d in shape]) for n, dt, shape in doc["tensors"]],
                   [str(o) for o in doc["outputs"]])

    def write(self, arrays: list[np.ndarray], buf: memoryview, allocator: Allocator) -> int:
        """The tensors into one new block (its offset), or -1 when the arena has no room."""
        block = allocator.alloc(self.size) if self.size else -1
        if block < 0:
            return -1
        for array, (_, _, _, _, rel, nbytes) in zip(arrays, self.tensors):
            if nbytes:
                if not array.flags.c_contiguous:
                    array = np.ascontiguousarray(array)
                start = block + rel
                buf[start:start + nbytes] = memoryview(array).cast("B")
        return block

    def read(self, views: Views) -> list[Tensor]:
        root = views.root
        return [Tensor(name, datatype, list(shape), np.ndarray(shape, dtype, buffer=root, offset=rel))
                for name, datatype, shape, dtype, rel, _ in self.tensors]


def request_key(request: InferRequest) -> tuple | None:
    """What makes two requests share a template; None when this one needs the full encoding."""
    if request.parameters or request.trace is not None:
        return None
    key: list = [request.model_name, request.model_version, len(request.inputs)]
    for t in request.inputs:
        data = t.data
        if t.parameters or t.datatype == "BYTES" or not isinstance(data, np.ndarray) \
                or data.dtype != dtypes.NUMPY_DTYPES.get(t.datatype) or list(data.shape) != list(t.shape):
            return None
        key += (t.name, t.datatype, tuple(t.shape))
    for o in request.outputs:
        if o.parameters:
            return None
        key.append(o.name)
    return tuple(key)


def response_key(response: InferResponse) -> tuple | None:
    if response.parameters or response.error is not None or not response.final:
        return None
    key: list = [response.model_name, response.model_version]
    for t in response.outputs:
        data = t.data
        if t.datatype == "BYTES" or not isinstance(data, np.ndarray) \
                or data.dtype != dtypes.NUMPY_DTYPES.get(t.datatype) or list(data.shape) != list(t.shape):
            return None
        key += (t.name, t.datatype, tuple(t.shape))
    return tuple(key)


def new_request_template(tid: int, request: InferRequest) -> Template:
    return Template(tid, request.model_name, request.model_version,
                    [(t.name, t.datatype, t.shape) for t in request.inputs],
                    [o.name for o in request.outputs])


def new_response_template(tid: int, response: InferResponse) -> Template:
    return Template(tid, response.model_name, response.model_version,
                    [(t.name, t.datatype, t.shape) for t in response.outputs], [])


def fast_request(template: Template, block: int, request: InferRequest) -> bytes:
    rid = request.id.encode()
    deadline = math.nan if request.deadline is None else request.deadline
    return _FAST_REQUEST.pack(template.id, deadline, block, template.size, len(rid)) + rid


def read_fast_request(body: bytes, templates: dict[int, Template], buf: memoryview) -> DecodedRequest:
    tid, deadline, block, size, len_id = _FAST_REQUEST.unpack_from(body)
    template = templates.get(tid)
    if template is None or size != template.size:
        raise ValueError(f"unknown request template {tid}")
    start = _FAST_REQUEST.size
    if start + len_id > len(body):
        raise ValueError("request id past the end of the frame")
    views = Views(buf, block, size, b"", 0) if size else Views(buf, -1, 0, b"", 0)
    rid = body[start:start + len_id].decode()
    req = InferRequest(template.model, template.version, rid, template.read(views),
                       [RequestedOutput(name) for name in template.outputs])
    req.deadline = None if math.isnan(deadline) else deadline
    out = DecodedRequest()
    out.request, out.views = req, views
    out.trace_kind, out.carrier, out.start_ns, out.stream_id = 0, None, 0, 0
    return out


def fast_response(template: Template, block: int, response: InferResponse) -> bytes:
    rid = response.id.encode()
    return _FAST_RESPONSE.pack(template.id, block, template.size, len(rid)) + rid


def read_fast_response(body: bytes, templates: dict[int, Template],
                       buf: memoryview) -> tuple[InferResponse, Views | None]:
    tid, block, size, len_id = _FAST_RESPONSE.unpack_from(body)
    template = templates.get(tid)
    if template is None or size != template.size:
        raise ValueError(f"unknown response template {tid}")
    start = _FAST_RESPONSE.size
    if start + len_id > len(body):
        raise ValueError("response id past the end of the frame")
    views = Views(buf, block, size, b"", 0) if size else Views(buf, -1, 0, b"", 0)  # empty tensors only
    rid = body[start:start + len_id].decode()
    return InferResponse(template.model, template.version, rid, template.read(views)), views
