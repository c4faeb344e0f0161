"""The default request queue: the consumers of one process take a bus's ``requested`` events in turn.

It follows ``*:*:*:requested`` with one bus subscription and hands each batch out without awaiting: every
request to one consumer, round-robin among those that joined before it was stored. Control messages stay in
the process. Two servers in one process that share a bus share one queue, so each request runs once.

Over a bus shared by several processes (NATS) every process would run every request: use
:class:`~nexus.queue.nats.NatsRequestQueue` there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Final

import structlog

from nexus.bus.base import DEFAULT_MAX_PENDING, Bus, Fanout, Published, Subscription
from nexus.errors import BusUnavailable, SlowConsumer
from nexus.events import Event
from nexus.queue.base import REQUESTS_PATTERN, CancelRequest, ControlCallback, RequestQueue, RequestRoute

FEED_QUEUE: Final = 1_000_000
"""Requests the queue's own subscription may hold; it hands them on at once, so only a starved loop fills it."""

log = structlog.get_logger("nexus.queue.memory")


class MemoryRequestQueue(RequestQueue):
    """Shares the ``requested`` events of ``bus`` among the consumers of this process."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._consumers = Fanout()
        """The consumers' own fan-out: nothing is matched there, the queue pushes to each consumer itself."""
        self._members: list[Subscription] = []
        self._turn = 0
        self._feed: Subscription | None = None
        self._reader: asyncio.Task[None] | None = None
        self._control: list[ControlCallback] = []
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._feed is not None:
            self._feed.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._consumers.close_all()

    async def consume(
        self, routes: Sequence[RequestRoute] = (), *, max_pending: int = DEFAULT_MAX_PENDING
    ) -> Subscription:
        # One process: every consumer may take any request; the provider routes it (``routes`` matter only to a
        # queue shared by several nodes).
        if self._closed:
            raise BusUnavailable("the request queue is closed")
        if self._feed is None or self._feed.closed:
            self._feed = await self.bus.subscribe([REQUESTS_PATTERN], max_pending=FEED_QUEUE)
            self._reader = asyncio.get_running_loop().create_task(self._read(self._feed), name="nexus-request-queue")
        sub = Subscription(
            self._consumers, max_pending=max_pending, start_after=await self.bus.head_offset(), epoch=self.bus.epoch
        )
        self._consumers.register(sub)
        self._members.append(sub)
        return sub

    async def _read(self, feed: Subscription) -> None:
        """Hand each batch the bus delivers to the consumers; when the bus ends the feed, they end too."""
        try:
            while True:
                try:
                    batch = await feed.next_batch()
                except SlowConsumer as exc:
                    log.error("request_feed_overflow", limit=exc.limit, last_offset=exc.last_offset)
                    if self._closed or not self.bus.healthy:
                        return
                    feed = self._feed = await self.bus.subscribe([REQUESTS_PATTERN], max_pending=FEED_QUEUE)
                    continue
                if not batch:
                    return
                self._hand_out(batch)
        finally:
            self._consumers.close_all()
            self._members.clear()

    def _hand_out(self, events: Sequence[Event]) -> None:
        """Give each request to one consumer that joined before it was stored, in turn. Never awaits."""
        members = self._members = [member for member in self._members if not member.closed]
        if not members:
            return
        batches: dict[Subscription, list[Event]] = {}
        for event in events:
            for _ in range(len(members)):
                member = members[self._turn % len(members)]
                self._turn += 1
                if event.offset > member.start_after:
                    batches.setdefault(member, []).append(event)
                    break
        for member, batch in batches.items():
            member.push(batch)

    async def publish_terminal(self, event: Event) -> Published:
        return await self.bus.publish(event)

    async def cancel(self, message: CancelRequest) -> None:
        if not self.bus.healthy:
            raise BusUnavailable("the bus is closed")
        loop = asyncio.get_running_loop()
        for callback in list(self._control):
            loop.call_soon(callback, message)

    def on_control(self, callback: ControlCallback) -> None:
        self._control.append(callback)
