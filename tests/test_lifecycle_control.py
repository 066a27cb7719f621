"""Model control modes: explicit (--load-model, load/unload with config and inline files, index
states), poll (folders added and removed under load), none; and rollback by a config override."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.lifecycle_helpers import CONFIG, Load, index, offset_bytes, offset_model, wait_for


def _infer(client, model: str, version: str = "") -> tuple[str, float]:
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    result = client.infer(model, [inp], model_version=version)
    return result.get_response().model_version, float(result.as_numpy("OUTPUT0")[0, 0])


def _folders(scratch) -> list:
    return list(scratch.glob("inferd-load-*"))


def _ready(client) -> set[str]:
    return {name for (name, _), (state, _) in index(client).items() if state == "READY"}


def _error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def _repo(root, models: dict[str, float]):
    for name, offset in models.items():
        offset_model(root / name / "1" / "model.onnx", offset)
        (root / name / "config.pbtxt").write_text(CONFIG)
    return root


def test_explicit_mode(tmp_path, start_server):
    repo = _repo(tmp_path / "repo", {"a": 1, "b": 2, "c": 3})
    scratch = tmp_path / "scratch"  # the server's TMPDIR: where inline files are written
    scratch.mkdir()
    proc = start_server([repo], "--model-control-mode=explicit", "--load-model=a", "--load-model", "b",
                        env={"TMPDIR": str(scratch)})
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    assert "model_repository" in client.get_server_metadata().extensions
    rows = index(client)
    assert rows[("a", "1")] == ("READY", "") and rows[("b", "1")] == ("READY", "")
    assert rows[("c", "")] == ("", "")  # found, never loaded: the name only, as Triton reports it

    client.load_model("c")
    assert _infer(client, "c") == ("1", 3.0)
    client.unload_model("a")
    assert index(client)[("a", "1")] == ("UNAVAILABLE", "unloaded")
    error = _error(lambda: _infer(client, "a"))
    assert error.status() == "StatusCode.NOT_FOUND" and "'a'" in error.message()
    assert _ready(client) == {"b", "c"}

    # inline files with a config override: a model that is in no repository ...
    config = json.dumps({"backend": "onnxruntime", "max_batch_size": 8})
    client.load_model("inline", config=config, files={"file:1/model.onnx": offset_bytes(7, tmp_path)})
    assert _infer(client, "inline") == ("1", 7.0)
    assert len(_folders(scratch)) == 1
    client.unload_model("inline")
    assert _folders(scratch) == []  # the private folder goes with the last version loaded from it
    with httpclient.InferenceServerClient(proc.http_url) as rest:  # REST carries the files in base64
        rest.load_model("inline", config=config, files={"file:1/model.onnx": offset_bytes(6, tmp_path)})
        assert _infer(client, "inline") == ("1", 6.0)
        rest.unload_model("inline")
    assert _folders(scratch) == []
    # ... and one that replaces a repository model's files until the next plain load
    client.load_model("b", config=config, files={"file:1/model.onnx": offset_bytes(8, tmp_path),
                                                 "file:2/model.onnx": offset_bytes(9, tmp_path)})
    assert _infer(client, "b") == ("2", 9.0)
    client.load_model("b")
    assert _infer(client, "b") == ("1", 2.0)
    wait_for(lambda: _folders(scratch) == [], what="the inline folder removed")

    for files, config_arg, says in [
        ({"file:1/model.onnx": b"x"}, None, "'config' parameter"),
        ({"file:../escape.onnx": b"x"}, config, "relative to the model folder"),
        ({"file:/etc/x": b"x"}, config, "relative to the model folder"),
    ]:
        error = _error(lambda c=config_arg, f=files: client.load_model("b", config=c, files=f))
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and says in error.message(), error.message()
    error = _error(lambda: client.load_model("nope"))
    assert error.status() == "StatusCode.NOT_FOUND" and "'nope'" in error.message()
    error = _error(lambda: client.load_model("b", config='{"max_batch_size": "many"}'))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "config override" in error.message()
    with grpc.insecure_channel(proc.grpc_url) as channel:  # unload_dependents must be a bool_param
        request = pb.RepositoryModelUnloadRequest(model_name="b")
        request.parameters["unload_dependents"].string_param = "yes"
        with pytest.raises(grpc.RpcError) as rpc_error:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(request, timeout=10)
        assert rpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _infer(client, "b") == ("1", 2.0)  # the failed loads and unload changed nothing
    assert _folders(scratch) == []
    client.close()


def test_load_model_star_and_none_mode(tmp_path, start_server):
    repo = _repo(tmp_path / "repo", {"a": 1, "b": 2})
    star = start_server([repo], "--model-control-mode=explicit", "--load-model=*")
    with grpcclient.InferenceServerClient(star.grpc_url) as client:
        assert _ready(client) == {"a", "b"}
    none = start_server([repo])  # the default: none
    with grpcclient.InferenceServerClient(none.grpc_url) as client:
        assert _ready(client) == {"a", "b"}
        for call in (lambda: client.load_model("a"), lambda: client.unload_model("a")):
            error = _error(call)
            assert error.status() == "StatusCode.UNAVAILABLE" and "explicit" in error.message()
        assert _infer(client, "a") == ("1", 1.0)


def test_poll_mode_adds_and_removes_model_folders_under_load(tmp_path, start_server):
    repo = _repo(tmp_path / "repo", {"a": 1})
    proc = start_server([repo], "--model-control-mode=poll", "--repository-poll-secs=0.25")
    client = grpcclient.InferenceServerClient(proc.grpc_url)
    error = _error(lambda: client.load_model("a"))
    assert error.status() == "StatusCode.UNAVAILABLE" and "--model-control-mode=poll" in error.message()

    with Load(proc.grpc_url, "a", clients=3) as on_a:
        _repo(repo, {"b": 2})  # a new model folder: loaded
        wait_for(lambda: index(client).get(("b", "1"), ("",))[0] == "READY", what="model b loaded")
        with Load(proc.grpc_url, "b", clients=3) as on_b:
            wait_for(lambda: on_b.served_since(("1", 2.0)), what="traffic on b")
            shutil.rmtree(repo / "b")  # a model folder removed: unloaded once its requests drained
            wait_for(lambda: index(client).get(("b", "1")) == ("UNAVAILABLE", "removed from the model repository"),
                     what="model b unloaded")
    assert on_a.tally.failures == [], on_a.tally.failures[:3]
    assert on_a.tally.ok and on_b.tally.ok
    # once b is gone its clients are told so: never a failure of a request b had accepted
    assert all("'b' has no available versions" in f for f in on_b.tally.failures), on_b.tally.failures[:3]
    print(f"\npoll add/remove: a sent {on_a.tally.sent} failed {len(on_a.tally.failures)}; b sent "
          f"{on_b.tally.sent}, {on_b.tally.ok} served before the removal, {len(on_b.tally.failures)} told it is gone")
    client.close()


def test_rollback_by_config_override_under_load(tmp_path, start_server):
    """Version 2 is bad news: pin version 1 with the served config plus a specific version policy
    (what docs/lifecycle.md shows with curl), then return to the repository's config."""
    model = tmp_path / "repo" / "m"
    for version in (1, 2):
        offset_model(model / str(version) / "model.onnx", version)
    (model / "config.pbtxt").write_text(CONFIG)
    proc = start_server([tmp_path / "repo"], "--model-control-mode=explicit", "--load-model=m")
    rest = httpclient.InferenceServerClient(proc.http_url)
    with Load(proc.grpc_url, "m", clients=4) as load:
        wait_for(lambda: load.served_since(("2", 2.0)), what="version 2 serving")
        config = rest.get_model_config("m")
        config["version_policy"] = {"specific": {"versions": [1]}}
        rest.load_model("m", config=json.dumps(config))
        wait_for(lambda: load.served_since(("1", 1.0)), what="rolled back to version 1")
        assert rest.get_model_metadata("m")["versions"] == ["1"]
        rest.load_model("m")  # the repository's config again: latest version
        mark = load.snapshot()[("2", 2.0)]
        wait_for(lambda: load.served_since(("2", 2.0), mark + 20), what="back on version 2")
    print(f"\nrollback test: sent {load.tally.sent}, failed {len(load.tally.failures)}; served {dict(load.tally.served)}")
    assert load.tally.failures == []
    rest.close()
