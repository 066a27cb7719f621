"""Helpers for the lifecycle tests: a model whose answer says which file served it, continuous
client load that counts every result, and polling for a condition."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

# a config with everything explicit, so that auto-complete plays no part in what a test changes
CONFIG = """
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching { }
"""


def offset_model(path: Path, offset: float) -> Path:
    """OUTPUT0 = INPUT0 + offset, FP32 [batch, 4]: the offset tells which model file answered."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "OFFSET"], ["OUTPUT0"])], "offset",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.array([offset], dtype=np.float32), "OFFSET")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def offset_bytes(offset: float, tmp: Path) -> bytes:
    return offset_model(tmp / f"offset-{offset}.onnx", offset).read_bytes()


def wait_for(condition, timeout: float = 20.0, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Tally:
    """Every result of a load run: successes by (version, offset), failures with their messages."""

    sent: int = 0
    ok: int = 0
    served: Counter = field(default_factory=Counter)  # (version, offset) -> count
    failures: list[str] = field(default_factory=list)
    last: tuple[str, float] | None = None


class Load:
    """``clients`` threads, each with its own gRPC client, sending requests back to back to
    ``model`` (``version``: "" for the default routing) and checking every answer."""

    def __init__(self, url: str, model: str, clients: int = 4, version: str = "") -> None:
        self.url, self.model, self.version = url, model, version
        self.tally = Tally()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> Tally:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return self.tally

    def _run(self, index: int) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        x = np.arange(4, dtype=np.float32).reshape(1, 4) + index * 100
        inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        try:
            while not self._stop.is_set():
                try:
                    result = client.infer(self.model, [inp], model_version=self.version, client_timeout=20)
                    out = result.as_numpy("OUTPUT0")
                    delta = out - x
                    offset = float(delta[0, 0])
                    if not np.allclose(delta, offset):
                        raise AssertionError(f"wrong answer {out} for {x}")
                    key = (result.get_response().model_version, offset)
                    with self._lock:
                        self.tally.sent += 1
                        self.tally.ok += 1
                        self.tally.served[key] += 1
                        self.tally.last = key
                except (InferenceServerException, AssertionError) as exc:
                    with self._lock:
                        self.tally.sent += 1
                        self.tally.failures.append(str(exc))
        finally:
            client.close()

    def served_since(self, key: tuple[str, float], count: int = 20) -> bool:
        """True once ``key`` answered at least ``count`` more requests (polled by tests)."""
        with self._lock:
            return self.tally.served[key] >= count

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self.tally.served)


def index(client: grpcclient.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}
