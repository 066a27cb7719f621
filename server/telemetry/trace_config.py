"""Trace configuration: Triton-style ``--trace-config`` items and the standard ``OTEL_*`` variables,
read once at start-up into a TraceConfig, and the OpenTelemetry SDK pipeline built from it.

The SDK is imported only when a pipeline is built, so a server with tracing off never loads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlparse

LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
# Triton traces every 1000th request by default; enabled through OTEL_* alone every request is a
# candidate and OTEL_TRACES_SAMPLER decides, as in any OpenTelemetry SDK
TRITON_DEFAULT_RATE = 1000
_EXPORTERS = ("otlp", "console", "none")
_PROTOCOLS = ("grpc", "http/protobuf")
_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
             "parentbased_always_off", "parentbased_traceidratio")
_BSP = ("bsp_max_queue_size", "bsp_schedule_delay", "bsp_max_export_batch_size")


@dataclass
class TraceConfig:
    level: list[str] = field(default_factory=lambda: ["OFF"])
    rate: int = 1
    count: int = -1
    exporters: list[str] = field(default_factory=lambda: ["otlp"])
    url: str = ""  # --trace-config opentelemetry,url (else the exporter reads OTEL_EXPORTER_OTLP_*)
    protocol: str = "grpc"
    resource: dict[str, str] = field(default_factory=dict)
    bsp: dict[str, int] = field(default_factory=dict)
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.level != ["OFF"]


def _int(key: str, text: str, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"--trace-config {key} must be an integer, got '{text}'") from None
    if value < minimum:
        raise ValueError(f"--trace-config {key} must be >= {minimum}, got {value}")
    return value


def check_level(values: list[str]) -> list[str]:
    """Validate a trace level list (TraceSetting and --trace-config share the rules)."""
    levels = [v.strip().upper() for v in values]
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"unknown trace level '{level}' (use OFF, TIMESTAMPS or TENSORS)")
    if "TENSORS" in levels:
        raise ValueError("trace level TENSORS is not supported in opentelemetry trace mode (use TIMESTAMPS)")
    if "OFF" in levels and len(set(levels)) > 1:
        raise ValueError("trace level OFF cannot be combined with other levels")
    return sorted(set(levels)) or ["OFF"]


def parse(items: list[str], env: Mapping[str, str] | None = None) -> TraceConfig:
    """``--trace-config`` items (``KEY=VALUE`` or ``opentelemetry,KEY=VALUE``) over the OTEL_* variables.

    Raises ValueError naming the bad item."""
    env = os.environ if env is None else env
    config = TraceConfig()
    exporter_env = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter_env:
        config.exporters = [e.strip() for e in exporter_env.split(",") if e.strip()]
        for name in config.exporters:
            if name not in _EXPORTERS:
                raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter '{name}' "
                                 "(use otlp, console or none)")
        if config.exporters != ["none"]:
            config.level = ["TIMESTAMPS"]  # asking for an exporter turns tracing on
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler:
        if sampler not in _SAMPLERS:
            raise ValueError(f"OTEL_TRACES_SAMPLER: unknown sampler '{sampler}' "
                             f"(use one of {', '.join(_SAMPLERS)})")
        config.sampler = sampler
    if "traceidratio" in config.sampler and env.get("OTEL_TRACES_SAMPLER_ARG", "").strip():
        text = env["OTEL_TRACES_SAMPLER_ARG"]
        try:
            config.sampler_arg = float(text)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a number in [0, 1], got '{text}'") from None
        if not 0.0 <= config.sampler_arg <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be in [0, 1], got {config.sampler_arg}")

    levels: list[str] = []
    rate_given = False
    for item in items:
        mode, _, setting = item.rpartition(",")
        key, eq, value = setting.partition("=")
        key, value = key.strip().lower().replace("-", "_"), value.strip()
        if not eq or not key:
            raise ValueError(f"--trace-config '{item}': expected [MODE,]SETTING=VALUE")
        if mode == "":
            if key == "level":
                levels.append(value)
            elif key == "rate":
                config.rate, rate_given = _int(key, value, 0), True
            elif key == "count":
                config.count = _int(key, value, -1)
            elif key == "mode":
                if value.lower() != "opentelemetry":
                    raise ValueError(f"--trace-config mode={value}: only mode=opentelemetry is supported "
                                     "(spans are exported over OTLP; Triton's JSON trace files are not)")
            else:
                raise ValueError(f"--trace-config '{item}': unknown setting '{key}' "
                                 "(global settings: level, rate, count, mode)")
        elif mode == "opentelemetry":
            if key == "url":
                config.url = value
            elif key == "protocol":
                protocol = value
            elif key == "resource":
                name, eq2, attr = value.partition("=")
                if not eq2 or not name:
                    raise ValueError(f"--trace-config '{item}': resource must be KEY=VALUE")
                config.resource[name.strip()] = attr.strip()
            elif key in _BSP:
                config.bsp[key] = _int(f"opentelemetry,{key}", value, 1)
            else:
                raise ValueError(f"--trace-config '{item}': unknown opentelemetry setting '{key}' "
                                 f"(url, protocol, resource, {', '.join(_BSP)})")
        elif mode == "triton":
            raise ValueError(f"--trace-config '{item}': the triton trace mode (JSON trace files) is not "
                             "supported; use mode=opentelemetry and an OTLP endpoint")
        else:
            raise ValueError(f"--trace-config '{item}': unknown trace mode '{mode}' (use opentelemetry)")
    if levels:
        config.level = check_level(levels)
        if not rate_given:
            config.rate = TRITON_DEFAULT_RATE
    if config.url and not exporter_env:
        config.exporters = ["otlp"]
    if protocol:
        protocol = protocol.strip().lower()
        if protocol not in _PROTOCOLS:
            raise ValueError(f"unsupported OTLP protocol '{protocol}' (use grpc or http/protobuf)")
        config.protocol = protocol
    elif config.url:  # Triton's url is OTLP/HTTP (http://host:4318/v1/traces)
        parsed = urlparse(config.url if "://" in config.url else "http://" + config.url)
        if parsed.path.rstrip("/").endswith("/v1/traces") or parsed.port == 4318:
            config.protocol = "http/protobuf"
    if config.enabled and config.exporters == ["none"]:
        raise ValueError("tracing is on (--trace-config level) but OTEL_TRACES_EXPORTER=none: "
                         "name an exporter (otlp or console)")
    return config


# ---------------------------------------------------------------- the SDK pipeline


def _exporter(name: str, config: TraceConfig):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=None)
    url = config.url
    if url and "://" not in url:
        url = "http://" + url  # Triton's url is host:port; plain text unless https is named
    if config.protocol == "grpc":
        from .trace_export import FastOTLPSpanExporter

        return FastOTLPSpanExporter(endpoint=url or None)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    except ImportError:
        raise ValueError("OTLP over HTTP needs the opentelemetry-exporter-otlp-proto-http package; install "
                         "it or use OTEL_EXPORTER_OTLP_PROTOCOL=grpc") from None
    return HttpExporter(endpoint=url or None)


def _sampler(config: TraceConfig):
    from opentelemetry.sdk.trace import sampling

    fixed = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
             "parentbased_always_on": sampling.DEFAULT_ON, "parentbased_always_off": sampling.DEFAULT_OFF}
    if config.sampler in fixed:
        return fixed[config.sampler]
    if config.sampler == "traceidratio":
        return sampling.TraceIdRatioBased(config.sampler_arg)
    return sampling.ParentBasedTraceIdRatio(config.sampler_arg)


def build_provider(config: TraceConfig, version: str,
                   env: Mapping[str, str] | None = None) -> tuple[Any, list]:
    """A TracerProvider (not installed globally) with one BatchSpanProcessor per exporter, and those."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    env = os.environ if env is None else env
    attributes = {"service.version": version}
    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not named:
        attributes["service.name"] = "inferd"
    attributes.update(config.resource)
    provider = TracerProvider(resource=Resource.create(attributes), sampler=_sampler(config))
    bsp = {"max_queue_size": config.bsp.get("bsp_max_queue_size"),
           "schedule_delay_millis": config.bsp.get("bsp_schedule_delay"),
           "max_export_batch_size": config.bsp.get("bsp_max_export_batch_size")}
    processors = [BatchSpanProcessor(_exporter(name, config), **bsp)
                  for name in config.exporters if name != "none"]
    for processor in processors:
        provider.add_span_processor(processor)
    return provider, processors
