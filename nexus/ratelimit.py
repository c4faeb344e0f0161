"""Token buckets: how fast one client may act. Pure: time is passed in.

:class:`RateLimiter` answers two ways: :meth:`~RateLimiter.acquire` says how long to pause before acting (the
gateway paces a flooding socket's frames, so TCP pushes back on it), :meth:`~RateLimiter.try_acquire` says
whether to act at all (publishes over the rate are refused with ``RESOURCE_EXHAUSTED`` / ``rate_limited``).
"""

from __future__ import annotations


class RateLimiter:
    """A token bucket: ``rate`` actions per second on average, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now

    def acquire(self, now: float) -> float:
        """Take one token; return how many seconds to wait before acting (0 when none)."""
        self._refill(now)
        self._tokens -= 1
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate

    def try_acquire(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are that many; False (and nothing taken) when the rate is exceeded."""
        self._refill(now)
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True
