"""Unit tests of the worker channel's pure parts: the arena allocator, the binary codec of requests
and responses (every datatype, parameters, trace context, the inline fallback, malformed frames),
the JSON control calls, and what --frontend-workers resolves to."""

from __future__ import annotations

import asyncio
import struct
import time

import numpy as np
import pytest

from server import settings
from server.core.dtypes import DATATYPES, NUMPY_DTYPES
from server.core.errors import ErrorCode, ServingError
from server.core.types import IndexEntry, InferRequest, InferResponse, ModelMetadata, RequestedOutput, Tensor
from server.workers import arena, calls, codec, templates, wire


@pytest.fixture
def buf():
    """An arena's mapping (plain memory here: the codec does not care which process maps it)."""
    return memoryview(bytearray(1 << 20))


# ---------------------------------------------------------------- allocator


def test_allocator_reuses_freed_blocks_and_never_grows_in_steady_state():
    alloc = arena.Allocator(1 << 20)
    first = [alloc.alloc(300) for _ in range(16)]  # 512-byte class
    assert len(set(first)) == 16 and all(o % 256 == 0 for o in first)
    carved = alloc.carved
    for _ in range(1000):
        for o in first:
            assert alloc.free(o)
        first = [alloc.alloc(300) for _ in range(16)]
    assert alloc.carved == carved and alloc.live == 16 and alloc.used == 16 * 512


def test_allocator_refuses_what_does_not_fit_and_ignores_unknown_frees():
    alloc = arena.Allocator(4096)
    assert alloc.alloc(1025) == -1  # above a quarter of the arena: the caller goes inline
    blocks = [alloc.alloc(1024) for _ in range(4)]
    assert -1 not in blocks and alloc.alloc(1) == -1  # full
    assert not alloc.free(12345) and not alloc.free(blocks[0] + 1)
    assert alloc.free(blocks[0]) and not alloc.free(blocks[0])  # a double free is ignored
    assert alloc.alloc(700) == blocks[0]


# ---------------------------------------------------------------- requests


def _array(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"v{i}\u00e9".encode() for i in range(count)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(count) % 2 == 0).reshape(shape)
    return np.arange(count).astype(NUMPY_DTYPES[datatype]).reshape(shape)


def _request(datatypes=DATATYPES) -> InferRequest:
    inputs = [Tensor(f"IN_{dt}", dt, [2, 3], _array(dt, (2, 3)), {"p": 1}) for dt in datatypes]
    return InferRequest("model-\u00e9", "2", "id-1", inputs,
                        [RequestedOutput("OUT", {"binary_data": True}), RequestedOutput("OTHER")],
                        {"priority": 1, "big": 2**64 - 1, "f": 0.5, "s": "text", "b": False}, deadline=123.25)


def test_request_round_trip_every_datatype_in_place(buf):
    alloc = arena.Allocator(len(buf))
    request = _request()
    carrier = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    body, block = codec.encode_request(request, buf, alloc, wire.TRACE_GRPC, carrier, 99, 7)
    assert block >= 0 and alloc.live == 1
    decoded = codec.decode_request(body, buf)
    got = decoded.request
    assert (got.model_name, got.model_version, got.id, got.deadline) == ("model-\u00e9", "2", "id-1", 123.25)
    assert got.parameters == request.parameters
    assert [(o.name, o.parameters) for o in got.outputs] == [("OUT", {"binary_data": True}), ("OTHER", {})]
    assert (decoded.trace_kind, decoded.carrier, decoded.start_ns, decoded.stream_id) == (
        wire.TRACE_GRPC, carrier, 99, 7)
    for sent, received in zip(request.inputs, got.inputs):
        assert (received.name, received.datatype, received.shape, received.parameters) == (
            sent.name, sent.datatype, [2, 3], {"p": 1})
        assert received.data.dtype == sent.data.dtype and received.data.tolist() == sent.data.tolist()
        if sent.datatype != "BYTES":  # read in place: a view of the shared block, no copy
            assert received.data.base is decoded.views.root
            assert not received.data.flags.owndata


def test_request_goes_inline_when_the_arena_is_full(buf):
    alloc = arena.Allocator(4096)
    while alloc.alloc(1024) >= 0:
        pass
    request = _request(("FP32", "BYTES", "INT64"))
    body, block = codec.encode_request(request, buf, alloc, wire.TRACE_NONE, None, 0, 0)
    assert block == -1
    got = codec.decode_request(body, buf).request
    assert [t.data.tolist() for t in got.inputs] == [t.data.tolist() for t in request.inputs]


def test_a_request_without_inputs_and_a_non_contiguous_input(buf):
    alloc = arena.Allocator(len(buf))
    body, block = codec.encode_request(InferRequest("m"), buf, alloc, wire.TRACE_NONE, None, 0, 0)
    assert block == -1 and codec.decode_request(body, buf).request.inputs == []
    strided = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]
    request = InferRequest("m", inputs=[Tensor("X", "INT32", [4, 3], strided)])
    got = codec.decode_request(codec.encode_request(request, buf, alloc, 0, None, 0, 0)[0], buf).request
    assert got.inputs[0].data.tolist() == strided.tolist()


def test_malformed_frames_are_refused_not_read_out_of_bounds(buf):
    alloc = arena.Allocator(len(buf))
    body, _ = codec.encode_request(_request(("FP32",)), buf, alloc, 0, None, 0, 0)
    with pytest.raises((ValueError, UnicodeDecodeError, struct.error)):
        codec.decode_request(body[:20], buf)
    with pytest.raises(ValueError, match="outside the arena"):
        codec.Views(buf, len(buf) - 64, 128, b"", 0)
    views = codec.Views(buf, 0, 256, b"", 0)
    with pytest.raises(ValueError, match="outside its message"):
        views.array("X", "FP32", [100], 0, 400)
    with pytest.raises(ValueError, match="bytes for shape"):
        views.array("X", "FP32", [3], 0, 16)
    with pytest.raises(ServingError) as unknown:
        views.array("X", "FP128", [1], 0, 16)
    assert unknown.value.code == ErrorCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- responses


def test_response_round_trip_and_errors(buf):
    alloc = arena.Allocator(len(buf))
    outputs = [Tensor("A", "FP16", [1, 4], np.ones((1, 4), np.float16)),
               Tensor("B", "BYTES", [2], np.array([b"x", b""], dtype=object))]
    response = InferResponse("m", "1", "r", outputs, {"triton_final_response": False, "n": 3}, final=False)
    body, block = codec.encode_response(response, buf, alloc)
    got, views = codec.decode_response(body, buf)
    assert (got.model_name, got.model_version, got.id, got.final, got.error) == ("m", "1", "r", False, None)
    assert got.parameters == {"triton_final_response": False, "n": 3}
    assert got.outputs[0].data.tolist() == [[1.0] * 4] and got.outputs[1].data.tolist() == [b"x", b""]
    assert views.block == block
    failed = InferResponse("m", "1", "r", [], {}, True, ServingError(ErrorCode.UNAVAILABLE, "gone"))
    got, views = codec.decode_response(codec.encode_response(failed, buf, alloc)[0], buf)
    assert got.final and views is None
    assert (got.error.code, got.error.message) == (ErrorCode.UNAVAILABLE, "gone")
    error = wire.decode_error(wire.error_body(RuntimeError("boom")))
    assert error.code == ErrorCode.INTERNAL and "RuntimeError: boom" in error.message


# ---------------------------------------------------------------- control calls and settings


class _Plane:
    def model_metadata(self, name, version):
        return ModelMetadata(name, ["1"], "onnxruntime_onnx", [], [], False)

    def repository_index(self, ready_only):
        return [IndexEntry("m", "1", "READY", "")]

    async def load(self, name, parameters):
        self.loaded = (name, parameters)


def test_control_calls_round_trip_through_json():
    plane = _Plane()
    files = {"config": "{}", "file:1/model.onnx": b"\x00\xff"}
    method, args = calls.parse_request(calls.request("load", "m", files))
    assert asyncio.run(calls.serve(plane, method, args)) is None
    assert plane.loaded == ("m", files)
    reply = calls.reply_ok(asyncio.run(calls.serve(plane, "model_metadata", ["m", ""])))
    assert calls.decode("model_metadata", reply) == plane.model_metadata("m", "")
    reply = calls.reply_ok(asyncio.run(calls.serve(plane, "repository_index", [False])))
    assert calls.decode("repository_index", reply) == plane.repository_index(False)
    with pytest.raises(ServingError) as error:
        calls.decode("model_ready", calls.reply_error(ServingError(ErrorCode.NOT_FOUND, "no model")))
    assert (error.value.code, error.value.message) == (ErrorCode.NOT_FOUND, "no model")
    with pytest.raises(ServingError) as refused:
        calls.parse_request(calls.request("_repository"))
    assert refused.value.code == ErrorCode.UNIMPLEMENTED


@pytest.mark.parametrize("cores, expected", [(1, 0), (2, 0), (3, 0), (4, 2), (16, 14), (64, 62)])
def test_auto_worker_count(cores, expected):
    assert settings.frontend_workers("auto", cores) == expected
    assert settings.frontend_workers("3", cores) == 3


def test_worker_flags_are_checked():
    base = ["--model-repository", "x"]
    assert settings.from_args(base + ["--frontend-workers", "0"]).frontend_workers == 0
    assert settings.from_args(base + ["--frontend-workers", "2"]).frontend_workers == 2
    for bad in (["--frontend-workers", "-1"], ["--frontend-workers", "many"],
                ["--frontend-workers", "2", "--grpc-port", "0"],
                ["--frontend-workers", "2", "--http-port", "0"]):
        with pytest.raises(SystemExit):
            settings.from_args(base + bad)
    ok = settings.from_args(base + ["--frontend-workers", "2", "--http-port", "0", "--allow-http", "false"])
    assert ok.frontend_workers == 2
    # auto (the default) with a port 0: no workers rather than an error, whatever the core count
    assert settings.from_args(base + ["--grpc-port", "0"]).frontend_workers == 0


# ---------------------------------------------------------------- templates (short forms of repeated shapes)


def test_a_request_template_round_trip_reads_in_place(buf):
    alloc = arena.Allocator(len(buf))
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    empty = Tensor("E", "INT8", [0, 4], np.zeros((0, 4), np.int8))
    request = InferRequest("m", "1", "id-7", [Tensor("X", "FP32", [2, 4], a), empty], [RequestedOutput("Y")],
                           deadline=5.5)
    key = templates.request_key(request)
    assert key is not None and key == templates.request_key(request)
    sent = templates.new_request_template(3, request)
    known = {3: templates.Template.parse(sent.describe())}  # what the engine keeps from the TEMPLATE frame
    block = sent.write([t.data for t in request.inputs], buf, alloc)
    decoded = templates.read_fast_request(templates.fast_request(sent, block, request), known, buf)
    got = decoded.request
    assert (got.model_name, got.model_version, got.id, got.deadline) == ("m", "1", "id-7", 5.5)
    assert [o.name for o in got.outputs] == ["Y"]
    assert got.inputs[0].data.tolist() == a.tolist() and got.inputs[0].data.base is decoded.views.root
    assert got.inputs[1].data.shape == (0, 4)
    with pytest.raises(ValueError, match="unknown request template"):
        templates.read_fast_request(templates.fast_request(sent, block, request), {}, buf)


def test_what_a_template_cannot_say_takes_the_full_form():
    x = Tensor("X", "FP32", [1, 2], np.ones((1, 2), np.float32))
    text = Tensor("B", "BYTES", [1], np.array([b"x"], object))
    wide = Tensor("X", "FP32", [2], np.ones(2, np.float64))
    for request in (InferRequest("m", inputs=[x], parameters={"priority": 1}),
                    InferRequest("m", inputs=[x], trace=object()), InferRequest("m", inputs=[text]),
                    InferRequest("m", inputs=[wide]),
                    InferRequest("m", inputs=[x], outputs=[RequestedOutput("Y", {"binary_data": 1})])):
        assert templates.request_key(request) is None
    assert templates.response_key(InferResponse("m", "1", "", [x], final=False)) is None
    assert templates.response_key(InferResponse("m", "1", "", [x], {"p": 1})) is None
    with pytest.raises(ValueError):
        templates.Template(1, "m", "", [("X", "FP32", [-1])], [])


def test_a_response_template_round_trip(buf):
    alloc = arena.Allocator(len(buf))
    response = InferResponse("m", "1", "r", [Tensor("Y", "INT64", [1, 3], np.arange(3).reshape(1, 3))])
    sent = templates.new_response_template(1, response)
    block = sent.write([t.data for t in response.outputs], buf, alloc)
    got, views = templates.read_fast_response(templates.fast_response(sent, block, response),
                                         {1: templates.Template.parse(sent.describe())}, buf)
    assert (got.model_name, got.model_version, got.id, got.final, got.error) == ("m", "1", "r", True, None)
    assert got.outputs[0].data.tolist() == [[0, 1, 2]] and views.block == block


def test_the_remote_data_plane_has_every_method_of_the_data_plane():
    """The frontends call a worker's RemoteDataPlane exactly as they call the DataPlane: a method or
    attribute added to the DataPlane must be forwarded too (calls.py and remote.py), or a frontend
    using it breaks only when workers are on."""
    import ast
    import inspect

    from server.dataplane import DataPlane
    from server.workers.remote import RemoteDataPlane

    def public(cls) -> set[str]:
        names = {name for name in dir(cls) if not name.startswith("_")}
        init = ast.parse(inspect.getsource(cls.__init__).strip())  # attributes set per instance
        names |= {t.attr for node in ast.walk(init) if isinstance(node, (ast.Assign, ast.AnnAssign))
                  for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                  if isinstance(t, ast.Attribute) and not t.attr.startswith("_")}
        return names

    # strict_readiness is the engine's own setting: a worker answers readiness from the engine's state
    missing = public(DataPlane) - public(RemoteDataPlane) - {"strict_readiness"}
    assert not missing, f"RemoteDataPlane lacks {sorted(missing)}"


class _Writes:
    """A transport that records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int) -> None:
        pass


def _frames(data: bytes) -> list[int]:
    tags, pos = [], 0
    while pos < len(data):
        length, _kind, tag = wire.HEAD.unpack_from(data, pos)
        tags.append(tag)
        pos += wire.HEAD.size + length
    return tags


def test_a_gathering_channel_writes_frames_of_busy_iterations_together_and_a_lone_one_at_once():
    from server.core import loops
    from server.workers import link

    async def main():
        loop = asyncio.get_running_loop()
        channel, transport = link.FrameProtocol(), _Writes()
        channel.connection_made(transport)
        channel.gather_ns = 50_000_000  # far longer than this test: only quietness ends the wait

        def busy(tag: int) -> None:  # one request's work in one loop iteration, then the next arrives
            end = time.perf_counter_ns() + 3 * loops.QUIET_NS
            while time.perf_counter_ns() < end:
                pass
            channel.send(wire.INFER_FAST, tag, b"x")
            if tag < 5:
                loop.call_soon(busy, tag + 1)

        channel.send(wire.INFER_FAST, 0, b"x")
        loop.call_soon(busy, 1)
        for _ in range(50):
            await asyncio.sleep(0)
        assert [_frames(w) for w in transport.writes] == [[0, 1, 2, 3, 4, 5]]

        started = time.perf_counter()
        channel.send(wire.INFER_FAST, 9, b"x")  # a lone frame on a quiet loop
        while len(transport.writes) < 2:
            await asyncio.sleep(0)
        assert _frames(transport.writes[1]) == [9]
        assert time.perf_counter() - started < 0.025  # not held for the gather bound

    asyncio.run(main())
