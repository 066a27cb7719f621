"""A real inferd process on loopback, for tests: free ports, wait for readiness, stop cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``inferd`` started as a subprocess with the given arguments."""

    def __init__(self, repositories: list[Path], *extra: str, env: dict | None = None) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.args = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1",
                     "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                     "--metrics-port", str(self.metrics_port)]
        for repo in repositories:
            self.args += ["--model-repository", str(repo)]
        self.args += list(extra)
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, log_path: Path, timeout: float = 60.0, wait_ready: bool = True) -> "ServerProcess":
        self.log_path = log_path
        for attempt in range(PORT_ATTEMPTS):
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=open(log_path, "wb"),
                                         stderr=subprocess.STDOUT)
            if not wait_ready:
                return self
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                # a free port can be taken between free_port() and the server's bind (an outgoing
                # connection's source port is drawn from the same range): new ports, a new start
                if "Address already in use" not in self.log() or attempt == PORT_ATTEMPTS - 1:
                    raise
                self._new_ports()
            except BaseException:  # a server that never got ready must not outlive its test
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
                raise
        return self

    def _new_ports(self) -> None:
        moved = {}
        for attr in ("grpc_port", "http_port", "metrics_port"):
            old = getattr(self, attr)
            moved[str(old)] = str(free_port())
            setattr(self, attr, int(moved[str(old)]))
        args = []
        for arg in self.args:
            flag, eq, value = arg.rpartition("=")
            if arg in moved:
                arg = moved[arg]
            elif eq and flag.startswith("--") and value in moved:
                arg = f"{flag}={moved[value]}"
            args.append(arg)
        self.args = args

    def wait_ready(self, timeout: float = 60.0) -> None:
        from server.protos import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"inferd exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"inferd not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
