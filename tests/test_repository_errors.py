"""A repository with broken models beside good ones: index states and reasons, the log, version routing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.harness import ServerProcess

_IO = ('input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
       'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')


def _identity(repo: Path, name: str, version: int | str) -> None:
    onnx_models.identity(repo / name / str(version) / "model.onnx", "FP32")


def _config(repo: Path, name: str, text: str) -> None:
    (repo / name / "config.pbtxt").write_text(text)


def build(repo: Path) -> None:
    _identity(repo, "good", 1)
    (repo / "corrupt" / "1").mkdir(parents=True)
    (repo / "corrupt" / "1" / "model.onnx").write_bytes(b"this is not an ONNX protobuf")
    _identity(repo, "bad_syntax", 1)
    _config(repo, "bad_syntax", 'max_batch_size: 4\ninput [ { name: "INPUT0"\n')
    _identity(repo, "unknown_field", 1)
    _config(repo, "unknown_field", "max_batch_size: 2\nfrobnicate: 3\n"
                                   "dynamic_batching { max_queue_delay_microseconds: 100 turbo: true }\n")
    (repo / "missing_file" / "1").mkdir(parents=True)
    _config(repo, "missing_file", 'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n' + _IO)
    onnx_models.identity(repo / "no_version" / "model.onnx", "FP32")  # not inside a version folder
    _config(repo, "no_version", 'backend: "onnxruntime"\n')
    for version in (1, 2, "latest"):
        _identity(repo, "mixed_versions", version)
    for version in (1, 2, 3):
        _identity(repo, "latest2", version)
        _identity(repo, "specific", version)
    _config(repo, "latest2", "version_policy: { latest: { num_versions: 2 } }\n")
    _config(repo, "specific", "version_policy: { specific: { versions: [ 1, 3 ] } }\n")
    for version in (1, 2):
        _identity(repo, "all_versions", version)
    _config(repo, "all_versions", "version_policy: { all: {} }\n")
    # version 3 is corrupt: versions 1 and 2 serve, 3 shows why it does not
    for version in (1, 2):
        _identity(repo, "broken_version", version)
    (repo / "broken_version" / "3").mkdir()
    (repo / "broken_version" / "3" / "model.onnx").write_bytes(b"garbage")
    _config(repo, "broken_version", "max_batch_size: 4\nversion_policy: { all: {} }\n" + _IO)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    build(root / "repo")
    proc = ServerProcess([root / "repo"])
    proc.start(root / "inferd.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def index(client) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}


def _infer(client, model: str, version: str = ""):
    data = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    item = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    item.set_data_from_numpy(data)
    result = client.infer(model, [item], model_version=version, client_timeout=30)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    return result.get_response().model_version


def _error(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def _versions(index, name: str) -> dict[str, str]:
    return {v: state for (n, v), (state, _) in index.items() if n == name}


def test_good_models_serve_beside_broken_ones(client, server):
    assert client.is_server_ready()
    for name in ("good", "unknown_field", "mixed_versions", "latest2", "specific", "all_versions",
                 "broken_version"):
        assert client.is_model_ready(name), name
        _infer(client, name)
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("name, reason", [
    ("corrupt", "Protobuf parsing failed"),
    ("bad_syntax", "config.pbtxt does not parse"),
    ("missing_file", "does not exist"),
    ("no_version", "no version folders"),
])
def test_broken_model_is_indexed_and_logged_with_its_reason(client, server, index, name, reason):
    rows = [(state, why) for (n, _), (state, why) in index.items() if n == name]
    assert rows and all(state == "UNAVAILABLE" and reason in why for state, why in rows), rows
    assert any(name in line and reason in line and "ERROR" in line for line in server.log().splitlines())
    assert client.is_model_ready(name) is False  # as Triton: a failed model is not ready, not an error
    status, message = _error(lambda: _infer(client, name))
    assert status == "StatusCode.NOT_FOUND" and name in message and reason in message


def test_unknown_config_fields_are_reported_not_fatal(client, server, index):
    assert index[("unknown_field", "1")] == ("READY", "")
    config = client.get_model_config("unknown_field").config
    assert config.max_batch_size == 2 and config.dynamic_batching.max_queue_delay_microseconds == 100
    log = server.log()
    for field in ("frobnicate", "turbo"):
        assert any("unknown_field" in line and f"'{field}'" in line for line in log.splitlines()), field


def test_non_numeric_version_folder_is_ignored(index, server):
    assert _versions(index, "mixed_versions") == {"2": "READY"}
    assert "ignoring folder 'latest'" in server.log()


@pytest.mark.parametrize("name, ready", [
    ("latest2", ["2", "3"]), ("specific", ["1", "3"]), ("all_versions", ["1", "2"]),
])
def test_version_policies(client, index, name, ready):
    assert _versions(index, name) == {v: "READY" for v in ready}
    assert list(client.get_model_metadata(name).versions) == ready


def test_routing_empty_version_is_highest_ready_and_explicit_is_exact(client):
    assert _infer(client, "latest2") == "3"
    assert _infer(client, "latest2", "2") == "2"
    assert _infer(client, "specific") == "3"
    assert _infer(client, "specific", "1") == "1"
    assert _infer(client, "broken_version") == "2"  # version 3 failed: the highest *ready* one
    assert _infer(client, "broken_version", "1") == "1"


@pytest.mark.parametrize("name, version, ready", [
    ("latest2", "1", "2, 3"),  # on disk, not selected by the policy
    ("specific", "2", "1, 3"),
    ("good", "5", "1"),  # not on disk at all
])
def test_missing_version_is_not_found_and_names_ready_versions(client, name, version, ready):
    status, message = _error(lambda: _infer(client, name, version))
    assert status == "StatusCode.NOT_FOUND"
    assert f"version {version}" in message and f"ready versions: {ready}" in message


def test_failed_version_is_unavailable_with_its_reason(client, index):
    state, reason = index[("broken_version", "3")]
    assert state == "UNAVAILABLE" and "Protobuf parsing failed" in reason
    assert (index[("broken_version", "1")], index[("broken_version", "2")]) == (("READY", ""), ("READY", ""))
    status, message = _error(lambda: _infer(client, "broken_version", "3"))
    assert status == "StatusCode.UNAVAILABLE" and "Protobuf parsing failed" in message
    assert "ready versions: 1, 2" in message
