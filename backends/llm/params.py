"""Sampling parameters of one generation request: parsed from vLLM-style JSON and validated."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.core.errors import ErrorCode, ServingError

MAX_LOGPROBS = 20
# vLLM SamplingParams names accepted only at their neutral value (not implemented here)
_NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0}
# accepted and ignored: they change nothing the client can observe from this engine
_IGNORED = {"skip_special_tokens", "spaces_between_special_tokens", "detokenize", "lora_name"}


def _invalid(message: str) -> ServingError:
    return ServingError(ErrorCode.INVALID_ARGUMENT, message)


@dataclass(slots=True)
class SamplingParams:
    """vLLM's names and defaults: temperature 1.0 samples; 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    max_tokens: int | None = None  # None: the engine's default
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # the sampled token's log-probability plus this many top alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(f"sampling parameter '{key}' must be a finite number, got {value!r}")
    return float(value)


def _integer(key: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"sampling parameter '{key}' must be an integer, got {value!r}")
    return value


def parse(raw: Mapping[str, Any]) -> SamplingParams:
    """Validate a mapping (the decoded ``sampling_parameters`` JSON); INVALID_ARGUMENT names the key."""
    p = SamplingParams()
    for key, value in raw.items():
        if value is None:
            continue
        if key == "temperature":
            p.temperature = _number(key, value)
            if p.temperature < 0:
                raise _invalid(f"sampling parameter 'temperature' must be >= 0, got {value}")
        elif key == "top_p":
            p.top_p = _number(key, value)
            if not 0 < p.top_p <= 1:
                raise _invalid(f"sampling parameter 'top_p' must be in (0, 1], got {value}")
        elif key == "top_k":
            p.top_k = _integer(key, value)
            if p.top_k < -1:
                raise _invalid(f"sampling parameter 'top_k' must be -1 (off), 0 (off) or positive, got {value}")
            p.top_k = max(p.top_k, 0)
        elif key in ("max_tokens", "max_completion_tokens"):
            p.max_tokens = _integer(key, value)
            if p.max_tokens < 1:
                raise _invalid(f"sampling parameter '{key}' must be >= 1, got {value}")
        elif key == "seed":
            p.seed = _integer(key, value)
            if not 0 <= p.seed < 2**63:
                raise _invalid(f"sampling parameter 'seed' must be in [0, 2**63), got {value}")
        elif key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
                raise _invalid("sampling parameter 'stop' must be a non-empty string or a list of them")
            p.stop = list(stops)
        elif key == "stop_token_ids":
            if not isinstance(value, list):
                raise _invalid("sampling parameter 'stop_token_ids' must be a list of integers")
            p.stop_token_ids = [_integer(key, v) for v in value]
        elif key in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(value, bool):
                raise _invalid(f"sampling parameter '{key}' must be true or false, got {value!r}")
            setattr(p, key, value)
        elif key == "logprobs":
            if value is True:
                value = 0
            if value is False:
                continue
            p.logprobs = _integer(key, value)
            if not 0 <= p.logprobs <= MAX_LOGPROBS:
                raise _invalid(f"sampling parameter 'logprobs' must be in [0, {MAX_LOGPROBS}], got {value}")
        elif key in _NEUTRAL:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != _NEUTRAL[key]:
                raise _invalid(f"sampling parameter '{key}' is not supported by this backend "
                               f"(only its neutral value {_NEUTRAL[key]} is accepted), got {value!r}")
        elif key in _IGNORED:
            continue
        else:
            raise _invalid(f"unknown sampling parameter '{key}'")
    return p
