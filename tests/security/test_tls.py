"""TLS on all three ports with certificates made at test time: tritonclient (grpc and http) and curl
with the CA succeed, plaintext clients are refused, mutual TLS refuses a client without a
certificate, and replaced certificate files are served to new connections without a restart."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time

import gevent.ssl
import grpc
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.security.certs import Ca, common_name
from tests.security.helpers import repository, simple_inputs, wait_exit, wait_ready_https


@pytest.fixture
def pki(tmp_path):
    ca = Ca.make(tmp_path / "pki")
    server = ca.issue(tmp_path / "pki", "server", server=True)
    client = ca.issue(tmp_path / "pki", "client", server=False)
    return ca, server, client


def _tls_flags(server, ca, mutual: bool) -> list[str]:
    cert, key = server
    flags = []
    for port in ("grpc", "http", "metrics"):
        flags += [f"--{port}-use-ssl", f"--{port}-server-cert={cert}", f"--{port}-server-key={key}"]
        if mutual:
            flags += [f"--{port}-use-ssl-mutual", f"--{port}-root-cert={ca.path}"]
    return flags


def _curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True)


def _check_simple(result) -> None:
    assert result.as_numpy("OUTPUT0").tolist() == [list(range(1, 17))]


def test_tls_all_ports(tmp_path, start_server, pki):
    ca, server, _ = pki
    proc = start_server([repository(tmp_path / "repo")], *_tls_flags(server, ca, False), wait_ready=False)
    wait_ready_https(proc, ca.path)

    # gRPC: tritonclient with ssl=True and the CA
    client = grpcclient.InferenceServerClient(proc.grpc_url, ssl=True, root_certificates=str(ca.path))
    assert client.is_server_ready()
    _check_simple(client.infer("simple", simple_inputs()))
    client.close()
    # a plaintext gRPC client gets no answer
    with grpc.insecure_channel(proc.grpc_url) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # a TLS client that does not trust the CA is refused by its own handshake check
    other = Ca.make(tmp_path / "other", "other CA")
    with grpc.secure_channel(proc.grpc_url, grpc.ssl_channel_credentials(other.path.read_bytes())) as ch:
        with pytest.raises(grpc.RpcError):
            pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)

    # REST: tritonclient http with ssl options, curl with --cacert; plaintext refused
    rest = httpclient.InferenceServerClient(proc.http_url, ssl=True, ssl_options={"ca_certs": str(ca.path)},
                                            ssl_context_factory=gevent.ssl.create_default_context)
    assert rest.is_server_ready()
    _check_simple(rest.infer("simple", simple_inputs(httpclient)))
    rest.close()
    done = _curl("--cacert", str(ca.path), f"https://127.0.0.1:{proc.http_port}/v2/models/simple")
    assert done.returncode == 0 and '"name":"simple"' in done.stdout
    done = _curl(f"http://127.0.0.1:{proc.http_port}/v2/health/ready")
    assert done.returncode != 0  # the TLS port does not speak plaintext HTTP
    assert _curl(f"https://127.0.0.1:{proc.http_port}/v2/health/ready").returncode == 60  # untrusted cert

    # metrics over HTTPS
    done = _curl("--cacert", str(ca.path), f"https://127.0.0.1:{proc.metrics_port}/metrics")
    assert done.returncode == 0 and "nv_inference_request_success" in done.stdout
    assert _curl(f"http://127.0.0.1:{proc.metrics_port}/metrics").returncode != 0


def test_mutual_tls(tmp_path, start_server, pki):
    ca, server, client_cert = pki
    proc = start_server([repository(tmp_path / "repo")], *_tls_flags(server, ca, True), wait_ready=False)
    wait_ready_https(proc, ca.path, client_cert)
    cert, key = client_cert

    client = grpcclient.InferenceServerClient(proc.grpc_url, ssl=True, root_certificates=str(ca.path),
                                              private_key=str(key), certificate_chain=str(cert))
    _check_simple(client.infer("simple", simple_inputs()))
    client.close()
    # no client certificate: the handshake fails
    anonymous = grpcclient.InferenceServerClient(proc.grpc_url, ssl=True, root_certificates=str(ca.path))
    with pytest.raises(InferenceServerException) as err:
        anonymous.is_server_live(client_timeout=5)
    assert "UNAVAILABLE" in str(err.value) or "Deadline" in str(err.value)
    # a certificate from another CA is not accepted either
    stranger = Ca.make(tmp_path / "other", "other CA").issue(tmp_path / "other", "mallory", server=False)
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(proc.grpc_url, ssl=True, root_certificates=str(ca.path),
                                         private_key=str(stranger[1]), certificate_chain=str(stranger[0])
                                         ).is_server_live(client_timeout=5)

    rest = httpclient.InferenceServerClient(
        proc.http_url, ssl=True, ssl_context_factory=gevent.ssl.create_default_context,
        ssl_options={"ca_certs": str(ca.path), "certfile": str(cert), "keyfile": str(key)})
    _check_simple(rest.infer("simple", simple_inputs(httpclient)))
    rest.close()
    url = f"https://127.0.0.1:{proc.http_port}/v2/health/live"
    assert _curl("--cacert", str(ca.path), url).returncode != 0
    done = _curl("--cacert", str(ca.path), "--cert", str(cert), "--key", str(key), url)
    assert done.returncode == 0 and done.stdout == '{"live":true}'
    metrics = f"https://127.0.0.1:{proc.metrics_port}/metrics"
    assert _curl("--cacert", str(ca.path), metrics).returncode != 0
    assert _curl("--cacert", str(ca.path), "--cert", str(cert), "--key", str(key), metrics).returncode == 0


def _served_cn(port: int) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as tls:
            return common_name(tls.getpeercert(binary_form=True))


def _replace(src: tuple, dst: tuple) -> None:
    """As cert-manager's Secret volume update does: new files moved into place, not edited."""
    for s, d in zip(src, dst):
        tmp = d.with_suffix(".new")
        shutil.copyfile(s, tmp)
        os.replace(tmp, d)


def test_certificate_rotation_without_restart(tmp_path, start_server, pki):
    ca, _, _ = pki
    live = tmp_path / "live"
    live.mkdir()
    files = (live / "tls.crt", live / "tls.key")
    _replace(ca.issue(tmp_path / "a", "server-a", server=True), files)
    flags = []
    for port in ("grpc", "http", "metrics"):
        flags += [f"--{port}-use-ssl", f"--{port}-server-cert={files[0]}", f"--{port}-server-key={files[1]}"]
    proc = start_server([repository(tmp_path / "repo")], *flags, wait_ready=False)
    wait_ready_https(proc, ca.path)
    assert _served_cn(proc.http_port) == _served_cn(proc.metrics_port) == "server-a"
    old = grpcclient.InferenceServerClient(proc.grpc_url, ssl=True, root_certificates=str(ca.path))
    _check_simple(old.infer("simple", simple_inputs()))

    # rotate to a certificate from a new CA: new connections must present it
    new_ca = Ca.make(tmp_path / "b", "rotated CA")
    _replace(new_ca.issue(tmp_path / "b", "server-b", server=True), files)
    time.sleep(0.05)
    assert _served_cn(proc.http_port) == "server-b"
    assert _served_cn(proc.metrics_port) == "server-b"
    fresh = grpcclient.InferenceServerClient(proc.grpc_url, ssl=True, root_certificates=str(new_ca.path))
    _check_simple(fresh.infer("simple", simple_inputs()))
    stale = grpcclient.InferenceServerClient(proc.grpc_url, ssl=True, root_certificates=str(ca.path))
    with pytest.raises(InferenceServerException):
        stale.is_server_live(client_timeout=5)  # a new connection trusting only the old CA fails
    # the connection made before the rotation keeps its session
    _check_simple(old.infer("simple", simple_inputs()))
    for c in (old, fresh, stale):
        c.close()

    # a broken file (half-written) keeps the last good certificate, and the log says so
    files[0].write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    assert _served_cn(proc.http_port) == "server-b"
    assert "cannot be loaded" in proc.log()


@pytest.mark.parametrize("flags, message", [
    (["--grpc-use-ssl"], "gRPC TLS needs both a server certificate and a server key"),
    (["--http-use-ssl-mutual", "--http-server-cert=CERT", "--http-server-key=KEY"],
     "HTTP mutual TLS needs a root certificate"),
    (["--grpc-use-ssl", "--grpc-server-cert=/nonexistent.pem", "--grpc-server-key=KEY"],
     "gRPC TLS certificate file '/nonexistent.pem' does not exist"),
    (["--http-use-ssl", "--http-server-cert=KEY", "--http-server-key=KEY"], "HTTP TLS: cannot load"),
])
def test_bad_tls_settings_stop_the_start(tmp_path, start_server, pki, flags, message):
    _, (cert, key), _ = pki
    flags = [f.replace("CERT", str(cert)).replace("KEY", str(key)) for f in flags]
    proc = start_server([repository(tmp_path / "repo")], *flags, wait_ready=False)
    assert wait_exit(proc) != 0
    assert message in proc.log()
