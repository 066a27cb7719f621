"""Single-model storage (server/repository/single.py): layout detection and the generated repository.

The second half starts real servers on each layout (repository with stray files at its root, a
bare model file, version folders, KServe's runtime arguments, an empty folder, the forced
layouts) and checks what a client sees.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.core.errors import ServingError
from server.repository import single
from server.repository.loader import LoadOptions, load_model
from tests.lifecycle_helpers import offset_model


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_model_file_at_root(tmp_path):
    root = tmp_path / "mnt"
    onnx_models.add_sub(root / "model.onnx")
    found = single.detect(root)
    assert found.kind == single.MODEL_FILE and found.model_file == root / "model.onnx"
    [repo] = single.prepare([root], "add-sub", tmp_path / "work")
    served = repo / "add-sub" / "1" / "model.onnx"
    # version 1 is a link to the folder itself: followed, the file stays inside its version folder
    assert (repo / "add-sub" / "1").is_symlink() and served.resolve() == (root / "model.onnx").resolve()
    # the generated repository loads like any other, its config completed from the ONNX file
    result = load_model(repo / "add-sub", LoadOptions(cores=1))
    try:
        assert sorted(result.loaded) == [1]
        assert result.config.name == "add-sub" and result.config.max_batch_size == 4
        assert [t.name for t in result.config.inputs] == ["INPUT0", "INPUT1"]
    finally:
        for loaded in result.loaded.values():
            for _, backend in loaded.backends:
                backend.close()


def test_any_onnx_name_with_its_external_data(tmp_path):
    root = tmp_path / "mnt"
    _touch(root / "resnet.onnx")
    _touch(root / "resnet.onnx.data")
    found = single.detect(root)
    assert found.kind == single.MODEL_FILE and found.model_file.name == "resnet.onnx"
    [repo] = single.prepare([root], "resnet", tmp_path / "work")
    version = repo / "resnet" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["resnet.onnx", "resnet.onnx.data"]
    config = (repo / "resnet" / "config.pbtxt").read_text()  # the file is named in a generated config
    assert 'default_model_filename: "resnet.onnx"' in config and 'backend: "onnxruntime"' in config


def test_root_that_is_the_model_file_itself(tmp_path):
    model = _touch(tmp_path / "weights.pt")
    found = single.detect(model)
    assert found.kind == single.MODEL_FILE
    [repo] = single.prepare([model], "", tmp_path / "work")
    assert (repo / single.DEFAULT_NAME / "1" / "weights.pt").resolve() == model.resolve()
    assert 'default_model_filename: "weights.pt"' in (repo / single.DEFAULT_NAME / "config.pbtxt").read_text()


def test_version_folders_at_root(tmp_path):
    root = tmp_path / "mnt"
    _touch(root / "1" / "model.onnx")
    _touch(root / "3" / "model.onnx")
    (root / "warmup").mkdir()
    assert single.detect(root).kind == single.MODEL_FOLDER
    [repo] = single.prepare([root], "m", tmp_path / "work")
    assert (repo / "m").is_symlink() and (repo / "m").resolve() == root.resolve()
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "3", "warmup"]


def test_config_at_root_with_another_name_is_served_under_model_name(tmp_path):
    root = tmp_path / "mnt"
    _touch(root / "1" / "model.onnx")
    _touch(root / "config.pbtxt", 'name: "densenet"\nmax_batch_size: 8\nfuture_field: 1\n')
    found = single.detect(root)
    assert found.kind == single.MODEL_FOLDER and found.config == root / "config.pbtxt"
    [repo] = single.prepare([root], "densenet-onnx", tmp_path / "work")
    model = repo / "densenet-onnx"
    assert not model.is_symlink() and (model / "1").resolve() == (root / "1").resolve()
    text = (model / "config.pbtxt").read_text()
    assert 'name: "densenet-onnx"' in text and "max_batch_size: 8" in text


def test_config_with_matching_name_links_the_whole_folder(tmp_path):
    root = tmp_path / "mnt"
    _touch(root / "1" / "model.onnx")
    _touch(root / "config.pbtxt", 'name: "m"\n')
    [repo] = single.prepare([root], "m", tmp_path / "work")
    assert (repo / "m").is_symlink()


def test_config_and_model_file_at_root(tmp_path):
    root = tmp_path / "mnt"
    _touch(root / "model.onnx")
    _touch(root / "config.pbtxt", "max_batch_size: 2\n")
    found = single.detect(root)
    assert found.kind == single.MODEL_FILE and found.config is not None
    [repo] = single.prepare([root], "m", tmp_path / "work")
    assert (repo / "m" / "config.pbtxt").resolve() == (root / "config.pbtxt").resolve()
    # version 1 is the folder itself (config.pbtxt there is ignored by the loader)
    assert sorted(p.name for p in (repo / "m" / "1").iterdir()) == ["config.pbtxt", "model.onnx"]


def test_repository_is_served_as_is(tmp_path):
    root = tmp_path / "repo"
    _touch(root / "simple" / "1" / "model.onnx")
    _touch(root / "README.md")
    assert single.detect(root).kind == single.REPOSITORY
    assert single.prepare([root], "ignored", tmp_path / "work") == [root]


def test_numeric_and_named_folders_mean_a_repository(tmp_path):
    root = tmp_path / "repo"
    _touch(root / "simple" / "1" / "model.onnx")
    _touch(root / "2" / "1" / "model.onnx")  # a model named "2", odd but legal
    assert single.detect(root).kind == single.REPOSITORY


@pytest.mark.parametrize("files, expected", [
    (["README.txt", "weights.bin"], "neither a model repository"),
    (["config.pbtxt"], "no version folder"),
    (["a.onnx", "b.onnx"], "several model files"),
])
def test_unrecognised_layouts_are_explained(tmp_path, files, expected):
    root = tmp_path / "mnt"
    for name in files:
        _touch(root / name, "max_batch_size: 1\n" if name.endswith(".pbtxt") else "x")
    with pytest.raises(ServingError) as err:
        single.detect(root)
    assert expected in err.value.message and str(root) in err.value.message
    if expected.startswith("neither"):
        assert "README.txt, weights.bin" in err.value.message


def test_missing_folder_and_bad_name(tmp_path):
    with pytest.raises(ServingError, match="is not a directory"):
        single.detect(tmp_path / "nope")
    root = tmp_path / "mnt"
    _touch(root / "model.onnx")
    with pytest.raises(ServingError, match="cannot name a model folder"):
        single.prepare([root], "../escape", tmp_path / "work")


# ---------------------------------------------------------------- which reading a folder gets (issue 19)


def _stray_repository(root: Path) -> Path:
    """A repository as users leave them: one model folder, leftovers beside it at the root."""
    _touch(root / "bert" / "1" / "model.onnx")
    _touch(root / "bert_state.pt")
    _touch(root / "bert_config.json", "{}")
    _touch(root / "README.md")
    _touch(root / ".DS_Store")
    return root


@pytest.mark.parametrize("model_folder", [
    {"bert/1/model.onnx"},  # a version folder holding a model file
    {"bert/config.pbtxt"},  # a config.pbtxt and nothing else yet
    {"bert/3/weights.bin"},  # a numeric version folder, whatever it holds
])
@pytest.mark.parametrize("strays", [
    ["bert_state.pt"], ["model.onnx"], ["a.onnx", "b.onnx"], ["config.pbtxt"], ["README.md", ".hidden.pt"],
])
def test_a_model_folder_makes_a_repository_whatever_lies_at_its_root(tmp_path, model_folder, strays):
    root = tmp_path / "repo"
    for name in [*model_folder, *strays]:
        _touch(root / name)
    assert single.detect(root).kind == single.REPOSITORY
    assert single.prepare([root], "model", tmp_path / "work") == [root]


def test_folders_that_are_not_model_folders_leave_a_single_model(tmp_path):
    root = tmp_path / "mnt"
    _touch(root / "model.onnx")
    _touch(root / "tokenizer" / "vocab.txt")  # no config.pbtxt, no version folder: not a model folder
    found = single.detect(root)
    assert found.kind == single.MODEL_FILE and found.model_file.name == "model.onnx"
    versions = tmp_path / "versions"
    _touch(versions / "1" / "model.onnx")
    _touch(versions / "2" / "model.onnx")
    _touch(versions / "assets" / "labels.txt")
    _touch(versions / "README.md")
    assert single.detect(versions).kind == single.MODEL_FOLDER


def test_stray_files_are_named_in_one_info_line(tmp_path, caplog):
    root = _stray_repository(tmp_path / "repo")
    with caplog.at_level("INFO", logger=single.log.name):
        assert single.prepare([root], "model", tmp_path / "work") == [root]
    lines = [r for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    message = lines[0].getMessage()
    for name in (".DS_Store", "README.md", "bert_config.json", "bert_state.pt"):
        assert name in message
    assert "bert," not in message and "--repository-layout=single" in message  # a model file was among them
    caplog.clear()
    clean = tmp_path / "clean"
    _touch(clean / "bert" / "1" / "model.onnx")
    _touch(clean / "notes.txt")
    with caplog.at_level("INFO", logger=single.log.name):
        single.prepare([clean], "model", tmp_path / "work2")
    [line] = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert "notes.txt" in line and "--repository-layout" not in line  # no model file: no hint


def test_forced_layouts(tmp_path):
    root = _stray_repository(tmp_path / "repo")
    found = single.detect(root, "single")
    assert found.kind == single.MODEL_FILE and found.model_file.name == "bert_state.pt"
    assert single.detect(root, "repository").kind == single.REPOSITORY
    only_versions = tmp_path / "versions"
    _touch(only_versions / "1" / "model.onnx")
    assert single.detect(only_versions, "repository").kind == single.REPOSITORY
    assert single.detect(only_versions, "single").kind == single.MODEL_FOLDER
    repository = tmp_path / "clean"
    _touch(repository / "bert" / "1" / "model.onnx")
    with pytest.raises(ServingError, match="--repository-layout=single: .* holds no single model"):
        single.detect(repository, "single")
    with pytest.raises(ValueError, match="layout must be one of"):
        single.detect(repository, "guess")
    model = _touch(tmp_path / "weights.onnx")
    with pytest.raises(ServingError, match="is not a directory"):
        single.detect(model, "repository")


def test_empty_folder_is_refused_unless_the_repository_reading_is_forced(tmp_path):
    empty = tmp_path / "empty"
    _touch(empty / ".gitkeep")  # hidden files hold nothing to serve
    with pytest.raises(ServingError) as err:
        single.detect(empty)
    assert f"'{empty}' is empty" in err.value.message and "--repository-layout=repository" in err.value.message
    assert single.detect(empty, "repository").kind == single.REPOSITORY
    with pytest.raises(ServingError, match="it is empty"):
        single.detect(empty, "single")


def test_two_single_model_folders_cannot_share_one_name(tmp_path):
    a, b = _touch(tmp_path / "a" / "model.onnx").parent, _touch(tmp_path / "b" / "model.onnx").parent
    with pytest.raises(ServingError, match="each hold a single model: all would be served as 'm'"):
        single.prepare([a, b], "m", tmp_path / "work")


# ---------------------------------------------------------------- each layout through a real server

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def _offset(url: str, model: str, version: str = "") -> float:
    """Infer over gRPC; the offset model's answer says which file served it."""
    with grpcclient.InferenceServerClient(url) as client:
        inp = grpcclient.InferInput("INPUT0", [2, 4], "FP32")
        inp.set_data_from_numpy(X)
        out = client.infer(model, [inp], model_version=version).as_numpy("OUTPUT0")
    delta = out - X
    assert np.allclose(delta, delta[0, 0])
    return float(delta[0, 0])


def _served(url: str) -> dict[str, tuple[str, str]]:
    with grpcclient.InferenceServerClient(url) as client:
        return {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}


def _not_found(url: str, model: str) -> None:
    with pytest.raises(InferenceServerException) as err:
        _offset(url, model)
    assert err.value.status() == "StatusCode.NOT_FOUND"


def _exits_with(start_server, repositories, *flags) -> str:
    proc = start_server(repositories, *flags, wait_ready=False)
    assert proc.proc.wait(timeout=60) != 0
    return proc.log()


def test_server_repository_with_stray_files_serves_bert(start_server, tmp_path):
    import torch
    root = tmp_path / "repo"
    offset_model(root / "bert" / "1" / "model.onnx", 7.0)  # no config.pbtxt: completed from the file
    torch.save({"weight": torch.zeros(2, 2)}, root / "bert_state.pt")  # a real leftover checkpoint
    _touch(root / "bert_config.json", '{"hidden_size": 768}')
    _touch(root / "README.md", "# models\n")
    _touch(root / ".DS_Store")
    _touch(root / ".cache" / "blob")
    proc = start_server([root], "--model-name=model")  # KServe passes a name; a repository ignores it
    assert _offset(proc.grpc_url, "bert") == 7.0
    assert _served(proc.grpc_url) == {"bert": ("READY", "")}
    _not_found(proc.grpc_url, "model")
    lines = [ln for ln in proc.log().splitlines() if "ignoring" in ln]
    assert len(lines) == 1 and " INFO " in lines[0], proc.log()
    assert all(n in lines[0] for n in (".DS_Store", "README.md", "bert_config.json", "bert_state.pt"))
    assert "holds a single model" not in proc.log()


def test_server_bare_model_onnx(start_server, tmp_path):
    root = tmp_path / "mnt"
    offset_model(root / "model.onnx", 3.0)
    proc = start_server([root])  # no --model-name: served as "model", KServe's default
    assert _offset(proc.grpc_url, "model") == 3.0
    with httpclient.InferenceServerClient(proc.http_url) as client:
        meta = client.get_model_metadata("model")
        assert meta["versions"] == ["1"] and [t["name"] for t in meta["inputs"]] == ["INPUT0"]


def test_server_bare_model_pt(start_server, tmp_path):
    import torch_models as tm  # scripts/ is on sys.path via tests.harness

    alone = tmp_path / "alone"
    tm.scale(alone / "model.pt", 2.0)
    proc = start_server([alone], "--model-name=scale")
    # TorchScript names no tensors: served as 'scale', and its load failure says what to add
    state, reason = _served(proc.grpc_url)["scale"]
    assert state == "UNAVAILABLE" and "config.pbtxt" in reason and "TorchScript" in reason
    proc.stop()

    with_config = tmp_path / "with-config"
    tm.scale(with_config / "model.pt", 2.0)
    _touch(with_config / "config.pbtxt", 'name: "anything"\nmax_batch_size: 4\n'
           'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
           'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    proc = start_server([with_config], "--model-name=scale")
    with httpclient.InferenceServerClient(proc.http_url) as client:
        inp = httpclient.InferInput("INPUT__0", [2, 4], "FP32")
        inp.set_data_from_numpy(X)
        np.testing.assert_allclose(client.infer("scale", [inp]).as_numpy("OUTPUT__0"), X * 2)
        assert client.get_model_config("scale")["platform"] == "pytorch_libtorch"


def test_server_version_folders_at_the_root(start_server, tmp_path):
    root = tmp_path / "mnt"
    offset_model(root / "1" / "model.onnx", 1.0)
    offset_model(root / "2" / "model.onnx", 2.0)
    _touch(root / "config.pbtxt", 'name: "upstream"\nversion_policy: { all { } }\n')
    _touch(root / "README.md")
    _touch(root / "assets" / "labels.txt")  # not a model folder: the root stays one model
    proc = start_server([root], "--model-name=adder")
    assert _offset(proc.grpc_url, "adder") == 2.0  # the highest version by default
    assert _offset(proc.grpc_url, "adder", "1") == 1.0
    assert "upstream" not in _served(proc.grpc_url)


def test_server_with_kserve_runtime_args(tmp_path):
    from tests.test_kserve import RUNTIMES, _runtime_process

    runtime = RUNTIMES["ClusterServingRuntime/inferd"]
    cases = {  # storageUri content -> (model the InferenceService's clients call, offset it answers)
        "repository": ("bert", 7.0),
        "versions": ("my-isvc", 2.0),
    }
    storage = tmp_path / "repository"
    offset_model(storage / "bert" / "1" / "model.onnx", 7.0)
    _touch(storage / "bert_state.pt")
    _touch(storage / "bert_config.json", "{}")
    offset_model(tmp_path / "versions" / "1" / "model.onnx", 1.0)
    offset_model(tmp_path / "versions" / "2" / "model.onnx", 2.0)
    for folder, (model, offset) in cases.items():
        proc = _runtime_process(runtime, tmp_path / folder, "my-isvc")
        # the runtime's args as they are, run as a module: the `inferd` console script imports the
        # checkout it was installed from, the module this checkout (as the harness does)
        proc.args = [sys.executable, "-m", "server.cli", *proc.args[1:]]
        proc.start(tmp_path / f"{folder}.log")
        try:
            assert _offset(proc.grpc_url, model) == offset
            assert list(_served(proc.grpc_url)) == [model]
        finally:
            assert proc.stop() == 0, proc.log()


def test_server_empty_folder_is_a_clear_error(start_server, tmp_path):
    empty = tmp_path / "mnt-models"
    empty.mkdir()
    (empty / ".keep").write_text("")
    log = _exits_with(start_server, [empty], "--model-name=x")
    assert f"inferd: '{empty}' is empty" in log and "Traceback" not in log, log
    assert "--repository-layout=repository" in log


def test_server_forced_repository_layout_starts_empty_and_loads_later(start_server, tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    proc = start_server([root], "--repository-layout=repository", "--model-control-mode=explicit")
    assert _served(proc.grpc_url) == {}
    offset_model(root / "bert" / "1" / "model.onnx", 4.0)
    with grpcclient.InferenceServerClient(proc.grpc_url) as client:
        client.load_model("bert")
    assert _offset(proc.grpc_url, "bert") == 4.0


def test_server_forced_single_layout_on_an_ambiguous_folder(start_server, tmp_path):
    root = tmp_path / "mnt"
    offset_model(root / "model.onnx", 5.0)
    offset_model(root / "variant" / "1" / "model.onnx", 9.0)  # looks like a model folder
    auto = start_server([root], "--model-name=m")
    assert _offset(auto.grpc_url, "variant") == 9.0  # auto: the repository reading wins
    _not_found(auto.grpc_url, "m")
    assert "--repository-layout=single" in auto.log()  # model.onnx was ignored: the log says how to serve it
    auto.stop()
    forced = start_server([root], "--model-name=m", "--repository-layout=single")
    assert _offset(forced.grpc_url, "m") == 5.0
    assert list(_served(forced.grpc_url)) == ["m"]
    forced.stop()
    # and single on a folder that holds no single model stops the server with the folder's name
    repository = tmp_path / "repo"
    offset_model(repository / "bert" / "1" / "model.onnx", 1.0)
    log = _exits_with(start_server, [repository], "--repository-layout=single")
    assert f"--repository-layout=single: '{repository}' holds no single model" in log, log
