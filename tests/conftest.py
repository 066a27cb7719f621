"""Shared fixtures: a real inferd serving the example repository (plus test models) on loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.harness import ROOT, ServerProcess


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory) -> Path:
    """A copy of model_repository/ (tests never write into the checkout)."""
    target = tmp_path_factory.mktemp("repo") / "model_repository"
    shutil.copytree(ROOT / "model_repository", target)
    return target


@pytest.fixture(scope="session")
def server(example_repo, tmp_path_factory):
    """inferd serving the example repository; shared by the conformance tests."""
    proc = ServerProcess([example_repo])
    proc.start(tmp_path_factory.mktemp("logs") / "inferd.log")
    yield proc
    proc.stop()


@pytest.fixture
def start_server(tmp_path):
    """Start extra servers with custom repositories/flags; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(repositories, *extra: str, wait_ready: bool = True, env: dict | None = None) -> ServerProcess:
        proc = ServerProcess(list(repositories), *extra, env=env)
        proc.start(tmp_path / f"inferd-{len(started)}.log", wait_ready=wait_ready)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        try:
            proc.stop()
        except Exception:
            pass


# ---------------------------------------------------------------- test-model repository (conformance)

# the FP32 identity model carries a full config: dynamic batching with two priority levels and
# timeout overrides, so the scheduling parameters real clients send have something to act on
_IDENTITY_FP32_CONFIG = """
name: "identity_fp32"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching {
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { allow_timeout_override: true }
}
"""
# everything else is auto-completed from the ONNX file, as Triton does; one instance keeps it light
_ONE_INSTANCE = "instance_group [ { kind: KIND_CPU count: 1 } ]\n"


@pytest.fixture(scope="session")
def test_models(example_repo, tmp_path_factory) -> Path:
    """A repository of test models built on the fly: ``identity_<datatype>`` for every datatype
    (INPUT0 -> OUTPUT0, [batch, 4]), ``identity_dyn`` (FP32 [batch, n]), ``identity_fixed``
    (FP32 [2, 3], no batching), ``bytes_batched``; plus the example models ``simple``,
    ``simple_identity`` and ``dense`` (linked, so that models added to the example repository
    later do not change what the conformance tests see)."""
    import onnx_models

    from server.core.dtypes import DATATYPES

    repo = tmp_path_factory.mktemp("test_models")
    for name in ("simple", "simple_identity", "dense"):
        (repo / name).symlink_to(example_repo / name, target_is_directory=True)
    for datatype in DATATYPES:
        name = f"identity_{datatype.lower()}"
        onnx_models.identity(repo / name / "1" / "model.onnx", datatype)
        config = _IDENTITY_FP32_CONFIG if datatype == "FP32" else _ONE_INSTANCE
        (repo / name / "config.pbtxt").write_text(config)
    # requests arriving within 300 ms share a batch: a bad one must not fail its batch mates
    onnx_models.identity(repo / "bytes_batched" / "1" / "model.onnx", "BYTES")
    (repo / "bytes_batched" / "config.pbtxt").write_text(
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 300000 }\n" + _ONE_INSTANCE)
    onnx_models.identity(repo / "identity_dyn" / "1" / "model.onnx", "FP32", ("batch", "n"))
    (repo / "identity_dyn" / "config.pbtxt").write_text(_ONE_INSTANCE)
    onnx_models.identity(repo / "identity_fixed" / "1" / "model.onnx", "FP32", (2, 3))
    (repo / "identity_fixed" / "config.pbtxt").write_text(_ONE_INSTANCE)
    return repo


@pytest.fixture(params=["grpc", "http"])
def kind(request) -> str:
    """The transport a tritonclient-driven test runs over (each test runs over both)."""
    return request.param


@pytest.fixture(scope="session")
def models_server(test_models, tmp_path_factory):
    """inferd serving the test models (session-wide)."""
    proc = ServerProcess([test_models])
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-models.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory):
    """inferd serving the test language model (tests/llm_helpers.py); one per test module."""
    from tests import llm_helpers

    repo = llm_helpers.llm_repository(tmp_path_factory.mktemp("llmrepo"))
    proc = ServerProcess([repo])
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-llm.log")
    yield proc
    proc.stop()
