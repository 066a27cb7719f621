"""The llm backend through a real server: ModelStreamInfer (tritonclient grpc streams), the generate
extension, limits and errors, per-request accounting, and the vllm:* metrics under cancellation."""

from __future__ import annotations

import http.client
import json
import queue

import numpy as np
import pytest
import transformers  # noqa: F401 - the llm backend needs it (dev extra): missing fails, not skips
import tritonclient.grpc as grpcclient

from tests import llm_helpers as h
from tests.harness import ServerProcess

PROMPT = "The server listens on two ports."


@pytest.fixture(scope="module")
def tok():
    return h.tokenizer()


def _grpc_inputs(prompt: str, sampling: dict, stream: bool = True) -> list:
    def tensor(name, value, datatype):
        t = grpcclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else np.bool_))
        return t

    return [tensor("text_input", prompt.encode(), "BYTES"), tensor("stream", stream, "BOOL"),
            tensor("sampling_parameters", json.dumps(sampling).encode(), "BYTES"),
            tensor("exclude_input_in_output", True, "BOOL"), tensor("return_num_input_tokens", True, "BOOL"),
            tensor("return_num_output_tokens", True, "BOOL")]


def _post(server: ServerProcess, path: str, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.http_url, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_grpc_stream_deltas_add_up_to_the_whole_answer(llm_server, tok):
    sampling = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(llm_server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("llm", _grpc_inputs(PROMPT, sampling), request_id="r1",
                                  enable_empty_final_response=True)
        texts, out_tokens, in_tokens, final = [], 0, None, None
        while final is None:
            result, error = results.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            assert response.id == "r1"
            if result.as_numpy("text_output") is not None:
                texts.append(result.as_numpy("text_output")[0].decode())
                out_tokens += int(result.as_numpy("num_output_tokens")[0])
                in_tokens = int(result.as_numpy("num_input_tokens")[0])
            if response.parameters["triton_final_response"].bool_param:
                final = response
    finally:
        client.stop_stream()
        client.close()
    assert len(texts) > 1  # streamed: several responses
    assert out_tokens == 12 and in_tokens == len(tok(PROMPT)["input_ids"])
    assert final.parameters["completion_tokens"].int64_param == 12
    assert final.parameters["finish_reason"].string_param == "length"
    # the same request, not streamed, through the generate extension: one response, same text
    status, body = _post(llm_server, "/v2/models/llm/generate",
                         {"text_input": PROMPT, "sampling_parameters": json.dumps(sampling),
                          "exclude_input_in_output": True})
    assert status == 200, body
    assert json.loads(body)["text_output"] == "".join(texts)


def test_generate_stream_events_and_accounting(llm_server, tok):
    body = {"text_input": PROMPT, "stream": True,
            "parameters": {"temperature": 0, "max_tokens": 10, "ignore_eos": True}}
    status, data = _post(llm_server, "/v2/models/llm/generate_stream", body)
    assert status == 200
    events = [json.loads(line[len(b"data: "):]) for line in data.split(b"\n\n") if line.startswith(b"data: ")]
    assert len(events) > 1 and all("error" not in e for e in events)
    last = events[-1]
    assert last["prompt_tokens"] == len(tok(PROMPT)["input_ids"]) and last["completion_tokens"] == 10
    for key in ("queue_time_us", "time_to_first_token_us", "time_per_output_token_us", "compute_time_us"):
        assert last[key] >= 0
    assert last["time_to_first_token_us"] <= last["e2e_time_us"]
    # streaming without exclude_input_in_output sends no prompt; not streaming prepends it (vLLM backend rule)
    assert not "".join(e["text_output"] for e in events).startswith(PROMPT)
    status, data = _post(llm_server, "/v2/models/llm/generate",
                         {"text_input": PROMPT, "parameters": {"temperature": 0, "max_tokens": 3}})
    assert status == 200 and json.loads(data)["text_output"].startswith(PROMPT)


@pytest.mark.parametrize("body, status, words", [
    ({"text_input": "hi", "parameters": {"max_tokens": 5000}},
     400, ["max_tokens (5000)", "max_model_len 1024", "4096 tokens"]),
    ({"text_input": "hi", "sampling_parameters": "{not json"}, 400, ["sampling_parameters", "JSON"]),
    ({"text_input": "hi", "sampling_parameters": json.dumps({"temperature": -1})}, 400, ["temperature"]),
    ({"text_input": "hi", "sampling_parameters": json.dumps({"beam_width": 3})}, 400, ["beam_width"]),
    ({"text_input": "hi", "messages": "[]"}, 400, ["text_input", "messages"]),
    ({"text_input": "", "messages": json.dumps([{"role": "wizard", "content": "x"}])}, 400, ["role"]),
])
def test_bad_requests_get_400_naming_the_problem(llm_server, body, status, words):
    got, data = _post(llm_server, "/v2/models/llm/generate", body)
    assert got == status, data
    message = json.loads(data)["error"]
    for word in words:
        assert word in message


def test_cancelling_a_stream_frees_its_sequence_and_cache(llm_server):
    labels = {"model": "llm", "version": "1"}
    before = h.wait_metric(llm_server.metrics_port, "vllm:num_requests_running", 0, **labels)
    aborted_before = h.metric(before, "vllm:request_success_total", finished_reason="abort", **labels)
    conn = http.client.HTTPConnection(llm_server.http_url, timeout=60)
    try:
        conn.request("POST", "/v2/models/llm/generate_stream",
                     json.dumps({"text_input": PROMPT, "stream": True,
                                 "parameters": {"temperature": 0, "max_tokens": 1000, "ignore_eos": True}}))
        response = conn.getresponse()
        assert response.status == 200
        response.fp.readline()  # the first event: it is generating (1000 tokens take a while)
        samples = h.scrape(llm_server.metrics_port)
        assert h.metric(samples, "vllm:num_requests_running", **labels) == 1
        assert h.metric(samples, "vllm:kv_cache_usage_perc", **labels) > 0
    finally:
        conn.sock.close()  # the client goes away mid-stream
        conn.close()
    samples = h.wait_metric(llm_server.metrics_port, "vllm:num_requests_running", 0, **labels)
    assert h.metric(samples, "vllm:num_requests_running", **labels) == 0
    assert h.metric(samples, "vllm:kv_cache_usage_perc", **labels) == 0
    assert h.metric(samples, "vllm:request_success_total", finished_reason="abort", **labels) == aborted_before + 1
    assert h.metric(samples, "vllm:generation_tokens_total", **labels) < 1000 + h.metric(
        before, "vllm:generation_tokens_total", **labels)


def test_metrics_count_tokens_and_latencies(llm_server, tok):
    labels = {"model": "llm", "version": "1"}
    before = h.wait_metric(llm_server.metrics_port, "vllm:num_requests_running", 0, **labels)
    status, _ = _post(llm_server, "/v2/models/llm/generate",
                      {"text_input": PROMPT, "parameters": {"temperature": 0, "max_tokens": 7, "ignore_eos": True}})
    assert status == 200
    after = h.scrape(llm_server.metrics_port)

    def grew(name: str, **extra) -> float:
        return h.metric(after, name, **labels, **extra) - h.metric(before, name, **labels, **extra)

    assert grew("vllm:prompt_tokens_total") == len(tok(PROMPT)["input_ids"])
    assert grew("vllm:generation_tokens_total") == 7
    assert grew("vllm:time_to_first_token_seconds_count") == 1
    assert grew("vllm:inter_token_latency_seconds_count") == 6
    assert grew("vllm:e2e_request_latency_seconds_count") == 1
    assert grew("vllm:request_queue_time_seconds_count") == 1
    assert grew("vllm:request_success_total", finished_reason="length") == 1
    assert h.metric(after, "vllm:num_preemptions_total", **labels) == 0


@pytest.mark.gpu
def test_gpu_instance_generates(tmp_path, start_server):
    """KIND_GPU puts the engine (weights, KV cache, sampling) on CUDA: it generates the asked length,
    and seeded sampling (a CUDA generator) repeats itself."""
    repo = h.llm_repository(tmp_path / "repo")
    config = (repo / "llm" / "config.pbtxt").read_text().replace("KIND_CPU", "KIND_GPU")
    (repo / "llm" / "config.pbtxt").write_text(config)
    gpu = start_server([repo])
    body = {"text_input": PROMPT, "parameters": {"temperature": 0, "max_tokens": 8, "ignore_eos": True}}
    status, data = _post(gpu, "/v2/models/llm/generate", body)
    assert status == 200, data
    doc = json.loads(data)
    assert doc["completion_tokens"] == 8
    seeded = {**body, "parameters": {**body["parameters"], "temperature": 1.0, "seed": 3}}
    assert _post(gpu, "/v2/models/llm/generate", seeded)[1] == _post(gpu, "/v2/models/llm/generate", seeded)[1]


def test_grpc_stream_cancel_frees_the_sequence(llm_server):
    labels = {"model": "llm", "version": "1"}
    h.wait_metric(llm_server.metrics_port, "vllm:num_requests_running", 0, **labels)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(llm_server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("llm", _grpc_inputs(PROMPT, {"temperature": 0, "max_tokens": 1000,
                                                               "ignore_eos": True}), request_id="long")
        result, error = results.get(timeout=60)  # it is generating
        assert error is None
        samples = h.scrape(llm_server.metrics_port)
        assert h.metric(samples, "vllm:num_requests_running", **labels) == 1
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    samples = h.wait_metric(llm_server.metrics_port, "vllm:num_requests_running", 0, **labels)
    assert h.metric(samples, "vllm:num_requests_running", **labels) == 0
    assert h.metric(samples, "vllm:kv_cache_usage_perc", **labels) == 0
