"""The resync rate controller, on a simulated clock."""

from __future__ import annotations

from resync.rate import RateController

MiB = 1 << 20


def run(controller, seconds, chunk, app_writes_until=None):
    """Drive the controller for `seconds` of simulated time; bytes it let through."""
    now, sent = 0.0, 0
    while True:
        last_write = now if app_writes_until is not None and now < app_writes_until else (
            app_writes_until)
        wait = controller.delay(now, chunk, last_write)
        now += wait
        if now >= seconds:
            return sent
        sent += chunk


def test_unlimited_when_idle_and_no_maximum():
    controller = RateController()
    assert controller.delay(0.0, MiB, None) == 0.0
    assert controller.delay(0.0, MiB, None) == 0.0


def test_maximum_rate_is_respected():
    sent = run(RateController(max_rate=10 * MiB), 10.0, MiB)
    assert 99 * MiB <= sent <= 101 * MiB


def test_slows_down_while_the_application_writes_and_speeds_up_after():
    controller = RateController(max_rate=40 * MiB)
    busy = run(controller, 4.0, MiB, app_writes_until=1e9)
    assert 39 * MiB <= busy <= 41 * MiB  # a quarter of the maximum
    controller = RateController(max_rate=40 * MiB)
    mixed = run(controller, 4.0, MiB, app_writes_until=2.0)
    # ~2 s at 10 MiB/s, then ~2 s at 40 MiB/s after the quiet period
    assert 85 * MiB <= mixed <= 102 * MiB


def test_busy_rate_without_a_maximum():
    controller = RateController(busy_rate=8 * MiB)
    assert controller.rate(1.0, 0.95) == 8 * MiB
    assert controller.rate(1.0, 0.5) is None
