"""The test harness itself: a server whose port was taken before it could bind starts again elsewhere."""

from __future__ import annotations

import socket

from tests.harness import ROOT, ServerProcess


def test_a_port_taken_before_the_bind_gets_the_server_new_ports(tmp_path):
    proc = ServerProcess([ROOT / "model_repository"], "--model-control-mode", "explicit")
    taken = proc.grpc_port
    with socket.socket() as blocker:  # what an outgoing connection's source port does to free_port()
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        proc.start(tmp_path / "inferd.log")
        try:
            assert proc.grpc_port != taken and str(proc.grpc_port) in proc.args
            assert str(taken) not in proc.args
        finally:
            assert proc.stop() == 0
