"""Python models in their own processes (the default): a model that exits, segfaults or hangs fails
only its own in-flight requests while every other model keeps serving a steady load with zero
failures; the instance comes back; repeated deaths leave it unavailable with the reason in the
repository index; a model that dies in initialize fails only its own load; decoupled streams and
BLS cross the process boundary; no shared-memory segment outlives its use; and a model process
never outlives the server. Driven by tritonclient gRPC against a real server."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.harness import ServerProcess
from tests.lifecycle_helpers import Load, index, offset_model, wait_for

IO = """
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }
"""
PID_OUT = ', { name: "PID" data_type: TYPE_INT64 dims: [ 1 ] }'


def _config(backend: str, *, pid: bool = False, params: dict[str, str] | None = None, extra: str = "") -> str:
    text = f'backend: "{backend}"\n' + IO + (PID_OUT if pid else "") + " ]\n"
    text += "instance_group [ { kind: KIND_CPU count: 1 } ]\n" + extra
    for key, value in (params or {}).items():
        text += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    return text


STEADY_DICT = """
class TritonPythonModel:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"] + OFFSET}
"""
STEADY_TRITON = """
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() + OFFSET)]) for r in requests]
"""
# INPUT0[0, 0] says what to do: -1 exit, -2 segfault, -3 hang; otherwise answer with its pid
CRASH = """
import ctypes, os, time
import numpy as np
class TritonPythonModel:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        how = int(x[:, 0].min())
        if how == -1:
            os._exit(1)
        if how == -2:
            ctypes.string_at(0)
        if how == -3:
            time.sleep(3600)
        return {"OUTPUT0": x, "PID": np.full((len(x), 1), os.getpid(), np.int64)}
"""
STREAM_CRASH = """
import os, threading, time
import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            threading.Thread(target=self.run, args=(r.get_response_sender(),), daemon=True).start()
    def run(self, sender):
        for i in range(2):
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
        time.sleep(0.3)
        os._exit(7)
"""
STREAM_CONFIG = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
BLS_CALLER = """
import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            reply = pb_utils.InferenceRequest(model_name="crash_bls", requested_output_names=["OUTPUT0"],
                                              inputs=[pb_utils.Tensor("INPUT0", x)]).exec()
            text = reply.error().message() if reply.has_error() else "ok"
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", np.array([[text]], dtype=object))]))
        return out
"""
BLS_CONFIG = """
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
# streams until cancelled; records in a file how it learned of the cancel (is_cancelled, on_cancel)
CANCEL_WATCH = """
import os, threading, time
from pathlib import Path
import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def initialize(self, args):
        self.log = Path(args["model_repository"]) / "cancelled.log"
    def execute(self, requests):
        for r in requests:
            sender = r.get_response_sender()
            sender._sender.on_cancel(lambda: self.note("on_cancel"))
            threading.Thread(target=self.run, args=(sender,), daemon=True).start()
    def note(self, what):
        with self.log.open("a") as f:
            f.write(what + "\\n")
    def run(self, sender):
        for _ in range(1000):
            if sender.is_cancelled():
                self.note("is_cancelled")
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([os.getpid()], np.int32))]))
            time.sleep(0.02)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""
# BLS to a decoupled model, stopping after two responses: the callee's request must be cancelled
BLS_EARLY = """
import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            call = pb_utils.InferenceRequest(model_name="ticker", requested_output_names=["OUT"],
                                             inputs=[pb_utils.Tensor("IN", np.array([1], np.int32))])
            pids = []
            for reply in call.exec(decoupled=True):
                pids.append(int(pb_utils.get_output_tensor_by_name(reply, "OUT").as_numpy()[0]))
                if len(pids) == 2:
                    break
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", np.array([[str(pids)]], dtype=object))]))
        return out
"""
INIT_EXIT = """
import os
class TritonPythonModel:
    def initialize(self, args):
        os._exit(3)
    def execute(self, inputs):
        return {}
"""
TIMEOUT = {"INFERD_PYTHON_EXECUTE_TIMEOUT": "2"}
STEADY = {"steady_py": 1.0, "steady_inproc": 2.0, "steady_onnx": 3.0, "steady_triton": 4.0}


def _write(repo: Path, name: str, config: str, code: str | None = None) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)
    if code is not None:
        (repo / name / "1" / "model.py").write_text(code)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("isolation")
    _write(repo, "steady_py", _config("python"), STEADY_DICT.replace("OFFSET", "1"))
    _write(repo, "steady_inproc", _config("python", params={"INFERD_PYTHON_ISOLATION": "in_process"}),
           STEADY_DICT.replace("OFFSET", "2"))
    offset_model(repo / "steady_onnx" / "1" / "model.onnx", 3.0)
    (repo / "steady_onnx" / "config.pbtxt").write_text(_config("onnxruntime"))
    _write(repo, "steady_triton", _config("python"), STEADY_TRITON.replace("OFFSET", "4"))
    for name in ("crash_exit", "crash_segv", "crash_hang", "crash_bls"):
        _write(repo, name, _config("python", pid=True, params=TIMEOUT), CRASH)
    # three requests form one batch: they are all in flight when one of them ends the process
    _write(repo, "crash_batch", _config("python", pid=True, extra="dynamic_batching { preferred_batch_size: [ 3 ] "
                                                                  "max_queue_delay_microseconds: 3000000 }\n"), CRASH)
    _write(repo, "crash_loop", _config("python", pid=True, params={"INFERD_PYTHON_MAX_DEATHS": "3"}), CRASH)
    _write(repo, "pid_inproc", _config("python", pid=True, params={"INFERD_PYTHON_ISOLATION": "in_process"}), CRASH)
    _write(repo, "stream_crash", STREAM_CONFIG, STREAM_CRASH)
    _write(repo, "bls_caller", BLS_CONFIG, BLS_CALLER)
    _write(repo, "cancel_watch", STREAM_CONFIG, CANCEL_WATCH)
    # a burst first: responses are queued in the caller's process when it stops reading
    _write(repo, "ticker", STREAM_CONFIG, CANCEL_WATCH.replace("time.sleep(0.02)", "time.sleep(0 if _ < 50 else 0.02)"))
    _write(repo, "bls_early", BLS_CONFIG, BLS_EARLY)
    _write(repo, "init_exit", _config("python"), INIT_EXIT)
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    loads = [f"--load-model={p.name}" for p in sorted(repo.iterdir()) if p.name != "init_exit"]
    proc = ServerProcess([repo], "--model-control-mode=explicit", *loads)
    proc.start(tmp_path_factory.mktemp("logs") / "inferd.log", timeout=120)
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        yield c


def _x(first: float, rows: int = 1) -> list[grpcclient.InferInput]:
    x = np.full((rows, 4), first, dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", [rows, 4], "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def _pid(client, model: str) -> int:
    return int(client.infer(model, _x(5.0), client_timeout=60).as_numpy("PID")[0, 0])


def _segments(server: ServerProcess) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"inferd-{server.proc.pid}-*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped yet) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _fails(client, model: str, first: float, rows: int = 1) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        client.infer(model, _x(first, rows), client_timeout=60)
    return error.value


def test_models_run_in_their_own_process_by_default(client, server):
    pid = _pid(client, "crash_exit")
    assert pid != server.proc.pid and _alive(pid)
    assert _pid(client, "pid_inproc") == server.proc.pid  # pinned in_process: the server's own pid


def test_a_crash_fails_only_its_own_requests_while_others_serve(client, server):
    loads = [Load(server.grpc_url, name, clients=1) for name in STEADY]
    for load in loads:
        load.__enter__()
    try:
        wait_for(lambda: all(load.tally.ok >= 5 for load in loads), 60, "the steady load to run")
        expectations = [
            ("crash_exit", -1, "exited with status 1"),
            ("crash_segv", -2, "was killed by signal 11 (SIGSEGV)"),
            ("crash_hang", -3, "did not finish executing within 2 s (INFERD_PYTHON_EXECUTE_TIMEOUT) and was killed"),
        ]
        for model, how, says in expectations:
            before = _pid(client, model)
            error = _fails(client, model, how)
            assert error.status() == "StatusCode.INTERNAL", error
            message = error.message()
            assert f"model '{model}' instance '{model}_0_0'" in message and f"(pid {before})" in message, message
            assert says in message, message
            after = _pid(client, model)  # restarted: the next request is served by a new process
            assert after != before and not _alive(before)
            assert says in server.log()
        # every request of a batch in flight when its process ends fails with the reason
        results: queue.Queue = queue.Queue()

        def send(first: float) -> None:
            with grpcclient.InferenceServerClient(server.grpc_url) as c:
                try:
                    c.infer("crash_batch", _x(first), client_timeout=60)
                    results.put("ok")
                except InferenceServerException as exc:
                    results.put(exc.message())

        threads = [threading.Thread(target=send, args=(v,)) for v in (-1, 5, 6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        messages = [results.get_nowait() for _ in threads]
        assert all("instance 'crash_batch_0_0'" in m and "exited with status 1" in m for m in messages), messages
        assert _pid(client, "crash_batch")  # and it serves again
        time.sleep(0.5)
    finally:
        tallies = [load.stop() for load in loads]
    for name, tally in zip(STEADY, tallies):
        assert tally.failures == [], f"{name}: {len(tally.failures)} of {tally.sent} failed: {tally.failures[:3]}"
        assert tally.ok >= 20 and set(tally.served) == {("1", STEADY[name])}, (name, tally.ok, tally.served)
    assert _segments(server) == []  # nothing left in /dev/shm by the dead processes or the load


def test_a_stream_open_when_its_process_dies_gets_the_error(server):
    answers: queue.Queue = queue.Queue()
    tensor = grpcclient.InferInput("IN", [1], "INT32")
    tensor.set_data_from_numpy(np.array([1], np.int32))
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("stream_crash", [tensor], request_id="s")
        got = [answers.get(timeout=20) for _ in range(3)]
        c.stop_stream()
    assert [int(r.as_numpy("OUT")[0]) for r, e in got[:2]] == [0, 1]
    result, error = got[2]
    assert result is None and "instance 'stream_crash_0_0'" in error.message(), error
    assert "exited with status 7" in error.message()


def test_a_cancel_reaches_the_model_process(server, repo):
    answers: queue.Queue = queue.Queue()
    tensor = grpcclient.InferInput("IN", [1], "INT32")
    tensor.set_data_from_numpy(np.array([1], np.int32))
    c = grpcclient.InferenceServerClient(server.grpc_url)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    c.async_stream_infer("cancel_watch", [tensor], request_id="c")
    got = [answers.get(timeout=20) for _ in range(3)]
    pid = int(got[0][0].as_numpy("OUT")[0])
    assert pid != server.proc.pid  # streamed from the model's own process
    c.stop_stream(cancel_requests=True)
    c.close()
    log = repo / "cancel_watch" / "cancelled.log"
    wait_for(lambda: log.exists() and {"on_cancel", "is_cancelled"} <= set(log.read_text().split()), 20,
             "the model to see the cancel through is_cancelled() and on_cancel")


def test_a_bls_caller_survives_its_callee_crashing(client):
    text = client.infer("bls_caller", _x(-1), client_timeout=60).as_numpy("TEXT")[0, 0].decode()
    assert "model 'crash_bls'" in text and "exited with status 1" in text, text
    assert client.infer("bls_caller", _x(5), client_timeout=60).as_numpy("TEXT")[0, 0] == b"ok"


def test_a_bls_stream_stopped_early_cancels_the_callee_and_frees_its_memory(client, server, repo):
    pids = eval(client.infer("bls_early", _x(0), client_timeout=60).as_numpy("TEXT")[0, 0].decode())
    assert len(pids) == 2 and server.proc.pid not in pids  # the callee streamed from its own process
    log = repo / "ticker" / "cancelled.log"
    wait_for(lambda: log.exists() and "is_cancelled" in log.read_text(), 20, "the callee to see the cancel")
    wait_for(lambda: _segments(server) == [], 10, "no shared-memory segment left behind")


def test_repeated_deaths_leave_the_model_unavailable_until_reloaded(client, server):
    for _ in range(3):
        _fails(client, "crash_loop", -1)
    state, reason = wait_for(lambda: index(client)[("crash_loop", "1")][0] == "UNAVAILABLE"
                             and index(client)[("crash_loop", "1")], 20, "crash_loop to be marked unavailable")
    assert "died 3 times within 60 s" in reason and "crash_loop_0_0" in reason, reason
    assert not client.is_model_ready("crash_loop")
    error = _fails(client, "crash_loop", 5)
    assert error.status() == "StatusCode.UNAVAILABLE" and "is unavailable" in error.message(), error
    assert "died 3 times" in server.log()
    assert client.infer("steady_py", _x(0)).as_numpy("OUTPUT0")[0, 0] == 1.0  # the others are untouched
    client.load_model("crash_loop")  # loading it again gives it a fresh start
    assert client.is_model_ready("crash_loop") and _pid(client, "crash_loop")
    assert index(client)[("crash_loop", "1")][0] == "READY"


def test_exit_in_initialize_fails_only_that_load(client, server):
    with pytest.raises(InferenceServerException) as error:
        client.load_model("init_exit")
    assert "exited with status 3 while loading" in error.value.message(), error.value.message()
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"  # the repository's answer to any failed load
    state, reason = index(client)[("init_exit", "1")]
    assert state == "UNAVAILABLE" and "exited with status 3 while loading" in reason, reason
    assert client.is_server_live()
    assert client.infer("steady_triton", _x(0)).as_numpy("OUTPUT0")[0, 0] == 4.0


def test_load_unload_leaves_no_process_or_segment(client, server):
    big = np.random.default_rng(0).random((8, 4), dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", [8, 4], "FP32")
    tensor.set_data_from_numpy(big)
    pid = _pid(client, "crash_hang")
    np.testing.assert_array_equal(client.infer("steady_py", [tensor]).as_numpy("OUTPUT0"), big + 1)
    client.unload_model("crash_hang")
    wait_for(lambda: not _alive(pid), 20, "the model process to exit on unload")
    assert _segments(server) == []
    client.load_model("crash_hang")
    assert _pid(client, "crash_hang") != pid
    assert _segments(server) == []


def test_model_processes_do_not_outlive_a_killed_server(repo, tmp_path):
    proc = ServerProcess([repo], "--model-control-mode=explicit", "--load-model=crash_exit")
    proc.start(tmp_path / "inferd.log", timeout=120)
    try:
        with grpcclient.InferenceServerClient(proc.grpc_url) as c:
            pid = _pid(c, "crash_exit")
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)
        wait_for(lambda: not _alive(pid), 20, "the model process to exit after the server died")
    finally:
        proc.stop()
        for path in Path("/dev/shm").glob(f"inferd-{proc.proc.pid}-*"):
            path.unlink()


# ---------------------------------------------------------------- the channel refuses what it must


def test_the_server_reads_only_plain_data_from_a_model_process():
    import pickle
    import socket

    from backends.python import ipc

    ours, theirs = socket.socketpair()
    server_side = ipc.Channel(ours, plain_only=True)
    model_side = ipc.Channel(theirs, plain_only=False)
    model_side.send(("log", 20, "x", "fine", [1, 2.5, None, {"k": b"v"}]))
    assert server_side.recv() == ("log", 20, "x", "fine", [1, 2.5, None, {"k": b"v"}])
    model_side.send(("log", Path("/etc/passwd")))  # a class instance: refused, never constructed
    with pytest.raises(pickle.UnpicklingError, match="plain data only"):
        server_side.recv()
    server_side.close()
    model_side.close()


def test_a_segment_name_outside_the_process_prefix_is_refused(tmp_path):
    from server.core.errors import ServingError

    from backends.python import ipc

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    packed = ipc.pack([("X", "FP32", x)], "inferd-test-a-")
    try:
        with pytest.raises(ServingError, match="refused shared-memory segment name"):
            ipc.unpack(packed, "inferd-test-b-")  # another process's segment
        with pytest.raises(ServingError, match="refused"):
            ipc.unpack(("../../etc/passwd", packed[1]), "inferd-test-a-")
        bad = (packed[0], [("X", "FP32", "<f4", [2, 3], 0, 10 ** 9)])  # claims more than the segment holds
        with pytest.raises(ServingError, match="out of bounds"):
            ipc.unpack(bad, "inferd-test-a-")
    finally:
        ipc.remove_segments("inferd-test-a-")
    packed = ipc.pack([("X", "FP32", x), ("B", "BYTES", np.array([b"a", b"\xff"], dtype=object))], "inferd-test-c-")
    (_, _, got), (_, _, text) = ipc.unpack(packed, "inferd-test-c-")
    np.testing.assert_array_equal(got, x)
    assert text.tolist() == [b"a", b"\xff"] and not got.flags.writeable
    assert ipc.segments("inferd-test-c-") == []  # the reader unlinked it at once


def test_an_empty_last_tensor_crosses_the_boundary():
    """An empty tensor after a non-empty one (an empty last output) is read back, not refused as out
    of bounds (the segment ends where the last non-empty tensor does)."""
    from backends.python import ipc

    packed = ipc.pack([("A", "FP32", np.arange(3, dtype=np.float32)), ("B", "FP32", np.zeros(0, np.float32))],
                      "inferd-test-e-")
    try:
        (_, _, a), (_, _, b) = ipc.unpack(packed, "inferd-test-e-")
        np.testing.assert_array_equal(a, [0, 1, 2])
        assert b.shape == (0,)
    finally:
        ipc.remove_segments("inferd-test-e-")
