"""Unit tests of the batch-formation policy (server/scheduling/policy.py): the execution-time fit,
the adaptive wait, the latency target and its parameter."""

from __future__ import annotations

import pytest

from server.core.config import DynamicBatching, ModelConfig
from server.core.errors import ErrorCode, ServingError
from server.scheduling import policy
from server.scheduling.policy import BatchPolicy, ExecutionModel
from server.telemetry.stats import BatchTiming

MS = 1_000_000


def _timing(size: int, ms: float) -> BatchTiming:
    return BatchTiming(size, size, 0, int(ms * MS), 0)


def test_execution_fit_recovers_a_line():
    model = ExecutionModel()
    for _ in range(3):
        for n in (1, 8, 16, 32, 64):
            model.observe(n, (1.0 + 0.2 * n) * MS)
    assert model.predict(32) == pytest.approx(7.4 * MS, rel=0.01)
    assert model.predict(48) == pytest.approx(10.6 * MS, rel=0.01)
    assert model.largest_within(7.4 * MS + 1, 64) == 32
    assert model.largest_within(0.5 * MS, 64) == 1  # nothing fits: the head still goes alone


def test_one_size_only_extrapolates_safely_for_targets_and_flat_for_waits():
    model = ExecutionModel()
    for _ in range(5):
        model.observe(4, 8 * MS)
    assert model.predict(2) == pytest.approx(8 * MS)
    assert model.predict(16) == pytest.approx(32 * MS)  # a larger batch costs proportionally more
    assert model.predict(16, safe=False) == pytest.approx(8 * MS)


def test_a_stalled_batch_moves_the_fit_only_so_far():
    model = ExecutionModel()
    for _ in range(20):
        model.observe(8, 1 * MS)
    model.observe(8, 500 * MS)  # preempted for half a second
    assert model.predict(8) < 1.2 * MS


def _policy(target_ms: float | None = None, adaptive: bool = True) -> BatchPolicy:
    return BatchPolicy(64, adaptive=adaptive, target_ms=target_ms)


def test_the_completed_batch_plus_the_waiting_ones_are_expected_back():
    rule = _policy()
    rule.completed(_timing(40, 10), queued=20, head_arrived_ns=0, started_ns=0, now_ns=11 * MS)
    assert rule.expected == 60
    # 30 queued of 60 expected: wait, at most 5 execution times after the instance went idle
    until = rule.wait_until(30, head_arrived_ns=11 * MS, now_ns=12 * MS, delay_until=None)
    assert until == 11 * MS + 5 * 10 * MS
    assert rule.wait_until(60, 11 * MS, 12 * MS, None) is None  # the cohort is back: go


def test_an_expectation_that_is_not_met_shrinks_to_what_came():
    rule = _policy()
    rule.completed(_timing(40, 10), queued=20, head_arrived_ns=0, started_ns=0, now_ns=11 * MS)
    assert rule.wait_until(25, 11 * MS, 61 * MS + 1, None) is None  # the wait is over
    assert rule.expected == 25
    rule.completed(_timing(25, 10), queued=0, head_arrived_ns=41 * MS, started_ns=41 * MS, now_ns=52 * MS)
    assert rule.expected == 25


def test_a_lone_client_never_waits():
    rule = _policy()
    rule.completed(_timing(1, 10), queued=0, head_arrived_ns=0, started_ns=0, now_ns=11 * MS)
    assert rule.wait_until(1, 11 * MS, 12 * MS, None) is None


def test_a_model_about_as_fast_as_the_hop_to_its_instance_never_waits():
    rule = _policy()
    # executed in 0.1 ms but came back 0.5 ms after it was handed over: the server is the bottleneck
    rule.completed(_timing(8, 0.1), queued=8, head_arrived_ns=0, started_ns=0, now_ns=int(0.5 * MS))
    assert rule.expected == 16
    assert rule.wait_until(4, 0, int(0.6 * MS), None) is None


def test_nothing_is_awaited_before_a_batch_was_measured():
    assert _policy().wait_until(1, 0, 1, None) is None


def test_a_configured_delay_keeps_its_own_rule():
    rule = _policy(adaptive=False)
    rule.completed(_timing(40, 10), queued=20, head_arrived_ns=0, started_ns=0, now_ns=11 * MS)
    assert rule.wait_until(30, 11 * MS, 12 * MS, None) is None  # work-conserving without a delay
    assert rule.wait_until(30, 11 * MS, 12 * MS, 31 * MS) == 31 * MS
    assert rule.wait_until(64, 11 * MS, 12 * MS, 31 * MS) is None  # full


def test_latency_target_caps_the_batch_and_shortens_the_wait():
    rule = _policy(target_ms=25, adaptive=False)  # 20 ms of it planned for queue wait + execution
    for n in (1, 16, 32, 64):
        rule.completed(_timing(n, 1 + 0.5 * n), queued=0, head_arrived_ns=0, started_ns=0, now_ns=0)
    assert rule.limit == 38  # 1 + 0.5 * 38 = 20 ms
    # a configured 40 ms delay ends when the oldest has just time left for its batch (5 ms for 8)
    until = rule.wait_until(8, head_arrived_ns=0, now_ns=1 * MS, delay_until=40 * MS)
    assert until == pytest.approx(15 * MS, rel=0.01)
    # once the oldest cannot make it any more, the configured rule decides alone
    assert rule.wait_until(8, head_arrived_ns=0, now_ns=19 * MS, delay_until=40 * MS) == 40 * MS
    assert rule.wait_until(38, head_arrived_ns=0, now_ns=1 * MS, delay_until=40 * MS) is None  # full


def test_a_target_out_of_reach_stops_shortening_waits():
    rule = _policy(target_ms=25)  # 20 ms planned
    for _ in range(30):  # every batch's oldest request took 40 ms: the load asks for more
        rule.completed(_timing(32, 10), queued=32, head_arrived_ns=0, started_ns=30 * MS, now_ns=40 * MS)
    assert rule.late > 0.5
    # the adaptive wait (up to 5 x 10 ms after idle) is no longer cut to the oldest's deadline
    assert rule.wait_until(20, head_arrived_ns=40 * MS, now_ns=41 * MS, delay_until=None) == 90 * MS
    for _ in range(30):  # the load eases: oldest requests finish within 15 ms
        rule.completed(_timing(32, 10), queued=32, head_arrived_ns=0, started_ns=5 * MS, now_ns=15 * MS)
    assert rule.late < 0.5
    assert rule.wait_until(20, head_arrived_ns=15 * MS, now_ns=16 * MS, delay_until=None) == pytest.approx(25 * MS, abs=10)


@pytest.mark.parametrize("raw, value", [("25", 25.0), ("0.5", 0.5), (" 7 ", 7.0)])
def test_latency_target_parameter(raw, value):
    assert policy.latency_target_ms({"latency_target_ms": raw}, "m") == value
    assert policy.latency_target_ms({}, "m") is None


@pytest.mark.parametrize("raw", ["", "soon", "0", "-3", "nan", "inf", "1e400"])
def test_bad_latency_target_is_a_precondition_failure_naming_it(raw):
    with pytest.raises(ServingError) as info:
        policy.latency_target_ms({"latency_target_ms": raw}, "m")
    assert info.value.code == ErrorCode.FAILED_PRECONDITION
    assert "latency_target_ms" in str(info.value) and f"'{raw}'" in str(info.value)


@pytest.mark.parametrize("db, decoupled, adaptive", [
    (DynamicBatching(preferred_batch_sizes=(8,)), False, True),  # the normalised default
    (DynamicBatching(preferred_batch_sizes=(8,), max_queue_delay_us=100), False, False),
    (DynamicBatching(preferred_batch_sizes=(2, 4)), False, False),
    (DynamicBatching(preferred_batch_sizes=(8,)), True, False),
])
def test_the_wait_is_adaptive_only_when_nothing_is_configured(db, decoupled, adaptive):
    config = ModelConfig(name="m", max_batch_size=8, dynamic_batching=db, decoupled=decoupled)
    assert policy.policy_for(config).adaptive is adaptive
