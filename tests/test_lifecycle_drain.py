"""Graceful drain: on SIGTERM/SIGINT readiness turns false at once, new requests get UNAVAILABLE on
a port that stays open, queued and in-flight requests finish, and the process exits 0 within
--exit-timeout-secs; a second signal stops at once."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.lifecycle_helpers import wait_for

# a probe model: each batch notes its values in started.log, sleeps its largest DELAY_MS, then notes
# them in executed.log, so a test knows what was running and what ran to the end
MODEL_PY = """
import time
from pathlib import Path


class TritonPythonModel:
    def initialize(self, config):
        self.folder = Path(config["model_repository"])

    def _note(self, name, values):
        with (self.folder / name).open("a") as f:
            f.write("".join(f"{int(v)}\\n" for v in values[:, 0]))

    def execute(self, inputs):
        values = inputs["INPUT0"]
        self._note("started.log", values)
        time.sleep(float(inputs["DELAY_MS"].max()) / 1000.0)
        self._note("executed.log", values)
        return {"OUTPUT0": values * 2}
"""
IO = """
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ -1 ] }, { name: "DELAY_MS" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching { }
"""
SHUTTING_DOWN = "shutting down"
CONNECT_FAILED = re.compile(r"failed to connect|Connection refused|connection attempt", re.IGNORECASE)


def _repo(root: Path) -> Path:
    for name in ("work", "slow"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text(MODEL_PY)
        (root / name / "config.pbtxt").write_text(IO)
    return root


def _inputs(value: int, delay_ms: float):
    a = grpcclient.InferInput("INPUT0", [1, 2], "INT32")
    a.set_data_from_numpy(np.full((1, 2), value, dtype=np.int32))
    d = grpcclient.InferInput("DELAY_MS", [1, 1], "FP32")
    d.set_data_from_numpy(np.full((1, 1), delay_ms, dtype=np.float32))
    return [a, d]


def _noted(model: Path, name: str = "executed.log") -> list[int]:
    log = model / name
    return [int(line) for line in log.read_text().split()] if log.exists() else []


class Clients:
    """Threads sending unique values to ``work`` until the server is gone; every result kept."""

    def __init__(self, url: str, count: int, delay_ms: float) -> None:
        self.url, self.delay_ms = url, delay_ms
        self.ok: list[int] = []
        self.ok_at: list[float] = []  # time.time() of each success
        self.errors: list[tuple[float, int, str, str]] = []  # (time.time(), value, status, message)
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]
        for t in self._threads:
            t.start()

    def _run(self, index: int) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        for n in range(1, 100000):
            if self.done.is_set():
                break
            value = index * 100000 + n
            try:
                out = client.infer("work", _inputs(value, self.delay_ms), client_timeout=30).as_numpy("OUTPUT0")
                assert out.tolist() == [[2 * value, 2 * value]]
                with self._lock:
                    self.ok.append(value)
                    self.ok_at.append(time.time())
            except InferenceServerException as exc:
                with self._lock:
                    self.errors.append((time.time(), value, exc.status(), exc.message() or ""))
                if CONNECT_FAILED.search(exc.message() or ""):
                    break  # the server is gone
        client.close()

    def join(self) -> None:
        self.done.set()
        for t in self._threads:
            t.join(30)

    def classify(self, closed_at: float) -> dict[str, list]:
        """Rejected by the draining data plane, cut off when the port closed after the drain (never
        accepted: the drain had finished every accepted request), refused once gone, or lost."""
        kinds: dict[str, list] = {"rejected": [], "cut at close": [], "refused": [], "lost": []}
        for when, value, status, message in self.errors:
            if status == "StatusCode.UNAVAILABLE" and SHUTTING_DOWN in message:
                kinds["rejected"].append(value)
            elif status == "StatusCode.UNAVAILABLE" and CONNECT_FAILED.search(message):
                kinds["refused"].append(value)
            elif when >= closed_at:
                kinds["cut at close"].append(value)
            else:
                kinds["lost"].append((value, status, message))
        return kinds


def _logged_at(log: str, text: str) -> float:
    """The wall-clock time of the server's log line containing ``text``."""
    line = next(line for line in log.splitlines() if text in line)
    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def _http_ready_status(proc) -> int:
    try:
        return urllib.request.urlopen(f"http://{proc.http_url}/v2/health/ready", timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_sigterm_under_load_loses_no_accepted_request(tmp_path, start_server):
    repo = _repo(tmp_path / "repo")
    proc = start_server([repo], "--exit-timeout-secs=20")
    clients = Clients(proc.grpc_url, count=6, delay_ms=200)
    long_result: list = []
    try:
        wait_for(lambda: len(clients.ok) >= 12, what="traffic")
        # one request that is certainly running (for 2.5 s) when the signal comes
        with grpcclient.InferenceServerClient(proc.grpc_url) as slow_client:
            long = threading.Thread(target=lambda: long_result.append(
                slow_client.infer("slow", _inputs(7, 2500), client_timeout=30).as_numpy("OUTPUT0")))
            long.start()
            wait_for(lambda: _noted(repo / "slow", "started.log") == [7], what="the slow request running")
            signalled, signalled_wall = time.monotonic(), time.time()
            proc.signal(signal.SIGTERM)

            with grpc.insecure_channel(proc.grpc_url) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                wait_for(lambda: not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready,
                         timeout=1.0, interval=0.01, what="ServerReady false")
                not_ready_after = time.monotonic() - signalled
                assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                    health_pb2.HealthCheckResponse.NOT_SERVING
                assert _http_ready_status(proc) == 503
                # the port still accepts, and answers new work with UNAVAILABLE
                try:
                    slow_client.infer("work", _inputs(-5, 0), client_timeout=5)
                    raise AssertionError("a request during the drain was accepted")
                except InferenceServerException as exc:
                    assert exc.status() == "StatusCode.UNAVAILABLE" and SHUTTING_DOWN in exc.message()
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
                assert long.is_alive()  # the drain is still going on while all of this was checked
            long.join(30)
        code = proc.proc.wait(20)
        exited_after = time.monotonic() - signalled
    finally:
        clients.join()
    executed = _noted(repo / "work")
    kinds = clients.classify(_logged_at(proc.log(), "drained; closing the frontends"))
    sent = len(clients.ok) + len(clients.errors) + 1
    finished_after_signal = sum(1 for t in clients.ok_at if t > signalled_wall) + len(long_result)
    print(f"\ndrain test: sent {sent}, succeeded {len(clients.ok) + len(long_result)} "
          f"({finished_after_signal} of them finished after SIGTERM), "
          + ", ".join(f"{kind} {len(v)}" for kind, v in kinds.items())
          + f"; not ready after {not_ready_after:.3f}s, exit {code} after {exited_after:.2f}s")
    assert code == 0 and exited_after < 20
    assert long_result and long_result[0].tolist() == [[14, 14]]
    assert kinds["lost"] == [] and "exit timeout reached" not in proc.log()
    assert kinds["rejected"]  # the clients really ran into the drain
    assert finished_after_signal >= 3  # the slow one and requests queued or running at the signal
    # every request the server executed was answered, and nothing answered went unexecuted
    assert sorted(executed) == sorted(clients.ok)


def test_second_signal_stops_at_once(tmp_path, start_server):
    repo = _repo(tmp_path / "repo")
    proc = start_server([repo], "--exit-timeout-secs=30")
    with grpcclient.InferenceServerClient(proc.grpc_url) as client:
        threading.Thread(target=_swallow, args=(client, 20000), daemon=True).start()
        wait_for(lambda: _noted(repo / "work", "started.log") == [1], what="a 20 s request running")
        proc.signal(signal.SIGINT)  # SIGINT drains like SIGTERM ...
        with grpc.insecure_channel(proc.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            wait_for(lambda: not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready, timeout=2,
                     what="draining")
        signalled = time.monotonic()
        proc.signal(signal.SIGTERM)  # ... and a second signal does not wait for the 20 s request
        code = proc.proc.wait(10)
    assert code != 0 and time.monotonic() - signalled < 5
    assert "second signal" in proc.log()


def test_exit_timeout_bounds_the_drain(tmp_path, start_server):
    repo = _repo(tmp_path / "repo")
    proc = start_server([repo], "--exit-timeout-secs=1.5")
    with grpcclient.InferenceServerClient(proc.grpc_url) as client:
        threading.Thread(target=_swallow, args=(client, 20000), daemon=True).start()
        wait_for(lambda: _noted(repo / "work", "started.log") == [1], what="a 20 s request running")
        signalled = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.proc.wait(15)
    elapsed = time.monotonic() - signalled
    assert code == 0 and elapsed < 4, elapsed
    assert "exit timeout reached" in proc.log()


def _swallow(client, delay_ms: float) -> None:
    try:
        client.infer("work", _inputs(1, delay_ms), client_timeout=60)
    except InferenceServerException:
        pass  # the server goes away under it: that is the point
