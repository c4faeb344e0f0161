"""A node in this process: a bus, its request queue and the provider that drives the handlers (``nexus serve``).

:class:`LocalNode` owns the lifetime of all three, and of the plugins' key-value store when it is given one:
:meth:`LocalNode.start` starts the bus, the store, the queue, then the provider (the handlers' ``setup`` runs
there, and a failing setup fails the start); :meth:`LocalNode.close` stops the provider (live streams end
``cancelled``), closes the queue (on NATS the node says it leaves), the store, then the bus, whose subscriptions
end after what they hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from nexus.api import AnyHandler
from nexus.bus.base import Bus, Published, Subscription, Visible
from nexus.events import Event, JSONObject
from nexus.kv.base import KeyValueStore
from nexus.node import DEFAULT_MAX_PATTERNS_PER_SUBSCRIPTION, Node
from nexus.provider import Provider
from nexus.queue.base import RequestQueue
from nexus.session import DISCONNECTED, Lease
from nexus.workers import Declaration, Worker


class _LocalLease(Lease):
    def __init__(self, provider: Provider, correlation_id: str) -> None:
        self._provider = provider
        self._correlation_id = correlation_id

    async def release(self, *, cancel: bool) -> None:
        if cancel:
            await self._provider.cancel(self._correlation_id, DISCONNECTED)


class _Started:
    """The ``task_status`` of :meth:`Provider.run` when it runs in a plain asyncio task."""

    def __init__(self, future: asyncio.Future[None]) -> None:
        self._future = future

    def started(self, value: Any = None) -> None:
        if not self._future.done():
            self._future.set_result(None)


class LocalNode(Node):
    """A bus, its request queue and a provider in this process (the provider's own queue unless one is given)."""

    def __init__(
        self,
        bus: Bus,
        provider: Provider,
        *,
        queue: RequestQueue | None = None,
        kv: KeyValueStore | None = None,
        shutdown_grace_s: float = 5.0,
        max_patterns_per_subscription: int = DEFAULT_MAX_PATTERNS_PER_SUBSCRIPTION,
    ) -> None:
        # One tracing for the node and its provider: a request's publish span and its handler run share a trace.
        super().__init__(max_patterns_per_subscription=max_patterns_per_subscription, tracing=provider.tracing)
        self.bus = bus
        self.provider = provider
        self.queue = queue if queue is not None else provider.queue
        self.kv = kv
        """The plugins' key-value store (the one given to the provider), started and closed with the bus."""
        self.shutdown_grace_s = shutdown_grace_s
        self._provider_task: asyncio.Task[None] | None = None
        bus.on_health(self._health_changed)

    @property
    def epoch(self) -> str:
        return self.bus.epoch

    @property
    def healthy(self) -> bool:
        return self.bus.healthy

    @property
    def ready(self) -> bool:
        task = self._provider_task
        return self.bus.healthy and task is not None and not task.done() and self.provider.started

    def describe(self) -> dict[str, Any]:
        return self.bus.describe()

    async def start(self) -> None:
        """Start the bus, the queue, then the provider; raises what a handler's ``setup`` raised."""
        await self.bus.start()
        if self.kv is not None:
            await self.kv.start()
        await self.queue.start()
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._provider_task = asyncio.create_task(
            self.provider.run(task_status=_Started(started)), name="nexus-provider"
        )
        done, _ = await asyncio.wait({started, self._provider_task}, return_when=asyncio.FIRST_COMPLETED)
        if self._provider_task in done:
            self._provider_task.result()  # raises what setup raised
            raise RuntimeError("the provider stopped during start-up")

    async def close(self, grace: float | None = None) -> None:
        """Cancel live streams (``server_shutdown``), wait up to ``grace`` for their ends, then close the bus."""
        grace = self.shutdown_grace_s if grace is None else grace
        await self.provider.stop("server_shutdown")
        task = self._provider_task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=grace + 1)
            except TimeoutError:
                task.cancel()
            except Exception as exc:
                self.provider.log.error("provider_failed", error=repr(exc))
        await self._drain_background()
        # The queue first (on NATS the node says it leaves), then the bus: every subscription ends after its
        # queued events.
        await self.queue.close()
        if self.kv is not None:
            try:
                await self.kv.close()
            except Exception as exc:
                self.provider.log.error("kv_close_failed", error=repr(exc))
        await self.bus.close()

    async def _publish(self, event: Event) -> Published:
        return await self.bus.publish(event)

    async def _publish_many(self, events: Sequence[Event]) -> list[Published]:
        return await self.bus.publish_many(events)

    def serves(self, event_type: str) -> bool:
        request_type = event_type.rsplit(":", 1)[0] + ":requested"
        return self.provider.route(request_type) is not None or self.queue.serves(request_type)

    def handles(self, service_action: str, event_type: str) -> bool:
        # Without parsing the type again: the provider knows its actions, the queue other nodes' types.
        return service_action in self.provider.actions or self.queue.serves(event_type.rsplit(":", 1)[0] + ":requested")

    async def _subscribe(
        self,
        patterns: list[str],
        *,
        since_offset: int,
        epoch: str | None,
        correlation_ids: Iterable[str],
        max_pending: int,
        visible: Visible | None,
    ) -> Subscription:
        return await self.bus.subscribe(
            patterns,
            since_offset=since_offset,
            epoch=epoch,
            correlation_ids=correlation_ids,
            max_pending=max_pending,
            visible=visible,
        )

    async def head_offset(self) -> int:
        return await self.bus.head_offset()

    async def submit(self, event: Event) -> tuple[Published, Lease]:
        if self.tracing.wants(event):
            with self.tracing.publishing(event, self.destination(event.event_type)) as stamped:
                published = await self.bus.publish(stamped)
        else:
            published = await self.bus.publish(event)
        return published, _LocalLease(self.provider, published.event.event_id)

    def _connect_worker(self, name: str, declarations: Sequence[Declaration], *, owner: str) -> Worker:
        return self.provider.connect_worker(name, declarations, owner=owner)

    def disconnect_worker(self, worker: Worker, reason: str) -> None:
        self.provider.disconnect_worker(worker, reason)

    async def _cancel(self, correlation_id: str, reason: str, *, owner: str | None) -> bool:
        return await self.provider.cancel(correlation_id, reason, owner=owner)

    async def handlers(self) -> list[JSONObject]:
        registrations = sorted(self.provider.registrations.values(), key=lambda r: r.service_action)
        return [registration.describe() for registration in registrations]

    def handler_classes(self) -> dict[str, type[AnyHandler]]:
        registrations = self.provider.registrations.values()
        return {r.name: type(r.handler) for r in registrations if r.handler is not None}  # workers declare none

    async def _streams(self) -> list[JSONObject]:
        return self.provider.streams()
