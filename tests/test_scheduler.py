"""The scheduler seen from clients: dynamic batching, ordering, priorities, queue policies,
timeouts, cancellation and backend failures, against a real server with tritonclient.grpc."""

from __future__ import annotations

import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL_PY = Path(__file__).parent / "scheduler_model" / "model.py"

IO = """
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "DELAY_MS" data_type: TYPE_FP32 dims: [ 1 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "BATCH" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "SEQ" data_type: TYPE_INT64 dims: [ 1 ] }
]
backend: "python"
"""

MODELS = {
    # dynamic batching, one instance, a short delay so concurrent requests meet
    "batcher": "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n"
               "instance_group [ { kind: KIND_CPU count: 1 } ]",
    # waits up to 2 s for a batch of 4 unless the preferred size is reached
    "preferred": "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4 ] "
                 "max_queue_delay_microseconds: 2000000 }\ninstance_group [ { kind: KIND_CPU count: 1 } ]",
    # no dynamic batching, two instances: requests go straight to a free instance
    "nobatch": "max_batch_size: 8\ninstance_group [ { kind: KIND_CPU count: 2 } ]",
    "ordered": "max_batch_size: 1\ndynamic_batching { preserve_ordering: true }\n"
               "instance_group [ { kind: KIND_CPU count: 2 } ]",
    "unordered": "max_batch_size: 1\ndynamic_batching { }\ninstance_group [ { kind: KIND_CPU count: 2 } ]",
    "priority": "max_batch_size: 1\ndynamic_batching { priority_levels: 2 default_priority_level: 2 }\n"
                "instance_group [ { kind: KIND_CPU count: 1 } ]",
    "limited": "max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"
               "instance_group [ { kind: KIND_CPU count: 1 } ]",
    "reject": "max_batch_size: 1\ndynamic_batching { default_queue_policy { default_timeout_microseconds: "
              "300000 timeout_action: REJECT } }\ninstance_group [ { kind: KIND_CPU count: 1 } ]",
    "delayed": "max_batch_size: 1\ndynamic_batching { default_queue_policy { default_timeout_microseconds: "
               "300000 timeout_action: DELAY } }\ninstance_group [ { kind: KIND_CPU count: 1 } ]",
    "override": "max_batch_size: 1\ndynamic_batching { default_queue_policy { default_timeout_microseconds: "
                "60000000 allow_timeout_override: true } }\ninstance_group [ { kind: KIND_CPU count: 1 } ]",
    "queued": "max_batch_size: 1\ndynamic_batching { }\ninstance_group [ { kind: KIND_CPU count: 1 } ]",
}


@pytest.fixture(scope="module")
def sched(tmp_path_factory):
    from tests.harness import ServerProcess

    repo = tmp_path_factory.mktemp("sched") / "repo"
    for name, text in MODELS.items():
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(MODEL_PY, repo / name / "1" / "model.py")
        (repo / name / "config.pbtxt").write_text(text + IO)
    proc = ServerProcess([repo]).start(tmp_path_factory.mktemp("logs") / "inferd.log")
    proc.repo = repo
    yield proc
    proc.stop()


def _inputs(value: int, delay_ms: float = 0.0, width: int = 4, rows: int = 1):
    data = np.full((rows, width), value, dtype=np.int32)
    a = grpcclient.InferInput("INPUT0", list(data.shape), "INT32")
    a.set_data_from_numpy(data)
    d = grpcclient.InferInput("DELAY_MS", [rows, 1], "FP32")
    d.set_data_from_numpy(np.full((rows, 1), delay_ms, dtype=np.float32))
    return [a, d]


class Calls:
    """Concurrent tritonclient async_infer calls; results land in ``self.done`` as they finish."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.done: queue.Queue = queue.Queue()
        self.order: list[str] = []
        self._lock = threading.Lock()

    def send(self, model: str, tag: str, value: int, delay_ms: float = 0.0, **kwargs):
        def callback(result, error, tag=tag):
            with self._lock:
                self.order.append(tag)
            self.done.put((tag, result, error, time.monotonic()))

        return self.client.async_infer(model, _inputs(value, delay_ms, **{k: kwargs.pop(k) for k in
                                                                          ("width", "rows") if k in kwargs}),
                                       callback, **kwargs)

    def collect(self, n: int, timeout: float = 30.0) -> dict:
        out = {}
        for _ in range(n):
            tag, result, error, when = self.done.get(timeout=timeout)
            out[tag] = (result, error, when)
        return out


def _executed(sched, model: str) -> list[int]:
    path = sched.repo / model / "executed.log"
    return [int(v) for v in path.read_text().split()] if path.exists() else []


def test_concurrent_requests_each_get_their_own_slice(sched):
    calls = Calls(sched.grpc_url)
    for i in range(64):
        calls.send("batcher", str(i), i + 1)
    results = calls.collect(64)
    batches = []
    for i in range(64):
        result, error, _ = results[str(i)]
        assert error is None, error
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), 2 * (i + 1)))
        batches.append(int(result.as_numpy("BATCH")[0, 0]))
    assert max(batches) > 1, "concurrent requests were never batched"
    assert max(batches) <= 8
    stats = calls.client.get_inference_statistics("batcher", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) == 64
    assert int(stats["execution_count"]) < 64


def test_incompatible_shapes_run_in_separate_batches(sched):
    calls = Calls(sched.grpc_url)
    calls.send("preferred", "blocker", 100, 400)  # alone: the preferred size is not reached...
    time.sleep(0.1)
    for i in range(4):  # ...then four requests of two widths that cannot share a batch
        calls.send("preferred", f"w{i}", 200 + i, width=3 if i % 2 else 5)
    for i in range(4, 8):
        calls.send("preferred", f"w{i}", 200 + i, width=3 if i % 2 else 5)
    results = calls.collect(9, timeout=20)
    for i in range(8):
        result, error, _ = results[f"w{i}"]
        assert error is None, error
        width = 3 if i % 2 else 5
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, width), 2 * (200 + i)))
        assert int(result.as_numpy("BATCH")[0, 0]) == 4  # four of each width, never mixed or padded


def test_preferred_batch_size_is_sent_without_waiting_for_the_delay(sched):
    calls = Calls(sched.grpc_url)
    start = time.monotonic()
    for i in range(4):
        calls.send("preferred", f"p{i}", 300 + i)
    results = calls.collect(4, timeout=20)
    assert all(int(r[0].as_numpy("BATCH")[0, 0]) == 4 for r in results.values())
    assert max(r[2] for r in results.values()) - start < 1.5  # well before the 2 s queue delay


def test_queue_delay_gathers_a_batch_then_sends_what_it_has(sched):
    calls = Calls(sched.grpc_url)
    start = time.monotonic()
    for i in range(3):
        calls.send("preferred", f"d{i}", 400 + i)
    results = calls.collect(3, timeout=20)
    assert all(int(r[0].as_numpy("BATCH")[0, 0]) == 3 for r in results.values())
    assert min(r[2] for r in results.values()) - start >= 1.9  # held for max_queue_delay (2 s)


def test_without_dynamic_batching_instances_run_requests_in_parallel(sched):
    calls = Calls(sched.grpc_url)
    start = time.monotonic()
    calls.send("nobatch", "a", 1, 800)
    calls.send("nobatch", "b", 2, 800)
    results = calls.collect(2)
    assert all(int(r[0].as_numpy("BATCH")[0, 0]) == 1 for r in results.values())
    assert max(r[2] for r in results.values()) - start < 1.5  # two instances, not 1.6 s in a row


@pytest.mark.parametrize("model, ordered", [("ordered", True), ("unordered", False)])
def test_preserve_ordering(sched, model, ordered):
    calls = Calls(sched.grpc_url)
    calls.send(model, "slow", 1, 800)
    time.sleep(0.2)
    calls.send(model, "fast", 2, 0)
    calls.collect(2)
    assert calls.order == (["slow", "fast"] if ordered else ["fast", "slow"])


def test_priority_levels(sched):
    calls = Calls(sched.grpc_url)
    calls.send("priority", "blocker", 1, 600)
    time.sleep(0.2)
    for i in range(3):
        calls.send("priority", f"low{i}", 10 + i, 50)
        # concurrent RPCs reach the handlers in the order their messages are read, not sent: a gap
        # makes the arrival order the sending order (the blocker runs 600 ms)
        time.sleep(0.05)
    calls.send("priority", "high", 99, 50, priority=1)
    results = calls.collect(5)
    seq = {tag: int(r[0].as_numpy("SEQ")[0, 0]) for tag, r in results.items()}
    assert seq["blocker"] < seq["high"] < min(seq[f"low{i}"] for i in range(3))
    assert seq["low0"] < seq["low1"] < seq["low2"]


def test_priority_out_of_range_is_rejected(sched):
    client = grpcclient.InferenceServerClient(sched.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        client.infer("priority", _inputs(1), priority=7)
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "priority 7" in err.value.message()


def test_max_queue_size_rejects_with_unavailable(sched):
    calls = Calls(sched.grpc_url)
    calls.send("limited", "running", 1, 800)
    time.sleep(0.2)
    calls.send("limited", "q1", 2)
    calls.send("limited", "q2", 3)
    time.sleep(0.2)
    calls.send("limited", "over", 4)
    results = calls.collect(4)
    error = results["over"][1]
    assert error is not None and "UNAVAILABLE" in str(error.status())
    assert "exceeds maximum queue size" in error.message().lower()
    assert all(results[t][1] is None for t in ("running", "q1", "q2"))


def test_queue_timeout_reject_is_never_executed(sched):
    calls = Calls(sched.grpc_url)
    calls.send("reject", "running", 1, 900)
    time.sleep(0.2)
    calls.send("reject", "late", 555)
    results = calls.collect(2)
    error = results["late"][1]
    assert error is not None and "UNAVAILABLE" in str(error.status())
    assert "timeout expired" in error.message().lower()
    assert results["late"][2] < results["running"][2]  # rejected while the blocker still ran
    assert 555 not in _executed(sched, "reject")


def test_queue_timeout_delay_runs_after_the_others(sched):
    calls = Calls(sched.grpc_url)
    calls.send("delayed", "running", 1, 900)
    time.sleep(0.1)
    calls.send("delayed", "expires", 2)  # times out (300 ms) while the blocker runs
    time.sleep(0.6)
    calls.send("delayed", "fresh", 3)  # arrives later but has not timed out
    results = calls.collect(3)
    assert all(r[1] is None for r in results.values())
    seq = {tag: int(r[0].as_numpy("SEQ")[0, 0]) for tag, r in results.items()}
    assert seq["running"] < seq["fresh"] < seq["expires"]


def test_request_timeout_override(sched):
    calls = Calls(sched.grpc_url)
    calls.send("override", "running", 1, 900)
    time.sleep(0.2)
    calls.send("override", "short", 777, timeout=100000)  # 100 ms, below the 60 s default
    results = calls.collect(2)
    error = results["short"][1]
    assert error is not None and "timeout expired" in error.message().lower()
    assert 777 not in _executed(sched, "override")


def test_cancelled_request_leaves_the_queue_unexecuted(sched):
    calls = Calls(sched.grpc_url)
    calls.send("queued", "running", 1, 800)
    time.sleep(0.2)
    ctx = calls.send("queued", "cancelled", 4242)
    time.sleep(0.1)
    ctx.cancel()
    results = calls.collect(2)
    assert results["running"][1] is None
    assert results["cancelled"][1] is not None and "CANCELLED" in str(results["cancelled"][1].status())
    time.sleep(0.3)
    assert 4242 not in _executed(sched, "queued")


def test_deadline_passed_in_queue_is_not_executed(sched):
    calls = Calls(sched.grpc_url)
    calls.send("queued", "running", 1, 800)
    time.sleep(0.2)
    calls.send("queued", "deadline", 4343, client_timeout=0.2)
    results = calls.collect(2)
    assert "DEADLINE_EXCEEDED" in str(results["deadline"][1].status())
    time.sleep(0.8)
    assert 4343 not in _executed(sched, "queued")
    stats = calls.client.get_inference_statistics("queued", as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["fail"]["count"]) >= 1


def test_backend_failure_fails_its_batch_with_internal_and_the_model_keeps_serving(sched):
    client = grpcclient.InferenceServerClient(sched.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        client.infer("batcher", _inputs(-5))
    assert "INTERNAL" in str(err.value.status())
    assert "negative input -5" in err.value.message()
    result = client.infer("batcher", _inputs(21))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), 42))


def test_rest_client_that_disconnects_while_queued_is_never_executed(sched):
    """A REST client that gives up while its request waits in the queue: the request leaves the queue
    (aiohttp cancels the handler on disconnect) and never runs; the model stays free for others."""
    import json
    import socket

    calls = Calls(sched.grpc_url)
    calls.send("queued", "running", 2, 800)
    time.sleep(0.2)
    host, port = sched.http_url.split(":")
    body = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 4], "datatype": "INT32", "data": [7373] * 4},
        {"name": "DELAY_MS", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}]}).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v2/models/queued/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    time.sleep(0.2)  # it is queued behind the 800 ms request
    sock.close()  # the client gives up
    calls.collect(1)
    time.sleep(0.5)
    assert 7373 not in _executed(sched, "queued")
    stats = calls.client.get_inference_statistics("queued", as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["fail"]["count"]) >= 1
