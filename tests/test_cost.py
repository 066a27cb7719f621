"""Cost per request over real clients: the figures in responses (asked with ``inferd_cost``) add up
to each batch's measured compute time and to the statistics extension's, and Prometheus aggregates
them per model, version and caller (x-inferd-tenant); language-model tokens pass through."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from collections import defaultdict

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.lifecycle_helpers import offset_model

# dynamic batching that waits a little, so concurrent requests share batches
_BATCHED = """
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
"""

_LLM_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "PROMPT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
"""
# a stand-in for a language-model backend: it reports its token counts as response parameters
_LLM_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            prompt = pb_utils.get_input_tensor_by_name(r, "PROMPT").as_numpy()[0].decode()
            words = prompt.split()
            text = np.array([" ".join(reversed(words)).encode()], dtype=np.object_)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", text)],
                       parameters={"prompt_tokens": len(words), "completion_tokens": 2 * len(words)}))
        return out
"""


@pytest.fixture
def cost_server(tmp_path, start_server):
    root = tmp_path / "repo"
    offset_model(root / "b" / "1" / "model.onnx", 1.0)
    (root / "b" / "config.pbtxt").write_text(_BATCHED)
    (root / "llm" / "1").mkdir(parents=True)
    (root / "llm" / "1" / "model.py").write_text(_LLM_MODEL)
    (root / "llm" / "config.pbtxt").write_text(_LLM_CONFIG)
    return start_server([root])


def _metrics(proc) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()


def _sample(text: str, family: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(family + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {family}{labels}")


def _batch_compute_ns(client, model: str) -> tuple[int, int]:
    """(sum of every executed batch's compute time, executions) from the statistics extension."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    total = sum(int(b[k].get("ns", 0)) for b in stats.get("batch_stats", [])
                for k in ("compute_input", "compute_infer", "compute_output"))
    return total, int(stats.get("execution_count", 0))


def test_cost_figures_add_up_to_batch_compute(cost_server):
    client = grpcclient.InferenceServerClient(cost_server.grpc_url)
    done: queue.Queue = queue.Queue()
    sent = []
    for i in range(96):
        size = 2 if i % 3 == 0 else 1
        inp = grpcclient.InferInput("INPUT0", [size, 4], "FP32")
        inp.set_data_from_numpy(np.full((size, 4), i, dtype=np.float32))
        tenant = ("team-a", "team-b")[i % 2]
        client.async_infer("b", [inp], lambda result, error: done.put((result, error)), request_id=str(i),
                           parameters={"inferd_cost": True}, headers={"x-inferd-tenant": tenant})
        sent.append((size, tenant))
    results = [done.get(timeout=60) for _ in sent]
    assert all(error is None for _, error in results), [e for _, e in results if e][:2]
    figures: list[dict] = [{} for _ in sent]  # in the order sent (callbacks come as requests finish)
    size_of = {}  # the response's own batch size is its OUTPUT0 rows
    for result, _ in results:
        params = result.get_response().parameters
        f = figures[int(result.get_response().id)]
        f.update({k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in params.items()})
        size_of[id(f)] = result.as_numpy("OUTPUT0").shape[0]
        assert size_of[id(f)] == sent[int(result.get_response().id)][0]
    by_batch: dict[float, list[dict]] = defaultdict(list)
    for f in figures:
        assert f["inferd_cost_queue_seconds"] >= 0 and f["inferd_cost_memory_bytes"] > 0
        expected = f["inferd_cost_batch_compute_seconds"] * size_of[id(f)] / f["inferd_cost_batch_size"]
        assert f["inferd_cost_compute_seconds"] == pytest.approx(expected, rel=1e-9)
        gib_s = f["inferd_cost_memory_bytes"] / 2**30 * f["inferd_cost_compute_seconds"]
        assert f["inferd_cost_memory_gib_seconds"] == pytest.approx(gib_s, rel=1e-9)
        by_batch[(f["inferd_cost_batch_compute_seconds"], f["inferd_cost_batch_size"])].append(f)
    assert any(size > 2 for _, size in by_batch), "no request shared a batch"
    for (batch_s, batch_size), members in by_batch.items():
        if sum(size_of[id(m)] for m in members) == batch_size:  # (a collision of two equal timings is harmless)
            assert sum(m["inferd_cost_compute_seconds"] for m in members) == pytest.approx(batch_s, rel=1e-6)
    # the sum over all requests equals the batches' compute time the statistics extension measured
    stats_ns, executions = _batch_compute_ns(client, "b")
    total = sum(f["inferd_cost_compute_seconds"] for f in figures)
    assert executions < len(sent)
    assert abs(total - stats_ns / 1e9) <= 0.05 * stats_ns / 1e9, (total, stats_ns / 1e9)
    # Prometheus: per caller, the same sums
    text = _metrics(cost_server)
    for tenant in ("team-a", "team-b"):
        mine = sum(f["inferd_cost_compute_seconds"] for f, (_, t) in zip(figures, sent) if t == tenant)
        got = _sample(text, "inferd_cost_compute_seconds_total", model="b", version="1", caller=tenant)
        assert got == pytest.approx(mine, rel=1e-6)
        assert _sample(text, "inferd_cost_memory_gib_seconds_total", model="b", version="1", caller=tenant) > 0
        queued = sum(f["inferd_cost_queue_seconds"] for f, (_, t) in zip(figures, sent) if t == tenant)
        got = _sample(text, "inferd_cost_queue_seconds_total", model="b", version="1", caller=tenant)
        assert got == pytest.approx(queued, rel=1e-6) and got > 0


def test_cost_over_rest_and_bad_values(cost_server):
    url = f"http://{cost_server.http_url}/v2/models/b/infer"

    def post(parameters: dict, headers: dict | None = None):
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
                "parameters": parameters}
        request = urllib.request.Request(url, json.dumps(body).encode(), headers or {}, method="POST")
        return urllib.request.urlopen(request, timeout=30)

    reply = json.loads(post({"inferd_cost": True}).read())
    assert reply["parameters"]["inferd_cost_batch_size"] == 1
    assert reply["parameters"]["inferd_cost_compute_seconds"] > 0
    assert "inferd_cost_compute_seconds" not in json.loads(post({}).read()).get("parameters", {})
    with pytest.raises(urllib.error.HTTPError) as info:
        post({"inferd_cost": "yes"})
    assert info.value.code == 400 and "'inferd_cost' must be a boolean" in json.loads(info.value.read())["error"]
    text = _metrics(cost_server)  # requests without x-inferd-tenant count as "anonymous"
    assert _sample(text, "inferd_cost_compute_seconds_total", model="b", caller="anonymous") > 0


def test_tokens_pass_through_and_are_counted(cost_server):
    client = grpcclient.InferenceServerClient(cost_server.grpc_url)
    inp = grpcclient.InferInput("PROMPT", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"one two three"], dtype=np.object_))
    for _ in range(3):
        result = client.infer("llm", [inp], parameters={"inferd_cost": True}, headers={"x-inferd-tenant": "t"})
    params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in result.get_response().parameters.items()}
    assert params["prompt_tokens"] == 3 and params["completion_tokens"] == 6  # the model's own, passed through
    assert params["inferd_cost_prompt_tokens"] == 3 and params["inferd_cost_completion_tokens"] == 6
    text = _metrics(cost_server)
    assert _sample(text, "inferd_cost_tokens_total", model="llm", caller="t", kind="prompt") == 9
    assert _sample(text, "inferd_cost_tokens_total", model="llm", caller="t", kind="completion") == 18


def test_cost_on_a_stream(cost_server):
    """ModelStreamInfer: the final response of each request carries its figures; the caller comes
    from the stream's metadata."""
    client = grpcclient.InferenceServerClient(cost_server.grpc_url)
    done: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: done.put((result, error)), headers={"x-inferd-tenant": "streamer"})
    try:
        for i in range(5):
            inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
            inp.set_data_from_numpy(np.full((1, 4), i, dtype=np.float32))
            client.async_stream_infer("b", [inp], request_id=str(i), parameters={"inferd_cost": True})
        replies = [done.get(timeout=30) for _ in range(5)]
    finally:
        client.stop_stream()
    total = 0.0
    for result, error in replies:
        assert error is None
        params = result.get_response().parameters
        assert params["inferd_cost_batch_size"].int64_param >= 1
        total += params["inferd_cost_compute_seconds"].double_param
    got = _sample(_metrics(cost_server), "inferd_cost_compute_seconds_total", model="b", caller="streamer")
    assert got == pytest.approx(total, rel=1e-6)


def test_with_api_keys_the_key_decides_the_caller(tmp_path, start_server):
    """A client holding tenant alice's key cannot bill bob by sending x-inferd-tenant: bob (gRPC, REST)."""
    root = tmp_path / "repo"
    offset_model(root / "b" / "1" / "model.onnx", 1.0)
    (root / "b" / "config.pbtxt").write_text(_BATCHED)
    keys = tmp_path / "keys"
    keys.write_text("alice:alice-secret-key-0123456789\n")
    proc = start_server([root], f"--api-key-file={keys}")
    auth = {"authorization": "Bearer alice-secret-key-0123456789", "x-inferd-tenant": "bob"}
    with grpcclient.InferenceServerClient(proc.grpc_url) as client:
        inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        client.infer("b", [inp], parameters={"inferd_cost": True}, headers=auth)
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    request = urllib.request.Request(f"http://{proc.http_url}/v2/models/b/infer", json.dumps(body).encode(),
                                     {"Authorization": auth["authorization"], "x-inferd-tenant": "bob"},
                                     method="POST")
    urllib.request.urlopen(request, timeout=30).read()
    text = _metrics(proc)
    assert _sample(text, "inferd_cost_compute_seconds_total", model="b", version="1", caller="alice") > 0
    assert "caller=\"bob\"" not in text
