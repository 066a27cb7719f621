"""The short form of a repeated message shape.

Steady traffic repeats the same model, tensor names, types and shapes in every message. The writer
sends that description once (TEMPLATE / RESPONSE_TEMPLATE frames, JSON, keyed by a number) and then
only what changes per message (INFER_FAST / RESPONSE_FAST frames): the deadline, the arena block and
the request id. What a template cannot say (parameters, trace context, BYTES, errors, non-final
responses) takes the full form of codec.py.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from server.core import dtypes
from server.core.types import InferRequest, InferResponse, RequestedOutput, Tensor

from .arena import Allocator, align
from .codec import DecodedRequest, Views

_FAST_REQUEST = struct.Struct("<Idqqq")  # template, deadline, block offset, block size, id length
_FAST_RESPONSE = struct.Struct("<Iqqq")  # template, block offset, block size, id length
MAX_TEMPLATES = 1024  # per direction and worker; past it every message is fully encoded


class Template:
    """One message shape: its model, its tensors' (name, datatype, shape, dtype, offset, bytes), the
    outputs asked for, and the block size its tensors need."""

    __slots__ = ("id", "model", "version", "tensors", "outputs", "size", "_match")

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
        # what a message's tensors must be for this template to say them: name, datatype, shape as the
        # message declares it (a list) and as its array has it (a tuple), the array's dtype
        self._match = [(name, datatype, list(shape), shape, dtype)
                       for name, datatype, shape, dtype, _, _ in self.tensors]

    def matches(self, tensors: list[Tensor]) -> bool:
        """Whether ``tensors`` have exactly this template's shape (plain arrays, no parameters)."""
        if len(tensors) != len(self._match):
            return False
        for t, (name, datatype, shape, array_shape, dtype) in zip(tensors, self._match):
            data = t.data
            if t.name != name or t.datatype != datatype or t.shape != shape or t.parameters \
                    or type(data) is not np.ndarray or data.dtype != dtype or data.shape != array_shape:
                return False
        return True

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


def fast_request_block(body: bytes) -> int:
    """The arena block an INFER_FAST body names (-1: none, or a body too short to say)."""
    if len(body) < _FAST_REQUEST.size:
        return -1
    return _FAST_REQUEST.unpack_from(body)[2]


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
    req.shape_key = template  # its shape was described once: the data plane checks it once per configuration
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
