"""Triton's restricted APIs: protocol groups that need a ``key=value`` header, and which group each
gRPC method and REST path belongs to.

``--grpc-restricted-protocol`` / ``--http-restricted-api`` take ``<group>[,<group>...]:<key>=<value>``
(repeatable; a group in one rule only). A gRPC caller sends the metadata
``triton-grpc-protocol-<key>: <value>``, a REST caller the header ``<key>: <value>``; the value is
compared in constant time. Failures answer as Triton does: gRPC UNAVAILABLE "This protocol is
restricted, expecting header 'triton-grpc-protocol-<key>'", REST 403 "This API is restricted,
expecting header '<key>'".
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

GROUPS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
          "statistics", "trace", "logging")
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP token: a valid header name

_GRPC_METHODS = {
    "health": ("ServerLive", "ServerReady", "ModelReady"),
    "metadata": ("ServerMetadata", "ModelMetadata"),
    "inference": ("ModelInfer", "ModelStreamInfer"),
    "model-config": ("ModelConfig",),
    "statistics": ("ModelStatistics",),
    "trace": ("TraceSetting",),
    "logging": ("LogSettings",),
    "shared-memory": ("SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
                      "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
                      "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister"),
    "model-repository": ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"),
}
GRPC_CATEGORY = {f"/inference.GRPCInferenceService/{m}": group
                 for group, methods in _GRPC_METHODS.items() for m in methods}
GRPC_CATEGORY["/grpc.health.v1.Health/Check"] = "health"
GRPC_CATEGORY["/grpc.health.v1.Health/Watch"] = "health"

_SEG = r"[^/]+"
_MODEL = rf"/v2/models/(?P<model>{_SEG})(?:/versions/{_SEG})?"
# first match wins: /v2/models/stats before the model pattern, as the router orders them
_HTTP_PATHS = [
    (re.compile(p + "$"), group) for p, group in (
        (r"/v2/health/(?:live|ready)", "health"),
        (r"/v2/models/stats", "statistics"),
        (_MODEL + r"/ready", "health"),
        (_MODEL + r"/(?:infer|generate|generate_stream)", "inference"),
        (_MODEL + r"/config", "model-config"),
        (_MODEL + r"/stats", "statistics"),
        (rf"/v2/models/{_SEG}/trace/setting", "trace"),
        (r"/v2/trace/setting", "trace"),
        (r"/v2/logging", "logging"),
        (r"/v2/(?:system|cuda)sharedmemory(?:/.*)?", "shared-memory"),
        (r"/v2/repository(?:/.*)?", "model-repository"),
        (r"(?:/v2/?|/v2/models/?|" + _MODEL + ")", "metadata"),
        (r"/v1/.*", "inference"),  # OpenAI-compatible routes, as Triton's OpenAI frontend groups them
    )
]


def http_category(path: str) -> tuple[str | None, str | None]:
    """(group, model name as sent, still percent-encoded) for a raw request path; (None, None) for a
    path no endpoint serves (the router answers 404 for it)."""
    for pattern, group in _HTTP_PATHS:
        found = pattern.match(path)
        if found is not None:
            return group, found.groupdict().get("model") if group == "inference" else None
    return None, None


@dataclass(frozen=True)
class Rule:
    groups: frozenset[str]
    header: str  # lower case
    value: bytes


def parse_rules(items: list[str], flag: str) -> list[Rule]:
    """The rules of one flag; ValueError with Triton's wording for unknown or repeated groups."""
    kind = "protocol" if flag.startswith("--grpc") else "api"
    rules: list[Rule] = []
    taken: set[str] = set()
    for item in items:
        groups_text, sep, header = item.partition(":")
        key, eq, value = header.partition("=")
        if not sep or not eq or not groups_text or not key or not value:
            raise ValueError(f"{flag} expects <group>[,<group>...]:<key>=<value>, got '{groups_text}:...'")
        if not _HEADER.fullmatch(key):
            raise ValueError(f"{flag}: '{key}' is not a valid header name")
        groups = [g.strip() for g in groups_text.split(",")]
        for group in groups:
            if group not in GROUPS:
                raise ValueError(f"unknown restricted {kind} '{group}' (groups: {', '.join(GROUPS)})")
            if group in taken:
                raise ValueError(
                    f"restricted {kind} '{group}' can not be specified in multiple config groups")
            taken.add(group)
        rules.append(Rule(frozenset(groups), key.lower(), value.encode()))
    return rules


class Restrictions:
    """group -> the header and value it needs; ``denied(group, get)`` is the header a request lacks."""

    def __init__(self, rules: list[Rule], header_prefix: str = "") -> None:
        self.prefix = header_prefix
        self._by_group = {g: (header_prefix + r.header, r.value) for r in rules for g in r.groups}

    def __bool__(self) -> bool:
        return bool(self._by_group)

    def groups(self) -> list[str]:
        return sorted(self._by_group)

    def denied(self, group: str | None, header_value) -> str | None:
        """The expected header name when the request may not use ``group``, else None.
        ``header_value(name)`` returns the request's value for a lower-case header name."""
        need = self._by_group.get(group) if group else None
        if need is None:
            return None
        header, value = need
        sent = header_value(header)
        if sent is None or not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), value):
            return header
        return None
