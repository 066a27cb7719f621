"""Frontend worker faults found in review: a request the engine cannot read gives its arena block
back; a stream whose cancel overtook its admission never starts; a dead worker does not cancel the
load it asked for; an oversized frame closes its channel unread; a worker that cannot be spawned
leaves no shared memory behind.

Where a client can cause the fault, the test drives a real server with a real client; where only a
broken worker could (a frame the worker's own encoder never writes), it drives the engine's classes
in process, over real shared memory."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from server.core.errors import ErrorCode, ServingError
from server.core.types import InferRequest, Tensor
from server.protos import grpc_service_pb2 as pb
from server.workers import arena, codec, link, port, supervisor, templates, wire
from tests.harness import ROOT, ServerProcess
from tests.test_workers import _worker_pids
from tests.test_workers_faults import SHM, SLOW, _simple_request, _slow_request, _stub, _wait

# ---------------------------------------------------------------- in process: the engine's side


class _Channel:
    """What the engine sends to a worker, recorded."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, int, bytes]] = []
        self.closed = False
        self.before_flush = None

    def send(self, kind: int, tag: int, body: bytes = b"") -> None:
        self.frames.append((kind, tag, body))

    def flush_soon(self) -> None:  # as link.FrameProtocol: its before_flush runs at the next write
        asyncio.get_running_loop().call_soon(lambda: self.before_flush and self.before_flush())

    def close(self) -> None:
        self.closed = True

    def released(self) -> list[int]:
        return [b for kind, _, body in self.frames if kind == wire.RELEASE for b in wire.offsets(body)]


class _Hub:
    def __init__(self, dataplane=None) -> None:
        self.dataplane = dataplane
        self.loop = asyncio.get_running_loop()
        self.loop_thread = __import__("threading").get_ident()
        self.tracing = SimpleNamespace(on=False)
        self.max_request_frame = 1 << 20
        self.kept: list = []

    def release_later(self, segments: list) -> None:
        for shm in segments:  # unlinked by retire(); the mapping goes with the last view (as in Supervisor)
            try:
                shm.close()
            except BufferError:
                pass

    def push_state(self) -> None:
        pass


def _port(dataplane=None) -> tuple[port.WorkerPort, _Channel, _Channel]:
    p = port.WorkerPort(_Hub(dataplane), 0, 1, 1 << 20)
    p.data, p.call = _Channel(), _Channel()
    p.data.before_flush = p.flush_released  # as Supervisor.attach does
    return p, p.data, p.call


def _request_body(p: port.WorkerPort, alloc: arena.Allocator) -> tuple[bytes, int]:
    request = InferRequest("simple", "", "r1", [
        Tensor("INPUT0", "INT32", [1, 16], np.arange(16, dtype=np.int32).reshape(1, 16)),
        Tensor("INPUT1", "INT32", [1, 16], np.ones((1, 16), dtype=np.int32))])
    return codec.encode_request(request, p.request_buf, alloc, wire.TRACE_NONE, None, 0, 0)


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_a_request_the_engine_cannot_read_gives_its_block_back():
    async def run() -> None:
        p, data, _ = _port()
        try:
            alloc = arena.Allocator(1 << 20)  # the worker's allocator of this request arena
            body, block = _request_body(p, alloc)
            assert block >= 0
            # the first tensor's descriptor claims more bytes than its shape holds: decoding fails
            # after the block was mapped (a broken worker; the frontends never send this)
            corrupt = bytearray(body)
            desc = body.index(b"INPUT0") - codec._TENSOR_DESC.size
            fields = list(codec._TENSOR_DESC.unpack_from(corrupt, desc))
            fields[5] += 4
            codec._TENSOR_DESC.pack_into(corrupt, desc, *fields)
            p.on_data(wire.INFER, 7, bytes(corrupt))
            await _settle()
            [(kind, tag, error)] = [f for f in data.frames if f[0] == wire.ERROR]
            assert tag == 7 and b"malformed request frame" in error
            assert data.released() == [block]  # the worker can reuse it
            assert alloc.free(block)

            # the short form: a template the engine never heard of
            template = templates.new_request_template(3, InferRequest("simple", "", "r", [
                Tensor("INPUT0", "INT32", [1, 16], np.zeros((1, 16), np.int32))]))
            fast_block = template.write([np.zeros((1, 16), np.int32)], p.request_buf, alloc)
            data.frames.clear()
            p.on_data(wire.INFER_FAST, 8, templates.fast_request(template, fast_block, InferRequest("simple", "", "r")))
            await _settle()
            assert [f[1] for f in data.frames if f[0] == wire.ERROR] == [8]
            assert data.released() == [fast_block]
        finally:
            p.retire()

    asyncio.run(run())


def test_a_stream_cancel_that_overtakes_its_admission_stops_it_in_process():
    admitted: list = []

    class Plane:
        def stream(self, request):
            admitted.append(request)
            raise AssertionError("a cancelled stream must not be admitted")

    async def run() -> None:
        p, data, call = _port(Plane())
        try:
            alloc = arena.Allocator(1 << 20)
            body, block = _request_body(p, alloc)
            p.on_data(wire.CANCEL, 5, b"")  # read first from the data channel...
            p.on_call(wire.INFER, 5, _admit_by(60) + body)  # ...then its admission from the call channel
            await _settle()
            [(kind, tag, reply)] = call.frames
            assert kind == wire.REPLY and tag == 5 and b"CANCELLED" in reply
            assert not admitted and 5 not in p.inflight
            await _settle()
            assert data.released() == [block]
            for tag in range(100, 100 + 3 * port.EARLY_CANCELS):  # cancels of finished requests: bounded
                p.on_data(wire.CANCEL, tag, b"")
            assert len(p._cancelled_early) == port.EARLY_CANCELS
        finally:
            p.retire()

    asyncio.run(run())


def _admit_by(seconds: float) -> bytes:
    return wire.ADMIT_BY.pack(time.monotonic() + seconds)


def test_a_stream_admission_read_after_the_worker_gave_up_never_starts_in_process():
    # the engine was stopped while the worker waited: it reads the admission (call channel) before
    # the worker's CANCEL (data channel); the give-up time the admission carries refuses it anyway
    admitted: list = []

    class Plane:
        def stream(self, request):
            admitted.append(request.id)  # not the request: its views would outlive the arena
            raise ServingError(ErrorCode.UNAVAILABLE, "admitted")

    async def run() -> None:
        p, data, call = _port(Plane())
        try:
            alloc = arena.Allocator(1 << 20)
            late, late_block = _request_body(p, alloc)
            p.on_call(wire.INFER, 5, _admit_by(-0.001) + late)
            on_time, _ = _request_body(p, alloc)
            p.on_call(wire.INFER, 6, _admit_by(60) + on_time)
            p.on_call(wire.INFER, 7, b"\x01\x02")  # too short to carry its give-up time
            await _settle()
            replies = {tag: reply for kind, tag, reply in call.frames if kind == wire.REPLY}
            assert b"CANCELLED" in replies[5] and b"admitted" in replies[6], replies
            assert b"give-up time" in replies[7], replies
            assert len(admitted) == 1 and 5 not in p.inflight
            await _settle()
            assert late_block in data.released()
        finally:
            p.retire()

    asyncio.run(run())


def test_retiring_a_worker_does_not_cancel_its_load_in_process():
    started, finished = [], []

    class Plane:
        async def load(self, name, parameters):
            started.append(name)
            await asyncio.sleep(0.2)
            finished.append(name)

    async def run() -> None:
        p, data, _ = _port(Plane())
        from server.workers import calls

        p.on_data(wire.CONTROL, 3, calls.request("load", "m", {}))
        await asyncio.sleep(0.05)
        assert started == ["m"]
        p.retire()  # the worker died while its load runs
        await asyncio.sleep(0.4)
        assert finished == ["m"]  # the load ran to its end
        assert not [f for f in data.frames if f[0] == wire.REPLY]  # nobody left to answer

    asyncio.run(run())


def test_a_frame_over_the_limit_closes_the_channel_unread(caplog):
    got: list = []

    class Reader(link.FrameProtocol):
        def on_frame(self, kind, tag, body):
            got.append((kind, tag, len(body)))

        def on_lost(self):
            got.append("lost")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        _, reader = await loop.connect_accepted_socket(lambda: Reader(max_frame=1024), a)
        b.sendall(wire.frame(wire.PING, 1, b"x" * 1024))  # at the limit: read
        b.sendall(wire.HEAD.pack(1 << 30, wire.INFER, 2) + b"y" * 4096)  # 1 GiB announced
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "lost" in got:
                break
        assert got == [(wire.PING, 1, 1024), "lost"]
        assert len(reader._buf) == 0
        b.close()

    with caplog.at_level("ERROR"):
        asyncio.run(run())
    assert "a frame of 1073741824 bytes (kind 1) is over this channel's limit of 1024 bytes" in caplog.text


def test_a_worker_that_cannot_be_spawned_leaves_no_shared_memory():
    class FailingProcess:
        def __init__(self, **kwargs) -> None:
            pass

        def start(self) -> None:
            raise OSError(11, "Resource temporarily unavailable")

    settings = SimpleNamespace(frontend_workers=1, frontend_worker_shm_mb=1, frontend_worker_engine_timeout_secs=1.0,
                               frontend_worker_max_inflight=8, grpc_max_message_bytes=1 << 20,
                               http_max_input_size=1 << 20, allow_grpc=True, allow_http=False, grpc_port=1,
                               http_port=2)

    async def run() -> None:
        sup = supervisor.Supervisor(SimpleNamespace(), SimpleNamespace(on=False), settings)
        sup._ctx = SimpleNamespace(Process=FailingProcess)
        with pytest.raises(SystemExit, match="frontend worker 0 could not be started: .*Resource temporarily"):
            await sup.start()
        assert not sup.ports
        # a restart that fails is tried again later, without leaving the failed attempt's arenas
        sup._stopping = False
        sup._respawn(0)
        assert not sup.ports and not list(SHM.glob(f"inferd-w{os.getpid()}-*"))
        sup._stopping = True

    asyncio.run(run())
    assert not list(SHM.glob(f"inferd-w{os.getpid()}-*"))


# ---------------------------------------------------------------- a real server with one worker

SLOW_LOAD = '''import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(2.5)

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("MS_OUT", pb_utils.get_input_tensor_by_name(
            r, "MS").as_numpy())]) for r in requests]
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("review") / "repo"
    shutil.copytree(ROOT / "model_repository" / "simple", repo / "simple")
    shutil.copytree(SLOW, repo / "slow")
    config = repo / "slow" / "config.pbtxt"
    config.write_text(config.read_text().replace("count: 4", "count: 1"))  # one instance: a second request queues
    (repo / "slow_load" / "1").mkdir(parents=True)
    (repo / "slow_load" / "config.pbtxt").write_text(
        (SLOW / "config.pbtxt").read_text().replace("count: 4", "count: 1"))
    (repo / "slow_load" / "1" / "model.py").write_text(SLOW_LOAD)
    proc = ServerProcess([repo], "--frontend-workers", "1", "--frontend-worker-engine-timeout-secs", "1",
                         "--model-control-mode", "explicit", "--load-model", "simple", "--load-model", "slow")
    proc.start(tmp_path_factory.mktemp("logs") / "inferd.log", timeout=120)
    yield proc
    if proc.proc.poll() is None:
        os.kill(proc.proc.pid, signal.SIGCONT)
    proc.stop()


def _slow_count(stub) -> int:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow"), timeout=10).model_stats
    return sum(s.inference_stats.success.count + s.inference_stats.fail.count for s in stats)


def test_a_stream_cancelled_before_its_admission_never_runs(server):
    engine = server.proc.pid
    channel, stub = _stub(server)
    with channel:
        before = _slow_count(stub)
        os.kill(engine, signal.SIGSTOP)
        try:
            time.sleep(0.5)  # the worker's heartbeat is waiting in the data channel by now
            request = _slow_request(300)
            responses = list(stub.ModelStreamInfer(iter([request]), timeout=10))
            # the admission got no answer within the engine timeout: the caller is told, and the
            # worker cancels the request
            assert [r.error_message for r in responses if r.error_message], responses
            assert "engine" in responses[0].error_message
        finally:
            os.kill(engine, signal.SIGCONT)
        _wait(lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready, 10, "ready again")
        time.sleep(1.0)  # the admission has been read by now; a started request would have run 300 ms
        assert _slow_count(stub) == before
        assert stub.ModelInfer(_simple_request(), timeout=10).raw_output_contents


def test_a_load_survives_the_death_of_the_worker_that_asked_for_it(server):
    [pid] = _worker_pids(server)
    channel, stub = _stub(server)
    with channel:
        load = stub.RepositoryModelLoad.future(pb.RepositoryModelLoadRequest(model_name="slow_load"), timeout=30)
        time.sleep(1.0)  # the engine is loading it (its initialize takes 2.5 s)
        os.kill(pid, signal.SIGKILL)
        assert load.exception(timeout=10).code() == grpc.StatusCode.UNAVAILABLE
    _wait(lambda: _worker_pids(server) and _worker_pids(server) != [pid], 30, "a new worker")

    def ready() -> bool:
        channel, stub = _stub(server)
        with channel:
            try:
                return stub.ModelReady(pb.ModelReadyRequest(name="slow_load"), timeout=5).ready
            except grpc.RpcError:
                return False

    _wait(ready, 20, "the load the dead worker asked for finishes")
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_an_oversized_frame_on_the_engine_socket_closes_that_connection(server):
    path = re.search(r"engine socket for frontend workers: (\S+)", server.log()).group(1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(wire.HEAD.pack(1 << 30, wire.HELLO, 0))  # announces 1 GiB before saying who it is
        closed = False
        try:
            for _ in range(64):  # 64 MiB at most: an engine that reads it all would not close
                sock.sendall(b"z" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        if not closed:
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
        assert closed
    _wait(lambda: "a frame of 1073741824 bytes (kind 7) is over this channel's limit of 65536 bytes" in server.log(),
          5, "the engine logs the oversized frame")
    channel, stub = _stub(server)
    with channel:  # the real worker's channels are untouched
        assert stub.ModelInfer(_simple_request(), timeout=10).raw_output_contents


def test_a_view_of_a_request_tensor_keeps_its_block_until_it_is_gone():
    """The block goes back only when nothing can read it: numpy gives a view of a view the first
    base that is not itself an array, so every tensor (and any slice the scheduler or a backend
    takes of it) must hang from the block's root for the weak reference to be right."""
    import gc

    async def run() -> None:
        p, data, _ = _port()
        try:
            alloc = arena.Allocator(1 << 20)
            body, block = _request_body(p, alloc)
            request = p._decode(body)
            part = request.inputs[0].data[0:1, 2:5]  # e.g. a batch split's slice
            del request
            gc.collect()
            await _settle()
            assert data.released() == []  # still read through `part`
            assert part.tolist() == [[2, 3, 4]]
            del part
            gc.collect()
            await _settle()
            assert data.released() == [block]
        finally:
            p.retire()

    asyncio.run(run())


def test_a_view_of_a_response_tensor_keeps_its_views_root_alive():
    import gc
    import weakref

    shm = arena.create(1 << 20, "inferd-test")
    try:
        alloc = arena.Allocator(1 << 20)
        from server.core.types import InferResponse

        response = InferResponse("m", "1", "r", [Tensor("OUT", "INT32", [1, 16], np.arange(16, dtype=np.int32)
                                                        .reshape(1, 16))])
        template = templates.new_response_template(1, response)
        block = template.write([response.outputs[0].data], shm.buf, alloc)
        decoded, views = templates.read_fast_response(templates.fast_response(template, block, response),
                                                      {1: template}, shm.buf)
        root = weakref.ref(views.root)
        part = decoded.outputs[0].data[0, 3:6]
        del decoded, views
        gc.collect()
        assert root() is not None and part.tolist() == [3, 4, 5]
        del part
        gc.collect()
        assert root() is None
    finally:
        shm.unlink()
        try:
            shm.close()
        except BufferError:
            pass


def test_a_cancelled_queued_request_never_runs_in_the_engine(server):
    """The engine drives an untraced request's DataPlane.infer itself (no task): a cancel from the
    worker must still take it out of the model's queue, as a cancelled task would (statistics then
    count it as failed, and the model never executes it: as in one process)."""
    def counts(stub) -> tuple[int, int, int]:
        [s] = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow"), timeout=10).model_stats
        return s.inference_stats.success.count, s.inference_stats.fail.count, s.execution_count

    channel, stub = _stub(server)
    with channel:
        success, fail, executions = counts(stub)
        running = stub.ModelInfer.future(_slow_request(1200), timeout=30)  # holds the one instance
        time.sleep(0.4)
        queued = stub.ModelInfer.future(_slow_request(700), timeout=30)
        time.sleep(0.3)
        queued.cancel()  # the client goes away while its request waits in the engine's queue
        assert np.frombuffer(running.result(timeout=10).raw_output_contents[0], np.int32)[0] == 1200
        time.sleep(1.0)  # a request that was not dropped would have run by now
        assert counts(stub) == (success + 1, fail + 1, executions + 1)
        assert stub.ModelInfer(_simple_request(), timeout=10).raw_output_contents
