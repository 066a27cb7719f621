"""An ONNX model whose batches run on the event loop (scheduling/instances.py), seen from gRPC
clients: concurrent requests share batches, a lone client's request is not held for companions."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server.scheduling.batcher import GATHER_MAX_NS
from tests.harness import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import build_models
    import onnx_models

    root = tmp_path_factory.mktemp("inline")
    onnx_models.add_sub(root / "repo" / "add_sub" / "1" / "model.onnx")
    # the benchmark's add_sub: one instance, plain dynamic_batching { }
    (root / "repo" / "add_sub" / "config.pbtxt").write_text(build_models.bench_config("add_sub", batching=True))
    proc = ServerProcess([root / "repo"]).start(root / "inferd.log")
    yield proc
    proc.stop()


def _request(seed: int) -> tuple[list, np.ndarray, np.ndarray]:
    a = np.arange(16, dtype=np.int32).reshape(1, 16) + seed
    b = np.full((1, 16), seed % 7, dtype=np.int32)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a + b, a - b


def _infer(client: grpcclient.InferenceServerClient, seed: int) -> None:
    inputs, total, difference = _request(seed)
    result = client.infer("add_sub", inputs, client_timeout=60)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), total)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), difference)


def _stats(client: grpcclient.InferenceServerClient) -> tuple[int, int, int, int]:
    """(inferences, executions, successful requests, ns they spent queued) so far."""
    stats = client.get_inference_statistics("add_sub", as_json=True)["model_stats"][0]
    queue = stats["inference_stats"]["queue"]
    return (int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)),
            int(stats["inference_stats"]["success"].get("count", 0)), int(queue.get("ns", 0)))


def test_a_lone_client_is_not_held_and_concurrent_clients_share_batches(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        # one client: every request is its own batch, and it is dispatched without waiting for
        # companions (the loop is quiet): far less queue time than the gather bound
        for i in range(300):  # also the cheap batches that move the model onto the loop
            _infer(client, i)
        before = _stats(client)
        for i in range(200):
            _infer(client, i)
        inferences, executions, requests, queued_ns = (a - b for a, b in zip(_stats(client), before))
        assert inferences == executions == requests == 200
        assert queued_ns / requests < GATHER_MAX_NS / 4, f"a lone request queued {queued_ns / requests / 1e3:.0f} us"

        # sixteen closed-loop clients: requests reach the loop one iteration at a time, yet share batches
        before = _stats(client)
        errors: list[BaseException] = []

        def closed_loop(seed: int) -> None:
            try:
                with grpcclient.InferenceServerClient(server.grpc_url) as own:
                    for i in range(60):
                        _infer(own, seed * 1000 + i)
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)

        threads = [threading.Thread(target=closed_loop, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[0]
        inferences, executions, requests, _ = (a - b for a, b in zip(_stats(client), before))
        assert inferences == requests == 16 * 60
        assert executions < inferences / 1.5, f"{inferences} inferences in {executions} batches"
