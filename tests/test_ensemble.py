"""Ensembles (``platform: "ensemble"``) driven by tritonclient (grpc and http), as against Triton:
the step graph, parallel steps, per-step dynamic batching, statistics, readiness that follows the
composing models, explicit loading, a decoupled last step streaming, per-step spans, and every
validation error in the repository index."""

from __future__ import annotations

import queue
import shutil
import threading
import time
from functools import partial

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.harness import ROOT, ServerProcess

MODULES = {"grpc": grpcclient, "http": httpclient}
ONE = "instance_group [ { count: 1 } ]\n"
INT16 = 'max_batch_size: 8\ninput [ {{ name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }} ]\n' \
        'output [ {{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }} ]\n{}'


def ensemble(inputs: str, outputs: str, steps: str, max_batch_size: int = 8, extra: str = "") -> str:
    return (f'platform: "ensemble"\nmax_batch_size: {max_batch_size}\ninput [ {inputs} ]\noutput [ {outputs} ]\n'
            f"ensemble_scheduling {{ step [ {steps} ] }}\n{extra}")


def step(model: str, inputs: dict[str, str], outputs: dict[str, str], version: int = -1) -> str:
    maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'{{ model_name: "{model}" model_version: {version}{maps} }}'


def tensor(name: str, datatype: str = "TYPE_INT32", dims: str = "16") -> str:
    return f'{{ name: "{name}" data_type: {datatype} dims: [ {dims} ] }}'


# A -> add_sub -> (sum -> ident_batching -> S) and (diff -> ident -> D): the two last steps are independent
PIPELINE = ensemble(
    f'{tensor("A")}, {tensor("B")}', f'{tensor("S")}, {tensor("D")}',
    ", ".join([step("add_sub", {"INPUT0": "A", "INPUT1": "B"}, {"OUTPUT0": "sum", "OUTPUT1": "diff"}),
               step("ident_batching", {"INPUT0": "sum"}, {"OUTPUT0": "S"}),
               step("ident", {"INPUT0": "diff"}, {"OUTPUT0": "D"})]))
# two 400 ms steps side by side
PARALLEL = ensemble(tensor("MS", dims="1"), f'{tensor("X", dims="1")}, {tensor("Y", dims="1")}',
                    ", ".join([step("slow", {"MS": "MS"}, {"MS_OUT": "X"}),
                               step("slow", {"MS": "MS"}, {"MS_OUT": "Y"})]), max_batch_size=0)
# a decoupled last step: IN -> ident_flat -> repeat (one response per element)
STREAMING = ensemble(f'{tensor("IN", dims="-1")}, {tensor("DELAY", dims="1")}',
                     f'{tensor("OUT", dims="1")}, {tensor("IDX", "TYPE_UINT32", "1")}',
                     ", ".join([step("ident_flat", {"INPUT0": "IN"}, {"OUTPUT0": "x"}),
                                step("repeat", {"IN": "x", "DELAY_MS": "DELAY"}, {"OUT": "OUT", "IDX": "IDX"})]),
                     max_batch_size=0)


def build_repo(root) -> None:
    import onnx_models

    onnx_models.add_sub(root / "add_sub" / "1" / "model.onnx")
    (root / "add_sub" / "config.pbtxt").write_text("max_batch_size: 8\ndynamic_batching { }\n" + ONE)
    onnx_models.identity(root / "ident" / "1" / "model.onnx", "INT32", ("batch", 16))
    (root / "ident" / "config.pbtxt").write_text(INT16.format(ONE))
    # requests arriving within 300 ms share a batch: the step batches across ensemble requests
    onnx_models.identity(root / "ident_batching" / "1" / "model.onnx", "INT32", ("batch", 16))
    (root / "ident_batching" / "config.pbtxt").write_text(
        INT16.format(ONE + "dynamic_batching { max_queue_delay_microseconds: 300000 }\n"))
    onnx_models.identity(root / "ident_flat" / "1" / "model.onnx", "INT32", ("n",))
    (root / "ident_flat" / "config.pbtxt").write_text(
        f'max_batch_size: 0\ninput [ {tensor("INPUT0", dims="-1")} ]\noutput [ {tensor("OUTPUT0", dims="-1")} ]\n{ONE}')
    for name in ("slow", "repeat"):
        shutil.copytree(ROOT / "tests" / "triton_models" / name, root / name)
    for name, text in (("pipeline", PIPELINE), ("parallel", PARALLEL), ("streaming", STREAMING)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble_repo")
    build_repo(root)
    return root


@pytest.fixture(scope="module")
def ens_server(repo, tmp_path_factory):
    proc = ServerProcess([repo], "--allow-client-shm=true")
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-ensemble.log")
    yield proc
    proc.stop()


@pytest.fixture
def client(ens_server, kind):
    module = MODULES[kind]
    with module.InferenceServerClient(ens_server.grpc_url if kind == "grpc" else ens_server.http_url) as c:
        yield c


def _inputs(kind: str, a: np.ndarray, b: np.ndarray) -> list:
    module = MODULES[kind]
    out = []
    for name, value in (("A", a), ("B", b)):
        x = module.InferInput(name, list(value.shape), "INT32")
        x.set_data_from_numpy(value)
        out.append(x)
    return out


def _stats(client, kind: str, model: str) -> dict:
    if kind == "grpc":
        from google.protobuf import json_format

        doc = json_format.MessageToDict(client.get_inference_statistics(model), preserving_proto_field_name=True)
    else:
        doc = client.get_inference_statistics(model)
    return doc["model_stats"][0]


def _int(value) -> int:
    return int(value or 0)


# ---------------------------------------------------------------- the graph


def test_pipeline_outputs_and_metadata(client, kind):
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.ones((2, 16), dtype=np.int32)
    result = client.infer("pipeline", _inputs(kind, a, b))
    np.testing.assert_array_equal(result.as_numpy("S"), a + b)
    np.testing.assert_array_equal(result.as_numpy("D"), a - b)
    # only what was asked for
    out = MODULES[kind].InferRequestedOutput("D")
    result = client.infer("pipeline", _inputs(kind, a, b), outputs=[out])
    np.testing.assert_array_equal(result.as_numpy("D"), a - b)
    assert result.as_numpy("S") is None
    meta = client.get_model_metadata("pipeline")
    platform = meta.platform if kind == "grpc" else meta["platform"]
    assert platform == "ensemble"
    assert client.is_model_ready("pipeline")


def test_request_errors_name_the_ensemble_input(client, kind):
    a = np.zeros((1, 8), dtype=np.int32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("pipeline", _inputs(kind, a, a))
    assert "input 'A'" in info.value.message() and "'pipeline'" in info.value.message()


def test_independent_steps_run_in_parallel(client, kind):
    ms = np.array([400], dtype=np.int32)
    x = MODULES[kind].InferInput("MS", [1], "INT32")
    x.set_data_from_numpy(ms)
    client.infer("parallel", [x])  # warm
    start = time.monotonic()
    result = client.infer("parallel", [x])
    took = time.monotonic() - start
    assert result.as_numpy("X").tolist() == [400] and result.as_numpy("Y").tolist() == [400]
    assert took < 0.75, f"two 400 ms steps took {took:.2f}s: they ran one after the other"


def test_dynamic_batching_applies_per_step(ens_server):
    """Four concurrent ensemble requests: ident_batching (300 ms queue delay) runs them as one batch."""
    with grpcclient.InferenceServerClient(ens_server.grpc_url) as c:
        before = _stats(c, "grpc", "ident_batching")
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        errors: list = []

        def one(i: int) -> None:
            with grpcclient.InferenceServerClient(ens_server.grpc_url) as own:
                try:
                    r = own.infer("pipeline", _inputs("grpc", a + i, a))
                    np.testing.assert_array_equal(r.as_numpy("S"), 2 * a + i)
                except Exception as exc:  # noqa: BLE001 - asserted below
                    errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        after = _stats(c, "grpc", "ident_batching")
    inferences = _int(after.get("inference_count")) - _int(before.get("inference_count"))
    executions = _int(after.get("execution_count")) - _int(before.get("execution_count"))
    assert inferences == 4 and executions < 4, (inferences, executions)


def test_statistics_for_the_ensemble_and_its_models(client, kind):
    before = {m: _stats(client, kind, m) for m in ("pipeline", "add_sub", "ident")}
    a = np.arange(48, dtype=np.int32).reshape(3, 16)
    client.infer("pipeline", _inputs(kind, a, a))
    after = {m: _stats(client, kind, m) for m in ("pipeline", "add_sub", "ident")}

    def grew(model: str, *path: str) -> int:
        def get(doc):
            for key in path:
                doc = doc.get(key, {}) if isinstance(doc, dict) else {}
            return _int(doc) if not isinstance(doc, dict) else 0
        return get(after[model]) - get(before[model])

    assert grew("pipeline", "inference_count") == 3  # batch size 3
    assert grew("pipeline", "execution_count") == 1
    assert grew("pipeline", "inference_stats", "success", "count") == 1
    assert grew("pipeline", "inference_stats", "success", "ns") > 0
    assert grew("pipeline", "inference_stats", "compute_infer", "ns") > 0  # the sum of its steps'
    batch3 = [b for b in after["pipeline"].get("batch_stats", []) if _int(b["batch_size"]) == 3]
    assert batch3 and _int(batch3[0]["compute_infer"]["count"]) >= 1
    for model in ("add_sub", "ident"):
        assert grew(model, "inference_stats", "success", "count") == 1
        assert grew(model, "inference_count") == 3
    # a failed request counts as a failure of the ensemble
    with pytest.raises(InferenceServerException):
        client.infer("parallel", [_slow_input(kind, -1)])
    failed = _stats(client, kind, "parallel")["inference_stats"]["fail"]
    assert _int(failed.get("count")) >= 1


def _slow_input(kind: str, ms: int):
    x = MODULES[kind].InferInput("MS", [1], "INT32")
    x.set_data_from_numpy(np.array([ms], dtype=np.int32))
    return x


def test_a_failing_step_fails_the_request_and_says_where(client, kind):
    with pytest.raises(InferenceServerException) as info:
        client.infer("parallel", [_slow_input(kind, -1)])  # time.sleep(-0.001) raises in the model
    message = info.value.message()
    assert "in ensemble 'parallel', step" in message and "model 'slow'" in message


# ---------------------------------------------------------------- decoupled last step


def test_decoupled_last_step_streams(ens_server):
    responses: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(ens_server.grpc_url) as c:
        c.start_stream(callback=lambda result, error: responses.put((result, error)))
        x = grpcclient.InferInput("IN", [3], "INT32")
        x.set_data_from_numpy(np.array([7, 8, 9], dtype=np.int32))
        d = grpcclient.InferInput("DELAY", [1], "INT32")
        d.set_data_from_numpy(np.array([10], dtype=np.int32))
        c.async_stream_infer("streaming", [x, d], request_id="s1", enable_empty_final_response=True)
        got, final = [], False
        deadline = time.monotonic() + 20
        while not final and time.monotonic() < deadline:
            result, error = responses.get(timeout=20)
            assert error is None, error
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            if response.outputs:
                got.append((int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0])))
        c.stop_stream()
        assert got == [(7, 0), (8, 1), (9, 2)] and final
        # a unary call cannot carry a stream, as for any decoupled model
        with pytest.raises(InferenceServerException) as info:
            c.infer("streaming", [x, d])
        assert "decoupled" in info.value.message()


def test_decoupled_ensemble_on_generate_stream(ens_server):
    import http.client
    import json

    conn = http.client.HTTPConnection(ens_server.http_url, timeout=20)
    conn.request("POST", "/v2/models/streaming/generate_stream", json.dumps({"IN": [4, 5], "DELAY": 5}))
    answer = conn.getresponse()
    body = answer.read().decode()
    conn.close()
    assert answer.status == 200, body
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert [(e["OUT"], e["IDX"]) for e in events if "OUT" in e] in ([(4, 0), (5, 1)], [([4], [0]), ([5], [1])])


# ---------------------------------------------------------------- tracing


def test_each_step_has_a_span(repo, tmp_path_factory):
    from tests.test_tracing import Receiver, otel_env, traceparent
    from concurrent import futures
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    ts_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    proc = ServerProcess([repo], "--model-control-mode", "explicit", "--load-model", "pipeline",
                         env=otel_env(port))
    try:
        proc.start(tmp_path_factory.mktemp("logs") / "inferd-ensemble-traced.log")
        header, trace_id, _ = traceparent()
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        with grpcclient.InferenceServerClient(proc.grpc_url) as c:
            c.infer("pipeline", _inputs("grpc", a, a), headers={"traceparent": header})
        spans = collector.trace(trace_id, 10)
    finally:
        proc.stop()
        server.stop(0)
    root = [s for s in spans if s.name.endswith("ModelInfer")]
    assert len(root) == 1
    steps = [s for s in spans if s.name == "ensemble step"]
    assert len(steps) == 3 and all(s.parent_span_id == root[0].span_id for s in steps)
    models = sorted(next(kv.value.string_value for kv in s.attributes if kv.key == "model_name") for s in steps)
    assert models == ["add_sub", "ident", "ident_batching"]
    step_ids = {s.span_id for s in steps}
    queues = [s for s in spans if s.name == "queue"]
    assert len(queues) == 3 and all(q.parent_span_id in step_ids for q in queues)


# ---------------------------------------------------------------- readiness and explicit loading


def test_explicit_load_brings_composing_models_and_readiness_follows_them(repo, start_server, kind):
    proc = start_server([repo], "--model-control-mode", "explicit")
    module = MODULES[kind]
    with module.InferenceServerClient(proc.grpc_url if kind == "grpc" else proc.http_url) as c:
        c.load_model("pipeline")
        for model in ("pipeline", "add_sub", "ident", "ident_batching"):
            assert c.is_model_ready(model), model
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        c.infer("pipeline", _inputs(kind, a, a))
        c.unload_model("ident")
        deadline = time.monotonic() + 10
        while c.is_model_ready("ident") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not c.is_model_ready("pipeline")
        index = c.get_model_repository_index()
        rows = index.models if kind == "grpc" else index
        row = next(r for r in rows if (r.name if kind == "grpc" else r["name"]) == "pipeline")
        state = row.state if kind == "grpc" else row["state"]
        reason = row.reason if kind == "grpc" else row["reason"]
        assert state == "UNAVAILABLE" and "composing model 'ident' is not available" in reason
        with pytest.raises(InferenceServerException) as info:
            c.infer("pipeline", _inputs(kind, a, a))
        assert "composing model 'ident' is not available" in info.value.message()
        assert str(info.value.status()) in ("StatusCode.UNAVAILABLE", "503")
        c.load_model("ident")
        assert c.is_model_ready("pipeline")
        np.testing.assert_array_equal(c.infer("pipeline", _inputs(kind, a, a)).as_numpy("D"), a - a)
        # unload_dependents: the ensemble's step models go with it
        c.unload_model("pipeline", unload_dependents=True)
        for model in ("pipeline", "add_sub", "ident", "ident_batching"):
            assert not c.is_model_ready(model), model


# ---------------------------------------------------------------- validation at load


BAD = {
    "unknown_model": (ensemble(tensor("A"), tensor("O"), step("no_such_model", {"INPUT0": "A"}, {"OUTPUT0": "O"})),
                      "composing model 'no_such_model' failed to load: failed to load 'no_such_model': no model "
                      "folder 'no_such_model' in any model repository"),
    "type_mismatch": (ensemble(tensor("A", "TYPE_FP32"), tensor("O"), step("ident", {"INPUT0": "A"}, {"OUTPUT0": "O"})),
                      "ensemble tensor 'A' is FP32 (ensemble input 'A') but step 0 (model 'ident') input 'INPUT0' "
                      "expects INT32"),
    "shape_mismatch": (ensemble(tensor("A", dims="8"), tensor("O"),
                                step("ident", {"INPUT0": "A"}, {"OUTPUT0": "O"})),
                       "ensemble tensor 'A' has dims [8] (ensemble input 'A') but step 0 (model 'ident') input "
                       "'INPUT0' expects [16]"),
    "output_mismatch": (ensemble(tensor("A"), tensor("O", "TYPE_FP32"),
                                 step("ident", {"INPUT0": "A"}, {"OUTPUT0": "O"})),
                        "ensemble output 'O' is FP32 in the configuration but step 0 (model 'ident') output "
                        "'OUTPUT0' produces INT32"),
    "cycle": (ensemble(tensor("A"), tensor("O"), ", ".join([
        step("add_sub", {"INPUT0": "A", "INPUT1": "t1"}, {"OUTPUT0": "t0", "OUTPUT1": "O"}),
        step("ident", {"INPUT0": "t0"}, {"OUTPUT0": "t1"})])), "the steps form a cycle"),
    "unmapped_output": (ensemble(tensor("A"), f'{tensor("O")}, {tensor("P")}',
                                 step("ident", {"INPUT0": "A"}, {"OUTPUT0": "O"})),
                        "ensemble output 'P' is not mapped from any step's output_map"),
    "unused_input": (ensemble(f'{tensor("A")}, {tensor("B")}', tensor("O"),
                              step("ident", {"INPUT0": "A"}, {"OUTPUT0": "O"})),
                     "ensemble input 'B' is not used by any step's input_map"),
    "unmapped_model_input": (ensemble(tensor("A"), tensor("O"),
                                      step("add_sub", {"INPUT0": "A"}, {"OUTPUT0": "O"})),
                             "does not map model 'add_sub' input 'INPUT1'"),
    "no_such_model_input": (ensemble(tensor("A"), tensor("O"), step("ident", {"NOPE": "A"}, {"OUTPUT0": "O"})),
                            "maps 'NOPE', which is not an input of model 'ident'"),
    "no_such_model_output": (ensemble(tensor("A"), tensor("O"), step("ident", {"INPUT0": "A"}, {"NOPE": "O"})),
                             "maps 'NOPE', which is not an output of model 'ident'"),
    "unknown_tensor": (ensemble(tensor("A"), tensor("O"), step("ident", {"INPUT0": "Z"}, {"OUTPUT0": "O"})),
                       "ensemble tensor 'Z', which no ensemble input and no step output provides"),
    "two_producers": (ensemble(tensor("A"), tensor("O"), ", ".join([
        step("ident", {"INPUT0": "A"}, {"OUTPUT0": "O"}), step("ident_batching", {"INPUT0": "A"}, {"OUTPUT0": "O"})])),
                      "ensemble tensor 'O' is written by step 1 (model 'ident_batching') and by step 0"),
    "batch_too_big": (ensemble(tensor("A"), tensor("O"), step("ident", {"INPUT0": "A"}, {"OUTPUT0": "O"}),
                               max_batch_size=16),
                      "ensemble batch_too_big allows maximum batch size 16, but it contains model ident which only "
                      "allows maximum batch size to be 8"),
    "missing_version": (ensemble(tensor("A"), tensor("O"), step("ident", {"INPUT0": "A"}, {"OUTPUT0": "O"}, 7)),
                        "'ident' version 7 is not found"),
    "no_steps": ('platform: "ensemble"\nmax_batch_size: 8\ninput [ ' + tensor("A") + ' ]\noutput [ ' + tensor("O")
                 + ' ]\nensemble_scheduling { }\n', "ensemble_scheduling has no step"),
    "self_step": (ensemble(tensor("A"), tensor("O"), step("self_step", {"INPUT0": "A"}, {"OUTPUT0": "O"})),
                  "runs the ensemble itself"),
    "ens_cycle_a": (ensemble(tensor("A"), tensor("O"), step("ens_cycle_b", {"A": "A"}, {"O": "O"})),
                    "a cycle of ensembles"),
    "ens_cycle_b": (ensemble(tensor("A"), tensor("O"), step("ens_cycle_a", {"A": "A"}, {"O": "O"})),
                    "a cycle of ensembles"),
    "decoupled_middle": (ensemble(f'{tensor("IN", dims="-1")}, {tensor("DELAY", dims="1")}', tensor("O", dims="1"),
                                  ", ".join([step("repeat", {"IN": "IN", "DELAY_MS": "DELAY"}, {"OUT": "o"}),
                                             step("ident_flat", {"INPUT0": "o"}, {"OUTPUT0": "O"})]),
                                  max_batch_size=0),
                         "only a last step (one whose outputs are ensemble outputs only) may be decoupled"),
    "with_instances": (ensemble(tensor("A"), tensor("O"), step("ident", {"INPUT0": "A"}, {"OUTPUT0": "O"}),
                                extra=ONE), "an ensemble has no instances"),
    "not_ensemble": ('backend: "onnxruntime"\nmax_batch_size: 8\ninput [ ' + tensor("A") + ' ]\noutput [ '
                     + tensor("O") + ' ]\nensemble_scheduling { step [ ' + step("ident", {"INPUT0": "A"},
                                                                                  {"OUTPUT0": "O"}) + ' ] }\n',
                     "ensemble_scheduling is only valid with platform"),
}


@pytest.fixture(scope="module")
def bad_server(repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_ensembles")
    for name in ("add_sub", "ident", "ident_batching", "ident_flat", "repeat"):
        shutil.copytree(repo / name, root / name)
    for name, (text, _) in BAD.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)
    proc = ServerProcess([root])
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-bad-ensembles.log")
    yield proc
    proc.stop()


@pytest.mark.parametrize("name", sorted(BAD))
def test_validation_errors_are_in_the_index(bad_server, name):
    with httpclient.InferenceServerClient(bad_server.http_url) as c:
        rows = {r["name"]: r for r in c.get_model_repository_index()}
        assert not c.is_model_ready(name)
    with grpcclient.InferenceServerClient(bad_server.grpc_url) as c:
        grpc_rows = {r.name: r.reason for r in c.get_model_repository_index().models}
    row = rows[name]
    assert row["state"] == "UNAVAILABLE"
    assert BAD[name][1] in row["reason"], row["reason"]
    assert grpc_rows[name] == row["reason"]
    assert rows["ident"]["state"] == "READY"  # the composing models themselves are fine


def test_explicit_load_of_a_bad_ensemble_says_why(repo, start_server, kind, tmp_path):
    root = tmp_path / "repo"
    for name in ("ident",):
        shutil.copytree(repo / name, root / name)
    (root / "bad" / "1").mkdir(parents=True)
    (root / "bad" / "config.pbtxt").write_text(BAD["type_mismatch"][0])
    proc = start_server([root], "--model-control-mode", "explicit")
    module = MODULES[kind]
    with module.InferenceServerClient(proc.grpc_url if kind == "grpc" else proc.http_url) as c:
        with pytest.raises(InferenceServerException) as info:
            c.load_model("bad")
        assert "ensemble tensor 'A' is FP32" in info.value.message()
        assert c.is_model_ready("ident")  # loaded as its step's model, and it stays


def test_the_example_ensemble(server):
    """model_repository/text_classifier: text in, label out, through four models."""
    call = partial(httpclient.InferenceServerClient, server.http_url)
    with call() as c:
        text = httpclient.InferInput("TEXT", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"a fine day"], [b"rain"]], dtype=np.object_))
        result = c.infer("text_classifier", [text])
        assert result.as_numpy("LENGTH").ravel().tolist() == [3, 1]
        probs = result.as_numpy("PROBS")
        assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        labels = [b"negative", b"neutral", b"positive"]
        assert [labels[i] for i in probs.argmax(axis=1)] == result.as_numpy("LABEL").ravel().tolist()


def test_shared_memory_in_and_out_of_an_ensemble(client, kind):
    """An ensemble's inputs can come from, and its outputs go to, system shared memory."""
    import uuid

    import tritonclient.utils.shared_memory as shm

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    tag = uuid.uuid4().hex[:8]
    handles = [shm.create_shared_memory_region(f"{n}_{tag}", f"/ens_{n}_{tag}", 64) for n in ("a", "d")]
    try:
        shm.set_shared_memory_region(handles[0], [a])
        client.register_system_shared_memory(f"a_{tag}", f"/ens_a_{tag}", 64)
        client.register_system_shared_memory(f"d_{tag}", f"/ens_d_{tag}", 64)
        module = MODULES[kind]
        x = module.InferInput("A", [1, 16], "INT32")
        x.set_shared_memory(f"a_{tag}", 64)
        y = module.InferInput("B", [1, 16], "INT32")
        y.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
        out = module.InferRequestedOutput("D")
        out.set_shared_memory(f"d_{tag}", 64)
        client.infer("pipeline", [x, y], outputs=[out])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handles[1], np.int32, [1, 16]), a - 1)
    finally:
        client.unregister_system_shared_memory()
        for h in handles:
            shm.destroy_shared_memory_region(h)


def test_concurrent_loads_of_a_cycle_of_ensembles_fail_and_do_not_hang(repo, start_server, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(repo / "ident", root / "ident")
    for name in ("ens_cycle_a", "ens_cycle_b"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(BAD[name][0])
    proc = start_server([root], "--model-control-mode", "explicit")
    errors: dict[str, str] = {}

    def load(name: str) -> None:
        with grpcclient.InferenceServerClient(proc.grpc_url) as c:
            try:
                c.load_model(name)
            except InferenceServerException as exc:
                errors[name] = exc.message()

    threads = [threading.Thread(target=load, args=(n,)) for n in ("ens_cycle_a", "ens_cycle_b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a load hung"
    assert set(errors) == {"ens_cycle_a", "ens_cycle_b"}
    assert all("a cycle of ensembles" in m for m in errors.values()), errors
