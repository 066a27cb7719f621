"""Single-model storage (server/repository/single.py): layout detection and the generated repository."""

from __future__ import annotations

from pathlib import Path

import onnx_models
import pytest

from server.core.errors import ServingError
from server.repository import single
from server.repository.loader import LoadOptions, load_model


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
    assert served.is_symlink() and served.resolve() == (root / "model.onnx").resolve()
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
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "resnet.onnx", "resnet.onnx.data"]
    assert (version / "model.onnx").resolve() == (root / "resnet.onnx").resolve()


def test_root_that_is_the_model_file_itself(tmp_path):
    model = _touch(tmp_path / "weights.pt")
    found = single.detect(model)
    assert found.kind == single.MODEL_FILE
    [repo] = single.prepare([model], "", tmp_path / "work")
    assert (repo / single.DEFAULT_NAME / "1" / "model.pt").resolve() == model.resolve()


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
    assert sorted(p.name for p in (repo / "m" / "1").iterdir()) == ["model.onnx"]


def test_repository_is_served_as_is(tmp_path):
    root = tmp_path / "repo"
    _touch(root / "simple" / "1" / "model.onnx")
    _touch(root / "README.md")
    assert single.detect(root).kind == single.REPOSITORY
    assert single.prepare([root], "ignored", tmp_path / "work") == [root]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert single.detect(empty).kind == single.REPOSITORY  # models may be loaded later


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
