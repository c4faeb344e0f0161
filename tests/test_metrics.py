"""Live bus statistics: rates by service over a sliding window, and latency percentiles."""

from __future__ import annotations

import pytest

from nexus.metrics import Metrics, percentile


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_percentile_interpolates_like_numpy() -> None:
    """Percentiles use linear interpolation between ranks (numpy's default)."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) == 0.0


def test_rates_by_service_over_the_window() -> None:
    """Events count by service; the rate is events in the window divided by its length."""
    clock = _Clock()
    metrics = Metrics(window_s=10.0, clock=clock)
    for _ in range(30):
        metrics.record_event("places:track_location:v1:requested")
    metrics.record_events(["messaging:send_message:v1:requested"] * 10)
    snap = metrics.snapshot()
    assert snap["events_per_s_by_service"] == {"messaging": 1.0, "places": 3.0}
    assert snap["events_per_s"] == 4.0
    assert snap["events_total"] == 40


def test_old_buckets_leave_the_window() -> None:
    """Events older than the window no longer count toward the rate, but stay in the total."""
    clock = _Clock()
    metrics = Metrics(window_s=10.0, clock=clock)
    metrics.record_events(["a:b:v1:c"] * 20)
    clock.now += 5
    metrics.record_events(["a:b:v1:c"] * 10)
    assert metrics.snapshot()["events_per_s"] == 3.0
    clock.now += 6
    assert metrics.snapshot()["events_per_s"] == 1.0
    clock.now += 20
    snap = metrics.snapshot()
    assert snap["events_per_s"] == 0.0
    assert snap["events_total"] == 30


def test_delivery_latency_from_event_timestamps() -> None:
    """A delivery's latency is the time since the event's RFC 3339 timestamp, reported in milliseconds."""
    clock = _Clock()
    clock.now = 1_700_000_000.250
    metrics = Metrics(clock=clock)
    metrics.record_delivery("2023-11-14T22:13:20.000000Z")  # 1_700_000_000.0
    metrics.record_delivery("not a time")
    latency = metrics.snapshot()["delivery_latency_ms"]
    assert latency["samples"] == 1
    assert latency["p50"] == pytest.approx(250.0)
