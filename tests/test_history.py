"""The history ring behind replay, tested without an event loop."""

from __future__ import annotations

import gc
from collections import deque

import pytest

from nexus.events import Event
from nexus.history import CHUNK_ITEMS, CHUNK_WEIGHT, ChunkedQueue, History


def stored(offset: int, event_type: str = "demo:thing:v1:made") -> Event:
    return Event.create(event_type, {"n": offset}).stored(offset, "epoch-a")


def fill(history: History, first: int, last: int) -> None:
    for offset in range(first, last + 1):
        assert history.append(stored(offset))


def test_an_empty_history_recovers_only_from_its_head() -> None:
    """Nothing stored yet: resuming from 0 is exact, anything ahead of the head is not."""
    history = History(3, epoch="epoch-a")
    assert history.recovered(0, "epoch-a")
    assert history.recovered(0, None)
    assert not history.recovered(1, "epoch-a")
    assert history.after(0) == []
    assert history.first_offset == 1


def test_replay_slices_what_came_after_an_offset() -> None:
    """after(n) holds every held event with an offset above n, oldest first."""
    history = History(10, epoch="epoch-a")
    fill(history, 1, 5)
    assert [e.offset for e in history.after(2)] == [3, 4, 5]
    assert [e.offset for e in history.after(0)] == [1, 2, 3, 4, 5]
    assert history.after(5) == []
    assert [e.offset for e in history.after(1, lambda e: e.offset % 2 == 0)] == [2, 4]


def test_a_full_ring_drops_the_oldest_and_refuses_to_replay_across_the_gap() -> None:
    """Past max_events the oldest go; an offset whose successor is gone is no longer recoverable."""
    history = History(3, epoch="epoch-a")
    fill(history, 1, 5)
    assert len(history) == 3
    assert history.first_offset == 3
    assert history.floor == 2
    assert history.recovered(2, "epoch-a")
    assert not history.recovered(1, "epoch-a")
    assert [e.offset for e in history.after(2)] == [3, 4, 5]


def test_another_epoch_or_an_offset_ahead_is_never_recovered() -> None:
    """Offsets of another history, or ones the history never reached, are refused."""
    history = History(3, epoch="epoch-a")
    fill(history, 1, 2)
    assert not history.recovered(1, "epoch-b")
    assert not history.recovered(3, "epoch-a")
    assert history.recovered(1, "")


def test_old_repeated_and_unstored_events_are_not_kept() -> None:
    """An event at or below the head (a repeat) or with offset 0 (a heartbeat) is not appended."""
    history = History(5, epoch="epoch-a")
    fill(history, 1, 2)
    assert not history.append(stored(2))
    assert not history.append(Event.create("demo:thing:v1:heartbeat"))
    assert [e.offset for e in history.events()] == [1, 2]
    assert [e.offset for e in history.extend([stored(2), stored(3), stored(4)])] == [3, 4]


def test_a_jump_starts_the_held_run_again() -> None:
    """A history that missed offsets (a jump) only vouches for what follows the jump."""
    history = History(10, epoch="epoch-a")
    fill(history, 1, 3)
    assert history.append(stored(7))
    assert history.floor == 6
    assert not history.recovered(3, "epoch-a")
    assert history.recovered(6, "epoch-a")
    assert [e.offset for e in history.after(0)] == [7]


def test_a_history_mirrored_from_an_offset_starts_there() -> None:
    """A mirror that starts at head N vouches for resumes from N on, and resets to a new epoch."""
    history = History(10, epoch="epoch-a", head=40)
    assert history.recovered(40, "epoch-a")
    assert not history.recovered(39, "epoch-a")
    history.append(stored(41))
    assert [e.offset for e in history.after(40)] == [41]
    history.reset("epoch-b", 3)
    assert history.epoch == "epoch-b"
    assert len(history) == 0
    assert history.recovered(3, "epoch-b")
    assert not history.recovered(41, "epoch-a")


def test_a_history_holds_at_least_one_event() -> None:
    """max_events or max_bytes below 1 is refused, saying which; a bound of one is allowed."""
    with pytest.raises(ValueError, match=r"^a history holds at least one event$"):
        History(0)
    with pytest.raises(ValueError, match=r"^a history holds at least one byte$"):
        History(10, max_bytes=0)
    history = History(1, max_bytes=1, epoch="epoch-a")
    fill(history, 1, 2)
    assert [event.offset for event in history.events()] == [2]


def test_a_history_holds_events_up_to_exactly_its_byte_bound() -> None:
    """Events whose sizes add up to exactly ``max_bytes`` are all held; one more drops the oldest."""
    events = [stored(offset) for offset in (1, 2, 3)]
    history = History(10, max_bytes=events[0].size() + events[1].size(), epoch="epoch-a")
    for event in events[:2]:
        history.append(event)
    assert ([event.offset for event in history.events()], history.bytes) == ([1, 2], history.max_bytes)
    history.append(events[2])
    assert [event.offset for event in history.events()] == [2, 3]


def test_a_history_bounded_by_bytes_drops_the_oldest_past_the_bound() -> None:
    """max_bytes bounds the summed event sizes: the oldest go first, the newest always stays."""
    big = "x" * 1000
    history = History(1000, max_bytes=3500, epoch="epoch-a")
    for offset in range(1, 6):
        assert history.append(Event.create("demo:thing:v1:made", {"b": big}).stored(offset, "epoch-a"))
    assert [e.offset for e in history.events()] == [3, 4, 5]
    assert history.bytes <= 3500
    assert history.floor == 2
    assert not history.recovered(1, "epoch-a")
    huge = Event.create("demo:thing:v1:made", {"b": "y" * 10_000}).stored(6, "epoch-a")
    history.append(huge)
    assert [e.offset for e in history.events()] == [6]


def test_a_replayed_event_keeps_every_field() -> None:
    """What comes back from the ring equals what was stored: type, id, unicode payload, metadata, timestamp,
    offset, epoch and size."""
    history = History(10, max_bytes=100_000, epoch="epoch-a")
    payload = {
        "text": "héllo wörld ✓ 日本語 🎉",
        "nested": {"list": [1, 2.5, -0.0, True, False, None, "x"], "deep": {"n": 2**60, "big": 2**80}},
        "empty": {},
        "quote": 'a "quoted" \\ back\nslash\x00',
    }
    metadata = {"user_id": "ünïcode-用户", "correlation_id": "c-1", "traceparent": "00-abc-def-01"}
    original = Event.create("demo:thing:v1:made", payload, event_id="id-ü-1", metadata=metadata)
    stored_event = original.stored(1, "epoch-a")
    plain = Event.create("demo:thing:v2:made").stored(2, "epoch-a")
    assert history.append(stored_event)
    assert history.append(plain)
    replayed, replayed_plain = history.after(0)
    assert replayed == stored_event
    assert replayed_plain == plain
    assert (replayed.offset, replayed.epoch, replayed.timestamp) == (1, "epoch-a", original.timestamp)
    assert replayed.payload["nested"]["deep"]["n"] == 2**60
    assert replayed.size() == original.size()
    assert replayed.payload_json() == original.payload_json()
    assert history.bytes == original.size() + plain.size()


def test_an_event_of_another_epoch_comes_back_with_its_own_epoch() -> None:
    """A history fed events stored under another epoch (a relay mirroring a server whose epoch it has not taken
    yet) gives each back with the epoch it was stored in, not its own."""
    history = History(10, epoch="epoch-a")
    other = Event.create("demo:thing:v1:made", {"n": 1}).stored(1, "epoch-b")
    assert history.append(other)
    assert history.append(stored(2))
    assert [(e.offset, e.epoch) for e in history.after(0)] == [(1, "epoch-b"), (2, "epoch-a")]
    assert history.after(0)[0] == other


def test_a_history_made_without_an_epoch_has_none_until_given_one() -> None:
    """A relay's history starts with no epoch (""): that is how it knows it never mirrored a server yet."""
    history = History(5)
    assert history.epoch == ""
    assert not history.recovered(0, "epoch-a")
    history.reset("epoch-a", 7)
    assert (history.epoch, history.head) == ("epoch-a", 7)


def test_an_event_that_cannot_be_encoded_is_kept_as_it_is() -> None:
    """An event built without the edge's checks (a payload holding no JSON value) is still kept and replayed."""
    history = History(10, epoch="epoch-a")
    thing = object()
    odd = Event("demo:thing:v1:made", {"thing": thing}, "odd", {}).stored(1, "epoch-a")
    assert history.append(odd)
    assert history.append(stored(2))
    assert [e.event_id for e in history.after(0)] == ["odd", history.after(1)[0].event_id]
    assert history.after(0)[0].payload["thing"] is thing
    assert [e.event_id for e in history.after(0, types=lambda event_type: event_type.endswith(":made"))] == [
        "odd",
        history.after(1)[0].event_id,
    ]


def test_a_filtered_replay_decodes_only_the_types_selected() -> None:
    """With a type filter, the replay holds only matching events, and events of other types never reach wants."""
    history = History(100, epoch="epoch-a")
    for offset in range(1, 21):
        history.append(stored(offset, "demo:keep:v1:made" if offset % 4 == 0 else "demo:skip:v1:made"))
    seen: list[str] = []

    def wants(event: Event) -> bool:
        seen.append(event.event_type)
        return event.offset != 8

    replayed = history.after(2, wants, types=lambda event_type: event_type.startswith("demo:keep:"))
    assert [e.offset for e in replayed] == [4, 12, 16, 20]
    assert set(seen) == {"demo:keep:v1:made"}
    assert [e.offset for e in history.after(10, types=lambda event_type: "keep" in event_type)] == [12, 16, 20]


def test_the_byte_count_follows_what_is_held() -> None:
    """bytes is the summed Event.size() of exactly the events still held, as events come and go."""
    history = History(4, max_bytes=10_000, epoch="epoch-a")
    for offset in range(1, 10):
        history.append(Event.create("demo:thing:v1:made", {"s": "é" * offset}).stored(offset, "epoch-a"))
        assert history.bytes == sum(event.size() for event in history.events())
    assert [e.offset for e in history.events()] == [6, 7, 8, 9]
    history.reset("epoch-b", 9)
    assert (history.bytes, len(history)) == (0, 0)


def test_a_chunked_queue_is_first_in_first_out_across_chunks() -> None:
    """Values come out in the order they went in, whether taken from sealed chunks or the open one, and
    iter_from starts at any position."""
    queue: ChunkedQueue[str] = ChunkedQueue()
    expected: deque[str] = deque()
    for round_ in range(3):
        for n in range(CHUNK_ITEMS * 2 + 7):
            queue.append(f"{round_}-{n}")
            expected.append(f"{round_}-{n}")
        for _ in range(CHUNK_ITEMS + 3 + round_ * 50):
            assert queue.popleft() == expected.popleft()
        assert len(queue) == len(expected)
        assert list(queue) == list(expected)
        for start in (0, 1, CHUNK_ITEMS - 1, CHUNK_ITEMS, len(expected) - 1, len(expected)):
            assert list(queue.iter_from(start)) == list(expected)[start:]
    while expected:
        assert queue.popleft() == expected.popleft()
    assert len(queue) == 0
    assert list(queue) == []
    with pytest.raises(IndexError):
        queue.popleft()
    queue.append("again")
    assert list(queue) == ["again"]


def test_a_chunked_queue_lets_heavy_values_go_with_their_chunk() -> None:
    """Values whose weight fills a chunk are sealed alone, so taking one lets it go at once (a history bounded
    by bytes never keeps megabytes it dropped)."""
    queue: ChunkedQueue[bytes] = ChunkedQueue()
    heavy = [bytes([n]) * CHUNK_WEIGHT for n in range(4)]
    light = [b"%d" % n for n in range(CHUNK_ITEMS)]
    for value in heavy + light:
        queue.append(value, len(value))
    assert any(value is heavy[0] for value in _reachable(queue))
    assert queue.popleft() is heavy[0]
    assert not any(value is heavy[0] for value in _reachable(queue))
    assert list(queue) == heavy[1:] + light


def _reachable(root: object) -> list[object]:
    """Every object ``root`` holds, directly or through the containers it holds."""
    found: list[object] = []
    pending = list(gc.get_referents(root))
    while pending:
        item = pending.pop()
        found.append(item)
        if isinstance(item, (list, tuple, deque)):
            pending.extend(item)
    return found


def test_a_replay_counts_down_as_it_is_read() -> None:
    """len(replay) is what is left to read: a subscriber knows when the history it asked for is all taken."""
    history = History(10, epoch="e1")
    for n in range(5):
        history.append(Event.create("demo:a:v1:s", {"n": n}).stored(n + 1, "e1"))
    replay = history.replay(1)
    assert len(replay) == 4
    assert [event.offset for event in replay.take(3)] == [2, 3, 4]
    assert len(replay) == 1
    assert [event.offset for event in replay.take(3)] == [5]
    assert len(replay) == 0
    assert replay.take(3) == []


def test_popping_an_empty_queue_says_so() -> None:
    """ChunkedQueue.popleft on an empty queue raises IndexError with a message, like a deque."""
    queue: ChunkedQueue[str] = ChunkedQueue()
    queue.append("a")
    assert queue.popleft() == "a"
    with pytest.raises(IndexError, match=r"^pop from an empty queue$"):
        queue.popleft()
