"""Every REST endpoint but infer against a real inferd, with tritonclient.http and with plain HTTP:
health (200 JSON bodies, 503 when not ready: strict readiness and the drain after SIGTERM), server
and model metadata, readiness, configuration, statistics, repository index / load / unload, the
extensions this server does not offer (501), wrong methods (405) and unknown paths (404)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.http_helpers import binary_body, call, post_json


@pytest.fixture(scope="module")
def base(server) -> str:
    return server.http_url


@pytest.fixture(scope="module")
def client(server):
    with httpclient.InferenceServerClient(server.http_url) as c:
        yield c


def _infer_simple(base: str) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    body, headers = binary_body([("INPUT0", "INT32", a), ("INPUT1", "INT32", a)])
    assert call(base, "POST", "/v2/models/simple/infer", body, headers).status == 200


def _wait(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"no {what} after {timeout}s")


# ---------------------------------------------------------------- health and metadata


def test_health_bodies(base, client):
    for path, key in (("/v2/health/live", "live"), ("/v2/health/ready", "ready")):
        answer = call(base, "GET", path)
        assert answer.status == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == {key: True}
    assert client.is_server_live() and client.is_server_ready()


def test_server_metadata(base, client):
    doc = call(base, "GET", "/v2").json()
    assert doc["name"] == "inferd" and doc["version"]
    assert "model_configuration" in doc["extensions"] and "statistics" in doc["extensions"]
    assert client.get_server_metadata() == doc


def test_model_metadata_with_and_without_version(base, client):
    doc = call(base, "GET", "/v2/models/simple").json()
    assert doc == call(base, "GET", "/v2/models/simple/versions/1").json()
    assert doc["name"] == "simple" and doc["versions"] == ["1"] and doc["platform"] == "onnxruntime_onnx"
    assert doc["inputs"] == [{"name": f"INPUT{i}", "datatype": "INT32", "shape": [-1, 16]} for i in (0, 1)]
    assert [o["name"] for o in doc["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    assert client.get_model_metadata("simple", "1") == doc
    bytes_doc = call(base, "GET", "/v2/models/simple_identity").json()
    assert bytes_doc["inputs"] == [{"name": "INPUT0", "datatype": "BYTES", "shape": [-1, 1]}]


def test_model_ready(base, client):
    for path in ("/v2/models/simple/ready", "/v2/models/simple/versions/1/ready"):
        answer = call(base, "GET", path)
        assert answer.status == 200 and answer.json() == {"name": "simple", "ready": True}
    answer = call(base, "GET", "/v2/models/simple/versions/7/ready")
    assert answer.status == 404 and "'simple' version 7" in answer.error
    answer = call(base, "GET", "/v2/models/nope/ready")
    assert answer.status == 404 and "'nope'" in answer.error
    assert client.is_model_ready("simple") and client.is_model_ready("simple", "1")
    assert not client.is_model_ready("nope")


def test_model_config(base, client):
    doc = call(base, "GET", "/v2/models/simple/config").json()
    assert doc == call(base, "GET", "/v2/models/simple/versions/1/config").json()
    assert doc["name"] == "simple" and doc["max_batch_size"] == 8
    assert [(i["name"], i["data_type"], i["dims"]) for i in doc["input"]] == [
        ("INPUT0", "TYPE_INT32", [16]),
        ("INPUT1", "TYPE_INT32", [16]),
    ]
    assert client.get_model_config("simple") == doc
    answer = call(base, "GET", "/v2/models/nope/config")
    assert answer.status == 404


def test_statistics(base, client):
    _infer_simple(base)
    doc = call(base, "GET", "/v2/models/simple/stats").json()
    (stats,) = doc["model_stats"]
    assert stats["name"] == "simple" and stats["version"] == "1"
    assert stats["inference_count"] >= 1 and stats["inference_stats"]["success"]["count"] >= 1
    assert stats["inference_stats"]["success"]["ns"] > 0
    assert (
        call(base, "GET", "/v2/models/simple/versions/1/stats").json()["model_stats"][0]["name"] == "simple"
    )
    every = call(base, "GET", "/v2/models/stats").json()["model_stats"]
    assert {"simple", "simple_identity", "dense"} <= {s["name"] for s in every}
    assert client.get_inference_statistics("simple")["model_stats"][0]["inference_count"] >= 1
    answer = call(base, "GET", "/v2/models/nope/stats")
    assert answer.status == 404 and "'nope'" in answer.error


def test_kserve_model_list(base):
    names = call(base, "GET", "/v2/models").json()["models"]
    assert {"simple", "simple_identity", "dense"} <= set(names)


# ---------------------------------------------------------------- repository


def test_repository_index(base, client):
    rows = call(base, "POST", "/v2/repository/index").json()
    assert {"name": "simple", "version": "1", "state": "READY"} in rows
    assert post_json(base, "/v2/repository/index", {"ready": True}).json() == [
        r for r in rows if r.get("state") == "READY"
    ]
    assert client.get_model_repository_index() == rows
    answer = post_json(base, "/v2/repository/index", {"ready": "yes"})
    assert answer.status == 400 and "'ready' must be a boolean" in answer.error
    answer = call(base, "POST", "/v2/repository/index", b"{oops")
    assert answer.status == 400 and "malformed JSON" in answer.error
    answer = call(base, "POST", "/v2/repository/other/index")
    assert answer.status == 501 and "'repository_name'" in answer.error


def test_load_and_unload_need_explicit_control_mode(base, client):
    for action in ("load", "unload"):
        answer = call(base, "POST", f"/v2/repository/models/simple/{action}")
        assert answer.status == 503 and "--model-control-mode=none" in answer.error
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("simple")
    assert info.value.status() == "503"
    assert call(base, "GET", "/v2/models/simple/ready").status == 200


def test_load_and_unload_in_explicit_mode(example_repo, tmp_path, start_server):
    repo = tmp_path / "repo"
    shutil.copytree(example_repo / "simple", repo / "simple")
    proc = start_server([repo], "--model-control-mode", "explicit", "--load-model", "simple")
    base = proc.http_url
    assert call(base, "GET", "/v2/models/simple/ready").status == 200
    assert (
        call(
            base,
            "POST",
            "/v2/repository/models/simple/unload",
            json.dumps({"parameters": {"unload_dependents": False}}),
        ).status
        == 200
    )
    answer = call(base, "GET", "/v2/models/simple/ready")
    assert answer.status == 404 and "'simple'" in answer.error
    assert call(base, "POST", "/v2/repository/models/simple/load").status == 200
    assert call(base, "GET", "/v2/models/simple/ready").status == 200
    _infer_simple(base)
    # a configuration override in the load request (ModelConfig JSON, as tritonclient sends it)
    config = call(base, "GET", "/v2/models/simple/config").json()
    config["max_batch_size"] = 4
    with httpclient.InferenceServerClient(base) as client:
        client.load_model("simple", config=json.dumps(config))
        assert client.get_model_config("simple")["max_batch_size"] == 4
        client.unload_model("simple")
        assert not client.is_model_ready("simple")
        client.load_model("simple")
        assert client.is_model_ready("simple")
    for path, body, status, says in [
        ("/v2/repository/models/nope/load", None, 404, "'nope'"),
        ("/v2/repository/models/simple/load", {"parameters": {"colour": "red"}}, 400, "'colour'"),
        (
            "/v2/repository/models/simple/load",
            {"parameters": {"config": 5}},
            400,
            "'config' must be a string",
        ),
        ("/v2/repository/models/simple/load", {"parameters": {"file:1/model.onnx": "@@"}}, 400, "base64"),
        ("/v2/repository/models/simple/load", {"parameters": []}, 400, "'parameters' must be a JSON object"),
        (
            "/v2/repository/models/simple/unload",
            {"parameters": {"unload_dependents": "no"}},
            400,
            "unload_dependents",
        ),
        ("/v2/repository/other/models/simple/load", None, 501, "'repository_name'"),
        ("/v2/repository/models/simple/load", {"parameters": {"config": "{not json"}}, 400, ""),
    ]:
        answer = call(base, "POST", path, json.dumps(body) if body is not None else None)
        assert answer.status == status, (path, body, answer.body)
        assert says in answer.error
    assert call(base, "GET", "/v2/models/simple/ready").status == 200  # a failed load keeps the old one


# ---------------------------------------------------------------- what is not offered


@pytest.mark.parametrize(
    "method, path, says",
    [
        ("GET", "/v2/logging", "logging"),
        ("POST", "/v2/logging", "logging"),
        ("GET", "/v2/cudasharedmemory/status", "cuda_shared_memory"),
        ("GET", "/v2/cudasharedmemory/region/r0/status", "cuda_shared_memory"),
        ("POST", "/v2/cudasharedmemory/region/r0/register", "cuda_shared_memory"),
        ("POST", "/v2/cudasharedmemory/region/r0/unregister", "no region 'r0'"),
    ],
)
def test_unsupported_extensions_are_501(base, method, path, says):
    answer = call(base, method, path, b"{}" if method == "POST" else None)
    assert answer.status == 501, answer.body
    assert says in answer.error and "not supported" in answer.error


def test_unregister_all_shared_memory_succeeds(base, client):
    # perf_analyzer does this at start and exit; with nothing registered, nothing fails
    for kind in ("system", "cuda"):
        assert call(base, "POST", f"/v2/{kind}sharedmemory/unregister").status == 200
    client.unregister_system_shared_memory()


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("GET", "/v2/models/simple/infer", "POST"),
        ("POST", "/v2/health/live", "GET"),
        ("DELETE", "/v2/models/simple", "GET"),
        ("PUT", "/v2/repository/index", "POST"),
        ("POST", "/v2/models/stats", "GET"),
    ],
)
def test_wrong_method_is_405(base, method, path, allowed):
    answer = call(base, method, path)
    assert answer.status == 405 and answer.headers["allow"] == allowed
    assert "Method Not Allowed" in answer.error


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1/bogus",  # /v1/models/... is the OpenAI-compatible API now
        "/v2/health",
        "/v2/models/simple/versions",
        "/v2/models/simple/versions/1/bogus",
        "/v2/repository/models/simple",
    ],
)
def test_unknown_path_is_404(base, path):
    answer = call(base, "GET", path)
    assert answer.status == 404 and "Not Found" in answer.error


def test_percent_encoded_names(base):
    assert call(base, "GET", "/v2/models/%73imple/ready").status == 200
    answer = call(base, "GET", "/v2/models/a%2Fb/ready")
    assert answer.status == 404 and "'a/b'" in answer.error


# ---------------------------------------------------------------- readiness false


def test_strict_readiness_reports_503_while_a_model_is_broken(example_repo, tmp_path, start_server):
    repo = tmp_path / "repo"
    shutil.copytree(example_repo / "simple", repo / "simple")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('backend: "onnxruntime"\nmax_batch_size: 1\n')
    proc = start_server([repo], "--strict-readiness", "true", wait_ready=False)
    _wait(lambda: _status(proc.http_url, "/v2/models/simple/ready") == 200, what="model 'simple' ready")
    answer = call(proc.http_url, "GET", "/v2/health/ready")
    assert answer.status == 503 and "not every model is ready" in answer.error
    assert call(proc.http_url, "GET", "/v2/health/live").json() == {"live": True}
    with httpclient.InferenceServerClient(proc.http_url) as client:
        assert client.is_server_live() and not client.is_server_ready()


def _status(base: str, path: str) -> int | None:
    try:
        return call(base, "GET", path, timeout=2).status
    except OSError:
        return None


def test_readiness_is_503_during_the_drain_after_sigterm(tmp_path, start_server):
    """A request waits 3 s in the queue (max_queue_delay); SIGTERM arrives meanwhile: the server
    reports not ready (and refuses new work) but stays live and answers the waiting request."""
    import onnx_models

    repo = tmp_path / "repo"
    onnx_models.identity(repo / "slow" / "1" / "model.onnx", "FP32")
    (repo / "slow" / "config.pbtxt").write_text(
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 3000000 }\n"
    )
    proc = start_server([repo])
    x = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    body, headers = binary_body([("INPUT0", "FP32", x)], parameters={"binary_data_output": True})
    answers: list = []
    worker = threading.Thread(
        target=lambda: answers.append(call(proc.http_url, "POST", "/v2/models/slow/infer", body, headers))
    )
    worker.start()
    metrics = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    pending = re.compile(
        r'^nv_inference_pending_request_count\{[^}]*model="slow"[^}]*\} 1(\.0)?$', re.MULTILINE
    )
    _wait(
        lambda: pending.search(urllib.request.urlopen(metrics, timeout=5).read().decode()) is not None,
        what="queued request",
    )
    proc.signal(signal.SIGTERM)
    _wait(lambda: _status(proc.http_url, "/v2/health/ready") == 503, timeout=2.5, what="not-ready")
    answer = call(proc.http_url, "GET", "/v2/health/ready")
    assert "shutting down" in answer.error
    assert call(proc.http_url, "GET", "/v2/health/live").status == 200
    refused = call(proc.http_url, "POST", "/v2/models/slow/infer", body, headers)
    assert refused.status == 503 and "shutting down" in refused.error
    worker.join(30)
    assert answers and answers[0].status == 200, answers
    assert proc.proc.wait(30) == 0
