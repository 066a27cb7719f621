"""Model names in the repository API are one safe folder name: traversal, '.', '' and NUL are refused
(gRPC and REST) before anything is written or deleted, and nothing outside the server's folders changes."""

from __future__ import annotations

import http.client
import json
import urllib.parse

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.lifecycle_helpers import CONFIG, offset_bytes, offset_model

BAD_NAMES = ["../victim", "../../victim", "..", ".", "", "a/b", "a\\b", "nul\x00x", ".hidden", "x" * 129]


@pytest.fixture
def explicit(tmp_path, start_server):
    repo = tmp_path / "repo"
    offset_model(repo / "a" / "1" / "model.onnx", 1)
    (repo / "a" / "config.pbtxt").write_text(CONFIG)
    scratch = tmp_path / "scratch" / "tmp"  # the server's TMPDIR
    scratch.mkdir(parents=True)
    (scratch / "other-program.txt").write_text("not the server's")
    victim = tmp_path / "scratch" / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    proc = start_server([repo], "--model-control-mode=explicit", "--load-model=a", env={"TMPDIR": str(scratch)})
    return proc, scratch, victim


def _untouched(scratch, victim) -> None:
    assert (victim / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert (scratch / "other-program.txt").exists()
    assert not list(scratch.glob("inferd-load-*"))


def test_grpc_load_and_unload_refuse_bad_names(explicit, tmp_path):
    proc, scratch, victim = explicit
    config = json.dumps({"backend": "onnxruntime", "max_batch_size": 8})
    files = {"file:1/model.onnx": offset_bytes(5, tmp_path)}
    with grpc.insecure_channel(proc.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name in BAD_NAMES:
            request = pb.RepositoryModelLoadRequest(model_name=name)
            request.parameters["config"].string_param = config
            for key, data in files.items():
                request.parameters[key].bytes_param = data
            with pytest.raises(grpc.RpcError) as error:
                stub.RepositoryModelLoad(request, timeout=20)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.value.details())
            assert "model name is one folder name" in error.value.details()
            with pytest.raises(grpc.RpcError) as error:
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=20)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    _untouched(scratch, victim)
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    assert client.is_model_ready("a")  # the good model kept serving
    with pytest.raises(InferenceServerException):  # and no model appeared under a traversal name
        client.get_model_metadata("../victim")


def test_rest_load_refuses_encoded_traversal(explicit, tmp_path):
    proc, scratch, victim = explicit
    import base64

    body = json.dumps({"parameters": {
        "config": json.dumps({"backend": "onnxruntime", "max_batch_size": 8}),
        "file:1/model.onnx": base64.b64encode(offset_bytes(5, tmp_path)).decode()}})
    host, port = proc.http_url.split(":")
    for name in ["../victim", "..", ".", "a/b"]:
        for action in ("load", "unload"):
            conn = http.client.HTTPConnection(host, int(port), timeout=20)
            path = f"/v2/repository/models/{urllib.parse.quote(name, safe='')}/{action}"
            conn.request("POST", path, body=body if action == "load" else "{}",
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read().decode()
            conn.close()
            # a name that still routes is refused by the rule; one the router cannot match is 404/400
            assert response.status in (400, 404), (name, action, response.status, text)
            if response.status == 400:
                assert "folder name" in text or "error" in text
    _untouched(scratch, victim)
