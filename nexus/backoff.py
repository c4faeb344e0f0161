"""Reconnect backoff: jittered exponential delays that reset only after a call proved healthy. Pure: no I/O,
no asyncio; time is passed in.

::

    backoff = Backoff(BackoffPolicy(initial_delay=0.1, max_delay=10.0))
    while True:
        started = backoff.call_opened(now())
        ...                                  # the call: backoff.connected(now()) once the server answered,
                                             # backoff.delivered() for each event it delivered
        delay = backoff.call_failed(now())   # how long to wait before the next attempt
        await sleep(delay)

States of one attempt::

    opened ──connected──▶ up ──delivered──▶ healthy (the failure count is reset)
       │                   │
       └──────failed───────┴──failed──▶ next delay (reset first when up for ``healthy_after`` or longer)

Delays grow from ``initial_delay`` by ``multiplier`` per consecutive failure up to ``max_delay``; each is
shortened by a random share of at most ``jitter`` of itself, so clients cut off together do not come back
together, and a delay never exceeds ``max_delay``. With the defaults (0.1 s, doubling, 10 s, 20 % jitter) a
server that never answers sees at most 10 attempts in 30 seconds.

A call that only opened is not a success: gRPC opens calls to a closed port, and a server that fails every call
the same way (an event it cannot encode, say) would otherwise be retried in a hot loop. Only a call that
delivered an event, or stayed connected for ``healthy_after`` seconds, resets the count.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How long to wait between reconnection attempts."""

    initial_delay: float = 0.1
    """Seconds before the first retry after a failure."""
    max_delay: float = 10.0
    """The longest wait between two attempts."""
    multiplier: float = 2.0
    """Each consecutive failure multiplies the delay by this."""
    jitter: float = 0.2
    """Each delay is shortened by a random share of at most this fraction of itself (0 for none)."""
    healthy_after: float = 10.0
    """A call connected at least this many seconds resets the backoff, even if it delivered nothing."""

    def __post_init__(self) -> None:
        for name in ("initial_delay", "max_delay", "healthy_after"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if self.max_delay < self.initial_delay:
            raise ValueError(f"max_delay ({self.max_delay}) must be at least initial_delay ({self.initial_delay})")
        if not math.isfinite(self.multiplier) or self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")

    def base_delay(self, failures: int) -> float:
        """The delay before jitter after ``failures`` consecutive failures (``failures >= 1``)."""
        if failures < 1:
            return 0.0
        # Capped before it can overflow: the exponent stops growing once the cap is reached.
        if self.multiplier == 1 or self.initial_delay == 0:
            return self.initial_delay
        limit = math.log(max(self.max_delay / self.initial_delay, 1.0), self.multiplier)
        exponent = min(failures - 1, math.ceil(limit))
        return min(self.initial_delay * self.multiplier**exponent, self.max_delay)


class Backoff:
    """The reconnection state of one subscription under a :class:`BackoffPolicy`."""

    def __init__(self, policy: BackoffPolicy | None = None, *, rng: Callable[[], float] = random.random) -> None:
        self.policy = policy or BackoffPolicy()
        self._rng = rng
        self.failures = 0
        """Consecutive attempts that failed before proving healthy."""
        self.attempts = 0
        """Calls opened so far."""
        self._connected_at: float | None = None
        self._delivered = False

    def call_opened(self, now: float) -> None:
        """A new attempt starts (``now`` in seconds of any monotonic clock)."""
        del now
        self.attempts += 1
        self._connected_at = None
        self._delivered = False

    def connected(self, now: float) -> None:
        """The server answered the call (its initial metadata arrived)."""
        self._connected_at = now

    def delivered(self) -> None:
        """The call delivered an event: the connection works, so the next failure starts from the beginning."""
        if not self._delivered:
            self._delivered = True
            self.failures = 0

    def healthy(self, now: float) -> bool:
        """Whether the current call has proved healthy: it delivered, or stayed connected long enough."""
        if self._delivered:
            return True
        return self._connected_at is not None and now - self._connected_at >= self.policy.healthy_after

    def call_failed(self, now: float) -> float:
        """The current call ended (with an error, or cut off); returns the seconds to wait before the next one."""
        if self.healthy(now):
            self.failures = 0
        self.failures += 1
        self._connected_at = None
        self._delivered = False
        base = self.policy.base_delay(self.failures)
        return base * (1.0 - self.policy.jitter * self._rng())

    def reset(self) -> None:
        """Forget past failures."""
        self.failures = 0
