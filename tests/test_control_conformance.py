"""Conformance of the non-inference endpoints: every case of tests/control_cases.py over gRPC and REST.

gRPC through stubs generated from ``proto/`` (what tritonclient.grpc wraps), REST through plain
HTTP (the exact JSON documents). Each transport brings its answer into the neutral form that
control_cases.py describes; nothing else differs between the two runs.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import grpc
import pytest
from google.protobuf import json_format

from server.protos import grpc_service_pb2 as pb
from server.protos import grpc_service_pb2_grpc as pb_grpc
from tests.control_cases import CONTROL_CASES, ControlCase, Failure, FailureRaised, Transport, run
from tests.http_helpers import call, post_json
from tests.http_transports import ERROR_KIND


def _tensors(entries) -> list[tuple]:
    return [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in entries]


def _int64_numbers(doc):
    """protobuf's JSON writes 64-bit integers as strings; the neutral form has numbers, as REST does."""
    if isinstance(doc, dict):
        return {k: _int64_numbers(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_int64_numbers(v) for v in doc]
    if isinstance(doc, str) and doc.lstrip("-").isdigit():
        return int(doc)
    return doc


class Grpc(Transport):
    name = "grpc"

    def __init__(self, server) -> None:
        self.channel = grpc.insecure_channel(server.grpc_url)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def _call(self, method: str, request):
        try:
            return getattr(self.stub, method)(request, timeout=30)
        except grpc.RpcError as exc:
            raise FailureRaised(Failure(exc.code().name, exc.details() or "")) from None

    def server_metadata(self) -> dict:
        r = self._call("ServerMetadata", pb.ServerMetadataRequest())
        return {"name": r.name, "version": r.version, "extensions": sorted(r.extensions)}

    def model_metadata(self, model: str, version: str = "") -> dict:
        r = self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version))
        as_dicts = json_format.MessageToDict(r, preserving_proto_field_name=True)
        return {"name": r.name, "versions": list(r.versions), "platform": r.platform,
                "inputs": _tensors(as_dicts.get("inputs", [])),
                "outputs": _tensors(as_dicts.get("outputs", []))}

    def model_config(self, model: str, version: str = "") -> dict:
        r = self._call("ModelConfig", pb.ModelConfigRequest(name=model, version=version))
        doc = json_format.MessageToDict(r.config, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
        return _int64_numbers(doc)

    def statistics(self, model: str = "", version: str = "") -> list[tuple]:
        r = self._call("ModelStatistics", pb.ModelStatisticsRequest(name=model, version=version))
        return [(s.name, s.version, s.inference_count, s.inference_stats.success.count)
                for s in r.model_stats]

    def repository_index(self, ready: bool = False) -> list[tuple]:
        r = self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready))
        return [(m.name, m.version, m.state, m.reason) for m in r.models]

    def close(self) -> None:
        self.channel.close()


class Rest(Transport):
    name = "rest"

    def __init__(self, server) -> None:
        self.base = server.http_url

    @staticmethod
    def _path(model: str, version: str, tail: str = "") -> str:
        path = f"/v2/models/{quote(model, safe='')}"
        if version:
            path += f"/versions/{quote(version, safe='')}"
        return path + tail

    def _json(self, answer):
        if answer.status != 200:
            kind = ERROR_KIND.get(str(answer.status), f"HTTP {answer.status}")
            raise FailureRaised(Failure(kind, answer.error))
        assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
        return answer.json()

    def server_metadata(self) -> dict:
        doc = self._json(call(self.base, "GET", "/v2"))
        assert set(doc) == {"name", "version", "extensions"}, doc
        return {"name": doc["name"], "version": doc["version"], "extensions": sorted(doc["extensions"])}

    def model_metadata(self, model: str, version: str = "") -> dict:
        doc = self._json(call(self.base, "GET", self._path(model, version)))
        return {"name": doc["name"], "versions": doc["versions"], "platform": doc["platform"],
                "inputs": _tensors(doc["inputs"]), "outputs": _tensors(doc["outputs"])}

    def model_config(self, model: str, version: str = "") -> dict:
        return self._json(call(self.base, "GET", self._path(model, version, "/config")))

    def statistics(self, model: str = "", version: str = "") -> list[tuple]:
        path = self._path(model, version, "/stats") if model else "/v2/models/stats"
        doc = self._json(call(self.base, "GET", path))
        return [(s["name"], s["version"], s["inference_count"], s["inference_stats"]["success"]["count"])
                for s in doc["model_stats"]]

    def repository_index(self, ready: bool = False) -> list[tuple]:
        answer = post_json(self.base, "/v2/repository/index", {"ready": True}) if ready else \
            call(self.base, "POST", "/v2/repository/index")
        return [(m["name"], m.get("version", ""), m.get("state", ""), m.get("reason", ""))
                for m in self._json(answer)]


TRANSPORTS = {"grpc": Grpc, "rest": Rest}


@pytest.fixture(scope="module", params=sorted(TRANSPORTS))
def transport(request, models_server):
    t = TRANSPORTS[request.param](models_server)
    yield t
    t.close()


@pytest.mark.parametrize("case", CONTROL_CASES, ids=[c.id for c in CONTROL_CASES])
def test_control_case(transport: Transport, case: ControlCase):
    run(transport, case)


def test_both_transports_render_the_same_config(models_server):
    """Beyond the fields the cases name: the whole effective configuration is one document."""
    grpc_t, rest_t = Grpc(models_server), Rest(models_server)
    try:
        for model in ("dense", "identity_fp32", "identity_bytes", "simple_identity"):
            over_grpc, over_rest = grpc_t.model_config(model), rest_t.model_config(model)
            assert over_grpc == over_rest, json.dumps([over_grpc, over_rest], indent=1)
    finally:
        grpc_t.close()
