"""Frontend workers (``--frontend-workers 2``) seen from outside: decoupled streams through
ModelStreamInfer and generate_stream, statistics and /metrics with global counts, explicit
load/unload answered the same by every worker, trace context across the process boundary."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.harness import ROOT, ServerProcess
from tests.test_triton_python import (  # noqa: F401 - collected here against the workers server
    test_async_execute_decoupled,
    test_bls_calls_other_models,
    test_cancelling_the_stream_stops_the_model,
    test_decoupled_models_refuse_unary_calls,
    test_decoupled_stream_interleaves_and_flags_finals,
    test_default_mode_add_sub,
    test_flags_only_final_is_not_written_by_default,
)

MODELS = ROOT / "tests" / "triton_models"


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    """The Triton Python-backend test models (decoupled ones included) behind two workers, in
    explicit control mode so that load and unload can be driven too."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    shutil.copytree(MODELS, repo)
    proc = ServerProcess([repo], "--frontend-workers", "2", "--model-control-mode", "explicit",
                         "--load-model", "*")
    proc.start(tmp_path_factory.mktemp("logs") / "inferd.log", timeout=120)
    yield proc
    assert proc.stop() == 0


def _worker_pids(server: ServerProcess) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, out.split()):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return pids


def _fresh_stub(server: ServerProcess):
    """A new connection: SO_REUSEPORT hands each new connection to one of the workers."""
    channel = grpc.insecure_channel(server.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def _add_sub_request(values: list[float]) -> pb.ModelInferRequest:
    a = np.asarray([values], dtype=np.float32)
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(a.tobytes())
    return request


def _metric(server: ServerProcess, prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_workers_run(triton_server):
    assert len(_worker_pids(triton_server)) == 2
    assert triton_server.log().count("is listening") >= 2


def test_generate_stream_through_a_worker(triton_server):
    body = json.dumps({"IN": [7, 8, 9], "DELAY_MS": 0}).encode()
    url = f"http://{triton_server.http_url}/v2/models/repeat/generate_stream"
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        lines = reply.read().decode().splitlines()
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert [e["OUT"] for e in events] == [7, 8, 9]
    assert [e["IDX"] for e in events] == [0, 1, 2]


def test_statistics_and_metrics_are_global(triton_server):
    """Requests spread over both workers (a new connection each); every worker reports the sum."""
    def count(stub) -> int:
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub"), timeout=10).model_stats[0]
        return stats.inference_stats.success.count

    channel, stub = _fresh_stub(triton_server)
    with channel:
        before = count(stub)
    metric_before = _metric(triton_server, 'nv_inference_request_success{model="add_sub"')
    sent = 40
    for i in range(sent):
        channel, stub = _fresh_stub(triton_server)
        with channel:
            reply = stub.ModelInfer(_add_sub_request([i, 1, 2, 3]), timeout=30)
            out = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
            assert out.tolist() == [2 * i, 2, 4, 6]
    seen = set()
    for _ in range(8):  # several connections: both workers answer with the engine's one count
        channel, stub = _fresh_stub(triton_server)
        with channel:
            seen.add(count(stub) - before)
    assert seen == {sent}
    stats_url = f"http://{triton_server.http_url}/v2/models/add_sub/stats"
    with urllib.request.urlopen(stats_url, timeout=10) as reply:
        doc = json.loads(reply.read())
    assert doc["model_stats"][0]["inference_stats"]["success"]["count"] - before == sent
    assert _metric(triton_server, 'nv_inference_request_success{model="add_sub"') - metric_before == sent


def test_load_and_unload_in_explicit_mode_seen_by_every_worker(triton_server):
    def ready_everywhere() -> set[bool]:
        answers = set()
        for _ in range(6):
            channel, stub = _fresh_stub(triton_server)
            with channel:
                answers.add(stub.ModelReady(pb.ModelReadyRequest(name="add_sub"), timeout=10).ready)
        return answers

    with grpcclient.InferenceServerClient(triton_server.grpc_url) as c:
        c.unload_model("add_sub")
        assert ready_everywhere() == {False}
        index = {m.name: m.state for m in c.get_model_repository_index().models}
        assert index["add_sub"] == "UNAVAILABLE"
        # a load with a configuration override: the JSON parameter crosses the worker channel
        def tensors(*names: str) -> list[dict]:
            return [{"name": n, "data_type": "TYPE_FP32", "dims": [4]} for n in names]

        config = json.dumps({"backend": "python", "max_batch_size": 8, "input": tensors("INPUT0", "INPUT1"),
                             "output": tensors("OUTPUT0", "OUTPUT1")})
        c.load_model("add_sub", config=config)
        assert ready_everywhere() == {True}
        assert c.get_model_config("add_sub").config.max_batch_size == 8
    # REST load/unload reach the engine too; a model the repository lacks is NOT_FOUND, as in one process
    assert _http_post(triton_server, "/v2/repository/models/add_sub/unload") == (200, {})
    status, doc = _http_post(triton_server, "/v2/repository/models/nonexistent/load")
    assert status == 404 and "nonexistent" in doc["error"]
    assert _http_post(triton_server, "/v2/repository/models/add_sub/load") == (200, {})
    assert ready_everywhere() == {True}


def _http_post(server: ServerProcess, path: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{server.http_url}{path}", b"{}",
                                     {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            body = reply.read()
            return reply.status, json.loads(body) if body.strip() else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_trace_settings_are_global(triton_server):
    channel, stub = _fresh_stub(triton_server)
    with channel:
        request = pb.TraceSettingRequest(model_name="add_sub")
        request.settings["trace_rate"].value.append("7")
        stub.TraceSetting(request, timeout=10)
    for _ in range(6):
        channel, stub = _fresh_stub(triton_server)
        with channel:
            got = stub.TraceSetting(pb.TraceSettingRequest(model_name="add_sub"), timeout=10)
            assert list(got.settings["trace_rate"].value) == ["7"]
    assert "Traceback" not in triton_server.log(), triton_server.log()[-4000:]
