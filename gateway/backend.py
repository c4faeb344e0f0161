"""What the gateway needs from a Nexus, and the in-process implementation over a bus and a provider.

A :class:`Backend` hands out :class:`~nexus.bus.base.Subscription` objects (patterns, followed correlation ids,
``since_offset`` + ``epoch`` replay, a bounded queue filled synchronously by the bus), publishes events, and
publishes requests holding a :class:`RequestLease`: releasing the lease of a request whose lifecycle has not
ended cancels its stream, which is how closing a socket cancels the streams it started.

- :class:`LocalBackend` (``nexus serve``): the server's own bus and provider, no copy, no network.
- :class:`~nexus.gateway.remote.RemoteBackend` (``nexus gateway --nexus HOST:PORT``): a relay of a remote
  Nexus over gRPC, presenting the same subscriptions.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable
from typing import Any

import structlog

from nexus.bus.base import DEFAULT_MAX_PENDING, Bus, Subscription
from nexus.events import Event, JSONObject
from nexus.provider import Provider

log = structlog.get_logger("nexus.gateway")


@dataclasses.dataclass(frozen=True, slots=True)
class Stored:
    """A published event as the bus stored it (the stored original, for a repeated ``event_id``)."""

    event: Event
    duplicate: bool = False


class RequestLease(abc.ABC):
    """The requester's hold on one request; :meth:`release` with ``cancel`` cancels a stream still running."""

    @abc.abstractmethod
    async def release(self, *, cancel: bool) -> None:
        """Let go of the request; with ``cancel`` (the requester left before the end), cancel its stream."""


class Backend(abc.ABC):
    """The Nexus a gateway serves."""

    @property
    @abc.abstractmethod
    def epoch(self) -> str:
        """The epoch of the history offsets refer to."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """Whether events can be published and delivered now."""

    def subscription_lost(self, sub: Subscription) -> str | None:
        """Why the backend ended ``sub``, when its connection must be closed for it (an error code of the
        gateway's table); None when the backend is shutting down and the gateway closes connections itself."""
        return None

    async def start(self) -> None:
        """Connect (nothing to do in process)."""

    async def close(self) -> None:
        """Disconnect; every subscription handed out ends."""

    @abc.abstractmethod
    async def subscribe(
        self,
        patterns: Iterable[str] = (),
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        correlation_ids: Iterable[str] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Subscription:
        """Subscribe; with ``since_offset``, replay every matching stored event after it first."""

    @abc.abstractmethod
    async def head_offset(self) -> int:
        """The newest stored offset."""

    @abc.abstractmethod
    async def publish(self, event: Event) -> Stored:
        """Store ``event``."""

    @abc.abstractmethod
    async def request(self, event: Event) -> tuple[Stored, RequestLease]:
        """Store a ``requested`` event and hold it on behalf of its requester."""

    @abc.abstractmethod
    async def cancel(self, correlation_id: str, reason: str) -> bool:
        """Cancel a live stream wherever it runs; whether it was found."""

    @abc.abstractmethod
    async def streams(self) -> list[JSONObject]:
        """The live streams (``correlation_id``, ``event_type``, ``stream_count``, ``age_s``, ...)."""

    @abc.abstractmethod
    async def handlers(self) -> list[JSONObject]:
        """The registered handlers (``event_type`` is ``service:action``, ``streaming``, ...)."""

    def describe(self) -> dict[str, Any]:
        """A short description for logs."""
        return {"backend": type(self).__name__, "epoch": self.epoch}


class _LocalLease(RequestLease):
    def __init__(self, provider: Provider, correlation_id: str, *, duplicate: bool) -> None:
        self._provider = provider
        self._correlation_id = correlation_id
        self._duplicate = duplicate
        self._released = False

    async def release(self, *, cancel: bool) -> None:
        if self._released:
            return
        self._released = True
        # A repeated request belongs to whoever sent the original: leaving does not cancel it.
        if cancel and not self._duplicate:
            await self._provider.cancel(self._correlation_id, "requester disconnected")


class LocalBackend(Backend):
    """The gateway inside ``nexus serve``: the server's own bus and provider."""

    def __init__(self, bus: Bus, provider: Provider) -> None:
        self.bus = bus
        self.provider = provider

    @property
    def epoch(self) -> str:
        return self.bus.epoch

    @property
    def healthy(self) -> bool:
        return self.bus.healthy

    async def subscribe(
        self,
        patterns: Iterable[str] = (),
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        correlation_ids: Iterable[str] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Subscription:
        return await self.bus.subscribe(
            patterns,
            since_offset=since_offset,
            epoch=epoch,
            correlation_ids=correlation_ids,
            max_pending=max_pending,
        )

    async def head_offset(self) -> int:
        return await self.bus.head_offset()

    async def publish(self, event: Event) -> Stored:
        published = await self.bus.publish(event)
        return Stored(published.event, published.duplicate)

    async def request(self, event: Event) -> tuple[Stored, RequestLease]:
        stored = await self.publish(event)
        return stored, _LocalLease(self.provider, stored.event.event_id, duplicate=stored.duplicate)

    async def cancel(self, correlation_id: str, reason: str) -> bool:
        return await self.provider.cancel(correlation_id, reason)

    async def streams(self) -> list[JSONObject]:
        return self.provider.streams()

    async def handlers(self) -> list[JSONObject]:
        return [registration.describe() for registration in self.provider.registrations.values()]
