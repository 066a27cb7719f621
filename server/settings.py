"""Server settings: one object, flag names as Triton spells them so a Triton runtime's args work."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from server.core import loops
from server.limits import GrpcLimits, HttpLimits
from server.telemetry import trace_config

MAX_MESSAGE = 2**31 - 1  # what Triton and tritonclient use
_HTTP = HttpLimits()
_GRPC = GrpcLimits()


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{text}'")


def _positive(kind):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return convert


@dataclass
class Settings:
    model_repositories: list[Path] = field(default_factory=list)
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    allow_grpc: bool = True
    allow_http: bool = True
    allow_metrics: bool = True
    grpc_max_message_bytes: int = _GRPC.max_receive_bytes
    grpc_max_concurrent_streams: int = _GRPC.max_concurrent_streams
    grpc_keepalive_time_ms: int = _GRPC.keepalive_time_ms
    grpc_keepalive_timeout_ms: int = _GRPC.keepalive_timeout_ms
    grpc_max_connection_idle_ms: int = _GRPC.max_connection_idle_ms
    http_max_input_size: int = _HTTP.max_input_size
    http_header_timeout_secs: float = _HTTP.header_timeout
    http_keepalive_timeout_secs: float = _HTTP.keepalive_timeout
    http_read_timeout_secs: float = _HTTP.read_timeout
    http_max_connections: int = _HTTP.max_connections
    model_control_mode: str = "none"
    repository_poll_secs: float = 0.0
    load_models: list[str] = field(default_factory=list)
    strict_readiness: bool = False
    allow_client_shm: bool = False  # Triton's default: clients may not register shared memory
    exit_timeout_secs: float = 30.0
    auto_complete_config: bool = True
    default_max_batch_size: int = 4
    model_name: str = ""
    repository_layout: str = "auto"  # auto | repository | single (server/repository/single.py)
    log_verbose: int = 0
    # --trace-config items, Triton's syntax (checked by telemetry/trace_config.py; OTEL_* add to them)
    trace_config: list[str] = field(default_factory=list)
    # -- security (server/security/, docs/security.md): TLS, API keys, restricted APIs, quotas --------
    grpc_use_ssl: bool = False
    grpc_use_ssl_mutual: bool = False
    grpc_server_cert: str = ""
    grpc_server_key: str = ""
    grpc_root_cert: str = ""
    http_use_ssl: bool = False
    http_use_ssl_mutual: bool = False
    http_server_cert: str = ""
    http_server_key: str = ""
    http_root_cert: str = ""
    metrics_use_ssl: bool = False
    metrics_use_ssl_mutual: bool = False
    metrics_server_cert: str = ""
    metrics_server_key: str = ""
    metrics_root_cert: str = ""
    grpc_restricted_protocol: list[str] = field(default_factory=list)
    http_restricted_api: list[str] = field(default_factory=list)
    api_key_file: str = ""
    metrics_require_api_key: bool = False
    tenant_request_rate: float = 0.0
    tenant_request_burst: float = 0.0
    tenant_max_concurrent: int = 0
    model_max_inflight: int = 0

    event_loop: str = "auto"  # server/core/loops.py: uvloop when installed
    # frontend worker processes (server/workers, docs/workers.md); 0: one process serves everything
    frontend_workers: int = 0
    frontend_worker_shm_mb: int = 64
    frontend_worker_engine_timeout_secs: float = 5.0
    frontend_worker_max_inflight: int = 8192

    def http_limits(self) -> HttpLimits:
        return HttpLimits(self.http_max_input_size, self.http_header_timeout_secs,
                          self.http_keepalive_timeout_secs, self.http_read_timeout_secs, self.http_max_connections)

    def grpc_limits(self) -> GrpcLimits:
        return GrpcLimits(self.grpc_max_message_bytes, MAX_MESSAGE, self.grpc_max_concurrent_streams,
                          self.grpc_keepalive_time_ms, self.grpc_keepalive_timeout_ms,
                          self.grpc_max_connection_idle_ms)


SECURITY_FIELDS = [f for f in Settings.__dataclass_fields__ if f.startswith(
    ("grpc_use", "grpc_server", "grpc_root", "grpc_restricted", "http_use", "http_server", "http_root",
     "http_restricted", "metrics_use", "metrics_server", "metrics_root", "metrics_require", "api_key",
     "tenant_", "model_max_inflight"))]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferd", description="KServe v2 / Triton-compatible model server")
    p.add_argument("--model-repository", "--model-store", dest="model_repositories", action="append",
                   type=Path, metavar="DIR", help="model repository folder (repeatable)")
    p.add_argument("--host", "--grpc-address", dest="host", default="0.0.0.0",
                   help="address all three ports bind (default 0.0.0.0: every interface, as a container "
                        "needs; docs/security.md says what each port exposes)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--allow-grpc", type=_bool, default=True)
    p.add_argument("--allow-http", type=_bool, default=True)
    p.add_argument("--allow-metrics", type=_bool, default=True)
    # limits (docs/limits.md); Triton's names where Triton has the setting
    p.add_argument("--grpc-max-message-bytes", type=_positive(int), default=_GRPC.max_receive_bytes,
                   help="largest gRPC request message in bytes (default 256 MiB); over it: RESOURCE_EXHAUSTED")
    p.add_argument("--grpc-max-concurrent-streams", type=_positive(int), default=_GRPC.max_concurrent_streams,
                   help="concurrent calls per gRPC connection (default 128)")
    p.add_argument("--grpc-keepalive-time", dest="grpc_keepalive_time_ms", type=_positive(int),
                   default=_GRPC.keepalive_time_ms, help="ms between keepalive pings on a gRPC connection "
                   "with calls open (default 60000)")
    p.add_argument("--grpc-keepalive-timeout", dest="grpc_keepalive_timeout_ms", type=_positive(int),
                   default=_GRPC.keepalive_timeout_ms, help="ms to wait for a ping's answer before closing the "
                   "connection (default 20000)")
    p.add_argument("--grpc-max-connection-idle", dest="grpc_max_connection_idle_ms", type=_positive(int),
                   default=_GRPC.max_connection_idle_ms, help="ms a gRPC connection may go without a call "
                   "(default 300000)")
    p.add_argument("--http-max-input-size", type=_positive(int), default=_HTTP.max_input_size,
                   help="largest REST request body in bytes, also after decompression (default 64 MiB)")
    p.add_argument("--http-header-timeout-secs", type=_positive(float), default=_HTTP.header_timeout,
                   help="seconds for a request's headers to arrive (default 10)")
    p.add_argument("--http-keepalive-timeout-secs", type=_positive(float), default=_HTTP.keepalive_timeout,
                   help="seconds an idle REST connection stays open (default 30)")
    p.add_argument("--http-read-timeout-secs", type=_positive(float), default=_HTTP.read_timeout,
                   help="seconds a request body may pause between reads (default 30)")
    p.add_argument("--http-max-connections", type=_positive(int), default=_HTTP.max_connections,
                   help="open REST connections at most; more are answered 503 and closed (default 1000)")
    p.add_argument("--model-control-mode", choices=["none", "poll", "explicit"], default="none")
    p.add_argument("--repository-poll-secs", type=float, default=0.0)
    p.add_argument("--load-model", dest="load_models", action="append", default=[], metavar="NAME",
                   help="with explicit control: load this model at start ('*' for all); repeatable")
    p.add_argument("--strict-readiness", type=_bool, default=False,
                   help="server ready only when every model in the repository is ready")
    p.add_argument("--allow-client-shm", type=_bool, default=False,
                   help="let clients register and use system shared-memory regions (Triton's flag; default false)")
    p.add_argument("--exit-timeout-secs", type=float, default=30.0)
    p.add_argument("--disable-auto-complete-config", dest="auto_complete_config", action="store_false")
    p.add_argument("--backend-config", action="append", default=[], metavar="[BACKEND,]KEY=VALUE",
                   help="e.g. default-max-batch-size=8")
    p.add_argument("--model-name", default=os.environ.get("MODEL_NAME", ""),
                   help="name to serve a single-model folder under")
    p.add_argument("--repository-layout", choices=["auto", "repository", "single"], default="auto",
                   help="how a --model-repository folder is read: auto (a repository when any subfolder "
                        "holds a config.pbtxt or version folders, else a single model: a model file or "
                        "version folders at its root), or force repository / single")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--trace-config", action="append", default=[], metavar="[opentelemetry,]SETTING=VALUE",
                   help="tracing, as Triton spells it (repeatable): level=TIMESTAMPS|OFF, "
                        "rate=N (1 in N), count=N, mode=opentelemetry, opentelemetry,url=HOST:PORT, "
                        "opentelemetry,resource=K=V, opentelemetry,bsp_schedule_delay=MS ...; "
                        "the OTEL_* environment variables apply too (docs/tracing.md)")
    p.add_argument("--event-loop", choices=loops.CHOICES, default="auto",
                   help="the event loop: auto (default: uvloop when installed, else asyncio's), uvloop, asyncio")
    p.add_argument("--frontend-workers", default="auto", metavar="N|auto",
                   help="processes that accept and decode gRPC/REST traffic on the same ports while this "
                        "process runs the models (docs/workers.md); 0: one process; auto (default): 0 below "
                        f"{WORKERS_MIN_CORES} usable cores, else usable cores - {WORKERS_ENGINE_CORES}")
    p.add_argument("--frontend-worker-shm-mb", type=int, default=64,
                   help="shared memory per worker and direction for tensors (MiB; larger ones go inline)")
    p.add_argument("--frontend-worker-engine-timeout-secs", type=float, default=5.0,
                   help="a worker answers UNAVAILABLE when the engine has not answered for this long")
    p.add_argument("--frontend-worker-max-inflight", type=int, default=8192,
                   help="requests in flight per worker before it answers UNAVAILABLE (engine full)")
    _security_flags(p)
    return p


WORKERS_MIN_CORES = 4  # below this, worker processes only compete with the engine for the same cores
WORKERS_ENGINE_CORES = 2  # the engine's event loop, and at least one core for model compute threads


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def frontend_workers(value: str, cores: int | None = None) -> int:
    """'N' as given; 'auto': 0 below 4 usable cores, else usable cores minus the engine's two."""
    cores = usable_cores() if cores is None else cores
    if value.strip().lower() == "auto":
        return 0 if cores < WORKERS_MIN_CORES else cores - WORKERS_ENGINE_CORES
    count = int(value)
    if count < 0:
        raise ValueError(value)
    return count


def _security_flags(p: argparse.ArgumentParser) -> None:
    """TLS per port (Triton's gRPC names; REST and metrics mirror them), keys, restrictions, quotas."""
    g = p.add_argument_group("security (docs/security.md)")
    for port in ("grpc", "http", "metrics"):
        note = " (defaults to the --http-* file)" if port == "metrics" else ""
        g.add_argument(f"--{port}-use-ssl", type=_bool, nargs="?", const=True, default=False,
                       help=f"serve {port} over TLS")
        g.add_argument(f"--{port}-use-ssl-mutual", type=_bool, nargs="?", const=True, default=False,
                       help=f"{port} mutual TLS: clients must present a certificate signed by the root "
                            "certificate (implies TLS)")
        g.add_argument(f"--{port}-server-cert", default="", metavar="PEM", help=f"certificate chain{note}")
        g.add_argument(f"--{port}-server-key", default="", metavar="PEM", help=f"private key{note}")
        g.add_argument(f"--{port}-root-cert", default="", metavar="PEM",
                       help=f"CA that verifies client certificates{note}")
    g.add_argument("--grpc-restricted-protocol", action="append", default=[],
                   metavar="<groups>:<key>=<value>",
                   help="Triton's: these protocol groups need metadata triton-grpc-protocol-<key>: <value>")
    g.add_argument("--http-restricted-api", action="append", default=[], metavar="<groups>:<key>=<value>",
                   help="Triton's: these API groups need the header <key>: <value>")
    g.add_argument("--api-key-file", default="", metavar="FILE",
                   help="lines 'tenant:key'; then every non-health call needs Authorization: Bearer <key> "
                        "(also read from $INFERD_API_KEYS)")
    g.add_argument("--metrics-require-api-key", type=_bool, nargs="?", const=True, default=False,
                   help="the metrics port needs a listed API key too")
    g.add_argument("--tenant-request-rate", type=float, default=0.0, metavar="PER_SECOND",
                   help="requests per second per tenant (per client address without keys); 0: no limit")
    g.add_argument("--tenant-request-burst", type=float, default=0.0, metavar="N",
                   help="token-bucket size for --tenant-request-rate (default: max(1, rate))")
    g.add_argument("--tenant-max-concurrent", type=int, default=0, metavar="N",
                   help="requests in flight per tenant (per client address without keys); 0: no limit")
    g.add_argument("--model-max-inflight", type=int, default=0, metavar="N",
                   help="inference requests queued or running per model; a model's config parameter "
                        "inferd_max_inflight_requests overrides it; 0: no limit")


def _check_security(p: argparse.ArgumentParser, settings: Settings) -> None:
    for port in ("metrics",):  # the metrics port shares the REST certificate unless given its own
        for name in ("server_cert", "server_key", "root_cert"):
            if not getattr(settings, f"{port}_{name}"):
                setattr(settings, f"{port}_{name}", getattr(settings, f"http_{name}"))
    for name in ("tenant_request_rate", "tenant_request_burst", "tenant_max_concurrent",
                 "model_max_inflight"):
        if getattr(settings, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    from server.security.access import parse_rules  # the syntax errors at start, with Triton's words

    try:
        parse_rules(settings.grpc_restricted_protocol, "--grpc-restricted-protocol")
        parse_rules(settings.http_restricted_api, "--http-restricted-api")
    except ValueError as exc:
        p.error(str(exc))


def from_args(argv: list[str] | None = None) -> Settings:
    p = parser()
    args = p.parse_args(argv)
    if not args.model_repositories:
        p.error("--model-repository is required")
    settings = Settings(
        model_repositories=args.model_repositories,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        allow_grpc=args.allow_grpc,
        allow_http=args.allow_http,
        allow_metrics=args.allow_metrics,
        grpc_max_message_bytes=args.grpc_max_message_bytes,
        grpc_max_concurrent_streams=args.grpc_max_concurrent_streams,
        grpc_keepalive_time_ms=args.grpc_keepalive_time_ms,
        grpc_keepalive_timeout_ms=args.grpc_keepalive_timeout_ms,
        grpc_max_connection_idle_ms=args.grpc_max_connection_idle_ms,
        http_max_input_size=args.http_max_input_size,
        http_header_timeout_secs=args.http_header_timeout_secs,
        http_keepalive_timeout_secs=args.http_keepalive_timeout_secs,
        http_read_timeout_secs=args.http_read_timeout_secs,
        http_max_connections=args.http_max_connections,
        model_control_mode=args.model_control_mode,
        event_loop=args.event_loop,
        repository_poll_secs=args.repository_poll_secs,
        load_models=args.load_models,
        strict_readiness=args.strict_readiness,
        allow_client_shm=args.allow_client_shm,
        exit_timeout_secs=args.exit_timeout_secs,
        auto_complete_config=args.auto_complete_config,
        model_name=args.model_name,
        repository_layout=args.repository_layout,
        log_verbose=args.log_verbose,
        trace_config=args.trace_config,
    )
    try:
        settings.frontend_workers = frontend_workers(args.frontend_workers)
    except ValueError:
        p.error(f"--frontend-workers must be a number >= 0 or 'auto', got '{args.frontend_workers}'")
    settings.frontend_worker_shm_mb = args.frontend_worker_shm_mb
    settings.frontend_worker_engine_timeout_secs = args.frontend_worker_engine_timeout_secs
    settings.frontend_worker_max_inflight = args.frontend_worker_max_inflight
    ports = [port for port, on in ((settings.grpc_port, settings.allow_grpc),
                                   (settings.http_port, settings.allow_http)) if on]
    if 0 in ports and args.frontend_workers.strip().lower() == "auto":
        settings.frontend_workers = 0  # a port 0 is one process's own: 'auto' then means no workers
    if settings.frontend_workers:  # the workers all bind the same ports: a port 0 would give each its own
        if 0 in ports or settings.frontend_worker_shm_mb < 1:
            p.error("--frontend-workers needs fixed --grpc-port/--http-port (not 0) and "
                    "--frontend-worker-shm-mb >= 1")
    try:  # a bad item stops the start with its name, not a traceback later
        trace_config.parse(settings.trace_config)
    except ValueError as exc:
        p.error(str(exc))
    for item in args.backend_config:
        key, _, value = item.rpartition(",")[2].partition("=")
        if key == "default-max-batch-size":
            settings.default_max_batch_size = int(value)
        else:
            p.error(f"unknown --backend-config key '{key}'")
    for name in SECURITY_FIELDS:
        setattr(settings, name, getattr(args, name))
    _check_security(p, settings)
    if "*" in settings.load_models and len(settings.load_models) > 1:
        p.error("--load-model=* must be the only --load-model")
    if settings.model_control_mode == "poll" and settings.repository_poll_secs <= 0:
        p.error("--model-control-mode=poll needs --repository-poll-secs > 0")
    return settings
