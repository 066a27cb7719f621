"""Pure logic of server/security: path groups, rule parsing, key parsing, the token bucket."""

from __future__ import annotations

import pytest

from server.security.access import GRPC_CATEGORY, Restrictions, http_category, parse_rules
from server.security.keys import parse
from server.security.quotas import Quotas, Rejection, Ticket


@pytest.mark.parametrize("path, group, model", [
    ("/v2/health/live", "health", None),
    ("/v2/health/ready", "health", None),
    ("/v2/models/simple/ready", "health", None),
    ("/v2/models/simple/versions/3/ready", "health", None),
    ("/v2", "metadata", None),
    ("/v2/", "metadata", None),
    ("/v2/models", "metadata", None),
    ("/v2/models/simple", "metadata", None),
    ("/v2/models/simple/versions/2", "metadata", None),
    ("/v2/models/simple/infer", "inference", "simple"),
    ("/v2/models/a%2Fb/versions/1/infer", "inference", "a%2Fb"),
    ("/v2/models/llm/generate_stream", "inference", "llm"),
    ("/v2/models/simple/config", "model-config", None),
    ("/v2/models/stats", "statistics", None),
    ("/v2/models/simple/stats", "statistics", None),
    ("/v2/models/simple/trace/setting", "trace", None),
    ("/v2/trace/setting", "trace", None),
    ("/v2/logging", "logging", None),
    ("/v2/systemsharedmemory/status", "shared-memory", None),
    ("/v2/cudasharedmemory/region/x/register", "shared-memory", None),
    ("/v2/repository/index", "model-repository", None),
    ("/v2/repository/models/simple/load", "model-repository", None),
    ("/v1/chat/completions", "inference", None),
    ("/v2/nothing/here", None, None),
    ("/metrics", None, None),
])
def test_http_groups(path, group, model):
    assert http_category(path) == (group, model)


def test_grpc_groups_cover_every_rpc():
    from server.protos import grpc_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert f"/inference.GRPCInferenceService/{method.name}" in GRPC_CATEGORY, method.name


def test_rules():
    rules = parse_rules(["model-repository,trace:Admin-Key=x=y", "logging:other=1"], "--http-restricted-api")
    r = Restrictions(rules)
    headers = {"admin-key": "x=y", "other": "2"}
    assert r.denied("trace", headers.get) is None  # the value may itself hold '='
    assert r.denied("logging", headers.get) == "other"
    assert r.denied("inference", headers.get) is None
    grpc_rules = Restrictions(rules, "triton-grpc-protocol-")
    assert grpc_rules.denied("trace", {}.get) == "triton-grpc-protocol-admin-key"
    with pytest.raises(ValueError, match="not a valid header name"):
        parse_rules(["trace:bad key=1"], "--http-restricted-api")


def test_key_parse_env_separators():
    entries = parse("a:0123456789abcdef0, b:abcdef0123456789x\nc:zzzzzzzzzzzzzzzzzz", "INFERD_API_KEYS")
    assert [t for t, _ in entries] == ["a", "b", "c"]


def test_token_bucket_refills_and_rejections_take_nothing():
    q = Quotas(rate=2.0, burst=2, concurrency=1)
    first = q.admit("c", "client c", now=100.0)
    assert isinstance(first, Ticket)
    busy = q.admit("c", "client c", now=100.0)  # refused for concurrency: no token spent
    assert isinstance(busy, Rejection) and busy.reason == "concurrency"
    first.release()
    first.release()  # idempotent
    assert isinstance(q.admit("c", "client c", now=100.0), Ticket)  # the second token
    assert q.active == {"c": 1}
    rate = Quotas(rate=2.0, burst=2)
    rate.admit("c", "c", now=0.0), rate.admit("c", "c", now=0.0)
    refused = rate.admit("c", "c", now=0.0)
    assert isinstance(refused, Rejection) and refused.reason == "rate"
    assert refused.retry_after_ms == 500 and refused.retry_after_header == "1"
    assert isinstance(rate.admit("c", "c", now=0.5), Ticket)  # one token after 1/rate seconds


def test_model_limit_released():
    q = Quotas(model_inflight=1)
    ticket = q.admit("c", "c", model="m")
    assert isinstance(q.admit("d", "d", model="m"), Rejection)
    assert isinstance(q.admit("d", "d", model="other"), Ticket)
    ticket.release()
    assert q.model_inflight.get("m") in (None, 0) and isinstance(q.admit("d", "d", model="m"), Ticket)


def test_caller_table_is_bounded(monkeypatch):
    import server.security.quotas as quotas

    monkeypatch.setattr(quotas, "_MAX_CALLERS", 100)
    q = Quotas(rate=1.0, burst=5)
    for i in range(1000):
        q.admit(f"address:{i}", "x", now=float(i))
    assert len(q.buckets) <= 100


def test_security_flags_parse_as_triton_writes_them(tmp_path):
    from server.settings import from_args

    s = from_args(["--model-repository", str(tmp_path), "--grpc-use-ssl=true", "--grpc-server-cert=c.pem",
                   "--grpc-server-key=k.pem", "--grpc-use-ssl-mutual", "--http-use-ssl",
                   "--http-server-cert=h.pem", "--http-server-key=hk.pem", "--http-root-cert=ca.pem",
                   "--metrics-use-ssl=1",
                   "--grpc-restricted-protocol=model-repository:admin=x", "--tenant-request-rate=2.5"])
    assert s.grpc_use_ssl and s.grpc_use_ssl_mutual and s.http_use_ssl and s.metrics_use_ssl
    assert not s.http_use_ssl_mutual
    # the metrics port reuses the REST files unless given its own
    assert (s.metrics_server_cert, s.metrics_server_key, s.metrics_root_cert) == ("h.pem", "hk.pem", "ca.pem")
    assert s.grpc_restricted_protocol == ["model-repository:admin=x"] and s.tenant_request_rate == 2.5
    plain = from_args(["--model-repository", str(tmp_path), "--grpc-use-ssl=false"])
    assert not plain.grpc_use_ssl and plain.api_key_file == "" and plain.model_max_inflight == 0


@pytest.mark.parametrize("argv, message", [
    (["--tenant-max-concurrent=-1"], "--tenant-max-concurrent must be >= 0"),
    (["--grpc-restricted-protocol=nope:a=b"], "unknown restricted protocol 'nope'"),
    (["--grpc-use-ssl=maybe"], "expected a boolean"),
])
def test_bad_security_flags(tmp_path, capsys, argv, message):
    from server.settings import from_args

    with pytest.raises(SystemExit):
        from_args(["--model-repository", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
