"""Live statistics of a bus: event rates by service and delivery latency. Pure: no I/O; the clock is given.

The fan-out records every event it delivers (so on NATS, every node counts the whole cluster's events) and
every batch a subscriber takes (its latency: now minus the event's timestamp). :meth:`Metrics.snapshot`
answers with rates over a sliding window and latency percentiles over the most recent samples.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Final

from nexus.events import JSONObject

DEFAULT_WINDOW_S: Final = 10.0
LATENCY_SAMPLES: Final = 2048


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0 to 100) of ``values`` by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def timestamp_seconds(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp, or None when it cannot be read."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


class Metrics:
    """Counters with one-second buckets over a sliding window, and a ring of latency samples."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, *, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._clock = clock
        self._buckets: deque[tuple[int, dict[str, int]]] = deque()
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.total_events = 0
        self.on_latency: Callable[[float], None] | None = None
        """Also called with every latency recorded (the server's telemetry histogram)."""

    def _bucket(self, now: float) -> dict[str, int]:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            return self._buckets[-1][1]
        counts: dict[str, int] = {}
        self._buckets.append((second, counts))
        self._trim(now)
        return counts

    def _trim(self, now: float) -> None:
        oldest = int(now - self.window_s)
        while self._buckets and self._buckets[0][0] <= oldest:
            self._buckets.popleft()

    def record_event(self, event_type: str) -> None:
        """Count one event, by its service (the first token of its type)."""
        self.record_events([event_type])

    def record_events(self, event_types: Iterable[str]) -> None:
        """Count a batch of events (one clock reading for all; each distinct type looked at once)."""
        counts = self._bucket(self._clock())
        total = 0
        for event_type, count in Counter(event_types).items():
            service = event_type.partition(":")[0]
            counts[service] = counts.get(service, 0) + count
            total += count
        self.total_events += total

    def record_latency(self, seconds: float) -> None:
        """Record one delivery latency (negative values, from clock skew, count as 0)."""
        seconds = max(seconds, 0.0)
        self._latencies.append(seconds)
        if self.on_latency is not None:
            self.on_latency(seconds)

    def record_delivery(self, event_timestamp: str) -> None:
        """Record the latency of an event taken by a subscriber now."""
        published = timestamp_seconds(event_timestamp)
        if published is not None:
            self.record_latency(self._clock() - published)

    def snapshot(self) -> JSONObject:
        """Rates over the window (events/s, total and by service) and latency percentiles in milliseconds."""
        now = self._clock()
        self._trim(now)
        by_service: dict[str, int] = {}
        for _, counts in self._buckets:
            for service, count in counts.items():
                by_service[service] = by_service.get(service, 0) + count
        window = self.window_s
        latencies = list(self._latencies)
        return {
            "window_s": window,
            "events_per_s": round(sum(by_service.values()) / window, 3),
            "events_per_s_by_service": {s: round(c / window, 3) for s, c in sorted(by_service.items())},
            "events_total": self.total_events,
            "delivery_latency_ms": {
                "p50": round(percentile(latencies, 50) * 1000, 3),
                "p95": round(percentile(latencies, 95) * 1000, 3),
                "p99": round(percentile(latencies, 99) * 1000, 3),
                "samples": len(latencies),
            },
        }
