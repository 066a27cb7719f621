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
