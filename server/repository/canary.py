"""Canary routing for one model: which version an unpinned request goes to, and when a candidate
is pulled back or promoted.

One ``Routing`` lives on a model's repository record, across reloads. While a canary runs, an
unpinned request goes to the candidate with the configured share (by a hash of its routing key
when it has one, so one key always sees one version, else at random) and to the stable version
otherwise. Every finished request of the candidate and the stable version is observed (on the
event loop) into a sliding window; when a rollback condition trips, the share drops to 0 at once:
requests already routed finish where they are, new ones go to the stable version, and the canary
stays out until an operator starts it again. A promotion makes the candidate the version unpinned
traffic uses and keeps the previous one loaded for ``keep_previous_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from typing import Any, Awaitable, Callable, Mapping

from server.core.errors import ErrorCode, ServingError, invalid

from .canary_spec import CanarySpec
from .canary_window import Window

log = logging.getLogger(__name__)

RUNNING, ROLLED_BACK, PROMOTED, ENDED = "running", "rolled back", "promoted", "ended"
BUCKETS = 10_000  # sticky keys hash into this many buckets; the first share x BUCKETS go to the candidate
CHECK_INTERVAL_S = 1.0  # a model's own canary_check runs at most this often


def bucket(key: str) -> int:
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class Routing:
    def __init__(self, model: str, schedule: Callable[[float, Callable[[], None]], object],
                 release: Callable[[int], None],
                 custom: Callable[[int, dict], Awaitable[tuple[bool, str]]] | None = None,
                 offers: Callable[[int], bool] | None = None) -> None:
        self.model = model
        self._schedule = schedule  # loop.call_later
        self._release = release  # the manager retires a version nobody needs any more
        self._custom = custom  # runs the candidate model's canary_check (in a thread)
        self._offers = offers  # whether a version's model has a canary_check
        self._checking = False
        self._last_check = 0.0
        self._tasks: set = set()
        self.overlay: dict[str, str] = {}  # canary settings an operator gave through the load API
        self.spec: CanarySpec | None = None
        self.phase = ""
        self.reason = ""  # why the latest canary was rolled back
        self.default: int | None = None  # the version unpinned traffic uses outside the share
        self.previous: int | None = None  # the default before a promotion, kept loaded until ...
        self.keep_until = 0.0  # ... this monotonic time
        self.rollbacks: dict[tuple[int, str], int] = {}  # (version, reason code) -> count
        self._windows: dict[int, Window] = {}
        self._since = 0.0  # when the running canary (re)started
        self._served = 0  # candidate successes since then
        self._evaluated = 0
        self._random = random.Random()
        self._timers: list = []

    # -- what must stay loaded ---------------------------------------------------------------

    def required(self, spec: CanarySpec | None, selected: list[int], available: list[int]) -> set[int]:
        """Versions a load must keep or load besides what its version policy selects."""
        need: set[int] = set()
        if spec is not None and self._keeps_canary(spec):
            stable = self.stable_for(spec, selected, available)
            need.add(spec.candidate)
            if stable is not None:
                need.add(stable)
        elif self.default is not None:
            need.add(self.default)
        if self.previous is not None and time.monotonic() < self.keep_until:
            need.add(self.previous)
        return {v for v in need if v in available}

    def _keeps_canary(self, spec: CanarySpec) -> bool:
        """Whether ``spec`` (from a reload) keeps a canary in play rather than one that is over."""
        if self.spec is not None and spec.candidate == self.spec.candidate:
            return self.phase in (RUNNING, ROLLED_BACK)
        return not (self.phase in (PROMOTED, ENDED) and self.default == spec.candidate)

    def stable_for(self, spec: CanarySpec, selected: list[int], available: list[int]) -> int | None:
        if spec.stable is not None:
            return spec.stable
        if self.default is not None and self.default != spec.candidate:
            return self.default
        others = [v for v in selected if v != spec.candidate]
        if others:
            return max(others)
        below = [v for v in available if v < spec.candidate]
        return max(below) if below else None

    # -- configuration (on the loop, after a load or a load-API call) ------------------------

    def configure(self, spec: CanarySpec | None, serving: Mapping[int, object], selected: list[int],
                  actions: set[str] = frozenset(), operator: bool = False) -> None:
        if "end" in actions:
            if self.spec is None or self.phase not in (RUNNING, ROLLED_BACK):
                raise invalid(f"model '{self.model}' has no canary to end")
            self._finish(ENDED, "ended by an operator")
            return
        if "promote" in actions:
            if self.spec is None or self.phase not in (RUNNING, ROLLED_BACK):
                raise invalid(f"model '{self.model}' has no canary to promote")
            self.promote("promoted by an operator")
            return
        if "rollback" in actions:
            if self.spec is None or self.phase != RUNNING:
                raise invalid(f"model '{self.model}' has no running canary to roll back")
            self.rollback("manual", "rolled back by an operator")
            return
        if spec is None:
            if "start" in actions:
                raise invalid(f"model '{self.model}' has no canary settings to start (give 'canary:version' and "
                              "'canary:share', or name them in config.pbtxt)")
            if self.phase in (RUNNING, ROLLED_BACK):
                self._finish(ENDED, "the configuration names no canary any more")
            if self.phase != PROMOTED or self.default not in serving:
                self.default = None
            return
        restart = operator or "start" in actions
        same = self.spec is not None and spec.candidate == self.spec.candidate
        if same and not restart:
            if self.phase in (RUNNING, ROLLED_BACK):
                self.spec = spec  # a changed share or condition applies at once; the window stays
                for window in self._windows.values():
                    window.span_ns = int(spec.window_s * 1e9)
            self._arm()
            return
        if not restart and self.phase in (PROMOTED, ENDED) and self.default == spec.candidate:
            return  # the configuration still names a canary that is over
        stable = self.stable_for(spec, selected, sorted(serving))
        if spec.custom_check and spec.candidate in serving and not (self._offers and self._offers(spec.candidate)):
            raise ServingError(ErrorCode.FAILED_PRECONDITION,
                               f"model '{self.model}': 'canary_custom_check' is on, but version {spec.candidate}'s "
                               "model offers no canary_check(stats) method (a Python model's TritonPythonModel, in the "
                               "'in_process' isolation mode)")
        if stable is None or stable not in serving or spec.candidate not in serving:
            raise ServingError(ErrorCode.FAILED_PRECONDITION,
                               f"model '{self.model}': the canary needs versions {spec.candidate} (candidate) and "
                               f"{stable if stable is not None else '(a stable version)'} loaded; serving: "
                               f"{sorted(serving) or 'none'}")
        self.spec, self.phase, self.reason, self.default = spec, RUNNING, "", stable
        self._windows = {spec.candidate: Window(spec.window_s), stable: Window(spec.window_s)}
        self._since, self._served, self._evaluated = time.monotonic(), 0, 0
        self._arm()
        log.info("model '%s': canary started: version %d gets %.1f%% of unpinned requests, version %d the rest",
                 self.model, spec.candidate, spec.share * 100, stable)

    def _arm(self) -> None:
        spec = self.spec
        if spec is not None and self.phase == RUNNING and spec.promote_after_s is not None:
            due = self._since + spec.promote_after_s - time.monotonic()
            self._timers.append(self._schedule(max(0.0, due), self._promote_if_due))

    def _promote_if_due(self) -> None:
        spec = self.spec
        if spec is None or self.phase != RUNNING or spec.promote_after_s is None:
            return
        if time.monotonic() - self._since >= spec.promote_after_s - 1e-3:
            self._evaluate(force=True)
            if self.phase == RUNNING:
                self.promote(f"ran {spec.promote_after_s:g} s without a rollback condition tripping")

    # -- routing (on the loop, per request) --------------------------------------------------

    def unpinned(self, serving: Mapping[int, object]) -> int:
        """The version an unpinned request uses outside the canary share."""
        default = self.default
        return default if default is not None and default in serving else max(serving)

    def route(self, serving: Mapping[int, object], key: str) -> int:
        default = self.unpinned(serving)
        spec = self.spec
        if self.phase != RUNNING or spec is None or spec.share <= 0 or spec.candidate not in serving:
            return default
        if key:
            hit = bucket(key) < round(spec.share * BUCKETS)
        else:
            hit = self._random.random() < spec.share
        return spec.candidate if hit else default

    @property
    def share(self) -> float:
        return self.spec.share if self.spec is not None and self.phase == RUNNING else 0.0

    # -- observation and conditions ----------------------------------------------------------

    def observe(self, version: int, ok: bool, latency_ns: int) -> None:
        """A request of ``version`` finished (``ok``: without an error); called on the loop."""
        window = self._windows.get(version)
        if window is None or self.phase != RUNNING:
            return
        window.add(ok, latency_ns)
        spec = self.spec
        if spec is None or version != spec.candidate:
            return
        if ok:
            self._served += 1
        self._evaluate()
        if (self.phase == RUNNING and spec.promote_after_requests is not None
                and self._served >= spec.promote_after_requests):
            self._evaluate(force=True)
            if self.phase == RUNNING:
                self.promote(f"served {self._served} requests without a rollback condition tripping")

    def _evaluate(self, force: bool = False) -> None:
        spec = self.spec
        assert spec is not None
        candidate = self._windows[spec.candidate]
        candidate.prune()
        n = candidate.count
        if n < spec.min_requests:
            return
        if spec.error_rate is not None and candidate.error_rate > spec.error_rate:
            self.rollback("error_rate", f"error rate {candidate.error_rate:.1%} > {spec.error_rate:.1%} over the "
                          f"last {n} requests ({spec.window_s:g} s window)")
            return
        if spec.custom_check and not self._checking and time.monotonic() - self._last_check >= CHECK_INTERVAL_S:
            self._start_check(spec)
        if spec.p99_ms is None and spec.p99_ratio is None:
            return
        # the percentile sorts the window: judge it every ~1% of the window's requests
        self._evaluated += 1
        if not force and self._evaluated < max(1, n // 100):
            return
        self._evaluated = 0
        p99 = candidate.p99_ms()
        if spec.p99_ms is not None and p99 > spec.p99_ms:
            self.rollback("p99_latency", f"p99 latency {p99:.1f} ms > {spec.p99_ms:g} ms over the last {n} "
                          f"requests ({spec.window_s:g} s window)")
            return
        stable = self._windows.get(self.default) if self.default is not None else None
        if spec.p99_ratio is not None and stable is not None:
            stable.prune()
            if stable.count >= spec.min_requests:
                base = stable.p99_ms()
                if base > 0 and p99 > spec.p99_ratio * base:
                    self.rollback("p99_ratio", f"p99 latency {p99:.1f} ms > {spec.p99_ratio:g} x the stable "
                                  f"version's {base:.1f} ms over the last {n} requests ({spec.window_s:g} s window)")

    def figures(self) -> dict[str, Any]:
        """What a model's canary_check sees: the window's figures for candidate and stable."""
        spec = self.spec
        assert spec is not None
        out: dict[str, Any] = {"candidate_version": spec.candidate, "stable_version": self.default or 0,
                               "share": self.share, "running_s": time.monotonic() - self._since}
        for prefix, version in (("", spec.candidate), ("stable_", self.default)):
            window = self._windows.get(version) if version is not None else None
            if window is not None:
                out.update({f"{prefix}requests": window.count, f"{prefix}errors": window.failed,
                            f"{prefix}error_rate": window.error_rate, f"{prefix}p99_ms": window.p99_ms()})
        return out

    def _start_check(self, spec: CanarySpec) -> None:
        if self._custom is None:
            return
        self._checking, self._last_check = True, time.monotonic()
        stats, since = self.figures(), self._since

        async def check() -> None:
            try:
                ok, reason = await self._custom(spec.candidate, stats)
            except Exception as exc:  # a broken check gives no verdict; the built-in conditions still hold
                log.error("model '%s' version %d: canary_check failed, no verdict: %s: %s", self.model,
                          spec.candidate, type(exc).__name__, exc)
                return
            finally:
                self._checking = False
            if not ok and self.phase == RUNNING and self.spec is spec and self._since == since:
                self.rollback("custom", f"the model's canary_check said: {reason}")

        task = asyncio.get_running_loop().create_task(check())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- transitions -------------------------------------------------------------------------

    def rollback(self, code: str, text: str) -> None:
        spec = self.spec
        assert spec is not None
        self.phase, self.reason = ROLLED_BACK, f"canary rolled back: {text}"
        key = (spec.candidate, code)
        self.rollbacks[key] = self.rollbacks.get(key, 0) + 1
        log.warning("model '%s' version %d: %s; unpinned traffic goes to version %s until an operator starts "
                    "the canary again", self.model, spec.candidate, self.reason, self.default)

    def promote(self, why: str) -> None:
        spec = self.spec
        assert spec is not None
        previous = self.default
        self.phase, self.reason, self.default = PROMOTED, "", spec.candidate
        self._windows = {}
        log.info("model '%s': canary version %d promoted (%s); version %s stays loaded for %g s",
                 self.model, spec.candidate, why, previous, spec.keep_previous_s)
        if previous is not None and previous != spec.candidate:
            self.previous, self.keep_until = previous, time.monotonic() + spec.keep_previous_s
            self._timers.append(self._schedule(spec.keep_previous_s, self._expire_previous))

    def _expire_previous(self) -> None:
        if self.previous is not None and time.monotonic() >= self.keep_until - 1e-3:
            version, self.previous = self.previous, None
            if version != self.default:
                self._release(version)

    def _finish(self, phase: str, why: str) -> None:
        if self.spec is not None and self.phase in (RUNNING, ROLLED_BACK):
            log.info("model '%s': canary of version %d %s (%s); unpinned traffic stays on version %s",
                     self.model, self.spec.candidate, phase, why, self.default)
            self.phase = phase
            self._windows = {}

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    # -- reporting ---------------------------------------------------------------------------

    def note(self, version: int) -> str:
        """What the repository index says about ``version``'s role (the reason column)."""
        spec = self.spec
        if spec is not None and version == spec.candidate:
            if self.phase == RUNNING:
                return f"canary candidate: {spec.share:.1%} of unpinned requests"
            if self.phase == ROLLED_BACK:
                return self.reason
            if self.phase == ENDED:
                return "canary ended; serves pinned requests only"
        if version == self.default and self.phase == RUNNING:
            return "canary stable version"
        if version == self.default and self.phase == PROMOTED and spec is not None and version == spec.candidate:
            return "promoted canary: serves unpinned requests"
        if version == self.previous:
            left = max(0.0, self.keep_until - time.monotonic())
            return f"previous version, kept loaded for rollback ({left:.0f} s left)"
        return ""
