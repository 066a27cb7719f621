"""Shared by the security tests: a small repository, readiness over TLS, simple's inputs."""

from __future__ import annotations

import shutil
import ssl
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[2]

SLOW_PY = """
import time
from pathlib import Path


class TritonPythonModel:
    def initialize(self, config):
        self.started = Path(config["model_repository"]) / "started.log"

    def execute(self, inputs):
        delay = inputs["DELAY_MS"]
        with self.started.open("a") as f:  # the tests wait for this line: the request is running
            f.write("1\\n")
        time.sleep(float(delay.max()) / 1000.0)
        return {"OUT": delay}
"""
SLOW_CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "DELAY_MS" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 4 } ]
"""


def repository(root: Path, slow: str | None = None) -> Path:
    """simple (ONNX, from the example repository) and, with ``slow`` (extra config text), a Python
    model named slow that sleeps DELAY_MS."""
    shutil.copytree(ROOT / "model_repository" / "simple", root / "simple")
    if slow is not None:
        (root / "slow" / "1").mkdir(parents=True)
        (root / "slow" / "1" / "model.py").write_text(SLOW_PY)
        (root / "slow" / "config.pbtxt").write_text(SLOW_CONFIG + slow)
    return root


def simple_inputs(module=grpcclient):
    a = module.InferInput("INPUT0", [1, 16], "INT32")
    a.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
    b = module.InferInput("INPUT1", [1, 16], "INT32")
    b.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    return [a, b]


def wait_started(repo: Path, count: int, timeout: float = 20.0) -> None:
    """Until the slow model has started ``count`` requests in total."""
    log = repo / "slow" / "started.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().split()) >= count:
            return
        time.sleep(0.02)
    raise TimeoutError(f"the slow model did not start {count} requests")


def wait_ready_https(proc, ca: Path, cert: tuple[Path, Path] | None = None, timeout: float = 60.0) -> None:
    """The harness waits over plaintext gRPC; a TLS server is waited for over its REST port."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"inferd exited with {proc.proc.returncode}:\n{proc.log()}")
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{proc.http_port}/v2/health/ready",
                                        context=ctx, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"inferd not ready after {timeout}s:\n{proc.log()}")


def wait_exit(proc, timeout: float = 30.0) -> int:
    """The return code of a server that is expected to refuse to start."""
    return proc.proc.wait(timeout)
