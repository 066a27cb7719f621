"""The dynamic batcher without tuning (scheduling/policy.py), seen from clients: closed-loop clients
form full batches with a plain ``dynamic_batching { }``, a lone client does not wait, and the
``latency_target_ms`` parameter caps the batch and is validated at load."""

from __future__ import annotations

import statistics
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.harness import ServerProcess

# sleeps fixed_ms + per_row_ms * rows, so a test controls what a batch costs
MODEL_PY = '''
import time
import numpy as np


class TritonPythonModel:
    def initialize(self, config):
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.fixed = float(params.get("fixed_ms", "0")) / 1000
        self.per_row = float(params.get("per_row_ms", "0")) / 1000

    def execute(self, inputs):
        x = inputs["INPUT0"]
        time.sleep(self.fixed + self.per_row * x.shape[0])
        return {"OUTPUT0": x, "BATCH": np.full((x.shape[0], 1), x.shape[0], dtype=np.int32)}
'''

IO = """backend: "python"
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 4 ] } ]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 4 ] },
  { name: "BATCH" data_type: TYPE_INT32 dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


def _params(**values: str) -> str:
    return "".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items())


CLIENTS = 16
MODELS = {
    # 20 ms a batch whatever its size: batching is free, so every client should share one batch
    "cohort": "max_batch_size: 16\ndynamic_batching { }\n" + _params(fixed_ms="20"),
    "lone": "max_batch_size: 16\ndynamic_batching { }\n" + _params(fixed_ms="50"),
    # 10 ms a row: a 50 ms target (40 ms planned for the batch) allows about 3 rows
    "targeted": "max_batch_size: 16\ndynamic_batching { }\n" + _params(per_row_ms="10", latency_target_ms="50"),
    "untargeted": "max_batch_size: 16\ndynamic_batching { }\n" + _params(per_row_ms="10"),
}
BAD = {
    "bad_text": ("max_batch_size: 4\ndynamic_batching { }\n", "soon"),
    "bad_negative": ("max_batch_size: 4\ndynamic_batching { }\n", "-5"),
    "bad_zero": ("max_batch_size: 4\ndynamic_batching { }\n", "0"),
    "bad_nan": ("max_batch_size: 4\ndynamic_batching { }\n", "nan"),
    "bad_empty": ("max_batch_size: 4\ndynamic_batching { }\n", ""),
    "bad_unbatched": ("max_batch_size: 4\n", "25"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    repo = root / "repo"
    configs = dict(MODELS)
    configs.update({name: text + _params(latency_target_ms=value) for name, (text, value) in BAD.items()})
    for name, text in configs.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(MODEL_PY)
        (repo / name / "config.pbtxt").write_text(text + IO)
    proc = ServerProcess([repo]).start(root / "inferd.log")
    yield proc
    proc.stop()


def _inputs() -> list:
    item = grpcclient.InferInput("INPUT0", [1, 4], "INT32")
    item.set_data_from_numpy(np.arange(4, dtype=np.int32).reshape(1, 4))
    return [item]


def _closed_loop(url: str, model: str, clients: int, rounds: int) -> list[int]:
    """``clients`` threads, each sending its next request as soon as it has its answer; the batch
    size every response reports."""
    sizes: list[int] = []
    errors: list[Exception] = []
    lock = threading.Lock()

    def client() -> None:
        try:
            with grpcclient.InferenceServerClient(url) as c:
                for _ in range(rounds):
                    size = int(c.infer(model, _inputs(), client_timeout=60).as_numpy("BATCH")[0, 0])
                    with lock:
                        sizes.append(size)
        except Exception as exc:  # noqa: BLE001 - a thread reports whatever ended it to the test
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    return sizes


def _mean_batch(url: str, model: str) -> float:
    with grpcclient.InferenceServerClient(url) as c:
        stats = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats["inference_count"]) / int(stats["execution_count"])


def test_closed_loop_clients_form_full_batches_without_a_queue_delay(server):
    # A work-conserving batcher runs the first request that comes back alone while the others
    # return, and oscillates between a batch of 1 and one of the rest (mean about 8 here).
    _closed_loop(server.grpc_url, "cohort", CLIENTS, 1)  # the batcher learns what a batch costs
    sizes = _closed_loop(server.grpc_url, "cohort", CLIENTS, 20)
    assert len(sizes) == CLIENTS * 20
    assert _mean_batch(server.grpc_url, "cohort") >= 0.75 * CLIENTS, sorted(sizes)
    assert statistics.median(sizes) == CLIENTS


def test_a_lone_client_does_not_wait_for_a_batch(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        latencies = []
        for _ in range(12):
            start = time.perf_counter()
            result = c.infer("lone", _inputs(), client_timeout=60)
            latencies.append(time.perf_counter() - start)
            assert int(result.as_numpy("BATCH")[0, 0]) == 1
    # the model sleeps 50 ms: waiting for a companion (up to five execution times) would make
    # it 100-300 ms; the bound leaves room for a loaded machine
    assert statistics.median(latencies[2:]) < 0.1, latencies


def test_latency_target_caps_the_batch_by_its_predicted_execution(server):
    for model in ("targeted", "untargeted"):
        _closed_loop(server.grpc_url, model, 1, 2)  # the execution time of a batch of one is known
    capped = _closed_loop(server.grpc_url, "targeted", CLIENTS, 4)
    free = _closed_loop(server.grpc_url, "untargeted", CLIENTS, 4)
    # 10 ms a row: within 40 ms of the 50 ms target fit 3 rows (4 when the prediction is optimistic)
    assert max(capped) <= 4, sorted(capped)
    assert max(free) > 4, sorted(free)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_latency_target_fails_the_load_naming_key_and_value(server, name):
    value = BAD[name][1]
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        assert not c.is_model_ready(name)
        index = {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
    state, reason = index[name]
    assert state == "UNAVAILABLE"
    assert "latency_target_ms" in reason, reason
    if name == "bad_unbatched":
        assert "dynamic_batching" in reason
    else:
        assert f"'{value}'" in reason and "positive number" in reason, reason

