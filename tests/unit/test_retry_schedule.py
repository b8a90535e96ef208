"""The worker's retry schedule (issue 13): capped, jittered, and two streaks counted apart."""

from __future__ import annotations

from rhttp_wsgi.worker import RetrySchedule


def draws(*values: float) -> RetrySchedule:
    it = iter(values)
    return RetrySchedule(0.5, 2.0, 30.0, lambda: next(it))


def test_delay_doubles_from_the_minimum_to_the_low_cap_within_equal_jitter() -> None:
    s = draws(*[0.0] * 6)  # the lowest draw: half the step
    assert [s.failed() for _ in range(6)] == [0.25, 0.5, 1.0, 1.0, 1.0, 1.0]
    top = draws(*[1.0] * 6)  # the highest: the whole step, never above reconnect_max
    assert [top.failed() for _ in range(6)] == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]


def test_a_refusing_proxy_backs_off_to_the_high_cap() -> None:
    s = draws(*[1.0] * 8)
    assert [s.failed(refused=True) for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_reaching_the_proxy_ends_the_unreachable_streak_only() -> None:
    s = draws(*[1.0] * 10)
    for _ in range(5):
        s.failed()
    s.failed(refused=True)
    s.reached()  # a handshake completed after a long outage
    assert (s.failures, s.refusals) == (0, 1)
    assert s.failed() == 0.5  # a new outage starts at the minimum
    assert s.failed(refused=True) == 1.0  # the refusals keep growing until a tunnel serves
    s.succeeded()
    assert (s.failures, s.refusals) == (0, 0)
