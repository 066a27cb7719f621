"""The security settings in force, built once from Settings, and the decisions both transports share:
who the caller is (API key -> tenant), whether it may use an API group, and whether it is admitted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .access import GRPC_HEADER_PREFIX, Restrictions, parse_rules
from .keys import ApiKeys
from .quotas import MODEL_PARAMETER, Quotas, Rejection, Ticket
from .tls import TlsFiles, server_context

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the tenant label of callers without a key (never their address: cardinality)
RejectSink = Callable[[str, str], None]  # (reason, tenant label)


@dataclass(slots=True)
class Caller:
    tenant: str | None  # from the API key; None without keys
    address: str

    @property
    def label(self) -> str:
        return self.tenant or ANONYMOUS

    @property
    def quota_key(self) -> str:
        return f"tenant:{self.tenant}" if self.tenant else f"address:{self.address}"

    @property
    def describe(self) -> str:
        return f"tenant '{self.tenant}'" if self.tenant else f"client {self.address}"


def _tls(settings, port: str) -> TlsFiles | None:
    get = lambda name: getattr(settings, f"{port}_{name}")  # noqa: E731
    if not (get("use_ssl") or get("use_ssl_mutual")):
        return None
    files = TlsFiles(get("server_cert"), get("server_key"), get("root_cert"), bool(get("use_ssl_mutual")))
    name = {"grpc": "gRPC", "http": "HTTP", "metrics": "metrics"}[port]
    files.check(name)
    try:  # a PEM that does not parse (or a key that does not match) stops the start, named
        server_context(files)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{name} TLS: cannot load {files.cert} / {files.key}"
                         f"{' / ' + files.root if files.root else ''}: {exc}") from None
    return files


class Security:
    def __init__(self, settings, on_reject: RejectSink | None = None) -> None:
        s = settings
        self.grpc_tls = _tls(s, "grpc")
        self.http_tls = _tls(s, "http")
        self.metrics_tls = _tls(s, "metrics")
        self.keys = ApiKeys.from_settings(s.api_key_file)
        self.metrics_need_key = bool(s.metrics_require_api_key)
        if self.metrics_need_key and self.keys is None:
            raise ValueError("--metrics-require-api-key needs API keys (--api-key-file or INFERD_API_KEYS)")
        self.grpc_rules = Restrictions(parse_rules(s.grpc_restricted_protocol, "--grpc-restricted-protocol"),
                                       GRPC_HEADER_PREFIX)
        self.http_rules = Restrictions(parse_rules(s.http_restricted_api, "--http-restricted-api"))
        self.quotas = Quotas(s.tenant_request_rate, s.tenant_request_burst, s.tenant_max_concurrent,
                             s.model_max_inflight)
        # model limits can also come from config.pbtxt: the check runs whenever keys or quotas are on
        self.on_reject = on_reject
        self._bad_parameter: set[str] = set()

    # -- what each transport installs -----------------------------------------------------------

    @property
    def quotas_on(self) -> bool:
        return self.quotas.per_caller or self.quotas.default_model_inflight > 0

    @property
    def guard_grpc(self) -> bool:
        return self.keys is not None or bool(self.grpc_rules) or self.quotas_on

    @property
    def guard_http(self) -> bool:
        return self.keys is not None or bool(self.http_rules) or self.quotas_on

    def summary(self) -> str:
        """One log line of what is on; names groups and tenants, never a key or header value."""
        parts = []
        for port, tls in (("gRPC", self.grpc_tls), ("HTTP", self.http_tls), ("metrics", self.metrics_tls)):
            parts.append(f"{port} {'mutual TLS' if tls and tls.mutual else 'TLS' if tls else 'plaintext'}")
        if self.keys is not None:
            parts.append(f"API keys for tenants {', '.join(self.keys.tenants())}"
                         + (" (metrics too)" if self.metrics_need_key else ""))
        if self.grpc_rules:
            parts.append(f"gRPC restricted: {', '.join(self.grpc_rules.groups())}")
        if self.http_rules:
            parts.append(f"HTTP restricted: {', '.join(self.http_rules.groups())}")
        q = self.quotas
        if q.rate > 0:
            parts.append(f"rate {q.rate:g}/s burst {q.burst:g} per caller")
        if q.concurrency > 0:
            parts.append(f"{q.concurrency} concurrent per caller")
        if q.default_model_inflight > 0:
            parts.append(f"{q.default_model_inflight} in flight per model")
        return "security: " + "; ".join(parts)

    # -- what the transports install (one call each, at server construction) ------------------

    def grpc_transport(self, dataplane) -> tuple[object | None, list]:
        """(server credentials or None for plaintext, interceptors)."""
        from .grpc_guard import SecurityInterceptor
        from .tls import grpc_credentials

        credentials = grpc_credentials(self.grpc_tls) if self.grpc_tls else None
        return credentials, [SecurityInterceptor(self, dataplane)] if self.guard_grpc else []

    def http_transport(self, handle, dataplane) -> tuple[object | None, object]:
        """(SSL context or None, the request handler: ``handle`` itself or behind the checks)."""
        from .http_guard import guard_rest
        from .tls import server_ssl_context

        context = server_ssl_context(self.http_tls, "HTTP") if self.http_tls else None
        return context, guard_rest(handle, self, dataplane) if self.guard_http else handle

    def metrics_transport(self) -> tuple[object | None, list]:
        """(SSL context or None, aiohttp middlewares) for the metrics port."""
        from .http_guard import guard_metrics
        from .tls import server_ssl_context

        context = server_ssl_context(self.metrics_tls, "metrics") if self.metrics_tls else None
        return context, [guard_metrics(self)] if self.metrics_need_key else []

    # -- decisions ------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """(allowed, tenant). Without keys everyone is allowed and anonymous."""
        if self.keys is None:
            return True, None
        tenant = self.keys.tenant(authorization)
        return tenant is not None, tenant

    def rejected(self, reason: str, tenant_label: str) -> None:
        if self.on_reject is not None:
            self.on_reject(reason, tenant_label)

    def model_limit(self, dataplane, model: str, version: str = "") -> int | None:
        """The model's ``inferd_max_inflight_requests`` parameter when it has one (it overrides
        --model-max-inflight); None for an unknown model: the data plane answers that one."""
        try:
            value = dataplane.model_parameter(model, version, MODEL_PARAMETER)
        except Exception:  # noqa: BLE001 - unknown/unready model: NOT_FOUND/UNAVAILABLE come later
            return None
        if value is None:
            return None
        try:
            limit = int(value)
            if limit < 0:
                raise ValueError
            return limit
        except ValueError:
            if model not in self._bad_parameter:
                self._bad_parameter.add(model)
                log.warning("model '%s': parameter %s must be a whole number >= 0, got '%s'; "
                            "using --model-max-inflight", model, MODEL_PARAMETER, value)
            return None

    def admit(self, caller: Caller, dataplane=None, model: str | None = None,
              version: str = "") -> Ticket | Rejection:
        limit = self.model_limit(dataplane, model, version) if model is not None else None
        if model is not None and limit is None and self.quotas.default_model_inflight <= 0:
            model = None
        decision = self.quotas.admit(caller.quota_key, caller.describe, model, limit)
        if isinstance(decision, Rejection):
            self.rejected(decision.reason, caller.label)
        return decision
