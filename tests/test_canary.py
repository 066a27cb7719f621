"""Canary traffic under steady load with real clients: the share, sticky keys, automatic rollback on
errors and on latency (zero failures on the stable version, the reason in the index and metrics),
promotion, manual promotion and end, all through config.pbtxt and the repository load API."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.lifecycle_helpers import CONFIG, index, offset_model, wait_for


def _param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


def _onnx_repo(root, name: str, versions=(1, 2), extra: str = ""):
    for v in versions:
        offset_model(root / name / str(v) / "model.onnx", float(v))
    (root / name / "config.pbtxt").write_text(CONFIG + extra)
    return root


def _metrics(proc) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()


def _sample(text: str, family: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(family + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _zeros():
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    return [inp]


def test_share_sticky_and_pinned_from_config(tmp_path, start_server):
    """config.pbtxt names the canary; the default latest-1 policy still loads both versions."""
    repo = _onnx_repo(tmp_path / "repo", "m", extra=_param("canary_version", "2") + _param("canary_share", "10%"))
    proc = start_server([repo])
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    rows = index(client)
    assert rows[("m", "1")] == ("READY", "canary stable version")
    assert rows[("m", "2")] == ("READY", "canary candidate: 10.0% of unpinned requests")
    inputs = _zeros()

    def run(n: int) -> Counter:
        local = grpcclient.InferenceServerClient(proc.grpc_url)
        seen: Counter = Counter()
        for _ in range(n):
            seen[local.infer("m", inputs).get_response().model_version] += 1
        return seen

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        counts = sum(pool.map(run, [1250] * 4), Counter())
    elapsed = time.monotonic() - started
    assert sum(counts.values()) == 5000 and set(counts) == {"1", "2"}
    share = counts["2"] / 5000
    assert abs(share - 0.10) <= 0.02, f"observed share {share:.3f} over 5000 requests ({elapsed:.1f} s)"
    # pinned requests go where they ask, whatever the share
    assert {client.infer("m", inputs, model_version="1").get_response().model_version for _ in range(30)} == {"1"}
    assert {client.infer("m", inputs, model_version="2").get_response().model_version for _ in range(30)} == {"2"}
    # sticky keys (gRPC metadata and REST header): one key, one version, every time
    http = httpclient.InferenceServerClient(proc.http_url)
    hin = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    hin.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    on_candidate = 0
    for i in range(150):
        key = {"x-inferd-routing-key": f"user-{i}"}
        seen = {client.infer("m", inputs, headers=key).get_response().model_version for _ in range(4)}
        seen |= {http.infer("m", [hin], headers=key).get_response()["model_version"] for _ in range(2)}
        assert len(seen) == 1, f"user-{i} saw versions {seen}"
        on_candidate += seen == {"2"}
    assert 2 <= on_candidate <= 35  # ~10% of 150 keys
    # ModelStreamInfer: the stream's metadata key routes every request on it
    for i in range(6):
        replies: queue.Queue = queue.Queue()
        stream = grpcclient.InferenceServerClient(proc.grpc_url)
        stream.start_stream(lambda result, error: replies.put((result, error)),
                            headers={"x-inferd-routing-key": f"user-{i}"})
        try:
            for _ in range(5):
                stream.async_stream_infer("m", inputs)
            seen = {replies.get(timeout=30)[0].get_response().model_version for _ in range(5)}
        finally:
            stream.stop_stream()
        expected = client.infer("m", inputs, headers={"x-inferd-routing-key": f"user-{i}"})
        assert seen == {expected.get_response().model_version}
    text = _metrics(proc)
    assert _sample(text, "inferd_canary_share", model="m", version="2") == 0.1


# the stable version answers Y = X; the candidate fails on odd inputs, or sleeps
_PY_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 2 } ]
"""
_PY_MODEL = """
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            if FAIL_ODD and int(x[0]) % 2:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("candidate broke on an odd input")))
                continue
            time.sleep(SLEEP_S)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]))
        return out
"""


def _py_version(root, name: str, version: int, fail_odd: bool = False, sleep_s: float = 0.0):
    folder = root / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(f"FAIL_ODD = {fail_odd}\nSLEEP_S = {sleep_s}\n" + _PY_MODEL)
    (root / name / "config.pbtxt").write_text(_PY_CONFIG)


class _Load:
    """Unpinned requests from a few client threads until stopped; outcomes per version."""

    def __init__(self, url: str, model: str, threads: int = 3) -> None:
        self.ok: Counter = Counter()
        self.failed: Counter = Counter()  # by the version the error message names, "?" if none
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(url, model, i), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, url: str, model: str, seed: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        i = seed
        while not self._stop.is_set():
            i += 1
            inp = grpcclient.InferInput("X", [1], "INT32")
            inp.set_data_from_numpy(np.array([i], dtype=np.int32))
            try:
                version = client.infer(model, [inp]).get_response().model_version
                with self._lock:
                    self.ok[version] += 1
            except InferenceServerException as exc:
                with self._lock:
                    self.failed["2" if "candidate" in str(exc) else "?"] += 1
                    self.errors.append(str(exc))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _load(url: str, model: str, **params) -> None:
    """A deploy tool's call: RepositoryModelLoad with ``canary:*`` parameters (gRPC stubs from the protos)."""
    request = pb.RepositoryModelLoadRequest(model_name=model)
    for key, value in params.items():
        slot = request.parameters[f"canary:{key}"]
        if isinstance(value, bool):
            slot.bool_param = value
        else:
            slot.string_param = str(value)
    with grpc.insecure_channel(url) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(request, timeout=60)


def _rest_load(url: str, model: str, parameters: dict) -> None:
    body = json.dumps({"parameters": parameters}).encode()
    request = urllib.request.Request(f"http://{url}/v2/repository/models/{model}/load", body, method="POST")
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200


def test_failing_candidate_rolled_back_by_load_api(tmp_path, start_server):
    root = tmp_path / "repo"
    _py_version(root, "p", 1)
    proc = start_server([root], "--model-control-mode=explicit", "--load-model=p")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    _py_version(root, "p", 2, fail_odd=True)  # the new version arrives; latest-1 would serve it alone
    load = _Load(proc.grpc_url, "p")
    try:
        wait_for(lambda: load.ok["1"] > 50, what="steady load on version 1")
        _load(proc.grpc_url, "p", version="2", share="0.5", rollback_error_rate="0.2", rollback_min_requests="20",
              rollback_window_s="30")
        assert index(client)[("p", "2")] == ("READY", "canary candidate: 50.0% of unpinned requests")
        reason = wait_for(lambda: index(client)[("p", "2")][1].startswith("canary rolled back") and
                          index(client)[("p", "2")][1], what="the rollback")
        assert "error rate" in reason and "> 20.0%" in reason
        pulled = load.ok["2"] + load.failed["2"]
        assert pulled <= 40, f"{pulled} requests reached the candidate before it was pulled back"
        before = load.ok["2"] + load.failed["2"]
        served = load.ok["1"]
        wait_for(lambda: load.ok["1"] > served + 150, what="more traffic after the rollback")
        # nothing new reaches the candidate (a request already routed may still finish)
        assert load.ok["2"] + load.failed["2"] <= before + 3
        # a plain reload does not bring it back: only an operator does
        client.load_model("p")
        assert index(client)[("p", "2")][1].startswith("canary rolled back")
        text = _metrics(proc)
        assert _sample(text, "inferd_canary_rollbacks_total", model="p", version="2", reason="error_rate") == 1
        assert _sample(text, "inferd_canary_share", model="p", version="2") == 0
        _load(proc.grpc_url, "p", start=True)  # the operator starts it again: it trips again
        wait_for(lambda: _sample(_metrics(proc), "inferd_canary_rollbacks_total", model="p", version="2",
                                 reason="error_rate") == 2, what="the second rollback")
        _load(proc.grpc_url, "p", end=True)
        assert index(client)[("p", "2")] == ("READY", "canary ended; serves pinned requests only")
    finally:
        load.stop()
    assert load.failed["?"] == 0, load.errors[:3]  # zero failed requests on the stable version
    assert load.ok["1"] > 300
    log = proc.log()
    assert "canary rolled back: error rate" in log


def test_slow_candidate_rolled_back_on_p99_ratio(tmp_path, start_server):
    root = tmp_path / "repo"
    _py_version(root, "s", 1)
    _py_version(root, "s", 2, sleep_s=0.03)
    cfg = root / "s" / "config.pbtxt"
    cfg.write_text(_PY_CONFIG + _param("canary_version", "2") + _param("canary_share", "0.3")
                   + _param("rollback_p99_ratio", "4") + _param("rollback_p99_ms", "off")
                   + _param("rollback_min_requests", "25") + _param("rollback_window_s", "20"))
    proc = start_server([root])
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    load = _Load(proc.grpc_url, "s")
    try:
        reason = wait_for(lambda: index(client)[("s", "2")][1].startswith("canary rolled back") and
                          index(client)[("s", "2")][1], timeout=30, what="the latency rollback")
        on_candidate = load.ok["2"]
        served = load.ok["1"]
        wait_for(lambda: load.ok["1"] > served + 100, what="traffic after the rollback")
        assert load.ok["2"] <= on_candidate + 3
    finally:
        load.stop()
    assert re.search(r"p99 latency \d+\.\d ms > 4 x the stable version's", reason), reason
    assert sum(load.failed.values()) == 0, load.errors[:3]
    assert _sample(_metrics(proc), "inferd_canary_rollbacks_total", model="s", version="2", reason="p99_ratio") == 1


_CHECKED_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]

    def canary_check(self, stats):
        # e.g. a business metric the model tracks itself; here: refuse once it has seen 15 requests
        if stats["requests"] >= 15:
            p99 = stats["stable_p99_ms"]
            return False, f"drift detected after {stats['requests']} requests (stable p99 {p99:.1f} ms)"
        return True, ""
"""


def test_custom_check_from_model_py(tmp_path, start_server):
    root = tmp_path / "repo"
    _py_version(root, "c", 1)
    (root / "c" / "2").mkdir()
    (root / "c" / "2" / "model.py").write_text(_CHECKED_MODEL)
    # the custom check calls into the model object: in the server process (docs/canary.md)
    config = root / "c" / "config.pbtxt"
    config.write_text(config.read_text() + 'parameters { key: "INFERD_PYTHON_ISOLATION" value: { string_value: '
                      '"in_process" } }\n')
    proc = start_server([root], "--model-control-mode=explicit", "--load-model=c")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    load = _Load(proc.grpc_url, "c")
    try:
        _load(proc.grpc_url, "c", version="2", share="0.5", custom_check="true", rollback_min_requests="10")
        reason = wait_for(lambda: index(client)[("c", "2")][1].startswith("canary rolled back") and
                          index(client)[("c", "2")][1], what="the custom check's rollback")
    finally:
        load.stop()
    assert "the model's canary_check said: drift detected after" in reason
    assert sum(load.failed.values()) == 0
    assert _sample(_metrics(proc), "inferd_canary_rollbacks_total", model="c", version="2", reason="custom") == 1
    # a candidate without the method cannot be started with the check on
    with pytest.raises(grpc.RpcError) as info:
        _load(proc.grpc_url, "c", version="1", stable_version="2", custom_check="true")
    assert "offers no canary_check" in info.value.details()


def test_promotion_keeps_the_previous_version_then_retires_it(tmp_path, start_server):
    repo = _onnx_repo(tmp_path / "repo", "m", versions=(1,))
    proc = start_server([repo], "--model-control-mode=explicit", "--load-model=m")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    offset_model(repo / "m" / "2" / "model.onnx", 2.0)
    _load(proc.grpc_url, "m", version="2", share="0.5", promote_after_requests="60", keep_previous_s="3",
          rollback_min_requests="20")
    inputs = _zeros()
    seen = Counter(client.infer("m", inputs).get_response().model_version for _ in range(300))
    assert seen["2"] >= 60 and seen["1"] > 0  # promoted on the way
    rows = index(client)
    assert rows[("m", "2")] == ("READY", "promoted canary: serves unpinned requests")
    assert rows[("m", "1")][0] == "READY" and "kept loaded for rollback" in rows[("m", "1")][1]
    assert {client.infer("m", inputs).get_response().model_version for _ in range(50)} == {"2"}
    assert client.infer("m", inputs, model_version="1").get_response().model_version == "1"  # instant rollback
    wait_for(lambda: index(client)[("m", "1")][0] == "UNAVAILABLE", timeout=15, what="version 1 retired")
    assert "no longer needed after a canary promotion" in index(client)[("m", "1")][1]
    assert _sample(_metrics(proc), "inferd_canary_share", model="m", version="2") == 0


def test_manual_promotion_and_end(tmp_path, start_server):
    repo = _onnx_repo(tmp_path / "repo", "a", versions=(1,))
    _onnx_repo(repo, "b", versions=(1,))
    proc = start_server([repo], "--model-control-mode=explicit", "--load-model=a", "--load-model=b")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    for name in ("a", "b"):
        offset_model(repo / name / "2" / "model.onnx", 2.0)
    _load(proc.grpc_url, "a", version="2", share="0.3")
    _rest_load(proc.http_url, "b", {"canary:version": "2", "canary:share": 0.3})  # REST takes the same keys
    inputs = _zeros()
    for name in ("a", "b"):
        assert set(Counter(client.infer(name, inputs).get_response().model_version for _ in range(80))) == {"1", "2"}
    _load(proc.grpc_url, "a", promote=True)
    _rest_load(proc.http_url, "b", {"canary:end": True})
    assert {client.infer("a", inputs).get_response().model_version for _ in range(60)} == {"2"}
    assert {client.infer("b", inputs).get_response().model_version for _ in range(60)} == {"1"}
    assert client.infer("b", inputs, model_version="2").get_response().model_version == "2"  # pinned still work
    rows = index(client)
    assert rows[("a", "2")][1] == "promoted canary: serves unpinned requests"
    assert rows[("b", "2")][1] == "canary ended; serves pinned requests only"
    # a reload keeps the outcome (no canary restarts, the ended one stays on version 1)
    client.load_model("b")
    assert {client.infer("b", inputs).get_response().model_version for _ in range(30)} == {"1"}


def test_poll_mode_starts_a_canary_from_an_edited_config(tmp_path, start_server):
    """GitOps: the canary keys land in config.pbtxt; the poller reloads, keeping version 1 as it is."""
    pinned = 'version_policy { specific { versions: [ 1 ] } }\n'
    repo = _onnx_repo(tmp_path / "repo", "m", extra=pinned)
    proc = start_server([repo], "--model-control-mode=poll", "--repository-poll-secs=1")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    inputs = _zeros()
    assert {client.infer("m", inputs).get_response().model_version for _ in range(20)} == {"1"}
    (repo / "m" / "config.pbtxt").write_text(CONFIG + pinned + _param("canary_version", "2")
                                             + _param("canary_share", "0.5"))
    wait_for(lambda: index(client).get(("m", "2"), ("", ""))[1].startswith("canary candidate"), timeout=30,
             what="the canary from the edited config")
    assert Counter(client.infer("m", inputs).get_response().model_version for _ in range(200)).keys() == {"1", "2"}
    (repo / "m" / "config.pbtxt").write_text(CONFIG + pinned)  # the canary keys leave: it ends
    wait_for(lambda: index(client).get(("m", "2"), ("", ""))[0] != "READY", timeout=30,
             what="version 2 unloaded once no canary needs it")
    assert {client.infer("m", inputs).get_response().model_version for _ in range(20)} == {"1"}


BAD_REQUESTS = [
    ({"canary:version": "2", "canary:share": "2"}, "between 0 and 1"),
    ({"canary:nonsense": "1"}, "unrecognized load parameter 'canary:nonsense'"),
    ({"canary:version": "9"}, "canary version 9 has no version folder"),
    ({"canary:promote": True}, "has no canary to promote"),
    ({"canary:end": True}, "has no canary to end"),
    ({"canary:start": True}, "has no canary settings to start"),
    ({"canary:end": True, "canary:share": "0.2"}, "one canary action per load"),
]


def test_bad_canary_requests_are_refused(tmp_path, start_server):
    repo = _onnx_repo(tmp_path / "repo", "m")
    proc = start_server([repo], "--model-control-mode=explicit", "--load-model=m")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    for params, words in BAD_REQUESTS:
        request = pb.RepositoryModelLoadRequest(model_name="m")
        for key, value in params.items():
            if isinstance(value, bool):
                request.parameters[key].bool_param = value
            else:
                request.parameters[key].string_param = value
        with grpc.insecure_channel(proc.grpc_url) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(request, timeout=60)
        assert words in info.value.details(), (params, info.value.details())
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert client.infer("m", _zeros()).get_response().model_version == "2"  # still serving as before
    assert index(client)[("m", "2")] == ("READY", "")
