"""Files a configuration names stay inside the model's folder, and what clients read about load
failures carries no absolute server path (the log keeps it): default_model_filename cannot make the
server import a .py file elsewhere, warmup input_data_file cannot read (or leak the bytes and size
of) a file elsewhere, symbolic links included."""

from __future__ import annotations

import json

import grpc
import pytest

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.http_helpers import call

PY_CONFIG = """
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
EVIL_PY = """
from pathlib import Path
Path({marker!r}).write_text("imported")
class TritonPythonModel:
    def execute(self, inputs):
        return {{"Y": inputs["X"]}}
"""
WARMUP = """
instance_group [ { kind: KIND_CPU count: 1 } ]
model_warmup [ { name: "sample" batch_size: 1
  inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "%s" } } } ]
"""
SECRET = b"TOPSECRET-123456"  # 16 bytes: exactly one FP32 [1, 4] warmup tensor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import onnx_models

    from tests.harness import ServerProcess

    root = tmp_path_factory.mktemp("files")
    marker = root / "imported.txt"
    (root / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    (root / "secret.bin").write_bytes(SECRET)
    repo = root / "repo"

    def python_model(name: str, config_extra: str = "", link: bool = False) -> None:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(PY_CONFIG + config_extra)
        if link:
            (repo / name / "1" / "model.py").symlink_to(root / "evil.py")

    python_model("evil_relative", 'default_model_filename: "../../../evil.py"\n')
    python_model("evil_absolute", f'default_model_filename: "{root / "evil.py"}"\n')
    python_model("evil_link", link=True)
    for name, source in (("warm_relative", "../../secret.bin"), ("warm_link", "data.bin"),
                         ("warm_good", "data.bin")):
        onnx_models.identity(repo / name / "1" / "model.onnx", "FP32")
        (repo / name / "config.pbtxt").write_text(WARMUP % source)
        (repo / name / "warmup").mkdir()
    (repo / "warm_link" / "warmup" / "data.bin").symlink_to(root / "secret.bin")
    (repo / "warm_good" / "warmup" / "data.bin").write_bytes(b"\0" * 16)
    (repo / "missing" / "1").mkdir(parents=True)
    (repo / "missing" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n'
                                                   'input [ { name: "X" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
                                                   'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] } ]\n')
    proc = ServerProcess([repo])
    proc.start(root / "inferd.log")
    yield proc, root, marker
    proc.stop()


def _grpc_index(proc) -> dict[str, str]:
    with grpc.insecure_channel(proc.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return {m.name: (m.state, m.reason) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}


def _rest_index(proc) -> dict[str, tuple[str, str]]:
    answer = call(proc.http_url, "POST", "/v2/repository/index", "{}")
    return {m["name"]: (m.get("state", ""), m.get("reason", "")) for m in answer.json()}


def _no_paths(text: str, root) -> None:
    assert str(root) not in text and str(root.resolve()) not in text, text
    assert "/tmp" not in text and "TOPSECRET" not in text, text


@pytest.mark.parametrize("name", ["evil_relative", "evil_absolute", "evil_link"])
def test_default_model_filename_cannot_import_outside(setup, name):
    proc, root, marker = setup
    state, reason = _grpc_index(proc)[name]
    assert state == "UNAVAILABLE" and "default_model_filename" in reason, reason
    assert not marker.exists(), "a config made the server import a file outside the model folder"
    _no_paths(reason, root)


@pytest.mark.parametrize("name", ["warm_relative", "warm_link"])
def test_warmup_file_cannot_be_read_outside(setup, name):
    proc, root, _ = setup
    state, reason = _grpc_index(proc)[name]
    assert state == "UNAVAILABLE" and "input_data_file" in reason, reason
    _no_paths(reason, root)


def test_warmup_file_inside_is_used(setup):
    proc, _, _ = setup
    assert _grpc_index(proc)["warm_good"][0] == "READY"


def test_load_errors_carry_no_server_paths(setup):
    proc, root, _ = setup
    state, reason = _grpc_index(proc)["missing"]
    assert state == "UNAVAILABLE" and "missing/1/model.onnx" in reason, reason
    for source in (_grpc_index(proc), _rest_index(proc)):
        for name, (_, why) in source.items():
            _no_paths(why, root)
    answer = call(proc.http_url, "GET", "/v2/models/missing/ready")
    _no_paths(answer.body.decode(), root)
    answer = call(proc.http_url, "POST", "/v2/models/missing/infer", json.dumps({"inputs": []}))
    _no_paths(answer.body.decode(), root)
    # the operator still finds the full path in the log
    assert str(root) in proc.log()
