"""The full binary form of requests and responses: a fixed header, texts, parameters, and one
descriptor per tensor; the tensor bytes themselves go into the sender's shared-memory arena (one
block per message, read in place by the other side) or, when they do not fit, inline at the end.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from server.core import dtypes
from server.core.errors import ErrorCode, ServingError
from server.core.types import InferRequest, InferResponse, RequestedOutput, Tensor

from .arena import Allocator, align
from .wire import FAILED, FINAL, U32, Reader, Writer, error_from

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
        """``buf``: the arena's memoryview. The root must be made from it with ``np.frombuffer`` (its
        base is then not an array): numpy collapses a view's base to the first array that has none,
        so a root sliced from an array over the whole arena would not be the base of the tensors
        made from it, and would die (releasing the block) while they are still read."""
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


def _tensor(w: Writer, name: str, datatype: str, shape, data_shape, rel: int, nbytes: int,
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
    w = Writer()
    w.parts.append(_REQUEST.pack(deadline, start_ns, block, size, len(request.inputs), len(request.outputs),
                                 trace_kind, len(request.parameters), len(model), len(version), len(rid)))
    w.parts.append(model)
    w.parts.append(version)
    w.parts.append(rid)
    if request.parameters:
        w.params(request.parameters)
    if trace_kind:
        w.parts.append(U32.pack(len(carrier or {})))
        for key, value in (carrier or {}).items():
            w.str(key)
            w.str(value)
        w.parts.append(U32.pack(stream_id))
    for tensor, payload, rel in zip(request.inputs, payloads, rels):
        data_shape = payload.shape if isinstance(payload, np.ndarray) else np.shape(tensor.data)
        _tensor(w, tensor.name, tensor.datatype, tensor.shape, data_shape, rel, _nbytes(payload),
                tensor.parameters)
    for out in request.outputs:
        w.str(out.name)
        w.parts.append(U32.pack(len(out.parameters)))
        w.params(out.parameters)
    w.parts.extend(tail)
    return b"".join(w.parts), block


def request_block(body: bytes) -> int:
    """The arena block an INFER body names (-1: none, or a body too short to say)."""
    if len(body) < _REQUEST.size:
        return -1
    return _REQUEST.unpack_from(body)[2]


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
        (n,) = r.unpack(U32)
        out.carrier = {r.str(): r.str() for _ in range(n)}
        (out.stream_id,) = r.unpack(U32)
    specs = [_read_tensor(r) for _ in range(n_in)]
    for _ in range(n_out):
        name = r.str()
        (count,) = r.unpack(U32)
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
    w = Writer()
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
        # an output the engine wrote into the caller's shared memory comes back named, without data
        in_shm = data.size == 0 and all(d > 0 for d in shape) and len(shape) > 0
        response.outputs.append(Tensor(name, datatype, shape, data, in_shm=in_shm))
    return response, views
