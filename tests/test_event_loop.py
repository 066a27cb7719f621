"""--event-loop: uvloop by default when installed, asyncio's loop on request; both serve the same."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server.core import loops


def _add_sub(url: str) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer("simple", inputs)
    assert (result.as_numpy("OUTPUT0") == 2 * a).all()


@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_the_server_serves_on_the_chosen_loop(start_server, example_repo, choice):
    server = start_server([example_repo], "--event-loop", choice, "--allow-metrics", "false")
    _add_sub(server.grpc_url)
    expected = "asyncio" if choice == "asyncio" else loops.chosen("auto")
    assert f"event loop: {expected}" in server.log()


def test_auto_prefers_uvloop_and_asyncio_is_the_standard_runner():
    import uvloop  # noqa: F401 - a runtime dependency, installed with the server

    assert loops.chosen("auto") == "uvloop"
    assert loops.runner("asyncio") is asyncio.run


def test_an_unknown_loop_is_refused(start_server, example_repo):
    server = start_server([example_repo], "--event-loop", "tokio", wait_ready=False)
    assert server.proc.wait(30) == 2
    assert "invalid choice: 'tokio'" in server.log()
