"""Canary settings and routing decisions (pure logic; the served behaviour is in test_canary.py)."""

from __future__ import annotations

import pytest

from server.core.errors import ErrorCode, ServingError
from server.repository import canary_spec
from server.repository.canary import PROMOTED, ROLLED_BACK, RUNNING, Routing, bucket
from server.repository.canary_window import Window

SERVING = {1: object(), 2: object()}


class _Timer:
    def __init__(self, delay, fn):
        self.delay, self.fn, self.cancelled = delay, fn, False

    def cancel(self):
        self.cancelled = True


def _routing():
    timers, released = [], []
    routing = Routing("m", lambda delay, fn: timers.append(_Timer(delay, fn)) or timers[-1], released.append)
    return routing, timers, released


def _spec(**settings):
    return canary_spec.parse({"canary_version": "2", **{k: str(v) for k, v in settings.items()}}, "m")


def test_parse_settings():
    spec = _spec(canary_share="10%", rollback_p99_ms=25, rollback_min_requests=30, rollback_error_rate="off")
    assert (spec.candidate, spec.share, spec.p99_ms, spec.min_requests, spec.error_rate) == (2, 0.1, 25.0, 30, None)
    assert canary_spec.parse({"unrelated": "x"}, "m") is None
    assert _spec(canary_share="0.25").share == 0.25


@pytest.mark.parametrize("settings, words", [
    ({"canary_share": "1.5"}, "between 0 and 1"),
    ({"canary_share": "x"}, "must be a number"),
    ({"rollback_min_requests": "0"}, "positive integer"),
    ({"rollback_p99_ms": "-3"}, "non-negative"),
    ({"rollback_window_s": "nan"}, "finite"),
    ({"canary_stable_version": "2"}, "must differ"),
    ({"canary_custom_check": "maybe"}, "true or false"),
])
def test_bad_settings_name_the_problem(settings, words):
    with pytest.raises(ServingError) as info:
        _spec(**settings)
    assert info.value.code == ErrorCode.FAILED_PRECONDITION and words in info.value.message


def test_settings_without_a_version_are_refused():
    with pytest.raises(ServingError, match="need 'canary_version'"):
        canary_spec.parse({"canary_share": "0.1"}, "m")


def test_load_parameters():
    settings, actions = canary_spec.load_settings({"canary:version": 2, "canary:share": 0.1,
                                                   "canary:rollback_p99_ms": "20"}, "m")
    assert settings == {"canary_version": "2", "canary_share": "0.1", "rollback_p99_ms": "20"} and not actions
    assert canary_spec.load_settings({"canary:promote": True}, "m") == ({}, {"promote"})
    for bad, words in [({"canary:bogus": 1}, "unrecognized load parameter 'canary:bogus'"),
                       ({"canary:end": False}, "must be true"),
                       ({"canary:end": True, "canary:share": "0.2"}, "one canary action per load")]:
        with pytest.raises(ServingError, match=words) as info:
            canary_spec.load_settings(bad, "m")
        assert info.value.code == ErrorCode.INVALID_ARGUMENT


def test_share_and_sticky_buckets():
    routing, _, _ = _routing()
    routing.configure(_spec(canary_share="0.2"), SERVING, [2])
    assert routing.phase == RUNNING and routing.default == 1
    picks = [routing.route(SERVING, "") for _ in range(20000)]
    assert abs(picks.count(2) / len(picks) - 0.2) < 0.015
    for key in (f"user-{i}" for i in range(300)):
        first = routing.route(SERVING, key)
        assert all(routing.route(SERVING, key) == first for _ in range(5))
        assert first == (2 if bucket(key) < 2000 else 1)


def test_required_versions_add_the_candidate_and_stable_to_the_policy():
    routing, _, _ = _routing()
    # latest-1 selects only the candidate: the stable one is the highest version below it
    assert routing.required(_spec(), [2], [1, 2]) == {1, 2}
    assert routing.required(_spec(canary_stable_version=1), [3], [1, 2, 3]) == {1, 2}


def _feed(routing, version, n, ok=True, ms=1.0):
    for _ in range(n):
        routing.observe(version, ok, int(ms * 1e6))


def test_error_rate_rolls_back_after_the_minimum_count():
    routing, _, _ = _routing()
    routing.configure(_spec(canary_share="0.5", rollback_error_rate="0.1", rollback_min_requests=20), SERVING, [2])
    _feed(routing, 2, 15, ok=False)
    assert routing.phase == RUNNING  # fewer than the minimum: not judged yet
    _feed(routing, 2, 5, ok=False)
    assert routing.phase == ROLLED_BACK and "error rate 100.0% > 10.0%" in routing.reason
    assert routing.share == 0 and routing.rollbacks == {(2, "error_rate"): 1}
    assert all(routing.route(SERVING, "") == 1 for _ in range(200))
    assert routing.note(2).startswith("canary rolled back")


def test_p99_bounds_roll_back():
    routing, _, _ = _routing()
    routing.configure(_spec(rollback_p99_ms=20, rollback_min_requests=50), SERVING, [2])
    _feed(routing, 2, 49, ms=5)
    _feed(routing, 2, 10, ms=50)  # 10 of 59 slow: the p99 is slow
    assert routing.phase == ROLLED_BACK and "p99 latency 50.0 ms > 20 ms" in routing.reason
    routing, _, _ = _routing()
    routing.configure(_spec(rollback_p99_ratio=3, rollback_min_requests=20), SERVING, [2])
    _feed(routing, 1, 100, ms=2)
    _feed(routing, 2, 40, ms=5)
    assert routing.phase == RUNNING  # 5 ms < 3 x 2 ms
    _feed(routing, 2, 60, ms=9)
    assert routing.phase == ROLLED_BACK and routing.rollbacks == {(2, "p99_ratio"): 1}


def test_promotion_after_requests_keeps_the_previous_version_for_a_while():
    routing, timers, released = _routing()
    routing.configure(_spec(promote_after_requests=30, keep_previous_s=5, rollback_min_requests=10), SERVING, [2])
    _feed(routing, 2, 30)
    assert routing.phase == PROMOTED and routing.default == 2 and routing.previous == 1
    assert routing.route(SERVING, "") == 2 and "previous version" in routing.note(1)
    assert [t.delay for t in timers] == [5]
    routing.keep_until = 0  # the keep time has passed
    timers[0].fn()
    assert released == [1] and routing.previous is None


def test_promotion_after_time_and_restart_only_by_an_operator():
    routing, timers, _ = _routing()
    routing.configure(_spec(promote_after_s=0.01, rollback_min_requests=10), SERVING, [2])
    routing.rollback("manual", "test")
    routing.configure(_spec(promote_after_s=0.01, rollback_min_requests=10), SERVING, [2])  # a reload
    assert routing.phase == ROLLED_BACK  # stays out ...
    routing.configure(_spec(promote_after_s=0.01, rollback_min_requests=10), SERVING, [2], {"start"})
    assert routing.phase == RUNNING  # ... until an operator starts it again
    import time
    time.sleep(0.02)
    timers[-1].fn()
    assert routing.phase == PROMOTED


def test_window_forgets_old_requests():
    window = Window(1.0)
    window.add(False, 1, now_ns=0)
    window.add(True, 1, now_ns=int(0.5e9))
    assert (window.count, window.failed) == (2, 1)
    window.add(True, 1, now_ns=int(1.2e9))
    assert (window.count, window.failed) == (2, 0)
