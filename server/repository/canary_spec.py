"""The canary settings of one model: parsed from config.pbtxt ``parameters`` and load parameters.

A model names a candidate version, the share of unpinned requests it gets, and the conditions that
pull it back (see docs/canary.md for every key). config.pbtxt spells the keys as below; the
repository load API takes the same settings as ``canary:<key>`` parameters (with or without the
``canary_`` prefix: ``canary:share`` and ``canary:canary_share`` are the same) plus the actions
``canary:start``, ``canary:promote``, ``canary:rollback`` and ``canary:end``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from server.core.errors import ErrorCode, ServingError

LOAD_PREFIX = "canary:"
ACTIONS = ("start", "promote", "rollback", "end")


@dataclass(frozen=True, slots=True)
class CanarySpec:
    candidate: int
    share: float = 0.0  # fraction of unpinned requests, 0..1
    stable: int | None = None  # None: the version unpinned traffic used before the canary
    error_rate: float | None = 0.05  # roll back above this fraction of failed candidate requests
    p99_ms: float | None = None  # roll back when the candidate's p99 latency exceeds this
    p99_ratio: float | None = None  # roll back when candidate p99 > ratio x the stable version's p99
    window_s: float = 60.0  # the sliding window the conditions look at
    min_requests: int = 100  # a condition is judged only once the window holds this many requests
    promote_after_requests: int | None = None  # promote after this many candidate successes, no trip
    promote_after_s: float | None = None  # promote after this long running without a trip
    keep_previous_s: float = 600.0  # after a promotion, the previous default stays loaded this long
    custom_check: bool = False  # also ask the candidate's model.py (canary_check), about once a second


def _version(key: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"'{key}' must be a version number, got '{text}'")
    return int(text)


def _share(key: str, text: str) -> float:
    percent = text.endswith("%")
    value = _number(key, text[:-1] if percent else text)
    value = value / 100 if percent else value
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"'{key}' must be a fraction between 0 and 1 (or a percentage like '10%'), got '{text}'")
    return value


def _number(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"'{key}' must be a number, got '{text}'") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"'{key}' must be a finite non-negative number, got '{text}'")
    return value


def _positive(key: str, text: str) -> float:
    value = _number(key, text)
    if value <= 0:
        raise ValueError(f"'{key}' must be greater than 0, got '{text}'")
    return value


def _count(key: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"'{key}' must be a positive integer, got '{text}'")
    return int(text)


def _bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0"):
        raise ValueError(f"'{key}' must be true or false, got '{text}'")
    return lowered in ("true", "1")


def _optional(parse: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
    # "" or "off" switches a condition off (e.g. the default error-rate check)
    return lambda key, text: None if text.strip().lower() in ("", "off", "none") else parse(key, text)


def _rate(key: str, text: str) -> float:
    return _share(key, text)


# config.pbtxt key -> (CanarySpec field, parser)
KEYS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "canary_version": ("candidate", _version),
    "canary_share": ("share", _share),
    "canary_stable_version": ("stable", _optional(_version)),
    "rollback_error_rate": ("error_rate", _optional(_rate)),
    "rollback_p99_ms": ("p99_ms", _optional(_positive)),
    "rollback_p99_ratio": ("p99_ratio", _optional(_positive)),
    "rollback_window_s": ("window_s", _positive),
    "rollback_min_requests": ("min_requests", _count),
    "promote_after_requests": ("promote_after_requests", _optional(_count)),
    "promote_after_s": ("promote_after_s", _optional(_positive)),
    "keep_previous_s": ("keep_previous_s", _number),
    "canary_custom_check": ("custom_check", _bool),
}


def parse(settings: Mapping[str, str], model: str, code: ErrorCode = ErrorCode.FAILED_PRECONDITION
          ) -> CanarySpec | None:
    """The spec the settings describe (config keys, string values); None when they name no canary."""
    ours = {k: v for k, v in settings.items() if k in KEYS}
    if "canary_version" not in ours:
        extra = sorted(ours)
        if extra:
            raise ServingError(code, f"model '{model}': canary settings {extra} need 'canary_version' "
                               "(the candidate version) too")
        return None
    fields: dict[str, Any] = {}
    try:
        for key, text in ours.items():
            field, parse_value = KEYS[key]
            fields[field] = parse_value(key, str(text).strip())
    except ValueError as exc:
        raise ServingError(code, f"model '{model}': canary setting {exc}") from None
    spec = CanarySpec(**fields)
    if spec.stable is not None and spec.stable == spec.candidate:
        raise ServingError(code, f"model '{model}': 'canary_stable_version' must differ from 'canary_version' "
                           f"({spec.candidate})")
    return spec


def config_settings(parameters: Mapping[str, Any]) -> dict[str, str]:
    """The canary keys of a model configuration's ``parameters`` (protobuf map or plain dict)."""
    out = {}
    for key, value in parameters.items():
        if key in KEYS:
            out[key] = getattr(value, "string_value", value)
    return out


def load_settings(parameters: Mapping[str, Any], model: str) -> tuple[dict[str, str], set[str]]:
    """The ``canary:*`` load parameters as config keys with string values, and the actions asked."""
    settings: dict[str, str] = {}
    actions: set[str] = set()
    for key, value in parameters.items():
        name = key[len(LOAD_PREFIX):]
        if name in ACTIONS:
            if value not in (True, "true", "1", 1):
                raise ServingError(ErrorCode.INVALID_ARGUMENT,
                                   f"load parameter '{key}' must be true (it asks for the action '{name}')")
            actions.add(name)
            continue
        config_key = name if name in KEYS else f"canary_{name}"
        if config_key not in KEYS:
            known = ", ".join(sorted({k.removeprefix("canary_") for k in KEYS} | set(ACTIONS)))
            raise ServingError(ErrorCode.INVALID_ARGUMENT,
                               f"unrecognized load parameter '{key}' (canary settings: {known})")
        if isinstance(value, bytes) or isinstance(value, (dict, list)) or value is None:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"load parameter '{key}' must be a string or a number")
        settings[config_key] = str(value).lower() if isinstance(value, bool) else str(value)
    if len(actions) > 1 or (actions - {"start"} and settings):
        raise ServingError(ErrorCode.INVALID_ARGUMENT,
                           f"model '{model}': one canary action per load, and settings only with 'start' "
                           f"(got actions {sorted(actions)} and settings {sorted(settings)})")
    return settings, actions

