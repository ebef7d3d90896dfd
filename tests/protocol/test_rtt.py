"""RttEstimator: RFC 6298 smoothing, the RTO's floor and cap, exponential backoff."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from protocol.rtt import GRANULARITY, RttEstimator

INITIAL, MIN, MAX = 0.05, 0.01, 1.0


def estimator() -> RttEstimator:
    return RttEstimator(initial_rto=INITIAL, rto_min=MIN, rto_max=MAX)


def test_before_any_sample_the_rto_is_the_initial_one():
    rtt = estimator()
    assert rtt.srtt is None
    assert rtt.rto() == pytest.approx(INITIAL)


def test_first_sample_sets_srtt_and_half_of_it_as_variance():
    rtt = estimator()
    rtt.sample(0.02)
    assert rtt.srtt == pytest.approx(0.02)
    assert rtt.rttvar == pytest.approx(0.01)
    assert rtt.latest == pytest.approx(0.02)
    assert rtt.rto() == pytest.approx(0.02 + 4 * 0.01)  # srtt + 4·rttvar


def test_later_samples_are_smoothed_with_rfc6298_gains():
    rtt = estimator()
    rtt.sample(0.02)
    rtt.sample(0.04)
    # rttvar is updated with the old srtt, then srtt moves by 1/8.
    assert rtt.rttvar == pytest.approx(0.75 * 0.01 + 0.25 * abs(0.02 - 0.04))
    assert rtt.srtt == pytest.approx(0.875 * 0.02 + 0.125 * 0.04)
    assert rtt.latest == pytest.approx(0.04)
    assert rtt.rto() == pytest.approx(rtt.srtt + 4 * rtt.rttvar)


def test_steady_samples_converge():
    rtt = estimator()
    for _ in range(200):
        rtt.sample(0.03)
    assert rtt.srtt == pytest.approx(0.03)
    assert rtt.rttvar == pytest.approx(0.0, abs=1e-9)
    # 4·rttvar has vanished: the clock granularity keeps the RTO above srtt.
    assert rtt.rto() == pytest.approx(0.03 + GRANULARITY)


def test_rto_min_is_a_floor():
    rtt = estimator()
    for _ in range(50):
        rtt.sample(0.0001)  # a 100 µs link
    assert rtt.rto() == pytest.approx(MIN)


def test_negative_samples_count_as_zero():
    rtt = estimator()
    rtt.sample(-1.0)
    assert rtt.srtt == 0.0 and rtt.latest == 0.0
    assert rtt.rto() == pytest.approx(MIN)


def test_backoff_doubles_then_caps_at_rto_max():
    rtt = estimator()
    rtt.sample(0.02)  # base RTO 0.06
    base = rtt.rto()
    seen = []
    for k in range(12):
        rtt.backoff = k
        seen.append(rtt.rto())
    for k, value in enumerate(seen):
        assert value == pytest.approx(min(base * 2**k, MAX))
    assert seen[-1] == pytest.approx(MAX)
    rtt.backoff = 10_000  # no overflow however long the peer stays silent
    assert rtt.rto() == pytest.approx(MAX)


def test_initial_rto_is_clamped_too():
    assert RttEstimator(initial_rto=5.0, rto_min=MIN, rto_max=MAX).rto() == pytest.approx(MAX)
    assert RttEstimator(initial_rto=0.001, rto_min=MIN, rto_max=MAX).rto() == pytest.approx(MIN)


def test_loss_delay_is_nine_eighths_of_the_larger_rtt_with_a_floor():
    rtt = estimator()
    assert rtt.loss_delay() == pytest.approx(INITIAL * 9 / 8)
    rtt.sample(0.008)
    rtt.sample(0.016)
    assert rtt.loss_delay() == pytest.approx(max(rtt.srtt, 0.016) * 9 / 8)


def test_loss_delay_after_a_zero_rtt_sample_is_the_floor():
    # A measured RTT of 0 (ack processed in the same clock tick) is a sample like any
    # other, not "no sample yet": loss detection must not fall back to the initial RTO.
    rtt = estimator()
    rtt.sample(0.0)
    assert rtt.srtt == 0.0
    assert rtt.loss_delay() == pytest.approx(GRANULARITY)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=0, max_size=30), st.integers(0, 40))
def test_rto_always_within_bounds(samples, backoff):
    rtt = estimator()
    for s in samples:
        rtt.sample(s)
    rtt.backoff = backoff
    assert MIN <= rtt.rto() <= MAX
    assert rtt.loss_delay() >= GRANULARITY
