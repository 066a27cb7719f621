"""Plain HTTP for the REST tests: exact bytes out and in (no client library between test and server)."""

from __future__ import annotations

import gzip
import http.client
import json
import zlib
from dataclasses import dataclass

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def error(self) -> str:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        doc = self.json()
        assert set(doc) == {"error"}, doc
        return doc["error"]

    def decoded(self) -> bytes:
        """The body with its Content-Encoding undone."""
        encoding = self.headers.get("content-encoding")
        if encoding == "gzip":
            return gzip.decompress(self.body)
        if encoding == "deflate":
            return zlib.decompress(self.body)
        assert encoding is None, encoding
        return self.body


def call(
    base: str,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Answer:
    host, port = base.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(
            method, path, body=body.encode() if isinstance(body, str) else body, headers=headers or {}
        )
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def post_json(base: str, path: str, doc, headers: dict[str, str] | None = None) -> Answer:
    return call(base, "POST", path, json.dumps(doc), {"Content-Type": "application/json", **(headers or {})})


def binary_body(
    inputs: list[tuple[str, str, np.ndarray]],
    outputs: list[dict] | None = None,
    parameters: dict | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request: JSON header + raw blobs in input order."""
    doc: dict = {
        "inputs": [
            {"name": n, "datatype": dt, "shape": list(a.shape), "parameters": {"binary_data_size": a.nbytes}}
            for n, dt, a in inputs
        ]
    }
    if outputs is not None:
        doc["outputs"] = outputs
    if parameters:
        doc["parameters"] = parameters
    header = json.dumps(doc).encode()
    body = header + b"".join(np.ascontiguousarray(a).tobytes() for _, _, a in inputs)
    return body, {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


def split_binary(answer: Answer) -> tuple[dict, dict[str, bytes]]:
    """A binary response -> (JSON header, output name -> blob), checking the framing."""
    body = answer.decoded()
    length = int(answer.headers[HEADER_LENGTH.lower()])
    doc = json.loads(body[:length])
    blobs, offset = {}, length
    for out in doc["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            assert "data" not in out, out
            blobs[out["name"]] = body[offset : offset + size]
            offset += size
    assert offset == len(body), f"{len(body) - offset} bytes after the last blob"
    return doc, blobs


def scrape(proc) -> str:
    """The server's Prometheus exposition (a real scrape of its metrics port)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def sample(text: str, prefix: str) -> float:
    """The value of the first sample line starting with ``prefix`` (0.0 when there is none)."""
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
