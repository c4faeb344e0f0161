"""The embedded in-memory bus: a bounded history ring with offsets and an epoch, no server needed.

Published events are stored at once and delivered in batches: every publish in one turn of the event loop
joins one pending list, flushed by a single ``call_soon`` callback, so a burst reaches each subscriber as one
batch. History lives in a ring of at most ``history_size`` events and ``history_max_bytes`` of them (so does the
dedupe window: what the bus holds is bounded however large the events); the epoch is new for every bus instance,
so a restarted server tells resuming clients that their offsets belong to a history that is gone.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from nexus.bus.base import (
    DEFAULT_MAX_PENDING,
    Bus,
    BusStats,
    Fanout,
    Published,
    Subscription,
    Visible,
)
from nexus.bus.turns import PublishTurns
from nexus.errors import BusUnavailable
from nexus.events import Event
from nexus.history import ChunkedQueue, History, Record, record_size, unpack
from nexus.metrics import Metrics

DEFAULT_HISTORY_SIZE: Final = 100_000
DEFAULT_HISTORY_MAX_BYTES: Final = 256 * 1024 * 1024
DEFAULT_DEDUPE_WINDOW_S: Final = 120.0
DEFAULT_DEDUPE_MAX_ENTRIES: Final = 1_000_000


class DedupeWindow:
    """Remembers stored events by ``event_id`` for ``window_s`` seconds (and at most ``max_entries`` events of at
    most ``max_bytes`` in all: past either bound the oldest are forgotten first, which can only let a very old
    duplicate through, never swallow a different event).

    An id maps to the history's own :data:`~nexus.history.Record` of the event (the same bytes object, not a
    copy), so a duplicate is answered with the stored original even after the event left the history ring: the
    window costs an id and a table entry per event, and holds the records the ring dropped until they expire.

    Expiry is amortised: ids are grouped by the whole ``step`` (at most a second) in which they expire, and a
    group is forgotten at once when its time has come, so a publish pays one comparison, not a walk of the
    window. An id is remembered at least ``window_s`` seconds and less than ``window_s + step``.
    """

    def __init__(
        self,
        window_s: float = DEFAULT_DEDUPE_WINDOW_S,
        *,
        max_entries: int = DEFAULT_DEDUPE_MAX_ENTRIES,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        """The summed :meth:`Event.size` of the remembered events (counted when ``max_bytes`` is set)."""
        self.step = min(1.0, window_s / 16) if window_s > 0 else 1.0
        self._clock = clock
        self._records: dict[str, Record] = {}
        self._order: ChunkedQueue[str] = ChunkedQueue()
        """Ids in the order remembered (``_forgotten`` of them already left the front)."""
        self._remembered = 0
        self._forgotten = 0
        self._groups: deque[tuple[float, int]] = deque()
        """(when its ids expire, how many ids were remembered before it), oldest first."""
        self._due = math.inf
        """When the oldest group expires."""
        self._last_expiry = -math.inf

    def get(self, event_id: str) -> Record | None:
        """The stored event's record with this id, if it is still inside the window."""
        if self._due <= self._clock():
            self._expire(self._clock())
        return self._records.get(event_id)

    def remember(self, event_id: str, record: Record, size: int) -> None:
        """Record a stored event by the history's record of it (``size``: its :meth:`Event.size`)."""
        if self.window_s <= 0:
            return
        now = self._clock()
        if self._due <= now:
            self._expire(now)
        if now + self.window_s > self._last_expiry:  # a new group: the first id expiring after the newest one's
            expiry = self._last_expiry = math.ceil((now + self.window_s) / self.step) * self.step
            self._groups.append((expiry, self._remembered))
            if len(self._groups) == 1:
                self._due = expiry
        records = self._records
        if self.max_bytes is not None:
            previous = records.get(event_id)
            if previous is not None:
                self.bytes -= record_size(previous)
            self.bytes += size
        records[event_id] = record
        self._order.append(event_id, len(event_id))
        self._remembered += 1
        while len(records) > self.max_entries or (self.max_bytes is not None and self.bytes > self.max_bytes):
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        event_id = self._order.popleft()
        self._forgotten += 1
        record = self._records.pop(event_id, None)
        if record is not None and self.max_bytes is not None:
            self.bytes -= record_size(record)

    def _expire(self, now: float) -> None:
        groups = self._groups
        while groups and groups[0][0] <= now:
            groups.popleft()
            end = groups[0][1] if groups else self._remembered
            while self._forgotten < end:
                self._forget_oldest()
        self._due = groups[0][0] if groups else math.inf

    def __len__(self) -> int:
        return len(self._records)


class MemoryBus(Bus):
    """The default bus: one process, bounded history, no dependencies."""

    def __init__(
        self,
        *,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_max_bytes: int | None = DEFAULT_HISTORY_MAX_BYTES,
        dedupe_window_s: float = DEFAULT_DEDUPE_WINDOW_S,
        dedupe_max_entries: int = DEFAULT_DEDUPE_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        self.history_size = history_size
        self.epoch = uuid.uuid4().hex[:16]
        self._history = History(history_size, max_bytes=history_max_bytes, epoch=self.epoch)
        self._dedupe = DedupeWindow(
            dedupe_window_s, max_entries=dedupe_max_entries, max_bytes=history_max_bytes, clock=clock
        )
        self._fanout = Fanout()
        self._turns = PublishTurns(self._fanout)
        self._pending: list[Event] = []
        self._flush_scheduled = False
        self._open = False
        self._closed = False
        self._published = 0
        self._duplicates = 0

    async def start(self) -> None:
        self._open = True

    async def close(self) -> None:
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._open = False
        self._fanout.close_all()

    @property
    def healthy(self) -> bool:
        return self._open and not self._closed

    def _check_open(self) -> None:
        if not self.healthy:
            raise BusUnavailable("the bus is closed" if self._closed else "the bus is not started")

    # --- publishing ---------------------------------------------------------------------------------------

    def _store(self, event: Event) -> Published:
        original = self._dedupe.get(event.event_id)
        if original is not None:
            self._duplicates += 1
            return Published(unpack(original, self.epoch), duplicate=True)
        history = self._history
        stored = event.stored(history.head + 1, history.epoch)
        record = history.keep(stored)
        if record is not None:
            self._dedupe.remember(stored.event_id, record, stored.size())
        self._published += 1
        self._pending.append(stored)
        return Published(stored)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._pending:
            self._flush_scheduled = True
            self._turns.count = 0  # the loop ran the last delivery: publishers start a new turn
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._fanout.deliver(pending)

    async def publish(self, event: Event) -> Published:
        self._check_open()
        await self._turns.next_turn()  # a publisher in a tight loop lets subscribers write what it stored
        self._check_open()
        result = self._store(event)
        self._schedule_flush()
        self._turns.published()
        return result

    async def publish_many(self, events: Sequence[Event]) -> list[Published]:
        self._check_open()
        await self._turns.next_turn()
        self._check_open()
        results = [self._store(event) for event in events]
        self._schedule_flush()
        self._turns.published(len(results))
        return results

    async def publish_live(self, event: Event) -> None:
        self._check_open()
        self._pending.append(event.stored(0, self.epoch))
        self._schedule_flush()

    # --- subscribing --------------------------------------------------------------------------------------

    @property
    def first_offset(self) -> int:
        """The oldest offset still in the history ring (head + 1 when the ring is empty)."""
        return self._history.first_offset

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
        self._check_open()
        return self._fanout.open(
            self._history,
            patterns,
            since_offset=since_offset,
            epoch=epoch,
            correlation_ids=correlation_ids,
            max_pending=max_pending,
            visible=visible,
        )

    async def head_offset(self) -> int:
        return self._history.head

    def history(self, since_offset: int = 0) -> list[Event]:
        """Stored events after ``since_offset`` still in the ring (for tests and tools)."""
        return self._history.after(since_offset)

    @property
    def metrics(self) -> Metrics:
        return self._fanout.metrics

    @property
    def history_bytes(self) -> int:
        """Bytes of the events the history holds."""
        return self._history.bytes

    def stats(self) -> BusStats:
        return BusStats(
            head_offset=self._history.head,
            first_offset=self.first_offset,
            epoch=self.epoch,
            subscribers=len(self._fanout.subscriptions),
            published=self._published,
            duplicates=self._duplicates,
            slow_consumers=self._fanout.slow_consumers,
        )
