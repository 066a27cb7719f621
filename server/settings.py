"""Server settings: one object, flag names as Triton spells them so a Triton runtime's args work."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from server.telemetry import trace_config

MAX_MESSAGE = 2**31 - 1  # what Triton and tritonclient use


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{text}'")


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
    grpc_max_message_bytes: int = MAX_MESSAGE
    model_control_mode: str = "none"
    repository_poll_secs: float = 0.0
    load_models: list[str] = field(default_factory=list)
    strict_readiness: bool = False
    exit_timeout_secs: float = 30.0
    auto_complete_config: bool = True
    default_max_batch_size: int = 4
    model_name: str = ""
    repository_layout: str = "auto"  # auto | repository | single (server/repository/single.py)
    log_verbose: int = 0
    # --trace-config items, Triton's syntax (checked by telemetry/trace_config.py; OTEL_* add to them)
    trace_config: list[str] = field(default_factory=list)
    # frontend worker processes (server/workers, docs/workers.md); 0: one process serves everything
    frontend_workers: int = 0
    frontend_worker_shm_mb: int = 64
    frontend_worker_engine_timeout_secs: float = 5.0
    frontend_worker_max_inflight: int = 8192


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferd", description="KServe v2 / Triton-compatible model server")
    p.add_argument("--model-repository", "--model-store", dest="model_repositories", action="append",
                   type=Path, metavar="DIR", help="model repository folder (repeatable)")
    p.add_argument("--host", "--grpc-address", dest="host", default="0.0.0.0",
                   help="address to listen on (default 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--allow-grpc", type=_bool, default=True)
    p.add_argument("--allow-http", type=_bool, default=True)
    p.add_argument("--allow-metrics", type=_bool, default=True)
    p.add_argument("--grpc-max-message-bytes", type=int, default=MAX_MESSAGE,
                   help="max gRPC send/receive message size (default 2 GiB - 1)")
    p.add_argument("--model-control-mode", choices=["none", "poll", "explicit"], default="none")
    p.add_argument("--repository-poll-secs", type=float, default=0.0)
    p.add_argument("--load-model", dest="load_models", action="append", default=[], metavar="NAME",
                   help="with explicit control: load this model at start ('*' for all); repeatable")
    p.add_argument("--strict-readiness", type=_bool, default=False,
                   help="server ready only when every model in the repository is ready")
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
        model_control_mode=args.model_control_mode,
        repository_poll_secs=args.repository_poll_secs,
        load_models=args.load_models,
        strict_readiness=args.strict_readiness,
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
    if "*" in settings.load_models and len(settings.load_models) > 1:
        p.error("--load-model=* must be the only --load-model")
    if settings.model_control_mode == "poll" and settings.repository_poll_secs <= 0:
        p.error("--model-control-mode=poll needs --repository-poll-secs > 0")
    return settings
