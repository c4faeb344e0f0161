"""One conformance suite for every bus: the memory bus and the NATS JetStream bus behave the same.

Each test gets a :class:`Harness` for one history. ``await harness.node()`` is a bus on that history: on the
memory bus always the same instance (one process), on NATS a new node on the test's own stream. So "publish on
one node, subscribe on another" is the same test for both.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
import pytest
from nats_support import (
    delete_stream,
    events_before_a_marker,
    nats_settings,
    shared_nats_url,
    take_until,
    unique_names,
    until,
)

from nexus import Event, InvalidPattern
from nexus.bus import Bus, MemoryBus, Subscription
from nexus.errors import BusUnavailable, SlowConsumer

GUARD = 10.0


@dataclasses.dataclass
class Harness:
    """The buses of one test, on one history."""

    kind: str
    url: str = ""
    stream: str = ""
    prefix: str = ""
    buses: list[Bus] = dataclasses.field(default_factory=list)
    _memory: MemoryBus | None = None
    _memory_settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    async def node(self, **settings: Any) -> Bus:
        """A started bus on this test's history (memory: the one bus, or a new one when other settings are given
        than the first call's)."""
        if self.kind == "memory":
            if self._memory is None or settings not in ({}, self._memory_settings):
                bus = MemoryBus(**{k: v for k, v in settings.items() if k in ("dedupe_window_s", "history_size")})
                await bus.start()
                self.buses.append(bus)
                if self._memory is None:
                    self._memory, self._memory_settings = bus, settings
                return bus
            return self._memory
        from nexus.bus.nats import NatsBus

        nats_bus = NatsBus(nats_settings(self.url, self.stream, self.prefix, **settings).nats_bus_settings())
        await nats_bus.start()
        self.buses.append(nats_bus)
        return nats_bus

    async def close(self) -> None:
        for bus in self.buses:
            await bus.close()
        if self.kind == "nats":
            await delete_stream(self.url, self.stream)


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """A harness for the bus named by the parameter; NATS tests get their own stream and subject prefix."""
    kind = str(request.param)
    if kind == "nats":
        stream, prefix = unique_names("conf")
        instance = Harness(kind, url=shared_nats_url(), stream=stream, prefix=prefix)
    else:
        instance = Harness(kind)
    try:
        yield instance
    finally:
        await instance.close()


def _event(event_type: str = "demo:thing:v1:made", **payload: Any) -> Event:
    return Event.create(event_type, payload)


async def _publish(bus: Bus, types: Iterable[str]) -> list[Event]:
    return [(await bus.publish(_event(event_type, n=n))).event for n, event_type in enumerate(types)]


async def _take(sub: Subscription, count: int) -> list[Event]:
    """Take ``count`` events, failing if the subscription ends first or the guard runs out."""
    events: list[Event] = []
    with anyio.fail_after(GUARD):
        while len(events) < count:
            batch = await sub.next_batch()
            assert batch, f"the subscription ended after {len(events)} events"
            events.extend(batch)
    return events


async def _read_to_the_end(sub: Subscription) -> None:
    """Read until the subscription ends (raising what ended it)."""
    with anyio.fail_after(GUARD):
        while await sub.next_batch():
            pass


# --- storing ------------------------------------------------------------------------------------------------


async def test_offsets_start_after_the_head_and_grow_by_one(harness: Harness) -> None:
    """Each stored event gets the next offset (1 on an empty history) in the bus's epoch."""
    bus = await harness.node()
    assert await bus.head_offset() == 0
    stored = await _publish(bus, ["demo:thing:v1:made"] * 5)
    assert [event.offset for event in stored] == [1, 2, 3, 4, 5]
    assert {event.epoch for event in stored} == {bus.epoch}
    assert await bus.head_offset() == 5


async def test_nodes_of_one_history_share_offsets_and_epoch(harness: Harness) -> None:
    """Two nodes on one history report the same epoch and head, and offsets continue across them."""
    first, second = await harness.node(), await harness.node()
    assert first.epoch == second.epoch
    one = (await first.publish(_event())).event
    two = (await second.publish(_event())).event
    assert (one.offset, two.offset) == (1, 2)
    assert await first.head_offset() == await second.head_offset() == 2


async def test_one_publishers_events_reach_another_nodes_subscriber_in_order_once(harness: Harness) -> None:
    """Everything one publisher stores, one at a time or in a batch, reaches a subscriber elsewhere in order, once."""
    publisher, reader = await harness.node(), await harness.node()
    sub = await reader.subscribe([">"])
    single = await _publish(publisher, ["demo:thing:v1:made"] * 40)
    batch = [result.event for result in await publisher.publish_many([_event(n=n) for n in range(40, 80)])]
    expected = [event.offset for event in single + batch]
    assert expected == list(range(1, 81))
    received = await _take(sub, 80)
    assert [event.offset for event in received] == expected
    assert [event.payload["n"] for event in received] == list(range(40)) + list(range(40, 80))
    assert await events_before_a_marker(publisher, sub) == []


async def test_a_repeated_event_id_returns_the_stored_original(harness: Harness) -> None:
    """Publishing an event id again inside the window stores nothing and returns the original, from any node."""
    first_node, second_node = await harness.node(), await harness.node()
    sub = await first_node.subscribe([">"])
    first = await first_node.publish(Event.create("demo:pay:v1:made", {"v": 1}, event_id="same"))
    again = await second_node.publish(Event.create("demo:pay:v1:made", {"v": 2}, event_id="same"))
    assert again.duplicate
    assert (again.event.offset, again.event.payload, again.event.event_id) == (1, {"v": 1}, "same")
    assert again.event.timestamp == first.event.timestamp
    other = await first_node.publish(Event.create("demo:pay:v1:made", {"v": 3}, event_id="other"))
    assert (other.duplicate, other.event.offset) == (False, 2)
    assert [event.event_id for event in await _take(sub, 2)] == ["same", "other"]
    assert await events_before_a_marker(second_node, sub) == []


async def test_a_zero_dedupe_window_stores_every_publish(harness: Harness) -> None:
    """With deduplication off, a repeated event id is stored again."""
    bus = await harness.node(dedupe_window_s=0.0)
    await bus.publish(Event.create("demo:pay:v1:made", event_id="id"))
    second = await bus.publish(Event.create("demo:pay:v1:made", event_id="id"))
    assert (second.duplicate, second.event.offset) == (False, 2)


async def test_a_repeated_event_id_after_the_window_is_stored_again(harness: Harness) -> None:
    """The dedupe window is the configured one: a repeat inside it is a duplicate, one after it is stored anew."""
    bus = await harness.node(dedupe_window_s=1.0)
    await bus.publish(Event.create("demo:pay:v1:made", event_id="id"))
    inside = await bus.publish(Event.create("demo:pay:v1:made", event_id="id"))
    assert (inside.duplicate, inside.event.offset) == (True, 1)
    await asyncio.sleep(1.5)
    after = await bus.publish(Event.create("demo:pay:v1:made", event_id="id"))
    assert (after.duplicate, after.event.offset) == (False, 2)


# --- delivery -----------------------------------------------------------------------------------------------


async def test_patterns_select_exactly_the_matching_events(harness: Harness) -> None:
    """A subscriber receives exactly what its patterns match, once even when several match, in offset order."""
    publisher, reader = await harness.node(), await harness.node()
    sub = await reader.subscribe(["demo:*:v1:made", "places:>", "demo:a:v1:*"])
    types = ["demo:a:v1:made", "other:a:v1:made", "places:x:v2:moved", "demo:b:v1:gone", "demo:a:v1:gone"] * 6
    stored = await _publish(publisher, types)
    expected = [
        event.offset
        for event in stored
        if event.event_type.startswith("places:")
        or (event.event_type.endswith(":v1:made") and event.event_type.startswith("demo:"))
        or event.event_type.startswith("demo:a:v1:")
    ]
    received = await _take(sub, len(expected))
    assert [event.offset for event in received] == expected
    assert await events_before_a_marker(publisher, sub) == []


async def test_invalid_pattern_is_refused(harness: Harness) -> None:
    """A subscription with an invalid pattern raises InvalidPattern."""
    bus = await harness.node()
    with pytest.raises(InvalidPattern):
        await bus.subscribe(["demo:>", "Bad:>"])


async def test_replay_from_an_offset_then_live_without_gap_or_duplicate(harness: Harness) -> None:
    """A subscriber resuming from offset N gets every matching event after N exactly once, while others publish."""
    publisher, reader = await harness.node(), await harness.node()
    before = await _publish(publisher, ["demo:a:v1:s", "skip:a:v1:s"] * 30)
    publishing = asyncio.create_task(_publish(publisher, ["demo:a:v1:s", "skip:a:v1:s"] * 30))
    await asyncio.sleep(0)
    sub = await reader.subscribe(["demo:>"], since_offset=10, epoch=reader.epoch)
    assert sub.recovered is True
    after = await publishing
    last = after[-2].offset
    expected = [e.offset for e in before + after if e.event_type.startswith("demo") and e.offset > 10]
    received = await take_until(sub, last)
    assert [event.offset for event in received] == expected
    assert await events_before_a_marker(publisher, sub) == []


async def test_recovered_says_whether_the_gap_was_replayed(harness: Harness) -> None:
    """recovered is None without an offset, True inside the history, False for another epoch or ahead of the head."""
    bus = await harness.node()
    await _publish(bus, ["demo:a:v1:s"] * 3)
    assert (await bus.subscribe([">"])).recovered is None
    assert (await bus.subscribe([">"], since_offset=3, epoch=bus.epoch)).recovered is True
    assert (await bus.subscribe([">"], since_offset=1)).recovered is True
    other_epoch = await bus.subscribe([">"], since_offset=1, epoch="another-history")
    ahead = await bus.subscribe([">"], since_offset=4)
    assert (other_epoch.recovered, ahead.recovered) == (False, False)
    newest = (await bus.publish(_event("demo:a:v1:s"))).event
    for sub in (other_epoch, ahead):
        assert [event.offset for event in await _take(sub, 1)] == [newest.offset]


async def test_a_resume_older_than_the_history_says_not_recovered_and_continues_live(harness: Harness) -> None:
    """An offset whose successors the history no longer holds is reported (recovered False), then live follows."""
    publisher = await harness.node(history_size=5)
    reader = await harness.node(history_size=5)
    await _publish(publisher, ["demo:a:v1:s"] * 12)
    sub = await reader.subscribe([">"], since_offset=3, epoch=reader.epoch)
    assert sub.recovered is False
    newest = (await publisher.publish(_event("demo:a:v1:s"))).event
    # Live from what the reader's node had read when it subscribed (on NATS its tail may still be behind).
    live = [event.offset for event in await take_until(sub, newest.offset)]
    assert live == sorted(set(live))
    assert live[-1] == 13
    kept = await reader.subscribe([">"], since_offset=9, epoch=reader.epoch)
    assert kept.recovered is True


async def test_offset_zero_with_the_epoch_replays_everything_retained(harness: Harness) -> None:
    """since_offset 0 with the current epoch means nothing seen yet: the whole history is replayed, then live."""
    publisher, reader = await harness.node(), await harness.node()
    await _publish(publisher, ["demo:a:v1:s"] * 3)
    sub = await reader.subscribe([">"], since_offset=0, epoch=reader.epoch)
    assert sub.recovered is True
    await publisher.publish(_event("demo:a:v1:s"))
    assert [event.offset for event in await _take(sub, 4)] == [1, 2, 3, 4]
    assert await events_before_a_marker(publisher, sub) == []


async def test_following_a_correlation_id_replays_and_continues_live(harness: Harness) -> None:
    """A subscriber following a correlation id gets that request's stored and later events, once, and no others."""
    publisher, reader = await harness.node(), await harness.node()
    request = (await publisher.publish(Event.create("demo:a:v1:requested", event_id="c1"))).event
    await publisher.publish(Event.create("demo:a:v1:started", metadata={"correlation_id": "c1"}))
    await publisher.publish(Event.create("demo:a:v1:started", metadata={"correlation_id": "c2"}))
    sub = await reader.subscribe(correlation_ids=["c1"], since_offset=request.offset, epoch=request.epoch)
    assert sub.recovered is True
    await publisher.publish(Event.create("other:b:v1:success", metadata={"correlation_id": "c1"}))
    received = await _take(sub, 2)
    assert [(event.event_type, event.offset) for event in received] == [
        ("demo:a:v1:started", 2),
        ("other:b:v1:success", 4),
    ]
    marker = Event.create("demo:marker:v1:made", metadata={"correlation_id": "c1"})
    assert await events_before_a_marker(publisher, sub, marker) == []


async def test_heartbeats_are_live_only(harness: Harness) -> None:
    """publish_live reaches subscribers on every node with offset 0, is never stored and never replayed."""
    publisher, reader = await harness.node(), await harness.node()
    started = (await publisher.publish(_event("demo:stream_x:v1:started"))).event
    # From the explicit offset of 'started': a node's live subscription starts after what its tail has read so
    # far, which on NATS may not include 'started' yet; resuming after it is the same on every bus and node.
    sub = await reader.subscribe(["demo:stream_x:v1:*"], since_offset=started.offset, epoch=reader.epoch)
    await publisher.publish_live(_event("demo:stream_x:v1:heartbeat", n=1))
    received = await _take(sub, 1)
    assert [(event.state, event.offset, event.epoch) for event in received] == [("heartbeat", 0, reader.epoch)]
    chunk = (await publisher.publish(_event("demo:stream_x:v1:stream", n=2))).event
    assert chunk.offset == 2
    assert [event.offset for event in await _take(sub, 1)] == [2]
    late = await reader.subscribe(["demo:>"], since_offset=0, epoch=reader.epoch)
    assert [(event.state, event.offset) for event in await _take(late, 2)] == [("started", 1), ("stream", 2)]
    assert await events_before_a_marker(publisher, late) == []


async def test_a_heartbeat_does_not_move_the_offset_a_cut_off_subscriber_resumes_from(harness: Harness) -> None:
    """A subscriber whose last event taken was a heartbeat (offset 0) is cut off naming its last stored offset."""
    publisher, reader = await harness.node(), await harness.node()
    sub = await reader.subscribe([">"], max_pending=3)
    await _publish(publisher, ["demo:stream_x:v1:stream"] * 2)
    assert [event.offset for event in await _take(sub, 2)] == [1, 2]
    await publisher.publish_live(_event("demo:stream_x:v1:heartbeat"))
    assert [event.offset for event in await _take(sub, 1)] == [0]
    assert sub.last_offset == 2
    await _publish(publisher, ["demo:stream_x:v1:stream"] * 10)
    with pytest.raises(SlowConsumer) as caught:
        await _read_to_the_end(sub)
    assert caught.value.last_offset == 2
    assert "resume from offset 2" in str(caught.value)


async def test_a_subscriber_holds_exactly_its_queue_bound_and_is_cut_off_past_it(harness: Harness) -> None:
    """A subscriber that reads nothing keeps max_pending events queued; one more cuts it off."""
    publisher, reader = await harness.node(), await harness.node()
    sub = await reader.subscribe([">"], max_pending=5)
    await _publish(publisher, ["demo:a:v1:s"] * 5)
    await until("five events are queued (or the subscriber was cut off)", lambda: sub.pending == 5 or sub.closed)
    assert (sub.closed, sub.pending) == (False, 5)
    await publisher.publish(_event("demo:a:v1:s"))
    await until("the subscriber is cut off", lambda: sub.closed)
    with pytest.raises(SlowConsumer) as caught:
        await _read_to_the_end(sub)
    assert (caught.value.last_offset, caught.value.limit) == (0, 5)


async def test_a_slow_subscriber_is_cut_off_and_the_others_are_not(harness: Harness) -> None:
    """A subscriber whose queue overflows ends with SlowConsumer naming its last offset; others get everything."""
    publisher, reader = await harness.node(), await harness.node()
    slow = await reader.subscribe([">"], max_pending=5)
    fast = await reader.subscribe([">"])
    await _publish(publisher, ["demo:a:v1:s"] * 3)
    assert [event.offset for event in await _take(slow, 3)] == [1, 2, 3]
    await _publish(publisher, ["demo:a:v1:s"] * 30)
    assert [event.offset for event in await _take(fast, 33)] == list(range(1, 34))
    with pytest.raises(SlowConsumer) as caught:
        await _read_to_the_end(slow)
    assert caught.value.last_offset == 3
    assert slow.closed


async def test_a_closed_bus_refuses_to_publish_and_ends_subscriptions(harness: Harness) -> None:
    """After close, publishes and subscriptions raise BusUnavailable and open subscriptions end."""
    bus = await harness.node()
    sub = await bus.subscribe([">"])
    await bus.close()
    assert not bus.healthy
    with pytest.raises(BusUnavailable):
        await bus.publish(_event())
    with pytest.raises(BusUnavailable):
        await bus.subscribe([">"])
    with anyio.fail_after(GUARD):
        assert await sub.next_batch() == []
