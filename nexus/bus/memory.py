"""The embedded in-memory bus: a bounded history ring with offsets and an epoch, no server needed.

Published events are stored at once and delivered in batches: every publish in one turn of the event loop
joins one pending list, flushed by a single ``call_soon`` callback, so a burst reaches each subscriber as one
batch. History lives in a ring of at most ``history_size`` events and ``history_max_bytes`` of them (so does the
dedupe window: what the bus holds is bounded however large the events); the epoch is new for every bus instance,
so a restarted server tells resuming clients that their offsets belong to a history that is gone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
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
from nexus.history import History
from nexus.metrics import Metrics

DEFAULT_HISTORY_SIZE: Final = 100_000
DEFAULT_HISTORY_MAX_BYTES: Final = 256 * 1024 * 1024
DEFAULT_DEDUPE_WINDOW_S: Final = 120.0
DEFAULT_DEDUPE_MAX_ENTRIES: Final = 1_000_000


class DedupeWindow:
    """Remembers stored events by ``event_id`` for ``window_s`` seconds (and at most ``max_entries`` events of at
    most ``max_bytes`` in all: past either bound the oldest are forgotten first, which can only let a very old
    duplicate through, never swallow a different event)."""

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
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Event]] = OrderedDict()

    def _over(self) -> bool:
        return len(self._entries) > self.max_entries or (self.max_bytes is not None and self.bytes > self.max_bytes)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            event_id, (expires, event) = next(iter(entries.items()))
            if expires > now and not self._over():
                break
            del entries[event_id]
            if self.max_bytes is not None:
                self.bytes -= event.size()

    def get(self, event_id: str) -> Event | None:
        """The stored event with this id, if it is still inside the window."""
        self._expire(self._clock())
        entry = self._entries.get(event_id)
        return entry[1] if entry is not None else None

    def remember(self, event: Event) -> None:
        """Record a stored event."""
        if self.window_s <= 0:
            return
        self._entries[event.event_id] = (self._clock() + self.window_s, event)
        if self.max_bytes is not None:
            self.bytes += event.size()
            if self.bytes > self.max_bytes:
                self._expire(self._clock())

    def __len__(self) -> int:
        return len(self._entries)


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
            return Published(original, duplicate=True)
        history = self._history
        stored = event.stored(history.head + 1, history.epoch)
        history.append(stored)
        self._dedupe.remember(stored)
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
