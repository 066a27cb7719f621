"""Frontend worker faults, seen from outside: a worker killed under load loses only the requests it
held and comes back; its shared memory is reclaimed; a full, stopped or killed engine is answered
with UNAVAILABLE, never a hang; shared memory and RSS stay flat over 20k requests."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.harness import ROOT, ServerProcess
from tests.test_workers import _worker_pids

SLOW = ROOT / "tests" / "triton_models" / "slow"
SHM = Path("/dev/shm")


def _repo(tmp_path_factory, slow: bool) -> Path:
    repo = tmp_path_factory.mktemp("faults") / "repo"
    shutil.copytree(ROOT / "model_repository" / "simple", repo / "simple")
    if slow:
        shutil.copytree(SLOW, repo / "slow")
        config = repo / "slow" / "config.pbtxt"
        config.write_text(config.read_text().replace("count: 4", "count: 1"))
    return repo


def _simple_request(value: int = 1) -> pb.ModelInferRequest:
    a = np.full((1, 16), value, dtype=np.int32)
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(a.tobytes())
    return request


def _slow_request(ms: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="MS", datatype="INT32", shape=[1])
    request.raw_input_contents.append(np.array([ms], dtype=np.int32).tobytes())
    return request


def _segments(server: ServerProcess) -> list[str]:
    return sorted(p.name for p in SHM.glob(f"inferd-w{server.proc.pid}-*"))


def _stub(server: ServerProcess):
    channel = grpc.insecure_channel(server.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def _serves(server: ServerProcess) -> bool:
    channel, stub = _stub(server)
    with channel:
        try:
            return stub.ModelInfer(_simple_request(), timeout=5).raw_output_contents[0] == np.full(
                (1, 16), 2, dtype=np.int32).tobytes()
        except grpc.RpcError:
            return False


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- one worker: held calls, full, engine down


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    proc = ServerProcess([_repo(tmp_path_factory, slow=True)], "--frontend-workers", "1",
                         "--frontend-worker-engine-timeout-secs", "1", "--frontend-worker-max-inflight", "4")
    proc.start(tmp_path_factory.mktemp("logs") / "inferd.log", timeout=120)
    yield proc
    os.kill(proc.proc.pid, signal.SIGCONT) if proc.proc.poll() is None else None
    proc.stop()


def test_a_full_engine_answers_unavailable(one_worker):
    channel, stub = _stub(one_worker)
    with channel:
        held = [stub.ModelInfer.future(_slow_request(1500), timeout=30) for _ in range(4)]
        time.sleep(0.5)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(_simple_request(), timeout=30)
        assert time.monotonic() - start < 2
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "full" in refused.value.details() and "4 requests" in refused.value.details()
        assert [np.frombuffer(f.result().raw_output_contents[0], np.int32)[0] for f in held] == [1500] * 4
        assert stub.ModelInfer(_simple_request(), timeout=30).raw_output_contents  # room again


def test_killed_worker_loses_its_requests_and_comes_back(one_worker):
    [pid] = _worker_pids(one_worker)
    before = _segments(one_worker)
    assert len(before) == 2  # its request and response arenas
    channel, stub = _stub(one_worker)
    with channel:
        held = [stub.ModelInfer.future(_slow_request(3000), timeout=30) for _ in range(3)]
        time.sleep(0.7)  # one runs in the model, two wait in the engine's queue
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        for future in held:
            assert future.exception(timeout=10).code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 2.5  # the transport error comes now, not when the model ends
    _wait(lambda: "frontend worker 0: cancelled its 3 requests in flight" in one_worker.log(), 10,
          "the engine cancels the dead worker's requests")
    _wait(lambda: len(_worker_pids(one_worker)) == 1 and _worker_pids(one_worker) != [pid], 30,
          "a new worker")
    _wait(lambda: _serves(one_worker), 30, "the new worker serves")
    # the dead worker's arenas are unlinked; the new worker has its own two
    _wait(lambda: len(_segments(one_worker)) == 2 and not set(before) & set(_segments(one_worker)), 10,
          f"arenas replaced: {before} -> {_segments(one_worker)}")
    assert f"exited with {-signal.SIGKILL}; restarting it" in one_worker.log()


def test_a_stopped_engine_is_unavailable_not_a_hang(one_worker):
    engine = one_worker.proc.pid
    channel, stub = _stub(one_worker)
    with channel:
        assert stub.ModelInfer(_simple_request(), timeout=10).raw_output_contents
        os.kill(engine, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as failed:
                stub.ModelInfer(_simple_request(), timeout=30)  # no client deadline would save it
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
            assert "engine" in failed.value.details()
            assert time.monotonic() - start < 4
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is False
            with pytest.raises(grpc.RpcError) as refused:  # while it stays down: at once
                stub.ModelMetadata(pb.ModelMetadataRequest(name="simple"), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            os.kill(engine, signal.SIGCONT)
        _wait(lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready, 10, "ready again")
        assert stub.ModelInfer(_simple_request(), timeout=10).raw_output_contents


def test_a_killed_engine_is_unavailable_and_its_workers_exit(one_worker):
    workers = _worker_pids(one_worker)
    engine = one_worker.proc.pid
    os.kill(engine, signal.SIGKILL)
    one_worker.proc.wait(10)
    channel, stub = _stub(one_worker)
    with channel:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(_simple_request(), timeout=30)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 3
    _wait(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 15, "orphaned workers exit")
    _wait(lambda: not list(SHM.glob(f"inferd-w{engine}-*")), 15, "the resource tracker unlinks the arenas")


# ---------------------------------------------------------------- two workers: SIGKILL under load, growth


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    proc = ServerProcess([_repo(tmp_path_factory, slow=False)], "--frontend-workers", "2")
    proc.start(tmp_path_factory.mktemp("logs") / "inferd.log", timeout=120)
    yield proc
    assert proc.stop() == 0


def test_sigkill_under_load_fails_only_what_the_worker_held(two_workers):
    clients, results = 8, {}
    stop = threading.Event()
    killed_at: list[float] = []

    def client(i: int) -> None:
        channel, stub = _stub(two_workers)
        outcomes: list[tuple[float, grpc.StatusCode | None]] = []  # (when, None for a success)
        with channel:
            while not stop.is_set():
                try:
                    # wait_for_ready: a call waits for the reconnect instead of failing fast while the
                    # channel backs off, so every error counted is a call a server really held
                    reply = stub.ModelInfer(_simple_request(i), timeout=10, wait_for_ready=True)
                    assert reply.raw_output_contents[0] == np.full((1, 16), 2 * i, np.int32).tobytes()
                    outcomes.append((time.monotonic(), None))
                except grpc.RpcError as exc:
                    outcomes.append((time.monotonic(), exc.code()))
        results[i] = outcomes

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    victim = _worker_pids(two_workers)[0]
    killed_at.append(time.monotonic())
    os.kill(victim, signal.SIGKILL)
    _wait(lambda: len(_worker_pids(two_workers)) == 2 and victim not in _worker_pids(two_workers), 30,
          "the worker is restarted")
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(30)
    errors = [(at, code) for outcomes in results.values() for at, code in outcomes if code is not None]
    assert all(code == grpc.StatusCode.UNAVAILABLE for _, code in errors), errors
    # only calls the dead worker held or that raced its death; nothing before it, nothing later
    assert all(killed_at[0] - 0.05 <= at <= killed_at[0] + 3 for at, _ in errors), errors
    for outcomes in results.values():
        failed = [n for n, (_, code) in enumerate(outcomes) if code is not None]
        # one break per client: the call the worker held, then at most a retry or two sent on the
        # dead connection before the channel saw it close; once a call succeeds again, none fails
        if failed:
            assert len(failed) <= 3 and failed == list(range(failed[0], failed[-1] + 1)), outcomes
        assert any(code is None for _, code in outcomes), outcomes
    assert len(_segments(two_workers)) == 4
    assert "Traceback" not in two_workers.log(), two_workers.log()[-4000:]


async def _hammer(url: str, total: int, concurrency: int = 16) -> int:
    payload = _simple_request(3).SerializeToString()
    errors = 0
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(url, options=options) for _ in range(4)]
    calls = [c.unary_unary("/inference.GRPCInferenceService/ModelInfer") for c in channels]
    left = [total]

    async def run(i: int) -> None:
        nonlocal errors
        call = calls[i % len(calls)]
        while left[0] > 0:
            left[0] -= 1
            try:
                await call(payload, timeout=30)
            except grpc.RpcError:
                errors += 1

    await asyncio.gather(*(run(i) for i in range(concurrency)))
    for c in channels:
        await c.close()
    return errors


def test_shared_memory_and_rss_stay_flat_over_20k_requests(two_workers):
    def footprint() -> tuple[int, int]:
        pids = [two_workers.proc.pid, *_worker_pids(two_workers)]
        shm_bytes = sum(os.stat(SHM / name).st_blocks * 512 for name in _segments(two_workers))
        return sum(_rss_kb(p) for p in pids), shm_bytes

    assert asyncio.run(_hammer(two_workers.grpc_url, 3000)) == 0  # warm: allocator carved, caches filled
    rss0, shm0 = footprint()
    assert asyncio.run(_hammer(two_workers.grpc_url, 20000)) == 0
    rss1, shm1 = footprint()
    assert shm1 - shm0 <= 256 << 10, (shm0, shm1)  # blocks are reused, not carved anew
    assert shm1 <= 4 << 20, shm1  # a few pages per arena, not a footprint per request
    assert rss1 - rss0 < 24 << 10, (rss0, rss1)  # kB: no per-request leak in any process


def test_a_taken_port_stops_the_start_with_a_clear_error(tmp_path):
    import socket

    with socket.socket() as taken:  # a plain listener (no SO_REUSEPORT) holds the gRPC port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = ServerProcess([ROOT / "model_repository"], "--frontend-workers", "2")
        proc.args[proc.args.index("--grpc-port") + 1] = str(taken.getsockname()[1])
        proc.start(tmp_path / "inferd.log", wait_ready=False)
        code = proc.proc.wait(60)
    assert code != 0
    assert "exited with 1 before it was listening" in proc.log(), proc.log()[-3000:]
    assert not list(SHM.glob(f"inferd-w{proc.proc.pid}-*"))
