"""The control-plane case table (tests/control_cases.py: metadata, config, statistics, index, trace
settings, errors) over gRPC and REST against inferd with ``--frontend-workers 2``: the answers come
from the engine through whichever worker took the connection, and must read exactly as in one process."""

from __future__ import annotations

import pytest

from tests.harness import ServerProcess
from tests.test_control_conformance import (  # noqa: F401 - collected here against the workers server
    test_both_transports_render_the_same_config,
    test_control_case,
    transport,
)


@pytest.fixture(scope="module")
def models_server(test_models, tmp_path_factory):
    proc = ServerProcess([test_models], "--frontend-workers", "2")
    proc.start(tmp_path_factory.mktemp("logs") / "inferd-workers-control.log", timeout=120)
    yield proc
    assert proc.stop() == 0
