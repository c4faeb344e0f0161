"""What one client connection may hold and do. Pure: time is passed in, nothing awaits.

Every transport keeps one :class:`ClientQuota` per client connection (a WebSocket, an SSE stream, a gRPC peer) and
asks it before it grows anything for that client: patterns, subscriptions, requests still running, publishes.
A refusal is a :class:`~nexus.errors.ResourceExhausted` (``RateLimited`` for the publish rate) that the transport
reports as its own error (gRPC ``RESOURCE_EXHAUSTED``; a WebSocket error frame ``resource_exhausted`` or
``rate_limited``); the connection stays open.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Final

from nexus.errors import RateLimited, ResourceExhausted
from nexus.ratelimit import RateLimiter

DEFAULT_MAX_PATTERNS_PER_CONNECTION: Final = 1024
DEFAULT_MAX_SUBSCRIPTIONS_PER_CONNECTION: Final = 64
DEFAULT_MAX_REQUESTS_PER_CONNECTION: Final = 256
DEFAULT_PUBLISH_RATE_PER_S: Final = 10_000.0
DEFAULT_PUBLISH_BURST: Final = 20_000
DEFAULT_MAX_CLIENTS: Final = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class ClientLimits:
    """The bounds of one client connection."""

    max_patterns: int = DEFAULT_MAX_PATTERNS_PER_CONNECTION
    """Patterns over all the connection's subscriptions."""
    max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS_PER_CONNECTION
    max_requests: int = DEFAULT_MAX_REQUESTS_PER_CONNECTION
    """Requests the connection sent whose lifecycle has not ended (live streams among them)."""
    publish_rate_per_s: float = DEFAULT_PUBLISH_RATE_PER_S
    publish_burst: int = DEFAULT_PUBLISH_BURST


DEFAULT_CLIENT_LIMITS: Final = ClientLimits()


class ClientQuota:
    """One connection's use of its :class:`ClientLimits`."""

    def __init__(self, limits: ClientLimits, *, now: float) -> None:
        self.limits = limits
        self.patterns = 0
        self.subscriptions = 0
        self.requests = 0
        self._publishes = RateLimiter(limits.publish_rate_per_s, max(1, limits.publish_burst), now=now)

    def publish(self, now: float, count: int = 1) -> None:
        """Take ``count`` publishes from the rate; raises :class:`RateLimited` over it."""
        if not self._publishes.try_acquire(now, count):
            raise RateLimited(
                f"over {self.limits.publish_rate_per_s:g} publishes per second on this connection; slow down"
            )

    def check_patterns(self, total: int) -> None:
        """Refuse a connection that would follow ``total`` patterns, past its limit."""
        if total > self.limits.max_patterns:
            limit = self.limits.max_patterns
            raise ResourceExhausted(f"{total} patterns on this connection, over the limit of {limit}")

    def add_patterns(self, count: int) -> None:
        """Hold ``count`` more patterns; raises :class:`ResourceExhausted` past the connection's limit."""
        self.check_patterns(self.patterns + count)
        self.patterns += count

    def remove_patterns(self, count: int) -> None:
        self.patterns = max(0, self.patterns - count)

    def open_subscription(self) -> None:
        """Hold one more subscription; raises :class:`ResourceExhausted` past the limit."""
        if self.subscriptions >= self.limits.max_subscriptions:
            raise ResourceExhausted(
                f"{self.subscriptions} subscriptions open on this connection, the limit; close one first"
            )
        self.subscriptions += 1

    def close_subscription(self) -> None:
        self.subscriptions = max(0, self.subscriptions - 1)

    def check_requests(self, running: int) -> None:
        """Refuse one more request from a connection with ``running`` requests still running, at its limit."""
        if running >= self.limits.max_requests:
            raise ResourceExhausted(
                f"{running} requests of this connection are still running, the limit; wait for one to end"
            )

    def start_request(self) -> None:
        """Hold one more running request; raises :class:`ResourceExhausted` past the limit."""
        self.check_requests(self.requests)
        self.requests += 1

    def end_request(self) -> None:
        self.requests = max(0, self.requests - 1)


class ClientQuotas:
    """The quotas of the clients of a transport that has no connection object of its own (gRPC: one per peer),
    by key; the least recently seen are forgotten past ``max_clients``."""

    def __init__(self, limits: ClientLimits, *, max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        self.limits = limits
        self.max_clients = max_clients
        self._quotas: OrderedDict[str, ClientQuota] = OrderedDict()

    def get(self, key: str, now: float) -> ClientQuota:
        """The quota of the client ``key``, made on first use."""
        quota = self._quotas.get(key)
        if quota is None:
            quota = self._quotas[key] = ClientQuota(self.limits, now=now)
            while len(self._quotas) > self.max_clients:
                self._quotas.popitem(last=False)
        else:
            self._quotas.move_to_end(key)
        return quota

    def __len__(self) -> int:
        return len(self._quotas)
