"""The bus interface every backend implements, and the local fan-out they share.

A bus stores events (giving each an offset in one epoch), hands them to subscribers in batches and replays
history from an offset; who handles each ``requested`` event is the request queue's job (:mod:`nexus.queue`,
which uses a bus; a bus never uses it). Delivery is
synchronous and batched: the bus calls :meth:`Subscription.push` once per subscriber per batch, which never
awaits; a subscriber whose bounded queue overflows is ended with :class:`~nexus.errors.SlowConsumer`, so it
never slows the others.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import operator
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

from nexus.errors import SlowConsumer
from nexus.events import Event
from nexus.history import History, Replay
from nexus.metrics import Metrics
from nexus.patterns import PatternIndex, PatternSet, parse_pattern

DEFAULT_MAX_PENDING: Final = 10_000
REPLAY_CHUNK: Final = 1_000
"""Replayed events decoded per take at most, when the subscriber names no batch size."""
MAX_HIGH_WATER: Final = 128
"""Live events queued for a subscriber past which publishers on its event loop wait for it to drain
(:mod:`nexus.bus.turns`); a quarter of its ``max_pending`` when that is smaller."""
_event_type: Final = operator.attrgetter("event_type")
Visible = Callable[[Event], bool]
"""Whether a subscriber may see an event (private events name their audience)."""
HealthCallback = Callable[[bool], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Published:
    """What :meth:`Bus.publish` stored: the event with its offset and epoch, or the stored original."""

    event: Event
    duplicate: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class BusStats:
    """A snapshot of a bus's counters."""

    head_offset: int
    first_offset: int
    epoch: str
    subscribers: int
    published: int
    duplicates: int
    slow_consumers: int
    quarantined: int = 0
    """Messages the bus read but refused as no valid event (the NATS tail): skipped, never delivered."""


class Subscription:
    """One subscriber's view of the bus: a pattern set, followed correlation ids and a bounded queue.

    ``recovered`` is None when no offset was asked for, True when every matching event after it was replayed,
    False when the gap could not be replayed exactly (the subscription then continues live).
    """

    def __init__(
        self,
        fanout: Fanout,
        *,
        patterns: Iterable[str] = (),
        correlation_ids: Iterable[str] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
        start_after: int,
        epoch: str,
        recovered: bool | None = None,
        visible: Visible | None = None,
    ) -> None:
        self._fanout = fanout
        self.visible = visible
        """Which events this subscriber may see at all (None: every one it selects); private events are hidden."""
        self.patterns = PatternSet(patterns)
        self.correlation_ids: set[str] = set(correlation_ids)
        self.max_pending = max_pending
        self.high_water = max(1, min(MAX_HIGH_WATER, max_pending // 4))
        """Live events queued past which the subscriber counts as backlogged (publishers give it turns)."""
        self.start_after = start_after
        self.head_offset = start_after
        self.epoch = epoch
        self.recovered = recovered
        self.last_offset = 0
        self.closed = False
        self._pending: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None
        self.reader: asyncio.Task[Any] | None = None
        """The task that last waited in :meth:`next_batch` (a publisher never waits for its own reading)."""
        self._error: SlowConsumer | None = None
        self._replay_credit = 0
        self._replay: Replay | None = None
        """History the subscriber asked for, decoded as it is taken (before anything in ``_pending``)."""

    # --- filters -------------------------------------------------------------------------------------------

    def add_patterns(self, patterns: Iterable[str]) -> None:
        """Follow more patterns (all validated before any is added)."""
        new = [pattern for pattern in patterns if parse_pattern(pattern) and pattern not in self.patterns]
        for pattern in new:
            self.patterns.add(pattern)
            self._fanout.index_add(pattern, self)

    def remove_patterns(self, patterns: Iterable[str]) -> None:
        """Stop following patterns."""
        for pattern in list(patterns):
            parse_pattern(pattern)
            if pattern in self.patterns:
                self.patterns.discard(pattern)
                self._fanout.index_remove(pattern, self)

    def follow(self, correlation_id: str) -> None:
        """Also receive every event whose ``metadata.correlation_id`` is ``correlation_id``."""
        if correlation_id and correlation_id not in self.correlation_ids:
            self.correlation_ids.add(correlation_id)
            self._fanout.follow(correlation_id, self)

    def unfollow(self, correlation_id: str) -> None:
        """Stop following a correlation id."""
        if correlation_id in self.correlation_ids:
            self.correlation_ids.discard(correlation_id)
            self._fanout.unfollow(correlation_id, self)

    def wants(self, event: Event) -> bool:
        """Whether this subscription's filters select ``event`` and it may see it (used for replay)."""
        if self.visible is not None and not self.visible(event):
            return False
        if self.patterns.matches(event.event_type):
            return True
        return bool(self.correlation_ids) and event.metadata.get("correlation_id", "") in self.correlation_ids

    # --- delivery (synchronous, called by the bus) -----------------------------------------------------------

    def push(self, events: Sequence[Event], *, replay: bool = False) -> None:
        """Queue a batch. Never awaits; an overflow ends the subscription with :class:`SlowConsumer`.

        A ``replay`` batch (history the subscriber asked for) does not count against ``max_pending``: only
        live events that pile up behind it do.
        """
        if self.closed or not events:
            return
        self._pending.extend(events)
        if replay:
            self._replay_credit += len(events)
        elif (backlog := len(self._pending) - self._replay_credit) > self.max_pending:
            self._error = SlowConsumer(
                f"subscriber fell behind: more than {self.max_pending} events queued; "
                f"resume from offset {self.last_offset}",
                last_offset=self.last_offset,
                limit=self.max_pending,
            )
            self._pending.clear()
            self._replay = None
            self._fanout.slow_consumers += 1
            self.close()
            return
        elif backlog > self.high_water:
            self._fanout.backlogged.add(self)
        self._wake()

    def push_replay(self, replay: Replay) -> None:
        """Queue ``replay`` ahead of every live event (called once, before the subscription is registered).

        It is decoded as the subscriber takes it, :data:`REPLAY_CHUNK` events at a time, and filtered then by
        :meth:`wants`; like a ``replay`` batch, it does not count against ``max_pending``.
        """
        if self.closed or not len(replay):
            return
        self._replay = replay
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def pending(self) -> int:
        """Events queued and not yet taken."""
        replay = self._replay
        return len(self._pending) + (len(replay) if replay is not None else 0)

    @property
    def backlog(self) -> int:
        """Live events queued and not yet taken (a replay the subscriber asked for does not count)."""
        return len(self._pending) - self._replay_credit

    async def next_batch(self, max_events: int | None = None) -> list[Event]:
        """Wait for and take queued events in order; ``[]`` once the subscription is closed.

        Raises :class:`SlowConsumer` if the queue overflowed.
        """
        self.reader = asyncio.current_task()
        while not self._pending and self._replay is None:
            if self._error is not None:
                raise self._error
            if self.closed:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take(max_events)

    def _take(self, max_events: int | None) -> list[Event]:
        replay = self._replay
        while replay is not None:
            events = [event for event in replay.take(max_events or REPLAY_CHUNK) if self.wants(event)]
            if not len(replay):
                self._replay = replay = None
            if events:
                self.last_offset = events[-1].offset
                return events
        if not self._pending:
            return []
        if max_events is None or len(self._pending) <= max_events:
            batch, self._pending = self._pending, []
        else:
            batch = self._pending[:max_events]
            del self._pending[:max_events]
        if self._replay_credit:
            self._replay_credit = max(0, self._replay_credit - len(batch))
        elif batch:
            self._fanout.metrics.record_delivery(batch[-1].timestamp)
        for event in reversed(batch):
            if event.offset:
                self.last_offset = event.offset
                break
        return batch

    def take_nowait(self, max_events: int | None = None) -> list[Event]:
        """Take what is queued without waiting (possibly nothing)."""
        if not self._pending and self._replay is None:
            if self._error is not None:
                raise self._error
            return []
        return self._take(max_events)

    async def __aiter__(self) -> AsyncIterator[list[Event]]:
        while True:
            batch = await self.next_batch()
            if not batch:
                return
            yield batch

    def events(self) -> AsyncIterator[Event]:
        """Every event, one at a time (convenience over :meth:`next_batch`)."""
        return each_event(self.next_batch)

    def close(self) -> None:
        """Stop receiving; a waiting :meth:`next_batch` returns what is left, then ``[]``."""
        if self.closed:
            return
        self.closed = True
        self._fanout.unregister(self)
        self._wake()


class Fanout:
    """Matches events to subscriptions (pattern trie, correlation ids) and pushes batches.

    Shared by every bus backend: a backend decides what is stored and when it is delivered, the fan-out
    decides to whom.
    """

    def __init__(self) -> None:
        self._index: PatternIndex[Subscription] = PatternIndex()
        self._by_correlation: dict[str, set[Subscription]] = {}
        self._match_cache: dict[str, frozenset[Subscription]] = {}
        self.subscriptions: set[Subscription] = set()
        self.slow_consumers = 0
        self.backlogged: set[Subscription] = set()
        """Subscriptions whose live backlog passed their high-water mark (publishers wait while they drain)."""
        self.metrics = Metrics()

    def open(
        self,
        history: History,
        patterns: Iterable[str] = (),
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        correlation_ids: Iterable[str] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
        visible: Visible | None = None,
    ) -> Subscription:
        """A subscription over ``history``, registered: ``Bus.subscribe`` of every bus that keeps its history here.

        Patterns are validated before anything is registered. With ``since_offset`` (or an epoch), ``recovered``
        says whether ``history`` still holds everything after it; if so, that replay is queued first. The
        snapshot and the registration are one synchronous step: nothing is stored in between, and events stored
        before it but not yet delivered are skipped by ``start_after``.
        """
        patterns = list(patterns)
        for pattern in patterns:
            parse_pattern(pattern)
        since_offset = max(0, since_offset)
        recovered: bool | None = None
        if since_offset > 0 or epoch:
            recovered = history.recovered(since_offset, epoch)
        sub = Subscription(
            self,
            patterns=patterns,
            correlation_ids=correlation_ids,
            max_pending=max_pending,
            start_after=history.head,
            epoch=history.epoch,
            recovered=recovered,
            visible=visible,
        )
        if recovered:  # since_offset 0 with an epoch: everything of that epoch, when the history holds it all
            # Without followed correlation ids only the patterns select: the history then decodes only the
            # events whose type they match.
            types = None if sub.correlation_ids else sub.patterns.matches
            sub.push_replay(history.replay(since_offset, types=types))
        self.register(sub)
        return sub

    def register(self, sub: Subscription) -> None:
        """Start delivering to ``sub``."""
        self.subscriptions.add(sub)
        for pattern in sub.patterns:
            self._index.add(pattern, sub)
        for correlation_id in sub.correlation_ids:
            self._by_correlation.setdefault(correlation_id, set()).add(sub)
        self._match_cache.clear()

    def unregister(self, sub: Subscription) -> None:
        """Stop delivering to ``sub``."""
        if sub not in self.subscriptions:
            return
        self.subscriptions.discard(sub)
        self.backlogged.discard(sub)
        for pattern in sub.patterns:
            self._index.remove(pattern, sub)
        for correlation_id in sub.correlation_ids:
            self.unfollow(correlation_id, sub)
        self._match_cache.clear()

    def index_add(self, pattern: str, sub: Subscription) -> None:
        if sub in self.subscriptions:
            self._index.add(pattern, sub)
            self._match_cache.clear()

    def index_remove(self, pattern: str, sub: Subscription) -> None:
        if sub in self.subscriptions:
            self._index.remove(pattern, sub)
            self._match_cache.clear()

    def follow(self, correlation_id: str, sub: Subscription) -> None:
        if sub in self.subscriptions:
            self._by_correlation.setdefault(correlation_id, set()).add(sub)

    def unfollow(self, correlation_id: str, sub: Subscription) -> None:
        subs = self._by_correlation.get(correlation_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_correlation[correlation_id]

    def _match(self, event_type: str) -> frozenset[Subscription]:
        found = self._match_cache.get(event_type)
        if found is None:
            if len(self._match_cache) > 10_000:
                self._match_cache.clear()
            found = frozenset(self._index.match(event_type))
            self._match_cache[event_type] = found
        return found

    def deliver(self, events: Sequence[Event]) -> None:
        """Push ``events`` (in order) to every subscription that wants them: one batch per subscriber.

        An event already covered by a subscriber's replay (offset at or below its ``start_after``) is skipped.
        """
        batches: dict[Subscription, list[Event]] = {}
        by_correlation = self._by_correlation
        self.metrics.record_events(map(_event_type, events))
        for event in events:
            targets: Iterable[Subscription] = self._match(event.event_type)
            if by_correlation:
                followers = by_correlation.get(event.metadata.get("correlation_id", ""))
                if followers:
                    targets = set(targets) | followers
            offset = event.offset
            for sub in targets:
                if (offset and offset <= sub.start_after) or (sub.visible is not None and not sub.visible(event)):
                    continue
                batch = batches.get(sub)
                if batch is None:
                    batches[sub] = [event]
                else:
                    batch.append(event)
        for sub, batch in batches.items():
            sub.push(batch)

    def close_all(self) -> None:
        """Close every subscription (the bus is shutting down)."""
        for sub in list(self.subscriptions):
            sub.close()


class Bus(abc.ABC):
    """What the provider, the gRPC server and the gateway need from a bus backend."""

    epoch: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and prepare storage."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop; every subscription ends."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """Whether publishes can be stored now."""

    @abc.abstractmethod
    async def publish(self, event: Event) -> Published:
        """Store ``event``; returns once it is stored (or found to repeat a recent ``event_id``).

        Raises :class:`~nexus.errors.BusUnavailable` when it cannot be stored.
        """

    async def publish_many(self, events: Sequence[Event]) -> list[Published]:
        """Store several events in order."""
        return [await self.publish(event) for event in events]

    @abc.abstractmethod
    async def publish_live(self, event: Event) -> None:
        """Deliver ``event`` to live subscribers without storing it (offset 0): heartbeats."""

    @abc.abstractmethod
    async def subscribe(
        self,
        patterns: Iterable[str] = (),
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        correlation_ids: Iterable[str] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
        visible: Visible | None = None,
    ) -> Subscription:
        """Subscribe; with ``since_offset``, first replay every matching stored event after it.

        Patterns are validated before anything is registered.
        """

    @abc.abstractmethod
    async def head_offset(self) -> int:
        """The offset of the newest stored event (0 when none)."""

    @abc.abstractmethod
    def stats(self) -> BusStats:
        """Counters for health and metrics."""

    @property
    @abc.abstractmethod
    def metrics(self) -> Metrics:
        """Live rates and delivery latency (the fan-out's :class:`~nexus.metrics.Metrics`)."""

    def on_health(self, callback: HealthCallback) -> None:
        """Call ``callback(healthy)`` whenever :attr:`healthy` changes while the bus runs (a lost connection).

        A bus whose health only changes at :meth:`start` and :meth:`close` never calls it.
        """

    def describe(self) -> dict[str, Any]:
        """A short description for logs."""
        return {"bus": type(self).__name__, "epoch": self.epoch}


async def each_event(next_batch: Callable[[], Awaitable[list[Event]]]) -> AsyncIterator[Event]:
    """The events of successive batches, one at a time, until a batch comes back empty."""
    while True:
        batch = await next_batch()
        if not batch:
            return
        for event in batch:
            yield event
