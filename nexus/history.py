"""A bounded history of stored events: the ring behind replay. Pure: no I/O, no asyncio.

:class:`History` keeps the newest stored events of one epoch in offset order, at most ``max_events`` of them and
at most ``max_bytes`` of their :meth:`~nexus.events.Event.size`, and answers the two questions a resuming
subscriber asks:

- :meth:`History.recovered`: can everything after ``since_offset`` (of ``epoch``) be replayed exactly? Only when
  the epoch is this history's (or none is given), the offset is not ahead of the head, and no stored event after
  it has been dropped from the ring yet.
- :meth:`History.after`: the stored events after an offset, oldest first (the replay slice).

Offsets grow by one per stored event on a bus, so the ring holds a contiguous run ``(floor, head]``: ``floor`` is
the newest offset no longer held (0 while nothing was dropped), ``head`` the newest offset seen. Events with
offset 0 (live-only heartbeats) are never kept. The memory bus keeps its history here; the remote node mirrors
a remote bus's history into one.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable, Iterable

from nexus.events import Event


class History:
    """The newest stored events of one epoch (at most ``max_events``, at most ``max_bytes``), in offset order."""

    def __init__(self, max_events: int, *, max_bytes: int | None = None, epoch: str = "", head: int = 0) -> None:
        if max_events < 1:
            raise ValueError("a history holds at least one event")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("a history holds at least one byte")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.epoch = epoch
        self.head = head
        self.floor = head
        self.bytes = 0
        """The summed :meth:`Event.size` of the held events."""
        self._ring: deque[Event] = deque()

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def first_offset(self) -> int:
        """The oldest offset still held (``head + 1`` when none is)."""
        return self._ring[0].offset if self._ring else self.head + 1

    def append(self, event: Event) -> bool:
        """Keep a stored event; returns False (and keeps nothing) for one at or below the head, or unstored.

        The oldest events are dropped while the ring holds more than ``max_events`` or ``max_bytes`` (the newest
        event always stays); ``floor`` moves up to the newest dropped.
        """
        offset = event.offset
        if offset <= self.head:
            return False
        ring = self._ring
        if ring and offset != self.head + 1:
            # A jump (events this history never saw): what it holds no longer runs up to the head.
            ring.clear()
            self.bytes = 0
            self.floor = offset - 1
        elif not ring:
            self.floor = offset - 1
        ring.append(event)
        self.head = offset
        if self.max_bytes is None:
            while len(ring) > self.max_events:
                self.floor = ring.popleft().offset
            return True
        self.bytes += event.size()
        while len(ring) > 1 and (len(ring) > self.max_events or self.bytes > self.max_bytes):
            dropped = ring.popleft()
            self.bytes -= dropped.size()
            self.floor = dropped.offset
        return True

    def extend(self, events: Iterable[Event]) -> list[Event]:
        """Keep every new stored event of ``events``; returns those that were new (in order)."""
        return [event for event in events if self.append(event)]

    def recovered(self, since_offset: int, epoch: str | None) -> bool:
        """Whether every stored event after ``since_offset`` of ``epoch`` is still held (or there is none yet)."""
        if epoch and epoch != self.epoch:
            return False
        return self.floor <= since_offset <= self.head

    def after(self, since_offset: int, wants: Callable[[Event], bool] | None = None) -> list[Event]:
        """The held events after ``since_offset``, oldest first; only those ``wants`` selects, when given."""
        ring = self._ring
        if not ring or since_offset >= self.head:
            return []
        start = max(0, since_offset - ring[0].offset + 1)
        if start < len(ring) and ring[start].offset != since_offset + 1:  # pragma: no cover - contiguous ring
            start = bisect.bisect_right(ring, since_offset, key=lambda event: event.offset)
        selected = itertools.islice(ring, start, None)
        if wants is None:
            return list(selected)
        return [event for event in selected if wants(event)]

    def reset(self, epoch: str, head: int) -> None:
        """Start another history (the one the offsets referred to is gone): nothing held, ``floor = head``."""
        self._ring.clear()
        self.bytes = 0
        self.epoch = epoch
        self.head = self.floor = head

    def events(self) -> list[Event]:
        """Every held event, oldest first."""
        return list(self._ring)
