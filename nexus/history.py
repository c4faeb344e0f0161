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

Storage: a held event is one :data:`Record`, an immutable ``bytes`` object (:func:`pack`): its offset, size and
type, then its id, timestamp, metadata and payload (``marshal``). Bytes hold no references, so the garbage
collector never walks a retained event (a full history of ``Event`` objects with their payload and metadata
dicts made every full collection tens of milliseconds long), and the records sit in sealed tuple chunks
(:class:`ChunkedQueue`) that it does not walk either. A 200-byte payload costs about 500 bytes held (history and
dedupe window) instead of 1.3 KB. A held event is decoded back into an :class:`Event` (:func:`unpack`) only when
replayed; live delivery never reads the ring. The type is read from a record's front without decoding the rest,
so a replay filtered by pattern decodes only the events it selects. An event that cannot be packed (one built
without the edge's checks, holding something other than JSON values) is held as the ``Event`` itself.
"""

from __future__ import annotations

import itertools
import json
import marshal
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Final, Generic, TypeVar, cast

from nexus.errors import InvalidPayload
from nexus.events import Event

Record = bytes | Event
"""One held event: packed bytes (:func:`pack`), or the ``Event`` itself when it cannot be packed."""

_PREFIX: Final = struct.Struct("<QQHI")
"""offset, size, the length of the event type that follows, and the length of the ``marshal`` part after it: read
without decoding the rest."""
_TYPE_AT: Final = _PREFIX.size
_set: Final = object.__setattr__
"""Sets a cache field of a frozen :class:`Event` (values derived from its fields)."""


def pack(event: Event) -> Record:
    """``event`` as one immutable bytes record (its epoch is the holder's), or ``event`` itself when it cannot be
    packed: a payload or metadata holding something other than JSON values.

    The record: offset, size, the type's length, the length of the next part, the type (UTF-8), ``marshal`` of
    the id, timestamp and metadata, then the payload's compact JSON, which the event already carries
    (:meth:`Event.payload_json`): storing an event encodes nothing again, and a replayed event carries its
    payload's JSON for the encoders that send it.
    """
    try:
        type_bytes = event.event_type.encode()
        head = marshal.dumps((event.event_id, event.timestamp, event.metadata), 4)
        return b"".join(
            (
                _PREFIX.pack(event.offset, event.size(), len(type_bytes), len(head)),
                type_bytes,
                head,
                event.payload_json(),
            )
        )
    except (InvalidPayload, ValueError, TypeError, struct.error, UnicodeError):
        return event


def unpack(record: Record, epoch: str) -> Event:
    """The :class:`Event` a record holds, stored in ``epoch`` (its size and payload JSON kept, not made again)."""
    if not isinstance(record, bytes):
        return record  # an Event held as it is
    offset, size, type_length, head_length = _PREFIX.unpack_from(record)
    body = _TYPE_AT + type_length
    rest = body + head_length
    event_id, timestamp, metadata = marshal.loads(memoryview(record)[body:rest])
    payload_json = record[rest:]
    event = Event(
        record[_TYPE_AT:body].decode(), json.loads(payload_json), event_id, metadata, timestamp, offset, epoch
    )
    _set(event, "_size", size)
    _set(event, "_payload_json", payload_json)
    return event


def record_type(record: Record) -> str:
    """The type of the event a record holds (without decoding the rest)."""
    if isinstance(record, bytes):
        return record[_TYPE_AT : _TYPE_AT + _PREFIX.unpack_from(record)[2]].decode()
    return record.event_type


def record_size(record: Record) -> int:
    """:meth:`Event.size` of the event a record holds."""
    if isinstance(record, bytes):
        size: int = _PREFIX.unpack_from(record)[1]
        return size
    return record.size()


T = TypeVar("T")

CHUNK_ITEMS: Final = 256
CHUNK_WEIGHT: Final = 64 * 1024


class ChunkedQueue(Generic[T]):
    """A first-in first-out queue of immutable values (bytes, str) that the garbage collector does not walk.

    Every full collection visits each value a deque or a list holds, touching each one's memory: 8 ms for the
    200,000 values of a full history and dedupe window. Here values are sealed into tuples of
    :data:`CHUNK_ITEMS` (or fewer once their summed ``weight`` reaches :data:`CHUNK_WEIGHT`): the collector
    stops tracking a tuple of untracked values the first time it sees it, so it walks only the chunks' deque and
    the open chunk. A value taken from the front of a sealed chunk stays referenced until its whole chunk is
    taken: at most :data:`CHUNK_ITEMS` values of at most :data:`CHUNK_WEIGHT` plus one value.
    """

    __slots__ = ("_len", "_open", "_open_weight", "_sealed", "_skip")

    def __init__(self) -> None:
        self._sealed: deque[tuple[T | None, ...]] = deque()
        self._open: list[T | None] = []
        self._open_weight = 0
        self._skip = 0
        """Values already taken from the front chunk (the oldest sealed one, else the open one)."""
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, value: T, weight: int = 0) -> None:
        """Add ``value`` at the back; ``weight`` (its bytes) seals a chunk early."""
        chunk = self._open
        chunk.append(value)
        self._len += 1
        self._open_weight += weight
        if len(chunk) >= CHUNK_ITEMS or self._open_weight >= CHUNK_WEIGHT:
            self._sealed.append(tuple(chunk))
            chunk.clear()
            self._open_weight = 0

    def popleft(self) -> T:
        """Take the value at the front."""
        if not self._len:
            raise IndexError("pop from an empty queue")
        self._len -= 1
        skip = self._skip
        if self._sealed:
            front = self._sealed[0]
            value = front[skip]
            if skip + 1 == len(front):
                self._sealed.popleft()
                self._skip = 0
            else:
                self._skip = skip + 1
        else:
            value = self._open[skip]
            self._open[skip] = None  # a list can let go at once
            if self._len:
                self._skip = skip + 1
            else:
                self.clear()
        return cast(T, value)

    def iter_from(self, start: int) -> Iterator[T]:
        """The values from the ``start``-th (0 is the front) to the back."""
        skip = self._skip + max(0, start)
        for chunk in itertools.chain(self._sealed, (self._open,)):
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield from cast(Iterable[T], itertools.islice(chunk, skip, None))
            skip = 0

    def __iter__(self) -> Iterator[T]:
        return self.iter_from(0)

    def clear(self) -> None:
        """Take every value."""
        self._sealed.clear()
        self._open.clear()
        self._open_weight = 0
        self._skip = 0
        self._len = 0


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
        """The summed :meth:`Event.size` of the held events (counted when ``max_bytes`` is set)."""
        self._ring: ChunkedQueue[Record] = ChunkedQueue()
        """Offsets ``floor + 1 .. head``, in order."""

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def first_offset(self) -> int:
        """The oldest offset still held (``head + 1`` when none is)."""
        return self.floor + 1 if self._ring else self.head + 1

    def append(self, event: Event) -> bool:
        """Keep a stored event; returns False (and keeps nothing) for one at or below the head, or unstored.

        The oldest events are dropped while the ring holds more than ``max_events`` or ``max_bytes`` (the newest
        event always stays); ``floor`` moves up to the newest dropped.
        """
        return self.keep(event) is not None

    def keep(self, event: Event) -> Record | None:
        """:meth:`append`, returning the record kept (None when nothing was): what the dedupe window shares."""
        offset = event.offset
        head = self.head
        if offset <= head:
            return None
        ring = self._ring
        if offset != head + 1 or not ring:
            # The first event, or a jump (events this history never saw): what it held no longer runs up to it.
            self._clear()
            self.floor = offset - 1
        record = pack(event) if event.epoch == self.epoch else event
        size = event.size()  # measured once: pack() kept it on the event
        ring.append(record, size)
        self.head = offset
        max_bytes = self.max_bytes
        if max_bytes is None:
            while len(ring) > self.max_events:
                ring.popleft()
                self.floor += 1
            return record
        self.bytes += size
        while len(ring) > 1 and (len(ring) > self.max_events or self.bytes > max_bytes):
            self.bytes -= record_size(ring.popleft())
            self.floor += 1
        return record

    def extend(self, events: Iterable[Event]) -> list[Event]:
        """Keep every new stored event of ``events``; returns those that were new (in order)."""
        return [event for event in events if self.append(event)]

    def recovered(self, since_offset: int, epoch: str | None) -> bool:
        """Whether every stored event after ``since_offset`` of ``epoch`` is still held (or there is none yet)."""
        if epoch and epoch != self.epoch:
            return False
        return self.floor <= since_offset <= self.head

    def after(
        self,
        since_offset: int,
        wants: Callable[[Event], bool] | None = None,
        *,
        types: Callable[[str], bool] | None = None,
    ) -> list[Event]:
        """The held events after ``since_offset``, oldest first; only those ``wants`` selects, when given.

        ``types``: a cheaper first filter on the event type alone (a pattern match), applied before an event is
        decoded; give it only when ``wants`` never selects an event whose type it refuses.
        """
        replay = self.replay(since_offset, types=types)
        events = replay.take(len(replay))
        if wants is None:
            return events
        return [event for event in events if wants(event)]

    def replay(self, since_offset: int, *, types: Callable[[str], bool] | None = None) -> Replay:
        """The held events after ``since_offset`` as a :class:`Replay`: taken now (a snapshot), decoded as they are
        read, so a long replay never holds the caller up while every event is decoded.

        ``types``: a filter on the event type alone, applied now (it is cheap: no event is decoded).
        """
        ring = self._ring
        if not ring or since_offset >= self.head:
            return Replay([], self.epoch)
        selected = ring.iter_from(max(0, since_offset - self.floor))
        records = list(selected) if types is None else [record for record in selected if types(record_type(record))]
        return Replay(records, self.epoch)

    def reset(self, epoch: str, head: int) -> None:
        """Start another history (the one the offsets referred to is gone): nothing held, ``floor = head``."""
        self._clear()
        self.epoch = epoch
        self.head = self.floor = head

    def _clear(self) -> None:
        self._ring.clear()
        self.bytes = 0

    def events(self) -> list[Event]:
        """Every held event, oldest first."""
        return self.after(self.floor)


class Replay:
    """Held events taken from a :class:`History` at one moment, decoded only as they are read (:meth:`take`)."""

    __slots__ = ("_epoch", "_next", "_records")

    def __init__(self, records: list[Record], epoch: str) -> None:
        self._records = records
        self._epoch = epoch
        self._next = 0

    def __len__(self) -> int:
        """Events not read yet."""
        return len(self._records) - self._next

    def take(self, count: int) -> list[Event]:
        """Decode and return the next ``count`` events at most (oldest first)."""
        start = self._next
        end = min(len(self._records), start + count)
        epoch = self._epoch
        events = [unpack(record, epoch) for record in self._records[start:end]]
        self._next = end
        if end == len(self._records):
            self._records = []
            self._next = 0
        return events
