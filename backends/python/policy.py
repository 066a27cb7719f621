"""Where a Python model runs and how its process is watched: config.pbtxt ``parameters`` (see
docs/python_models.md), with the server-wide default isolation from the environment."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

from . import loading

ISOLATION = "INFERD_PYTHON_ISOLATION"  # "process" (default) or "in_process"; also an environment variable
EXECUTE_TIMEOUT = "INFERD_PYTHON_EXECUTE_TIMEOUT"  # seconds one execute may take; 0: no limit
LOAD_TIMEOUT = "INFERD_PYTHON_LOAD_TIMEOUT"  # seconds importing model.py + initialize may take; 0: no limit
MAX_DEATHS = "INFERD_PYTHON_MAX_DEATHS"  # deaths within the window that stop restarts
DEATH_WINDOW = "INFERD_PYTHON_DEATH_WINDOW"  # seconds
MODES = ("process", "in_process")


@dataclass(frozen=True)
class Policy:
    execute_timeout: float | None = None
    load_timeout: float | None = None
    max_deaths: int = 5
    death_window: float = 60.0

    def backoff(self, recent_deaths: int) -> float:
        """Seconds to wait before restarting after the ``recent_deaths``-th death in the window."""
        return min(10.0, 0.25 * 2 ** max(0, recent_deaths - 1))


def isolation(model: str, parameters: Mapping[str, str]) -> str:
    value = (parameters.get(ISOLATION) or os.environ.get(ISOLATION) or "process").strip().lower()
    if value not in MODES:
        raise loading.precondition(model, f"parameter {ISOLATION} must be 'process' or 'in_process', got {value!r}")
    return value


def _seconds(model: str, parameters: Mapping[str, str], key: str, default: float | None) -> float | None:
    raw = parameters.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise loading.precondition(model, f"parameter {key} must be a number of seconds >= 0, got {raw!r}")
    return value or None


def policy(model: str, parameters: Mapping[str, str]) -> Policy:
    base = Policy()
    deaths = parameters.get(MAX_DEATHS, "").strip()
    if deaths and not (deaths.isdigit() and int(deaths) >= 1):
        raise loading.precondition(model, f"parameter {MAX_DEATHS} must be an integer >= 1, got {deaths!r}")
    window = _seconds(model, parameters, DEATH_WINDOW, base.death_window)
    return Policy(execute_timeout=_seconds(model, parameters, EXECUTE_TIMEOUT, None),
                  load_timeout=_seconds(model, parameters, LOAD_TIMEOUT, None),
                  max_deaths=int(deaths) if deaths else base.max_deaths,
                  death_window=window if window is not None else base.death_window)
