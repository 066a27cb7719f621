"""model.py files written for Triton's Python backend run unchanged: default mode, decoupled
streams, BLS (sync, async, decoupled), auto_complete_config, custom metrics, Logger, error
texts; driven by tritonclient grpc (streams) and http."""

from __future__ import annotations

import queue
import shutil
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.harness import ROOT, ServerProcess
from tests.http_helpers import sample, scrape

MODELS = ROOT / "tests" / "triton_models"


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "repo"
    shutil.copytree(MODELS, repo)
    proc = ServerProcess([repo])
    proc.start(tmp_path_factory.mktemp("logs") / "inferd.log")
    yield proc
    proc.stop()


def _fp32(name, values, client=grpcclient):
    array = np.asarray(values, dtype=np.float32)
    tensor = client.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def _int32(name, values, client=grpcclient):
    array = np.asarray(values, dtype=np.int32)
    tensor = client.InferInput(name, list(array.shape), "INT32")
    tensor.set_data_from_numpy(array)
    return tensor


def _text(name, value, client=grpcclient):
    tensor = client.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
    return tensor


# ---------------------------------------------------------------- default mode


@pytest.mark.parametrize("client", [grpcclient, httpclient], ids=["grpc", "http"])
def test_default_mode_add_sub(triton_server, client):
    url = triton_server.grpc_url if client is grpcclient else triton_server.http_url
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), dtype=np.float32)
    with client.InferenceServerClient(url) as c:
        result = c.infer("add_sub", [_fp32("INPUT0", a, client), _fp32("INPUT1", b, client)], request_id="r1")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        params = result.get_response()["parameters"] if client is httpclient else {
            k: v.string_param for k, v in result.get_response().parameters.items()}
        assert params["instance_kind"] == "CPU" and params["request_id"] == "r1"
        with pytest.raises(InferenceServerException) as error:  # a TritonError code maps to its status
            c.infer("add_sub", [_fp32("INPUT0", a, client), _fp32("INPUT1", b, client)], parameters={"fail": True})
        assert "asked to fail" in error.value.message()
        assert error.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")


def test_auto_complete_config_fills_the_config(triton_server):
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as c:
        config = c.get_model_config("auto_complete", as_json=True)["config"]
        assert config["max_batch_size"] == 4 and "dynamic_batching" in config
        assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("X", "TYPE_FP32", ["3"])]
        x = np.array([[1, 2, 3]], dtype=np.float32)
        np.testing.assert_array_equal(c.infer("auto_complete", [_fp32("X", x)]).as_numpy("Y"), x * 2)


# ---------------------------------------------------------------- BLS


@pytest.mark.parametrize("mode, expected, count", [
    ("sync", [1, 2, 3, 4], 1),      # add_sub(x, 1)
    ("stream", [6, 6, 6, 6], 4),   # the decoupled repeat model streams 0,1,2,3 -> their sum
])
def test_bls_calls_other_models(triton_server, mode, expected, count):
    with httpclient.InferenceServerClient(triton_server.http_url) as c:
        x = np.arange(4, dtype=np.float32)
        result = c.infer("bls", [_text("MODE", mode, httpclient), _fp32("INPUT0", x, httpclient),
                                 _fp32("INPUT1", np.ones(4), httpclient)])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.array(expected, np.float32))
        assert result.as_numpy("COUNT")[0] == count


def test_bls_error_and_async_exec(triton_server):
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as c:
        with pytest.raises(InferenceServerException) as error:
            c.infer("bls", [_text("MODE", "missing"), _fp32("INPUT0", np.zeros(4)), _fp32("INPUT1", np.zeros(4))])
        assert "no_such_model" in error.value.message() and error.value.status() == "StatusCode.NOT_FOUND"
        x = np.array([1, 2, 3, 4], dtype=np.float32)
        result = c.infer("async_bls", [_fp32("INPUT0", x)])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), (x + 1) + (x + 2))


# ---------------------------------------------------------------- decoupled streams


def _stream(url, sends, *, empty_final=False, timeout=20):
    """Send (model, inputs, id) requests on one stream; collect until every id saw its final."""
    answers: queue.Queue = queue.Queue()
    got: list = []
    with grpcclient.InferenceServerClient(url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        for model, inputs, request_id in sends:
            c.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=empty_final)
        open_ids = {request_id for _, _, request_id in sends}
        deadline = time.monotonic() + timeout
        while open_ids:
            result, error = answers.get(timeout=max(0.1, deadline - time.monotonic()))
            got.append((result, error))
            if error is not None:
                continue
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                open_ids.discard(response.id)
        c.stop_stream()
    return got


def test_decoupled_stream_interleaves_and_flags_finals(triton_server):
    sends = [("repeat", [_int32("IN", [10, 11, 12]), _int32("DELAY_MS", [30])], "a"),
             ("repeat", [_int32("IN", [20, 21]), _int32("DELAY_MS", [30])], "b")]
    got = _stream(triton_server.grpc_url, sends, empty_final=True)
    assert all(error is None for _, error in got)
    by_id: dict[str, list] = {"a": [], "b": []}
    order = []
    for result, _ in got:
        response = result.get_response()
        order.append(response.id)
        final = response.parameters["triton_final_response"].bool_param
        outputs = {o.name for o in response.outputs}
        by_id[response.id].append((final, int(result.as_numpy("OUT")[0]) if outputs else None))
    assert by_id["a"] == [(False, 10), (False, 11), (False, 12), (True, None)]
    assert by_id["b"] == [(False, 20), (False, 21), (True, None)]
    assert order[:2] in (["a", "b"], ["b", "a"]) and order != sorted(order)  # interleaved as produced
    empty = [r.get_response() for r, _ in got if not r.get_response().outputs]
    assert all(e.model_name == "repeat" and e.model_version == "" for e in empty)  # as sent: no version


def test_flags_only_final_is_not_written_by_default(triton_server):
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("repeat", [_int32("IN", [1, 2]), _int32("DELAY_MS", [0])], request_id="x")
        first, second = answers.get(timeout=10), answers.get(timeout=10)
        time.sleep(0.5)
        assert answers.empty()  # two responses, no empty final
        c.stop_stream()
    assert [r.get_response().parameters["triton_final_response"].bool_param for r, _ in (first, second)] == [
        False, False]


def test_async_execute_decoupled(triton_server):
    got = _stream(triton_server.grpc_url, [("async_repeat", [_int32("IN", [5, 6, 7])], "z")], empty_final=True)
    values = [int(r.as_numpy("OUT")[0]) for r, _ in got if r.get_response().outputs]
    assert values == [5, 6, 7]


def test_cancelling_the_stream_stops_the_model(triton_server):
    before = scrape(triton_server)
    sent0 = sample(before, 'repeat_sent{model="repeat"}')
    cancelled0 = sample(before, 'repeat_cancelled{model="repeat"}')
    answers: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(triton_server.grpc_url)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    c.async_stream_infer("repeat", [_int32("IN", list(range(200))), _int32("DELAY_MS", [20])], request_id="long")
    for _ in range(3):
        answers.get(timeout=10)
    c.stop_stream(cancel_requests=True)
    c.close()
    time.sleep(0.5)
    after = scrape(triton_server)
    assert sample(after, 'repeat_cancelled{model="repeat"}') == cancelled0 + 1
    sent = sample(after, 'repeat_sent{model="repeat"}') - sent0
    assert 3 <= sent < 20, sent  # it stopped long before its 200 responses
    time.sleep(0.5)
    assert sample(scrape(triton_server), 'repeat_sent{model="repeat"}') - sent0 == sent  # and stays stopped


def test_decoupled_models_refuse_unary_calls(triton_server):
    inputs = [_int32("IN", [1]), _int32("DELAY_MS", [0])]
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as c:
        with pytest.raises(InferenceServerException) as error:
            c.infer("repeat", inputs)
    assert error.value.status() == "StatusCode.UNIMPLEMENTED"
    assert error.value.message() == "ModelInfer RPC doesn't support models with decoupled transaction policy"
    with httpclient.InferenceServerClient(triton_server.http_url) as c:
        with pytest.raises(InferenceServerException) as error:
            c.infer("repeat", [_int32("IN", [1], httpclient), _int32("DELAY_MS", [0], httpclient)])
    assert error.value.status() == "501"
    assert error.value.message() == "HTTP end point doesn't support models with decoupled transaction policy"


def test_decoupled_execute_must_return_none(triton_server):
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("bad_decoupled", [_fp32("X", [1.0])], request_id="q")
        result, error = answers.get(timeout=10)
        c.stop_stream()
    assert result is None and error is not None
    assert "Python model 'bad_decoupled' is using the decoupled mode and the execute function must return None." \
        in error.message()


def test_default_mode_rule_breaking(triton_server):
    log = triton_server.log_path
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as c:
        result = c.infer("misbehave", [_text("HOW", "two")])  # second send refused, first one answers
        assert result.as_numpy("Y").shape == (2,)
        result = c.infer("misbehave", [_text("HOW", "sender")])  # answering through the sender (24.06+)
        assert result.as_numpy("Y").shape == (2,)
        for how, says in [("shape", "shape [3]"), ("raise", "model says no"),
                          ("short", "InferenceRequest(s) size is:1, and InferenceResponse(s) size is:0"), ("raise", "for model 'misbehave_")]:
            with pytest.raises(InferenceServerException) as error:
                c.infer("misbehave", [_text("HOW", how)])
            assert says in error.value.message(), error.value.message()
            assert error.value.status() == "StatusCode.INTERNAL"
    text = log.read_text()
    assert "second send refused: Unable to send response. Non-decoupled model cannot send more than one " \
           "response." in text


def test_custom_metrics_and_logger(triton_server):
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as c:
        for x in (0.5, 5.0, 50.0):
            c.infer("metrics_model", [_fp32("X", [x])])
    text = scrape(triton_server)
    assert sample(text, 'custom_requests{model="m"}') == 3
    assert sample(text, 'custom_last_x{model="m"}') == 50.0
    assert sample(text, 'custom_x_bucket{le="1.0",model="m"}') == 1
    assert sample(text, 'custom_x_bucket{le="10.0",model="m"}') == 2
    assert sample(text, 'custom_x_count{model="m"}') == 3
    assert "# TYPE custom_requests counter" in text
    assert "metrics_model saw 5.0" in triton_server.log_path.read_text()
