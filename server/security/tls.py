"""TLS for the three ports: gRPC server credentials and aiohttp SSL contexts, both reloaded from
disk when the certificate files change, so a cert-manager rotation needs no restart."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class TlsFiles:
    """One port's PEM files: server certificate chain and key, and the CA that verifies clients."""

    cert: str
    key: str
    root: str = ""
    mutual: bool = False

    def check(self, port: str) -> None:
        """Fail the start with the flag's subject named, not with an OpenSSL message later."""
        if not self.cert or not self.key:
            raise ValueError(f"{port} TLS needs both a server certificate and a server key")
        if self.mutual and not self.root:
            raise ValueError(f"{port} mutual TLS needs a root certificate to verify clients with")
        for what, path in (("certificate", self.cert), ("key", self.key), ("root certificate", self.root)):
            if path and not os.path.isfile(path):
                raise ValueError(f"{port} TLS {what} file '{path}' does not exist")

    def signature(self) -> Signature:
        """Identity of the files' current contents: a Kubernetes Secret volume swaps them through a
        ``..data`` symlink, and stat() follows links, so a swap changes inode and mtime."""
        out = []
        for path in (self.cert, self.key, self.root):
            if path:
                st = os.stat(path)
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        def load(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return load(self.key), load(self.cert), load(self.root) if self.root else None


class _Reloader:
    """Calls ``build`` again when the files' signature changes; a half-written or bad file keeps the
    previous credentials (logged once per distinct bad state) until the next change."""

    def __init__(self, files: TlsFiles, port: str, build: Callable[[TlsFiles], object]) -> None:
        self.files = files
        self.port = port
        self.build = build
        self.signature = files.signature()
        self.current = build(files)  # at start a bad file is fatal: the caller reports it
        self._bad: Signature | None = None

    def changed(self) -> object | None:
        """The new credentials when the files changed and load, else None. Never raises: it runs in
        the TLS handshake path."""
        try:
            signature = self.files.signature()
            if signature == self.signature or signature == self._bad:
                return None
            fresh = self.build(self.files)
        except Exception as exc:  # noqa: BLE001 - keep serving the previous certificate
            try:
                self._bad = self.files.signature()
            except OSError:
                self._bad = None
            log.warning("%s TLS: the certificate files changed but cannot be loaded (%s); keeping the "
                        "previous certificate", self.port, exc)
            return None
        self.signature, self.current, self._bad = signature, fresh, None
        log.info("%s TLS: reloaded the certificate files", self.port)
        return fresh


def grpc_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Dynamic credentials: grpcio calls the fetcher before each new connection's handshake; it
    answers None (keep) unless the files changed. Open connections keep their session."""

    def configuration(f: TlsFiles) -> grpc.ServerCertificateConfiguration:
        key, cert, root = f.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=root)

    reloader = _Reloader(files, "gRPC", configuration)
    return grpc.dynamic_ssl_server_credentials(
        reloader.current, reloader.changed, require_client_authentication=files.mutual
    )


def server_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    if files.root:
        ctx.load_verify_locations(cafile=files.root)
    ctx.verify_mode = ssl.CERT_REQUIRED if files.mutual else ssl.CERT_NONE
    return ctx


def server_ssl_context(files: TlsFiles, port: str) -> ssl.SSLContext:
    """The context for an aiohttp site. It serves the files loaded at start until they change; then
    its SNI callback (which OpenSSL runs in every handshake, with or without SNI) moves each new
    connection onto a context built from the new files, CA included."""
    reloader = _Reloader(files, port, server_context)
    base = reloader.current

    def on_hello(sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        reloader.changed()
        if reloader.current is not base:
            sslobj.context = reloader.current

    base.sni_callback = on_hello
    return base
