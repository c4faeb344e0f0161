"""The reconnect backoff policy, tested without a loop: delays, jitter, cap, and when it starts over."""

from __future__ import annotations

import itertools

import pytest

from nexus.backoff import Backoff, BackoffPolicy


def failing(backoff: Backoff, count: int, *, now: float = 0.0) -> list[float]:
    """The delays of ``count`` attempts that each fail at once."""
    delays = []
    for _ in range(count):
        backoff.call_opened(now)
        delays.append(backoff.call_failed(now))
    return delays


def test_delays_double_from_the_initial_delay_up_to_the_maximum() -> None:
    """Without jitter, consecutive failures wait 0.1, 0.2, 0.4, ... seconds, then the maximum forever."""
    backoff = Backoff(BackoffPolicy(initial_delay=0.1, max_delay=10.0, jitter=0.0))
    delays = failing(backoff, 12)
    assert delays[:8] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0])
    assert delays[8:] == pytest.approx([10.0] * 4)
    assert backoff.attempts == 12
    assert backoff.failures == 12


@pytest.mark.parametrize("draw", [0.0, 0.37, 0.999999])
def test_jitter_shortens_each_delay_within_its_bounds(draw: float) -> None:
    """With jitter, each delay lies between (1 - jitter) times its un-jittered value and that value."""
    policy = BackoffPolicy(initial_delay=0.1, max_delay=10.0, jitter=0.2)
    delays = failing(Backoff(policy, rng=lambda: draw), 12)
    for failures, delay in enumerate(delays, start=1):
        base = policy.base_delay(failures)
        assert base * 0.8 <= delay <= base
        assert delay == pytest.approx(base * (1 - 0.2 * draw))
    assert max(delays) <= policy.max_delay


def test_jitter_spreads_clients_that_fail_together() -> None:
    """Two subscriptions with different random draws do not retry at the same moments."""
    values = itertools.cycle([0.1, 0.9])
    first = failing(Backoff(rng=lambda: next(values)), 6)
    second = failing(Backoff(rng=lambda: 0.5), 6)
    assert first != second


def test_a_server_that_never_answers_gets_at_most_ten_attempts_in_thirty_seconds() -> None:
    """With the defaults and the shortest delays jitter can draw, attempts in 30 s stay at or under 10."""
    backoff = Backoff(BackoffPolicy(), rng=lambda: 1.0)
    now = 0.0
    attempts = 0
    while now < 30.0:
        attempts += 1
        backoff.call_opened(now)
        now += backoff.call_failed(now)
    assert attempts <= 10


def test_a_call_that_only_opened_does_not_reset_the_backoff() -> None:
    """A call that failed before the server answered (a closed port) keeps the delays growing."""
    backoff = Backoff(BackoffPolicy(jitter=0.0))
    failing(backoff, 5)
    backoff.call_opened(100.0)
    assert backoff.call_failed(100.0) == pytest.approx(3.2)


def test_a_call_connected_briefly_without_events_does_not_reset_the_backoff() -> None:
    """A call the server answered but ended before ``healthy_after`` without an event keeps the delays growing."""
    backoff = Backoff(BackoffPolicy(jitter=0.0, healthy_after=10.0))
    failing(backoff, 3)
    backoff.call_opened(50.0)
    backoff.connected(50.1)
    assert not backoff.healthy(59.0)
    assert backoff.call_failed(59.0) == pytest.approx(0.8)


def test_a_call_that_delivered_an_event_resets_the_backoff() -> None:
    """After a call that delivered, the next failure waits the initial delay again."""
    backoff = Backoff(BackoffPolicy(jitter=0.0))
    failing(backoff, 6)
    backoff.call_opened(10.0)
    backoff.connected(10.0)
    backoff.delivered()
    assert backoff.failures == 0
    assert backoff.call_failed(10.5) == pytest.approx(0.1)
    backoff.call_opened(11.0)
    assert backoff.call_failed(11.0) == pytest.approx(0.2)


def test_a_call_that_stayed_up_long_enough_resets_the_backoff() -> None:
    """A call connected for ``healthy_after`` seconds counts as healthy even if it delivered nothing."""
    backoff = Backoff(BackoffPolicy(jitter=0.0, healthy_after=10.0))
    failing(backoff, 6)
    backoff.call_opened(20.0)
    backoff.connected(20.0)
    assert backoff.healthy(30.0)
    assert backoff.call_failed(30.0) == pytest.approx(0.1)


def test_the_up_time_counts_from_the_servers_answer_not_from_the_call() -> None:
    """Time spent waiting for a server that never answered does not make a call healthy."""
    backoff = Backoff(BackoffPolicy(jitter=0.0, healthy_after=10.0))
    failing(backoff, 2)
    backoff.call_opened(0.0)
    assert backoff.call_failed(60.0) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_delay": -1.0},
        {"max_delay": float("inf")},
        {"initial_delay": 2.0, "max_delay": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.0},
        {"healthy_after": float("nan")},
    ],
)
def test_a_policy_that_makes_no_sense_is_refused(kwargs: dict[str, float]) -> None:
    """Negative, infinite or inverted settings raise ValueError when the policy is built."""
    with pytest.raises(ValueError, match="must"):
        BackoffPolicy(**kwargs)
