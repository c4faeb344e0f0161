"""The embedded memory bus: offsets, epochs, dedupe, batched delivery, replay, slow consumers and groups."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterable, Sequence

import anyio
import pytest

from nexus import Event, InvalidPattern
from nexus.bus import MemoryBus, Subscription
from nexus.bus.memory import DedupeWindow
from nexus.bus.turns import PUBLISH_BUDGET
from nexus.errors import BusUnavailable, SlowConsumer


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    """A started memory bus, closed after the test."""
    instance = MemoryBus()
    await instance.start()
    yield instance
    await instance.close()


def _event(event_type: str = "demo:echo:v1:created", **payload: int) -> Event:
    return Event.create(event_type, payload)


async def _publish(bus: MemoryBus, types: Iterable[str]) -> list[Event]:
    return [(await bus.publish(_event(event_type, n=n))).event for n, event_type in enumerate(types)]


async def _collect(sub: Subscription, count: int) -> list[Event]:
    """Take events until ``count`` arrived (or fail after a generous guard)."""
    events: list[Event] = []
    with anyio.fail_after(5):
        while len(events) < count:
            batch = await sub.next_batch()
            assert batch, "subscription closed early"
            events.extend(batch)
    return events


async def _flush() -> None:
    """Let the bus run its pending delivery callback."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


# --- storing --------------------------------------------------------------------------------------------------


async def test_offsets_start_at_one_and_grow_by_one(bus: MemoryBus) -> None:
    """Stored events get offsets 1, 2, 3, ... in publish order, all in the bus's epoch."""
    assert await bus.head_offset() == 0
    stored = await _publish(bus, ["demo:echo:v1:created"] * 5)
    assert [event.offset for event in stored] == [1, 2, 3, 4, 5]
    assert {event.epoch for event in stored} == {bus.epoch}
    assert await bus.head_offset() == 5
    assert [event.offset for event in bus.history()] == [1, 2, 3, 4, 5]
    assert [event.offset for event in bus.history(3)] == [4, 5]


async def test_epoch_differs_between_instances() -> None:
    """Two memory buses (a restart) have different epochs."""
    first, second = MemoryBus(), MemoryBus()
    assert first.epoch
    assert first.epoch != second.epoch


async def test_publish_returns_the_stored_event(bus: MemoryBus) -> None:
    """publish returns the event as stored: same id, payload and metadata, plus offset and epoch."""
    event = Event.create("demo:echo:v1:requested", {"a": [1, 2]}, event_id="e1", metadata={"user_id": "u"})
    published = await bus.publish(event)
    assert published.duplicate is False
    stored = published.event
    assert (stored.event_id, stored.event_type, stored.payload) == ("e1", "demo:echo:v1:requested", {"a": [1, 2]})
    assert stored.metadata == {"user_id": "u"}
    assert stored.timestamp == event.timestamp
    assert (stored.offset, stored.epoch) == (1, bus.epoch)
    assert bus.history() == [stored]


async def test_duplicate_id_returns_original(bus: MemoryBus) -> None:
    """Publishing an event id again inside the window returns the stored original and stores nothing."""
    sub = await bus.subscribe([">"])
    first = await bus.publish(Event.create("demo:echo:v1:created", {"v": 1}, event_id="same"))
    again = await bus.publish(Event.create("demo:echo:v1:created", {"v": 2}, event_id="same"))
    assert again.duplicate is True
    assert again.event == first.event
    assert again.event.payload == {"v": 1}
    assert (await bus.publish(Event.create("demo:echo:v1:created", {"v": 4}, event_id="same"))).duplicate
    assert await bus.head_offset() == 1
    other = await bus.publish(Event.create("demo:echo:v1:created", {"v": 3}, event_id="different"))
    assert (other.duplicate, other.event.offset) == (False, 2)
    assert [event.event_id for event in await _collect(sub, 2)] == ["same", "different"]
    await _flush()
    assert sub.take_nowait() == []
    stats = bus.stats()
    assert (stats.duplicates, stats.published, stats.head_offset, stats.epoch) == (2, 2, 2, bus.epoch)


async def test_dedupe_window_expires() -> None:
    """With an injected clock, an id repeated inside the window is a duplicate and outside it is stored again."""
    now = [1000.0]
    bus = MemoryBus(dedupe_window_s=120.0, clock=lambda: now[0])
    await bus.start()
    first = await bus.publish(Event.create("demo:echo:v1:created", event_id="id"))
    now[0] += 119.0
    inside = await bus.publish(Event.create("demo:echo:v1:created", event_id="id"))
    assert inside.duplicate
    assert inside.event.offset == first.event.offset == 1
    now[0] += 2.0
    outside = await bus.publish(Event.create("demo:echo:v1:created", event_id="id"))
    assert not outside.duplicate
    assert outside.event.offset == 2
    now[0] += 60.0
    assert (await bus.publish(Event.create("demo:echo:v1:created", event_id="id"))).duplicate
    await bus.close()


async def test_the_dedupe_window_holds_at_most_dedupe_max_entries_ids() -> None:
    """Past ``dedupe_max_entries`` ids the oldest is forgotten: its id is stored again, the newer ones are still
    duplicates."""
    bus = MemoryBus(dedupe_max_entries=2)
    await bus.start()
    for event_id in ("a", "b", "c"):
        await bus.publish(Event.create("demo:echo:v1:created", event_id=event_id))
    assert (await bus.publish(Event.create("demo:echo:v1:created", event_id="c"))).duplicate
    again = await bus.publish(Event.create("demo:echo:v1:created", event_id="a"))
    assert (again.duplicate, again.event.offset) == (False, 4)
    await bus.close()


async def test_dedupe_disabled_with_zero_window() -> None:
    """A zero dedupe window stores every publish, even with a repeated id."""
    bus = MemoryBus(dedupe_window_s=0)
    await bus.start()
    await bus.publish(Event.create("demo:echo:v1:created", event_id="id"))
    second = await bus.publish(Event.create("demo:echo:v1:created", event_id="id"))
    assert (second.duplicate, second.event.offset) == (False, 2)
    await bus.close()


async def test_history_ring_is_bounded() -> None:
    """The history keeps only the newest ``history_size`` events; offsets keep counting."""
    bus = MemoryBus(history_size=3)
    await bus.start()
    await _publish(bus, ["demo:echo:v1:created"] * 7)
    assert [event.offset for event in bus.history()] == [5, 6, 7]
    assert bus.first_offset == 5
    assert bus.stats().head_offset == 7
    await bus.close()


# --- subscribing ----------------------------------------------------------------------------------------------


async def test_subscribe_gets_matching_events_in_order(bus: MemoryBus) -> None:
    """A subscriber receives exactly the events its patterns match, in publish order."""
    sub = await bus.subscribe(["demo:*:v1:created", "places:>"])
    types = ["demo:a:v1:created", "other:a:v1:created", "places:x:v2:moved", "demo:a:v1:deleted"] * 10
    stored = await _publish(bus, types)
    expected = [event for event in stored if not event.event_type.startswith(("other", "demo:a:v1:deleted"))]
    received = await _collect(sub, len(expected))
    assert received == expected
    await _flush()
    assert sub.take_nowait() == []


def _count_pushes(sub: Subscription, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the batches the bus hands ``sub``, as it hands them."""
    pushes: list[int] = []
    push = sub.push

    def counting_push(events: Sequence[Event], *, replay: bool = False) -> None:
        pushes.append(len(events))
        push(events, replay=replay)

    monkeypatch.setattr(sub, "push", counting_push)
    return pushes


async def test_burst_arrives_in_few_batches(bus: MemoryBus, monkeypatch: pytest.MonkeyPatch) -> None:
    """500 publishes in one loop turn reach a subscriber as a handful of batches, not one per event."""
    sub = await bus.subscribe([">"])
    pushes = _count_pushes(sub, monkeypatch)
    for n in range(500):
        await bus.publish(_event(n=n))
    batches: list[list[Event]] = []
    with anyio.fail_after(5):
        while sum(len(batch) for batch in batches) < 500:
            batches.append(await sub.next_batch())
    assert len(batches) < 10
    assert len(pushes) < 10
    assert sum(pushes) == 500
    assert [event.payload["n"] for batch in batches for event in batch] == list(range(500))


async def test_a_publisher_in_a_tight_loop_lets_the_subscriber_take_every_budget_publishes(
    bus: MemoryBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publisher that awaits nothing else yields to the event loop once every PUBLISH_BUDGET publishes: its
    subscribers get the burst in batches of that size while it goes on, not all of it at the end (when their queues
    would already have overflowed)."""
    sub = await bus.subscribe([">"])
    pushes = _count_pushes(sub, monkeypatch)
    total = 7 * PUBLISH_BUDGET + 52
    for n in range(total):
        await bus.publish(_event(n=n))
    assert pushes == [PUBLISH_BUDGET] * 7  # the rest is delivered once the publisher gives the loop a turn
    taken = await _collect(sub, total)
    assert pushes == [PUBLISH_BUDGET] * 7 + [52]
    assert [event.payload["n"] for event in taken] == list(range(total))


async def test_publish_many_stores_in_order(bus: MemoryBus) -> None:
    """publish_many stores several events with consecutive offsets and delivers them in order."""
    sub = await bus.subscribe([">"])
    results = await bus.publish_many([_event(n=n) for n in range(4)])
    assert [result.event.offset for result in results] == [1, 2, 3, 4]
    assert [event.payload["n"] for event in await _collect(sub, 4)] == [0, 1, 2, 3]


async def test_subscribe_starts_live_from_now(bus: MemoryBus) -> None:
    """Without since_offset, a subscriber sees only events stored after it subscribed, even unflushed ones."""
    await bus.publish(_event(n=0))
    sub = await bus.subscribe([">"])
    await bus.publish(_event(n=1))
    received = await _collect(sub, 1)
    await _flush()
    received += sub.take_nowait()
    assert [event.payload["n"] for event in received] == [1]
    assert sub.recovered is None


async def test_a_subscriber_sees_only_what_it_may_see(bus: MemoryBus) -> None:
    """Events its ``visible`` check refuses never reach a subscriber, live or replayed; the rest arrive in order."""

    def visible(event: Event) -> bool:
        return event.metadata.get("to", "u1") == "u1"

    live = await bus.subscribe([">"], visible=visible)
    for n, audience in enumerate(["u1", "u2", "u1", "u2"]):
        await bus.publish(Event.create("demo:echo:v1:created", {"n": n}, metadata={"to": audience}))
    marker = (await bus.publish(_event(n=9))).event
    assert [event.payload["n"] for event in await _collect(live, 3)] == [0, 2, 9]
    replay = await bus.subscribe([">"], epoch=bus.epoch, visible=visible)
    assert [event.offset for event in await _collect(replay, 3)] == [1, 3, marker.offset]


async def test_invalid_pattern_registers_nothing(bus: MemoryBus) -> None:
    """A subscription with one invalid pattern raises InvalidPattern and registers no subscriber."""
    with pytest.raises(InvalidPattern):
        await bus.subscribe(["demo:>", "bad:>:x"])
    assert bus.stats().subscribers == 0


async def test_add_and_remove_patterns(bus: MemoryBus) -> None:
    """Patterns added to or removed from a live subscription take effect for later events."""
    sub = await bus.subscribe(["a:>"])
    sub.add_patterns(["b:>"])
    await _publish(bus, ["a:x:v1:s", "b:x:v1:s", "c:x:v1:s"])
    assert [event.event_type for event in await _collect(sub, 2)] == ["a:x:v1:s", "b:x:v1:s"]
    sub.remove_patterns(["a:>"])
    await _publish(bus, ["a:x:v1:s", "b:x:v1:s"])
    assert [event.event_type for event in await _collect(sub, 1)] == ["b:x:v1:s"]
    await _flush()
    assert sub.take_nowait() == []
    with pytest.raises(InvalidPattern):
        sub.add_patterns(["ok:>", "A:>"])
    assert "ok:>" not in sub.patterns


# --- replay ---------------------------------------------------------------------------------------------------


async def test_replay_then_live_without_gap_or_duplicate(bus: MemoryBus) -> None:
    """since_offset replays matching stored events after it, then continues live with no gap and no duplicate."""
    types = ["demo:a:v1:s", "skip:a:v1:s"]
    before = await _publish(bus, types * 5)
    sub = await bus.subscribe(["demo:>"], since_offset=3, epoch=bus.epoch)
    assert sub.recovered is True
    after = await _publish(bus, types * 5)
    expected = [e.offset for e in before + after if e.event_type.startswith("demo") and e.offset > 3]
    received = await _collect(sub, len(expected))
    await _flush()
    received += sub.take_nowait()
    assert [event.offset for event in received] == expected


async def test_replay_covers_unflushed_events(bus: MemoryBus) -> None:
    """Events stored but not yet delivered when a replaying subscriber joins reach it exactly once."""
    await _publish(bus, ["demo:a:v1:s"] * 2)
    await _flush()
    await _publish(bus, ["demo:a:v1:s"] * 3)
    sub = await bus.subscribe([">"], since_offset=1)
    await _publish(bus, ["demo:a:v1:s"] * 2)
    received = await _collect(sub, 6)
    await _flush()
    received += sub.take_nowait()
    assert [event.offset for event in received] == [2, 3, 4, 5, 6, 7]


async def test_replay_does_not_count_against_max_pending(bus: MemoryBus) -> None:
    """Replayed history larger than max_pending does not make the subscriber a slow consumer."""
    await _publish(bus, ["demo:a:v1:s"] * 50)
    sub = await bus.subscribe([">"], since_offset=1, max_pending=5)
    await _publish(bus, ["demo:a:v1:s"] * 3)
    await _flush()
    received = await _collect(sub, 52)
    assert [event.offset for event in received] == list(range(2, 54))


async def test_recovered_none_without_offset(bus: MemoryBus) -> None:
    """A subscription that asks for no offset reports recovered None."""
    await _publish(bus, ["demo:a:v1:s"])
    assert (await bus.subscribe([">"])).recovered is None


async def test_recovered_true_at_head(bus: MemoryBus) -> None:
    """Resuming from the newest offset recovers with nothing to replay."""
    await _publish(bus, ["demo:a:v1:s"] * 3)
    sub = await bus.subscribe([">"], since_offset=3, epoch=bus.epoch)
    assert sub.recovered is True
    await _publish(bus, ["demo:a:v1:s"])
    assert [event.offset for event in await _collect(sub, 1)] == [4]


async def test_recovered_false_for_other_epoch(bus: MemoryBus) -> None:
    """An offset from another epoch (a lost history) is not replayed and says recovered False."""
    await _publish(bus, ["demo:a:v1:s"] * 3)
    sub = await bus.subscribe([">"], since_offset=1, epoch="another-epoch")
    assert sub.recovered is False
    await _publish(bus, ["demo:a:v1:s"])
    received = await _collect(sub, 1)
    await _flush()
    received += sub.take_nowait()
    assert [event.offset for event in received] == [4]


async def test_recovered_false_when_older_than_ring() -> None:
    """An offset whose gap has left the history ring says recovered False and continues live only."""
    bus = MemoryBus(history_size=3)
    await bus.start()
    await _publish(bus, ["demo:a:v1:s"] * 10)
    sub = await bus.subscribe([">"], since_offset=2, epoch=bus.epoch)
    assert sub.recovered is False
    edge = await bus.subscribe([">"], since_offset=7)
    assert edge.recovered is True
    await _publish(bus, ["demo:a:v1:s"])
    received = await _collect(sub, 1)
    await _flush()
    received += sub.take_nowait()
    assert [event.offset for event in received] == [11]
    assert [event.offset for event in await _collect(edge, 4)] == [8, 9, 10, 11]
    await bus.close()


async def test_recovered_false_when_ahead_of_head(bus: MemoryBus) -> None:
    """An offset beyond the newest stored event says recovered False."""
    await _publish(bus, ["demo:a:v1:s"] * 3)
    sub = await bus.subscribe([">"], since_offset=4)
    assert sub.recovered is False
    sub_far = await bus.subscribe([">"], since_offset=1000, epoch=bus.epoch)
    assert sub_far.recovered is False


# --- correlation ids ------------------------------------------------------------------------------------------


async def test_follow_correlation_id(bus: MemoryBus) -> None:
    """A subscriber following a correlation id gets that request's events, once, and no others."""
    sub = await bus.subscribe(["demo:a:v1:requested"], correlation_ids=["c1"])
    events = [
        Event.create("demo:a:v1:requested", event_id="c1"),
        Event.create("demo:a:v1:started", metadata={"correlation_id": "c1"}),
        Event.create("demo:a:v1:started", metadata={"correlation_id": "c2"}),
        Event.create("demo:a:v1:requested", metadata={"correlation_id": "c1"}),
        Event.create("other:b:v1:success", metadata={"correlation_id": "c1"}),
    ]
    for event in events:
        await bus.publish(event)
    received = await _collect(sub, 4)
    await _flush()
    received += sub.take_nowait()
    assert [event.offset for event in received] == [1, 2, 4, 5]


async def test_follow_and_unfollow_later(bus: MemoryBus) -> None:
    """Following a correlation id after subscribing works, and unfollowing stops it."""
    sub = await bus.subscribe([])
    sub.follow("c9")
    await bus.publish(Event.create("x:y:v1:stream", metadata={"correlation_id": "c9"}))
    assert len(await _collect(sub, 1)) == 1
    sub.unfollow("c9")
    await bus.publish(Event.create("x:y:v1:stream", metadata={"correlation_id": "c9"}))
    await _flush()
    assert sub.take_nowait() == []


async def test_replay_includes_followed_correlation(bus: MemoryBus) -> None:
    """Replay selects stored events by followed correlation id as well as by pattern."""
    await bus.publish(Event.create("x:y:v1:started", metadata={"correlation_id": "c1"}))
    await bus.publish(Event.create("x:y:v1:started", metadata={"correlation_id": "c2"}))
    await bus.publish(Event.create("x:y:v1:success", metadata={"correlation_id": "c2"}))
    late = await bus.subscribe(["nothing:>"], since_offset=1, correlation_ids=["c2"])
    assert late.recovered is True
    received = await _collect(late, 2)
    await _flush()
    received += late.take_nowait()
    assert [event.offset for event in received] == [2, 3]


# --- slow consumers -------------------------------------------------------------------------------------------


async def test_slow_consumer_is_cut_off_others_unaffected(bus: MemoryBus) -> None:
    """A subscriber that stops reading gets SlowConsumer with its last offset; another gets every event."""
    slow = await bus.subscribe([">"], max_pending=5)
    fast = await bus.subscribe([">"])
    await _publish(bus, ["demo:a:v1:s"] * 3)
    assert [event.offset for event in await _collect(slow, 3)] == [1, 2, 3]
    assert slow.last_offset == 3
    for _ in range(4):
        await _publish(bus, ["demo:a:v1:s"] * 3)
        await _flush()
    with pytest.raises(SlowConsumer) as info:
        await slow.next_batch()
    assert info.value.last_offset == 3
    assert info.value.limit == 5
    assert slow.closed
    assert [event.offset for event in await _collect(fast, 15)] == list(range(1, 16))
    assert bus.stats().slow_consumers == 1
    assert bus.stats().subscribers == 1


async def test_never_reading_subscriber_overflows_at_once(bus: MemoryBus) -> None:
    """A subscriber with a tiny queue that never reads is cut off with last_offset 0 while publishing goes on."""
    slow = await bus.subscribe([">"], max_pending=2)
    fast = await bus.subscribe([">"])
    await _publish(bus, ["demo:a:v1:s"] * 10)
    await _flush()
    await _publish(bus, ["demo:a:v1:s"] * 10)
    assert [event.offset for event in await _collect(fast, 20)] == list(range(1, 21))
    with pytest.raises(SlowConsumer) as info:
        slow.take_nowait()
    assert info.value.last_offset == 0


# --- closing --------------------------------------------------------------------------------------------------


async def test_publish_after_close_raises() -> None:
    """Publishing or subscribing on a closed (or never started) bus raises BusUnavailable."""
    bus = MemoryBus()
    with pytest.raises(BusUnavailable, match="not started"):
        await bus.publish(_event())
    await bus.start()
    assert bus.healthy
    sub = await bus.subscribe([">"])
    await bus.close()
    assert not bus.healthy
    with pytest.raises(BusUnavailable, match="closed"):
        await bus.publish(_event())
    with pytest.raises(BusUnavailable):
        await bus.publish_live(_event())
    with pytest.raises(BusUnavailable):
        await bus.subscribe([">"])
    with anyio.fail_after(5):
        assert await sub.next_batch() == []


async def test_close_delivers_what_was_published(bus: MemoryBus) -> None:
    """Events published just before close still reach subscribers, then the subscription ends."""
    sub = await bus.subscribe([">"])
    await _publish(bus, ["demo:a:v1:s"] * 3)
    await bus.close()
    assert [event.offset async for event in sub.events()] == [1, 2, 3]


# --- live-only events -----------------------------------------------------------------------------------------


async def test_heartbeats_are_live_only(bus: MemoryBus) -> None:
    """publish_live delivers with offset 0, stores nothing, and is never replayed."""
    await bus.publish(_event("demo:stream_x:v1:started"))
    sub = await bus.subscribe(["demo:>"])
    await bus.publish_live(_event("demo:stream_x:v1:heartbeat", n=1))
    await bus.publish(_event("demo:stream_x:v1:stream", n=2))
    received = await _collect(sub, 2)
    assert [(event.state, event.offset) for event in received] == [("heartbeat", 0), ("stream", 2)]
    assert received[0].epoch == bus.epoch
    assert await bus.head_offset() == 2
    assert [event.state for event in bus.history()] == ["started", "stream"]
    late = await bus.subscribe(["demo:>"], since_offset=1, epoch=bus.epoch)
    assert late.recovered is True
    replayed = await _collect(late, 1)
    await _flush()
    replayed += late.take_nowait()
    assert [(event.state, event.offset) for event in replayed] == [("stream", 2)]


async def test_offset_zero_with_the_epoch_replays_the_whole_history() -> None:
    """since_offset 0 with the current epoch means 'nothing seen yet': everything retained is replayed."""
    bus = MemoryBus()
    await bus.start()
    for i in range(3):
        await bus.publish(Event.create("demo:a:v1:b", {"i": i}))
    sub = await bus.subscribe([">"], since_offset=0, epoch=bus.epoch)
    assert sub.recovered is True
    assert [e.offset for e in sub.take_nowait()] == [1, 2, 3]
    await bus.close()


async def test_history_and_dedupe_window_are_bounded_by_bytes() -> None:
    """history_max_bytes bounds the ring and the dedupe window alike: big old events are let go (an id repeated
    after its event left that bound is stored again rather than held forever)."""
    bus = MemoryBus(history_max_bytes=5_000)
    await bus.start()
    big = "x" * 2_000
    for n in range(5):
        await bus.publish(Event.create("demo:big:v1:made", {"b": big}, event_id=f"big-{n}"))
    assert [e.event_id for e in bus.history()] == ["big-3", "big-4"]
    assert bus.stats().first_offset == 4
    again = await bus.publish(Event.create("demo:big:v1:made", {"b": big}, event_id="big-0"))
    assert not again.duplicate
    recent = await bus.publish(Event.create("demo:big:v1:made", {"b": big}, event_id="big-4"))
    assert recent.duplicate
    await bus.close()


async def test_a_duplicate_of_an_event_that_left_the_history_returns_the_original() -> None:
    """An id repeated inside the dedupe window after its event left the history ring still gets the stored
    original back (payload, metadata, offset), and nothing is stored."""
    bus = MemoryBus(history_size=3)
    await bus.start()
    first = await bus.publish(
        Event.create("demo:echo:v1:created", {"v": "ü"}, event_id="early", metadata={"owner": "alice"})
    )
    await _publish(bus, ["demo:echo:v1:created"] * 5)
    assert bus.first_offset == 4
    again = await bus.publish(Event.create("demo:echo:v1:created", {"v": 2}, event_id="early"))
    assert again.duplicate is True
    assert again.event == first.event
    assert (again.event.offset, again.event.payload, again.event.metadata) == (1, {"v": "ü"}, {"owner": "alice"})
    assert await bus.head_offset() == 6
    await bus.close()


def _collector_load() -> tuple[int, int]:
    """The objects the garbage collector tracks, and the references a full collection walks (what it costs)."""
    gc.collect()
    tracked = gc.get_objects()
    return len(tracked), len(gc.get_referents(*tracked))


async def test_the_garbage_collector_has_nothing_to_walk_in_a_full_history() -> None:
    """Storing thousands of events (history and dedupe window) adds (almost) no object the garbage collector
    tracks and (almost) no reference it walks, so a full collection does not grow with the history."""
    bus = MemoryBus(history_size=5_000)
    await bus.start()
    await _publish(bus, ["demo:echo:v1:created"] * 10)
    objects_before, references_before = _collector_load()
    for n in range(5_000):
        await bus.publish(
            Event.create("demo:echo:v1:created", {"text": "x" * 150, "n": n, "tags": ["a"]}, metadata={"o": "u"})
        )
    await _flush()
    objects, references = _collector_load()
    assert len(bus.history()) == 5_000
    assert objects - objects_before < 500, f"{objects - objects_before} more objects tracked after 5000 events"
    assert references - references_before < 1_000, (
        f"a full collection walks {references - references_before} more references after 5000 events"
    )
    await bus.close()


def test_the_dedupe_window_forgets_expired_ids_in_groups_without_lookups() -> None:
    """Expired ids are let go as later ids are remembered (no lookup of theirs needed), an id is remembered at
    least window_s seconds, and max_entries bounds the window."""
    now = [100.0]
    window = DedupeWindow(10.0, max_entries=1_000, clock=lambda: now[0])
    for n in range(500):
        window.remember(f"id-{n}", b"record", 6)
        now[0] += 0.01
    assert len(window) == 500
    now[0] = 100.0 + 9.99
    assert window.get("id-0") == b"record"
    now[0] = 100.0 + 10.0 + window.step + 0.01
    window.remember("later", b"record", 6)
    assert len(window) < 500
    now[0] += 10.0 + window.step
    window.remember("last", b"record", 6)
    assert len(window) == 1
    assert window.get("later") is None
    for n in range(1_500):
        window.remember(f"more-{n}", b"record", 6)
    assert len(window) == 1_000
    assert window.get("more-499") is None
    assert window.get("more-500") == b"record"


@pytest.mark.parametrize("window_s", [0.8, 32.0])
def test_an_id_is_remembered_at_least_the_window_and_less_than_one_step_more(window_s: float) -> None:
    """An id stays in the window for ``window_s`` seconds and is gone before ``window_s`` plus its step (a
    sixteenth of the window, at most a second) has passed."""
    now = [100.5]
    window = DedupeWindow(window_s, clock=lambda: now[0])
    assert window.step == min(1.0, window_s / 16)
    window.remember("id", b"record", 6)
    now[0] += window_s - 0.001
    assert window.get("id") == b"record"
    now[0] += 0.001 + window.step + 1e-6
    assert window.get("id") is None


def test_the_dedupe_window_holds_ids_up_to_exactly_its_byte_bound() -> None:
    """With ``max_bytes``, events whose sizes add up to exactly the bound are all remembered; one byte more
    forgets the oldest."""
    events = [Event.create("demo:echo:v1:created", {"n": n}) for n in range(3)]
    bound = events[0].size() + events[1].size()
    window = DedupeWindow(60.0, max_bytes=bound, clock=lambda: 0.0)
    for event in events[:2]:
        window.remember(event.event_id, event, event.size())
    assert (window.get(events[0].event_id), window.bytes) == (events[0], bound)
    window.remember(events[2].event_id, events[2], events[2].size())
    assert window.get(events[0].event_id) is None
    assert window.get(events[1].event_id) == events[1]


async def test_a_long_replay_is_decoded_as_it_is_taken_and_live_events_follow_it_in_order() -> None:
    """Opening a subscription over a long history decodes nothing yet: each take decodes one chunk, so a
    subscriber resuming from far back never holds the event loop for the whole replay; live events stored
    meanwhile come after the replay, without a gap or a repeat, and pattern filtering still applies."""
    from nexus.bus.base import REPLAY_CHUNK

    bus = MemoryBus(history_size=50_000)
    await bus.start()
    for i in range(3 * REPLAY_CHUNK + 10):
        await bus.publish(Event("replay:item:v1:made" if i % 3 else "replay:other:v1:made", {"i": i}))
    sub = await bus.subscribe(["replay:item:>"], since_offset=0, epoch=bus.epoch)
    assert sub.recovered is True
    wanted = [i for i in range(3 * REPLAY_CHUNK + 10) if i % 3]
    assert sub.pending == len(wanted)
    for i in range(5):
        await bus.publish(Event("replay:item:v1:made", {"i": 10_000 + i}))
        await bus.publish(Event("replay:other:v1:made", {"i": 20_000 + i}))
    batches: list[list[Event]] = []
    while sum(len(batch) for batch in batches) < len(wanted) + 5:
        batches.append(await asyncio.wait_for(sub.next_batch(), 5))
    assert max(len(batch) for batch in batches[:-1]) <= REPLAY_CHUNK
    seen = [event.payload["i"] for batch in batches for event in batch]
    assert seen == wanted + [10_000 + i for i in range(5)]
    offsets = [event.offset for batch in batches for event in batch]
    assert offsets == sorted(offsets)
    await bus.close()


async def test_a_history_of_one_event_is_allowed_and_none_is_refused() -> None:
    """history_size 1 keeps the newest event for replay; 0 is refused at construction with a clear message."""
    bus = MemoryBus(history_size=1)
    await bus.start()
    try:
        for n in range(3):
            await bus.publish(Event.create("demo:a:v1:s", {"n": n}))
        assert [event.offset for event in bus.history()] == [3]
    finally:
        await bus.close()
    with pytest.raises(ValueError, match=r"^history_size must be at least 1$"):
        MemoryBus(history_size=0)
