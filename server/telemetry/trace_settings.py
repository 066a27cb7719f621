"""The trace extension's run-time settings (protocol.md §1.2): global values, per-model overrides, and
the per-request admission gate they compile to.

Keys: ``trace_level`` (OFF disables; TIMESTAMPS traces), ``trace_rate`` (trace one request in N that
carries no caller context; 0: only requests that carry one), ``trace_count`` (traces left, -1
unlimited), ``trace_mode`` (always ``opentelemetry``), and Triton's file keys ``trace_file`` /
``log_frequency``, which only have their neutral values here (spans go to the OTLP exporter).
A request with a caller context (``traceparent``) is traced whenever its level is not OFF, whatever
the rate and count, as Triton does; the OpenTelemetry sampler then honours the caller's decision.
Everything here runs on the event loop: no locks.
"""

from __future__ import annotations

from server.core.errors import ErrorCode, ServingError

from .trace_config import TraceConfig, check_level

KEYS = ("trace_file", "trace_level", "trace_rate", "trace_count", "log_frequency", "trace_mode")


class Gate:
    """The compiled settings one request is admitted by; models without overrides share the global one."""

    __slots__ = ("on", "rate", "seen", "count", "counter")

    def __init__(self) -> None:
        self.on = False
        self.rate = 1
        self.seen = 0  # requests without caller context seen since the rate was set
        self.count = -1  # traces left (-1: unlimited)
        self.counter: Gate | None = None  # the gate whose count this one spends (None: its own)

    def admit(self, remote: bool) -> bool:
        if not self.on:
            return False
        if remote:
            return True
        if self.rate == 0:
            return False
        seen, self.seen = self.seen, self.seen + 1
        if seen % self.rate:
            return False
        counter = self.counter or self
        if counter.count == 0:
            return False
        if counter.count > 0:
            counter.count -= 1
        return True


def _one(key: str, values: list[str]) -> str:
    if len(values) != 1:
        raise ValueError(f"trace setting '{key}' takes exactly one value, got {len(values)}")
    return values[0].strip()


def _integer(key: str, values: list[str], minimum: int) -> int:
    text = _one(key, values)
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"trace setting '{key}' must be an integer, got '{text}'") from None
    if value < minimum:
        raise ValueError(f"trace setting '{key}' must be >= {minimum}, got {value}")
    return value


def _parse(key: str, values: list[str]) -> object:
    if key == "trace_level":
        return check_level(values)
    if key == "trace_rate":
        return _integer(key, values, 0)
    if key == "trace_count":
        return _integer(key, values, -1)
    if key == "log_frequency":
        if _integer(key, values, 0) != 0:
            raise ValueError("trace setting 'log_frequency' applies to Triton's trace files only; in "
                             "opentelemetry mode spans are exported over OTLP (only 0 is accepted)")
        return 0
    if key == "trace_file":
        if _one(key, values):
            raise ValueError("trace setting 'trace_file' applies to Triton's trace files only; in "
                             "opentelemetry mode spans are exported over OTLP (only '' is accepted)")
        return ""
    if key == "trace_mode":
        if _one(key, values).lower() != "opentelemetry":
            raise ValueError("trace setting 'trace_mode' can only be 'opentelemetry'")
        return "opentelemetry"
    raise ValueError(f"unknown trace setting '{key}' (known: {', '.join(KEYS)})")


class TraceSettings:
    """Global values, per-model overrides, and their gates."""

    def __init__(self, config: TraceConfig) -> None:
        self.values: dict[str, object] = {"trace_file": "", "trace_level": list(config.level),
                                          "trace_rate": config.rate, "log_frequency": 0,
                                          "trace_mode": "opentelemetry"}
        self.overrides: dict[str, dict[str, object]] = {}
        self.gate = Gate()
        self.gate.count = config.count
        self.gates: dict[str, Gate] = {}  # only models with overrides
        self._refresh()

    # -- reading ----------------------------------------------------------------------------

    def any_on(self) -> bool:
        return self.gate.on or any(g.on for g in self.gates.values())

    def gate_for(self, model: str) -> Gate:
        return self.gates.get(model, self.gate)

    def get(self, model: str = "") -> dict[str, list[str]]:
        """Current values as strings (``trace_level`` a list); a model's overrides over the global ones;
        ``trace_count`` is what is left, as Triton reports it."""
        values = {**self.values, **self.overrides.get(model, {})} if model else dict(self.values)
        gate = self.gate_for(model) if model else self.gate
        values["trace_count"] = (gate.counter or gate).count
        return {k: [str(x) for x in v] if isinstance(v, list) else [str(v)]
                for k, v in sorted(values.items())}

    # -- changing ---------------------------------------------------------------------------

    def update(self, model: str, changes: dict[str, list[str] | None]) -> None:
        """Apply ``changes`` (None or [] clears a model's key back to the global value). All or nothing."""
        parsed: dict[str, object] = {}
        cleared: list[str] = []
        for key, values in changes.items():
            if key not in KEYS:
                raise ServingError(ErrorCode.INVALID_ARGUMENT,
                                   f"unknown trace setting '{key}' (known: {', '.join(KEYS)})")
            if not values:
                if not model:
                    raise ServingError(ErrorCode.INVALID_ARGUMENT, f"the global trace setting '{key}' cannot "
                                       "be cleared (only a model's setting can, to follow the global one)")
                cleared.append(key)
                continue
            try:
                parsed[key] = _parse(key, values)
            except ValueError as exc:
                raise ServingError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        count = parsed.pop("trace_count", None)
        if not model:
            self.values.update(parsed)
            gate = self.gate
        else:
            mine = self.overrides.setdefault(model, {})
            for key in cleared:
                mine.pop(key, None)
            mine.update(parsed)
            if count is not None:
                mine["trace_count"] = count
            gate = self.gates.get(model) or Gate()
            self.gates[model] = gate
        if count is not None:
            gate.count = int(count)  # type: ignore[arg-type]
        if "trace_rate" in parsed:
            gate.seen = 0
        self._refresh()

    def clear(self, model: str) -> None:
        """Drop every override of ``model``: it follows the global settings again."""
        self.overrides.pop(model, None)
        self._refresh()

    def _refresh(self) -> None:
        """Recompute what each gate admits: a model's keys it does not override follow the global ones."""
        self.gate.on = self.values["trace_level"] != ["OFF"]
        self.gate.rate = int(self.values["trace_rate"])  # type: ignore[arg-type]
        for name in [n for n in self.gates if not self.overrides.get(n)]:
            del self.gates[name]
            self.overrides.pop(name, None)
        for name, gate in self.gates.items():
            mine = self.overrides[name]
            gate.on = mine.get("trace_level", self.values["trace_level"]) != ["OFF"]
            gate.rate = int(mine.get("trace_rate", self.values["trace_rate"]))  # type: ignore[arg-type]
            gate.counter = None if "trace_count" in mine else self.gate
